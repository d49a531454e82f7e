"""Memory held by compiled `jeplb.eplb_step` programs, and how clearing the caches bounds it.

Usage (from the repository root):
    python benchmarks/program_cache.py [--shapes N]

On 8 simulated CPU devices it runs `eplb_step` (eagerly, a rebalance due every step) on a bf16
leaf [2, 16, R] for N new trailing widths R: each new shape compiles a program, which jax's jit
cache and jeplb's own program cache keep. It prints the process RSS growth per new shape, then
calls ``jax.clear_caches()`` and clears jeplb's step program cache, and runs N further new
shapes: their growth shows that the memory of the dropped programs is reused (the allocator keeps
the pages, so the RSS itself does not fall).
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import step as step_lib


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=10)
    args = parser.parse_args()
    mesh = Mesh(np.array(jax.devices()[:8]), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jeplb.EplbState.create(
        num_layers=2, num_experts=8, num_devices=8, num_redundant_experts=8, window_size=2,
        step_interval=1,
    )  # fmt: skip

    def run(width: int) -> None:
        w = jax.device_put(
            jnp.zeros((2, 16, width), jnp.bfloat16), NamedSharding(mesh, P(None, "ep"))
        )
        jax.block_until_ready(jeplb.eplb_step(state, w, mesh=mesh))

    run(3)
    run(3)
    base = rss_mib()
    for width in range(4, 4 + args.shapes):
        run(width)
    grown = rss_mib() - base
    print(
        f"{args.shapes} new leaf shapes: RSS +{grown:.1f} MiB ({grown / args.shapes:.1f} MiB each)"
    )
    jax.clear_caches()
    step_lib._program.cache_clear()
    gc.collect()
    after = rss_mib()
    for width in range(100, 100 + args.shapes):
        run(width)
    print(
        f"{args.shapes} further new shapes after jax.clear_caches() and the step cache cleared: "
        f"RSS +{rss_mib() - after:.1f} MiB"
    )


if __name__ == "__main__":
    main()

"""The balanced replica choice on a GPU: the Pallas kernels against XLA's ranks.

1. Exactness: `dispatch_layer`'s core with ``replica_choice="balanced"`` run both ways (the
   ranks by `jeplb._src.balanced_kernel` and by `dispatch._ranks_blocked`) on uniform, skewed,
   masked and out-of-range ids at 4096 x top-8 of E = 256 on P = 288 slots of 8 devices, and
   inside `jax.shard_map` with global ranks (``token_axes``).
2. One layer alone, per kernel block setting (count block, map block, group chunk): its
   launches and times per call (host-bound: read them against one another only).
3. The 58-layer decode step of `jeplb.tools.bench_decode` (unrolled, one jitted call per step)
   with the balanced choice on every layer, each form against the plain step in the same run.

Usage (from the repository root; on the CPU both forms take the sort):
    python benchmarks/balanced_kernel.py [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jeplb._src import balanced_kernel as bk
from jeplb._src import dispatch as dl
from jeplb._src.maps import maps_from_phy2log
from jeplb.tools import bench_decode as bd
from jeplb.tools.benchio import results_path, write_results

E, T, K, D, NL = 256, 4096, 8, 8, 36
BLOCKS = (
    (512, 32, 8), (512, 64, 8), (256, 32, 8), (1024, 16, 8), (512, 32, 16), (256, 16, 4),
    (1024, 32, 8),
)  # fmt: skip


def core(log2phy, logcnt, impl, token_axes=None):
    """The balanced choice's (slots, counts) of ids [T, K] with mask ``valid``, ranked by ``impl``."""
    return lambda ids, valid: dl._dispatch_checked(
        log2phy, logcnt, ids, valid, None, "balanced", None, NL, D, token_axes, "scatter", impl
    )


def exactness(log2phy, logcnt, rng) -> list[str]:
    lines = []
    for name in ("uniform", "skewed", "masked", "out of range"):
        ids = np.argsort(rng.random((T, E)), -1)[:, :K].astype(np.int32)
        valid = None
        if name != "uniform":
            ids = np.minimum(rng.zipf(1.2, (T, K)) - 1, E - 1).astype(np.int32)
        if name == "masked":
            valid = jnp.asarray(rng.random(T) < 0.8)
        if name == "out of range":
            ids[::7, 3], ids[::11, 0] = E + 5, -1
        a, b = (
            jax.jit(core(log2phy, logcnt, i))(jnp.asarray(ids), valid) for i in ("xla", "kernel")
        )
        lines.append(
            f"{name}: {all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b, strict=True))}"
        )
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("t",))
    ids = jnp.asarray(np.minimum(rng.zipf(1.2, (T, K)) - 1, E - 1).astype(np.int32))

    def sharded(impl):
        body = lambda i: core(log2phy, logcnt, impl, ("t",))(i, None)[0]  # noqa: E731
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("t"), out_specs=P("t")))(ids)

    lines.append(
        f"inside shard_map, global ranks: {bool(jnp.array_equal(*map(sharded, ('xla', 'kernel'))))}"
    )
    return lines


def one_layer(log2phy, logcnt, ids, impl, repeats) -> str:
    """One layer's launches, and its time per synchronised call and back to back."""
    c = jax.jit(lambda i: core(log2phy, logcnt, impl)(i, None)).lower(ids).compile()
    ops = len(bd.entry_ops(c.as_text()))
    for _ in range(5):
        c(ids)
    calls = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(c(ids))
        calls.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(repeats):
        out = c(ids)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t) / repeats
    return f"{ops} operations, {1e6 * np.median(calls):.1f} us / {1e6 * pipelined:.1f} us"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/balanced_kernel.py")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    device = bd.device_summary()
    print(device, flush=True)
    rng = np.random.default_rng(0)
    p2l = np.concatenate([np.arange(E), rng.integers(0, 16, D * NL - E)])
    p2l = rng.permutation(p2l)[None].astype(np.int32)
    log2phy, logcnt = (a[0] for a in maps_from_phy2log(jnp.asarray(p2l), E, 16))
    lines = ["## Exactness (kernel slots and counts equal to XLA's)", ""]
    lines += [f"* {x}" for x in exactness(log2phy, logcnt, rng)]
    ids = jnp.asarray(np.minimum(rng.zipf(1.2, (T, K)) - 1, E - 1).astype(np.int32))
    lines += ["", "## One layer alone (synchronised call / back to back)", ""]
    lines += [f"* xla: {one_layer(log2phy, logcnt, ids, 'xla', 200)}"]
    default = (bk.COUNT_BLOCK, bk.MAP_BLOCK, bk.GROUP_CHUNK)
    for blocks in BLOCKS:
        bk.COUNT_BLOCK, bk.MAP_BLOCK, bk.GROUP_CHUNK = blocks
        lines.append(f"* kernel {blocks}: {one_layer(log2phy, logcnt, ids, 'kernel', 200)}")
    bk.COUNT_BLOCK, bk.MAP_BLOCK, bk.GROUP_CHUNK = default
    print("\n".join(lines), flush=True)
    programs, ops = {}, {}
    for name, impl in (("plain", None), ("balanced, xla", "xla"), ("balanced, kernel", "kernel")):
        if impl:
            dl._BALANCED_IMPL = impl
        fn, fargs = bd.build(bd.DEFAULT, bd.PLAIN if impl is None else bd.BALANCED, "unrolled")
        programs[name] = (fn.lower(*fargs).compile(), fargs)  # traced now, with this form
        ops[name] = len(bd.entry_ops(programs[name][0].as_text()))
    med = bd.time_steps(programs, repeats=args.repeats, warmup=3, burst=10, samples=20)
    lines += ["", f"## The decode step ({bd.DEFAULT.name}, unrolled)", ""]
    lines += bd.per_layer_table(med, ops, layers=bd.DEFAULT.layers, first="step")
    text = (
        f"# Balanced dispatch: Pallas kernels and XLA ranks ({device})\n\n"
        f"Command: `python benchmarks/balanced_kernel.py {' '.join(given)}`\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    platform = jax.devices()[0].platform
    write_results(text, args.out or results_path(f"balanced_kernel_{platform}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

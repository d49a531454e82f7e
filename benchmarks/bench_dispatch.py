"""Dispatch benchmark: what recording the load adds to a layer's routing, inside a model's jit.

Per layer, inside one jitted `lax.fori_loop` over layers (as a scanned model runs them), with new
router ids every layer:

* ``loop``: the loop and the ids alone (the floor of the measure);
* ``map``: `jeplb.dispatch_layer`'s physical ids only (its counts unused, so XLA drops them);
* ``map + count``: `jeplb.dispatch_layer` with its counts used;
* ``dispatch``: `jeplb.dispatch` on an `EplbState`: ids mapped and counts added into
  ``pass_load[layer]`` (what a model calls).

Each variant is compiled with 2 and with 130 layers' worth of trips; the per-layer time is the
difference of the two programs' medians over 128, so the call's dispatch cancels out. The cost of
recording is ``map + count`` (or ``dispatch``) minus ``map``.

Usage (from the repository root):
    python benchmarks/bench_dispatch.py [--repeats N] [--out PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jeplb
from jeplb.tools.benchio import results_path, table, write_results

_TRIPS = (2, 130)
# (tokens T, top-k K, experts E, slots P): DeepSeek-V3's routing at two batch sizes.
_CASES = ((4096, 8, 256, 288), (16384, 8, 256, 288))


@dataclasses.dataclass
class Row:
    case: str
    variant: str
    us_per_layer: float
    over_map_us: float


def _variants(state: jeplb.EplbState, e: int):
    """name -> body(layer, ids, carry) -> carry; the carry is (int32[E] sink, state)."""
    log2phy, logcnt = state.log2phy[0], state.logcnt[0]

    def loop(i, ids, carry):
        sink, s = carry
        return sink + ids[0, 0], s

    def mapped(i, ids, carry):
        sink, s = carry
        phys, _ = jeplb.dispatch_layer(log2phy, logcnt, ids)
        return sink + phys[0, 0] + phys[-1, -1], s

    def counted(i, ids, carry):
        sink, s = carry
        phys, counts = jeplb.dispatch_layer(log2phy, logcnt, ids)
        return sink + counts + phys[0, 0] + phys[-1, -1], s

    def recorded(i, ids, carry):
        sink, s = carry
        s, phys = jeplb.dispatch(s, i % s.num_layers, ids)
        return sink + phys[0, 0] + phys[-1, -1], s

    return {"loop": loop, "map": mapped, "map + count": counted, "dispatch": recorded}


def _program(body, trips: int, e: int):
    def run(ids, state):
        def step(i, carry):
            return body(i, (ids + i) % e, carry)

        return lax.fori_loop(0, trips, step, (jnp.zeros((e,), jnp.int32), state))

    return jax.jit(run)


def run_case(case, *, repeats: int) -> list[Row]:
    t, k, e, p = case
    state = jeplb.EplbState.create(
        num_layers=8, num_experts=e, num_devices=1, num_redundant_experts=p - e,
        window_size=1, step_interval=1,
    )  # fmt: skip
    ids = jnp.asarray(np.random.default_rng(0).integers(0, e, (t, k)), jnp.int32)
    progs = {
        (name, n): _program(body, n, e)
        for name, body in _variants(state, e).items()
        for n in _TRIPS
    }
    times = {key: [] for key in progs}
    for prog in progs.values():  # compile and warm up
        jax.block_until_ready(prog(ids, state))
    for _ in range(repeats):  # interleaved
        for key, prog in progs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(prog(ids, state))
            times[key].append(time.perf_counter() - t0)
    span = _TRIPS[1] - _TRIPS[0]
    per = {
        name: (np.median(times[(name, _TRIPS[1])]) - np.median(times[(name, _TRIPS[0])])) / span
        for name in _variants(state, e)
    }
    label = f"T={t} K={k} E={e}"
    return [Row(label, n, float(1e6 * v), float(1e6 * (v - per["map"]))) for n, v in per.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_dispatch.py")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_dispatch.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    rows = []
    for case in _CASES:
        rows += run_case(case, repeats=args.repeats)
        for r in rows[-4:]:
            print(r, flush=True)
    device = jax.devices()[0]
    text = (
        f"# Dispatch: the cost of recording the load ({device.platform})\n\n"
        f"Command: `{command.strip()}`\n\njax {jax.__version__}, {device.device_kind}\n\n"
        f"Per layer inside one jitted loop over layers ({_TRIPS[1]} against {_TRIPS[0]} trips, "
        f"medians of {args.repeats} interleaved calls); `over_map_us`: what the variant adds to "
        f"mapping the ids alone.\n\n"
    )
    text += table(rows, "Per-layer time")
    write_results(
        text,
        args.out or results_path(f"dispatch_{device.platform}.md"),
        json_path=args.json,
        payload={"rows": [dataclasses.asdict(r) for r in rows]},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the library's map costs more than a hand-written one, inside the decode step (GPU).

`count_forms.py`'s step (58 layers unrolled, 4096 tokens x top-8 of E = 256 on P = 288 slots,
one jitted call per step, state and weights donated), each layer's ids mapped by one of:

* ``hand``: `count_forms.hash_map` (the hash choice written out, no range checks);
* ``hand checked``: the same with the library's range checks (ids outside [0, E) give -1);
* ``hand materialised``: ``hand`` through `lax.optimization_barrier` (the slots made once, not
  fused into the expert read);
* ``library``: `jeplb.dispatch(..., record=False)`;
* ``library core``: the checked core (`dispatch._dispatch_checked`) called directly (no nested
  jit);
* ``library fused``: the core without its barrier (`dispatch._map_and_count`): the map fused
  into the expert read, as the library made it before;
* ``dispatch_layer``: `jeplb.dispatch_layer` on the state's map slices;

with and without `EplbState.record_ids` after the forward (``+ record_ids``), and the library's
form again with the state replicated on a one-device mesh and the weights sharded over it
(``mesh``: `bench_decode`'s harness). Each is timed against its own plain step in the same run
(the programs interleaved); the optimised HLO of each step is written next to the results
(``--hlo DIR``) to read what XLA fused.

Usage (from the repository root):
    python benchmarks/map_isolation.py [--repeats N] [--hlo DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from count_forms import E, K, T, hash_map, step_inputs
from count_forms import P as SLOTS
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import dispatch as dl
from jeplb.tools import bench_decode as bd
from jeplb.tools.benchio import results_path, write_results

L = 58
FORMS = (
    "plain",
    "hand",
    "hand checked",
    "hand materialised",
    "hand + record_ids",
    "library",
    "library + record_ids",
    "library core",
    "library fused",
    "dispatch_layer",
    "plain, mesh",
    "library + record_ids, mesh",
)
# `bench_decode`'s own steps (`bench_dispatch`'s harness), built in the same run.
BENCH_DECODE = (bd.PLAIN, bd.ONCE, bd.DISPATCH)


def map_ids(form, state, layer, ids):
    """Layer ``layer``'s slots of ``ids`` [T, K] by ``form`` (the state unchanged)."""
    l2p, cnt = state.log2phy[layer], state.logcnt[layer]
    if form.startswith("hand checked"):
        ok = (ids >= 0) & (ids < E)
        return jnp.where(ok, hash_map(l2p, cnt, jnp.where(ok, ids, 0)), -1)
    if form.startswith("hand materialised"):
        return lax.optimization_barrier(hash_map(l2p, cnt, ids))
    if form.startswith("hand"):
        return hash_map(l2p, cnt, ids)
    if form.startswith("library core") or form.startswith("library fused"):
        core = dl._dispatch_checked if form.startswith("library core") else dl._map_and_count
        args = (None, None, "hash", None, state.slots_per_device, state.num_devices, None)
        return core(l2p, cnt, ids, *args, "scatter", dl._BALANCED_IMPL)[0]
    if form.startswith("dispatch_layer"):
        return jeplb.dispatch_layer(l2p, cnt, ids)[0]
    return jeplb.dispatch(state, layer, ids, record=False)[1]


def build(form, seed=0):
    """(jitted step, its first arguments) for one form."""
    state, w, acc, ids0 = step_inputs(L, seed)
    if form.endswith("mesh"):
        mesh = Mesh(np.array(jax.devices()[:1]), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
        state = state.replicated(mesh)
        w = jax.device_put(w, NamedSharding(mesh, P(None, "ep")))

    def step(state, w, acc, ids0):
        kept = []
        for layer in range(L):
            ids = bd._route(acc, ids0[layer], E)
            slots = ids if form.startswith("plain") else map_ids(form, state, layer, ids)
            kept.append(ids)
            acc = bd._experts(acc, w[layer], slots)
        if "record_ids" in form:
            state = state.record_ids(jnp.stack(kept))
        return state, w, acc

    return jax.jit(step, donate_argnums=(0, 1, 2)), [state, w, acc, ids0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/map_isolation.py")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--hlo", default=None, metavar="DIR")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    device = bd.device_summary()
    print(device, flush=True)
    programs, ops = {}, {}
    for form in FORMS:
        fn, fargs = build(form)
        compiled = fn.lower(*fargs).compile()
        ops[form] = len(bd.entry_ops(compiled.as_text()))
        if args.hlo:
            os.makedirs(args.hlo, exist_ok=True)
            with open(os.path.join(args.hlo, form.replace(" ", "_") + ".hlo"), "w") as f:
                f.write(compiled.as_text())
        programs[form] = (compiled, fargs)
        print(f"{form}: {ops[form]} operations", flush=True)
    for variant in BENCH_DECODE:
        fn, fargs = bd.build(bd.DEFAULT, variant, "unrolled")
        programs[f"bench_decode {variant}"] = (fn.lower(*fargs).compile(), fargs)
    med = bd.time_steps(programs, repeats=args.repeats, warmup=3, burst=10, samples=20)
    lines = bd.per_layer_table(
        med, ops, layers=L, base_of=lambda f: "plain, mesh" if f.endswith("mesh") else "plain"
    )
    base = med[f"bench_decode {bd.PLAIN}"]
    harness = ", ".join(
        f"`{v}` {c:.0f} / {b:.0f} us ({(c - base[0]) / L:.2f} / {(b - base[1]) / L:.2f} us a layer)"
        for v in BENCH_DECODE
        for c, b in [med[f"bench_decode {v}"]]
    )
    lines += ["", f"The same run, `bench_decode`'s own steps (call / back to back): {harness}."]
    text = (
        f"# The library's map in the decode step ({device})\n\n"
        f"Command: `python benchmarks/map_isolation.py {' '.join(given)}`\n\n"
        f"L={L} T={T} K={K} E={E} P={SLOTS}; per layer: over the plain step of the same harness, "
        f"same run. Load average at the end: {bd.cpu_quiet()}.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    platform = jax.devices()[0].platform
    write_results(text, args.out or results_path(f"map_isolation_{platform}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

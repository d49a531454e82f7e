"""Ways to count a decode step's routed ids, compared inside the step (GPU).

The decode-like step of `jeplb.tools.bench_decode` (58 layers unrolled, 4096 tokens x top-8 of
E = 256 on P = 288 slots, one jitted call per step, state and weights donated), with the ids
mapped to slots by the hash choice on every layer and counted in one of these ways:

* ``plain``: no map, no count (the baseline);
* ``map only``: mapped, not counted (what the map itself costs);
* ``counted once``: mapped on every layer, every layer's ids counted after the forward by
  `jeplb.EplbState.record_ids` (rows of counters per block of ids, summed, one saturating add);
* ``dispatch``: `jeplb.dispatch` on every layer (counted per layer, the default);
* ``one row``: per layer, a scatter into one zeroed row of E counters, then a saturating add;
* ``in place``: per layer, a scatter-add straight into the state's row (wraps past 2^31 - 1:
  not exact, for comparison only); ``in place + fix``: and a select that saturates the row;
* ``saturating scatter``: per layer, `lax.scatter_apply` of a saturating increment into the
  state's row (exact; a compare-and-swap loop per id on a GPU).

Per step: medians of ``--repeats`` synchronised calls and of bursts of 10 back-to-back calls,
the programs interleaved; ``per layer``: the difference from ``plain`` divided by L. The
launches per step are the compiled entry computation's operations. Each counting form is also
checked against `jeplb.dispatch`'s counts on a skewed batch (``exact``).

Usage (from the repository root):
    python benchmarks/count_forms.py [--layers L] [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jeplb
from jeplb._src.counts import INT32_MAX, saturating_add
from jeplb._src.dispatch import _mix32
from jeplb.tools import bench_decode as bd
from jeplb.tools.benchio import results_path, write_results

T, K, E, P, H = 4096, 8, 256, 288, 16
FORMS = (
    "plain",
    "map only",
    "counted once",
    "dispatch",
    "one row",
    "in place",
    "in place + fix",
    "saturating scatter",
)


def hash_map(log2phy, logcnt, ids):
    """The hash choice's slots of ids [T, K] (as `jeplb.dispatch_layer`, in-range ids)."""
    h = _mix32(jnp.arange(T, dtype=jnp.uint32)[:, None] * K + jnp.arange(K, dtype=jnp.uint32))
    replica = (h % jnp.maximum(logcnt[ids], 1).astype(jnp.uint32)).astype(jnp.int32)
    return log2phy.reshape(-1)[ids * log2phy.shape[1] + replica]


def count_layer(form, pass_load, layer, ids):
    """``pass_load`` int32[L, E] with layer's ids [T, K] counted by ``form``."""
    flat = ids.reshape(-1)
    if form == "one row":
        counts = jnp.zeros((E,), jnp.int32).at[flat].add(1)
        return pass_load.at[layer].set(saturating_add(pass_load[layer], counts))
    if form == "in place":
        return pass_load.at[layer, flat].add(1)
    if form == "in place + fix":
        added = pass_load.at[layer, flat].add(1)
        return added.at[layer].set(jnp.where(added[layer] < 0, INT32_MAX, added[layer]))
    if form == "saturating scatter":
        index = jnp.stack([jnp.full_like(flat, layer), flat], -1)
        dims = lax.ScatterDimensionNumbers((), (0, 1), (0, 1))
        increment = lambda x: jnp.where(x == INT32_MAX, x, x + 1)  # noqa: E731
        return lax.scatter_apply(pass_load, index, increment, dims, update_shape=flat.shape)
    raise ValueError(form)


def step_inputs(layers, seed=0):
    """The step's first arguments: ``(state, w f32[L, P, H], acc f32[T, H], ids0 int32[L, T,
    K])``, a fresh state on one device (nothing due) and a fixed draw of distinct ids a token."""
    rng = np.random.default_rng(seed)
    ids0 = jnp.asarray(np.argsort(rng.random((layers, T, E)), -1)[..., :K].astype(np.int32))
    w = jnp.asarray(rng.uniform(-1, 1, (layers, P, H)).astype(np.float32))
    acc = jnp.asarray(rng.uniform(-1, 1, (T, H)).astype(np.float32))
    state = jeplb.EplbState.create(
        num_layers=layers, num_experts=E, num_devices=1, num_redundant_experts=P - E,
        window_size=1, step_interval=10**9,
    )  # fmt: skip
    return state, w, acc, ids0


def build(form, layers, seed=0):
    """(jitted step, its first arguments) for one counting form."""
    state, w, acc, ids0 = step_inputs(layers, seed)

    def step(state, w, acc, ids0):
        kept, pass_load = [], state.pass_load
        for layer in range(layers):
            ids = bd._route(acc, ids0[layer], E)
            if form == "plain":
                slots = ids
            elif form == "dispatch":
                state, slots = jeplb.dispatch(state, layer, ids)
            else:
                slots = hash_map(state.log2phy[layer], state.logcnt[layer], ids)
                if form == "counted once":
                    kept.append(ids)
                elif form != "map only":
                    pass_load = count_layer(form, pass_load, layer, ids)
            acc = bd._experts(acc, w[layer], slots)
        if form == "counted once":
            state = state.record_ids(jnp.stack(kept))
        elif form not in ("plain", "map only", "dispatch"):
            state = state.replace(pass_load=pass_load)
        return state, w, acc

    return jax.jit(step, donate_argnums=(0, 1, 2)), [state, w, acc, ids0]


def exact(form) -> bool | None:
    """Whether ``form`` counts a skewed batch as `jeplb.dispatch` does (None: not a count)."""
    if form in ("plain", "map only", "dispatch"):
        return None
    state = jeplb.EplbState.create(
        num_layers=1, num_experts=E, num_devices=1, num_redundant_experts=P - E,
        window_size=1, step_interval=1,
    )  # fmt: skip
    ids = np.minimum(np.random.default_rng(1).zipf(1.3, (T, K)) - 1, E - 1).astype(np.int32)
    want = jeplb.dispatch(state, 0, jnp.asarray(ids))[0].pass_load
    if form == "counted once":
        got = jax.jit(lambda s, i: s.record_ids(i[None]).pass_load)(state, ids)
    else:
        got = jax.jit(lambda p, i: count_layer(form, p, 0, i))(state.pass_load, ids)
    return bool(jnp.array_equal(got, want))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/count_forms.py")
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    device = bd.device_summary()
    print(device, flush=True)
    programs, ops = {}, {}
    for form in FORMS:
        t0 = time.perf_counter()
        programs[form] = build(form, args.layers)
        fn, carry = programs[form]
        ops[form] = len(bd.entry_ops(fn.lower(*carry).compile().as_text()))
        print(
            f"{form}: {ops[form]} operations, built in {time.perf_counter() - t0:.1f} s", flush=True
        )
    med = bd.time_steps(programs, repeats=args.repeats, warmup=3, burst=10, samples=20)
    checked = {form: exact(form) for form in FORMS}
    lines = bd.per_layer_table(
        med,
        ops,
        layers=args.layers,
        extra=("exact", lambda f: "" if checked[f] is None else checked[f]),
    )
    text = (
        f"# Counting forms in a decode step ({device})\n\n"
        f"Command: `python benchmarks/count_forms.py {' '.join(given)}`\n\n"
        f"L={args.layers} T={T} K={K} E={E} P={P}; medians of {args.repeats} synchronised calls "
        f"and of 20 bursts of 10. Load average at the end: {bd.cpu_quiet()}.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    write_results(text, args.out or results_path(f"count_forms_{jax.devices()[0].platform}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

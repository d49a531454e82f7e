"""GPU benchmark (one device): row moves against the copy ceiling, a full one-GPU rebalance, the
placement policy. Every figure is a median of repeated runs after warm-up, next to the device's
copy bandwidth measured in the same run.

Usage:
    python benchmarks/bench_gpu.py [--quick] [--json PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb import _rows, _transfer
from jeplb._benchio import results_path, table, write_results

ROWS = {  # bytes per expert row
    "deepseek-v3 (88.1 MB)": 7168 * 2048 * 3 * 2,
    "qwen3-235b (37.7 MB)": 4096 * 1536 * 3 * 2,
    "1 MiB": 1 << 20,
}


def median_s(fn, *, warmup=2, reps=10, min_sample_s=0.02):
    """Median seconds per call. A sample is ``inner`` back-to-back calls and one sync at the end,
    with ``inner`` chosen so that a sample lasts at least ``min_sample_s``: short calls are timed
    as a model would issue them, without a host round trip each."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    once = time.perf_counter() - t0
    inner = int(min(200, max(1, min_sample_s // max(once, 1e-7))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner - 1):
            fn()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def copy_ceiling(nbytes: int) -> float:
    """Bytes read + written per second by the device's own copy of a buffer of ``nbytes``."""
    x = jax.random.bits(jax.random.key(0), (nbytes,), jnp.uint8)
    copy = jax.jit(lambda x: x.copy())
    xor = jax.jit(lambda x: x ^ jnp.uint8(1))
    best = min(median_s(lambda: copy(x)), median_s(lambda: xor(x)))
    return 2 * nbytes / best


@dataclasses.dataclass
class MoveRow:
    row: str
    dtype: str
    fraction: float
    rows_moved: int
    stage: str
    impl: str
    ms: float
    tb_s: float
    of_copy: float
    of_same_size_copy: float


def row_moves(ceiling, *, n=36, quick=False):
    out = []
    rng = np.random.default_rng(0)
    impls = ("pallas", "loop", "scatter")
    for row_name, row_bytes in ROWS.items():
        for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
            width = row_bytes // np.dtype(dtype).itemsize
            w = jax.random.bits(
                jax.random.key(0),
                (n, width),
                jnp.uint8 if np.dtype(dtype).itemsize == 1 else jnp.uint16,
            )
            w = jax.lax.bitcast_convert_type(w, dtype)
            buf = jnp.zeros_like(w)
            for fraction in (0.1, 0.25, 1.0):
                k = max(1, round(fraction * n))
                same_size = copy_ceiling(k * row_bytes)
                src = jnp.asarray(rng.permutation(n)[:k], jnp.int32)
                dst = jnp.asarray(rng.permutation(n)[:k], jnp.int32)
                for impl in impls:
                    if quick and impl == "scatter" and row_bytes > (1 << 26):
                        continue
                    stage = jax.jit(
                        lambda b, w, s, d, impl=impl: _rows.copy_rows(
                            b, w, d, s, jnp.int32(s.shape[0]), impl=impl
                        ),
                        donate_argnums=0,
                    )
                    state = {"b": buf}

                    def run_stage(stage=stage, state=state, src=src, dst=dst, w=w):
                        state["b"] = stage(state["b"], w, src, dst)
                        return state["b"]

                    try:
                        t = median_s(run_stage)
                    except Exception as e:  # a variant that does not compile here is reported
                        print(f"{row_name} {impl}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        buf = jnp.zeros_like(w)
                        continue
                    buf = state["b"]
                    moved = 2 * k * row_bytes
                    out.append(
                        MoveRow(
                            row_name,
                            np.dtype(dtype).name,
                            fraction,
                            k,
                            "weights->buffer",
                            impl,
                            t * 1e3,
                            moved / t / 1e12,
                            moved / t / ceiling,
                            moved / t / same_size,
                        )
                    )
                    print(out[-1], flush=True)
            del w, buf
    return out


@dataclasses.dataclass
class DirectRow:
    row: str
    dtype: str
    layers: int
    fraction: float
    rows_moved: int
    ms: float
    tb_s: float
    of_copy: float


def _cyclic_plan(rng, layers, n, fraction):
    """Maps int32[L, N] where ``fraction`` of each layer's slots take the expert of another moved
    slot (one cycle through them: every moved row is read once and written once)."""
    old = np.tile(np.arange(n, dtype=np.int32), (layers, 1))
    new = old.copy()
    k = max(2, round(fraction * n))
    for layer in range(layers):
        sel = rng.permutation(n)[:k]
        new[layer, sel] = old[layer, np.roll(sel, 1)]
    return old, new


def _shard(layers, n, width, dtype, spec=None):
    """[L * N, width] rows of random bits (one random layer tiled: random bits of a whole shard
    would need twice its memory)."""
    bits = jnp.uint8 if np.dtype(dtype).itemsize == 1 else jnp.uint16
    one = jax.random.bits(jax.random.key(1), (1, n, width), bits)
    shape = (layers, n, width) if spec is not None else (layers * n, width)
    make = jax.jit(
        lambda x: jax.lax.bitcast_convert_type(jnp.tile(x, (layers, 1, 1)), dtype).reshape(shape),
        out_shardings=spec,
    )
    return make(one)


def direct_moves(ceiling, *, n=36, quick=False):
    """Ordered in-place moves on one device (the kernel alone, orders precomputed): every layer of
    the shard in one call, so 1 MiB rows are not dominated by a launch."""
    from jeplb import _local

    out = []
    rng = np.random.default_rng(2)
    shards = {"deepseek-v3 (88.1 MB)": 6, "qwen3-235b (37.7 MB)": 12, "1 MiB": 58}
    for row_name, layers in shards.items():
        row_bytes = ROWS[row_name]
        for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
            if quick and dtype != jnp.bfloat16:
                continue
            width = row_bytes // np.dtype(dtype).itemsize
            w = _shard(layers, n, width, dtype)
            for fraction in (0.1, 0.25, 1.0):
                old, new = _cyclic_plan(rng, layers, n, fraction)
                ok = jnp.ones((layers,), bool)
                src, dst, count = jax.jit(_local.order_moves_layers)(old, new, ok)
                back = jax.jit(_local.order_moves_layers)(new, old, ok)
                move = jax.jit(
                    lambda w, s, d, c: _local.apply_moves(w, s, d, c, impl="pallas"),
                    donate_argnums=0,
                )
                state = {"w": w, "fwd": True}

                def run(state=state, move=move, fwd=(src, dst, count), back=back):
                    state["w"] = move(state["w"], *(fwd if state["fwd"] else back))
                    state["fwd"] = not state["fwd"]
                    return state["w"]

                t = median_s(run)
                w = state["w"]
                rows_moved = int((old != new).sum())
                moved = 2 * rows_moved * row_bytes
                out.append(
                    DirectRow(
                        row_name,
                        np.dtype(dtype).name,
                        layers,
                        fraction,
                        rows_moved,
                        t * 1e3,
                        moved / t / 1e12,
                        moved / t / ceiling,
                    )
                )
                print(out[-1], flush=True)
            del w, state
    return out


@dataclasses.dataclass
class RebalanceRow:
    what: str
    layers: int
    slots: int
    row_mb: float
    impl: str
    rows_moved_per_layer: float
    ms_per_layer: float
    floor_ms_per_layer: float
    over_floor: float
    temp_over_layer: float


def one_gpu_rebalance(ceiling, *, layers=12, n=36, row_bytes=ROWS["deepseek-v3 (88.1 MB)"]):
    """A DeepSeek-V3-like local shard (36 slots x 88 MB per layer) rebalanced on one GPU: the
    transfer alone on fixed plans, and policy + plan + moves in one program. The floor is one read
    and one write of every moved row at the copy ceiling."""
    from jeplb._policy import rebalance_experts

    mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = NamedSharding(mesh, P(None, "ep"))
    width = row_bytes // 2
    rng = np.random.default_rng(1)
    out = []
    w = _shard(layers, n, width, jnp.bfloat16, spec)
    layer_bytes = n * row_bytes

    def record(what, impl, t, moved_rows, temp):
        floor = 2 * moved_rows * row_bytes / ceiling
        out.append(
            RebalanceRow(
                what,
                layers,
                n,
                row_bytes / 1e6,
                impl,
                moved_rows / layers,
                t * 1e3 / layers,
                floor * 1e3 / layers,
                t / floor,
                temp,
            )
        )
        print(out[-1], flush=True)

    for fraction in (0.1, 0.25, 1.0):
        old, new = _cyclic_plan(rng, layers, n, fraction)
        if fraction == 1.0:
            new = np.stack([rng.permutation(n) for _ in range(layers)]).astype(np.int32)
        for impl in ("pallas", "loop"):
            if impl == "loop" and fraction < 1.0:
                continue
            prog = _transfer._program(mesh, "ep", 1, True, False, impl)
            compiled = prog.lower(old, new, [w]).compile()
            state = {"w": [w], "fwd": True}

            def run(state=state, compiled=compiled, old=old, new=new):
                a, b = (old, new) if state["fwd"] else (new, old)
                state["w"], _ = compiled(a, b, state["w"])
                state["fwd"] = not state["fwd"]
                return state["w"]

            t = median_s(run, reps=6)
            (w,) = state["w"]
            temp = compiled.memory_analysis().temp_size_in_bytes / layer_bytes
            what = f"transfer, {'random permutation' if fraction == 1 else f'{fraction:.0%} cycle'}"
            record(what, impl, t, int((old != new).sum()), temp)

    # Policy + plan + moves in one program: 32 experts on 36 slots, loads drawn afresh each call.
    num_experts = n - 4
    loads = [
        jnp.asarray(rng.gamma(0.6, 100.0, (layers, num_experts)).astype(np.float32))
        for _ in range(2)
    ]
    for mode in ("from scratch", "migration-aware"):

        def full(load, old, w, mode=mode):
            prev = old if mode == "migration-aware" else None
            new = rebalance_experts(load, n, 1, 1, 1, old_physical_to_logical=prev)[0]
            w, _ = _transfer._program(mesh, "ep", 1, False, False, "pallas")(old, new, w)
            return new, w

        step = jax.jit(full, donate_argnums=2)
        start = np.asarray(jax.jit(lambda x: rebalance_experts(x, n, 1, 1, 1)[0])(loads[1]))
        state = {"w": [w], "old": jnp.asarray(start), "i": 0, "moved": []}

        def run(state=state, step=step):
            new, state["w"] = step(loads[state["i"] % 2], state["old"], state["w"])
            state["moved"].append((state["old"], new))
            state["old"], state["i"] = new, state["i"] + 1
            return state["w"]

        t = median_s(run, reps=6)
        (w,) = state["w"]
        moved = np.median([int((np.asarray(a) != np.asarray(b)).sum()) for a, b in state["moved"]])
        record(f"policy ({mode}) + transfer", "pallas", t, float(moved), float("nan"))
    del w
    return out


@dataclasses.dataclass
class PolicyRow:
    shape: str
    mode: str
    ms: float


def policy_times():
    try:
        from jeplb._policy import rebalance_experts
    except ImportError:
        return []
    rng = np.random.default_rng(0)
    load = jnp.asarray(rng.gamma(0.6, 100.0, (58, 256)).astype(np.float32))
    out = []
    f = jax.jit(lambda w: rebalance_experts(w, 288, 8, 4, 32))
    t = median_s(lambda: f(load), reps=20)
    out.append(
        PolicyRow("deepseek-v3 58x256->288, 8 groups, 4 nodes, 32 GPUs", "from scratch", t * 1e3)
    )
    fr = jax.jit(lambda w: rebalance_experts(w, 288, 8, 4, 32, refine=True))
    t = median_s(lambda: fr(load), reps=20)
    out.append(PolicyRow("deepseek-v3 58x256->288, 8 groups, 4 nodes, 32 GPUs", "refine", t * 1e3))
    old = f(load)[0]
    drift = load * jnp.asarray(rng.uniform(0.7, 1.3, load.shape).astype(np.float32))
    g = jax.jit(lambda w, o: rebalance_experts(w, 288, 8, 4, 32, old_physical_to_logical=o))
    try:
        t = median_s(lambda: g(drift, old), reps=20)
    except Exception as e:  # reported, so the rest of the run still lands
        print(f"migration-aware policy: {type(e).__name__}: {str(e)[:400]}", flush=True)
    else:
        out.append(
            PolicyRow(
                "deepseek-v3 58x256->288, 8 groups, 4 nodes, 32 GPUs", "migration-aware", t * 1e3
            )
        )
    print(out, flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--out", metavar="PATH")
    ap.add_argument("--layers", type=int, default=12, help="layers of the one-GPU rebalance")
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    ceiling = copy_ceiling(1 << 32)
    print(
        f"device {dev.device_kind}: copy ceiling {ceiling / 1e12:.2f} TB/s (read + write)",
        flush=True,
    )
    moves = row_moves(ceiling, quick=args.quick)
    direct = direct_moves(ceiling, quick=args.quick)
    reb = one_gpu_rebalance(ceiling, layers=args.layers)
    pol = policy_times()
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"# GPU benchmark: {dev.device_kind}, jax {jax.__version__}\n\n"
        f"Command: `{cmd}`\n\nCopy ceiling (same run): {ceiling / 1e12:.2f} TB/s, bytes read + "
        "written by the device's own copy of a 4 GiB buffer (`of_copy`). `of_same_size_copy` "
        "compares with a plain copy of as many bytes as the move reads, timed the same way. "
        "Times are medians of 10 samples after warm-up; a sample is enough back-to-back calls "
        "to last 20 ms, synchronised once.\n\n"
        + table(moves, "Local row moves (weights -> staging buffer), 36 rows per device")
        + "\n"
        + table(
            direct,
            "Ordered in-place moves on one device (every layer in one kernel; `fraction` of each "
            "layer's 36 rows move)",
        )
        + "\n"
        + table(
            reb,
            "Full one-GPU rebalance of a DeepSeek-V3-like local shard, per layer (floor: one read "
            "and one write of each moved row at the copy ceiling)",
        )
        + "\n"
        + table(pol, "Placement policy on the GPU (ms per call after compilation)")
    )
    print(text)
    write_results(
        text,
        args.out or results_path("gpu_h200.md"),
        json_path=args.json,
        payload={
            "ceiling_bytes_per_s": ceiling,
            "moves": [dataclasses.asdict(r) for r in moves],
            "direct": [dataclasses.asdict(r) for r in direct],
            "rebalance": [dataclasses.asdict(r) for r in reb],
            "policy": [dataclasses.asdict(r) for r in pol],
            "command": cmd,
        },
    )


if __name__ == "__main__":
    main()

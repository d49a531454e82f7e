"""GPU benchmark (one device): row moves against the copy ceiling, a full one-GPU rebalance, the
placement policy. Every figure is a median of repeated runs after warm-up, next to the device's
copy bandwidth measured in the same run.

Every buffer is sized from the device's own memory (`memory_stats()["bytes_limit"]`): the shards
of the in-place moves and the layers resident in the rebalance shrink on a smaller card (an 80 GB
H100 holds fewer 88 MB rows than a 141 GB H200), and the results file names the card it ran on.

Usage:
    python benchmarks/bench_gpu.py [--quick] [--json PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time

# The 58-layer fp8 shard takes 92 GB of the H200's 141 GB; the default pool is 75% of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src.transfer import api as _transfer
from jeplb._src.transfer import rows as _rows
from jeplb.tools.benchio import results_path, table, write_results

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


def device_budget() -> int:
    """Bytes of device memory the benchmark may hold at once: 85% of what the allocator may use
    (``bytes_limit``), so that XLA's own temporaries and fragmentation fit beside them."""
    stats = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    return int(0.85 * stats.get("bytes_limit", 16 << 30))


def card_name() -> str:
    """A short name of the card for the results file: 'h100', 'h200', or the device kind."""
    kind = jax.devices()[0].device_kind.lower()
    for name in ("h200", "h100", "a100", "b200", "gh200"):
        if name in kind:
            return name
    return "".join(c if c.isalnum() else "_" for c in kind).strip("_") or "gpu"


def copy_ceiling(nbytes: int) -> float:
    """Bytes read + written per second by the device's own copy of a buffer of ``nbytes``
    (capped at a tenth of `device_budget`: the copy holds the buffer twice, beside the benchmark's
    own buffers, in an allocator that fragments)."""
    nbytes = max(4, min(nbytes, device_budget() // 10))
    # 32-bit words: random bytes are drawn a word each, which would take 4x the buffer.
    x = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
    copy = jax.jit(lambda x: x.copy())
    xor = jax.jit(lambda x: x ^ jnp.uint32(1))
    best = min(median_s(lambda: copy(x)), median_s(lambda: xor(x)))
    return 2 * x.nbytes / best


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
                            b,
                            w,
                            d,
                            s,
                            jnp.int32(s.shape[0]),
                            impl=_rows.resolve_impl(impl, b, "gpu"),
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
    of_same_size_copy: float


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
    from jeplb._src.transfer import inplace as _local

    out = []
    rng = np.random.default_rng(2)
    shards = {"deepseek-v3 (88.1 MB)": 6, "qwen3-235b (37.7 MB)": 12, "1 MiB": 58}
    for row_name, wanted in shards.items():
        row_bytes = ROWS[row_name]
        # The shard takes at most a quarter of the budget (its creation holds it twice; the
        # same-size copy ceiling takes a fifth more).
        layers = max(1, min(wanted, device_budget() // 4 // (n * row_bytes)))
        # Slot-major stacks ([P, L, ...], MaxText's param_scan_axis=1) move in place too.
        for dtype, slot_major in (
            (jnp.bfloat16, False),
            (jnp.float8_e4m3fn, False),
            (jnp.bfloat16, True),
        ):
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
                    lambda w, s, d, c, sm=slot_major: _local.apply_moves(
                        w, s, d, c, impl="pallas", slot_major=sm
                    ),
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
                same_size = copy_ceiling(rows_moved * row_bytes)
                out.append(
                    DirectRow(
                        row_name,
                        np.dtype(dtype).name + (" slot-major" if slot_major else ""),
                        layers,
                        fraction,
                        rows_moved,
                        t * 1e3,
                        moved / t / 1e12,
                        moved / t / ceiling,
                        moved / t / same_size,
                    )
                )
                print(out[-1], flush=True)
            del w, state, run
            gc.collect()
    return out


@dataclasses.dataclass
class RebalanceRow:
    what: str
    dtype: str
    row_mb: float
    layers: int
    resident: int
    impl: str
    rows_moved_per_layer: float
    ms: float
    floor_ms: float
    over_floor: float
    temp_over_layer: float


def _blockwise_transfer(mesh, layers, resident):
    """``transfer(old, new, w, impl)``: maps int32[layers, N] applied block by block to one
    resident block of weights [resident, N, R], each block a full one-device transfer.

    A last block of fewer layers moves the resident block's first layers and keeps the others
    (their plans padded with unchanged maps): slicing the block and writing it back would copy
    those layers whole, a cost no rebalance of a model's weights has."""
    blocks = [(b, min(b + resident, layers)) for b in range(0, layers, resident)]

    def transfer(old, new, w, impl):
        prog = _transfer.program_for(mesh, donate=False, row_impl=impl)
        for b, e in blocks:
            a, z = old[b:e], new[b:e]
            if e - b < resident:
                keep = jnp.broadcast_to(a[-1:], (resident - (e - b), a.shape[1]))
                a, z = jnp.concatenate([a, keep]), jnp.concatenate([z, keep])
            (w,), _ = prog(a, z, [w])
        return w

    return transfer


def one_gpu_rebalance(ceiling, *, layers=58, n=36, quick=False):
    """A DeepSeek-V3-like local shard (36 slots per layer, 58 layers) rebalanced on one GPU, layer
    by layer: the transfer alone on fixed plans, and policy + plan + moves in one program. The
    floor is one read and one write of every moved row at the copy ceiling.

    bf16 rows (88.1 MB) of 58 layers take 184 GB, more than one GPU holds: the 58 layers' plans are
    applied in blocks of ``resident`` layers to one resident block, each block a full transfer
    (order and moves) of its layers. fp8 rows (44 MB, the checkpoint's own format) fit whole."""
    from jeplb._src.policy.api import rebalance_experts

    mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = NamedSharding(mesh, P(None, "ep"))
    rng = np.random.default_rng(1)
    out = []
    num_experts = n - 4  # 32 experts with 4 redundant slots, as 256 on 288 over 8 GPUs
    loads = [
        jnp.asarray(rng.gamma(0.6, 100.0, (layers, num_experts)).astype(np.float32))
        for _ in range(2)
    ]
    cases = [(jnp.bfloat16, ROWS["deepseek-v3 (88.1 MB)"], -(-layers // 2))]
    if not quick:
        cases.append((jnp.float8_e4m3fn, ROWS["deepseek-v3 (88.1 MB)"] // 2, layers))
    for dtype, row_bytes, resident in cases:
        # The resident block takes at most 45% of the budget.
        resident = max(1, min(resident, int(0.45 * device_budget()) // (n * row_bytes)))
        width = row_bytes // np.dtype(dtype).itemsize
        w = _shard(resident, n, width, dtype, spec)

        transfer = _blockwise_transfer(mesh, layers, resident)

        def record(
            what, impl, t, moved_rows, compiled, dtype=dtype, row_bytes=row_bytes, resident=resident
        ):
            floor = 2 * moved_rows * row_bytes / ceiling
            temp = compiled.memory_analysis().temp_size_in_bytes / (n * row_bytes)
            out.append(
                RebalanceRow(
                    what,
                    np.dtype(dtype).name,
                    row_bytes / 1e6,
                    layers,
                    resident,
                    impl,
                    moved_rows / layers,
                    t * 1e3,
                    floor * 1e3,
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
                if impl == "loop" and (fraction < 1.0 or quick or dtype != jnp.bfloat16):
                    continue
                step = jax.jit(transfer, donate_argnums=2, static_argnums=3)
                compiled = step.lower(old, new, w, impl).compile()
                state = {"w": w, "fwd": True}

                def run(state=state, compiled=compiled, old=old, new=new):
                    a, b = (old, new) if state["fwd"] else (new, old)
                    state["w"] = compiled(a, b, state["w"])
                    state["fwd"] = not state["fwd"]
                    return state["w"]

                t = median_s(run, reps=6)
                w = state["w"]
                kind = "random permutation" if fraction == 1 else f"{fraction:.0%} in a cycle"
                record(f"transfer, {kind}", impl, t, int((old != new).sum()), compiled)

        # Policy + plan + moves in one program, loads alternating between two draws.
        for mode in ("from scratch", "migration-aware"):

            def full(load, old, w, mode=mode, transfer=transfer):
                prev = old if mode == "migration-aware" else None
                new = rebalance_experts(load, n, 1, 1, 1, old_phy2log=prev)[0]
                return new, transfer(old, new, w, "pallas")

            step = jax.jit(full, donate_argnums=2)
            start = jax.jit(lambda x: rebalance_experts(x, n, 1, 1, 1)[0])(loads[1])
            compiled = step.lower(loads[0], start, w).compile()
            state = {"w": w, "old": start, "i": 0, "moved": []}

            def run(state=state, compiled=compiled):
                new, state["w"] = compiled(loads[state["i"] % 2], state["old"], state["w"])
                state["moved"].append((state["old"], new))
                state["old"], state["i"] = new, state["i"] + 1
                return state["w"]

            t = median_s(run, reps=6)
            w = state["w"]
            moved = np.median(
                [int((np.asarray(a) != np.asarray(b)).sum()) for a, b in state["moved"]]
            )
            record(f"policy ({mode}) + transfer", "pallas", t, float(moved), compiled)
        del w, state, run  # the last closure holds the buffer too
    return out


@dataclasses.dataclass
class PolicyRow:
    shape: str
    mode: str
    ms: float


def policy_times():
    try:
        from jeplb._src.policy.api import rebalance_experts
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
    g = jax.jit(lambda w, o: rebalance_experts(w, 288, 8, 4, 32, old_phy2log=o))
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
    # The one-GPU shard of the rebalance above: 32 experts on 36 slots, one GPU.
    local = "deepseek-v3 local shard 58x32->36, 1 GPU"
    small = jnp.asarray(rng.gamma(0.6, 100.0, (58, 32)).astype(np.float32))
    f1 = jax.jit(lambda w: rebalance_experts(w, 36, 1, 1, 1))
    out.append(PolicyRow(local, "from scratch", median_s(lambda: f1(small), reps=20) * 1e3))
    old1 = f1(small)[0]
    drift1 = small * jnp.asarray(rng.uniform(0.7, 1.3, small.shape).astype(np.float32))
    g1 = jax.jit(lambda w, o: rebalance_experts(w, 36, 1, 1, 1, old_phy2log=o))
    out.append(
        PolicyRow(local, "migration-aware", median_s(lambda: g1(drift1, old1), reps=20) * 1e3)
    )
    print(out, flush=True)
    return out


SECTIONS = ("moves", "direct", "rebalance", "policy")


def _partial_suffix(sections) -> str:
    """The results name's suffix: none for every section, else the sections run (a part never
    overwrites the whole benchmark's file)."""
    return "" if set(sections) == set(SECTIONS) else "_" + "_".join(sorted(set(sections)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--out", metavar="PATH")
    ap.add_argument("--layers", type=int, default=58, help="layers of the one-GPU rebalance")
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all)",
    )
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; expected names among {list(SECTIONS)}")
    dev = jax.devices()[0]
    copy_bytes = min(1 << 32, device_budget() // 10)
    ceiling = copy_ceiling(copy_bytes)
    print(
        f"device {dev.device_kind}: copy ceiling {ceiling / 1e12:.2f} TB/s (read + write)",
        flush=True,
    )
    moves = row_moves(ceiling, quick=args.quick) if "moves" in sections else []
    direct = direct_moves(ceiling, quick=args.quick) if "direct" in sections else []
    reb = []
    if "rebalance" in sections:
        reb = one_gpu_rebalance(ceiling, layers=args.layers, quick=args.quick)
    pol = policy_times() if "policy" in sections else []
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"# GPU benchmark: {dev.device_kind}, jax {jax.__version__}\n\n"
        f"Command: `{cmd}`\n\nDevice: {dev.device_kind}, {device_budget() / 2**30:.1f} GiB "
        f"budget for the benchmark's buffers (85% of the allocator's limit).\n\n"
        f"Copy ceiling (same run): {ceiling / 1e12:.2f} TB/s, bytes read + "
        f"written by the device's own copy of a {copy_bytes / 2**30:.2f} GiB buffer (`of_copy`). "
        "`of_same_size_copy` compares with a plain copy of as many bytes as the move reads (at "
        "most a tenth of the budget), timed the same way. "
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
            "Full one-GPU rebalance of a DeepSeek-V3-like local shard, 36 slots per layer, layer "
            "by layer (`resident` layers in memory at once; `ms` per call for every layer; floor: "
            "one read and one write of each moved row at the copy ceiling)",
        )
        + "\n"
        + table(pol, "Placement policy on the GPU (ms per call after compilation)")
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"gpu_{card_name()}{_partial_suffix(sections)}.md"),
        json_path=args.json,
        payload={
            "ceiling_bytes_per_s": ceiling,
            "moves": [dataclasses.asdict(r) for r in moves],
            "direct": [dataclasses.asdict(r) for r in direct],
            "rebalance": [dataclasses.asdict(r) for r in reb],
            "policy": [dataclasses.asdict(r) for r in pol],
            "command": cmd,
            "device": dev.device_kind,
            "budget_bytes": device_budget(),
        },
    )


if __name__ == "__main__":
    main()

"""Transfer benchmark: wire efficiency for D = 2..256, time and memory on the local devices.

Two parts, both same-run:

* Wire: the plan alone (no devices needed) for a random reshuffle and a 10% drift plan per D; rows
  the busiest device moves through the rotation rounds, padding included, against the floor (the
  most rows any device must send or receive remotely).
* Time: `rearrange_expert_weights` on the local mesh against a naive baseline (all-gather every
  slot's rows over the axis, then select), medians after warm-up, and each program's temporary
  memory against one layer's local weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src.transfer import api as _transfer
from jeplb._src.transfer import plan as _plan
from jeplb.tools.benchio import copy_bandwidth, median_seconds, results_path, table, write_results
from jeplb.tools.demo import positive_int

__all__ = [
    "main",
    "make_plan",
    "run_compile",
    "run_hypercube",
    "run_nodes",
    "run_time",
    "run_wire",
]


def _placement(rng, num_experts: int, p_total: int) -> np.ndarray:
    extra = rng.integers(0, num_experts, p_total - num_experts)
    return rng.permutation(np.concatenate([np.arange(num_experts), extra])).astype(np.int32)


def make_plan(kind: str, seed: int, num_layers: int, p_total: int, num_experts: int):
    """Benchmark maps (old, new) int32[L, P]: ``reshuffle`` (independent random placements) or
    ``drift`` (10% of the slots take another expert of the old placement)."""
    rng = np.random.default_rng(seed)
    old = np.stack([_placement(rng, num_experts, p_total) for _ in range(num_layers)])
    if kind == "reshuffle":
        new = np.stack([_placement(rng, num_experts, p_total) for _ in range(num_layers)])
    elif kind == "drift":
        # 10% of the slots change expert; an expert's last copy is never dropped, so the plan is
        # reversible and both directions can be timed.
        new = old.copy()
        k = max(1, p_total // 10)
        for layer in range(num_layers):
            counts = np.bincount(old[layer], minlength=num_experts)
            changed = 0
            for p in rng.permutation(p_total):
                if changed == k:
                    break
                if counts[new[layer, p]] > 1:
                    counts[new[layer, p]] -= 1
                    e = int(rng.integers(num_experts))
                    new[layer, p] = e
                    counts[e] += 1
                    changed += 1
    else:
        raise ValueError(f"kind: expected 'reshuffle' or 'drift', got {kind!r}")
    return old, new


@dataclasses.dataclass
class WireRow:
    devices: int
    slots: int
    plan: str
    chunk_rows: int
    median_ratio: float
    max_ratio: float
    aggregate_ratio: float
    wire_rows: float
    min_rows: float


@dataclasses.dataclass
class NodeRow:
    devices: int
    devices_per_node: int
    plan: str
    remote_rows: float
    intra_node_rows: float
    inter_node_rows: float
    inter_node_flat: float
    aggregate_ratio: float


def _slots_for(d: int) -> int:
    """P = 288 (DeepSeek-V3: 256 experts + 32 redundant), or the next multiple of D above
    256 + max(D, 16) where 288 does not divide."""
    return 288 if 288 % d == 0 else -(-(256 + max(d, 16)) // d) * d


def run_wire(
    devices=(2, 4, 8, 16, 32, 64, 128, 256),
    *,
    num_layers: int = 32,
    chunk_rows=(1, 4),
    seed: int = 0,
) -> list[WireRow]:
    """Wire rows vs the floor for each D (DeepSeek-V3-like 256 experts; P as `_slots_for`)."""
    rows = []
    for d in devices:
        p_total = _slots_for(d)
        for kind in ("reshuffle", "drift"):
            old, new = make_plan(kind, seed, num_layers, p_total, 256)
            for c in chunk_rows:
                plans = jax.jit(
                    lambda o, n, d=d, c=c: _plan.plan_layers(o, n, num_devices=d, chunk_rows=c)
                )(old, new)
                wire = np.asarray(plans.wire_rows, np.float64)
                floor = np.maximum(np.asarray(plans.min_rows, np.float64), 1)
                rows.append(
                    WireRow(
                        d,
                        p_total,
                        kind,
                        c,
                        float(np.median(wire / floor)),
                        float((wire / floor).max()),
                        float(wire.sum() / floor.sum()),
                        float(np.median(wire)),
                        float(np.median(floor)),
                    )
                )
    return rows


def _crossing(plans, d: int, per_node: int) -> np.ndarray:
    """Per layer, the primaries of ``plans`` whose sender is on another node."""
    sender = np.asarray(plans.sender)
    dev = np.arange(sender.shape[1]) // (sender.shape[1] // d)
    return ((sender >= 0) & (sender // per_node != dev // per_node)).sum(-1).astype(np.float64)


def run_nodes(
    devices=(16, 32, 64, 128, 256), *, per_node: int = 8, num_layers: int = 32, seed: int = 0
) -> list[NodeRow]:
    """Remote rows inside and across nodes of ``per_node`` devices (medians per layer), senders
    chosen on the receiver's node first (``devices_per_node``), against the topology-blind plan
    (``inter_node_flat``: its rows that cross nodes), and the wire ratio with the topology."""
    rows = []
    for d in devices:
        p_total = _slots_for(d)
        for kind in ("reshuffle", "drift"):
            old, new = make_plan(kind, seed, num_layers, p_total, 256)
            plans, flat = (
                jax.jit(
                    lambda o, n, d=d, k=k: _plan.plan_layers(
                        o, n, num_devices=d, devices_per_node=k
                    )
                )(old, new)
                for k in (per_node, None)
            )
            remote = np.asarray(plans.primary.sum(-1), np.float64)
            inter = np.asarray(plans.inter_node_rows, np.float64)
            wire = np.asarray(plans.wire_rows, np.float64)
            floor = np.maximum(np.asarray(plans.min_rows, np.float64), 1)
            rows.append(
                NodeRow(
                    d,
                    per_node,
                    kind,
                    float(np.median(remote)),
                    float(np.median(remote - inter)),
                    float(np.median(inter)),
                    float(np.median(_crossing(flat, d, per_node))),
                    float(wire.sum() / floor.sum()),
                )
            )
    return rows


@dataclasses.dataclass
class HypercubeRow:
    devices: int
    plan: str
    rounds: int
    aggregate_ratio: float
    rotation_ratio: float
    transit_over_n: float


def _hypercube_layer(old: np.ndarray, primary: np.ndarray, want: np.ndarray, d: int):
    """One layer routed over a hypercube (not built; a design estimate): round k exchanges with
    device i XOR 2^k, each row forwarded toward its destination one bit per round (low bits
    first); senders chosen among the holders so that the fewest rounds' maxima grow, then the
    fewest hops. Returns (wire rows of the busiest device, floor, peak rows held in transit by
    one device)."""
    m = d.bit_length() - 1
    n = old.shape[0] // d
    dev = np.arange(old.shape[0]) // n
    load = np.zeros((m, d), np.int64)
    held = np.zeros((m, d), np.int64)  # rows in transit at a device after round k
    send = np.zeros(d, np.int64)
    recv = np.zeros(d, np.int64)
    rows = [(int(p), np.unique(dev[old == want[p]])) for p in np.nonzero(primary)[0]]
    for p, holders in sorted(rows, key=lambda r: (len(r[1]), r[0])):
        best = None
        for h in holders:
            path, x = [], int(h)
            for k in range(m):
                if (x ^ dev[p]) >> k & 1:
                    path.append((k, x))
                    x ^= 1 << k
            peak = load.max(1)
            grow = sum(load[k, x] + 1 > peak[k] for k, x in path)
            key = (grow, len(path), send[h], int(h))
            if best is None or key < best[0]:
                best = (key, int(h), path)
        _, h, path = best
        send[h] += 1
        recv[dev[p]] += 1
        for j, (k, x) in enumerate(path):
            load[k, x] += 1
            if j + 1 < len(path):  # held at the next device until its next hop
                nxt = x ^ (1 << k)
                held[k : path[j + 1][0], nxt] += 1
    floor = max(int(send.max(initial=0)), int(recv.max(initial=0)))
    return int(load.max(1).sum()), floor, int(held.max(initial=0))


def run_hypercube(
    devices=(8, 16, 32, 64, 128, 256), *, num_layers: int = 8, seed: int = 0
) -> list[HypercubeRow]:
    """The hypercube schedule's wire ratio and transit memory, estimated from the plans' own
    primaries (a design study: log2 D static rounds instead of D - 1), beside the rotation
    rounds' ratio on the same layers."""
    rows = []
    for d in devices:
        p_total = _slots_for(d)
        for kind in ("reshuffle", "drift"):
            old, new = make_plan(kind, seed, num_layers, p_total, 256)
            plans = jax.jit(lambda o, n, d=d: _plan.plan_layers(o, n, num_devices=d))(old, new)
            primary = np.asarray(plans.primary)
            est = [_hypercube_layer(old[i], primary[i], new[i], d) for i in range(num_layers)]
            wire, floor, held = (np.array(x, np.float64) for x in zip(*est, strict=True))
            rot = np.asarray(plans.wire_rows, np.float64).sum()
            rows.append(
                HypercubeRow(
                    d,
                    kind,
                    d.bit_length() - 1,
                    float(wire.sum() / np.maximum(floor, 1).sum()),
                    float(rot / np.maximum(np.asarray(plans.min_rows, np.float64), 1).sum()),
                    float(held.max() / (p_total // d)),
                )
            )
    return rows


@dataclasses.dataclass
class CompileRow:
    devices: int
    slots: int
    slots_per_device: int
    leaves: int
    lower_s: float
    compile_s: float
    total_s: float
    hlo_lines: int
    collective_permutes: int


def run_compile(*, num_layers: int = 4, slots_per_device: int = 5) -> CompileRow:
    """Lower + compile time of `rearrange_expert_weights` on every local device, same per-device
    shapes whatever D: bf16 w13 [L, P, 128, 32] and w2 [L, P, 32, 64], P = D * N_local."""
    d = len(jax.devices())
    mesh = jax.make_mesh((d,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    p_total = d * slots_per_device
    spec = NamedSharding(mesh, P(None, "ep"))
    leaves = [
        jax.ShapeDtypeStruct((num_layers, p_total, *tail), jnp.bfloat16, sharding=spec)
        for tail in ((128, 32), (32, 64))
    ]
    maps = jax.ShapeDtypeStruct((num_layers, p_total), jnp.int32)
    program = _transfer.program_for(mesh, num_leaves=len(leaves))
    t0 = time.perf_counter()
    lowered = program.lower(maps, maps, leaves)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    text = compiled.as_text()
    permutes = sum(
        1
        for line in text.splitlines()
        if "collective-permute(" in line or "collective-permute-start(" in line
    )
    return CompileRow(
        d,
        p_total,
        slots_per_device,
        len(leaves),
        t1 - t0,
        t2 - t1,
        t2 - t0,
        len(text.splitlines()),
        permutes,
    )


def _naive_program(mesh, axis_name: str):
    """Baseline: every device all-gathers every slot's rows, then selects its own new rows."""

    def body(src, leaves):
        me = jax.lax.axis_index(axis_name)
        n = leaves[0].shape[1]
        mine = jax.lax.dynamic_slice_in_dim(src, me * n, n, axis=1)  # [L, N]
        out = []
        for x in leaves:
            full = jax.lax.all_gather(x, axis_name, axis=1, tiled=True)  # [L, P, ...]
            out.append(jnp.take_along_axis(full, mine.reshape(*mine.shape, *[1] * (x.ndim - 2)), 1))
        return out

    def run(src, leaves):
        specs = [P(None, axis_name)] * len(leaves)
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), specs), out_specs=specs)(src, leaves)

    return jax.jit(run, donate_argnums=(1,))


def _sources(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """For the baseline: one old slot holding each new slot's expert (its own slot if unchanged)."""
    src = np.zeros_like(new)
    for layer in range(old.shape[0]):
        first = {}
        for q, e in enumerate(old[layer]):
            first.setdefault(int(e), q)
        for p, e in enumerate(new[layer]):
            src[layer, p] = p if old[layer, p] == e else first[int(e)]
    return src


@dataclasses.dataclass
class TimeRow:
    plan: str
    layers: int
    slots: int
    row_bytes: int
    dtype: str
    jeplb_ms_per_layer: float
    naive_ms_per_layer: float
    speedup: float
    jeplb_temp_over_layer: float
    naive_temp_over_layer: float
    wire_ratio: float
    moved_gb_s: float
    of_copy_bw: float


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats=repeats, warmup=0)


def run_time(
    mesh,
    *,
    axis_name: str = "ep",
    num_layers: int = 8,
    slots_per_device: int = 4,
    row_elems: int = 1 << 16,
    dtype=jnp.bfloat16,
    repeats: int = 5,
    seed: int = 0,
    copy_bw: float | None = None,
) -> list[TimeRow]:
    """Times jeplb against the all-gather baseline on ``mesh`` (weights [L, P, row_elems]).

    ``moved_gb_s`` is the busiest device's changed rows, each read and written once, over the time
    per layer; ``of_copy_bw`` that rate over ``copy_bw`` (NaN when it is not given)."""
    d = int(mesh.shape[axis_name])
    p_total = d * slots_per_device
    num_experts = max(1, p_total - p_total // 8)
    spec = NamedSharding(mesh, P(None, axis_name))
    # Made on the devices: the weights can be larger than is comfortable to build on the host.
    make = jax.jit(
        lambda k: jax.random.randint(k, (num_layers, p_total, row_elems), -1000, 1000).astype(
            dtype
        ),
        out_shardings=spec,
    )
    row_bytes = row_elems * np.dtype(dtype).itemsize
    layer_local = slots_per_device * row_bytes
    out = []
    ours = _transfer.program_for(mesh, axis_name=axis_name)
    naive = _naive_program(mesh, axis_name)
    for kind in ("reshuffle", "drift"):
        old, new = make_plan(kind, seed, num_layers, p_total, num_experts)
        src, back = _sources(old, new), _sources(new, old)
        w = [make(jax.random.key(seed))]
        w0 = [make(jax.random.key(seed))]
        c_ours = ours.lower(old, new, w).compile()
        c_naive = naive.lower(src, w0).compile()
        state = {"w": w, "b": w0}

        def step_ours(state=state, c=c_ours, old=old, new=new):
            # Alternate directions so every timed call moves the same rows.
            state["w"], rep = c(old, new, state["w"])
            state["w"], _ = c(new, old, state["w"])
            return state["w"], rep

        def step_naive(state=state, c=c_naive, src=src, back=back):
            state["b"] = c(src, state["b"])
            state["b"] = c(back, state["b"])
            return state["b"]

        step_ours()
        step_naive()  # warm-up
        t_ours = _median_ms(step_ours, repeats) / 2 / num_layers
        t_naive = _median_ms(step_naive, repeats) / 2 / num_layers
        _, rep = step_ours()
        changed = ((old != new) & (new >= 0)).reshape(num_layers, d, slots_per_device).sum(-1)
        moved = 2 * float(changed.max(-1).mean()) * row_bytes / (t_ours / 1e3)  # bytes/s
        wire = np.asarray(rep.wire_rows, np.float64)
        floor = np.maximum(np.asarray(rep.min_rows, np.float64), 1)
        out.append(
            TimeRow(
                kind,
                num_layers,
                p_total,
                row_bytes,
                np.dtype(dtype).name,
                t_ours,
                t_naive,
                t_naive / t_ours,
                c_ours.memory_analysis().temp_size_in_bytes / layer_local,
                c_naive.memory_analysis().temp_size_in_bytes / layer_local,
                float(wire.sum() / floor.sum()),
                moved / 1e9,
                moved / copy_bw if copy_bw else float("nan"),
            )
        )
    return out


def _compile_child() -> None:
    """In a child process with its own device count: prints `run_compile`'s row as JSON."""
    import json

    print(f"measuring the jeplb of {_transfer.__file__}", file=sys.stderr)
    print("COMPILE_ROW " + json.dumps(dataclasses.asdict(run_compile())), flush=True)


def compile_table(devices, *, baseline: str | None = None) -> list[CompileRow]:
    """`run_compile` for each D, each in a fresh process with D simulated CPU devices (and first
    with ``baseline`` as the jeplb to measure, when given: a checkout of another commit)."""
    import json
    import os
    import subprocess
    import tempfile

    here = os.path.abspath(__file__)
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    code = (
        "import sys, importlib.util as u; s = u.spec_from_file_location('bench_compile', "
        f"{here!r}); m = u.module_from_spec(s); sys.modules['bench_compile'] = m; "
        "s.loader.exec_module(m); m._compile_child()"
    )
    rows = []
    for label, path in ([("baseline", baseline)] if baseline else []) + [("this", None)]:
        for d in devices:
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
            env["JAX_PLATFORMS"] = "cpu"
            # The jeplb measured is the one first on the path; the working directory (first on a
            # `-c` process's path) must not shadow it.
            env["PYTHONPATH"] = os.path.abspath(path or checkout)
            with tempfile.TemporaryDirectory() as cwd:
                done = subprocess.run(
                    [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True
                )
            if done.returncode:
                raise RuntimeError(f"D = {d} ({label}) failed:\n{done.stderr[-3000:]}")
            out = done.stdout
            line = next(x for x in out.splitlines() if x.startswith("COMPILE_ROW "))
            row = CompileRow(**json.loads(line[len("COMPILE_ROW ") :]))
            rows.append((label, row))
            print(label, row, flush=True)
    return rows


def _compile_main(args, cmd: str) -> int:
    devices = [int(x) for x in args.compile_devices.split(",")]
    rows = compile_table(devices, baseline=args.baseline)
    text = f"# Lower + compile time vs D (cpu, jax {jax.__version__})\n\nCommand: `{cmd}`\n\n"
    text += (
        "`rearrange_expert_weights`, 4 layers, bf16 w13 [L, P, 128, 32] and w2 [L, P, 32, 64], "
        "5 slots per device whatever D, each D in a fresh process of D simulated CPU devices "
        "(first compile, no cache). `collective_permutes`: collective-permute ops in the "
        "compiled HLO.\n\n"
    )
    for label in dict.fromkeys(lab for lab, _ in rows):
        part = [r for lab, r in rows if lab == label]
        name = "this checkout" if label == "this" else f"baseline ({args.baseline})"
        text += table(part, name, float_format="{:.2f}") + "\n"
        base = next((r for r in part if r.devices == min(devices)), None)
        if base:
            ratios = ", ".join(
                f"D = {r.devices}: {r.total_s / base.total_s:.2f}x" for r in part if r is not base
            )
            text += f"Lower + compile over D = {base.devices}: {ratios}.\n\n"
    print(text)
    write_results(text, args.out or results_path("compile_cpu.md"))
    return 0


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Runs the transfer benchmark; ``argv`` as on the command line (``--help`` lists the flags)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Transfer benchmark: wire rows vs the floor for D = 2..256 (plan only), and "
        "time per layer and temporary memory on the local devices against an all-gather baseline.",
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer layers, smaller rows, fewer repeats"
    )
    ap.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    ap.add_argument(
        "--out",
        metavar="PATH",
        help="markdown results file (default: benchmarks/results/transfer_<platform>.md)",
    )
    ap.add_argument(
        "--slots-per-device",
        type=positive_int,
        metavar="N",
        help="N_local of the timed cases (default: 4 on CPU, 36 on accelerators)",
    )
    ap.add_argument(
        "--row-elems",
        type=positive_int,
        metavar="R",
        help="elements per expert row of the timed cases (default: 65536 on CPU, 2**24 on "
        "accelerators: 32 MiB bf16 rows)",
    )
    ap.add_argument(
        "--compile-devices",
        metavar="D,D,...",
        help="instead: lower + compile time of the transfer for these device counts (each in a "
        "fresh process of D simulated CPU devices), to benchmarks/results/compile_cpu.md",
    )
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="with --compile-devices: also measure the jeplb in DIR (a checkout of another commit)",
    )
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join([prog or "python benchmarks/bench_transfer.py", *given])
    if args.compile_devices:
        return _compile_main(args, cmd)

    wire = run_wire(num_layers=8 if args.quick else 32)
    nodes = run_nodes(num_layers=8 if args.quick else 32)
    cube = run_hypercube(num_layers=4 if args.quick else 8)
    platform = jax.devices()[0].platform
    d = min(8, len(jax.devices()))
    mesh = jax.make_mesh(
        (d,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:d]
    )
    copy_bw = copy_bandwidth(jax.devices()[0]) if platform != "cpu" else None
    timing = []
    for dtype in (jnp.bfloat16, jnp.float32):
        timing += run_time(
            mesh,
            num_layers=4 if args.quick or platform != "cpu" else 8,
            slots_per_device=args.slots_per_device or (4 if platform == "cpu" else 36),
            row_elems=args.row_elems
            or (1 << (14 if args.quick else 16) if platform == "cpu" else 1 << 24),
            dtype=dtype,
            repeats=3 if args.quick else 7,
            copy_bw=copy_bw,
        )
    text = (
        f"# Transfer benchmark ({platform}, {d} devices, jax {jax.__version__})\n\n"
        f"Command: `{cmd}`\n\n"
        + (f"Device copy bandwidth (same run): {copy_bw / 1e9:.0f} GB/s.\n\n" if copy_bw else "")
        + table(
            wire, "Wire rows of the busiest device vs the floor (plan only)", float_format="{:.2f}"
        )
        + "\n"
        + table(
            nodes,
            "Remote rows inside and across nodes of 8 devices (plan only, medians per layer)",
            float_format="{:.2f}",
        )
        + "\n"
        + table(
            cube,
            "Design study, not built: a hypercube schedule (log2 D rounds, rows forwarded; "
            "estimate from the same plans' primaries, 8 layers)",
            float_format="{:.2f}",
        )
        + "\n"
        + table(
            timing,
            f"Time per layer and temporary memory on {d} {platform} devices",
            float_format="{:.2f}",
        )
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"transfer_{platform}.md"),
        json_path=args.json,
        payload={
            "platform": platform,
            "command": cmd,
            "copy_bytes_per_s": copy_bw,
            "wire": [dataclasses.asdict(r) for r in wire],
            "nodes": [dataclasses.asdict(r) for r in nodes],
            "hypercube": [dataclasses.asdict(r) for r in cube],
            "time": [dataclasses.asdict(r) for r in timing],
        },
    )
    return 0

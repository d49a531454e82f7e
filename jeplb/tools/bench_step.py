"""Step benchmark: the example MoE model's step with EPLB against the same step without it.

Per case (named by its shapes and dtype), four jitted programs on the same devices and workload:

* ``plain``: the model step without EPLB (first replica of each expert, nothing recorded);
* ``idle``: with `jeplb.dispatch` recording and `jeplb.eplb_step`, no rebalance due (the cost of
  carrying EPLB in every step);
* ``whole``: a rebalance fired in every step, all L layers moved in it (the hot experts change every
  step, so every plan moves experts);
* ``progressive``: one layer moved per step (``layers_per_step=1``, a plan every L steps).

``--idle-scale`` runs instead the idle `jeplb.eplb_step` (no rebalance due) as a model's step
pays it: at the end of the decode step of `jeplb.tools.bench_decode` (58 layers, 4096 tokens x
top-8 of E = 256 on P = 288 slots, `jeplb.dispatch` on every layer; one jitted call per step),
with vLLM's window of W = 1000 passes and with a window of 1, against the same step without it,
on the first device (``--tiny``: small shapes, for a CPU).

Each program runs a few warm-up steps (compilation included); then the programs take ``repeats``
timed steps in turn (interleaved, so that a change of machine load hits all alike); the figures are
medians. Slots compute at capacity factor 2 (``C = 2 T K / P`` rows per slot; pairs
beyond it are dropped, as capacity-based MoE layers do), so expert compute does not swamp the rest.
``rows/step`` counts the expert rows received from other devices per step, ``slots/step`` the
slots whose expert changed (rows written), ``MB/step`` their bytes. On GPUs the same run also
measures the device's copy bandwidth (a jitted copy of a 1 GiB array, read + write) and reports the
written bytes per second of extra step time as a fraction of it (a written row is read and written once, like the copy's bytes; the extra time
includes the policy and the plan, so this is an end-to-end figure, not the row-move kernel's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

import numpy as np

from jeplb.tools.benchio import copy_bandwidth, results_path, write_results
from jeplb.tools.demo import add_device_flags, positive_int, setup_devices

__all__ = ["main"]

# (L, E, redundant, K, H, F, B, S, dtype)
_CASES = [
    (4, 16, 8, 2, 64, 128, 8, 32, "float32"),
    (8, 32, 8, 2, 128, 256, 8, 64, "bfloat16"),
]
_QUICK = [(2, 16, 8, 2, 64, 128, 4, 32, "float32")]
_VARIANTS = ("plain", "idle", "whole", "progressive")


def _case_name(c) -> str:
    lay, e, r, k, h, f, b, s, dt = c
    return f"L{lay} E{e} P{e + r} K{k} H{h} F{f} T{b * s} {dt}"


def _capacity(tokens: int, k: int, slots: int) -> int:
    """Slot capacity at capacity factor 2 (twice the mean load of a slot), a multiple of 8."""
    return -(-2 * tokens * k // slots // 8) * 8


def _run_case(case, devices, *, warmup: int, repeats: int, progress: bool) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import Mesh

    import jeplb
    from jeplb.examples import DriftingZipf, MoEConfig, MoETransformer, make_step

    lay, e, r, k, h, f, b, s, dt = case
    d = len(devices)
    mesh = Mesh(np.array(devices), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    cfg = MoEConfig(
        capacity=_capacity(b * s, k, e + r),
        num_layers=lay,
        num_experts=e,
        num_redundant_experts=r,
        top_k=k,
        d_model=h,
        d_ff=f,
        dtype=jnp.dtype(dt),
    )
    progs = {}
    for variant in _VARIANTS:
        drift = 1 if variant in ("whole", "progressive") else 0
        workload = DriftingZipf(
            num_layers=lay,
            num_experts=e,
            batch=b,
            seq_len=s,
            d_model=h,
            zipf_exponent=1.2,
            drift_every=drift,
            seed=0,
        )
        state = jeplb.EplbState.create(
            num_layers=lay,
            num_experts=e,
            num_devices=d,
            num_redundant_experts=r,
            window_size=1,
            step_interval={"idle": 10**9, "whole": 1, "progressive": lay}.get(variant, 1),
            layers_per_step=1 if variant == "progressive" else None,
        ).replicated(mesh)
        model = MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
        step, params = make_step(model, rebalance=variant != "plain")
        progs[variant] = dict(
            step=step,
            carry=(params, state),
            batches=[workload.batch_at(i) for i in range(warmup + repeats)],
            times=[],
            moved=[],
            changed=[],
            fired=0,
        )

    def run(p, i):
        params, state = p["carry"]
        before = np.asarray(state.phy2log)
        t = time.perf_counter()
        params, state, y, info, _ = p["step"](params, state, *p["batches"][i])
        jax.block_until_ready((params, state, y))
        dt = time.perf_counter() - t
        p["carry"] = (params, state)
        return dt, info, int(np.sum(before != np.asarray(state.phy2log)))

    for variant, p in progs.items():  # warm-up, compilation included
        t0 = time.perf_counter()
        for i in range(warmup):
            run(p, i)
        p["compile_s"] = time.perf_counter() - t0
        if progress:
            print(
                f"  {_case_name(case)} {variant:<11} warm-up {p['compile_s']:.1f} s",
                file=sys.stderr,
            )
    # Timed steps interleaved (one step of each variant in turn), so that a change of machine
    # load affects every variant alike.
    for i in range(warmup, warmup + repeats):
        for p in progs.values():
            dt, info, changed = run(p, i)
            p["times"].append(dt)
            p["changed"].append(changed)
            if info is not None:
                p["moved"].append(int(np.sum(info.remote_rows)))
                p["fired"] += int(info.fired)
    row_bytes = cfg.expert_bytes()
    rows = []
    for variant, p in progs.items():
        moved = p["moved"]
        rows.append(
            dict(
                case=_case_name(case),
                variant=variant,
                devices=d,
                median_ms=1e3 * float(np.median(p["times"])),
                min_ms=1e3 * float(np.min(p["times"])),
                compile_s=p["compile_s"],
                rows_per_step=float(np.median(moved)) if moved else 0.0,
                slots_per_step=float(np.median(p["changed"])),
                bytes_per_step=float(np.median(p["changed"])) * row_bytes,
                fired=p["fired"],
                repeats=repeats,
            )
        )
    del progs
    plain = rows[0]["median_ms"]
    for row in rows:
        row["extra_ms"] = row["median_ms"] - plain
        row["vs_plain"] = row["median_ms"] / plain
    return rows


# `_idle_scale`'s steps, each with the step it adds its idle `eplb_step` to (None: none).
def _idle_variants():
    from jeplb.tools import bench_decode as bd

    return {
        bd.PLAIN: None,
        bd.DISPATCH: None,
        bd.IDLE_BIG: bd.DISPATCH,
        bd.IDLE_ONE: bd.DISPATCH,
        bd.ONCE: None,
        bd.ONCE_IDLE: bd.ONCE,
        bd.ONCE_IDLE_HOST: bd.ONCE,
        bd.ONCE_IDLE_HOST_LOGGED: bd.ONCE,
        bd.KEPT: None,
        bd.KEPT_IDLE_HOST: bd.KEPT,
    }


def _idle_scale(*, tiny: bool, repeats: int) -> tuple[list[dict[str, Any]], Any]:
    """What EPLB costs a model's decode step (`jeplb.tools.bench_decode`): the step without
    EPLB, with `dispatch` on every layer (counts per layer, or the ids counted once per step) and
    with `dispatch_kept` (the slots kept, counted once),
    each with and without an idle `eplb_step` (W = 1000; W = 1 after `dispatch`), layers unrolled
    and scanned; and the standalone idle step's compiled temporaries at both windows."""
    import dataclasses

    from jeplb.tools import bench_decode as bd

    case = bd.TINY if tiny else bd.DEFAULT
    rows = bd.measure(
        case,
        variants=tuple(_idle_variants()),
        repeats=repeats,
        warmup=3,
        samples=5 if tiny else 20,
    )
    temps = {v: _idle_temp(case, v) for v in (bd.IDLE_BIG, bd.IDLE_ONE, bd.ONCE_IDLE_HOST)}
    temps[bd.ONCE_IDLE] = temps[bd.IDLE_BIG]  # the same standalone idle step (W = 1000)
    temps[bd.ONCE_IDLE_HOST_LOGGED] = temps[bd.ONCE_IDLE_HOST]
    temps[bd.KEPT_IDLE_HOST] = temps[bd.ONCE_IDLE_HOST]  # the same idle step, traced idle
    out = [dataclasses.asdict(r) for r in rows]
    for r in out:
        r["temp_bytes"] = temps.get(r["variant"], 0)
    return out, case


def _idle_temp(case, variant: str) -> int:
    """Temporary bytes of the standalone idle step's compiled program (memory_analysis)."""
    import functools

    import jax
    from jax.sharding import Mesh

    import jeplb
    from jeplb.tools import bench_decode as bd

    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    _, (state, w, _, _) = bd.build(case, variant, "unrolled")
    idle = variant in bd._HOST_IDLE
    step = jax.jit(functools.partial(jeplb.eplb_step, mesh=mesh, idle=idle), donate_argnums=(0, 1))
    return int(step.lower(state, w).compile().memory_analysis().temp_size_in_bytes)


def idle_markdown(rows) -> str:
    """The `_idle_scale` rows as a table: each step's time, EPLB's whole cost (over the step
    without EPLB, same layout, same run) and its idle step's (over the same step without it)."""
    from jeplb.tools import bench_decode as bd

    head = ["layout", "variant", "call us", "pipelined us", "EPLB us (call)"]
    head += ["EPLB us (pipelined)", "idle step us (call)", "idle step us (pipelined)"]
    head += ["step temp MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(r["layout"], r["variant"]): r for r in rows}
    bases = _idle_variants()
    for r in rows:
        plain = by[(r["layout"], bd.PLAIN)]
        under = bases.get(r["variant"])
        vals = [r["layout"], r["variant"], f"{r['call_us']:.0f}", f"{r['pipelined_us']:.0f}"]
        for ref in (None if r is plain else plain, by.get((r["layout"], under))):
            for key in ("call_us", "pipelined_us"):
                vals.append(f"{r[key] - ref[key]:+.0f}" if ref else "-")
        vals.append(f"{r['temp_bytes'] / 1e6:.2f}" if under else "-")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows, copy_bw: float | None) -> str:
    head = ["case", "variant", "median ms", "vs plain", "extra ms", "rows/step", "slots/step"]
    head += ["MB/step"]
    if copy_bw:
        head += ["moved GB/s", "of copy bw"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [
            r["case"],
            r["variant"],
            f"{r['median_ms']:.2f}",
            f"{r['vs_plain']:.2f}x",
            f"{r['extra_ms']:+.2f}",
            f"{r['rows_per_step']:.0f}",
            f"{r['slots_per_step']:.0f}",
            f"{r['bytes_per_step'] / 1e6:.2f}",
        ]
        if copy_bw:
            # Written slots are read once and written once: 2x their bytes, like the copy.
            extra = r["extra_ms"] / 1e3
            rate = 2 * r["bytes_per_step"] / extra if extra > 0 else 0.0
            r["moved_bytes_per_s"] = rate
            r["fraction_of_copy_bw"] = rate / copy_bw
            vals += [f"{rate / 1e9:.1f}", f"{rate / copy_bw:.1%}" if rate else "-"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Runs the step benchmark; ``argv`` as on the command line (``--help`` lists the flags)."""
    ap = argparse.ArgumentParser(
        prog=prog or "jeplb bench step",
        description="End-to-end step benchmark: the example MoE model's step with a fired "
        "rebalance (whole and progressive) and with EPLB idle, against the step without EPLB. "
        "Medians after warm-up.",
    )
    ap.add_argument("--quick", action="store_true", help="one small case, fewer repeats")
    ap.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed steps per program (default 15; 5 with --quick)",
    )
    ap.add_argument(
        "--warmup",
        type=positive_int,
        default=3,
        help="untimed steps first, compile included (default: %(default)s)",
    )
    add_device_flags(ap)
    ap.add_argument("--json", metavar="PATH", help="also write machine-readable results here")
    ap.add_argument(
        "--out",
        metavar="PATH",
        help="markdown results file (default: benchmarks/results/step_<platform>.md)",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument(
        "--idle-scale",
        action="store_true",
        help="only what EPLB costs a 58-layer decode step (E = 256, P = 288): dispatch on "
        "every layer (counted per layer or once per step) and the idle eplb_step, against the "
        "step without EPLB (results in step_idle_<platform>.md)",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="with --idle-scale: small shapes (a quick check on a CPU)",
    )
    args = ap.parse_args(argv)
    devices = setup_devices(args.platform, args.cpu_devices)
    import jax

    platform = devices[0].platform
    repeats = args.repeats or (5 if args.quick else 15)
    if args.idle_scale:
        return _main_idle(args, devices, argv, prog)
    cases = _QUICK if args.quick else _CASES
    d = len(devices)
    rows = []
    for case in cases:
        if (case[1] + case[2]) % d:
            print(f"skipping {_case_name(case)}: P not divisible by {d} devices", file=sys.stderr)
            continue
        rows += _run_case(
            case, devices, warmup=args.warmup, repeats=repeats, progress=not args.quiet
        )
    copy_bw = None
    if platform != "cpu":
        copy_bw = copy_bandwidth(devices[0], repeats)
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join([prog or "jeplb bench step", *given])
    text = (
        f"# Step benchmark ({platform}, {d} devices, jax {jax.__version__})\n\n"
        f"Command: `{cmd}`\n\n"
        f"The example MoE transformer (jeplb.examples) per step: `plain` without EPLB; `idle` with "
        f"dispatch recording and eplb_step, no rebalance due; `whole` a rebalance planned and all "
        f"layers moved in every step; `progressive` one layer moved per step. Slot capacity "
        f"2 T K / P. Medians of {repeats} steps after {args.warmup} warm-up steps, the "
        f"variants' steps interleaved; rows/step: expert rows received from other devices per "
        f"step (all devices); slots/step: slots whose expert changed (rows written); MB/step: "
        f"their bytes. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.\n\n"
        + (f"Device copy bandwidth (same run): {copy_bw / 1e9:.0f} GB/s.\n\n" if copy_bw else "")
        + markdown(rows, copy_bw)
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"step_{platform}.md"),
        json_path=args.json,
        payload={
            "platform": platform,
            "devices": d,
            "command": cmd,
            "copy_bytes_per_s": copy_bw,
            "rows": rows,
        },
    )
    return 0


def _main_idle(args, devices, argv, prog) -> int:
    import jax

    from jeplb.tools import bench_decode as bd

    platform = devices[0].platform
    repeats = args.repeats or (20 if args.tiny else 100)
    rows, case = _idle_scale(tiny=args.tiny, repeats=repeats)
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join([prog or "jeplb bench step", *given])
    del jax
    text = (
        f"# Idle step inside a decode step ({bd.device_summary()})\n\n"
        f"Command: `{cmd}`\n\n"
        f"What EPLB costs the decode step of `jeplb.tools.bench_decode` ({case.name}), one "
        f"jitted call per step with the state and weights donated: `jeplb.dispatch` on every "
        f"layer (counting per layer, or mapping only and counting the ids once per step with "
        f"`record_ids`) or `jeplb.dispatch_kept` (the slots written into one [L, T, K] array, "
        f"counted once with `record_slots`), with and without `jeplb.eplb_step` at the end, no rebalance due "
        f"(step_interval 10^9; windows of W = 1000 and W = 1). Medians of {repeats} "
        f"synchronised calls (`call`) and of bursts of 10 back-to-back calls (`pipelined`), the "
        f"programs interleaved. EPLB: the difference with the step without EPLB (`plain`), the "
        f"same layout, in this run; idle step: with the same step without it. step temp: the "
        f"standalone idle step's compiled temporaries (memory_analysis): nothing grows with W. "
        f"Load average at the end: {bd.cpu_quiet()}.\n\n" + idle_markdown(rows)
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"step_idle_{platform}.md"),
        json_path=args.json,
        payload={"device": bd.device_summary(), "command": cmd, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""Dispatch benchmark: what `jeplb.dispatch` on every layer and an idle `jeplb.eplb_step` cost a
decode step, measured as a model calls them.

The decode-like step of `jeplb.tools.bench_decode` (58 layers, 4096 tokens x top-8 of E = 256 on
P = 288 slots; one jitted call per step, state and weights donated), layers unrolled and scanned,
in four variants: ``plain`` (no EPLB), ``dispatch`` on every layer, and ``dispatch`` + an idle
``eplb_step`` with a window of 1000 and of 1. Per step, medians of ``--repeats`` synchronised calls
(``call_us``) and of back-to-back bursts (``pipelined_us``); ``over_plain_us`` and
``over_dispatch_us`` are differences of the call medians in the same run. ``per layer`` divides
dispatch's share by L.

``--impl`` picks how the counts are made on the GPU: ``scatter`` (the default: a scatter into 256
rows of counters, summed), ``compare`` (a compare-sum) or ``fused`` (the Pallas kernel that maps
and counts, its programs' rows summed by XLA). ``--host-idle`` adds the idle step traced with
``idle=True`` (no conditional: `jeplb.HostSchedule` decides on the host) after `dispatch`, and
after the counted-once map with its StepInfo unused and with its balancedness returned, where
``--variants`` lacks them. ``--hlo DIR`` writes what one
layer's dispatch launches (the compiled entry computation) and the idle step's compiled HLO.
``--command-buffers`` adds ``--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE`` to XLA_FLAGS
before the backend starts (on a GPU the conditional's predicate then stays on the device).
``dispatch kept`` (not in the default set): `jeplb.dispatch_kept` on every layer, the slots
written into one [L, T, K] array and counted once by `jeplb.EplbState.record_slots`.
``--tiny`` runs small shapes (a quick check on a CPU). ``--balanced`` adds the variant
``dispatch balanced`` (`jeplb.dispatch` with ``replica_choice="balanced"``; its cost over
``dispatch`` is ``over_dispatch_us``) and lists its launches too.

Usage (from the repository root):
    python benchmarks/bench_dispatch.py [--tiny] [--repeats N] [--impl {scatter,compare,fused}]
        [--command-buffers] [--router {shift,topk}]
        [--layouts unrolled,scanned] [--variants V,...] [--balanced] [--host-idle] [--out PATH]
        [--json PATH] [--hlo DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax

from jeplb.tools import bench_decode as bd
from jeplb.tools.benchio import results_path, table, write_results

COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_dispatch.py")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--repeats", type=int, default=None, help="calls per program (100)")
    parser.add_argument("--impl", choices=("scatter", "compare", "fused"), default="scatter")
    parser.add_argument(
        "--balanced-impl",
        choices=("kernel", "xla"),
        default=None,
        help="how the balanced choice ranks on a GPU: the Pallas kernels or XLA's reductions "
        "(default: the library's)",
    )
    parser.add_argument(
        "--command-buffers",
        action="store_true",
        help=f"add {COMMAND_BUFFERS} to XLA_FLAGS (conditionals and loops inside CUDA graphs; "
        "set before the backend starts)",
    )
    parser.add_argument(
        "--router",
        choices=bd.ROUTERS,
        default="shift",
        help="the layers' router: 'shift' (elementwise, fused into its consumers) or 'topk' "
        "(a top-k of logits, as a model has)",
    )
    parser.add_argument("--layouts", default="unrolled,scanned")
    parser.add_argument("--variants", default=",".join(bd.VARIANTS))
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--hlo", default=None, metavar="DIR")
    parser.add_argument(
        "--balanced",
        action="store_true",
        help="add dispatch with replica_choice='balanced' (variant 'dispatch balanced')",
    )
    parser.add_argument(
        "--host-idle",
        action="store_true",
        help="add the idle step traced with idle=True (no conditional), after 'dispatch' and "
        "after the counted-once map",
    )
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/bench_dispatch.py " + " ".join(given)
    if args.command_buffers:  # read when the backend starts, which nothing above has done
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + COMMAND_BUFFERS).strip()
    from jeplb._src import dispatch as _dispatch

    if hasattr(_dispatch, "_IMPL"):
        _dispatch._IMPL = args.impl
    if args.balanced_impl:
        _dispatch._BALANCED_IMPL = args.balanced_impl
    case = dataclasses.replace(bd.TINY if args.tiny else bd.DEFAULT, router=args.router)
    repeats = args.repeats or (20 if args.tiny else 100)
    device = bd.device_summary()
    print(f"{case.name} on {device}", flush=True)
    ops = bd.first_layer_ops(case)
    print(f"one layer's dispatch_layer launches {len(ops)} operations:", *ops, sep="\n  ")
    if args.hlo:
        os.makedirs(args.hlo, exist_ok=True)
        with open(os.path.join(args.hlo, f"dispatch_layer_{args.impl}.txt"), "w") as f:
            f.write("\n".join(ops) + "\n")
        with open(os.path.join(args.hlo, "idle_step.txt"), "w") as f:
            f.write(bd.idle_step_text(case))
    balanced_ops = bd.first_layer_ops(case, replica_choice="balanced") if args.balanced else []
    if balanced_ops:
        print(f"balanced: {len(balanced_ops)} operations:", *balanced_ops, sep="\n  ")
    variants = tuple(args.variants.split(","))
    variants += tuple(v for v in bd._HOST_IDLE if args.host_idle and v not in variants)
    variants += (bd.BALANCED,) if args.balanced and bd.BALANCED not in variants else ()
    rows = bd.measure(
        case,
        variants=variants,
        layouts=tuple(args.layouts.split(",")),
        repeats=repeats,
        warmup=3,
        samples=5 if args.tiny else 20,
        progress=lambda m: print(m, flush=True),
    )
    for r in rows:
        print(r, flush=True)
    trips = _scanned_trips(case, variants) if "scanned" in args.layouts.split(",") else {}
    per_layer = {
        f"{r.layout} {r.variant}": r.over_plain_us / case.layers
        for r in rows
        if r.variant in (bd.DISPATCH, bd.ONCE, bd.KEPT, bd.BALANCED)
    }
    platform = jax.devices()[0].platform
    text = (
        f"# Dispatch and the idle step in a decode step ({device})\n\n"
        f"Command: `{command.strip()}`\n\n"
        f"{case.name}, rows f32[{case.hidden}]; dispatch implementation: {args.impl}"
        f"; balanced ranks: {_dispatch._BALANCED_IMPL}"
        f"{'; XLA_FLAGS ' + COMMAND_BUFFERS if args.command_buffers else ''}. Per step: "
        f"medians of {repeats} synchronised calls (`call_us`) and of bursts of 10 back-to-back "
        f"calls (`pipelined_us`), the programs interleaved; `over_plain_us`, `over_dispatch_us`: "
        f"differences of `call_us` in this run. Load average at the end: {bd.cpu_quiet()}.\n\n"
        + table(rows, "Per step")
        + "\nDispatch per layer (dispatch over plain / L): "
        + ", ".join(f"{k} {v:.2f} us" for k, v in per_layer.items())
        + f"\n\nOne layer's `dispatch_layer` alone launches {len(ops)} operations:\n\n"
        + "".join(f"    {o}\n" for o in ops)
        + "".join(
            f"\nScanned, one trip of the layers' loop launches {len(t)} operations ({v}):\n\n"
            + "".join(f"    {o}\n" for o in t)
            for v, t in trips.items()
        )
        + (
            f"\nWith `replica_choice='balanced'` it launches {len(balanced_ops)}:\n\n"
            + "".join(f"    {o}\n" for o in balanced_ops)
            if balanced_ops
            else ""
        )
    )
    write_results(
        text,
        args.out or results_path(f"dispatch_{platform}.md"),
        json_path=args.json,
        payload={
            "device": device,
            "command": command,
            "impl": args.impl,
            "rows": [dataclasses.asdict(r) for r in rows],
            "dispatch_ops": ops,
            "balanced_ops": balanced_ops,
            "scanned_trip_ops": trips,
        },
    )
    return 0


def _scanned_trips(case, variants) -> dict[str, list[str]]:
    """What one trip of the scanned step's loop launches, for ``plain`` and each of
    ``variants`` that maps without an idle step (maps and counts, counts once, keeps the slots)."""
    pick = [bd.PLAIN, *[v for v in variants if v in (bd.DISPATCH, bd.ONCE, bd.KEPT)]]
    out = {}
    for variant in pick:
        fn, fargs = bd.build(case, variant, "scanned")
        out[variant] = bd.loop_body_ops(fn.lower(*fargs).compile().as_text())
    return out


if __name__ == "__main__":
    raise SystemExit(main())

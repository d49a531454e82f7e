"""Placement benchmark: `jeplb.rebalance_experts` against the numpy implementation, same run.

Per case (named by shape; hierarchical and global policies):

* from scratch: compile time, median ms per call after warm-up (jit, block_until_ready), the numpy
  implementation's median in the same run and the ratio;
* refine: balancedness (vLLM's aggregate, sum of means / sum of maxima) of the reference placement
  and of ``refine=True``, the gain and the worst per-layer change (never negative);
* migration-aware: after a load drift (each expert's load times a factor in [1 - d, 1 + d]), the
  remote expert copies against those of the from-scratch placement, the heaviest device per layer
  against the from-scratch one (worst layer and aggregate), compile time and ms per call.

Loads are lognormal (sigma 1) per expert, a skewed router, fixed seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.metrics import balancedness, remote_copies
from jeplb._src.policy.api import _rebalance_jit, rebalance_experts
from jeplb.tools.benchio import median_seconds, results_path, write_results
from jeplb.tools.reference_policy import rebalance_experts_numpy

__all__ = ["CASES", "Case", "main", "run_case"]


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark shape: L layers, E experts, P slots, groups, nodes, D devices."""

    name: str
    layers: int
    experts: int
    slots: int
    groups: int
    nodes: int
    devices: int

    @property
    def policy(self) -> str:
        return "hierarchical" if self.groups % self.nodes == 0 and self.nodes > 1 else "global"

    @property
    def args(self) -> tuple[int, int, int, int]:
        return self.slots, self.groups, self.nodes, self.devices


CASES = (
    Case("DeepSeek-V3 (hier)", 58, 256, 288, 8, 4, 32),
    Case("DeepSeek-V3 (global)", 58, 256, 288, 1, 1, 32),
    Case("Qwen3-235B (global)", 94, 128, 160, 1, 1, 16),
    Case("Small MoE (hier)", 16, 64, 80, 4, 2, 8),
)
QUICK_CASES = (CASES[0], CASES[3])


def _loads(case: Case, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.lognormal(0.0, 1.0, size=(case.layers, case.experts)) * 1000).astype(np.float32)


def _drift(w: np.ndarray, drift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (w * rng.uniform(1 - drift, 1 + drift, size=w.shape)).astype(np.float32)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * median_seconds(fn, repeats=repeats)


def _compile_s(case: Case, w: jax.Array, old: jax.Array | None, refine: bool) -> float:
    t = time.perf_counter()
    _rebalance_jit.lower(
        w,
        old,
        num_slots=case.slots,
        num_groups=case.groups if case.groups % case.nodes == 0 else 1,
        num_nodes=case.nodes if case.groups % case.nodes == 0 else 1,
        num_devices=case.devices,
        refine=refine,
    ).compile()
    return time.perf_counter() - t


@dataclasses.dataclass
class Row:
    case: str
    shape: str
    policy: str
    compile_s: float
    jit_ms: float
    numpy_ms: float
    speedup: float
    refine_ms: float
    bal_reference: float
    bal_refine: float
    refine_gain_pct: float
    refine_worst_layer: float
    migrate_compile_s: float
    migrate_ms: float
    drifts: list[dict]


def run_case(case: Case, *, repeats: int, drifts: tuple[float, ...], seed: int = 0) -> Row:
    """Measures one case (see the module docstring)."""
    w_np = _loads(case, seed)
    w = jnp.asarray(w_np)
    args = case.args
    compile_s = _compile_s(case, w, None, False)
    jit_ms = _median_ms(lambda: rebalance_experts(w, *args), repeats)
    numpy_ms = _median_ms(lambda: rebalance_experts_numpy(w_np, *args), max(1, repeats // 4))
    ref = rebalance_experts(w, *args)[0]
    refined = rebalance_experts(w, *args, refine=True)[0]
    refine_ms = _median_ms(lambda: rebalance_experts(w, *args, refine=True), repeats)
    b_ref = balancedness(ref, w, case.devices)
    b_fin = balancedness(refined, w, case.devices)
    worst = float(np.min(np.asarray(b_fin.layer_balancedness) - np.asarray(b_ref.layer_balancedness)))

    old = ref
    migrate_compile_s = _compile_s(case, w, old, False)
    results = []
    migrate_ms = 0.0
    for i, drift in enumerate(drifts):
        w1 = jnp.asarray(_drift(w_np, drift, seed + 1 + i))
        scratch = rebalance_experts(w1, *args)[0]
        new = rebalance_experts(w1, *args, old_phy2log=old)[0]
        if i == 0:
            migrate_ms = _median_ms(
                lambda w1=w1: rebalance_experts(w1, *args, old_phy2log=old), repeats
            )
        moved_scratch = int(remote_copies(old, scratch, case.devices).sum())
        moved = int(remote_copies(old, new, case.devices).sum())
        b_s = balancedness(scratch, w1, case.devices)
        b_n = balancedness(new, w1, case.devices)
        ratio = np.asarray(b_n.max) / np.maximum(np.asarray(b_s.max), 1e-30)
        results.append(
            dict(
                drift=drift,
                remote_scratch=moved_scratch,
                remote_migrate=moved,
                remote_pct=100.0 * moved / max(moved_scratch, 1),
                slots_changed_scratch_pct=100.0 * float(np.mean(np.asarray(scratch) != old)),
                slots_changed_migrate_pct=100.0 * float(np.mean(np.asarray(new) != old)),
                max_ratio_worst_layer=float(ratio.max()),
                max_ratio_aggregate=float(np.asarray(b_n.max).sum() / np.asarray(b_s.max).sum()),
                bal_scratch=float(b_s.balancedness),
                bal_migrate=float(b_n.balancedness),
            )
        )
    return Row(
        case=case.name,
        shape=f"{case.layers}x{case.experts}->{case.slots}, G{case.groups} N{case.nodes} "
        f"D{case.devices}",
        policy=case.policy,
        compile_s=compile_s,
        jit_ms=jit_ms,
        numpy_ms=numpy_ms,
        speedup=numpy_ms / jit_ms,
        refine_ms=refine_ms,
        bal_reference=float(b_ref.balancedness),
        bal_refine=float(b_fin.balancedness),
        refine_gain_pct=100.0 * (float(b_fin.balancedness) / float(b_ref.balancedness) - 1.0),
        refine_worst_layer=worst,
        migrate_compile_s=migrate_compile_s,
        migrate_ms=migrate_ms,
        drifts=results,
    )


def policy_times(cases: tuple[Case, ...], *, repeats: int, drift: float = 0.2) -> str:
    """Markdown table: ms per call of the jitted program alone (no argument checks, loads already
    on the device), from scratch, refine, migration-aware and migration-aware with refine, for
    timing the policy on an accelerator (``--times``)."""
    out = [
        "| case | from scratch ms | refine ms | migration-aware ms | migration-aware + refine ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for case in cases:
        w_np = _loads(case, 0)
        w = jnp.asarray(w_np)
        w1 = jnp.asarray(_drift(w_np, drift, 1))
        hier = case.groups % case.nodes == 0
        kw = dict(
            num_slots=case.slots,
            num_groups=case.groups if hier else 1,
            num_nodes=case.nodes if hier else 1,
            num_devices=case.devices,
        )
        times = []
        for old_given, refine in ((False, False), (False, True), (True, False), (True, True)):
            old = _rebalance_jit(w, None, refine=refine, **kw)[0] if old_given else None
            times.append(
                _median_ms(
                    lambda old=old, r=refine, w1=w1, kw=kw: _rebalance_jit(w1, old, refine=r, **kw),
                    repeats,
                )
            )
        out.append(f"| {case.name} | " + " | ".join(f"{t:.3f}" for t in times) + " |")
    return "\n".join(out) + "\n"


def markdown(rows: list[Row]) -> str:
    """The three tables of the results file."""
    out = [
        "## From scratch (DeepSeek's policy)\n",
        "| case | shape | policy | compile s | jit ms/call | numpy ms/call | numpy / jit |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.case} | {r.shape} | {r.policy} | {r.compile_s:.2f} | {r.jit_ms:.2f} | "
            f"{r.numpy_ms:.1f} | {r.speedup:.1f}x |"
        )
    out += [
        "\n## Refine (swap refinement after packing)\n",
        "| case | ms/call | balancedness reference | balancedness refine | gain | worst layer "
        "change |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.case} | {r.refine_ms:.2f} | {r.bal_reference:.4f} | {r.bal_refine:.4f} | "
            f"{r.refine_gain_pct:+.2f}% | {r.refine_worst_layer:+.4f} |"
        )
    out += [
        "\n## Migration-aware after a drift (old placement: the from-scratch one of the earlier "
        "load)\n",
        "| case | drift | remote copies scratch | remote copies migrate | migrate / scratch | "
        "slots changed scratch / migrate | max load vs scratch, worst layer | aggregate | "
        "compile s | ms/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for d in r.drifts:
            out.append(
                f"| {r.case} | ±{100 * d['drift']:.0f}% | {d['remote_scratch']} | "
                f"{d['remote_migrate']} | {d['remote_pct']:.1f}% | "
                f"{d['slots_changed_scratch_pct']:.0f}% / {d['slots_changed_migrate_pct']:.0f}% | "
                f"{d['max_ratio_worst_layer']:.4f} | {d['max_ratio_aggregate']:.4f} | "
                f"{r.migrate_compile_s:.2f} | {r.migrate_ms:.1f} |"
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Runs the placement benchmark; prints markdown and writes the results file.

    Args:
      argv: command-line arguments (``--quick``, ``--json PATH``, ``--out PATH``); None reads
        ``sys.argv[1:]``.

    Returns:
      The exit status (0).

    Example:
      >>> main(["--quick", "--out", "/tmp/policy_quick.md"])  # doctest: +SKIP
      0
    """
    ap = argparse.ArgumentParser(
        prog="jeplb bench policy", description="Placement policy benchmark (jit vs numpy)."
    )
    ap.add_argument("--quick", action="store_true", help="two cases, fewer repeats, one drift")
    ap.add_argument("--json", metavar="PATH", help="also write machine-readable results")
    ap.add_argument("--out", metavar="PATH", help="markdown results file")
    ap.add_argument(
        "--times",
        action="store_true",
        help="only the jitted program's ms per call in four modes (for GPUs); prints, writes nothing",
    )
    args = ap.parse_args(argv)
    if args.times:
        cases = QUICK_CASES[:1] + CASES[1:2] if args.quick else CASES
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, medians of 51 calls\n")
        print(policy_times(cases, repeats=51))
        return 0

    cases = QUICK_CASES if args.quick else CASES
    repeats = 5 if args.quick else 21
    drifts = (0.3,) if args.quick else (0.2, 0.35, 0.5)
    rows = []
    for case in cases:
        row = run_case(case, repeats=repeats, drifts=drifts)
        print(f"{case.name}: {row.jit_ms:.2f} ms/call, compile {row.compile_s:.2f} s", flush=True)
        rows.append(row)
    platform = jax.devices()[0].platform
    given = list(argv) if argv is not None else sys.argv[1:]
    cmd = " ".join(["jeplb bench policy", *given])
    text = (
        f"# Placement policy benchmark ({platform}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPU cores)\n\n"
        f"Command: `{cmd}` (or `python benchmarks/bench_policy.py` with the same flags)\n\n"
        f"Loads: lognormal (sigma 1) per expert, float32; medians of {repeats} calls after "
        f"warm-up; jit times are the public `jeplb.rebalance_experts` with its argument checks.\n\n"
        + markdown(rows)
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"policy_{platform}.md"),
        json_path=args.json,
        payload={
            "platform": platform,
            "command": cmd,
            "rows": [dataclasses.asdict(r) for r in rows],
        },
    )
    return 0

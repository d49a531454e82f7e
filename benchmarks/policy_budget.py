"""Move budget benchmark: balance against rows moved for the migration-aware policy.

For each case and drift, the old placement is the from-scratch one of the earlier load; the new
load is the drifted one. Rows: the from-scratch placement of the new load (the reference), the
migration-aware one (no budget) and ``move_budget`` = 0, 1%, 5%, 10% of P per layer (rounded)
and P itself (never binding). Columns: remote copies (rows that cross devices, summed over layers)
and their share of the reference's, the worst layer's copies, balancedness (vLLM's aggregate),
the heaviest device against the from-scratch one (worst layer), ms per call (median, jit).

Usage:
    python benchmarks/policy_budget.py [--quick] [--out PATH]
    python benchmarks/policy_budget.py --times   # the jitted program alone (for GPUs); prints

Results (markdown) go to benchmarks/results/policy_budget_<platform>.md unless --out says
otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.metrics import balancedness, remote_copies
from jeplb._src.policy.api import _rebalance_jit, rebalance_experts
from jeplb.tools.bench_policy import CASES, Case, _drift, _loads
from jeplb.tools.benchio import median_seconds, results_path, write_results

FRACTIONS = (0.01, 0.05, 0.10)


def _budgets(case: Case) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = [("none (migration-aware)", None), ("0", 0)]
    out += [(f"{100 * f:.0f}% of P", max(1, round(f * case.slots))) for f in FRACTIONS]
    out.append(("P (never binding)", case.slots))
    return out


def run(case: Case, drift: float, repeats: int) -> list[str]:
    """The table rows of one case and drift."""
    w_np = _loads(case, 0)
    w1 = jnp.asarray(_drift(w_np, drift, 1))
    old = rebalance_experts(jnp.asarray(w_np), *case.args)[0]
    scratch = rebalance_experts(w1, *case.args)[0]
    ref_copies = int(remote_copies(old, scratch, case.devices).sum())
    ref_max = np.asarray(balancedness(scratch, w1, case.devices).max)
    lines = []

    def line(label, rows, phy2log, ms, compile_s):
        copies = np.asarray(remote_copies(old, phy2log, case.devices))
        bal = balancedness(phy2log, w1, case.devices)
        worst = float((np.asarray(bal.max) / ref_max).max())
        lines.append(
            f"| {case.name} | ±{100 * drift:.0f}% | {label} | {rows} | {int(copies.sum())} | "
            f"{100 * copies.sum() / max(ref_copies, 1):.1f}% | {int(copies.max())} | "
            f"{float(bal.balancedness):.4f} | {worst:.4f} | {ms} | {compile_s} |"
        )

    ms = median_seconds(lambda: rebalance_experts(w1, *case.args), repeats=repeats) * 1e3
    line("from scratch (reference)", "-", scratch, f"{ms:.1f}", "-")
    for label, budget in _budgets(case):
        t = time.perf_counter()
        new = rebalance_experts(w1, *case.args, old_phy2log=old, move_budget=budget)[0]
        first_s = time.perf_counter() - t

        def call(budget=budget):
            return rebalance_experts(w1, *case.args, old_phy2log=old, move_budget=budget)

        ms = median_seconds(call, repeats=repeats) * 1e3
        rows = "-" if budget is None else str(budget)
        line(label, rows, new, f"{ms:.1f}", f"{first_s:.1f}")
    return lines


def times(repeats: int = 51) -> str:
    """Markdown: ms per call of the jitted program alone (loads and maps on the device, no
    argument checks), migration-aware without a budget and with each budget, at ±20%."""
    out = [
        "| case | " + " | ".join(label for label, _ in _budgets(CASES[0])) + " |",
        "|---|" + "---:|" * len(_budgets(CASES[0])),
    ]
    for case in CASES[:2]:
        w_np = _loads(case, 0)
        w1 = jnp.asarray(_drift(w_np, 0.2, 1))
        hier = case.groups % case.nodes == 0
        kw = dict(
            num_slots=case.slots,
            num_groups=case.groups if hier else 1,
            num_nodes=case.nodes if hier else 1,
            num_devices=case.devices,
            refine=False,
        )
        old = _rebalance_jit(jnp.asarray(w_np), None, **kw)[0]
        cells = []
        for _, budget in _budgets(case):
            b = None if budget is None else jnp.asarray(budget, jnp.int32)

            def call(b=b, w1=w1, old=old, kw=kw):
                return _rebalance_jit(w1, old, b, **kw)

            ms = median_seconds(call, repeats=repeats)
            cells.append(f"{1e3 * ms:.2f}")
        out.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Move budget: balance against rows moved.")
    ap.add_argument("--quick", action="store_true", help="DeepSeek-V3 hierarchical, ±20% only")
    ap.add_argument("--out", metavar="PATH", help="markdown results file")
    ap.add_argument("--times", action="store_true", help="ms of the jitted program; prints only")
    args = ap.parse_args(argv)
    if args.times:
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, medians of 51 calls\n")
        print(times())
        return 0
    cases = CASES[:1] if args.quick else CASES[:2]
    drifts = (0.2,) if args.quick else (0.2, 0.35, 0.5)
    repeats = 3 if args.quick else 5
    lines = [
        "| case | drift | budget | rows per layer | remote copies | of the reference's | "
        "worst layer | balancedness | max vs scratch, worst layer | ms/call | first call s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        for drift in drifts:
            lines += run(case, drift, repeats)
            print(lines[-1], flush=True)
    platform = jax.devices()[0].platform
    given = list(argv) if argv is not None else sys.argv[1:]
    cmd = " ".join(["python benchmarks/policy_budget.py", *given])
    text = (
        f"# Move budget: balance against rows moved ({platform}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPU cores)\n\n"
        f"Command: `{cmd}`\n\n"
        "Old placement: the from-scratch one of a lognormal load (sigma 1, seed 0); new load: each "
        "expert's load times a factor in [1 - d, 1 + d]. Remote copies: rows whose expert their "
        "device did not hold (`jeplb.remote_copies`, summed over layers; the reference is the "
        "from-scratch placement of the new load). ms/call: median of the public "
        f"`rebalance_experts` after warm-up ({repeats} calls); first call: compile included "
        "(one compilation serves every budget). The machine is shared: absolute times move by "
        "about 1.5x between runs.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    write_results(text, args.out or results_path(f"policy_budget_{platform}.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

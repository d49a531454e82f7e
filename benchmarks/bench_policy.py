"""Placement policy benchmark: `jeplb.rebalance_experts` (jit) against the numpy implementation.

Usage:
    python benchmarks/bench_policy.py [--quick] [--json PATH] [--out PATH]

Results (markdown) go to benchmarks/results/policy_<platform>.md unless --out says otherwise.
The same as `jeplb bench policy`.
"""

from __future__ import annotations

from jeplb.tools.bench_policy import main

if __name__ == "__main__":
    raise SystemExit(main())

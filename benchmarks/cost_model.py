"""Cost model: a full DeepSeek-V3 rebalance at EP 32 to 256, estimated from the real plans.

For each EP size D (8 GPUs per node), the placements are computed with `jeplb.rebalance_experts`
(loads lognormal, sigma 1; the old placement is the from-scratch one of the earlier load; the new
load is the old one times a factor in [0.8, 1.2] per expert, a 20% drift): from scratch and
migration-aware. Each layer's plan comes from the jnp transfer plan (`plan_layers`): only its rows
are read, as a [D, D] matrix of rows device a sends to device b (from ``send_rows``, whatever the
rounds), and its local copies. Link figures (assumptions, see ``benchmarks/results/cost_model.md``):

* NVLink within a node of 8 GPUs: 450 GB/s per direction per GPU (H100/H200 NVLink 4 spec);
* between nodes: 50 GB/s per direction per GPU (one 400 Gb/s NIC per GPU, as on DGX H100/H200);
* a fixed latency per collective (15 us), one collective per layer (a ragged all-to-all or one
  group of NCCL send/receives), and an HBM copy rate of 3.8 TB/s (read + write) for local copies.

A layer's time is its busiest device's: max over devices of max(send, receive), each the larger of
its NVLink and network parts (the two links run side by side), plus the local copies and the
latency. Whole rebalance: the 58 layers back to back (sum). Progressive: one layer per step, so the
per-step stall is one layer (the worst and the mean layer are given).

Usage: python benchmarks/cost_model.py [--out PATH]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.policy.api import rebalance_experts
from jeplb._src.transfer.plan import plan_layers

ROW_BYTES = 88.1e6  # one DeepSeek-V3 expert in bf16 (hidden 7168, moe_intermediate 2048)
NVLINK = 450e9
NETWORK = 50e9
LATENCY = 15e-6
HBM = 3.8e12
GPUS_PER_NODE = 8
LAYERS, EXPERTS = 58, 256


def slots_for(d: int) -> int:
    """P: 256 experts + 32 redundant, rounded up to a multiple of D."""
    return -(-(EXPERTS + 32) // d) * d


def loads(seed: int = 0, drift: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w0 = (rng.lognormal(0.0, 1.0, size=(LAYERS, EXPERTS)) * 1000).astype(np.float32)
    w1 = (w0 * rng.uniform(1 - drift, 1 + drift, size=w0.shape)).astype(np.float32)
    return w0, w1


def traffic(old: jax.Array, new: jax.Array, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64[L, D, D] sent from device a to device b, local copies int64[L, D])."""
    plan = plan_layers(old, new, num_devices=d)
    send = np.asarray(plan.send_rows)  # [L, src, shift, W]
    rows = (send >= 0).sum(-1)  # [L, src, shift]
    src = np.arange(d)[:, None]
    dst = (src + np.arange(d)[None, :]) % d
    mat = np.zeros((old.shape[0], d, d), np.int64)
    for s in range(d):
        mat[:, np.arange(d), dst[:, s]] += rows[:, :, s]
    n = old.shape[1] // d
    local = np.asarray(plan.local).reshape(old.shape[0], d, n).sum(-1)
    return mat, local


def layer_times(mat: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Seconds per layer [L] (see the module docstring)."""
    d = mat.shape[1]
    node = np.arange(d) // GPUS_PER_NODE
    intra = node[:, None] == node[None, :]
    out = []
    for side in (mat, np.swapaxes(mat, 1, 2)):  # sends, then receives (rows per device)
        near = (side * intra).sum(-1)
        far = (side * ~intra).sum(-1)
        out.append(np.maximum(near * ROW_BYTES / NVLINK, far * ROW_BYTES / NETWORK))
    wire = np.maximum(out[0], out[1]).max(-1)
    copy = local.max(-1) * 2 * ROW_BYTES / HBM
    moved = mat.sum((1, 2)) > 0
    return wire + copy + np.where(moved, LATENCY, 0.0)


def case(d: int, w0: np.ndarray, w1: np.ndarray) -> list[dict]:
    p = slots_for(d)
    nodes = max(1, d // GPUS_PER_NODE)
    args = (p, 8, nodes, d)
    old = rebalance_experts(w0, *args)[0]
    out = []
    for mode, new in (
        ("from scratch", rebalance_experts(w1, *args)[0]),
        ("migration-aware", rebalance_experts(w1, *args, old_phy2log=old)[0]),
    ):
        mat, local = traffic(old, new, d)
        t = layer_times(mat, local)
        node = np.arange(d) // GPUS_PER_NODE
        intra = node[:, None] == node[None, :]
        out.append(
            dict(
                d=d,
                slots=p,
                policy="hierarchical" if 8 % nodes == 0 else "global",
                mode=mode,
                rows=int(mat.sum()),
                inter_pct=100.0 * float((mat * ~intra).sum()) / max(int(mat.sum()), 1),
                busiest=int(np.maximum(mat.sum(2), mat.sum(1)).max(-1).sum()),
                whole_s=float(t.sum()),
                step_max_ms=1e3 * float(t.max()),
                step_mean_ms=1e3 * float(t.mean()),
            )
        )
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| EP | P | policy | placement | rows moved | over the network | busiest device, rows "
        "(sum of layers) | whole rebalance s | progressive stall per step, worst layer ms | "
        "mean layer ms |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['slots']} | {r['policy']} | {r['mode']} | {r['rows']} | "
            f"{r['inter_pct']:.0f}% | {r['busiest']} | {r['whole_s']:.2f} | "
            f"{r['step_max_ms']:.1f} | {r['step_mean_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", metavar="PATH", help="also write the table to this file")
    ap.add_argument("--ep", type=int, nargs="*", default=[32, 64, 128, 256])
    args = ap.parse_args(argv)
    w0, w1 = loads()
    rows = []
    for d in args.ep:
        rows += case(d, w0, w1)
        print(f"EP {d} done", file=sys.stderr, flush=True)
    text = markdown(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing-free work starts
    raise SystemExit(main())

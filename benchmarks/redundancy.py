"""What redundant experts buy: balance against memory, on the demo's workload.

For each count R of redundant slots per layer, the balancedness (mean / max device load, vLLM's
figure) that DeepSeek's policy reaches, from scratch, on the expected load of the demo's Zipf
router (every drift phase permutes the same Zipf weights, so one phase says it all), and the
memory the experts take relative to R = 0 (P / E). ``R = auto`` is the smallest R with
(E + R) % D == 0.

Usage:
  python benchmarks/redundancy.py [--experts 16] [--devices 8] [--layers 4] [--zipf 1.2]
      [--out benchmarks/results/redundancy_cpu.md]
"""

from __future__ import annotations

import argparse

import jeplb
from jeplb.examples.workload import DriftingZipf


def measure(num_experts: int, num_devices: int, num_layers: int, zipf: float) -> list[dict]:
    work = DriftingZipf(
        num_layers=num_layers, num_experts=num_experts, batch=1, seq_len=1, d_model=1,
        zipf_exponent=zipf, drift_every=1,
    )  # fmt: skip
    load = work.popularity(0)
    counts = {-num_experts % num_devices, num_devices // 2, *(num_devices * k for k in (1, 2, 4))}
    rows = []
    for r in sorted(counts):
        slots = num_experts + r
        if slots % num_devices:
            continue
        phy2log = jeplb.rebalance_experts(load, slots, 1, 1, num_devices)[0]
        ratio = float(jeplb.balancedness(phy2log, load, num_devices).balancedness)
        auto = r == -num_experts % num_devices
        rows.append(dict(redundant=r, auto=auto, memory=slots / num_experts, balancedness=ratio))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--out", help="write the table (markdown) to this file too")
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    args = p.parse_args(argv)
    rows = measure(args.experts, args.devices, args.layers, args.zipf)
    lines = [
        f"E = {args.experts}, D = {args.devices}, L = {args.layers}, Zipf exponent {args.zipf}, "
        "DeepSeek's policy from scratch.",
        "",
        "| redundant R | expert memory (P / E) | balancedness |",
        "| --- | --- | --- |",
    ]
    for row in rows:
        name = f"{row['redundant']}" + (" (auto)" if row["auto"] else "")
        lines.append(f"| {name} | {row['memory']:.2f}x | {row['balancedness']:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"Command: `python benchmarks/redundancy.py {' '.join(argv or [])}`\n\n")
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()

"""Transfer benchmark: wire efficiency for D = 2..64 and time/memory on 8 devices.

Usage:
    python benchmarks/bench_transfer.py [--quick] [--json PATH] [--out PATH]

On a machine without an accelerator it simulates 8 CPU devices. Results (markdown) go to
benchmarks/results/transfer_<platform>.md unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax
import jax.numpy as jnp

from jeplb import _bench_transfer as bt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and repeats")
    ap.add_argument("--json", metavar="PATH", help="also write machine-readable results")
    ap.add_argument("--out", metavar="PATH", help="markdown results file")
    args = ap.parse_args(argv)

    wire = bt.run_wire(num_layers=8 if args.quick else 32)
    platform = jax.devices()[0].platform
    d = min(8, len(jax.devices()))
    mesh = jax.make_mesh((d,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    timing = []
    for dtype in (jnp.bfloat16, jnp.float32):
        timing += bt.run_time(
            mesh,
            num_layers=4 if args.quick else 8,
            row_elems=1 << (14 if args.quick else 16),
            dtype=dtype,
            repeats=3 if args.quick else 7,
        )
    cmd = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"# Transfer benchmark ({platform}, {d} devices, jax {jax.__version__})\n\n"
        f"Command: `{cmd}`\n\n"
        + bt.markdown(wire, "Wire rows of the busiest device vs the floor (plan only)")
        + "\n"
        + bt.markdown(timing, f"Time per layer and temporary memory on {d} {platform} devices")
    )
    print(text)
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"transfer_{platform}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "platform": platform,
                    "command": cmd,
                    "wire": [dataclasses.asdict(r) for r in wire],
                    "time": [dataclasses.asdict(r) for r in timing],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

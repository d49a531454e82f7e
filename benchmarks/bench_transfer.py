"""Transfer benchmark: wire efficiency for D = 2..64 and time/memory on the local devices.

Usage (from the repository root):
    python benchmarks/bench_transfer.py [--quick] [--json PATH] [--out PATH]

The same as ``jeplb bench transfer``. Without an accelerator it simulates 8 CPU devices. Results
(markdown, with the command) go to benchmarks/results/transfer_<platform>.md unless --out says
otherwise.
"""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; CPU only

from jeplb.tools import bench_transfer as _bench_transfer  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(_bench_transfer.main(prog="python benchmarks/bench_transfer.py"))

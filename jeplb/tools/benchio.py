"""What every benchmark shares: a markdown table of dataclass rows, and writing the results
(markdown with the command that produced them, optionally JSON)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["copy_bandwidth", "median_seconds", "results_path", "table", "write_results"]


def table(rows: Sequence[Any], title: str, *, float_format: str = "{:.3g}") -> str:
    """A markdown table (with a ``###`` title) of dataclass rows; "" when there are none."""
    if not rows:
        return ""
    fields = [f.name for f in dataclasses.fields(rows[0])]
    lines = [f"### {title}", "", "| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        vals = [getattr(r, f) for f in fields]
        cells = (float_format.format(v) if isinstance(v, float) else str(v) for v in vals)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_path(name: str) -> str:
    """Default path of a results file: benchmarks/results/``name`` of the source checkout when
    jeplb runs from one (whatever the working directory), else under the working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "benchmarks")):
        return os.path.join(root, "benchmarks", "results", name)
    return os.path.join("benchmarks", "results", name)


def write_results(
    text: str, out: str, *, json_path: str | None = None, payload: dict[str, Any] | None = None
) -> None:
    """Writes the markdown ``text`` to ``out`` (creating its folder) and, when ``json_path`` is
    given, ``payload`` as JSON there; says where."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print(f"results written to {out}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload or {}, f, indent=1)


def median_seconds(fn, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` (its result waited for with
    `jax.block_until_ready`), after ``warmup`` untimed calls."""
    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def copy_bandwidth(device, repeats: int = 5) -> float:
    """Bytes per second (read + write) of a jitted elementwise copy of a 1 GiB array on
    ``device``: the same-run ceiling that row moves are compared with. Each sample is 10
    back-to-back calls, so launch latency does not count."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jax.device_put(jnp.zeros((1 << 28,), jnp.float32), device)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(x))
    back_to_back = 10
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(back_to_back):
            y = f(x)
        jax.block_until_ready(y)
        times.append((time.perf_counter() - t) / back_to_back)
    return 2 * x.nbytes / float(np.median(times))

"""`StepInfo.scalars`: what one `jeplb.eplb_step` did as a flat dict of named scalars, the form
metric writers take (Python logging, TensorBoard, Prometheus; see docs/serving.md).

Names: ``balancedness`` (over all layers), ``balancedness/layer_<l>`` (each layer),
``moved_layers`` (layers whose weights moved in the step), ``remote_rows`` (expert rows received
from other devices, all layers), ``infeasible_layers`` (layers due to move that kept their
placement), ``fired``, ``skipped`` and ``in_progress`` (0 or 1), ``planned_balancedness`` (NaN
when no plan ran), ``step``.

Where the values live follows the info: a `StepInfo` of device arrays gives device scalars (one
small program, no host sync; the caller decides when to fetch, e.g. ``float(d["balancedness"])``),
a fetched one (``jax.device_get(info)``, one transfer) gives Python numbers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["scalars"]


def _keys(num_layers: int) -> list[str]:
    """The dict's keys, in order."""
    layers = [f"balancedness/layer_{layer}" for layer in range(num_layers)]
    rest = ["moved_layers", "remote_rows", "infeasible_layers", "fired", "skipped"]
    rest += ["planned_balancedness", "in_progress", "step"]
    return ["balancedness", *layers, *rest]


def _named(info: Any, xp: Any) -> dict[str, Any]:
    """The values by key, computed with ``xp`` (numpy on fetched values, jax.numpy on device)."""
    out = {"balancedness": info.balancedness}
    for layer in range(info.layer_balancedness.shape[0]):
        out[f"balancedness/layer_{layer}"] = info.layer_balancedness[layer]
    out["moved_layers"] = xp.sum(info.moved.astype(xp.int32))
    out["remote_rows"] = xp.sum(info.remote_rows.astype(xp.int64 if xp is np else xp.int32))
    out["infeasible_layers"] = xp.sum((~info.layer_ok).astype(xp.int32))
    out["fired"] = info.fired.astype(xp.int32)
    out["skipped"] = info.skipped.astype(xp.int32)
    out["planned_balancedness"] = info.planned_balancedness
    out["in_progress"] = info.in_progress.astype(xp.int32)
    out["step"] = info.step
    return out


_on_device = jax.jit(lambda info: _named(info, jnp))


def scalars(self) -> dict[str, Any]:
    """This step's figures as a flat dict of named scalars, for metric writers.

    Keys: ``balancedness``, ``balancedness/layer_<l>`` for each layer l, ``moved_layers``,
    ``remote_rows``, ``infeasible_layers``, ``fired``, ``skipped``, ``planned_balancedness``,
    ``in_progress`` (0 or 1) and ``step``.

    No host sync on device values: a `StepInfo` of device arrays (as `jeplb.eplb_step` returns
    it) gives 0-d device arrays, computed by one small program; fetching is the caller's choice
    (``float(value)``, or fetch the whole info first). A fetched info (``jax.device_get(info)``:
    one transfer) gives Python floats and ints. A serving loop typically fetches only when
    ``info.fired`` (itself a one-scalar fetch) or every N steps; see docs/serving.md. Under
    `jax.jit` it gives traced scalars.

    Example:
      >>> import numpy as np, jeplb
      >>> info = jeplb.StepInfo(step=np.int32(7), fired=np.bool_(True), skipped=np.bool_(False),
      ...     planned_balancedness=np.float32(0.9),
      ...     moved=np.array([True, False]), layer_ok=np.array([True, True]),
      ...     in_progress=np.bool_(True), remote_rows=np.array([3, 0], np.int32),
      ...     layer_balancedness=np.array([0.5, 1.0], np.float32), balancedness=np.float32(0.75))
      >>> d = info.scalars()
      >>> list(d)
      ['balancedness', 'balancedness/layer_0', 'balancedness/layer_1', 'moved_layers', 'remote_rows', 'infeasible_layers', 'fired', 'skipped', 'planned_balancedness', 'in_progress', 'step']
      >>> d["balancedness"], d["balancedness/layer_0"], d["moved_layers"], d["fired"]
      (0.75, 0.5, 1, 1)
    """
    leaves = jax.tree_util.tree_leaves(self)
    if all(isinstance(x, np.ndarray | np.generic) for x in leaves):
        return {k: np.asarray(v).item() for k, v in _named(self, np).items()}
    values = _on_device(self)  # a jitted dict comes back in sorted key order
    return {k: values[k] for k in _keys(self.layer_balancedness.shape[0])}

"""Argument checks of `rebalance_experts`: every message names the argument, what was expected and
what arrived; all raised before anything is computed."""

from __future__ import annotations

import numbers
from typing import Any

import jax.numpy as jnp
import numpy as np

from jeplb._src.checks import is_concrete

__all__ = ["check_args"]


def _as_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_load(load: Any) -> tuple[int, int]:
    """Shape and dtype of the [L, E] load. Returns (L, E)."""
    if not hasattr(load, "shape") or not hasattr(load, "dtype"):
        raise TypeError(f"load: expected an array [L, E], got {type(load).__name__}")
    if len(load.shape) != 2:
        raise ValueError(
            f"load: expected a 2-D array [L, E] (layers x logical experts), got shape "
            f"{tuple(load.shape)}"
        )
    num_layers, num_log = (int(s) for s in load.shape)
    if num_layers < 1 or num_log < 1:
        raise ValueError(
            f"load: expected at least one layer and one expert, got shape {(num_layers, num_log)}"
        )
    dtype = np.dtype(load.dtype)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"load: expected a real (integer or floating) dtype, got {dtype}")
    return num_layers, num_log


def _check_load_values(load: Any) -> None:
    """Concrete loads: finite and >= 0 (a traced load cannot be checked)."""
    if not is_concrete(load):
        return
    w = np.asarray(load)
    if jnp.issubdtype(w.dtype, jnp.floating) and not np.isfinite(w).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
        raise ValueError(f"load{list(bad)} = {w[bad]}: expected finite loads (token counts >= 0)")
    if (w < 0).any():
        bad = tuple(int(i) for i in np.argwhere(w < 0)[0])
        raise ValueError(f"load{list(bad)} = {w[bad]}: expected loads >= 0")


def _check_counts(
    num_log: int, num_slots: Any, num_groups: Any, num_nodes: Any, num_devices: Any
) -> tuple[int, int, int, int]:
    """The four counts as Python ints, consistent with each other and with E."""
    num_slots = _as_count(num_slots, "num_slots")
    num_groups = _as_count(num_groups, "num_groups")
    num_nodes = _as_count(num_nodes, "num_nodes")
    num_devices = _as_count(num_devices, "num_devices")
    if num_slots < num_log:
        raise ValueError(
            f"num_slots: expected at least one slot per logical expert (>= E = {num_log}), "
            f"got {num_slots}"
        )
    if num_slots % num_devices:
        raise ValueError(
            f"num_slots: expected a multiple of num_devices = {num_devices} (every device holds "
            f"the same number of slots), got {num_slots}"
        )
    if num_groups % num_nodes == 0:  # hierarchical policy
        if num_log % num_groups:
            raise ValueError(
                f"num_groups: expected a divisor of the E = {num_log} logical experts (groups "
                f"of E / num_groups consecutive experts), got {num_groups}"
            )
        if num_devices % num_nodes:
            raise ValueError(
                f"num_devices: expected a multiple of num_nodes = {num_nodes} (the hierarchical "
                f"policy, used because num_groups % num_nodes == 0, puts the same number of "
                f"devices on every node), got {num_devices}"
            )
    return num_slots, num_groups, num_nodes, num_devices


def _check_old(old: Any, num_layers: int, num_log: int, num_slots: int) -> None:
    name = "old_phy2log"
    if not hasattr(old, "shape") or not hasattr(old, "dtype"):
        raise TypeError(f"{name}: expected an int32 array [L, P], got {type(old).__name__}")
    if tuple(old.shape) != (num_layers, num_slots):
        raise ValueError(
            f"{name}: expected shape [L, P] = {(num_layers, num_slots)} (load's layers x "
            f"num_slots), got {tuple(old.shape)}"
        )
    if not np.issubdtype(np.dtype(old.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {old.dtype}")
    if not is_concrete(old):
        return
    o = np.asarray(old)
    bad = np.argwhere((o < -1) | (o >= num_log))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name}{list(at)} = {o[at]}: expected an expert id in [0, E = {num_log}) or -1 "
            f"(empty slot)"
        )
    for layer in range(num_layers):
        held = np.zeros(num_log, bool)
        held[o[layer][o[layer] >= 0]] = True
        if not held.all():
            e = int(np.argmin(held))
            raise ValueError(
                f"{name}[{layer}]: expected every expert of [0, E = {num_log}) in some slot, but "
                f"expert {e} has none (the old placement must be complete)"
            )


def check_args(
    load: Any,
    num_slots: Any,
    num_groups: Any,
    num_nodes: Any,
    num_devices: Any,
    old_phy2log: Any,
) -> tuple[int, int, int, int]:
    """Checks every argument of `rebalance_experts`; returns the four counts as Python ints."""
    num_layers, num_log = _check_load(load)
    counts = _check_counts(num_log, num_slots, num_groups, num_nodes, num_devices)
    _check_load_values(load)
    if old_phy2log is not None:
        _check_old(old_phy2log, num_layers, num_log, counts[0])
    return counts

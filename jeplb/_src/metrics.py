"""Balance and migration metrics of a placement, in jnp (jit-able, any backend).

Letters: L layers, E logical experts, P physical slots, D devices, S = P // D slots per
device; slot p lives on device p // S. A logical expert's load is split evenly over its replicas,
as a router that spreads an expert's tokens over its replicas does (vLLM hashes the token index).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src import checks as _validate

__all__ = ["Balance", "balancedness", "device_loads", "remote_copies"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class Balance(NamedTuple):
    """Balance of a placement.

    Attributes:
      mean: float32[L] mean device load per layer.
      max: float32[L] heaviest device's load per layer.
      per_layer: float32[L] mean / max per layer (1.0 where a layer has no load).
      balancedness: float32[] sum over layers of mean / sum over layers of max (vLLM's figure;
        1.0 is perfect, 1 / D is everything on one device). 1.0 when there is no load at all.
    """

    mean: jax.Array
    max: jax.Array
    per_layer: jax.Array
    balancedness: jax.Array


def _as_array(x: Any) -> Any:
    """``x`` itself when it is an array (numpy, jax, tracer), else ``np.asarray(x)``."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _check_map(m: Any, name: str, num_experts: int | None = None) -> None:
    """Integer dtype; on concrete values, ids in [-1, E) (checked before any conversion, so no id
    wraps into range)."""
    if not np.issubdtype(np.dtype(m.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer map (int32), got dtype {m.dtype}")
    if not _validate.is_concrete(m):
        return
    v = np.asarray(m)
    high = num_experts if num_experts is not None else np.iinfo(np.int32).max
    bad = np.argwhere((v < -1) | (v >= high))
    if bad.size:
        at = [int(i) for i in bad[0]]
        want = f"[0, E = {num_experts})" if num_experts is not None else "[0, 2**31 - 1)"
        raise ValueError(f"{name}{at} = {v[tuple(at)]}: expected an expert id in {want} or -1")


def _check_num_devices(num_devices: Any, num_slots: int, map_name: str) -> None:
    if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral):
        raise TypeError(
            f"num_devices: expected a Python int, got {type(num_devices).__name__} {num_devices!r}"
        )
    if num_devices < 1 or num_slots % num_devices:
        raise ValueError(
            f"num_devices: expected a divisor of P = {num_slots} ({map_name}'s slots), got "
            f"{num_devices}"
        )


def _check_load_values(load: Any) -> None:
    """Concrete loads: finite, >= 0 and (floating ones) within float32's range."""
    if not _validate.is_concrete(load):
        return
    v = np.asarray(load)
    if jnp.issubdtype(v.dtype, jnp.floating):
        bad = np.argwhere(~np.isfinite(v) | (v < 0))
        big = np.argwhere(np.isfinite(v) & (v > _FLOAT32_MAX))
    else:
        bad, big = np.argwhere(v < 0), np.zeros((0, 2), int)
    if bad.size:
        at = [int(i) for i in bad[0]]
        raise ValueError(f"load{at} = {v[tuple(at)]}: expected finite loads >= 0 (token counts)")
    if big.size:
        at = [int(i) for i in big[0]]
        raise ValueError(
            f"load{at} = {v[tuple(at)]}: expected loads within float32's range (<= "
            f"{_FLOAT32_MAX:.8g}; the device loads are float32)"
        )


def _checked(phy2log: Any, load: Any, num_devices: Any) -> tuple[jax.Array, jax.Array]:
    """Checks a map and its load; returns phy2log as jnp and the load as float32[L, E], converted
    without wrapping (a concrete 64-bit load is rounded to float32 on the host)."""
    phy2log, load = _as_array(phy2log), _as_array(load)
    if phy2log.ndim != 2:
        raise ValueError(f"phy2log: expected a 2-D map [L, P], got shape {tuple(phy2log.shape)}")
    dtype = np.dtype(load.dtype)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"load: expected a real dtype, got {load.dtype}")
    if load.ndim == 2:
        _check_map(phy2log, "phy2log", load.shape[1])
        _check_load_values(load)
    if load.ndim != 2 or load.shape[0] != phy2log.shape[0]:
        raise ValueError(
            f"load: expected [L, E] with L = {phy2log.shape[0]} (phy2log's layers), got "
            f"shape {tuple(load.shape)}"
        )
    _check_num_devices(num_devices, phy2log.shape[1], "phy2log")
    if _validate.is_concrete(load) and dtype.itemsize > 4:
        load = np.asarray(load).astype(np.float32)  # before jnp would narrow it to 32 bits
    return jnp.asarray(phy2log), jnp.asarray(load).astype(jnp.float32)


def device_loads(phy2log: jax.Array, load: jax.Array, num_devices: int) -> jax.Array:
    """Load of every device: the sum over its slots of the slot's expert load / replica count.

    Args:
      phy2log: int [L, P] expert of each slot, -1 = empty (no load).
      load: [L, E] load of each logical expert, any real dtype, computed in float32 (integers are
        rounded, never wrapped; floating loads past float32's range raise when concrete).
      num_devices: D, a divisor of P.

    Returns:
      float32[L, D].

    Example:
      >>> import jax.numpy as jnp
      >>> device_loads(jnp.array([[0, 1, 0, 2]]), jnp.array([[4.0, 1.0, 3.0]]), 2).tolist()
      [[3.0, 5.0]]
    """
    phy2log, load = _checked(phy2log, load, num_devices)
    num_layers, num_log = load.shape
    valid = (phy2log >= 0) & (phy2log < num_log)
    ids = jnp.where(valid, phy2log, num_log)
    rows = jnp.arange(num_layers)[:, None]
    logcnt = jnp.zeros((num_layers, num_log + 1), jnp.int32).at[rows, ids].add(1)[:, :num_log]
    return device_loads_counted(phy2log, logcnt, load, num_devices)


def device_loads_counted(
    phy2log: jax.Array, logcnt: jax.Array, load: jax.Array, num_devices: int
) -> jax.Array:
    """`device_loads` given the replica counts (unchecked): no scatter, two gathers and a sum.

    Args:
      phy2log: int32[L, P], -1 = empty.
      logcnt: int[L, E] slots of each expert in ``phy2log`` (as `jeplb.EplbState` keeps them).
      load: float32[L, E].
      num_devices: D, a divisor of P.

    Returns:
      float32[L, D].
    """
    num_layers, num_slots = phy2log.shape
    num_log = load.shape[1]
    valid = (phy2log >= 0) & (phy2log < num_log)
    ids = jnp.where(valid, phy2log, 0)
    rows = jnp.arange(num_layers)[:, None]
    count = jnp.maximum(logcnt[rows, ids].astype(jnp.float32), 1.0)
    per_slot = jnp.where(valid, load[rows, ids] / count, 0.0)
    return per_slot.reshape(num_layers, num_devices, num_slots // num_devices).sum(-1)


def balancedness(phy2log: jax.Array, load: jax.Array, num_devices: int) -> Balance:
    """Per-layer mean and max device load, and vLLM's aggregate balancedness.

    Args:
      phy2log: int [L, P] expert of each slot, -1 = empty.
      load: [L, E] load of each logical expert (as in `device_loads`).
      num_devices: D, a divisor of P.

    Returns:
      A `Balance` (mean float32[L], max float32[L], per_layer float32[L], balancedness
      float32[]).

    Example:
      >>> import jax.numpy as jnp
      >>> b = balancedness(jnp.array([[0, 1, 0, 2]]), jnp.array([[4.0, 1.0, 3.0]]), 2)
      >>> round(float(b.balancedness), 6)
      0.8
    """
    return _balance(device_loads(phy2log, load, num_devices))


def balance_counted(
    phy2log: jax.Array, logcnt: jax.Array, load: jax.Array, num_devices: int
) -> Balance:
    """`balancedness` given the replica counts (unchecked; see `device_loads_counted`)."""
    return _balance(device_loads_counted(phy2log, logcnt, load, num_devices))


def _balance(loads: jax.Array) -> Balance:
    """The `Balance` of device loads float32[L, D]."""
    mean = loads.mean(axis=1)
    top = loads.max(axis=1)
    total_max = top.sum()
    ratio = jnp.where(total_max > 0, mean.sum() / jnp.where(total_max > 0, total_max, 1.0), 1.0)
    per_layer = jnp.where(top > 0, mean / jnp.where(top > 0, top, 1.0), 1.0)
    return Balance(mean=mean, max=top, per_layer=per_layer, balancedness=ratio)


def remote_copies(old_phy2log: jax.Array, new_phy2log: jax.Array, num_devices: int) -> jax.Array:
    """Remote expert copies a placement change costs: per layer, the slots whose new expert is not
    held by any slot of the same device in the old placement (those must cross the network; the
    other changed slots are local copies).

    Args:
      old_phy2log: int [L, P] current placement (-1 = empty).
      new_phy2log: int [L, P] next placement (-1 = empty, costs nothing).
      num_devices: D, a divisor of P.

    Returns:
      int32[L].

    Example:
      >>> import jax.numpy as jnp
      >>> remote_copies(jnp.array([[0, 1, 2, 3]]), jnp.array([[1, 0, 3, 0]]), 2).tolist()
      [1]
    """
    old, new = _as_array(old_phy2log), _as_array(new_phy2log)
    if old.ndim != 2 or tuple(old.shape) != tuple(new.shape):
        raise ValueError(
            f"new_phy2log: expected the shape of old_phy2log {tuple(old.shape)} ([L, P]), got "
            f"{tuple(new.shape)}"
        )
    _check_map(old, "old_phy2log")
    _check_map(new, "new_phy2log")
    num_layers, num_slots = old.shape
    _check_num_devices(num_devices, num_slots, "old_phy2log")
    slots = num_slots // num_devices
    o = jnp.asarray(old).reshape(num_layers, num_devices, slots)
    n = jnp.asarray(new).reshape(num_layers, num_devices, slots)
    held = (n[:, :, :, None] == o[:, :, None, :]).any(-1)
    return jnp.sum((n >= 0) & ~held, axis=(1, 2)).astype(jnp.int32)

"""Balance and migration metrics of a placement, in jnp (jit-able, any backend).

Letters: L layers, E logical experts, P physical slots, D devices (GPUs), S = P // D slots per
device; slot p lives on device p // S. A logical expert's load is split evenly over its replicas,
as a router that spreads an expert's tokens over its replicas does (vLLM hashes the token index).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src import checks as _validate

__all__ = ["Balance", "balancedness", "device_loads", "remote_copies"]


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


def _check_map(m: jax.Array, name: str, num_experts: int | None = None) -> None:
    """Integer dtype; on concrete values, ids in [-1, E)."""
    if not jnp.issubdtype(m.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer map (int32), got dtype {m.dtype}")
    if not _validate.is_concrete(m):
        return
    v = np.asarray(m)
    high = num_experts if num_experts is not None else np.iinfo(np.int32).max
    bad = np.argwhere((v < -1) | (v >= high))
    if bad.size:
        at = [int(i) for i in bad[0]]
        want = f"[0, E = {num_experts})" if num_experts is not None else ">= 0"
        raise ValueError(f"{name}{at} = {v[tuple(at)]}: expected an expert id in {want} or -1")


def _check_shapes(phy2log: jax.Array, logical_load: jax.Array, num_gpus: int) -> None:
    if phy2log.ndim != 2:
        raise ValueError(f"phy2log: expected a 2-D map [L, P], got shape {tuple(phy2log.shape)}")
    if not (
        jnp.issubdtype(logical_load.dtype, jnp.integer)
        or jnp.issubdtype(logical_load.dtype, jnp.floating)
    ):
        raise TypeError(f"logical_load: expected a real dtype, got {logical_load.dtype}")
    if logical_load.ndim == 2:
        _check_map(phy2log, "phy2log", logical_load.shape[1])
    if logical_load.ndim == 2 and _validate.is_concrete(logical_load):
        v = np.asarray(logical_load, np.float64)
        bad = np.argwhere(~np.isfinite(v) | (v < 0))
        if bad.size:
            at = [int(i) for i in bad[0]]
            raise ValueError(
                f"logical_load{at} = {v[tuple(at)]}: expected finite loads >= 0 (token counts)"
            )
    if logical_load.ndim != 2 or logical_load.shape[0] != phy2log.shape[0]:
        raise ValueError(
            f"logical_load: expected [L, E] with L = {phy2log.shape[0]} (phy2log's layers), got "
            f"shape {tuple(logical_load.shape)}"
        )
    if num_gpus < 1 or phy2log.shape[1] % num_gpus:
        raise ValueError(
            f"num_gpus: expected a divisor of P = {phy2log.shape[1]} (phy2log's slots), got "
            f"{num_gpus}"
        )


def device_loads(phy2log: jax.Array, logical_load: jax.Array, num_gpus: int) -> jax.Array:
    """Load of every device: the sum over its slots of the slot's expert load / replica count.

    Args:
      phy2log: int [L, P] expert of each slot, -1 = empty (no load).
      logical_load: [L, E] load of each logical expert (computed in float32).
      num_gpus: D, a divisor of P.

    Returns:
      float32[L, D].

    Example:
      >>> import jax.numpy as jnp
      >>> device_loads(jnp.array([[0, 1, 0, 2]]), jnp.array([[4.0, 1.0, 3.0]]), 2).tolist()
      [[3.0, 5.0]]
    """
    phy2log = jnp.asarray(phy2log)
    logical_load = jnp.asarray(logical_load)
    _check_shapes(phy2log, logical_load, num_gpus)
    num_layers, num_phy = phy2log.shape
    num_log = logical_load.shape[1]
    valid = (phy2log >= 0) & (phy2log < num_log)
    ids = jnp.where(valid, phy2log, num_log)
    rows = jnp.arange(num_layers)[:, None]
    count = jnp.zeros((num_layers, num_log + 1), jnp.float32).at[rows, ids].add(1.0)
    load = jnp.concatenate(
        [logical_load.astype(jnp.float32), jnp.zeros((num_layers, 1), jnp.float32)], axis=1
    )
    per_slot = jnp.where(valid, load[rows, ids] / jnp.maximum(count[rows, ids], 1.0), 0.0)
    return per_slot.reshape(num_layers, num_gpus, num_phy // num_gpus).sum(-1)


def balancedness(phy2log: jax.Array, logical_load: jax.Array, num_gpus: int) -> Balance:
    """Per-layer mean and max device load, and vLLM's aggregate balancedness.

    Args:
      phy2log: int [L, P] expert of each slot, -1 = empty.
      logical_load: [L, E] load of each logical expert.
      num_gpus: D, a divisor of P.

    Returns:
      A `Balance` (mean float32[L], max float32[L], per_layer float32[L], balancedness
      float32[]).

    Example:
      >>> import jax.numpy as jnp
      >>> b = balancedness(jnp.array([[0, 1, 0, 2]]), jnp.array([[4.0, 1.0, 3.0]]), 2)
      >>> round(float(b.balancedness), 6)
      0.8
    """
    loads = device_loads(phy2log, logical_load, num_gpus)
    mean = loads.mean(axis=1)
    top = loads.max(axis=1)
    total_max = top.sum()
    ratio = jnp.where(total_max > 0, mean.sum() / jnp.where(total_max > 0, total_max, 1.0), 1.0)
    per_layer = jnp.where(top > 0, mean / jnp.where(top > 0, top, 1.0), 1.0)
    return Balance(mean=mean, max=top, per_layer=per_layer, balancedness=ratio)


def remote_copies(old_phy2log: jax.Array, new_phy2log: jax.Array, num_gpus: int) -> jax.Array:
    """Remote expert copies a placement change costs: per layer, the slots whose new expert is not
    held by any slot of the same device in the old placement (those must cross the network; the
    other changed slots are local copies).

    Args:
      old_phy2log: int [L, P] current placement (-1 = empty).
      new_phy2log: int [L, P] next placement (-1 = empty, costs nothing).
      num_gpus: D, a divisor of P.

    Returns:
      int32[L].

    Example:
      >>> import jax.numpy as jnp
      >>> remote_copies(jnp.array([[0, 1, 2, 3]]), jnp.array([[1, 0, 3, 0]]), 2).tolist()
      [1]
    """
    old = jnp.asarray(old_phy2log)
    new = jnp.asarray(new_phy2log)
    if old.ndim != 2 or old.shape != new.shape:
        raise ValueError(
            f"new_phy2log: expected the shape of old_phy2log {tuple(old.shape)} ([L, P]), got "
            f"{tuple(new.shape)}"
        )
    _check_map(old, "old_phy2log")
    _check_map(new, "new_phy2log")
    num_layers, num_phy = old.shape
    if num_gpus < 1 or num_phy % num_gpus:
        raise ValueError(f"num_gpus: expected a divisor of P = {num_phy}, got {num_gpus}")
    slots = num_phy // num_gpus
    o = old.reshape(num_layers, num_gpus, slots)
    n = new.reshape(num_layers, num_gpus, slots)
    held = (n[:, :, :, None] == o[:, :, None, :]).any(-1)
    return jnp.sum((n >= 0) & ~held, axis=(1, 2)).astype(jnp.int32)

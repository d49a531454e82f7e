"""Token counts: routed ids counted per expert, and int32 sums that never wrap.

Concrete counts that do not fit int32, or a sum that would pass 2^31 - 1, raise a ValueError
naming the argument; traced counts (under `jax.jit`) saturate at 2^31 - 1 instead. `dispatch`,
`EplbState.record`, `EplbState.record_ids`, the window and the step all count and add with these
functions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src import checks

__all__ = [
    "INT32_MAX",
    "as_counts",
    "check_ids",
    "check_sum",
    "check_valid",
    "count_ids",
    "readable",
    "saturating_add",
    "saturating_psum",
]

INT32_MAX = 2**31 - 1


def readable(x: Any) -> bool:
    """Whether this process can read ``x``'s values (not traced, every shard addressable)."""
    return checks.is_concrete(x) and getattr(x, "is_fully_addressable", True)


def _first_bad(name: str, a: np.ndarray, bad: np.ndarray) -> str:
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{name}{list(where)} = {int(a[where])}"


def as_counts(load: Any, shape: tuple[int, ...], letters: str, name: str = "load"):
    """Token counts as int32 that never wrap: concrete ones are checked (>= 0 and < 2^31), traced
    ones are clipped into [0, 2^31 - 1].

    Raises:
      TypeError: not an integer array. ValueError: the wrong shape, a negative count or one that
        does not fit int32, naming ``name`` and the first bad entry.
    """
    load = checks.int_array(load, name, letters)
    if tuple(load.shape) != shape:
        hint = " (pass layer= to record one layer's [E] counts)" if letters == "[L, E]" else ""
        raise ValueError(
            f"{name}: expected shape {letters} = {shape}, got {tuple(load.shape)}{hint}"
        )
    info = jnp.iinfo(load.dtype)
    if not readable(load):
        if info.min < 0:
            load = jnp.maximum(load, 0)
        if info.max > INT32_MAX:
            load = jnp.minimum(load, INT32_MAX)
        return load.astype(jnp.int32)
    a = np.asarray(load)
    if info.min < 0 and (a < 0).any():
        raise ValueError(f"{_first_bad(name, a, a < 0)}: expected token counts >= 0")
    if info.max > INT32_MAX and (a > INT32_MAX).any():
        raise ValueError(
            f"{_first_bad(name, a, a > INT32_MAX)}: expected token counts below 2^31 (they are "
            f"kept as int32); record them in smaller parts or step more often"
        )
    return jnp.asarray(a.astype(np.int32))


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` for int32 counts ``b >= 0``, saturating at 2^31 - 1 instead of wrapping."""
    return jnp.where(a > INT32_MAX - b, INT32_MAX, a + b)


def saturating_psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.psum`` of int32 counts ``x >= 0`` that saturates at 2^31 - 1 instead of wrapping.

    The counts are summed as two 16-bit halves (one psum of [2, ...]), exact for up to 2^15
    devices over ``axes``.
    """
    both = jax.lax.psum(jnp.stack([x & 0xFFFF, x >> 16]), axes)
    high = both[1] + (both[0] >> 16)
    return jnp.where(high > 0x7FFF, INT32_MAX, (high << 16) | (both[0] & 0xFFFF))


def check_sum(pass_load: jax.Array, load: jax.Array, layer: Any, name: str = "load") -> None:
    """Eagerly: raises when adding ``load`` (called ``name``) to ``pass_load`` (row ``layer``)
    would pass 2^31 - 1."""
    before = np.asarray(pass_load, np.int64)
    if layer is not None:
        before = before[int(np.asarray(layer))]
    total = before + np.asarray(load, np.int64)
    over = total > INT32_MAX
    if over.any():
        where = tuple(int(i) for i in np.argwhere(over)[0])
        row = () if layer is None else (int(np.asarray(layer)),)
        raise ValueError(
            f"{name}{list(where)} = {int(np.asarray(load)[where])}: adding it to "
            f"state.pass_load{list(row + where)} = {int(before[where])} gives {int(total[where])}, "
            f"past the int32 maximum 2^31 - 1; call jeplb.eplb_step more often (it moves the "
            f"pass into the window and resets pass_load)"
        )


def check_valid(
    valid: Any, batch: tuple[int, ...], *, shape_of: str = "topk_ids without its K axis"
) -> None:
    """Raises unless ``valid`` is None or has the tokens' shape ``batch`` (``shape_of`` says
    which array's shape that is: by default the ids without K)."""
    if valid is not None and (not hasattr(valid, "shape") or tuple(valid.shape) != batch):
        raise ValueError(
            f"valid: expected a bool mask of the tokens' shape {batch} ({shape_of}), got "
            f"{getattr(valid, 'shape', type(valid).__name__)}"
        )


def check_ids(topk_ids: Any, valid: Any, num_experts: int) -> None:
    """Raises for the first out-of-range id of a valid token (concrete values only).

    ``topk_ids`` int[..., K]; ``valid`` None or bool[...] (``topk_ids`` without its K axis)."""
    if not (checks.is_concrete(topk_ids) and (valid is None or checks.is_concrete(valid))):
        return
    ids = np.asarray(topk_ids)
    bad = (ids < 0) | (ids >= num_experts)
    if valid is not None:
        bad &= np.asarray(valid, bool)[..., None]
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"topk_ids{list(where)} = {int(ids[where])}: expected logical expert ids in "
            f"[0, num_experts = {num_experts}); mask tokens without an expert with valid="
        )


# Counters off the CPU: one row of E counters per block of this many ids, the rows then summed:
# the scatter's atomic adds spread over many counters (one row per expert took 35 us for
# 16384 x 8 ids on an H200), and few enough rows to zero and sum (58 layers' ids in rows of 8192
# took 8 us a layer on an H100, in rows of 512 under 1 us).
COUNT_BLOCK = 512


def count_ids(ids: jax.Array, num_experts: int, *, compare: bool = False) -> jax.Array:
    """int32[L, E]: how often each id occurs in each row of ``ids`` (int32[L, n], ids in [0, E];
    E is the dropped id). On the CPU one flat scatter-add; elsewhere `_count_blocked` (or, with
    ``compare``, `_count_compare`). All exact: integer adds."""
    if ids.shape[1] == 0:
        return jnp.zeros((ids.shape[0], num_experts), jnp.int32)
    other = _count_compare if compare else _count_blocked
    return lax.platform_dependent(
        ids,
        cpu=functools.partial(_count_flat, num_experts=num_experts),
        default=functools.partial(other, num_experts=num_experts),
    )


def _count_flat(ids: jax.Array, *, num_experts: int) -> jax.Array:
    """One scatter-add into L * E counters (row r's id e at r * E + e)."""
    rows = ids.shape[0]
    flat = jnp.arange(rows, dtype=jnp.int32)[:, None] * num_experts + ids
    flat = jnp.where(ids < num_experts, flat, rows * num_experts)  # dropped: out of range
    counts = jnp.zeros((rows * num_experts,), jnp.int32).at[flat].add(1, mode="drop")
    return counts.reshape(rows, num_experts)


def _count_blocked(ids: jax.Array, *, num_experts: int) -> jax.Array:
    """A scatter-add into rows of E counters, each row counting one block of ``COUNT_BLOCK`` ids
    of a row of ``ids``, then the blocks' sum per row."""
    rows, n = ids.shape
    blocks = -(-n // COUNT_BLOCK)
    grid = jnp.pad(ids, ((0, 0), (0, blocks * COUNT_BLOCK - n)), constant_values=num_experts)
    grid = grid.reshape(rows * blocks, COUNT_BLOCK)
    row = jnp.arange(rows * blocks, dtype=jnp.int32)[:, None]
    per_block = jnp.zeros((rows * blocks, num_experts), jnp.int32).at[row, grid].add(1, mode="drop")
    return per_block.reshape(rows, blocks, num_experts).sum(1, dtype=jnp.int32)


def _count_compare(ids: jax.Array, *, num_experts: int) -> jax.Array:
    """One reduction of the ids' compares with every expert (a column reduction per row)."""
    hit = ids[:, :, None] == jnp.arange(num_experts, dtype=jnp.int32)
    return jnp.sum(hit, axis=1, dtype=jnp.int32)

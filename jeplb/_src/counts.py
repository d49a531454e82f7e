"""Token counts as int32 that never wrap: the arithmetic every count in jeplb goes through.

Concrete counts that do not fit int32, or a sum that would pass 2^31 - 1, raise a ValueError
naming the argument; traced counts (under `jax.jit`) saturate at 2^31 - 1 instead. `dispatch`,
`EplbState.record`, the window and the step all add counts with these functions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src import checks

__all__ = [
    "INT32_MAX",
    "as_counts",
    "check_sum",
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


def check_sum(pass_load: jax.Array, load: jax.Array, layer: Any) -> None:
    """Eagerly: raises when adding ``load`` to ``pass_load`` (row ``layer``) would pass 2^31 - 1."""
    before = np.asarray(pass_load, np.int64)
    if layer is not None:
        before = before[int(np.asarray(layer))]
    total = before + np.asarray(load, np.int64)
    over = total > INT32_MAX
    if over.any():
        where = tuple(int(i) for i in np.argwhere(over)[0])
        row = () if layer is None else (int(np.asarray(layer)),)
        raise ValueError(
            f"load{list(where)} = {int(np.asarray(load)[where])}: adding it to "
            f"state.pass_load{list(row + where)} = {int(before[where])} gives {int(total[where])}, "
            f"past the int32 maximum 2^31 - 1; call jeplb.eplb_step more often (it moves the "
            f"pass into the window and resets pass_load)"
        )

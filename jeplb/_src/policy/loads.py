"""The loads the policy computes with: float32, finite, >= 0, each layer's proportions kept.

The policy computes in float32. Two conversions would lose a load's proportions:

* without ``jax_enable_x64``, ``jnp.asarray`` narrows int64 to int32 (values >= 2**31 wrap) and
  float64 to float32 (values past 3.4e38 become inf);
* float32 sums of loads near the top of the float32 range overflow.

So a concrete load of a 64-bit (or wider) dtype is converted here on the host (`host_load`):
integers straight to float32 (rounded, never wrapped), floating loads scaled per layer in their
own precision, then cast. In the program (`clean`), floating loads are scaled the same way: a
layer whose largest load is at or above 2**64 is multiplied by 2**-k, the smallest power of two
that brings its largest load below 2**64. Multiplying by a power of two is exact, so a scaled
layer keeps its proportions, every comparison and every tie (float32 sums and quotients of the
scaled loads are the scaled results, barring loads some 2**190 times smaller than the layer's
largest, which underflow). Layers whose loads are all below 2**64 are not touched, so ordinary loads
give bit for bit the placements they gave before scaling existed.

2**64 leaves room: a sum of E such loads, and the refinement's penalties of a few device loads,
stay far below float32's 2**128 for any E < 2**60. Integer dtypes (at most 2**64) need no scaling.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.checks import is_concrete

__all__ = ["SAFE_EXPONENT", "clean", "host_load"]

# A layer whose largest load is at or above 2**SAFE_EXPONENT is scaled down by a power of two.
SAFE_EXPONENT = 64


def _host_scale(w: np.ndarray) -> np.ndarray:
    """Each row of the finite floating ``w`` [L, E] (>= 0) scaled by a power of two below
    2**SAFE_EXPONENT where its maximum is not, in ``w``'s own precision."""
    _, exp = np.frexp(w.max(axis=1, keepdims=True))
    shift = np.maximum(exp.astype(np.int64) - SAFE_EXPONENT, 0)
    return np.where(shift > 0, np.ldexp(w, -shift), w)


def host_load(load: Any) -> Any:
    """A concrete load that ``jnp.asarray`` would narrow, as float32 numpy; anything else as given.

    Args:
      load: the [L, E] load, already checked (real dtype; when concrete, finite and >= 0).

    Returns:
      ``load`` itself when it is traced or of a dtype of at most 32 bits (the program converts
      it), else float32[L, E] numpy: integers rounded to float32, floating loads scaled per layer
      (see the module docstring) in their own precision, then rounded.
    """
    if not is_concrete(load) or np.dtype(load.dtype).itemsize <= 4:
        return load
    w = np.asarray(load)
    if np.issubdtype(w.dtype, np.integer):
        return w.astype(np.float32)
    return _host_scale(w).astype(np.float32)


def _pow2(exp: jax.Array, dtype: Any) -> jax.Array:
    """2**exp, exactly, for integer ``exp`` in a normal range of ``dtype`` (float32 or float64)."""
    if dtype == jnp.float64:
        return lax.bitcast_convert_type((exp.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return lax.bitcast_convert_type((exp.astype(jnp.int32) + 127) << 23, jnp.float32)


def clean(load: jax.Array) -> jax.Array:
    """float32[L, E] loads to compute with: NaN, infinite and negative entries become 0 (values are
    only checked eagerly), and a floating layer whose largest load is at or above 2**SAFE_EXPONENT
    is scaled down by a power of two (exact; see the module docstring).

    Args:
      load: [L, E] any real dtype.
    """
    if jnp.issubdtype(load.dtype, jnp.integer):
        w = load.astype(jnp.float32)  # at most 2**64: never inf, never wrapped
        return jnp.where(jnp.isfinite(w) & (w > 0), w, jnp.float32(0.0))
    x = load if load.dtype == jnp.float64 else load.astype(jnp.float32)  # f16, bf16: exact
    x = jnp.where(jnp.isfinite(x) & (x > 0), x, jnp.zeros((), x.dtype))
    _, exp = jnp.frexp(jnp.max(x, axis=1, keepdims=True))
    shift = jnp.maximum(exp - SAFE_EXPONENT, 0)
    x = jnp.where(shift > 0, x * _pow2(-shift, x.dtype), x)
    return x.astype(jnp.float32)

"""Row moves inside one device: the only way the transfer touches weight memory locally.

A device's share of a weight leaf is viewed as a matrix of rows: ``[L * N, R]`` (layer-major, one
row per slot, R = the product of the trailing dims). On CPU, types that XLA:CPU would widen to f32
around each move (bf16, f16, fp8) are bit-cast to the unsigned integer type of their width. Every
move is a loop of `lax.dynamic_slice` / `lax.dynamic_update_slice`
with a data-dependent trip count, which XLA keeps in place on a loop-carried buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["copy_rows", "from_rows", "to_rows"]

_UINT_BY_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


# Types XLA:CPU moves natively; others (bf16, f16, fp8) it widens to f32 around every row move,
# which costs more than one bit-cast copy of the array.
_CPU_NATIVE = frozenset(
    np.dtype(t)
    for t in [
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
    ]
)


def _bitcast_type(dtype, platform: str):
    if platform != "cpu" or np.dtype(dtype) in _CPU_NATIVE:
        return None
    return _UINT_BY_SIZE[np.dtype(dtype).itemsize]


def to_rows(x: jax.Array, lead: int, platform: str) -> jax.Array:
    """Views ``x`` (``lead`` leading dims, then the row's dims) as ``[prod(lead dims), R]``.

    On CPU, dtypes XLA:CPU does not move natively are bit-cast to the unsigned type of their width.
    """
    flat = x.reshape((int(np.prod(x.shape[:lead])), -1) if x.ndim > lead else (-1, 1))
    target = _bitcast_type(x.dtype, platform)
    return flat if target is None else lax.bitcast_convert_type(flat, target)


def from_rows(rows: jax.Array, like_shape: tuple[int, ...], dtype) -> jax.Array:
    """Inverse of `to_rows`: the rows back in ``like_shape`` and ``dtype``."""
    if rows.dtype != dtype:
        rows = lax.bitcast_convert_type(rows, dtype)
    return rows.reshape(like_shape)


def copy_rows(
    dst: jax.Array,
    src: jax.Array,
    dst_idx: jax.Array,
    src_idx: jax.Array,
    count: jax.Array,
    *,
    dst_offset: jax.Array | int = 0,
    src_offset: jax.Array | int = 0,
) -> jax.Array:
    """``dst[dst_offset + dst_idx[k]] = src[src_offset + src_idx[k]]`` for ``k < count``.

    Args:
      dst: uint[M, R] rows written.
      src: uint[M', R] rows read (may be ``dst`` itself only when no source row is also written).
      dst_idx: int32[K] destination rows; only the first ``count`` are used.
      src_idx: int32[K] source rows.
      count: int32[] number of rows to move.
      dst_offset: added to every destination index (e.g. ``layer * N``).
      src_offset: added to every source index.

    Returns:
      ``dst`` with the rows written.
    """
    width = dst.shape[1]

    def body(k, out):
        r = lax.dynamic_slice(src, (src_offset + src_idx[k], 0), (1, width))
        return lax.dynamic_update_slice(out, r, (dst_offset + dst_idx[k], 0))

    return lax.fori_loop(0, count, body, dst)

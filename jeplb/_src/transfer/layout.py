"""How one weight leaf is addressed as rows, and how its bits move on a platform.

A device's share of a leaf is [L, N, ...] (layer-major) or [N, L, ...] (slot-major). Either way
it is a matrix of rows ``[L * N, R]`` (R = the product of the trailing dims) in which the row of
(layer l, local slot n) is ``l * layer_stride + n * slot_stride``: (N, 1) layer-major, (1, L)
slot-major. The reshape is free, so rows move in place in the leaf's own buffer.

Rows travel (staging buffers, collective chunks) in a *moving* dtype, and are written back into
the leaf in one of two ways:

* ``native``: the dtype moves as it is (everything on GPUs and TPUs but sub-byte types; f32,
  integers on XLA:CPU); rows are written with dynamic_update_slice, in place.
* ``bits``: XLA:CPU runs a dynamic_update_slice of bf16, f16 and fp8 through f32, over the whole
  leaf, with a copy inside a loop. Their rows travel as the unsigned integer of their width (read
  with dynamic_slice, exact, then bit-cast), and are written into the leaf with a one-row select,
  run on the integer view of the leaf's bits, which fuses in place and keeps every bit pattern
  (NaN payloads, subnormals); a layer's block is read once, gathered into the moving dtype (a
  slab).
* ``widen``: sub-byte types (int4, uint4, float4_e2m1fn, int2, uint2) cannot be bit-cast to a
  byte type; their rows travel as uint8, one element a byte, and are written with the one-row
  select.

No leaf is ever converted whole: that would be a full copy of the device's weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "RowSpace",
    "bits_dtype",
    "bits_view",
    "close_rows",
    "convert_rows",
    "dims",
    "leaf_mode",
    "moving_dtype",
    "open_rows",
]

_UINT_BY_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}
# Sub-byte types a MoE stack ships (4-bit weights with block scales as separate leaves; 2-bit
# integer weights). Other sub-byte types (int1, uint1, float6_*) are refused by the leaf check.
SUB_BYTE = ("int4", "uint4", "float4_e2m1fn", "int2", "uint2")
# Types XLA:CPU moves natively with dynamic_slice / dynamic_update_slice.
_CPU_NATIVE = ("float32", "float64", "int8", "int16", "int32", "int64")
_CPU_NATIVE += ("uint8", "uint16", "uint32", "uint64")


def leaf_mode(dtype, platform: str) -> str:
    """``native``, ``bits`` or ``widen``: how rows of ``dtype`` move on ``platform``."""
    name = np.dtype(dtype).name
    if name in SUB_BYTE:
        return "widen"
    if platform == "cpu" and name not in _CPU_NATIVE:
        return "bits"
    return "native"


def _widen(x: jax.Array) -> jax.Array:
    """Sub-byte rows as uint8, one element a byte (signed ones: their two's-complement bits, e.g.
    int4 -1 as 15)."""
    name = np.dtype(x.dtype).name
    if name.startswith("float"):  # float4_e2m1fn: its bits as uint4
        x = lax.bitcast_convert_type(x, jnp.uint4)
    if name.startswith("int"):
        low = jnp.uint8((1 << jnp.iinfo(x.dtype).bits) - 1)
        return lax.bitcast_convert_type(x.astype(jnp.int8), jnp.uint8) & low
    return x.astype(jnp.uint8)


def _narrow(x: jax.Array, dtype: np.dtype) -> jax.Array:
    """Inverse of `_widen`: uint8 rows back in the sub-byte ``dtype``, bit for bit."""
    name = np.dtype(dtype).name
    if name.startswith("int"):  # the low bits back to a signed value (int4: 0..15 to -8..7)
        sign = jnp.int8(1 << (jnp.iinfo(dtype).bits - 1))
        return ((lax.bitcast_convert_type(x, jnp.int8) ^ sign) - sign).astype(dtype)
    if name.startswith("float"):
        return lax.bitcast_convert_type(x.astype(jnp.uint4), dtype)
    return x.astype(dtype)


def bits_dtype(dtype) -> np.dtype:
    """The unsigned integer dtype holding ``dtype``'s bits (uint8 for sub-byte types)."""
    dtype = np.dtype(dtype)
    return (
        np.dtype(jnp.uint8) if dtype.name in SUB_BYTE else np.dtype(_UINT_BY_SIZE[dtype.itemsize])
    )


def bits_view(x: jax.Array) -> jax.Array:
    """``x`` as the unsigned integers of its bits (`bits_dtype`). Slice or gather a dtype that
    does not move natively only through this view: XLA:CPU runs a slice of bf16 through f32, which
    loses NaN payloads and subnormals, while the conversion fuses into the slice."""
    return convert_rows(x, bits_dtype(x.dtype))


def moving_dtype(dtype, platform: str) -> np.dtype:
    """The dtype rows of ``dtype`` travel in on ``platform``: their bits unless they move
    natively there."""
    native = leaf_mode(dtype, platform) == "native"
    return np.dtype(dtype) if native else bits_dtype(dtype)


def convert_rows(x: jax.Array, dtype) -> jax.Array:
    """Rows between a leaf's dtype and its moving dtype, either way, bit for bit."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if dtype.name in SUB_BYTE:
        return _narrow(x, dtype)
    if np.dtype(x.dtype).name in SUB_BYTE:
        return _widen(x)
    if dtype.itemsize != np.dtype(x.dtype).itemsize:
        raise TypeError(f"cannot move rows of {x.dtype} as {dtype}")
    return lax.bitcast_convert_type(x, dtype)


@dataclasses.dataclass(frozen=True)
class RowView:
    """Rows of one layer's block of columns inside a matrix of rows.

    Attributes:
      rows: [M, R] the matrix.
      base: int32[] row of local slot 0 of the layer.
      stride: rows between consecutive local slots.
      col: first column of the block (an int, or int32[] when the column passes run as a loop).
    """

    rows: jax.Array
    base: jax.Array | int
    stride: int
    col: jax.Array | int

    def index(self, slots: jax.Array) -> jax.Array:
        """Local slot ids -> rows of ``self.rows`` (negative ids stay negative)."""
        return jnp.where(slots >= 0, slots * self.stride, -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RowSpace:
    """One leaf opened at one layer and one block of columns.

    Attributes:
      dst: where moved rows are written: the leaf's own rows (a free reshape).
      src: where rows are read: the same rows when the dtype moves natively, else the layer's
        block gathered once into the moving dtype (a slab [N, width]; a loop reading the leaf
        before the one-row selects write it would make XLA:CPU copy the whole leaf).
      width: columns moved.
    """

    dst: RowView
    src: RowView
    width: int


def dims(x: jax.Array, slot_major: bool) -> tuple[int, int, int]:
    """(L, N, R) of a local leaf [L, N, ...] (or [N, L, ...] slot-major)."""
    lead = (x.shape[1], x.shape[0]) if slot_major else (x.shape[0], x.shape[1])
    return lead[0], lead[1], int(np.prod(x.shape[2:], dtype=np.int64))


def open_rows(
    x: jax.Array,
    layer: jax.Array,
    col: jax.Array | int,
    width: int,
    *,
    slot_major: bool,
    platform: str,
) -> RowSpace:
    """The columns ``[col, col + width)`` of layer ``layer`` of a local leaf, as rows."""
    num_layers, n, r = dims(x, slot_major)
    rows = x.reshape(num_layers * n, r)
    layer = jnp.asarray(layer, jnp.int32)
    base, stride = (layer, num_layers) if slot_major else (layer * n, 1)
    dst = RowView(rows, base, stride, col)
    if leaf_mode(x.dtype, platform) == "native":
        return RowSpace(dst, dst, width)
    slots = dst.base + jnp.arange(n, dtype=jnp.int32) * dst.stride
    cols = col + jnp.arange(width, dtype=jnp.int32)
    slab = bits_view(rows)[slots[:, None], cols[None, :]]
    return RowSpace(dst, RowView(slab, 0, 1, 0), width)


def close_rows(x: jax.Array, space: RowSpace) -> jax.Array:
    """The leaf back from its rows (a free reshape)."""
    return space.dst.rows.reshape(x.shape)

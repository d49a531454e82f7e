"""Row moves inside one device: the only way the transfer touches weight memory locally.

Rows are those of a `layout.RowSpace` (a leaf viewed as ``[L * N, R]``, or a converted slab).
`copy_rows` moves a list of rows between two buffers: a loop of `lax.dynamic_slice` /
`lax.dynamic_update_slice` with a data-dependent trip count, which XLA keeps in place on a
loop-carried buffer, or a Pallas kernel on GPUs, or an XLA gather + scatter.

This module owns every rule about the movers: which one the user's ``row_impl`` stands for on a
platform and for which rows (`Movers`, resolving to a `Mover`), and what each can move (its
``problems``). Nothing else compares ``row_impl`` strings; a new mover is one `Mover` member,
its rules here and its executor (`copy_rows`, and `inplace.apply_moves` for one device).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer import layout
from jeplb._src.validate import check_choice

__all__ = [
    "ROW_IMPLS",
    "Mover",
    "Movers",
    "copy_rows",
    "direct_block",
    "direct_refusal",
    "make_varying",
    "pallas_block",
    "pallas_refusal",
    "resolve_impl",
    "varying_axes",
]

# What a user may ask for as ``row_impl`` (`TransferConfig`); `Movers` resolves it to a `Mover`.
ROW_IMPLS = ("auto", "loop", "pallas", "scatter")

_PALLAS_MIN_ROW_BYTES = 1 << 16
_PALLAS_MAX_BLOCK = 1 << 14
_PALLAS_MAX_ELEMENTS = 1 << 31


def pallas_block(width: int) -> int:
    """Largest power of two <= 16384 elements dividing the row (0 when below 1024)."""
    block = 1
    while block < _PALLAS_MAX_BLOCK and width % (block * 2) == 0:
        block *= 2
    return block if block >= 1024 else 0


def pallas_refusal(width: int) -> str | None:
    """Why the row kernel cannot move rows (or column blocks) of ``width`` elements, or None."""
    if pallas_block(width):
        return None
    return f"row_impl='pallas' needs rows of a multiple of 1024 elements, got {width} elements"


class Mover(enum.StrEnum):
    """A resolved row mover: what `copy_rows` (and, but for ``select`` and ``scatter``,
    `inplace.apply_moves` on one device) runs.

    Members compare equal to their names (``Mover.LOOP == "loop"``).
    """

    LOOP = "loop"  # a loop of dynamic_update_slice, any backend
    SELECT = "select"  # the loop, writing each row with a one-row select (non-native dtypes)
    PALLAS = "pallas"  # the Pallas row kernel (GPUs; interpreted on CPU)
    SCATTER = "scatter"  # an XLA gather + scatter (no ordered in-place form)

    @property
    def kernel(self) -> bool:
        """The Pallas row kernel."""
        return self is Mover.PALLAS

    def problems(self, width: int) -> str | None:
        """Why this mover cannot move rows (or column blocks) of ``width`` elements, or None."""
        return pallas_refusal(width) if self.kernel else None

    def block_problems(self, width: int, block: int, *, passes: int, fit: int) -> str | None:
        """Why this mover cannot move a leaf of rows of ``width`` elements staged in column
        blocks of ``block`` (``passes`` blocks; ``fit``: the largest count that would do), with
        the fix; None when it can."""
        if not self.problems(block):
            return None
        why, fix = self.problems(width), "row_impl='loop'"
        if not why:  # whole rows would do: the pass count cuts them too fine
            why = (
                f"row_impl='pallas' needs blocks of a multiple of 1024 elements, but "
                f"staging_passes={passes} cuts its rows of {width} elements into blocks of "
                f"{block}"
            )
            fix = f"staging_passes={fit} or {fix}"
        return f"{why}; pass {fix}"


def triton_lowering() -> bool:
    """Whether this jax lowers Pallas GPU kernels through Triton, which the library's GPU kernels
    (row moves, the replica sum, the balanced choice) are written for. Where it lowers them to
    Mosaic GPU instead (``jax_pallas_use_mosaic_gpu``, the default of some jax versions) they
    would not lower: the ``auto`` choices then take XLA's forms."""
    return not bool(getattr(jax.config, "jax_pallas_use_mosaic_gpu", False))


def resolve_impl(impl: str, dst: jax.Array, platform: str) -> Mover:
    """The row mover ``impl`` stands for on ``platform`` for rows written into ``dst``.

    ``auto``: a Pallas kernel on GPUs for rows of at least 64 KiB (where Pallas lowers through
    Triton, `triton_lowering`), else the loop. Whatever was
    asked, rows of a dtype that does not move natively there (see `layout`) are written with the
    one-row ``select``.
    """
    check_choice("row_impl", impl, ROW_IMPLS)
    if layout.leaf_mode(dst.dtype, platform) != "native":
        return Mover.SELECT
    if impl != "auto":
        return Mover(impl)
    width = dst.shape[1]
    big = width * np.dtype(dst.dtype).itemsize >= _PALLAS_MIN_ROW_BYTES
    kernel = platform == "gpu" and big and pallas_block(width) and triton_lowering()
    return Mover.PALLAS if kernel else Mover.LOOP


# The in-place (one-device) kernel's limits: rows of whole blocks of 512 32-bit words.
_DIRECT_MAX_BLOCK = 1 << 13
_DIRECT_MIN_BLOCK = 1 << 9
_DIRECT_TARGET_PROGRAMS = 1 << 12


def direct_block(width: int, num_layers: int) -> int:
    """Elements of a row each program of the in-place kernel moves: a power of two dividing the
    row, at most 8192, small enough that the grid has about 4096 programs (each runs its layer's
    moves in order), and at least 512; 0 when the row has no such divisor."""
    block = 1
    while block < _DIRECT_MAX_BLOCK and width % (block * 2) == 0:
        block *= 2
    while block > _DIRECT_MIN_BLOCK and num_layers * (width // block) < _DIRECT_TARGET_PROGRAMS:
        block //= 2
    return block if block >= _DIRECT_MIN_BLOCK else 0


def packed_words(width: int, dtype) -> bool:
    """Rows of ``width`` elements of ``dtype`` move through the kernels as 32-bit words."""
    size = np.dtype(dtype).itemsize
    return size < 4 and (width * size) % 4 == 0


def direct_refusal(n: int, width: int, dtype) -> str | None:
    """Why the in-place kernel (`inplace.apply_moves` with the kernel) cannot move layers of
    ``n`` rows of ``width`` elements of ``dtype`` (rows of a multiple of 512 32-bit words, a
    layer below 2^31 of them), or None."""
    words = width * np.dtype(dtype).itemsize // 4 if packed_words(width, dtype) else width
    if not direct_block(words, 1):
        return (
            f"row_impl='pallas' needs rows of a multiple of {_DIRECT_MIN_BLOCK} 32-bit words, "
            f"got {width} elements of {np.dtype(dtype)}"
        )
    if n * words >= 2**31:
        return (
            f"row_impl='pallas': one layer holds {n} x {words} words, over the kernel's 2^31 "
            f"offsets"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Movers:
    """The user's ``row_impl`` on a platform: which `Mover` moves which rows, and what it can't.

    Attributes:
      row_impl: the option (one of ``ROW_IMPLS``; checked).
      platform: the platform of the mesh's devices (``cpu``, ``gpu``, ``tpu``).
    """

    row_impl: str
    platform: str

    def __post_init__(self):
        check_choice("row_impl", self.row_impl, ROW_IMPLS)

    def for_rows(self, dst) -> Mover:
        """The mover writing rows into ``dst`` ([M, R], an array or a shape); `resolve_impl`."""
        return resolve_impl(self.row_impl, dst, self.platform)

    def direct(self, rows) -> Mover | None:
        """The in-place executor of a one-device leaf's rows [L * N, R]: `for_rows`, except that
        ``auto`` takes the loop where the in-place kernel cannot move the rows; None for
        ``scatter``, which has no ordered form, and for dtypes that do not move natively (the
        engine stages instead)."""
        chosen = self.for_rows(rows)
        if chosen is Mover.SELECT:
            # Dtypes that do not move natively (bf16 and fp8 on the CPU, sub-byte types
            # anywhere) are staged, read through their bits: the loop reads each row with a
            # dynamic slice, which XLA:CPU runs through f32 for bf16 and fp8 (NaN payloads lost).
            return None
        if (
            self.row_impl == "auto"
            and chosen.kernel
            and direct_refusal(1, rows.shape[1], rows.dtype)
        ):
            return Mover.LOOP  # e.g. fp8 rows of 1024 x an odd number of elements: not whole words
        return None if chosen is Mover.SCATTER else chosen

    def direct_problems(self, n: int, width: int, dtype) -> str | None:
        """Why the in-place executor cannot move layers of ``n`` rows of ``width`` elements of
        ``dtype``, with the fix; None when it can (or when the engine stages them instead)."""
        mover = self.direct(jax.ShapeDtypeStruct((n, width), dtype))
        why = mover is not None and mover.kernel and direct_refusal(n, width, dtype)
        return f"{why}; pass row_impl='loop'" if why else None

    def rows_problems(self, rows) -> str | None:
        """Why the mover for ``rows`` ([M, R]) cannot move them whole, with the fix; or None."""
        why = self.for_rows(rows).problems(rows.shape[1])
        return f"{why}; pass row_impl='loop'" if why else None

    @property
    def kernel_requested(self) -> bool:
        """The user asked for the Pallas kernel by name."""
        return self.row_impl == "pallas"

    @property
    def kernel_preferred(self) -> bool:
        """A kernel of the platform is wanted where it fits (asked for, or ``auto`` on GPUs whose
        Pallas lowers through Triton); for the one-device replica sum (`replica_sum`)."""
        auto = self.row_impl == "auto" and self.platform == "gpu" and triton_lowering()
        return self.kernel_requested or auto

    @property
    def interpreted(self) -> bool:
        """The kernel runs in the Pallas interpreter (asked for on CPU), which does not type its
        grid indices for `jax.shard_map`: programs turn ``check_vma`` off."""
        return self.kernel_requested and self.platform == "cpu"

    @property
    def granule(self) -> int:
        """Columns a default column pass must split rows into multiples of (the kernel's 1024)."""
        return 1024 if self.kernel_requested else 1


def varying_axes(x: jax.Array) -> frozenset:
    """The shard_map manual axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def make_varying(x: jax.Array, axes) -> jax.Array:
    """``x`` marked as varying over ``axes`` too (shard_map's type system); a no-op if it is."""
    missing = tuple(sorted(set(axes) - varying_axes(x)))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)


def vary_alike(*args: jax.Array) -> list[jax.Array]:
    """``args`` each marked as varying over every shard_map axis any of them varies over: a
    Pallas kernel inside shard_map needs its operands alike (usually the ids vary and the maps
    are replicated); its outputs then vary like them."""
    axes = frozenset().union(*(varying_axes(a) for a in args))
    return [make_varying(a, axes) for a in args]


def _like(x: jax.Array) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct of ``x`` that keeps how it varies over shard_map's manual axes."""
    aval = jax.typeof(x)
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    for name in ("manual_axis_type", "vma"):
        value = getattr(aval, name, None)
        if name in params and value is not None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, **{name: value})
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def words(rows: jax.Array) -> jax.Array:
    """``rows`` [M, R] of a 1- or 2-byte type as 32-bit words [M, R * itemsize / 4]."""
    grouped = rows.reshape(rows.shape[0], -1, 4 // rows.dtype.itemsize)
    return lax.bitcast_convert_type(grouped, jnp.uint32)


def unwords(w: jax.Array, like: jax.Array) -> jax.Array:
    """Inverse of `words`: the words back as ``like``'s dtype and shape."""
    return lax.bitcast_convert_type(w, like.dtype).reshape(like.shape)


def _copy_rows_pallas(
    dst, src, dst_idx, src_idx, count, dst_offset, src_offset, dst_col, src_col, width, interpret
):
    """One Pallas program per (row, block of the row): reads the block once, writes it once, in
    place in ``dst`` (aliased), skipping rows at or past ``count``."""
    from jax.experimental import pallas as pl

    num_rows = dst_idx.shape[0]
    block = pallas_block(width)
    if not block:  # the public functions refuse such leaves first, by path (`engine.leaf_problems`)
        raise ValueError(pallas_refusal(width))

    def kernel(didx_ref, sidx_ref, scalars_ref, src_ref, _dst_in_ref, dst_ref):
        k = pl.program_id(0)
        off = pl.multiple_of(pl.program_id(1) * block, block)

        @pl.when(k < scalars_ref[0])
        def _():
            s = sidx_ref[k] + scalars_ref[2]
            d = didx_ref[k] + scalars_ref[1]
            # Column offsets are multiples of the block (a pass's block of a row), which keeps
            # the loads and stores aligned and vectorised.
            dcol = pl.multiple_of(scalars_ref[3] + off, block)
            scol = pl.multiple_of(scalars_ref[4] + off, block)
            dst_ref[d, pl.ds(dcol, block)] = src_ref[s, pl.ds(scol, block)]

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scalars = jnp.stack(
        [
            jnp.asarray(count, jnp.int32),
            jnp.asarray(dst_offset, jnp.int32),
            jnp.asarray(src_offset, jnp.int32),
            jnp.asarray(dst_col, jnp.int32),
            jnp.asarray(src_col, jnp.int32),
        ]
    )
    axes = varying_axes(dst) | varying_axes(src)
    args = [dst_idx.astype(jnp.int32), src_idx.astype(jnp.int32), scalars, src, dst]
    args = [make_varying(a, axes) for a in args]
    return pl.pallas_call(
        kernel,
        out_shape=_like(args[4]),
        grid=(num_rows, width // block),
        input_output_aliases={4: 0},
        interpret=interpret,
    )(*args)


def copy_rows(
    dst: jax.Array,
    src: jax.Array,
    dst_idx: jax.Array,
    src_idx: jax.Array,
    count: jax.Array,
    *,
    dst_offset: jax.Array | int = 0,
    src_offset: jax.Array | int = 0,
    dst_col: jax.Array | int = 0,
    src_col: jax.Array | int = 0,
    impl: Mover | str = Mover.LOOP,
    interpret: bool | None = None,
) -> jax.Array:
    """``dst[dst_offset + dst_idx[k], dst_col:][:w] = src[src_offset + src_idx[k], src_col:][:w]``
    for ``k < count``, where ``w`` is the narrower of the two widths (a block of columns when the
    transfer runs in several column passes; whole rows otherwise).

    Args:
      dst: [M, R] rows written.
      src: [M', R'] rows read (R' = R, or one of R and R' is a column block of the other); a
        different buffer from ``dst`` (the transfer always copies between the weights and the
        staging buffer), so a row is read once and written once. Its dtype is ``dst``'s, or
        one side is a leaf's dtype and the other its moving dtype (`layout.moving_dtype`): rows
        are converted bit for bit on the way.
      dst_idx: int32[K] destination rows; only the first ``count`` are used.
      src_idx: int32[K] source rows.
      count: int32[] number of rows to move (0 <= count <= K).
      dst_offset: added to every destination index (e.g. ``layer * N``).
      src_offset: added to every source index.
      dst_col: first column written in each destination row.
      src_col: first column read in each source row.
      impl: ``loop`` (a while loop of dynamic_update_slice, any backend), ``select`` (the loop,
        writing each row with a one-row select: dtypes that do not move natively), ``pallas`` (a Pallas
        kernel, GPUs; rows of a multiple of 1024 elements; buffers of 2^31 elements or more
        take the loop, as the kernel's offsets are 32-bit), ``scatter`` (XLA gather + scatter),
        or ``auto`` (resolved by `resolve_impl`; callers normally pass the resolved name).
      interpret: run the Pallas kernel in interpret mode; None: only on the CPU backend, so
        ``impl="pallas"`` runs (slowly) on CPU with the same semantics.

    Returns:
      ``dst`` with the rows written.
    """
    width = min(dst.shape[1], src.shape[1])
    if impl == "auto":
        impl = Mover.LOOP
    if impl not in Mover.__members__.values():
        raise ValueError(f"impl: expected one of {ROW_IMPLS}, got {impl!r}")
    impl = Mover(impl)
    if impl.kernel and dst.dtype == src.dtype:
        out = _copy_rows_pallas_words(
            dst,
            src,
            dst_idx,
            src_idx,
            count,
            dst_offset,
            src_offset,
            dst_col,
            src_col,
            width,
            interpret,
        )
        if out is not None:
            return out
        impl = Mover.LOOP
    if impl is Mover.SCATTER and dst.dtype == src.dtype:
        return _copy_rows_scatter(
            dst, src, dst_idx, src_idx, count, dst_offset, src_offset, dst_col, src_col, width
        )
    select = impl is Mover.SELECT
    if src.dtype != dst.dtype and not select:
        # Reading a leaf that does not move natively into its moving dtype: one gather of the
        # rows, not a loop over the leaf (a loop reading the leaf before a loop of selects writes
        # it makes XLA:CPU copy the whole leaf).
        src = gather_rows(src, src_offset + src_idx, src_col, width, dst.dtype)
        src_offset, src_idx, src_col = 0, jnp.arange(src.shape[0], dtype=jnp.int32), 0

    # Through the bits view where a dtype may not move natively (see `layout.bits_view`).
    read_from = layout.bits_view(src) if select else src

    def body(k, out):
        r = lax.dynamic_slice(read_from, _i32(src_offset + src_idx[k], src_col), (1, width))
        if select:
            return write_row_select(out, r, dst_offset + dst_idx[k], dst_col)
        r = layout.convert_rows(r, dst.dtype)
        return lax.dynamic_update_slice(out, r, _i32(dst_offset + dst_idx[k], dst_col))

    return lax.fori_loop(0, count, body, dst)


def _i32(*starts) -> tuple[jax.Array, ...]:
    """Slice starts as int32 (with jax_enable_x64, Python ints would mix int32 and int64)."""
    return tuple(jnp.asarray(s, jnp.int32) for s in starts)


def gather_rows(src: jax.Array, rows: jax.Array, col, width: int, dtype) -> jax.Array:
    """``src[rows, col:col + width]`` converted to ``dtype`` (`layout.convert_rows`), gathered
    through the bits view; rows out of range are clipped (callers never use them)."""
    rows = jnp.clip(rows, 0, src.shape[0] - 1)
    src = layout.bits_view(src)
    if width == src.shape[1]:
        block = src[rows]
    else:
        cols = jnp.asarray(col, jnp.int32) + jnp.arange(width, dtype=jnp.int32)
        block = src[rows[:, None], cols[None, :]]
    return layout.convert_rows(block, dtype)


def write_row_select(dst: jax.Array, row: jax.Array, at: jax.Array, col) -> jax.Array:
    """``dst[at, col:col + w] = row`` (row [1, w]) as one select over ``dst``'s bits.

    For dtypes whose dynamic_update_slice XLA:CPU would run through f32 over the whole array
    (bf16, fp8: NaN payloads and subnormals lost, and a copy inside loops): the select runs on
    the unsigned integer view (sub-byte types: uint8), and the conversions fuse with it in place.
    """
    num_rows, width = dst.shape
    bits = layout.bits_view(dst)
    row = layout.convert_rows(layout.bits_view(row), bits.dtype)
    w = row.shape[1]
    mask = (jnp.arange(num_rows) == at)[:, None]
    if w != width:
        row = lax.dynamic_update_slice(jnp.zeros((1, width), bits.dtype), row, _i32(0, col))
        cols = jnp.arange(width)
        mask = mask & ((cols >= col) & (cols < col + w))
    return layout.convert_rows(jnp.where(mask, row, bits), dst.dtype)


def _copy_rows_scatter(
    dst, src, dst_idx, src_idx, count, dst_offset, src_offset, dst_col, src_col, width
):
    """XLA gather + scatter (rows of one dtype)."""
    k = jnp.arange(dst_idx.shape[0])
    block = lax.dynamic_slice_in_dim(src, src_col, width, axis=1)
    rows = block[jnp.clip(src_offset + src_idx, 0, src.shape[0] - 1)]
    target = jnp.where(k < count, dst_offset + dst_idx, dst.shape[0])
    if width == dst.shape[1]:
        return dst.at[target].set(rows, mode="drop")
    block = lax.dynamic_slice_in_dim(dst, dst_col, width, axis=1)
    block = block.at[target].set(rows, mode="drop")
    return lax.dynamic_update_slice_in_dim(dst, block, dst_col, axis=1)


def _copy_rows_pallas_words(
    dst, src, dst_idx, src_idx, count, dst_offset, src_offset, dst_col, src_col, width, interpret
):
    """The Pallas kernel on 32-bit words where the rows allow; None when the buffers are too
    large for its 32-bit offsets (the caller takes the loop)."""
    size = dst.dtype.itemsize
    per = 4 // size if size < 4 and (width * size) % 4 == 0 else 1
    if per > 1 and not pallas_block(width // per):
        per = 1
    dst_w, src_w = (words(dst), words(src)) if per > 1 else (dst, src)
    if max(dst_w.size, src_w.size) >= _PALLAS_MAX_ELEMENTS:
        return None
    out = _copy_rows_pallas(
        dst_w,
        src_w,
        dst_idx,
        src_idx,
        count,
        dst_offset,
        src_offset,
        jnp.asarray(dst_col, jnp.int32) // per,
        jnp.asarray(src_col, jnp.int32) // per,
        width // per,
        interpret,
    )
    return unwords(out, dst) if per > 1 else out

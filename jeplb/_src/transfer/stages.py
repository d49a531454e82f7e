"""The transfer's two stages for one layer, on rows: stage (local copies + rotation rounds), commit.

Rows cross devices only through `lax.ppermute`: one rotation round per static shift s (device i
sends to i + s mod D), each running a data-dependent number of chunks of C rows that every device
computes identically from the replicated maps. All rounds are one loop over the layer's chunks,
whose exchange is a `lax.switch` over the shifts, and every leaf's rows of a chunk travel packed
in one byte buffer: the row moves are compiled once, and the program holds one collective per
shift, whatever the number of leaves. Received rows and local copies land in a staging
buffer; the commit then writes them into the weights, and duplicates take their primary's staged
row. The stages read and write `layout.RowSpace`s, so they serve whole leaves, slabs and column
blocks alike; the engine (`engine`) and the public one-layer stages (`move_to_buffer`,
`move_from_buffer`) are their only callers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer import layout
from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.layout import RowSpace

__all__ = [
    "Impls",
    "Rounds",
    "commit",
    "pack_bytes",
    "ragged_unavailable",
    "stage",
    "stage_ragged_all_to_all",
    "unpack_bytes",
]


class Impls(NamedTuple):
    """How rows of one leaf are written: into the leaf, and into staging buffers and chunks (see
    `rows.resolve_impl`)."""

    leaf: str
    buffer: str


@dataclasses.dataclass(frozen=True)
class Rounds:
    """One device's rotation rounds of one layer (from `plan.local_metadata`).

    Attributes:
      send_rows: int32[D, W]. Local slot sent as the j-th row of round s; -1 pads.
      recv_rows: int32[D, W]. Buffer row the j-th row of round s is staged in; -1 pads.
      num_chunks: int32[D]. Chunks of C rows in round s (0 for s = 0).
    """

    send_rows: jax.Array
    recv_rows: jax.Array
    num_chunks: jax.Array


def _local_copies(spaces, bufs, meta, impls):
    """Copies the rows this device already holds into the buffers."""
    n = bufs[0].shape[0]
    local = meta.local_src_rows >= 0
    dst = plan_lib.pack(local, jnp.arange(n, dtype=jnp.int32))
    src = plan_lib.pack(local, meta.local_src_rows)
    count = local.sum()
    return tuple(
        rows_lib.copy_rows(
            b,
            s.src.rows,
            dst,
            s.src.index(src),
            count,
            src_offset=s.src.base,
            src_col=s.src.col,
            impl=i.buffer,
        )
        for b, s, i in zip(bufs, spaces, impls, strict=True)
    )


def pack_bytes(parts: tuple[jax.Array, ...]) -> jax.Array:
    """Rows of several buffers ([C, w_i] each, any dtypes) as one byte buffer [C, sum of bytes].

    One collective then carries every leaf's rows: the collective count does not grow with the
    number of leaves. Bit for bit (a bitcast, no conversion).
    """
    return jnp.concatenate([_as_bytes(x) for x in parts], axis=1)


def unpack_bytes(packed: jax.Array, likes: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Inverse of `pack_bytes`: the byte buffer [C, B] back as buffers shaped like ``likes``."""
    out, at = [], 0
    for like in likes:
        size = like.shape[1] * np.dtype(like.dtype).itemsize
        part = lax.slice_in_dim(packed, at, at + size, axis=1)
        at += size
        if np.dtype(like.dtype).itemsize > 1:
            part = part.reshape(like.shape[0], like.shape[1], np.dtype(like.dtype).itemsize)
        out.append(lax.bitcast_convert_type(part, like.dtype))
    return tuple(out)


def _as_bytes(x: jax.Array) -> jax.Array:
    """[C, w] rows of a byte-sized-or-wider dtype as uint8 [C, w * itemsize]."""
    if x.dtype == jnp.uint8:
        return x
    return lax.bitcast_convert_type(x, jnp.uint8).reshape(x.shape[0], -1)


def _packable(x: jax.Array) -> bool:
    """Rows of ``x``'s dtype can be bit-cast to bytes (not sub-byte types, not bool)."""
    name = np.dtype(x.dtype).name
    return name not in layout.SUB_BYTE and name != "bool"


def _exchange(payload: tuple[jax.Array, ...], branches, index) -> tuple[jax.Array, ...]:
    """``payload`` through ``branches[index]`` (each one `lax.ppermute`): the buffers that can be
    bit-cast travel as one byte buffer (a single collective), any others (sub-byte rows staged in
    their own dtype by `jeplb.move_to_buffer`) beside it in the same call."""
    packed = [i for i, x in enumerate(payload) if _packable(x)]
    if len(packed) < 2:
        return tuple(lax.switch(index, branches, payload))
    rest = [i for i in range(len(payload)) if i not in packed]
    parts = tuple(payload[i] for i in packed)
    got_packed, got_rest = lax.switch(
        index, branches, (pack_bytes(parts), tuple(payload[i] for i in rest))
    )
    out = dict(zip(packed, unpack_bytes(got_packed, parts), strict=True))
    out.update(zip(rest, got_rest, strict=True))
    return tuple(out[i] for i in range(len(payload)))


def _rounds(spaces, bufs, rounds, *, axes, num_devices, chunk_rows, impls):
    """Every rotation round, as ONE loop over the layer's chunks (all shifts in turn).

    Chunk g belongs to the first shift s whose running chunk count passes g; its rows are read,
    packed, sent from device i to i + s (mod D) and staged. The collective's permutation must be
    static, so the exchange is a `lax.switch` over the D - 1 shifts whose branches hold nothing
    but one `lax.ppermute` each: the row reads and writes are compiled once, not once per shift.
    Every device computes the same s from the replicated plan, so every device takes the same
    branch.
    """
    c = chunk_rows
    lanes = jnp.arange(c, dtype=jnp.int32)
    ends = jnp.cumsum(rounds.num_chunks).astype(jnp.int32)  # ends[0] = 0: no shift-0 round
    branches = [
        functools.partial(
            lax.ppermute,
            axis_name=axes,
            perm=[(i, (i + t) % num_devices) for i in range(num_devices)],
        )
        for t in range(1, num_devices)
    ]

    def chunk(g, bufs):
        shift = jnp.sum(ends <= g).astype(jnp.int32)
        k = g - (ends[shift] - rounds.num_chunks[shift])
        send = lax.dynamic_index_in_dim(rounds.send_rows, shift, keepdims=False)
        recv = lax.dynamic_index_in_dim(rounds.recv_rows, shift, keepdims=False)
        sidx = lax.dynamic_slice_in_dim(send, k * c, c)
        ridx = lax.dynamic_slice_in_dim(recv, k * c, c)
        payload = tuple(
            rows_lib.copy_rows(
                rows_lib.make_varying(
                    jnp.zeros((c, b.shape[1]), b.dtype), set(axes) | rows_lib.varying_axes(b)
                ),
                s.src.rows,
                lanes,
                s.src.index(sidx),
                (sidx >= 0).sum(),
                src_offset=s.src.base,
                src_col=s.src.col,
                impl=i.buffer,
            )
            for s, b, i in zip(spaces, bufs, impls, strict=True)
        )
        got = _exchange(payload, branches, shift - 1)
        return tuple(
            rows_lib.copy_rows(b, rows, ridx, lanes, (ridx >= 0).sum(), impl=i.buffer)
            for b, rows, i in zip(bufs, got, impls, strict=True)
        )

    return lax.fori_loop(0, ends[-1], chunk, bufs)


def stage(
    spaces: tuple[RowSpace, ...],
    bufs: tuple[jax.Array, ...],
    meta: plan_lib.TransferMetadata,
    rounds: Rounds,
    *,
    axes: tuple[str, ...],
    num_devices: int,
    chunk_rows: int,
    impls: tuple[Impls, ...],
) -> tuple[jax.Array, ...]:
    """Fills the staging buffers ([N, w] each) from the weights' rows: local copies, then rounds.

    The weights are only read. Every trip count comes from the replicated plan, so every device
    runs the same collectives.
    """
    bufs = tuple(
        rows_lib.make_varying(b, set(axes) | rows_lib.varying_axes(s.src.rows))
        for b, s in zip(bufs, spaces, strict=True)
    )
    with jax.named_scope("local_copies"):
        bufs = _local_copies(spaces, bufs, meta, impls)
    if num_devices > 1:
        with jax.named_scope("rounds"):
            bufs = _rounds(
                spaces,
                bufs,
                rounds,
                axes=axes,
                num_devices=num_devices,
                chunk_rows=chunk_rows,
                impls=impls,
            )
    return bufs


def ragged_unavailable(platform: str) -> str:
    """Why the ``ragged_all_to_all`` stage cannot run on ``platform`` (today: anywhere)."""
    why = (
        "XLA:CPU cannot compile ragged-all-to-all"
        if platform == "cpu"
        else "it is not built yet: it needs a machine with several GPUs to be tested and measured"
    )
    return (
        f"collective='ragged_all_to_all' on {platform}: {why}; use collective='ppermute' "
        f"(rotation rounds, every backend)"
    )


def stage_ragged_all_to_all(
    spaces: tuple[RowSpace, ...],
    bufs: tuple[jax.Array, ...],
    meta: plan_lib.TransferMetadata,
    rounds: Rounds,
    *,
    axes: tuple[str, ...],
    num_devices: int,
    chunk_rows: int,
    impls: tuple[Impls, ...],
    platform: str,
) -> tuple[jax.Array, ...]:
    """The seam for an exact-bytes stage: one `lax.ragged_all_to_all` per column pass instead of
    the rotation rounds, same inputs and outputs as `stage`.

    The design it is to follow (see docs/transfer.md): the local copies as in `stage`; every
    device packs the rows it sends (``rounds.send_rows``, all shifts, grouped by destination) into
    one byte buffer ([S, B], S a static capacity of send rows, processed in waves of at most S
    rows when a device sends more, so memory never depends on the plan); ``input_offsets`` /
    ``send_sizes`` per destination and ``output_offsets`` / ``recv_sizes`` per source come from
    the replicated plan (an exclusive cumulative sum of the pair loads), so every device computes
    its peers' offsets without a collective (`plan.ragged_tables`, tested on the host against
    the collective's semantics); the output is an N-row receive buffer whose rows go to the
    staging buffer by the tables' ``recv_rows``. Each busiest device then moves exactly its
    floor of rows: no rotation round, no padding.

    Raises:
      NotImplementedError: always, for now (`ragged_unavailable` says why).
    """
    del spaces, bufs, meta, rounds, axes, num_devices, chunk_rows, impls
    raise NotImplementedError(ragged_unavailable(platform))


def commit(
    spaces: tuple[RowSpace, ...],
    bufs: tuple[jax.Array, ...],
    meta: plan_lib.TransferMetadata,
    impls: tuple[Impls, ...],
) -> tuple[RowSpace, ...]:
    """Writes the staged rows into the weights; duplicates take their primary's staged row."""
    with jax.named_scope("commit"):
        return tuple(
            dataclasses.replace(
                s,
                dst=dataclasses.replace(
                    s.dst,
                    rows=rows_lib.copy_rows(
                        s.dst.rows,
                        b,
                        s.dst.index(meta.commit_dst_rows),
                        meta.commit_src_rows,
                        meta.commit_count,
                        dst_offset=s.dst.base,
                        dst_col=s.dst.col,
                        impl=i.leaf,
                    ),
                ),
            )
            for s, b, i in zip(spaces, bufs, impls, strict=True)
        )

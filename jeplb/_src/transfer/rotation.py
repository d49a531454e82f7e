"""The rotation stage: rows cross devices through `lax.ppermute` in rotation rounds.

One rotation round per static shift s (device i sends to i + s mod D), each running a
data-dependent number of chunks of C rows that every device computes identically from the
replicated maps. All rounds are one loop over the layer's chunks, whose exchange is a
`lax.switch` over the shifts, and every leaf's rows of a chunk travel packed in one byte buffer:
the row moves are compiled once, and the program holds one collective per shift, whatever the
number of leaves. Runs on every backend; the engine picks it through `collective.pick`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer import layout
from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.layout import RowSpace
from jeplb._src.transfer.stages import Impls, Rounds

__all__ = ["ROTATION", "Rotation", "pack_bytes", "unpack_bytes"]


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


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The `collective.Collective` of rotation rounds of `lax.ppermute` (every backend)."""

    name: str = "ppermute"

    def supports(self, platform: str) -> bool:
        """Every backend runs ppermute."""
        del platform
        return True

    def exchange(
        self,
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
        """Stages the rows this device receives from the others: every rotation round."""
        del meta  # the rounds carry this device's send and receive rows
        return _rounds(
            spaces,
            bufs,
            rounds,
            axes=axes,
            num_devices=num_devices,
            chunk_rows=chunk_rows,
            impls=impls,
        )


ROTATION = Rotation()

"""The transfer's two stages for one layer, on rows: stage (local copies, then the collective), commit.

Stage: the rows this device already holds are copied into a staging buffer, then the engine's
`collective.Collective` (the rotation rounds of `rotation` today) fills in the rows other
devices send; every trip count comes from the replicated plan. Commit: the staged rows are
written into the weights, and duplicates take their primary's staged row. The stages read and
write `layout.RowSpace`s, so they serve whole leaves, slabs and column blocks alike; the engine
(`engine`) and the public one-layer stages (`move_to_buffer`, `move_from_buffer`) are their only
callers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.layout import RowSpace

if TYPE_CHECKING:  # collective.py imports this module
    from jeplb._src.transfer.collective import Collective

__all__ = ["Impls", "Rounds", "commit", "stage"]


class Impls(NamedTuple):
    """How rows of one leaf are written: into the leaf, and into staging buffers and chunks (see
    `rows.Movers`)."""

    leaf: rows_lib.Mover
    buffer: rows_lib.Mover


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
    collective: Collective,
) -> tuple[jax.Array, ...]:
    """Fills the staging buffers ([N, w] each) from the weights' rows: local copies, then the
    rows of other devices through ``collective`` (a `collective.Collective`).

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
            bufs = collective.exchange(
                spaces,
                bufs,
                meta,
                rounds,
                axes=axes,
                num_devices=num_devices,
                chunk_rows=chunk_rows,
                impls=impls,
            )
    return bufs


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

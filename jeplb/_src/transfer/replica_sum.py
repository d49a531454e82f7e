"""Replica sums inside one device: every slot of a replicated expert gets the sum of its slots.

The one-device form of `jeplb.sync_replica_grads`. Per layer, the slots of each expert with two or
more slots form a group; the group's rows are added in ascending slot order (``((g_0 + g_1) + ...)``
in the rows' dtype, as the several-device sync adds them) and the sum is written back to every
slot of the group. Other rows are never read or written.

On GPUs a Pallas kernel does it with one program per (layer, block of columns): the program walks
its layer's groups, reading each replica row's block once and writing it once, so the traffic is
the floor (every replica row read and written once) and nothing is staged.

Letters: L layers, P slots of the device per layer (N_local; N = P on one device), R the row width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer import inplace

__all__ = ["kernel_fits", "replica_groups", "sum_replicas"]

# Dtypes the kernel adds: each pair is added in float32 and rounded once, which is the correctly
# rounded sum in the narrow dtype (as XLA computes it).
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Rows of 2-byte dtypes: columns per program scaled by this (as many bytes per load as float32's)
# and warps per program (None: Pallas's default); tuned on GPUs by bench_grad_sync --tuning.
_NARROW_BLOCK_SCALE = 1
_NUM_WARPS = None


def replica_groups(
    phy2log: jax.Array, copies: jax.Array, valid: jax.Array
) -> tuple[jax.Array, ...]:
    """The replica groups of every layer, as ordered slot lists.

    Args:
      phy2log: int32[L, P] expert of each slot, -1 for an empty slot.
      copies: int32[L, P] how many slots of the layer hold each slot's expert (the count of
        ``training.replica_ranks``).
      valid: bool[] the map is valid; when False no group is listed.

    Returns:
      ``(order, first, last, count)``: ``order`` int32[L, P] the slots of replicated experts,
      sorted by (expert, slot), then padding; ``first`` / ``last`` int32[L, P] 1 where
      ``order[l, k]`` is the first / last slot of its group; ``count`` int32[L] the listed slots.

    Example:
      >>> import jax.numpy as jnp
      >>> order, first, last, count = replica_groups(
      ...     jnp.array([[2, 0, 2, 1, 0]]), jnp.array([[2, 2, 2, 1, 2]]), jnp.bool_(True))
      >>> order[0, :int(count[0])].tolist(), first[0, :4].tolist(), last[0, :4].tolist()
      ([1, 4, 0, 2], [1, 0, 1, 0], [0, 1, 0, 1])
    """
    num_slots = phy2log.shape[1]
    phy2log = phy2log.astype(jnp.int32)
    listed = (phy2log >= 0) & (copies >= 2) & valid
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    key = jnp.where(listed, phy2log * num_slots + slot, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    expert = jnp.take_along_axis(jnp.where(listed, phy2log, -1), order, axis=-1)
    count = listed.sum(-1).astype(jnp.int32)
    inside = slot[None, :] < count[:, None]
    before = jnp.pad(expert[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    after = jnp.pad(expert[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    first = (inside & (expert != before)).astype(jnp.int32)
    last = (inside & (expert != after)).astype(jnp.int32)
    return order, first, last, count


def kernel_fits(rows: jax.Array, num_layers: int) -> bool:
    """Whether the kernel takes ``rows`` ([L * P, R]): a dtype it adds, a row width with a column
    block (`inplace.direct_block`), and a layer below 2^31 elements."""
    width = rows.shape[1]
    num_slots = rows.shape[0] // num_layers
    return (
        np.dtype(rows.dtype) in _KERNEL_DTYPES
        and inplace.direct_block(width, num_layers) > 0
        and num_slots * width < 2**31
    )


def sum_replicas(
    rows: jax.Array,
    groups: tuple[jax.Array, ...],
    *,
    slot_major: bool = False,
    interpret: bool | None = None,
) -> jax.Array:
    """Adds each replica group's rows in slot order and writes the sum to all of them, in place.

    Args:
      rows: [L * P, R] the device's rows, layer-major (or [P * L, R] with ``slot_major``); a dtype
        and width that `kernel_fits`.
      groups: ``(order, first, last, count)`` from `replica_groups`.
      slot_major: the rows are slot-major: row ``slot * L + layer``.
      interpret: run the Pallas kernel in interpret mode; None: only on the CPU backend.

    Returns:
      ``rows`` with every listed slot holding its group's sum.
    """
    from jax.experimental import pallas as pl

    order, first, last, count = groups
    num_layers, num_slots = order.shape
    dtype, width = rows.dtype, rows.shape[1]
    block = inplace.direct_block(width, num_layers)
    scale = _NARROW_BLOCK_SCALE if np.dtype(dtype).itemsize == 2 else 1
    if width % (block * scale) == 0:
        block *= scale

    def kernel(order_ref, first_ref, last_ref, cnt_ref, _in_ref, out_ref):
        base = pl.program_id(0) * num_slots

        def step(k, carry):
            acc, start = carry
            x = out_ref[order_ref[base + k], :].astype(jnp.float32)
            opens = first_ref[base + k] == 1
            # The running sum is rounded to the rows' dtype after every add, as XLA adds them.
            acc = jnp.where(opens, x, (acc + x).astype(dtype).astype(jnp.float32))
            start = jnp.where(opens, k, start)

            @pl.when(last_ref[base + k] == 1)
            def _():
                value = acc.astype(dtype)

                def write(j, carry):
                    out_ref[order_ref[base + j], :] = value
                    return carry

                lax.fori_loop(start, k + 1, write, jnp.int32(0))

            return acc, start

        init = (jnp.zeros((block,), jnp.float32), jnp.int32(0))
        lax.fori_loop(0, cnt_ref[pl.program_id(0)], step, init)

    tables = [order.reshape(-1), first.reshape(-1), last.reshape(-1), count]
    return inplace.layer_kernel_call(
        kernel,
        tables,
        rows,
        num_layers=num_layers,
        block=block,
        slot_major=slot_major,
        interpret=interpret,
        num_warps=_NUM_WARPS,
    )

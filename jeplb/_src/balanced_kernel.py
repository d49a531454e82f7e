"""The balanced replica choice on a GPU as two Pallas kernels (see `jeplb.dispatch_layer`).

The choice needs each (token, k) pair's rank among the batch's pairs of its group (its key: the
expert, counted and uncounted pairs apart) in flat order. In XLA that is a sort or a handful of
large reductions, each its own kernel; here it is two kernels and a few small XLA operations:

1. `block_counts`: the keys split into counting blocks of ``count_block``; each program counts
   its block's keys per group (int32[B, G_pad], compares accumulated in registers).
2. XLA sums the rows (the groups' sizes) and orders each expert's replicas from them
   (`dispatch._replica_order`): a few small operations on [E, R_max].
3. `choose`: each program takes ``map_block`` consecutive pairs; a pair's rank is its group's
   count in the counting blocks before its own (read from the rows), plus the earlier pairs of
   its own counting block with its key (compared in registers), plus ``offset[key]`` (the
   devices before this one, inside `jax.shard_map`); the replica is
   ``order[e][rank % logcnt[e]]`` and the slot ``log2phy[e][replica]``, written once.

Integer adds and compares only: the slots are the XLA formulation's, bit for bit (tested in
Pallas's interpreter on the CPU and compiled on a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.transfer import rows as rows_lib

# Keys per program of `block_counts` and pairs per program of `choose` (powers of two; the
# second divides the first), and the compares one loop step holds in registers.
COUNT_BLOCK = 512
MAP_BLOCK = 256
_COMPARES = 4096
# The largest group count (2 E + 1) the kernels take: their [chunk, G_pad] compares shrink to one
# key per step at 4096 groups.
MAX_GROUPS = 4096


def padded_groups(groups: int) -> int:
    """``groups`` rounded up to a power of two (Triton's ranges)."""
    return 1 << max(0, (groups - 1).bit_length())


def fits(n: int, groups: int) -> bool:
    """Whether the kernels take ``n`` keys of ``groups`` groups (any n > 0: padded to blocks)."""
    return n > 0 and groups <= MAX_GROUPS


def pad_keys(key: jax.Array, groups: int, count_block: int) -> jax.Array:
    """``key`` int32[n] padded to a multiple of ``count_block`` with the last group's key (the
    out-of-range pairs' group: pads come after every real pair and change no real rank)."""
    return jnp.pad(key, (0, (-key.shape[0]) % count_block), constant_values=groups - 1)


def _varying(*args):
    """The operands marked varying over the same shard_map axes (a kernel needs them alike)."""
    axes = frozenset().union(*(rows_lib.varying_axes(a) for a in args))
    return [rows_lib.make_varying(a, axes) for a in args]


def block_counts(key, groups: int, *, count_block: int = COUNT_BLOCK, interpret: bool = False):
    """Per counting block, its keys' count per group.

    Args:
      key: int32[n] in [0, groups), n a multiple of ``count_block`` (`pad_keys`).
      groups: the number of groups.
      count_block: keys per program (a power of two).
      interpret: run in Pallas's interpreter (any backend).

    Returns:
      int32[n // count_block, G_pad] (G_pad = `padded_groups`; the columns past ``groups`` 0).
    """
    from jax.experimental import pallas as pl

    padded = padded_groups(groups)
    chunk = max(1, min(count_block, _COMPARES // padded))

    def kernel(key_ref, rows_ref):
        group = lax.broadcasted_iota(jnp.int32, (chunk, padded), 1)

        def step(j, acc):
            sub = key_ref[pl.ds(j * chunk, chunk)]
            return acc + (sub[:, None] == group).astype(jnp.int32)

        zero = jnp.zeros((chunk, padded), jnp.int32)
        acc = lax.fori_loop(jnp.int32(0), jnp.int32(count_block // chunk), step, zero)
        rows_ref[...] = jnp.sum(acc, axis=0)

    (key,) = _varying(key)
    blocks = key.shape[0] // count_block
    return pl.pallas_call(
        kernel,
        out_shape=rows_lib._like(key).update(shape=(blocks, padded)),
        grid=(blocks,),
        in_specs=[pl.BlockSpec((count_block,), lambda i: (i,))],
        out_specs=pl.BlockSpec((None, padded), lambda i: (i, 0)),
        interpret=interpret,
        name="eplb_balanced_counts",
    )(key)


def choose(
    key, rows, offset, order, logcnt, log2phy, *, groups: int,
    count_block: int = COUNT_BLOCK, map_block: int = MAP_BLOCK, interpret: bool = False,
):  # fmt: skip
    """Each pair's slot under the balanced choice.

    Args:
      key: int32[n] as for `block_counts` (the same padding); group g < E is expert g, counted;
        E <= g < groups - 1 expert g - E, uncounted; ``groups - 1`` out of range (slot -1).
      rows: int32[n // count_block, G_pad] `block_counts` of ``key``.
      offset: int32[G_pad] added to every rank of a group (the pairs of the devices before this
        one; zeros for a global view).
      order: int32[E, R_max] each expert's replicas in the order they take the pairs.
      logcnt: int32[E]; log2phy: int32[E, R_max] the layer's maps.
      groups: the number of groups; count_block / map_block: pairs per program of each kernel.
      interpret: run in Pallas's interpreter.

    Returns:
      int32[n] the slots (-1 for the out-of-range group).
    """
    from jax.experimental import pallas as pl

    num_experts, r_max = log2phy.shape
    n, padded = key.shape[0], rows.shape[1]
    num_rows = rows.shape[0]
    width = max(1, min(count_block, _COMPARES // map_block))  # window keys per compare step

    def kernel(key_ref, win_ref, rows_ref, offset_ref, order_ref, cnt_ref, table_ref, out_ref):
        first = pl.program_id(0) * map_block
        own = first // count_block  # the counting block holding this program's pairs
        key = key_ref[...]
        pos = first + lax.broadcasted_iota(jnp.int32, (map_block,), 0)

        def before(b, acc):  # the counting blocks before this one
            return acc + jnp.where(b < own, rows_ref[b * padded + key], 0)

        rank = lax.fori_loop(jnp.int32(0), jnp.int32(num_rows), before, offset_ref[key])

        def inside(j, acc):  # the earlier pairs of its own counting block
            win = win_ref[pl.ds(j * width, width)]
            at = own * count_block + j * width + lax.broadcasted_iota(jnp.int32, (width,), 0)
            hit = (win[None, :] == key[:, None]) & (at[None, :] < pos[:, None])
            return acc + jnp.sum(hit.astype(jnp.int32), axis=1)

        rank = lax.fori_loop(jnp.int32(0), jnp.int32(count_block // width), inside, rank)
        ok = key < groups - 1
        safe = jnp.where(ok, jnp.where(key >= num_experts, key - num_experts, key), 0)
        replica = order_ref[safe * r_max + rank % jnp.maximum(cnt_ref[safe], 1)]
        out_ref[...] = jnp.where(ok, table_ref[safe * r_max + replica], -1)

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)

    args = _varying(
        key, key, rows.reshape(-1), offset, order.reshape(-1), logcnt, log2phy.reshape(-1)
    )
    blocked = pl.BlockSpec((map_block,), lambda i: (i,))
    window = pl.BlockSpec((count_block,), lambda i: (i * map_block // count_block,))
    return pl.pallas_call(
        kernel,
        out_shape=rows_lib._like(args[0]),
        grid=(n // map_block,),
        in_specs=[blocked, window, *(whole(a) for a in args[2:])],
        out_specs=blocked,
        interpret=interpret,
        name="eplb_balanced_choice",
    )(*args)

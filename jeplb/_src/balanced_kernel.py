"""The balanced replica choice on a GPU as two Pallas kernels (see `jeplb.dispatch_layer`).

The choice needs each (token, k) pair's rank among the batch's pairs of its group (its key: the
expert, counted and uncounted pairs apart) in flat order. In XLA that is a sort or a handful of
large reductions, each its own kernel; here it is two kernels without loops and one XLA
reduction:

1. `block_counts`: the keys split into counting blocks of ``count_block``; program (b, g)
   counts block b's keys in groups [g G_c, (g + 1) G_c) (one [count_block, G_c] compare).
2. XLA sums the rows before each block (`prefix_rows`, its last row the groups' sizes): one
   reduction.
3. `choose`: each program takes ``map_block`` consecutive pairs; a pair's rank is its group's
   count in the counting blocks before its own (one read of the prefix rows) plus the earlier
   pairs of its own counting block with its key (one [map_block, count_block] compare); the
   replica is ``(rank + e) % logcnt[e]`` and the slot ``log2phy[e][replica]``.

Integer adds and compares only: for valid maps (each expert's count at most R_max) the slots are
the XLA formulation's, bit for bit (tested in Pallas's interpreter on the CPU and compiled on a
GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.transfer import rows as rows_lib

# Keys per counting block, groups per program of `block_counts`, pairs per program of `choose`
# (powers of two; ``MAP_BLOCK`` divides ``COUNT_BLOCK``).
COUNT_BLOCK = 512
GROUP_CHUNK = 8
MAP_BLOCK = 32
# The largest group count (2 E + 1) the kernels take.
MAX_GROUPS = 8192


def padded_groups(groups: int) -> int:
    """``groups`` rounded up to a power of two (Triton's ranges), at least `GROUP_CHUNK`."""
    return max(GROUP_CHUNK, 1 << max(0, (groups - 1).bit_length()))


def fits(n: int, groups: int) -> bool:
    """Whether the kernels take ``n`` keys of ``groups`` groups (any n > 0: padded to blocks)."""
    return n > 0 and groups <= MAX_GROUPS


def _in_groups(key: jax.Array, groups: int) -> jax.Array:
    """Keys outside [0, groups) as the last group's (the out-of-range pairs')."""
    return jnp.where((key >= 0) & (key < groups), key, groups - 1)


def pad_keys(key: jax.Array, groups: int, count_block: int) -> jax.Array:
    """``key`` int32[n] padded to a multiple of ``count_block`` with the last group's key (the
    out-of-range pairs' group: pads come after every real pair and change no real rank)."""
    return jnp.pad(key, (0, (-key.shape[0]) % count_block), constant_values=groups - 1)


def block_counts(key, groups: int, *, count_block: int = COUNT_BLOCK, interpret: bool = False):
    """Per counting block, its keys' count per group.

    Args:
      key: int32[n], n a multiple of ``count_block`` (`pad_keys`); keys outside [0, groups)
        are counted in no column below ``groups - 1``.
      groups: the number of groups.
      count_block: keys per block (a power of two).
      interpret: run in Pallas's interpreter (any backend).

    Returns:
      int32[n // count_block, G_pad] (G_pad = `padded_groups`; the columns past ``groups`` 0).
    """
    from jax.experimental import pallas as pl

    padded, chunk = padded_groups(groups), GROUP_CHUNK

    def kernel(key_ref, rows_ref):
        group = pl.program_id(1) * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        # Keys outside [0, groups) fall in no real group's column: only the out-of-range
        # group's count (which nothing reads) differs, not a real rank.
        hits = (key_ref[...][:, None] == group).astype(jnp.int32)  # [count_block, chunk]
        rows_ref[...] = jnp.sum(hits, axis=0)

    (key,) = rows_lib.vary_alike(key)
    blocks = key.shape[0] // count_block
    return pl.pallas_call(
        kernel,
        out_shape=rows_lib._like(key).update(shape=(blocks, padded)),
        grid=(blocks, padded // chunk),
        in_specs=[pl.BlockSpec((count_block,), lambda b, g: (b,))],
        out_specs=pl.BlockSpec((None, chunk), lambda b, g: (b, g)),
        interpret=interpret,
        name="eplb_balanced_counts",
    )(key)


def prefix_rows(rows: jax.Array) -> jax.Array:
    """int32[B + 1, G_pad]: row b the sum of ``rows`` [B, G_pad] before b (the last row: all of
    them, the groups' sizes). A masked sum, one reduction (a cumulative sum lowers to many
    operations off TPUs)."""
    blocks = rows.shape[0]
    earlier = lax.iota(jnp.int32, blocks)[None, :] < lax.iota(jnp.int32, blocks + 1)[:, None]
    return jnp.sum(jnp.where(earlier[:, :, None], rows[None], 0), axis=1, dtype=jnp.int32)


def choose(
    key, before, logcnt, log2phy, *, groups: int, layer=None, count_block: int = COUNT_BLOCK,
    map_block: int = MAP_BLOCK, interpret: bool = False,
):  # fmt: skip
    """Each pair's slot under the balanced choice.

    Args:
      key: int32[n] as for `block_counts` (the same padding); group g < E is expert g, counted;
        E <= g < groups - 1 expert g - E, uncounted; ``groups - 1`` and keys outside [0, groups)
        out of range (slot -1).
      before: int32[n // count_block (+ 1), G_pad] `prefix_rows` of ``key``'s `block_counts`
        (plus the pairs of the devices before this one, inside shard_map).
      logcnt: int32[E]; log2phy: int32[E, R_max] the layer's maps; or, with ``layer``, every
        layer's (int32[L, E] and int32[L, E, R_max]), read at ``layer`` inside the kernel: a
        slice of the maps passed to a kernel would be a copy, one launch each, every layer.
      groups: the number of groups.
      layer: None, or an int32 scalar (traced or not): the layer the maps are read at.
      count_block / map_block: pairs per block of each kernel.
      interpret: run in Pallas's interpreter.

    Returns:
      int32[n] the slots (-1 for the out-of-range group).
    """
    from jax.experimental import pallas as pl

    if layer is None:
        logcnt, log2phy, layer = logcnt[None], log2phy[None], 0
    num_experts, r_max = log2phy.shape[1:]
    n, padded = key.shape[0], before.shape[1]

    def kernel(key_ref, win_ref, before_ref, layer_ref, cnt_ref, table_ref, out_ref):
        at_layer = layer_ref[0] * num_experts
        first = pl.program_id(0) * map_block
        own = first // count_block  # the counting block holding this program's pairs
        key = _in_groups(key_ref[...], groups)
        pos = first + lax.broadcasted_iota(jnp.int32, (map_block, 1), 0)
        at = own * count_block + lax.broadcasted_iota(jnp.int32, (1, count_block), 1)
        # (The window's keys are not mapped: one outside [0, groups) equals no in-range key,
        # and the out-of-range pairs' ranks choose nothing.)
        hit = (win_ref[...][None, :] == key[:, None]) & (at < pos)  # [map_block, count_block]
        rank = before_ref[own * padded + key] + jnp.sum(hit.astype(jnp.int32), axis=1)
        ok = key < groups - 1
        safe = jnp.where(ok, jnp.where(key >= num_experts, key - num_experts, key), 0)
        cnt = jnp.maximum(cnt_ref[at_layer + safe], 1)
        # (At most R_max - 1 even for maps whose count exceeds their table: no read past it.)
        replica = jnp.minimum((rank % cnt + safe % cnt) % cnt, r_max - 1)
        out_ref[...] = jnp.where(ok, table_ref[(at_layer + safe) * r_max + replica], -1)

    def whole(a):
        return pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)

    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    args = rows_lib.vary_alike(
        key, key, before.reshape(-1), layer, logcnt.reshape(-1), log2phy.reshape(-1)
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

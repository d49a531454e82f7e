"""`inplace.order_moves` for every layer as one Pallas kernel (GPUs).

In XLA the order is about twenty small operations (each round of pointer jumping is a gather, then
a sort and the tables), each its own kernel on a GPU: a fixed cost of every one-device transfer
call, whatever the rows weigh. Here one program per layer computes the same order in registers.
Its vectors hold the layer's N slots and the temporary (index N), padded to a power of two
``NP >= N + 1``; a gather ``x[p]`` is a one-hot select and a reduction over an [NP, NP] tile, the
stable sort a rank count over [NP, NP] compares. Integer operations only: the result is
`order_moves`'s, entry for entry (tested in Pallas's interpreter on the CPU and compiled on a GPU).

Letters: L layers, N slots per layer, NP the padded length, M = N + N // 2 the longest move list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.transfer import rows as rows_lib

__all__ = ["MAX_SLOTS", "fits", "order_moves_kernel"]

# The most slots a layer may have for the kernel ([NP, NP] tiles of NP <= 128 in registers);
# larger layers take the XLA form.
MAX_SLOTS = 127
_BIG = jnp.iinfo(jnp.int32).max


def padded(n: int) -> int:
    """NP: the least power of two above ``n`` (room for the temporary, index n), at least 16."""
    return max(16, 1 << n.bit_length())


def fits(n: int) -> bool:
    """Whether the kernel takes layers of ``n`` slots."""
    return 0 < n <= MAX_SLOTS


def _gather(x: jax.Array, p: jax.Array) -> jax.Array:
    """``x[p]`` for int32 vectors of length NP and ``p`` in [0, NP): a one-hot select and a max
    over an [NP, NP] tile (exact: the one entry hit, the others the identity)."""
    col = lax.broadcasted_iota(jnp.int32, (1, x.shape[0]), 1)
    return jnp.max(jnp.where(p[:, None] == col, x[None, :], jnp.iinfo(jnp.int32).min), axis=1)


def _before(key: jax.Array, other: jax.Array, ties: bool) -> jax.Array:
    """For each entry of ``key`` [NP], how many entries of ``other`` [NP] sort before it: smaller
    keys, and with ``ties`` equal keys too (``other`` comes first in the stable order), else equal
    keys at a lower index (the same list)."""
    np_ = key.shape[0]
    row = lax.broadcasted_iota(jnp.int32, (np_, np_), 0)
    col = lax.broadcasted_iota(jnp.int32, (np_, np_), 1)
    equal = other[None, :] == key[:, None]
    tie = equal if ties else equal & (col < row)
    return jnp.sum(((other[None, :] < key[:, None]) | tie).astype(jnp.int32), axis=1)


def _placed(values: jax.Array, rank: jax.Array, offset: int) -> jax.Array:
    """out[k] = values[i] where rank[i] == k + offset, for k in [0, NP) (INT32_MIN where none)."""
    np_ = values.shape[0]
    k = lax.broadcasted_iota(jnp.int32, (np_, np_), 0) + offset
    return jnp.max(jnp.where(rank[None, :] == k, values[None, :], jnp.iinfo(jnp.int32).min), axis=1)


def _layer_order(old, new, ok, n: int):
    """The order of one layer, as `inplace.order_moves` defines it, on padded vectors.

    Args:
      old, new: int32[NP]; entries at N and past it are padding (any value).
      ok: bool[] the plan is feasible.
      n: N.

    Returns:
      (halves, count): ``halves`` two pairs (src int32[NP], dst int32[NP]), moves [0, NP) and
      [NP, 2 NP) of the order (move k for k < count, N past it); count int32[].
    """
    np_ = old.shape[0]
    temp = jnp.int32(n)
    idx = lax.broadcasted_iota(jnp.int32, (np_,), 0)
    real = idx < n
    changed = (new >= 0) & (new != old) & ok & real
    col = lax.broadcasted_iota(jnp.int32, (1, np_), 1)
    holds = (old[None, :] == new[:, None]) & (col < n)  # [dst, src]
    first = jnp.min(jnp.where(holds, col, np_), axis=1)
    src = jnp.where(first < np_, first, 0)  # the first holder (argmax's 0 where none)
    changed_src = _gather(changed.astype(jnp.int32), src) > 0
    parent = jnp.where(changed & changed_src, src, temp)

    with jax.named_scope("find_cycles"):
        ahead, least = parent, jnp.where(idx <= n, idx, temp)
        rounds = max(1, (n - 1).bit_length())
        for _ in range(rounds):
            least = jnp.minimum(least, _gather(least, ahead))
            ahead = _gather(ahead, ahead)
        cyclic = (ahead != temp) & real
        component = jnp.where(cyclic, _gather(least, ahead), -1)
        cut = cyclic & (component == idx)

    with jax.named_scope("depths"):
        up = jnp.where(cut | ~real, temp, parent)
        depth = (real & (up != temp)).astype(jnp.int32)
        for _ in range(rounds):
            depth = depth + _gather(depth, up)
            up = _gather(up, up)

    with jax.named_scope("sort"):
        group = (component + 1) * (2 * n + 2)
        move_key = jnp.where(changed, group + jnp.where(cut, 2 * n + 1, 1 + n - depth), _BIG)
        save_key = jnp.where(cut, group, _BIG)
        # The stable order of the entries [moves, saves]: a move comes after the moves of smaller
        # keys or equal keys at lower rows and after the saves of smaller keys; a save after the
        # saves of smaller keys or equal keys at lower rows and after the moves of keys up to its.
        move_rank = _before(move_key, move_key, ties=False) + _less(move_key, save_key)
        save_rank = _before(save_key, save_key, ties=False) + _before(save_key, move_key, ties=True)
        count = jnp.sum(changed.astype(jnp.int32)) + jnp.sum(cut.astype(jnp.int32))
        move_src = jnp.where(cut, temp, src)
        saves_dst = jnp.full_like(idx, n)
        halves = []
        for offset in (0, np_):
            live = idx + offset < count
            s = jnp.maximum(_placed(move_src, move_rank, offset), _placed(src, save_rank, offset))
            d = jnp.maximum(_placed(idx, move_rank, offset), _placed(saves_dst, save_rank, offset))
            halves.append((jnp.where(live, s, temp), jnp.where(live, d, temp)))
    return halves, count


def _less(key: jax.Array, other: jax.Array) -> jax.Array:
    """For each entry of ``key`` [NP], how many entries of ``other`` [NP] are smaller."""
    return jnp.sum((other[None, :] < key[:, None]).astype(jnp.int32), axis=1)


def order_moves_kernel(
    old: jax.Array, new: jax.Array, ok: jax.Array, *, interpret: bool | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`inplace.order_moves_layers` as one Pallas kernel, one program per layer.

    Args:
      old, new: int32[L, N] the maps (N <= `MAX_SLOTS`).
      ok: bool[L] which layers' plans are feasible.
      interpret: run in Pallas's interpreter; None: only on the CPU backend.

    Returns:
      (src int32[L, M], dst int32[L, M], count int32[L]), equal to `order_moves_layers`'s.
    """
    from jax.experimental import pallas as pl

    num_layers, n = old.shape
    if not fits(n):
        raise ValueError(f"order_moves_kernel: layers of at most {MAX_SLOTS} slots, got {n}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    np_ = padded(n)

    def kernel(old_ref, new_ref, ok_ref, src_ref, dst_ref, count_ref):
        ok = ok_ref[pl.program_id(0)] != 0
        halves, count = _layer_order(old_ref[...], new_ref[...], ok, n)
        for h, (s, d) in enumerate(halves):
            src_ref[pl.ds(h * np_, np_)] = s
            dst_ref[pl.ds(h * np_, np_)] = d
        count_ref[...] = jnp.full((16,), count, jnp.int32)

    pad = ((0, 0), (0, np_ - n))
    args = rows_lib.vary_alike(
        jnp.pad(old.astype(jnp.int32), pad, constant_values=-1),
        jnp.pad(new.astype(jnp.int32), pad, constant_values=-1),
        ok.astype(jnp.int32),
    )
    row = pl.BlockSpec((None, np_), lambda i: (i, 0))

    def out_row(width):
        return pl.BlockSpec((None, width), lambda i: (i, 0))

    like = rows_lib._like(args[0])
    src, dst, count = pl.pallas_call(
        kernel,
        out_shape=[
            like.update(shape=(num_layers, 2 * np_)),
            like.update(shape=(num_layers, 2 * np_)),
            like.update(shape=(num_layers, 16)),
        ],
        grid=(num_layers,),
        in_specs=[row, row, pl.BlockSpec(args[2].shape, lambda i: (0,))],
        out_specs=[out_row(2 * np_), out_row(2 * np_), out_row(16)],
        interpret=interpret,
        name="eplb_order_moves",
    )(*args)
    m = n + n // 2
    return src[:, :m], dst[:, :m], count[:, 0]

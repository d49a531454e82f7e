"""Row-wise array helpers shared by the policy modules.

Every function works on rows (the leading axis: layers, or layer-and-node rows X) and is exact:
sums are explicit left-to-right float32 chains, never a reduction whose order the backend picks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "descending_order",
    "first_argmax",
    "first_argmin",
    "fold_sum",
    "inverse",
    "lexicographic_first",
    "log2phy_of",
    "rows",
    "slot_ranks",
    "sort_by_key",
]

# Rows of up to this many items are ordered by counting, for each item, the items ahead of it (one
# fused comparison and reduction over [X, n, n]); longer rows by a sort.
_COUNT_ORDER_MAX = 512


def rows(x: jax.Array) -> jax.Array:
    """int32[X, 1] row indices of ``x`` [X, ...], for row-wise gathers and scatters."""
    return jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]


def fold_sum(x: jax.Array) -> jax.Array:
    """float32 sum over the last axis, strictly left to right (the same rounding on every backend,
    where a reduction's order is the backend's choice)."""
    acc = x[..., 0]
    for k in range(1, x.shape[-1]):
        acc = acc + x[..., k]
    return acc


def lexicographic_first(
    key: jax.Array, tiebreak: jax.Array, axis: int, *, largest: bool = False
) -> tuple[jax.Array, jax.Array]:
    """(tiebreak, key) at the smallest (``largest``: the largest) key along ``axis``, the smallest
    tiebreak among equal keys; NaN-free keys, -0 and +0 equal.

    On CPUs two plain reductions (the extreme key, then the smallest tiebreak holding it), which
    XLA:CPU runs several times faster than a variadic reduction; on other platforms one reduction
    over (key, tiebreak) pairs, one kernel instead of two dependent ones. Both give the same
    tiebreak; the key is the same up to the sign of a zero.

    Args:
      key: float32[...]; tiebreak: int32 of the same shape.
      axis: the axis reduced.
    """
    return lax.platform_dependent(
        key,
        tiebreak,
        cpu=lambda k, t: _two_reductions(k, t, axis, largest),
        default=lambda k, t: _pair_reduction(k, t, axis, largest),
    )


def _two_reductions(key, tiebreak, axis, largest):
    """`lexicographic_first` as an extreme, then a min over the tiebreaks holding it."""
    best = (jnp.max if largest else jnp.min)(key, axis=axis, keepdims=True)
    big = jnp.iinfo(tiebreak.dtype).max
    first = jnp.min(jnp.where(key == best, tiebreak, big), axis=axis)
    return first, jnp.squeeze(best, axis)


def _pair_reduction(key, tiebreak, axis, largest):
    """`lexicographic_first` as one reduction over (key, tiebreak) pairs."""

    def pick(a, b):
        (ak, at), (bk, bt) = a, b
        wins = (bk > ak) if largest else (bk < ak)
        take = wins | ((bk == ak) & (bt < at))
        return lax.select(take, bk, ak), lax.select(take, bt, at)

    init_key = jnp.array(-jnp.inf if largest else jnp.inf, key.dtype)
    init_tie = jnp.array(jnp.iinfo(tiebreak.dtype).max, tiebreak.dtype)
    best, first = lax.reduce((key, tiebreak), (init_key, init_tie), pick, (axis % key.ndim,))
    return first, best


def first_argmin(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index int32[...], value) of the minimum over the last axis, the first index among equal
    minima: `jnp.argmin`'s result for NaN-free ``x`` (see `lexicographic_first`)."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return lexicographic_first(x, iota, -1)


def descending_order(load: jax.Array) -> jax.Array:
    """int32[X, n]: the items of each row heaviest first, equal loads in increasing index.

    The order of a stable sort of ``-load`` for NaN-free ``load`` (-0 and +0 equal). XLA:CPU sorts
    key-value pairs slowly, so rows of up to _COUNT_ORDER_MAX items count the items ahead of each
    item instead and invert that permutation (the same order, several times faster).

    Args:
      load: float32[X, n].
    """
    x_rows, n = load.shape
    iota = jnp.arange(n, dtype=jnp.int32)
    if n > _COUNT_ORDER_MAX:
        iota = jnp.broadcast_to(iota, (x_rows, n))
        return lax.sort((-load, iota), dimension=1, num_keys=2)[1]
    other, this = load[:, None, :], load[:, :, None]  # [X, i, j]: item j against item i
    ahead = (other > this) | ((other == this) & (iota[None, :] < iota[:, None]))
    return inverse(jnp.sum(ahead, axis=2, dtype=jnp.int32))


def sort_by_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A stable sort of each row (last axis) by an integer key: (sorted key, position) int32.

    One sort of the single operand ``key * n + position`` (XLA:CPU sorts a single integer operand
    several times faster than key-value pairs); the caller keeps ``(max key + 2) * n`` within
    int32.

    Args:
      key: int32[..., n], each >= -1.
    """
    n = key.shape[-1]
    packed = key * n + jnp.arange(n, dtype=jnp.int32)
    packed = lax.sort(packed, dimension=key.ndim - 1)
    return packed // n, packed % n


def first_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(index int32[...], value) of the maximum over the last axis, the first index among equal
    maxima: `jnp.argmax`'s result for NaN-free ``x`` (see `lexicographic_first`)."""
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return lexicographic_first(x, iota, -1, largest=True)


def inverse(perm: jax.Array) -> jax.Array:
    """Inverse of each row of a permutation ``[X, n]``."""
    n = perm.shape[1]
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), perm.shape)
    return jnp.zeros_like(perm).at[rows(perm), perm].set(iota, unique_indices=True)


def log2phy_of(phy2log: jax.Array, rank: jax.Array, num_log: int, width: int) -> jax.Array:
    """log2phy[l, e, r] = the slot holding replica r of expert e; -1 past the expert's count.

    Args:
      phy2log: int32[L, P] expert of each slot.
      rank: int32[L, P] replica rank of each slot.
      num_log: E.
      width: R_max, the last axis of the result.

    Returns:
      int32[L, E, R_max].
    """
    num_layers, num_slots = phy2log.shape
    flat = jnp.full((num_layers, num_log * width), -1, jnp.int32)
    iota = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), phy2log.shape)
    flat = flat.at[rows(phy2log), phy2log * width + rank].set(iota, mode="drop")
    return flat.reshape(num_layers, num_log, width)


def slot_ranks(phy2log: jax.Array) -> jax.Array:
    """rank[l, p] = how many slots before p hold the same expert (replica ranks in slot order)."""
    num_layers, num_slots = phy2log.shape
    iota = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), phy2log.shape)
    key, pos = sort_by_key(phy2log)
    first = jnp.concatenate([jnp.ones((num_layers, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(first, iota, 0), axis=1)
    rank = iota - start
    return jnp.zeros_like(phy2log).at[rows(pos), pos].set(rank, unique_indices=True)

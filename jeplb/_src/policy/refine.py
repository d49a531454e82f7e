"""Swap refinement: lowers each row's heaviest device by swapping two replicas between devices.

Used by ``refine=True`` after the from-scratch packing and by the migration-aware mode after the
sticky packing. A device's load is the float32 sum of its slots in slot order (an explicit chain,
the same rounding on every backend).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.policy.ops import first_argmax, first_argmin, fold_sum, sort_by_key

__all__ = ["swap_refine"]

# Swap refinement stops after this many swaps per row (each swap strictly lowers a row's maximum,
# so it ends on its own long before on any real input; the cap bounds the worst case).
_MAX_SWAPS_PER_DEVICE = 4
# Swap steps per trip of the loop (fewer trips, fewer host round trips of the loop condition on
# GPUs); a row that is done stays done, so extra steps change nothing.
_UNROLL = 4
# Once at most X // k rows are still active, they continue in a batch of X // k rows, for each k
# here with X // k >= _COMPACT_MIN_ROWS.
_COMPACT = (4, 16)
_COMPACT_MIN_ROWS = 8


class _Heaviest(NamedTuple):
    """The heaviest device h of each row and the candidate swaps with it.

    h: int32[X]; top: float32[X] its load; on_h: bool[X, D_x] one-hot of h;
    pair: float32[X, S, P_x] the larger of the two new loads after swapping slot i of h with slot j;
    ok: bool[X, S, P_x] whether that swap is allowed and lowers the pair below ``top``.
    """

    h: jax.Array
    top: jax.Array
    on_h: jax.Array
    pair: jax.Array
    ok: jax.Array


def _pick(v: jax.Array, hit: jax.Array, axis: int) -> jax.Array:
    """The entry of ``v`` where the one-hot ``hit`` (broadcast against ``v``) is set, along
    ``axis``: a select and a reduction, which fuse with their neighbours, where a gather is a
    kernel of its own on GPUs. Exact: every other entry is the reduction's identity."""
    if v.dtype == jnp.bool_:
        return jnp.any(hit & v, axis=axis)
    if jnp.issubdtype(v.dtype, jnp.floating):
        return jnp.max(jnp.where(hit, v, -jnp.inf), axis=axis)
    return jnp.max(jnp.where(hit, v, jnp.iinfo(v.dtype).min), axis=axis)


def _heaviest(load: jax.Array, slots: int) -> _Heaviest:
    """Candidate swaps of each row's heaviest device (lowest index on ties) with any other slot."""
    x_rows, p_x = load.shape
    devices = p_x // slots
    device_of_slot = jnp.arange(p_x, dtype=jnp.int32) // slots
    by_device = load.reshape(x_rows, devices, slots)
    device_load = fold_sum(by_device)
    h, top = first_argmax(device_load)
    on_h = jnp.arange(devices, dtype=jnp.int32) == h[:, None]  # [X, D_x]
    a = _pick(by_device, on_h[:, :, None], 1)  # [X, S] the loads on h
    delta = a[:, :, None] - load[:, None, :]  # [X, S, P_x]
    # [X, P_x]: a gather on CPUs, where XLA fused into the [X, S, P_x] candidates below would
    # recompute the S-term sums for every candidate; a broadcast (fusible) elsewhere.
    g_load = lax.platform_dependent(
        device_load,
        cpu=lambda d: d[:, device_of_slot],
        default=lambda d: jnp.repeat(d, slots, axis=1),
    )
    new_h = top[:, None, None] - delta
    new_g = g_load[:, None, :] + delta
    pair = jnp.maximum(new_h, new_g)
    tol = 1e-6 * top[:, None, None]
    ok = (
        (device_of_slot[None, None, :] != h[:, None, None])
        & (delta > 0)
        & (pair < top[:, None, None] - tol)
    )
    return _Heaviest(h=h, top=top, on_h=on_h, pair=pair, ok=ok)


def _bit_words(flags: jax.Array) -> jax.Array:
    """uint32[..., W] with bit g % 32 of word g // 32 set where ``flags`` bool[..., G] is set."""
    width = flags.shape[-1]
    words = -(-width // 32)
    flags = jnp.pad(flags, [(0, 0)] * (flags.ndim - 1) + [(0, words * 32 - width)])
    flags = flags.reshape(*flags.shape[:-1], words, 32).astype(jnp.uint32)
    return jnp.sum(flags << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _bit(words: jax.Array, g: jax.Array) -> jax.Array:
    """bool: bit ``g`` of ``words`` uint32[..., W] (g int32, broadcast against ``words[..., 0]``)."""
    if words.shape[-1] == 1:
        word = words[..., 0]
    else:
        hit = jnp.arange(words.shape[-1], dtype=jnp.int32) == (g // 32)[..., None]
        word = _pick(words, hit, -1)
    return ((word >> (g % 32).astype(jnp.uint32)) & 1) == 1


def _held_change(hv: _Heaviest, held_bits: jax.Array, slots: int) -> jax.Array:
    """Change in the number of replicas away from the devices that held them before, for every
    candidate swap: int32[X, S, P_x].

    Args:
      hv: the candidate swaps.
      held_bits: uint32[X, P_x, W] bit g: whether device g held the slot's expert before (a row
        that travels with the slot's replica, so that no step looks anything up by expert id).
      slots: S.
    """
    x_rows, p_x, words = held_bits.shape
    devices = p_x // slots
    device_ids = jnp.arange(devices, dtype=jnp.int32)
    device_of_slot = jnp.arange(p_x, dtype=jnp.int32) // slots
    # Replica i of h moved to slot j's device; replica j moved to h; before: where they are.
    i_bits = _pick(held_bits.reshape(x_rows, devices, slots, words), hv.on_h[:, :, None, None], 1)
    i_to = _bit(i_bits[:, :, None, :], device_ids)  # [X, S, D_x]
    h_had_j = _bit(held_bits, hv.h[:, None])  # [X, P_x]
    h_had_i = _bit(i_bits, hv.h[:, None])  # [X, S]
    here = _bit(held_bits, device_of_slot)  # [X, P_x]
    after = jnp.repeat(~i_to, slots, axis=2).astype(jnp.int32)  # [X, S, P_x]
    after = after + (~h_had_j)[:, None, :]
    before = (~h_had_i)[:, :, None].astype(jnp.int32)
    before = before + (~here)[:, None, :]
    return after - before


class _Rows(NamedTuple):
    """The per-row state of swap refinement (any leaf may be None where unused).

    load: float32[X, P_x]; pay: tuple of int32[X, P_x]; active: bool[X] whether the row may still
    swap; stop: float32[X]; held_bits: uint32[X, P_x, W] (see `_held_change`).
    """

    load: jax.Array
    pay: tuple[jax.Array, ...]
    active: jax.Array
    stop: jax.Array | None
    held_bits: jax.Array | None


def _swap_step(rows: _Rows, it: jax.Array, slots: int, max_iters: int) -> _Rows:
    """One swap per active row (see `swap_refine`); rows are independent of each other.

    The two slots are read and written through one-hot selects against the slot index, not
    gathers and scatters: on GPUs the whole swap then fuses into a few kernels."""
    x_rows, p_x = rows.load.shape
    hv = _heaviest(rows.load, slots)
    pair = hv.pair
    if rows.held_bits is not None:
        change = _held_change(hv, rows.held_bits, slots)
        pair = pair + change.astype(jnp.float32) * (2.0 * hv.top[:, None, None])
    score = jnp.where(hv.ok, pair, jnp.inf).reshape(x_rows, slots * p_x)
    best, low = first_argmin(score)
    found = rows.active & jnp.isfinite(low) & (it < max_iters)
    if rows.stop is not None:
        found = found & (hv.top > rows.stop)
    src = hv.h * slots + best // p_x
    dst = best % p_x
    iota = jnp.arange(p_x, dtype=jnp.int32)
    # [X, 2, P_x]: the source and the destination slot; all False where the row does not swap.
    hit = (iota == jnp.stack([src, dst], axis=1)[:, :, None]) & found[:, None, None]

    def swap(v):  # both slots read by one reduction, written by one select
        h2 = hit.reshape(hit.shape + (1,) * (v.ndim - 2))
        vs, vd = jnp.unstack(_pick(v[:, None], h2, 2), axis=1)
        return jnp.where(h2[:, 0], vd[:, None], jnp.where(h2[:, 1], vs[:, None], v))

    held_bits = None if rows.held_bits is None else swap(rows.held_bits)
    return rows._replace(
        load=swap(rows.load),
        pay=tuple(swap(v) for v in rows.pay),
        active=found,
        held_bits=held_bits,
    )


def _swap_loop(rows: _Rows, it: jax.Array, slots: int, max_iters: int, until: int):
    """Swap steps (`_UNROLL` per trip) while more than ``until`` rows are active; (rows, it)."""

    def body(state):
        r, i = state
        for _ in range(_UNROLL):
            r = _swap_step(r, i, slots, max_iters)
            i = i + 1
        return r, i

    def cond(state):
        r, i = state
        return (i < max_iters) & (jnp.sum(r.active.astype(jnp.int32)) > until)

    return lax.while_loop(cond, body, (rows, it))


def swap_refine(
    slot_load: jax.Array,
    payload: tuple[jax.Array, ...],
    slots: int,
    stop: jax.Array | None = None,
    held: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Lowers each row's heaviest device by swapping two replicas between devices, while that helps.

    Each swap takes the heaviest device h (lowest index on ties) and the pair (replica i of h,
    replica j of another device g) that minimises ``max(load_h - a_i + a_j, load_g - a_j + a_i)``
    among those that lower it below ``load_h`` (first such pair in (i, g, j) order on ties). The pair
    maximum strictly falls and no other device changes, so a row's maximum never rises and the loop
    ends; rows stop independently. Slot counts per device do not change.

    Most rows stop after a few swaps and a few need many, so the rows still active are gathered
    into smaller batches as the others stop (X, then X / 4, then X / 16 rows per step): every row
    goes through exactly the same swaps as alone, at a fraction of the work.

    Args:
      slot_load: float32[X, P_x] replica loads, device-major (S slots per device).
      payload: int32[X, P_x] arrays that travel with the replicas (expert ids, ranks).
      slots: S.
      stop: optional float32[X]; a row stops as soon as its heaviest device is at or under it.
      held: optional bool[X, P_x // S, n]: whether each device held each expert before
        (``payload[0]`` holds the expert ids in [0, n)). Then the pair is chosen by the change in
        the number of replicas away from the devices that held them first (fewest), the pair
        maximum second.

    Returns:
      The swapped (slot_load, payload).
    """
    x_rows, p_x = slot_load.shape
    if p_x // slots == 1:
        return slot_load, payload
    max_iters = _MAX_SWAPS_PER_DEVICE * p_x
    active = jnp.ones((x_rows,), bool)
    if stop is not None:  # rows already at or under ``stop`` never swap: not active from the start
        active = fold_sum(slot_load.reshape(x_rows, p_x // slots, slots)).max(axis=1) > stop
    held_bits = None
    if held is not None:  # [X, P_x, W]: the held row of each slot's expert, as bits
        held_t = jnp.swapaxes(held, 1, 2)  # [X, n, D_x]
        held_bits = jnp.take_along_axis(_bit_words(held_t), payload[0][:, :, None], 1)
    state = _Rows(slot_load, tuple(payload), active, stop, held_bits)
    sizes = [x_rows] + [x_rows // k for k in _COMPACT if x_rows // k >= _COMPACT_MIN_ROWS]
    state, it = _swap_loop(state, jnp.int32(0), slots, max_iters, sizes[1] if sizes[1:] else 0)
    for n, until in zip(sizes[1:], [*sizes[2:], 0][: len(sizes) - 1], strict=True):
        # The active rows first (all of them: at most n are), then inactive ones in row order.
        _, idx = sort_by_key((~state.active).astype(jnp.int32))
        idx = idx[:n]
        sub, it = _swap_loop(
            jax.tree.map(lambda v, i=idx: v[i], state), it, slots, max_iters, until
        )
        state = jax.tree.map(lambda v, s, i=idx: v.at[i].set(s, unique_indices=True), state, sub)
    return state.load, state.pay

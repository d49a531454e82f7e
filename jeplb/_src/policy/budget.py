"""A move budget for the migration-aware mode: at most B remote copies per layer.

Letters: L layers, E experts, P slots, D devices, S = P // D; K = E set labels.

A walk from the old placement O to the migration-aware placement N, the same for every budget;
the result is its best point within the budget. Each step sets one more slot (or a set of
slots) to its N expert for good:

* single moves, for a slot p that differs from N (y its N expert, x its current one): a swap
  (the first other such slot holding y takes x), a replacement (x dropped, where x has another
  replica) or a relocation (x moves to the first such slot that N gives x, whose expert is
  dropped, where that one has another replica);
* set moves, in the hierarchical policy: the experts of a group that N puts on another node, and
  every expert linked to them through changed slots, change together (so a group stays on one
  node).

Every point keeps every expert present and every device's S slots. Each step takes the move that
lowers the heaviest device the most per added remote copy while any does, else the one that
lowers the sum of squared device loads the most per copy (ties: fewer copies, then the lowest
index). A point's cost is its remote copies against O (slots whose expert the device did not
hold: `jeplb.remote_copies`). The result is, per layer, the point with the lightest heaviest
device among those within the budget (ties: the cheaper, then the earlier): balance never falls
as the budget grows, and a budget of at least N's copies gives a placement at least as balanced
as N. See ``docs/policy.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.policy.ops import fold_sum, lexicographic_first, rows, slot_ranks

__all__ = ["within_budget"]


def _counts(phy2log: jax.Array, num_log: int) -> jax.Array:
    """int32[L, E] slots of each expert (-1 slots ignored)."""
    ids = jnp.where(phy2log >= 0, phy2log, num_log)
    count = jnp.zeros((phy2log.shape[0], num_log + 1), jnp.int32)
    return count.at[rows(phy2log), ids].add(1)[:, :num_log]


def _device_loads(phy2log: jax.Array, w: jax.Array, slots: int) -> jax.Array:
    """float32[L, D] each device's load: the left-to-right sum of its slots' load / replica
    count."""
    num_layers, num_slots = phy2log.shape
    ids = jnp.where(phy2log >= 0, phy2log, 0)
    count = jnp.maximum(jnp.take_along_axis(_counts(phy2log, w.shape[1]), ids, 1), 1)
    per_slot = jnp.where(phy2log >= 0, jnp.take_along_axis(w, ids, 1) / count, 0.0)
    return fold_sum(per_slot.reshape(num_layers, num_slots // slots, slots))


def _per_device(phy2log: jax.Array, w: jax.Array, slots: int) -> jax.Array:
    """float32[L, E, D]: each expert's load on each device (replicas there x load / count)."""
    num_layers, num_slots = phy2log.shape
    num_log, num_dev = w.shape[1], num_slots // slots
    device = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32) // slots, phy2log.shape)
    ids = jnp.where(phy2log >= 0, phy2log, num_log)
    n = jnp.zeros((num_layers, num_log + 1, num_dev), jnp.int32)
    n = n.at[rows(phy2log), ids, device].add(1)[:, :num_log]
    count = jnp.maximum(jnp.sum(n, axis=2), 1).astype(jnp.float32)
    return n.astype(jnp.float32) * (w / count)[:, :, None]


def _labels(old: jax.Array, new: jax.Array, changed: jax.Array, link: jax.Array) -> jax.Array:
    """int32[L, E]: the smallest expert of each expert's connected set (min-label propagation).

    Edges: each changed slot joins its old and its new expert; ``link`` bool[L, E] joins expert
    e to e + 1 (e < E - 1).
    """
    num_log = link.shape[1]
    a = jnp.where(changed & (old >= 0), old, num_log)  # padded: no edge
    b = jnp.where(changed, new, num_log)
    e_next = jnp.minimum(jnp.arange(num_log, dtype=jnp.int32) + 1, num_log - 1)
    c = jnp.where(link, e_next, num_log)
    pad = jnp.full((old.shape[0], 1), num_log, jnp.int32)

    def step(carry):
        lab, _ = carry
        ext = jnp.concatenate([lab, pad], axis=1)  # label of the padding: E (never the min)
        m_slot = jnp.minimum(jnp.take_along_axis(ext, a, 1), jnp.take_along_axis(ext, b, 1))
        m_link = jnp.minimum(lab, jnp.take_along_axis(ext, c, 1))
        out = ext.at[rows(lab), a].min(m_slot).at[rows(lab), b].min(m_slot)
        out = out.at[rows(lab), c].min(m_link)[:, :num_log]
        out = jnp.minimum(out, m_link)
        out = jnp.take_along_axis(out, out, 1)  # pointer jump
        return out, jnp.any(out != lab)

    lab0 = jnp.broadcast_to(jnp.arange(num_log, dtype=jnp.int32), link.shape)
    return lax.while_loop(lambda c: c[1], step, (lab0, jnp.array(True)))[0]


def _first_node(phy2log: jax.Array, num_log: int, nodes: int) -> jax.Array:
    """int32[L, E] the node of each expert's first slot (an absent expert: the last node)."""
    num_layers, num_slots = phy2log.shape
    ids = jnp.where(phy2log >= 0, phy2log, num_log)
    first = jnp.full((num_layers, num_log + 1), num_slots - 1, jnp.int32)
    first = first.at[rows(phy2log), ids].min(jnp.arange(num_slots, dtype=jnp.int32))
    return first[:, :num_log] // (num_slots // nodes)


def _group_links(old: jax.Array, new: jax.Array, num_log: int, groups: int, nodes: int):
    """bool[L, E]: link expert e to e + 1 of the same group where some expert of the group has its
    first slot on another node in ``new`` than in ``old`` (a group changes node as a whole)."""
    size = num_log // groups
    moved = _first_node(old, num_log, nodes) != _first_node(new, num_log, nodes)
    moved = jnp.repeat(jnp.any(moved.reshape(-1, groups, size), axis=2), size, axis=1)
    not_last = jnp.arange(num_log) % size != size - 1
    return moved & not_last


def _component_delta(lab: jax.Array, delta_e: jax.Array) -> jax.Array:
    """float32[L, K, D]: the sum of ``delta_e`` [L, E, D] over the experts of each label, left to
    right in expert order (one scatter per rank within the set, each without collisions)."""
    num_log = lab.shape[1]
    rank = slot_ranks(lab)
    size = jnp.max(rank) + 1

    def body(carry):
        r, acc = carry
        idx = jnp.where(rank == r, lab, num_log)
        return r + 1, acc.at[rows(lab), idx].add(delta_e, mode="drop")

    acc = jnp.zeros_like(delta_e)
    return lax.while_loop(lambda c: c[0] < size, body, (jnp.int32(0), acc))[1]


class _Walk(NamedTuple):
    """What every step of the walk reads (L, P, E, K = E, D as in the module docstring).

    old, new: int32[L, P]; w: float32[L, E]; device: int32[P] the device of each slot; remote:
    bool[L, D, E] whether an expert on a device would be a remote copy (the device did not hold
    it); free: bool[L, P] changed slots outside group moves (moved one at a time); comp:
    int32[L, P] the set of each changed slot; locked: bool[L, K] the sets that move whole (a
    group changes node); delta: float32[L, K, D] each such set's change of each device's load;
    lock_cost: int32[L, K] its remote copies; count_new: int32[L, E] replicas in ``new``.
    """

    old: jax.Array
    new: jax.Array
    w: jax.Array
    device: jax.Array
    remote: jax.Array
    free: jax.Array
    comp: jax.Array
    locked: jax.Array
    delta: jax.Array
    lock_cost: jax.Array
    count_new: jax.Array


def _prepare(old, new, w, *, slots, groups, nodes) -> _Walk:
    """The tables of the walk (once per call)."""
    num_layers, num_slots = old.shape
    num_log, num_dev = w.shape[1], num_slots // slots
    changed = new != old
    device = jnp.arange(num_slots, dtype=jnp.int32) // slots
    ids = jnp.where(old >= 0, old, num_log)
    held = jnp.zeros((num_layers, num_dev, num_log + 1), jnp.int32)
    held = held.at[rows(old), device, ids].add(1)[:, :, :num_log] > 0
    if nodes > 1:
        link = _group_links(old, new, num_log, groups, nodes)
    else:
        link = jnp.zeros((num_layers, num_log), bool)
    lab = _labels(old, new, changed, link)
    comp = jnp.take_along_axis(lab, new, 1)
    tally = jnp.zeros((num_layers, num_log + 1), jnp.int32)
    locked = tally.at[rows(lab), lab].add(link.astype(jnp.int32))[:, :num_log] > 0
    in_locked = jnp.take_along_axis(locked, comp, 1) & changed
    idx = jnp.where(in_locked, comp, num_log)
    far = _remote_slots(new, device, ~held) & changed
    lock_cost = tally.at[rows(idx), idx].add(far.astype(jnp.int32))[:, :num_log]
    delta = _component_delta(lab, _per_device(new, w, slots) - _per_device(old, w, slots))
    return _Walk(
        old,
        new,
        w,
        device,
        ~held,
        changed & ~in_locked,
        comp,
        locked,
        delta,
        lock_cost,
        _counts(new, num_log),
    )


def _remote_slots(phy2log: jax.Array, device: jax.Array, remote: jax.Array) -> jax.Array:
    """bool[L, P]: slots whose expert is a remote copy on its device (-1 slots: never)."""
    num_log = remote.shape[2]
    flat = device * num_log + jnp.where(phy2log >= 0, phy2log, 0)
    far = jnp.take_along_axis(remote.reshape(remote.shape[0], -1), flat, 1)
    return far & (phy2log >= 0)


class _Move(NamedTuple):
    """One candidate move per slot p, fields [L, P]: p's expert ``out_p`` becomes ``in_p``;
    optionally slot ``s`` (P: none) changes from ``out_s`` to ``in_s``; the replica count of
    ``add`` rises by one and that of ``drop`` falls by one (-1: none); ``valid`` where allowed."""

    out_p: jax.Array
    in_p: jax.Array
    s: jax.Array
    out_s: jax.Array
    in_s: jax.Array
    add: jax.Array
    drop: jax.Array
    valid: jax.Array


def _gather(table: jax.Array, expert: jax.Array, fill) -> jax.Array:
    """table[l, expert[l, p]] ([L, E] or [L, E, D] tables), ``fill`` where expert < 0."""
    idx = jnp.maximum(expert, 0)
    if table.ndim == 3:
        return jnp.where(
            (expert >= 0)[..., None], jnp.take_along_axis(table, idx[..., None], 1), fill
        )
    return jnp.where(expert >= 0, jnp.take_along_axis(table, idx, 1), fill)


def _effect(mv: _Move, loads, n, count, t: _Walk):
    """(device loads float32[L, P, D] after each move, remote copies it adds int32[L, P])."""
    num_slots, num_dev = mv.s.shape[1], loads.shape[1]
    change = (mv.add != mv.drop)[..., None]

    def per_replica(e):  # load of one replica of e before and after the move
        c = _gather(count, e, 1).astype(jnp.float32)
        after = c + (e == mv.add) - (e == mv.drop)
        we = _gather(t.w, e, 0.0)
        return we / jnp.maximum(c, 1.0), we / jnp.maximum(after, 1.0)

    rescale = jnp.zeros(loads.shape[:1] + mv.s.shape[1:] + (num_dev,), jnp.float32)
    for e in (mv.add, mv.drop):
        before, after = per_replica(e)
        n_e = _gather(n, e, 0).astype(jnp.float32)
        rescale = rescale + jnp.where(change, n_e * (after - before)[..., None], 0.0)
    dev_ids = jnp.arange(num_dev, dtype=jnp.int32)
    dev_s = jnp.where(mv.s < num_slots, jnp.take(t.device, jnp.minimum(mv.s, num_slots - 1)), -1)
    at_p = (t.device[:, None] == dev_ids)[None].astype(jnp.float32)
    at_s = (dev_s[..., None] == dev_ids).astype(jnp.float32)
    slot_p = per_replica(mv.in_p)[1] - per_replica(mv.out_p)[1]
    slot_s = per_replica(mv.in_s)[1] - per_replica(mv.out_s)[1]
    after = loads[:, None, :] + rescale + at_p * slot_p[..., None] + at_s * slot_s[..., None]
    dev_p = t.device[None, :]
    added = _far(t, dev_p, mv.in_p) - _far(t, dev_p, mv.out_p)
    added = added + jnp.where(dev_s >= 0, _far(t, dev_s, mv.in_s) - _far(t, dev_s, mv.out_s), 0)
    return after, added


def _first_slot(key: jax.Array, where: jax.Array, num_log: int) -> jax.Array:
    """int32[L, E]: the first slot s with ``where[s]`` and ``key[s]`` = e (P: none)."""
    num_layers, num_slots = key.shape
    iota = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), key.shape)
    first = jnp.full((num_layers, num_log + 1), num_slots, jnp.int32)
    return first.at[rows(key), jnp.where(where & (key >= 0), key, num_log)].min(iota)[:, :num_log]


def _single_moves(m: jax.Array, loads: jax.Array, t: _Walk):
    """Three moves of every slot p that still differs from ``new`` (outside group moves): p takes
    its ``new`` expert y in place of x, and

    * swap: the first such slot q holding y takes x (counts unchanged);
    * replace: x is dropped there (where x has another replica);
    * relocate: x moves to the first such slot s whose ``new`` expert is x, and s's expert z is
      dropped (where z has another replica): a replica passes from z to y.

    Every expert stays present, and each move sets p (and q or s where that gets its ``new``
    expert) to its ``new`` expert for good, so the walk ends at ``new``.

    Returns:
      (loads float32[L, 3P, D] after each move, added copies int32[L, 3P], valid bool[L, 3P],
      moves: the three `_Move` of the slots).
    """
    num_slots, num_log = m.shape[1], t.w.shape[1]
    open_ = t.free & (m != t.new)
    x, y = m, t.new
    none = jnp.full_like(m, -1)
    count = _counts(m, num_log)
    n = _per_device_counts(m, num_log, loads.shape[1])
    q = _gather(_first_slot(m, open_, num_log), y, num_slots)
    s = _gather(_first_slot(t.new, open_, num_log), x, num_slots)
    z = jnp.take_along_axis(m, jnp.minimum(s, num_slots - 1), 1)
    swap = _Move(x, y, q, y, x, none, none, open_ & (q < num_slots))
    many_x = (x < 0) | (_gather(count, x, 0) >= 2)
    replace = _Move(x, y, jnp.full_like(m, num_slots), none, none, y, x, open_ & many_x)
    many_z = (z < 0) | (z == y) | (_gather(count, z, 0) >= 2)
    relocate = _Move(x, y, s, z, x, y, z, open_ & (x >= 0) & (s < num_slots) & many_z)
    moves = (swap, replace, relocate)
    effects = [_effect(mv, loads, n, count, t) for mv in moves]
    after = jnp.concatenate([e[0] for e in effects], axis=1)
    added = jnp.concatenate([e[1] for e in effects], axis=1)
    valid = jnp.concatenate([mv.valid for mv in moves], axis=1)
    return after, added, valid, moves


def _far(t: _Walk, device: jax.Array, expert: jax.Array) -> jax.Array:
    """int32: 1 where ``expert`` on ``device`` is a remote copy (-1 experts: 0); shapes [L, P]."""
    num_log = t.w.shape[1]
    flat = device * num_log + jnp.maximum(expert, 0)
    far = jnp.take_along_axis(t.remote.reshape(t.remote.shape[0], -1), flat, 1)
    return (far & (expert >= 0)).astype(jnp.int32)


def _per_device_counts(m: jax.Array, num_log: int, num_dev: int) -> jax.Array:
    """int32[L, E, D]: replicas of each expert on each device."""
    num_layers, num_slots = m.shape
    device = jnp.broadcast_to(
        jnp.arange(num_slots, dtype=jnp.int32) // (num_slots // num_dev), m.shape
    )
    n = jnp.zeros((num_layers, num_log + 1, num_dev), jnp.int32)
    return n.at[rows(m), jnp.where(m >= 0, m, num_log), device].add(1)[:, :num_log]


def _cost(m: jax.Array, t: _Walk) -> jax.Array:
    """int32[L]: remote copies of ``m`` against the old placement (`jeplb.remote_copies`)."""
    return jnp.sum(_remote_slots(m, t.device, t.remote), axis=1, dtype=jnp.int32)


def _pick(loads, single, locked_after, t: _Walk, done):
    """The next move of each layer: (index int32[L] into the 3P single moves then the K set
    moves, valid bool[L]).

    While a move lowers the heaviest device: the largest drop per added copy. Otherwise the
    largest drop of the sum of squared device loads per added copy (evening out the devices
    below the heaviest one, which later moves can then use). Ties: fewer added copies, then the
    lowest index.
    """
    after, added, valid, _ = single
    after = jnp.concatenate([after, locked_after], axis=1)  # [L, P + K, D]
    added = jnp.concatenate([added, t.lock_cost], axis=1)
    valid = jnp.concatenate([valid, t.locked & ~done], axis=1)
    copies = jnp.maximum(added, 1).astype(jnp.float32)
    gain = jnp.max(loads, axis=1)[:, None] - jnp.max(after, axis=2)
    spread = fold_sum(loads * loads)[:, None] - fold_sum(after * after)
    lowers = valid & (gain > 0)
    key = jnp.where(
        jnp.any(lowers, axis=1, keepdims=True),
        jnp.where(lowers, gain / copies, -jnp.inf),
        jnp.where(valid, spread / copies, -jnp.inf),
    )
    width = after.shape[1]
    order = (added + 2) * width + jnp.arange(width, dtype=jnp.int32)
    first, _ = lexicographic_first(key, order, 1, largest=True)
    return first % width, jnp.any(valid, axis=1)


def _apply(m, index, ok, single, t: _Walk, done):
    """``m`` and ``done`` after each layer's chosen move (where ``ok``)."""
    num_slots = m.shape[1]
    kind = index // num_slots  # 0 swap, 1 replace, 2 relocate, 3.. a set
    p = (index % num_slots)[:, None]
    iota = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    for i, mv in enumerate(single[3]):
        here = (ok & (kind == i))[:, None]
        s = jnp.take_along_axis(mv.s, p, 1)
        in_s = jnp.take_along_axis(mv.in_s, p, 1)
        in_p = jnp.take_along_axis(mv.in_p, p, 1)
        m = jnp.where(here & (iota == s), in_s, m)
        m = jnp.where(here & (iota == p), in_p, m)
    k = (index - 3 * num_slots)[:, None]
    is_set = ok & (index >= 3 * num_slots)
    take = is_set[:, None] & (t.comp == k) & (t.new != t.old) & ~t.free
    m = jnp.where(take, t.new, m)
    kids = jnp.arange(t.locked.shape[1], dtype=jnp.int32)[None, :]
    return m, done | (is_set[:, None] & (kids == k))


def within_budget(
    old: jax.Array,
    new: jax.Array,
    w: jax.Array,
    budget: jax.Array,
    *,
    slots: int,
    groups: int,
    nodes: int,
) -> jax.Array:
    """The best placement on a fixed walk from ``old`` to ``new`` with at most ``budget`` remote
    copies per layer (see the module docstring).

    Args:
      old: int32[L, P] the current placement (-1 = empty; ids outside [0, E) already -1).
      new: int32[L, P] the migration-aware placement (every slot filled).
      w: float32[L, E] the loads.
      budget: int32 scalar or [L], remote copies allowed per layer (>= 0).
      slots: S = P // D.
      groups, nodes: the effective groups and nodes (a group changes node as a whole).

    Returns:
      int32[L, P].
    """
    num_layers = old.shape[0]
    t = _prepare(old, new, w, slots=slots, groups=groups, nodes=nodes)
    budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), (num_layers,))

    def step(carry):
        m, done, loads, best, best_max, best_cost, _ = carry
        single = _single_moves(m, loads, t)
        index, ok = _pick(loads, single, loads[:, None, :] + t.delta, t, done)
        m, done = _apply(m, index, ok, single, t, done)
        loads = _device_loads(m, w, slots)
        now, cost = jnp.max(loads, axis=1), _cost(m, t)
        better = (cost <= budget) & ((now < best_max) | ((now == best_max) & (cost < best_cost)))
        better = better & ok
        best = jnp.where(better[:, None], m, best)
        best_max = jnp.where(better, now, best_max)
        best_cost = jnp.where(better, cost, best_cost)
        return m, done, loads, best, best_max, best_cost, jnp.any(ok)

    loads = _device_loads(old, w, slots)
    zero = jnp.zeros((num_layers,), jnp.int32)
    done = jnp.zeros(t.locked.shape, bool)
    carry = (old, done, loads, old, jnp.max(loads, 1), zero, jnp.array(True))
    return lax.while_loop(lambda c: c[-1], step, carry)[3]

"""A move budget for the migration-aware mode: at most B remote copies per layer.

Letters: L layers, E experts, P slots, D devices, S = P // D; K = E component labels.

The migration-aware placement N changes some slots of the old placement O. Changed slots are
linked through the experts they hold before and after (and, in the hierarchical policy, the
experts of a group that changes node are linked to each other); each connected set of experts is
a *move*: its slots all take their O value or all their N value, and either way every expert of
the set keeps at least one slot, every group stays on one node and every device keeps S slots.
A move costs its remote copies (slots whose new expert the device did not hold before: what
crosses the network; `jeplb.remote_copies`).

From O, moves are accepted one at a time, the same sequence whatever the budget: the one that
lowers the heaviest device the most per row while any does (ties: fewer rows, then the lowest
label), else the one that raises it the least. The result is the best point of that sequence
within the budget (lowest heaviest device; ties: the earlier, cheaper point), so balance never
falls when the budget grows, and a budget of at least N's copies gives a placement at least as
balanced as N with at most its copies. See ``docs/policy.md``.
"""

from __future__ import annotations

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
    """The best placement between ``old`` and ``new`` with at most ``budget`` remote copies per
    layer (see the module docstring).

    Args:
      old: int32[L, P] the current placement (-1 = empty; ids outside [0, E) already -1).
      new: int32[L, P] the migration-aware placement (every slot filled, experts that stay on a
        device in their old slot).
      w: float32[L, E] the loads.
      budget: int32 scalar or [L], remote copies allowed per layer (>= 0).
      slots: S = P // D.
      groups, nodes: the effective groups and nodes (a group changes node as a whole).

    Returns:
      int32[L, P]: each slot's ``old`` or ``new`` expert.
    """
    num_layers, num_slots = old.shape
    num_log = w.shape[1]
    shape3 = (num_layers, num_slots // slots, slots)
    changed = new != old
    held = jnp.any(new.reshape(shape3)[..., :, None] == old.reshape(shape3)[..., None, :], -1)
    remote = changed & ~held.reshape(num_layers, num_slots)
    if nodes > 1:
        link = _group_links(old, new, num_log, groups, nodes)
    else:
        link = jnp.zeros((num_layers, num_log), bool)
    lab = _labels(old, new, changed, link)
    comp = jnp.take_along_axis(lab, new, 1)  # [L, P] the move of each changed slot
    idx = jnp.where(changed, comp, num_log)
    tally = jnp.zeros((num_layers, num_log + 1), jnp.int32)
    active = tally.at[rows(idx), idx].add(1)[:, :num_log] > 0  # [L, K]
    cost = tally.at[rows(idx), idx].add(remote.astype(jnp.int32))[:, :num_log]
    delta = _component_delta(lab, _per_device(new, w, slots) - _per_device(old, w, slots))
    budget = jnp.broadcast_to(jnp.asarray(budget, jnp.int32), (num_layers,))
    order = cost * num_log + jnp.arange(num_log, dtype=jnp.int32)  # ties: fewer rows, label

    def placement(acc):
        return jnp.where(changed & jnp.take_along_axis(acc, comp, 1), new, old)

    def step(carry):
        acc, spent, best, best_max, loads, live = carry
        cur_max = jnp.max(loads, axis=1)
        after = jnp.max(loads[:, None, :] + delta, axis=2)  # [L, K]
        gain = cur_max[:, None] - after
        key = jnp.where(gain > 0, gain / jnp.maximum(cost, 1).astype(jnp.float32), gain)
        open_ = active & ~acc
        key = jnp.where(open_, key, -jnp.inf)
        k, _ = lexicographic_first(key, order, 1, largest=True)
        k = k % num_log
        take = live & jnp.any(open_, axis=1)
        acc = acc | ((jnp.arange(num_log) == k[:, None]) & take[:, None])
        spent = spent + jnp.where(take, jnp.take_along_axis(cost, k[:, None], 1)[:, 0], 0)
        loads = _device_loads(placement(acc), w, slots)
        now = jnp.max(loads, axis=1)
        better = take & (spent <= budget) & (now < best_max)
        best = jnp.where(better[:, None], acc, best)
        best_max = jnp.where(better, now, best_max)
        live = take & (spent <= budget) & jnp.any(active & ~acc, axis=1)
        return acc, spent, best, best_max, loads, live

    none = jnp.zeros((num_layers, num_log), bool)
    loads = _device_loads(old, w, slots)
    live = jnp.any(active, axis=1)
    carry = (none, jnp.zeros((num_layers,), jnp.int32), none, jnp.max(loads, 1), loads, live)
    best = lax.while_loop(lambda c: jnp.any(c[-1]), step, carry)[2]
    return placement(best)

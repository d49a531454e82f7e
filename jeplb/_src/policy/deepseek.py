"""The from-scratch placement: DeepSeek's hierarchical EPLB policy, vectorised over rows.

Letters: L layers, E logical experts, P physical slots, D devices, S = P // D slots per device.
Per node: E_n = E // nodes experts, P_n = P // nodes slots, D_n = D // nodes devices; node rows
X = L * nodes.

The three steps, each vectorised over layers (and nodes):

1. pack the expert groups onto nodes (balanced packing, groups per node equal);
2. within each node, give the experts P_n replicas: one more at a time to the expert with the
   largest load per replica (a top-k over the candidates ``load / j``, one sort instead of a loop);
3. pack each node's replicas onto its devices (balanced packing, S per device).

Balanced packing is a `lax.scan` over the items, heaviest first, each going to the lightest pack with
room. The replica ranks and the slot order within a device (the order in which the device received
its replicas) are those of the reference, which reproduces DeepSeek's README example exactly.

Exactness and ties (the same rules on every backend):

* group loads are float32 sums in expert order, a replica's load is ``load / count`` in float32, a
  pack's load is the float32 running sum of its items in packing order; every sum is an explicit
  left-to-right chain, so no backend's reduction order enters;
* items are packed heaviest first; equal loads in increasing index (a stable sort with the index as
  the second key);
* an item goes to the lightest pack with room; equal loads to the lowest pack index;
* a redundant replica goes to the expert with the largest load per replica; equal values to the
  lowest index (the node-local order of step 1 in the hierarchical policy, the expert id in the
  global one).

torch's sort and max do not promise an order for equal values, so on inputs with ties the reference
may differ from this module; without ties both give the same replica counts and the same experts on
every device (and the same slots).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.policy.ops import descending_order, fold_sum, inverse, lexicographic_first, rows

__all__ = [
    "NodeItems",
    "NodeLayout",
    "lightest_pack",
    "node_items",
    "node_layout",
    "node_slots",
    "pack",
    "replicate",
]

# Replication uses one top-k over E_n * (P_n - E_n) candidates per row up to this size; above it,
# a loop of P_n - E_n argmax steps (the same result, less memory).
_TOPK_MAX_CANDIDATES = 1 << 16


class NodeLayout(NamedTuple):
    """The from-scratch placement of each node row, before mapping back to global ids.

    slot_mlog: int32[X, P_n] node-local expert of each node-local slot.
    slot_rank: int32[X, P_n] replica rank of each slot.
    slot_load: float32[X, P_n] load of each slot (the expert's load / its count).
    count: int32[X, E_n] replicas per node-local expert.
    mlog2log: int32[L, E] logical id of each node-local id (node-major).
    log2mlog: int32[L, E] inverse of ``mlog2log``.
    """

    slot_mlog: jax.Array
    slot_rank: jax.Array
    slot_load: jax.Array
    count: jax.Array
    mlog2log: jax.Array
    log2mlog: jax.Array


def lightest_pack(
    pack_load: jax.Array, room: jax.Array, pref: jax.Array | None = None
) -> jax.Array:
    """int32[X]: each row's lightest pack with room, equal loads the lowest index; ``pref``
    int32[X] (-1: none) wins while it has room.

    Packs are on the leading axis, rows on the trailing one: XLA:CPU reduces over the leading axis
    across all rows at once, several times faster than over a short trailing axis. The first
    (key, index) pair by `lexicographic_first`, full packs ranked after every pack with room, so
    loads that overflowed to inf never pick a full pack.

    Args:
      pack_load: float32[m, X] (>= 0); room: bool[m, X], some pack with room in every row.
      pref: optional int32[X].
    """
    num_packs = pack_load.shape[0]
    pack_ids = jnp.arange(num_packs, dtype=jnp.int32)[:, None]
    key = jnp.where(room, pack_load, jnp.inf)
    if pref is not None:
        key = jnp.where(room & (pack_ids == pref), -1.0, key)
    return lexicographic_first(key, jnp.where(room, pack_ids, pack_ids + num_packs), 0)[0]


def pack(
    load: jax.Array, num_packs: int, pref: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Balanced packing of the n items of each row into ``num_packs`` packs of n / num_packs items.

    Items are taken heaviest first (equal loads: lower index first); each goes to its preferred
    pack while that pack has room, else to the lightest pack that still has room (equal loads:
    lower pack index). Rows are independent: stacking two sets of rows on the leading axis packs
    both in one scan, the same result as two calls.

    Args:
      load: float32[X, n] item loads.
      num_packs: m, a divisor of n.
      pref: optional int32[X, n], each item's preferred pack (-1: none). Without it, packs of a
        single item hold the items in index order.

    Returns:
      (pack, rank): int32[X, n] each item's pack and its arrival rank in that pack.
    """
    x_rows, n = load.shape
    cap = n // num_packs
    if cap == 1 and pref is None:
        iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x_rows, n))
        return iota, jnp.zeros((x_rows, n), jnp.int32)
    order = descending_order(load)
    if num_packs == 1:  # every item in the one pack, ranked in the order they are taken
        return jnp.zeros((x_rows, n), jnp.int32), inverse(order)
    pack_ids = jnp.arange(num_packs, dtype=jnp.int32)[:, None]

    def step(carry, x):  # packs on the leading axis (see `lightest_pack`)
        pack_load, pack_count = carry
        item_load, p = x if pref is not None else (x, None)
        k = lightest_pack(pack_load, pack_count < cap, p)
        hit = pack_ids == k
        rank = jnp.sum(jnp.where(hit, pack_count, 0), axis=0, dtype=jnp.int32)
        pack_load = jnp.where(hit, pack_load + item_load, pack_load)
        pack_count = pack_count + hit.astype(jnp.int32)
        return (pack_load, pack_count), (k, rank)

    init = (jnp.zeros((num_packs, x_rows), jnp.float32), jnp.zeros((num_packs, x_rows), jnp.int32))
    sorted_load = jnp.take_along_axis(load, order, axis=1)
    xs = sorted_load.T
    if pref is not None:
        xs = (xs, jnp.take_along_axis(pref, order, axis=1).T)
    _, (k_sorted, r_sorted) = lax.scan(step, init, xs, unroll=4)
    at = rows(order)
    pack_of = jnp.zeros((x_rows, n), jnp.int32).at[at, order].set(k_sorted.T, unique_indices=True)
    rank = jnp.zeros((x_rows, n), jnp.int32).at[at, order].set(r_sorted.T, unique_indices=True)
    return pack_of, rank


def _replicate_loop(load: jax.Array, extra: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The greedy of `replicate` as ``extra`` argmax steps (for rows with many candidates)."""
    x_rows, n = load.shape

    def step(i, carry):
        expert, rank, count = carry
        e = jnp.argmax(load / count.astype(jnp.float32), axis=1).astype(jnp.int32)
        r = jnp.take_along_axis(count, e[:, None], 1)[:, 0]
        expert = expert.at[:, i].set(e)
        rank = rank.at[:, i].set(r)
        count = count.at[jnp.arange(x_rows), e].add(1)
        return expert, rank, count

    zeros = jnp.zeros((x_rows, extra), jnp.int32)
    return lax.fori_loop(0, extra, step, (zeros, zeros, jnp.ones((x_rows, n), jnp.int32)))


def replicate(load: jax.Array, num_phy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gives the n experts of each row ``num_phy`` replicas in all, one more at a time to the expert
    with the largest load per replica (equal values: lower index).

    The j-th redundant replica of expert e (rank j) is worth ``load[e] / j``; the greedy takes the
    ``num_phy - n`` largest of these candidates in decreasing order, so one top-k gives the same
    sequence as the loop (``lax.top_k`` puts equal values in increasing index, and the candidate of
    expert e, rank j sits at index ``e * R + j - 1``).

    Args:
      load: float32[X, n].
      num_phy: replicas per row, >= n.

    Returns:
      (phy2log int32[X, num_phy], rank int32[X, num_phy], count int32[X, n]): the first n replicas
      are the experts themselves (rank 0), then the redundant ones in the order they were chosen.
    """
    x_rows, n = load.shape
    extra = num_phy - n
    base = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x_rows, n))
    if extra == 0:
        return base, jnp.zeros((x_rows, n), jnp.int32), jnp.ones((x_rows, n), jnp.int32)
    if n * extra <= _TOPK_MAX_CANDIDATES:
        divisors = jnp.arange(1, extra + 1, dtype=jnp.float32)
        cand = (load[:, :, None] / divisors).reshape(x_rows, n * extra)
        _, idx = lax.top_k(cand, extra)
        expert = (idx // extra).astype(jnp.int32)
        rank = (idx % extra + 1).astype(jnp.int32)
        count = jnp.ones((x_rows, n), jnp.int32).at[rows(expert), expert].add(1)
    else:
        expert, rank, count = _replicate_loop(load, extra)
    phy2log = jnp.concatenate([base, expert], axis=1)
    ranks = jnp.concatenate([jnp.zeros((x_rows, n), jnp.int32), rank], axis=1)
    return phy2log, ranks, count


class NodeItems(NamedTuple):
    """Steps 1 and 2 of the hierarchical policy: the replicas of each node row, not yet on devices.

    phy_mlog, phy_rank: int32[X, P_n] node-local expert and rank of each replica (`replicate`);
    rep_load: float32[X, P_n] its load; count: int32[X, E_n]; mlog2log, log2mlog: int32[L, E] as in
    `NodeLayout`.
    """

    phy_mlog: jax.Array
    phy_rank: jax.Array
    rep_load: jax.Array
    count: jax.Array
    mlog2log: jax.Array
    log2mlog: jax.Array


def node_items(w: jax.Array, num_slots: int, num_groups: int, num_nodes: int) -> NodeItems:
    """Steps 1 and 2 of the hierarchical policy on cleaned loads ``w`` float32[L, E]."""
    num_layers, num_log = w.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    slots_per_node = num_slots // num_nodes

    with jax.named_scope("groups_to_nodes"):
        group_load = fold_sum(w.reshape(num_layers, num_groups, group_size))
        node, node_rank = pack(group_load, num_nodes)
        first = (node * groups_per_node + node_rank) * group_size
        log2mlog = (first[:, :, None] + jnp.arange(group_size, dtype=jnp.int32)).reshape(
            num_layers, num_log
        )
        mlog2log = inverse(log2mlog)
    with jax.named_scope("replicate"):
        node_w = jnp.take_along_axis(w, mlog2log, axis=1).reshape(-1, log_per_node)
        phy_mlog, phy_rank, count = replicate(node_w, slots_per_node)
        rep_load = jnp.take_along_axis(node_w / count.astype(jnp.float32), phy_mlog, axis=1)
    return NodeItems(phy_mlog, phy_rank, rep_load, count, mlog2log, log2mlog)


def node_slots(
    items: NodeItems, device: jax.Array, device_rank: jax.Array, slots: int
) -> NodeLayout:
    """Step 3's result in slots: each replica at slot ``device * S + device_rank`` (int32[X, P_n]
    from `pack`)."""
    slot = device * slots + device_rank
    at = rows(slot)

    def to_slots(v):
        return jnp.zeros_like(v).at[at, slot].set(v, unique_indices=True)

    return NodeLayout(
        slot_mlog=to_slots(items.phy_mlog),
        slot_rank=to_slots(items.phy_rank),
        slot_load=to_slots(items.rep_load),
        count=items.count,
        mlog2log=items.mlog2log,
        log2mlog=items.log2mlog,
    )


def node_layout(
    w: jax.Array, num_slots: int, num_groups: int, num_nodes: int, num_devices: int
) -> NodeLayout:
    """Steps 1 to 3 of the hierarchical policy on cleaned loads ``w`` float32[L, E]."""
    items = node_items(w, num_slots, num_groups, num_nodes)
    with jax.named_scope("replicas_to_devices"):
        device, device_rank = pack(items.rep_load, num_devices // num_nodes)
        return node_slots(items, device, device_rank, num_slots // num_devices)

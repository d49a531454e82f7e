"""The placement policy: DeepSeek's EPLB in jnp, jit-able, with a migration-aware mode.

Letters: L layers, E logical experts, P physical slots (``num_replicas``), D GPUs (``num_gpus``),
S = P // D slots per GPU. In the hierarchical policy, per node: E_n = E // num_nodes experts,
P_n = P // num_nodes slots, D_n = D // num_nodes GPUs; node rows X = L * num_nodes.

The three steps of DeepSeek's hierarchical policy, each vectorised over layers (and nodes):

1. pack the expert groups onto nodes (balanced packing, groups per node equal);
2. within each node, give the experts P_n replicas: one more at a time to the expert with the
   largest load per replica (a top-k over the candidates ``load / j``, one sort instead of a loop);
3. pack each node's replicas onto its GPUs (balanced packing, S per GPU).

Balanced packing is a `lax.scan` over the items, heaviest first, each going to the lightest pack with
room. The replica ranks and the slot order within a GPU (the order in which the GPU received its
replicas) are those of the reference, which reproduces DeepSeek's README example exactly.

Exactness and ties (the same rules on every backend):

* loads are cast to float32; group loads are float32 sums in expert order, a replica's load is
  ``load / count`` in float32, a pack's load is the float32 running sum of its items in packing
  order, a GPU's load (refinement, migration) the float32 sum of its slots in slot order; every
  sum is an explicit left-to-right chain, so no backend's reduction order enters. Integer loads
  below 2**24 are exact, so integer token counts give the same placement everywhere.
* items are packed heaviest first; equal loads in increasing index (a stable sort with the index as
  the second key);
* an item goes to the lightest pack with room; equal loads to the lowest pack index;
* a redundant replica goes to the expert with the largest load per replica; equal values to the
  lowest index (the node-local order of step 1 in the hierarchical policy, the expert id in the
  global one).

torch's sort and max do not promise an order for equal values, so on inputs with ties the reference
may differ from this module; without ties both give the same replica counts and the same experts on
every GPU (and the same slots).

Migration-aware mode (``old_physical_to_logical`` given; ``_migrate``): the from-scratch placement
sets the target (its heaviest GPU per layer); candidate group-to-node assignments near the old
placement get their replica counts, a sticky packing (each replica on the GPU of the matching old
replica while it has room) and swap refinement down to the target plus 1%; the from-scratch
placement with nodes and GPUs relabelled to the old ones by overlap is the fallback. Each layer
keeps the qualifying result with the fewest remote copies, and experts that stay on a GPU keep
their slot. See ``docs/policy.md``.
"""

from __future__ import annotations

import collections
import numbers
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.checks import is_concrete

__all__ = ["rebalance_experts"]

# Number of times the jitted policy was traced, per static configuration (tests read it).
TRACE_COUNT: collections.Counter = collections.Counter()

# Replication uses one top-k over E_n * (P_n - E_n) candidates per row up to this size; above it,
# a loop of P_n - E_n argmax steps (the same result, less memory).
_TOPK_MAX_CANDIDATES = 1 << 16
# Swap refinement stops after this many swaps per row (each swap strictly lowers a row's maximum,
# so it ends on its own long before on any real input; the cap bounds the worst case).
_MAX_SWAPS_PER_GPU = 4


class _NodeLayout(NamedTuple):
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


def _rows(x: jax.Array) -> jax.Array:
    return jnp.arange(x.shape[0], dtype=jnp.int32)[:, None]


def _fold_sum(x: jax.Array) -> jax.Array:
    """float32 sum over the last axis, strictly left to right (the same rounding on every backend,
    where a reduction's order is the backend's choice)."""
    acc = x[..., 0]
    for k in range(1, x.shape[-1]):
        acc = acc + x[..., k]
    return acc


def _inverse(perm: jax.Array) -> jax.Array:
    """Inverse of each row of a permutation ``[X, n]``."""
    n = perm.shape[1]
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), perm.shape)
    return jnp.zeros_like(perm).at[_rows(perm), perm].set(iota, unique_indices=True)


def _clean(weight: jax.Array) -> jax.Array:
    """float32 loads; NaN, infinite and negative entries become 0 (values only checked eagerly)."""
    w = weight.astype(jnp.float32)
    return jnp.where(jnp.isfinite(w) & (w > 0), w, jnp.float32(0.0))


def _pack(load: jax.Array, num_packs: int) -> tuple[jax.Array, jax.Array]:
    """Balanced packing of the n items of each row into ``num_packs`` packs of n / num_packs items.

    Items are taken heaviest first (equal loads: lower index first); each goes to the lightest pack
    that still has room (equal loads: lower pack index).

    Args:
      load: float32[X, n] item loads.
      num_packs: m, a divisor of n.

    Returns:
      (pack, rank): int32[X, n] each item's pack and its arrival rank in that pack.
    """
    x_rows, n = load.shape
    cap = n // num_packs
    if cap == 1:
        iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x_rows, n))
        return iota, jnp.zeros((x_rows, n), jnp.int32)
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x_rows, n))
    neg_sorted, order = lax.sort((-load, iota), dimension=1, num_keys=2)
    if num_packs == 1:  # every item in the one pack, ranked in the order they are taken
        return jnp.zeros((x_rows, n), jnp.int32), _inverse(order)
    pack_ids = jnp.arange(num_packs, dtype=jnp.int32)

    def step(carry, item_load):
        pack_load, pack_count = carry
        room = pack_count < cap
        k = jnp.argmin(jnp.where(room, pack_load, jnp.inf), axis=1).astype(jnp.int32)
        # Loads that overflowed to inf must still never pick a full pack.
        k = jnp.where(jnp.take_along_axis(room, k[:, None], 1)[:, 0], k, jnp.argmax(room, 1))
        hit = pack_ids == k[:, None]
        rank = jnp.sum(jnp.where(hit, pack_count, 0), axis=1)
        pack_load = jnp.where(hit, pack_load + item_load[:, None], pack_load)
        pack_count = pack_count + hit.astype(jnp.int32)
        return (pack_load, pack_count), (k, rank)

    init = (jnp.zeros((x_rows, num_packs), jnp.float32), jnp.zeros((x_rows, num_packs), jnp.int32))
    _, (k_sorted, r_sorted) = lax.scan(step, init, -neg_sorted.T, unroll=4)
    rows = _rows(order)
    pack = jnp.zeros((x_rows, n), jnp.int32).at[rows, order].set(k_sorted.T, unique_indices=True)
    rank = jnp.zeros((x_rows, n), jnp.int32).at[rows, order].set(r_sorted.T, unique_indices=True)
    return pack, rank


def _replicate(load: jax.Array, num_phy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
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
        count = jnp.ones((x_rows, n), jnp.int32).at[_rows(expert), expert].add(1)
    else:

        def step(i, carry):
            expert, rank, count = carry
            e = jnp.argmax(load / count.astype(jnp.float32), axis=1).astype(jnp.int32)
            r = jnp.take_along_axis(count, e[:, None], 1)[:, 0]
            expert = expert.at[:, i].set(e)
            rank = rank.at[:, i].set(r)
            count = count.at[jnp.arange(x_rows), e].add(1)
            return expert, rank, count

        zeros = jnp.zeros((x_rows, extra), jnp.int32)
        expert, rank, count = lax.fori_loop(
            0, extra, step, (zeros, zeros, jnp.ones((x_rows, n), jnp.int32))
        )
    phy2log = jnp.concatenate([base, expert], axis=1)
    ranks = jnp.concatenate([jnp.zeros((x_rows, n), jnp.int32), rank], axis=1)
    return phy2log, ranks, count


def _node_layout(
    w: jax.Array, num_phy: int, num_groups: int, num_nodes: int, num_gpus: int
) -> _NodeLayout:
    """Steps 1 to 3 of the hierarchical policy on cleaned loads ``w`` float32[L, E]."""
    num_layers, num_log = w.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots = num_phy // num_gpus

    with jax.named_scope("groups_to_nodes"):
        group_load = _fold_sum(w.reshape(num_layers, num_groups, group_size))
        node, node_rank = _pack(group_load, num_nodes)
        first = (node * groups_per_node + node_rank) * group_size
        log2mlog = (first[:, :, None] + jnp.arange(group_size, dtype=jnp.int32)).reshape(
            num_layers, num_log
        )
        mlog2log = _inverse(log2mlog)
    with jax.named_scope("replicate"):
        node_w = jnp.take_along_axis(w, mlog2log, axis=1).reshape(-1, log_per_node)
        phy_mlog, phy_rank, count = _replicate(node_w, phy_per_node)
    with jax.named_scope("replicas_to_gpus"):
        rep_load = jnp.take_along_axis(node_w / count.astype(jnp.float32), phy_mlog, axis=1)
        gpu, gpu_rank = _pack(rep_load, gpus_per_node)
        slot = gpu * slots + gpu_rank
        rows = _rows(slot)

        def to_slots(v):
            return jnp.zeros_like(v).at[rows, slot].set(v, unique_indices=True)

        return _NodeLayout(
            slot_mlog=to_slots(phy_mlog),
            slot_rank=to_slots(phy_rank),
            slot_load=to_slots(rep_load),
            count=count,
            mlog2log=mlog2log,
            log2mlog=log2mlog,
        )


def _swap_refine(
    slot_load: jax.Array,
    payload: tuple[jax.Array, ...],
    slots: int,
    stop: jax.Array | None = None,
    held: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Lowers each row's heaviest GPU by swapping two replicas between GPUs, while that helps.

    Each swap takes the heaviest GPU h (lowest index on ties) and the pair (replica i of h, replica
    j of another GPU g) that minimises ``max(load_h - a_i + a_j, load_g - a_j + a_i)`` among those
    that lower it below ``load_h`` (first such pair in (i, g, j) order on ties). The pair maximum
    strictly falls and no other GPU changes, so a row's maximum never rises and the loop ends; rows
    stop independently. Slot counts per GPU do not change.

    Args:
      slot_load: float32[X, P_x] replica loads, GPU-major (S slots per GPU).
      payload: int32[X, P_x] arrays that travel with the replicas (expert ids, ranks).
      slots: S.
      stop: optional float32[X]; a row stops as soon as its heaviest GPU is at or under it.
      held: optional bool[X, P_x // S, n]: whether each GPU held each expert before (``payload[0]``
        holds the expert ids in [0, n)). Then the pair is chosen by the change in the number of
        replicas away from the GPUs that held them first (fewest), the pair maximum second.

    Returns:
      The swapped (slot_load, payload).
    """
    x_rows, p_x = slot_load.shape
    gpus = p_x // slots
    if gpus == 1:
        return slot_load, payload
    max_iters = _MAX_SWAPS_PER_GPU * p_x
    gpu_of_slot = jnp.arange(p_x, dtype=jnp.int32) // slots
    rows = jnp.arange(x_rows)
    if held is not None:
        n_held = held.shape[2]
        held_t = jnp.swapaxes(held, 1, 2)  # [X, n, G]
        held_flat = held.reshape(x_rows, gpus * n_held)

    def body(state):
        it, active, load, pay = state
        gpu_load = _fold_sum(load.reshape(x_rows, gpus, slots))
        h = jnp.argmax(gpu_load, axis=1).astype(jnp.int32)
        top = gpu_load[rows, h]
        h_slots = h[:, None] * slots + jnp.arange(slots, dtype=jnp.int32)  # [X, S]
        a = jnp.take_along_axis(load, h_slots, 1)  # [X, S]
        delta = a[:, :, None] - load[:, None, :]  # [X, S, P_x]
        g_load = gpu_load[:, gpu_of_slot]  # [X, P_x]
        new_h = top[:, None, None] - delta
        new_g = g_load[:, None, :] + delta
        pair = jnp.maximum(new_h, new_g)
        tol = 1e-6 * top[:, None, None]
        ok = (
            (gpu_of_slot[None, None, :] != h[:, None, None])
            & (delta > 0)
            & (pair < top[:, None, None] - tol)
        )
        if held is not None:
            e = pay[0]
            e_h = jnp.take_along_axis(e, h_slots, 1)  # [X, S]
            held_h = jnp.take_along_axis(held, h[:, None, None], 1)[:, 0]  # [X, n]
            # Replica i of h moved to slot j's GPU; replica j moved to h; before: where they are.
            i_to = jnp.take_along_axis(held_t, e_h[:, :, None], 1)  # [X, S, G]
            after = jnp.repeat(~i_to, slots, axis=2).astype(jnp.int32)  # [X, S, P_x]
            after = after + (~jnp.take_along_axis(held_h, e, 1))[:, None, :]
            before = (~jnp.take_along_axis(held_h, e_h, 1))[:, :, None].astype(jnp.int32)
            here = jnp.take_along_axis(held_flat, gpu_of_slot * n_held + e, 1)
            before = before + (~here)[:, None, :]
            pair = pair + (after - before).astype(jnp.float32) * (2.0 * top[:, None, None])
        score = jnp.where(ok, pair, jnp.inf).reshape(x_rows, slots * p_x)
        best = jnp.argmin(score, axis=1)
        found = active & jnp.isfinite(score[rows, best])
        if stop is not None:
            found = found & (top > stop)
        src = h_slots[rows, best // p_x]
        dst = (best % p_x).astype(jnp.int32)
        src = jnp.where(found, src, 0)
        dst = jnp.where(found, dst, 0)

        def swap(v):
            vs, vd = v[rows, src], v[rows, dst]
            return v.at[rows, src].set(vd).at[rows, dst].set(vs)

        return it + 1, found, swap(load), tuple(swap(v) for v in pay)

    def cond(state):
        it, active, _, _ = state
        return (it < max_iters) & jnp.any(active)

    init = (jnp.int32(0), jnp.ones((x_rows,), bool), slot_load, payload)
    _, _, load, pay = lax.while_loop(cond, body, init)
    return load, pay


def _log2phy(phy2log: jax.Array, rank: jax.Array, num_log: int, width: int) -> jax.Array:
    """log2phy[l, e, r] = the slot holding replica r of expert e; -1 past the expert's count."""
    num_layers, num_phy = phy2log.shape
    flat = jnp.full((num_layers, num_log * width), -1, jnp.int32)
    iota = jnp.broadcast_to(jnp.arange(num_phy, dtype=jnp.int32), phy2log.shape)
    flat = flat.at[_rows(phy2log), phy2log * width + rank].set(iota, mode="drop")
    return flat.reshape(num_layers, num_log, width)


# ------------------------------------------------------------------------ migration-aware mode

# A migration-aware placement may be at most this much heavier (max device load, per layer) than
# the from-scratch placement of the same loads.
_MIGRATION_SLACK = 0.01
# Hierarchical policy: besides the old assignment of groups to nodes, the candidates after 1 .. this
# many greedy swaps of two groups between nodes.
_GROUP_SWAPS = 2


def _greedy_match(overlap: jax.Array) -> jax.Array:
    """Greedy assignment of the n new labels of each row to n old ones by overlap.

    Repeatedly takes the largest remaining overlap (ties: lowest new label, then lowest old label)
    and pairs those two labels.

    Args:
      overlap: float32[X, n, n], overlap[x, a, b] between new label a and old label b (>= 0).

    Returns:
      int32[X, n]: the old label given to each new label (a permutation per row).
    """
    x_rows, n, _ = overlap.shape
    rows = jnp.arange(x_rows)
    ids = jnp.arange(n, dtype=jnp.int32)

    def step(_, carry):
        ov, perm = carry
        best = jnp.argmax(ov.reshape(x_rows, n * n), axis=1).astype(jnp.int32)
        a, b = best // n, best % n
        perm = perm.at[rows, a].set(b)
        taken = (ids[None, :, None] == a[:, None, None]) | (ids[None, None, :] == b[:, None, None])
        return jnp.where(taken, -1.0, ov), perm

    init = (overlap.astype(jnp.float32), jnp.zeros((x_rows, n), jnp.int32))
    return lax.fori_loop(0, n, step, init)[1]


def _occurrence(v: jax.Array) -> jax.Array:
    """occ[..., i] = how many j < i along the last axis hold the same value as i (small axes)."""
    n = v.shape[-1]
    lower = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [i, j]: j < i
    return jnp.sum((v[..., :, None] == v[..., None, :]) & lower, axis=-1).astype(jnp.int32)


def _preserve_slots(new: jax.Array, old: jax.Array) -> jax.Array:
    """Orders each GPU's new experts so that those the GPU already held keep their old slot.

    Within a GPU, the j-th copy (in slot order) of expert e in the new list takes the slot of the
    j-th copy of e in the old list when there is one; the other experts fill the remaining slots in
    increasing slot order, in their order in ``new``.

    Args:
      new: int32[X, D, S] the experts each GPU receives (order irrelevant).
      old: int32[X, D, S] the current slots (-1 = empty).

    Returns:
      int32[X, D, S]: ``new`` with each GPU's entries permuted.
    """
    slots = new.shape[-1]
    iota = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), new.shape)
    match = (
        (new[..., :, None] == old[..., None, :])
        & (_occurrence(new)[..., :, None] == _occurrence(old)[..., None, :])
        & (new[..., :, None] >= 0)
    )
    new_matched = jnp.any(match, axis=-1)
    old_matched = jnp.any(match, axis=-2)
    # Free slots in increasing order first, then the matched ones.
    _, free = lax.sort((old_matched.astype(jnp.int32), iota), dimension=new.ndim - 1, num_keys=2)
    r = jnp.cumsum(~new_matched, axis=-1) - 1
    dst = jnp.where(
        new_matched,
        jnp.argmax(match, axis=-1).astype(jnp.int32),
        jnp.take_along_axis(free, jnp.clip(r, 0, slots - 1), axis=-1),
    )
    lead = new.shape[:-1]
    flat_new = new.reshape(-1, slots)
    flat_dst = dst.reshape(-1, slots)
    out = jnp.zeros_like(flat_new).at[_rows(flat_new), flat_dst].set(flat_new, unique_indices=True)
    return out.reshape(*lead, slots)


def _slot_ranks(phy2log: jax.Array) -> jax.Array:
    """rank[l, p] = how many slots before p hold the same expert (replica ranks in slot order)."""
    num_layers, num_phy = phy2log.shape
    iota = jnp.broadcast_to(jnp.arange(num_phy, dtype=jnp.int32), phy2log.shape)
    key, pos = lax.sort((phy2log, iota), dimension=1, num_keys=2)
    first = jnp.concatenate([jnp.ones((num_layers, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
    start = lax.cummax(jnp.where(first, iota, 0), axis=1)
    rank = iota - start
    return jnp.zeros_like(phy2log).at[_rows(pos), pos].set(rank, unique_indices=True)


def _group_log2mlog(g_node: jax.Array, per_node: int, group_size: int) -> jax.Array:
    """Node-local ids (node-major) for a group-to-node assignment g_node int32[L, G]: the groups
    of a node in increasing group order. Returns int32[L, E]."""
    num_layers, groups = g_node.shape
    lower = jnp.arange(groups)[None, :] < jnp.arange(groups)[:, None]  # [g, g']: g' < g
    g_rank = jnp.sum((g_node[:, :, None] == g_node[:, None, :]) & lower, axis=2)
    first = (g_node * per_node + jnp.clip(g_rank, 0, per_node - 1)) * group_size
    ids = first[:, :, None] + jnp.arange(group_size, dtype=jnp.int32)
    return ids.reshape(num_layers, groups * group_size).astype(jnp.int32)


def _old_group_layouts(w: jax.Array, old: jax.Array, groups: int, nodes: int):
    """Group-to-node assignments near the old placement.

    Returns (tuple of 1 + _GROUP_SWAPS int32[L, E] node-local id maps, ok bool[L]): the old
    placement's own assignment of groups to nodes, then after each of _GROUP_SWAPS greedy swaps
    of two groups between two nodes (the swap that leaves the lowest heaviest node load; first
    pair in (g, g') order on ties); ``ok`` says
    whether the old placement keeps every group on a single node with the same number of groups
    on every node (where it does not, both are meaningless).
    """
    num_layers, num_phy = old.shape
    num_log = w.shape[1]
    group_size = num_log // groups
    per_node = groups // nodes
    node_ids = jnp.arange(nodes, dtype=jnp.int32)
    valid = old >= 0
    group = jnp.where(valid, old // group_size, groups)
    node = jnp.broadcast_to(jnp.arange(num_phy, dtype=jnp.int32) // (num_phy // nodes), old.shape)
    hits = jnp.zeros((num_layers, groups + 1, nodes), jnp.int32)
    hits = hits.at[_rows(old), group, node].add(1)[:, :groups]
    g_node = jnp.argmax(hits, axis=2).astype(jnp.int32)  # [L, G]
    single = jnp.all(jnp.sum(hits > 0, axis=2) == 1, axis=1)
    same = g_node[:, :, None] == node_ids
    even = jnp.all(jnp.sum(same, axis=1) == per_node, axis=1)
    g_load = _fold_sum(w.reshape(num_layers, groups, group_size))
    rows = jnp.arange(num_layers)
    layouts = [_group_log2mlog(g_node, per_node, group_size)]
    for _ in range(_GROUP_SWAPS):
        # The best swap of two groups on different nodes, by heaviest node load.
        same = g_node[:, :, None] == node_ids
        n_load = _fold_sum(jnp.where(same, g_load[:, :, None], 0.0).swapaxes(1, 2))  # [L, N]
        a = g_node[:, :, None, None]  # node of g
        b = g_node[:, None, :, None]  # node of g'
        d = (g_load[:, None, :] - g_load[:, :, None])[..., None]  # g' in, g out of node a
        n = node_ids[None, None, None, :]
        after = n_load[:, None, None, :] + jnp.where(n == a, d, 0.0) - jnp.where(n == b, d, 0.0)
        score = jnp.where(a[..., 0] != b[..., 0], after.max(-1), jnp.inf)
        best = jnp.argmin(score.reshape(num_layers, -1), axis=1).astype(jnp.int32)
        g1, g2 = best // groups, best % groups
        g_node = g_node.at[rows, g1].set(g_node[rows, g2]).at[rows, g2].set(g_node[rows, g1])
        layouts.append(_group_log2mlog(g_node, per_node, group_size))
    return tuple(layouts), single & even


def _sticky_pack(item_load: jax.Array, pref_gpu: jax.Array, num_packs: int, cap: int) -> jax.Array:
    """Packs each row's items heaviest first (equal loads: lower index first): an item goes to its
    preferred GPU while that GPU has room, else to the lightest GPU with room (equal loads: lowest
    index).

    Args:
      item_load: float32[X, n]; pref_gpu: int32[X, n] (-1: none).
      num_packs: GPUs per row; cap: slots per GPU (n = num_packs * cap).

    Returns:
      int32[X, n] the GPU of each item.
    """
    x_rows, n = item_load.shape
    if num_packs == 1:
        return jnp.zeros((x_rows, n), jnp.int32)
    iota = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (x_rows, n))
    neg, order, pref = lax.sort((-item_load, iota, pref_gpu), dimension=1, num_keys=2)
    pack_ids = jnp.arange(num_packs, dtype=jnp.int32)
    rows = jnp.arange(x_rows)

    def step(carry, x):
        pack_load, pack_count = carry
        a, p = x
        room = pack_count < cap
        light = jnp.argmin(jnp.where(room, pack_load, jnp.inf), axis=1).astype(jnp.int32)
        light = jnp.where(room[rows, light], light, jnp.argmax(room, 1).astype(jnp.int32))
        pc = jnp.clip(p, 0, num_packs - 1)
        k = jnp.where((p >= 0) & room[rows, pc], pc, light)
        hit = pack_ids == k[:, None]
        pack_load = jnp.where(hit, pack_load + a[:, None], pack_load)
        return (pack_load, pack_count + hit.astype(jnp.int32)), k

    init = (jnp.zeros((x_rows, num_packs), jnp.float32), jnp.zeros((x_rows, num_packs), jnp.int32))
    _, k_sorted = lax.scan(step, init, (-neg.T, pref.T), unroll=4)
    return (
        jnp.zeros((x_rows, n), jnp.int32)
        .at[_rows(order), order]
        .set(k_sorted.T, unique_indices=True)
    )


def _migrate(
    w: jax.Array,
    old: jax.Array,
    lay: _NodeLayout,
    fs_slot_mlog: jax.Array,
    target: jax.Array,
    *,
    num_replicas: int,
    groups: int,
    nodes: int,
    num_gpus: int,
) -> jax.Array:
    """The migration-aware placement (see ``docs/policy.md``); returns phy2log int32[L, P].

    Candidates (C of them) are group-to-node assignments: the from-scratch one with its nodes
    relabelled to the old nodes by overlap and, in the hierarchical policy, the old placement's own
    one and that one after 1 .. _GROUP_SWAPS greedy swaps of two groups. For each candidate and
    node row (X = L * nodes rows), the replica counts of that candidate's node loads are packed
    sticky (each kept replica on its old GPU) and swap-refined, fewest new copies first, down to
    the from-scratch maximum plus the slack; the first candidate also has the from-scratch row
    with its GPUs relabelled by overlap. Each row keeps its cheapest variant within the slack (ties:
    the sticky one), each layer its cheapest candidate whose rows all qualify (ties: the lower
    candidate); the relabelled from-scratch rows guarantee one. Cost: remote copies, experts a GPU
    did not hold before.

    Args:
      w: float32[L, E] cleaned loads.
      old: int32[L, P] current placement (-1 = empty).
      lay: the from-scratch node layout of ``w``.
      fs_slot_mlog: int32[L * nodes, P_n] its node-local experts per slot (after refinement).
      target: float32[L] its heaviest GPU load per layer.
    """
    num_layers, num_log = w.shape
    num_phy, slots = num_replicas, num_replicas // num_gpus
    e_n, p_n, d_n = num_log // nodes, num_phy // nodes, num_gpus // nodes
    x_rows = num_layers * nodes
    old = jnp.where((old >= 0) & (old < num_log), old, -1)
    valid = old >= 0
    slot_node = jnp.broadcast_to(jnp.arange(num_phy, dtype=jnp.int32) // p_n, old.shape)

    with jax.named_scope("candidates"):
        fs_node = lay.log2mlog // e_n
        if nodes > 1:
            a = jnp.take_along_axis(fs_node, jnp.where(valid, old, 0), axis=1)
            ov = jnp.zeros((num_layers, nodes, nodes), jnp.float32)
            ov = ov.at[_rows(old), a, slot_node].add(valid.astype(jnp.float32))
            node_perm = _greedy_match(ov)
        else:
            node_perm = jnp.zeros((num_layers, 1), jnp.int32)
        cands = [jnp.take_along_axis(node_perm, fs_node, 1) * e_n + lay.log2mlog % e_n]
        cand_ok = [jnp.ones((num_layers,), bool)]
        # The from-scratch rows, moved to the node each one now maps to.
        fs_rows = jnp.take_along_axis(
            fs_slot_mlog.reshape(num_layers, nodes, p_n), _inverse(node_perm)[:, :, None], axis=1
        ).reshape(x_rows, p_n)
        if nodes > 1:
            l2ms, ok = _old_group_layouts(w, old, groups, nodes)
            for l2m in l2ms:
                cands.append(jnp.where(ok[:, None], l2m, cands[0]))
                cand_ok.append(ok)
    num_cands = len(cands)
    log2mlog = jnp.concatenate(cands, axis=0)  # [C * L, E]
    mlog2log = _inverse(log2mlog)
    cx = num_cands * x_rows

    with jax.named_scope("replicate"):
        node_w = jnp.take_along_axis(jnp.tile(w, (num_cands, 1)), mlog2log, 1).reshape(cx, e_n)
        item_e, item_rank, count = _replicate(node_w, p_n)
        rep_load = node_w / count.astype(jnp.float32)  # [CX, E_n]

    with jax.named_scope("old_view"):
        # The old placement in each candidate's node-local ids (-1: empty or another node's).
        old_t = jnp.tile(old, (num_cands, 1))
        loc = jnp.take_along_axis(log2mlog, jnp.where(old_t >= 0, old_t, 0), axis=1)
        loc = loc - jnp.tile(slot_node, (num_cands, 1)) * e_n
        loc = jnp.where((old_t >= 0) & (loc >= 0) & (loc < e_n), loc, -1).reshape(cx, p_n)
        loc_or_pad = jnp.where(loc >= 0, loc, e_n)
        gpu_of_slot = jnp.broadcast_to(jnp.arange(p_n, dtype=jnp.int32) // slots, (cx, p_n))
        # int32 counts, not a bool scatter: XLA:GPU miscompiles a sliced pred scatter here.
        old_has = jnp.zeros((cx, d_n, e_n + 1), jnp.int32)
        old_has = old_has.at[_rows(loc), gpu_of_slot, loc_or_pad].add(1)[:, :, :e_n] > 0
        # The k-th replica of expert e prefers the GPU of the k-th old slot of e (slot order).
        iota = jnp.broadcast_to(jnp.arange(p_n, dtype=jnp.int32), (cx, p_n))
        _, by_expert = lax.sort((loc_or_pad, iota), dimension=1, num_keys=2)
        old_cnt = jnp.zeros((cx, e_n + 1), jnp.int32).at[_rows(loc), loc_or_pad].add(1)
        old_cnt = old_cnt[:, :e_n]
        start = jnp.cumsum(old_cnt, axis=1) - old_cnt
        has_pref = item_rank < jnp.take_along_axis(old_cnt, item_e, 1)
        pos = jnp.clip(jnp.take_along_axis(start, item_e, 1) + item_rank, 0, p_n - 1)
        pref = jnp.where(has_pref, jnp.take_along_axis(by_expert, pos, 1) // slots, -1)

    with jax.named_scope("sticky_pack"):
        item_load = jnp.take_along_axis(rep_load, item_e, 1)
        gpu = _sticky_pack(item_load, pref, d_n, slots)  # [CX, P_n]
        _, entries = lax.sort((gpu * p_n + iota, item_e), dimension=1, num_keys=1)

    with jax.named_scope("sticky_refine"):
        # Swaps between GPUs until each row is within the slack of the from-scratch maximum.
        target_x = jnp.tile(jnp.repeat(target, nodes), num_cands)  # [CX]
        limit = target_x * (1.0 + _MIGRATION_SLACK)
        e_load = jnp.take_along_axis(rep_load, entries, 1)
        _, (entries,) = _swap_refine(e_load, (entries,), slots, stop=limit, held=old_has)
        entries = entries.reshape(cx, d_n, slots)

    with jax.named_scope("relabel_gpus"):
        # The from-scratch rows with their GPUs matched to the old ones by overlap (candidate 0).
        idx = jnp.broadcast_to(fs_rows[:, None, :], (x_rows, d_n, p_n))
        held = jnp.take_along_axis(old_has[:x_rows], idx, axis=2)  # [X, D_n(old), P_n]
        overlap = held.reshape(x_rows, d_n, d_n, slots).sum(-1).astype(jnp.float32)
        gpu_perm = _greedy_match(jnp.swapaxes(overlap, 1, 2))  # [X, D_n(new)] -> old GPU
        fs_e = fs_rows.reshape(x_rows, d_n, slots)
        fs_e = jnp.zeros_like(fs_e).at[_rows(gpu_perm), gpu_perm].set(fs_e, unique_indices=True)
        fs_all = jnp.concatenate([fs_e] * num_cands, axis=0)
        variants = jnp.stack([entries, fs_all], axis=1)  # [CX, 2, D_n, S]

    with jax.named_scope("choose"):
        flat = variants.reshape(cx, 2 * d_n * slots)
        loads = _fold_sum(jnp.take_along_axis(rep_load, flat, 1).reshape(cx, 2, d_n, slots))
        gpu_ids = jnp.broadcast_to(
            jnp.arange(d_n, dtype=jnp.int32)[None, :, None], (2, d_n, slots)
        ).reshape(-1)
        keep = jnp.take_along_axis(old_has.reshape(cx, d_n * e_n), gpu_ids * e_n + flat, axis=1)
        copies = jnp.sum(~keep.reshape(cx, 2, d_n * slots), axis=2)
        feasible = jnp.max(loads, axis=2) <= limit[:, None]
        # The relabelled from-scratch row only exists for candidate 0.
        feasible = feasible.at[x_rows:, 1].set(False)
        big = jnp.int32(num_phy + 1)
        score = jnp.where(feasible, copies, big)
        v = jnp.argmin(score, axis=1).astype(jnp.int32)  # [CX]
        row_copies = jnp.min(score, axis=1).reshape(num_cands, num_layers, nodes)
        layer_ok = jnp.all(row_copies < big, axis=2) & jnp.stack(cand_ok)
        layer_cost = jnp.where(layer_ok, row_copies.sum(2), big * nodes)
        c = jnp.argmin(layer_cost, axis=0).astype(jnp.int32)  # [L]
        chosen = jnp.take_along_axis(variants, v[:, None, None, None], axis=1)[:, 0]
        chosen = chosen.reshape(num_cands, num_layers, nodes * p_n)
        chosen = jnp.take_along_axis(chosen, c[None, :, None], axis=0)[0]  # [L, P] node-local
        offset = (jnp.arange(nodes, dtype=jnp.int32) * e_n).repeat(p_n)
        m2l = mlog2log.reshape(num_cands, num_layers, num_log)
        m2l = jnp.take_along_axis(m2l, c[None, :, None], axis=0)[0]
        phy2log = jnp.take_along_axis(m2l, chosen + offset, axis=1)

    with jax.named_scope("preserve_slots"):
        shape = (num_layers, num_gpus, slots)
        phy2log = _preserve_slots(phy2log.reshape(shape), old.reshape(shape))
    return phy2log.reshape(num_layers, num_phy)


def _effective(num_groups: int, num_nodes: int) -> tuple[int, int]:
    """The (groups, nodes) the policy runs with: the global policy is the hierarchical one with a
    single group on a single node."""
    if num_groups % num_nodes == 0:
        return num_groups, num_nodes
    return 1, 1


@partial(
    jax.jit,
    static_argnames=("num_replicas", "num_groups", "num_nodes", "num_gpus", "refine"),
)
def _rebalance_jit(
    weight: jax.Array,
    old_phy2log: jax.Array | None,
    *,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    refine: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    TRACE_COUNT[
        (
            weight.shape,
            num_replicas,
            num_groups,
            num_nodes,
            num_gpus,
            refine,
            old_phy2log is not None,
        )
    ] += 1
    num_layers, num_log = weight.shape
    groups, nodes = _effective(num_groups, num_nodes)
    slots = num_replicas // num_gpus
    w = _clean(weight)
    lay = _node_layout(w, num_replicas, groups, nodes, num_gpus)
    slot_load, slot_mlog, slot_rank = lay.slot_load, lay.slot_mlog, lay.slot_rank
    if refine:
        with jax.named_scope("refine"):
            slot_load, (slot_mlog, slot_rank) = _swap_refine(
                slot_load, (slot_mlog, slot_rank), slots
            )
    if old_phy2log is not None:
        target = _fold_sum(slot_load.reshape(num_layers, -1, slots)).max(-1)
        phy2log = _migrate(
            w,
            old_phy2log.astype(jnp.int32),
            lay,
            slot_mlog,
            target,
            num_replicas=num_replicas,
            groups=groups,
            nodes=nodes,
            num_gpus=num_gpus,
        )
        with jax.named_scope("to_global"):
            rank = _slot_ranks(phy2log)
            logcnt = jnp.zeros((num_layers, num_log), jnp.int32).at[_rows(phy2log), phy2log].add(1)
            log2phy = _log2phy(phy2log, rank, num_log, num_replicas - num_log + 1)
        return phy2log, log2phy, logcnt
    with jax.named_scope("to_global"):
        log_per_node = num_log // nodes
        offset = (jnp.arange(nodes, dtype=jnp.int32) * log_per_node)[None, :, None]
        glob_mlog = (slot_mlog.reshape(num_layers, nodes, -1) + offset).reshape(num_layers, -1)
        phy2log = jnp.take_along_axis(lay.mlog2log, glob_mlog, axis=1)
        rank = slot_rank.reshape(num_layers, num_replicas)
        logcnt = jnp.take_along_axis(lay.count.reshape(num_layers, num_log), lay.log2mlog, 1)
        log2phy = _log2phy(phy2log, rank, num_log, num_replicas - num_log + 1)
    return phy2log, log2phy, logcnt


def _as_count(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check(
    weight: Any,
    num_replicas: Any,
    num_groups: Any,
    num_nodes: Any,
    num_gpus: Any,
    old: Any,
) -> tuple[int, int, int, int]:
    """Argument checks; every message names the argument, what was expected and what arrived."""
    if not hasattr(weight, "shape") or not hasattr(weight, "dtype"):
        raise TypeError(f"weight: expected an array [L, E], got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(
            f"weight: expected a 2-D array [L, E] (layers x logical experts), got shape "
            f"{tuple(weight.shape)}"
        )
    num_layers, num_log = (int(s) for s in weight.shape)
    if num_layers < 1 or num_log < 1:
        raise ValueError(
            f"weight: expected at least one layer and one expert, got shape {(num_layers, num_log)}"
        )
    dtype = np.dtype(weight.dtype)
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"weight: expected a real (integer or floating) dtype, got {dtype}")
    num_replicas = _as_count(num_replicas, "num_replicas")
    num_groups = _as_count(num_groups, "num_groups")
    num_nodes = _as_count(num_nodes, "num_nodes")
    num_gpus = _as_count(num_gpus, "num_gpus")
    if num_replicas < num_log:
        raise ValueError(
            f"num_replicas: expected at least one slot per logical expert (>= E = {num_log}), "
            f"got {num_replicas}"
        )
    if num_replicas % num_gpus:
        raise ValueError(
            f"num_replicas: expected a multiple of num_gpus = {num_gpus} (every GPU holds the "
            f"same number of slots), got {num_replicas}"
        )
    if num_groups % num_nodes == 0:  # hierarchical policy
        if num_log % num_groups:
            raise ValueError(
                f"num_groups: expected a divisor of the E = {num_log} logical experts (groups "
                f"of E / num_groups consecutive experts), got {num_groups}"
            )
        if num_gpus % num_nodes:
            raise ValueError(
                f"num_gpus: expected a multiple of num_nodes = {num_nodes} (the hierarchical "
                f"policy, used because num_groups % num_nodes == 0, puts the same number of GPUs "
                f"on every node), got {num_gpus}"
            )
    if is_concrete(weight):
        w = np.asarray(weight)
        if np.issubdtype(w.dtype, np.floating) and not np.isfinite(w).all():
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(w))[0])
            raise ValueError(
                f"weight{list(bad)} = {w[bad]}: expected finite loads (token counts >= 0)"
            )
        if (w < 0).any():
            bad = tuple(int(i) for i in np.argwhere(w < 0)[0])
            raise ValueError(f"weight{list(bad)} = {w[bad]}: expected loads >= 0")
    if old is not None:
        _check_old(old, num_layers, num_log, num_replicas)
    return num_replicas, num_groups, num_nodes, num_gpus


def _check_old(old: Any, num_layers: int, num_log: int, num_replicas: int) -> None:
    name = "old_physical_to_logical"
    if not hasattr(old, "shape") or not hasattr(old, "dtype"):
        raise TypeError(f"{name}: expected an int32 array [L, P], got {type(old).__name__}")
    if tuple(old.shape) != (num_layers, num_replicas):
        raise ValueError(
            f"{name}: expected shape [L, P] = {(num_layers, num_replicas)} (weight's layers x "
            f"num_replicas), got {tuple(old.shape)}"
        )
    if not np.issubdtype(np.dtype(old.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {old.dtype}")
    if not is_concrete(old):
        return
    o = np.asarray(old)
    bad = np.argwhere((o < -1) | (o >= num_log))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"{name}{list(at)} = {o[at]}: expected an expert id in [0, E = {num_log}) or -1 "
            f"(empty slot)"
        )
    for layer in range(num_layers):
        held = np.zeros(num_log, bool)
        held[o[layer][o[layer] >= 0]] = True
        if not held.all():
            e = int(np.argmin(held))
            raise ValueError(
                f"{name}[{layer}]: expected every expert of [0, E = {num_log}) in some slot, but "
                f"expert {e} has none (the old placement must be complete)"
            )


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    old_physical_to_logical: Any = None,
    refine: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Places E logical experts onto P physical slots over D GPUs, balancing the load.

    Without ``old_physical_to_logical`` this is DeepSeek's EPLB policy (hierarchical when
    ``num_groups % num_nodes == 0``, else global) and reproduces its README example exactly; see
    the module docstring for the tie rules. Jit-able: the counts are static, one compilation per
    shape and configuration is cached, and the function may be called inside an outer `jax.jit`.

    Args:
      weight: [L, E] load of each logical expert, any real dtype (computed in float32). Eagerly,
        NaN, infinite or negative loads raise; under an outer jit the values cannot be checked and
        such entries count as zero load.
      num_replicas: P, physical slots per layer; a multiple of ``num_gpus`` and at least E.
      num_groups: expert groups (E / num_groups consecutive experts each; must divide E when the
        hierarchical policy is used).
      num_nodes: nodes; hierarchical policy when ``num_groups % num_nodes == 0`` (then
        ``num_gpus`` must be a multiple of it), else global.
      num_gpus: D, GPUs in total; S = P // D slots each, slot p on GPU p // S.
      old_physical_to_logical: optional int [L, P], the current placement (-1 = empty slot; every
        expert present). When given, the placement is migration-aware: see ``docs/policy.md``.
      refine: after packing, swap replicas between GPUs while that lowers a GPU's maximum load;
        never worse than the plain policy on any layer.

    Returns:
      (phy2log int32[L, P], log2phy int32[L, E, P - E + 1], logcnt int32[L, E]): the expert of each
      slot; for each expert the slot of each replica rank, padded with -1; replicas per expert.

    Raises:
      ValueError, TypeError: a bad argument, named in the message, before anything is computed.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
      >>> phy2log, log2phy, logcnt = rebalance_experts(w, 16, 4, 2, 8)
      >>> phy2log.tolist()
      [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """
    num_replicas, num_groups, num_nodes, num_gpus = _check(
        weight, num_replicas, num_groups, num_nodes, num_gpus, old_physical_to_logical
    )
    groups, nodes = _effective(num_groups, num_nodes)
    old = old_physical_to_logical
    if old is not None:
        old = jnp.asarray(old, dtype=jnp.int32)
    return _rebalance_jit(
        jnp.asarray(weight),
        old,
        num_replicas=num_replicas,
        num_groups=groups,
        num_nodes=nodes,
        num_gpus=num_gpus,
        refine=bool(refine),
    )

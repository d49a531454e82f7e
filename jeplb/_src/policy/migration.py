"""The migration-aware mode: a placement near the old one, within 1% of the from-scratch balance.

Letters as in `deepseek`: L layers, E experts, P slots, D devices, S = P // D; per node E_n, P_n,
D_n; node rows X = L * nodes; C candidates, CX = C * X candidate rows.

The from-scratch placement sets the target (its heaviest device per layer); candidate group-to-node
assignments near the old placement get their replica counts, a sticky packing (each replica on the
device of the matching old replica while it has room) and swap refinement down to the target plus
1%; the from-scratch placement with nodes and devices relabelled to the old ones by overlap is the
fallback. Each layer keeps the qualifying result with the fewest remote copies, and experts that
stay on a device keep their slot. See ``docs/policy.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.policy.deepseek import pack, replicate
from jeplb._src.policy.ops import (
    fold_sum,
    inverse,
    lexicographic_first,
    rows,
    sort_by_key,
)
from jeplb._src.policy.refine import swap_refine

__all__ = ["Sticky", "migrate", "pack_both", "preserve_slots", "sticky_items"]

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
    ids = jnp.arange(n, dtype=jnp.int32)[:, None]
    flat = jnp.arange(n * n, dtype=jnp.int32)[:, None]

    def step(_, carry):  # label pairs on the leading axis (see `deepseek.lightest_pack`)
        ov, perm = carry
        best = lexicographic_first(ov, jnp.broadcast_to(flat, ov.shape), 0, largest=True)[0]
        a, b = best // n, best % n
        perm = jnp.where(ids == a, b, perm)
        return jnp.where((flat // n == a) | (flat % n == b), -1.0, ov), perm

    ov = overlap.astype(jnp.float32).reshape(x_rows, n * n).T
    perm = lax.fori_loop(0, n, step, (ov, jnp.zeros((n, x_rows), jnp.int32)))[1]
    return perm.T


def _occurrence(v: jax.Array) -> jax.Array:
    """occ[..., i] = how many j < i along the last axis hold the same value as i (small axes)."""
    n = v.shape[-1]
    lower = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [i, j]: j < i
    return jnp.sum((v[..., :, None] == v[..., None, :]) & lower, axis=-1).astype(jnp.int32)


def preserve_slots(new: jax.Array, old: jax.Array) -> jax.Array:
    """Orders each device's new experts so that those the device already held keep their old slot.

    Within a device, the j-th copy (in slot order) of expert e in the new list takes the slot of the
    j-th copy of e in the old list when there is one; the other experts fill the remaining slots in
    increasing slot order, in their order in ``new``.

    Args:
      new: int32[X, D, S] the experts each device receives (order irrelevant).
      old: int32[X, D, S] the current slots (-1 = empty).

    Returns:
      int32[X, D, S]: ``new`` with each device's entries permuted.
    """
    slots = new.shape[-1]
    match = (
        (new[..., :, None] == old[..., None, :])
        & (_occurrence(new)[..., :, None] == _occurrence(old)[..., None, :])
        & (new[..., :, None] >= 0)
    )
    new_matched = jnp.any(match, axis=-1)
    old_matched = jnp.any(match, axis=-2)
    # Free slots in increasing order first, then the matched ones.
    _, free = sort_by_key(old_matched.astype(jnp.int32))
    r = jnp.cumsum(~new_matched, axis=-1) - 1
    dst = jnp.where(
        new_matched,
        jnp.argmax(match, axis=-1).astype(jnp.int32),
        jnp.take_along_axis(free, jnp.clip(r, 0, slots - 1), axis=-1),
    )
    lead = new.shape[:-1]
    flat_new = new.reshape(-1, slots)
    flat_dst = dst.reshape(-1, slots)
    out = jnp.zeros_like(flat_new).at[rows(flat_new), flat_dst].set(flat_new, unique_indices=True)
    return out.reshape(*lead, slots)


def _group_log2mlog(g_node: jax.Array, per_node: int, group_size: int) -> jax.Array:
    """Node-local ids (node-major) for a group-to-node assignment g_node int32[L, G]: the groups
    of a node in increasing group order. Returns int32[L, E]."""
    num_layers, groups = g_node.shape
    lower = jnp.arange(groups)[None, :] < jnp.arange(groups)[:, None]  # [g, g']: g' < g
    g_rank = jnp.sum((g_node[:, :, None] == g_node[:, None, :]) & lower, axis=2)
    first = (g_node * per_node + jnp.clip(g_rank, 0, per_node - 1)) * group_size
    ids = first[:, :, None] + jnp.arange(group_size, dtype=jnp.int32)
    return ids.reshape(num_layers, groups * group_size).astype(jnp.int32)


def _best_group_swap(g_node: jax.Array, g_load: jax.Array, nodes: int) -> jax.Array:
    """g_node int32[L, G] after the swap of two groups on different nodes that leaves the lowest
    heaviest node load (first pair in (g, g') order on ties)."""
    num_layers, groups = g_node.shape
    node_ids = jnp.arange(nodes, dtype=jnp.int32)
    same = g_node[:, :, None] == node_ids
    n_load = fold_sum(jnp.where(same, g_load[:, :, None], 0.0).swapaxes(1, 2))  # [L, N]
    a = g_node[:, :, None, None]  # node of g
    b = g_node[:, None, :, None]  # node of g'
    d = (g_load[:, None, :] - g_load[:, :, None])[..., None]  # g' in, g out of node a
    n = node_ids[None, None, None, :]
    after = n_load[:, None, None, :] + jnp.where(n == a, d, 0.0) - jnp.where(n == b, d, 0.0)
    score = jnp.where(a[..., 0] != b[..., 0], after.max(-1), jnp.inf)
    best = jnp.argmin(score.reshape(num_layers, -1), axis=1).astype(jnp.int32)
    g1, g2 = best // groups, best % groups
    at = jnp.arange(num_layers)
    return g_node.at[at, g1].set(g_node[at, g2]).at[at, g2].set(g_node[at, g1])


def _old_group_layouts(w: jax.Array, old: jax.Array, groups: int, nodes: int):
    """Group-to-node assignments near the old placement.

    Returns (tuple of 1 + _GROUP_SWAPS int32[L, E] node-local id maps, ok bool[L]): the old
    placement's own assignment of groups to nodes, then after each of _GROUP_SWAPS greedy swaps
    of two groups between two nodes (`_best_group_swap`); ``ok`` says whether the old placement
    keeps every group on a single node with the same number of groups on every node (where it
    does not, both are meaningless).
    """
    num_layers, num_slots = old.shape
    num_log = w.shape[1]
    group_size = num_log // groups
    per_node = groups // nodes
    node_ids = jnp.arange(nodes, dtype=jnp.int32)
    valid = old >= 0
    group = jnp.where(valid, old // group_size, groups)
    node = jnp.broadcast_to(
        jnp.arange(num_slots, dtype=jnp.int32) // (num_slots // nodes), old.shape
    )
    hits = jnp.zeros((num_layers, groups + 1, nodes), jnp.int32)
    hits = hits.at[rows(old), group, node].add(1)[:, :groups]
    g_node = jnp.argmax(hits, axis=2).astype(jnp.int32)  # [L, G]
    single = jnp.all(jnp.sum(hits > 0, axis=2) == 1, axis=1)
    same = g_node[:, :, None] == node_ids
    even = jnp.all(jnp.sum(same, axis=1) == per_node, axis=1)
    g_load = fold_sum(w.reshape(num_layers, groups, group_size))
    layouts = [_group_log2mlog(g_node, per_node, group_size)]
    for _ in range(_GROUP_SWAPS):
        g_node = _best_group_swap(g_node, g_load, nodes)
        layouts.append(_group_log2mlog(g_node, per_node, group_size))
    return tuple(layouts), single & even


class _Dims(NamedTuple):
    """The static sizes of one migration-aware call."""

    num_layers: int  # L
    num_log: int  # E
    num_slots: int  # P
    slots: int  # S
    nodes: int
    e_n: int  # E_n
    p_n: int  # P_n
    d_n: int  # D_n
    x_rows: int  # X = L * nodes


class _Candidates(NamedTuple):
    """The candidate group-to-node assignments.

    log2mlog: int32[C * L, E] node-local id of each expert, candidate-major.
    ok: bool[C, L] whether the candidate exists for the layer.
    node_perm: int32[L, nodes] the old node given to each from-scratch node (candidate 0).
    """

    log2mlog: jax.Array
    ok: jax.Array
    node_perm: jax.Array


def _candidates(
    w: jax.Array, old: jax.Array, fs_log2mlog: jax.Array, groups: int, dims: _Dims
) -> _Candidates:
    """Candidate 0: the from-scratch assignment with its nodes relabelled to the old nodes by
    overlap; in the hierarchical policy also the old placement's own assignment and that one after
    1 .. _GROUP_SWAPS greedy swaps of two groups (candidate 0 where the old one is not usable)."""
    num_layers, nodes, e_n, p_n = dims.num_layers, dims.nodes, dims.e_n, dims.p_n
    valid = old >= 0
    slot_node = jnp.broadcast_to(jnp.arange(dims.num_slots, dtype=jnp.int32) // p_n, old.shape)
    fs_node = fs_log2mlog // e_n
    if nodes > 1:
        a = jnp.take_along_axis(fs_node, jnp.where(valid, old, 0), axis=1)
        ov = jnp.zeros((num_layers, nodes, nodes), jnp.float32)
        ov = ov.at[rows(old), a, slot_node].add(valid.astype(jnp.float32))
        node_perm = _greedy_match(ov)
    else:
        node_perm = jnp.zeros((num_layers, 1), jnp.int32)
    cands = [jnp.take_along_axis(node_perm, fs_node, 1) * e_n + fs_log2mlog % e_n]
    cand_ok = [jnp.ones((num_layers,), bool)]
    if nodes > 1:
        l2ms, ok = _old_group_layouts(w, old, groups, nodes)
        for l2m in l2ms:
            cands.append(jnp.where(ok[:, None], l2m, cands[0]))
            cand_ok.append(ok)
    return _Candidates(jnp.concatenate(cands, axis=0), jnp.stack(cand_ok), node_perm)


def _old_view(
    old: jax.Array,
    mlog2log: jax.Array,
    item_e: jax.Array,
    item_rank: jax.Array,
    dims: _Dims,
) -> tuple[jax.Array, jax.Array]:
    """The old placement in each candidate's node-local ids.

    Both tables are built once per layer in global expert ids (one scatter of the L * P old
    slots) and read through each candidate's ids with gathers.

    Args:
      old: int32[L, P] current placement (-1 = empty).
      mlog2log: int32[C * L, E] global expert of each of the candidates' node-local ids.
      item_e, item_rank: int32[CX, P_n] expert and replica rank of each replica to place.
      dims: the sizes.

    Returns:
      (old_has bool[CX, D_n, E_n]: whether each device held each node-local expert before;
      pref int32[CX, P_n]: each replica's preferred device, -1 for none). The k-th replica of
      expert e prefers the device of the k-th old slot of e on the row's node (slot order).
    """
    num_layers, num_log = dims.num_layers, dims.num_log
    e_n, p_n, d_n, slots = dims.e_n, dims.p_n, dims.d_n, dims.slots
    num_cands = mlog2log.shape[0] // num_layers
    cx = num_cands * dims.x_rows
    if num_cands == 1:  # nothing to share: the scatters and the sort of the row itself
        return _old_view_single(old, mlog2log, item_e, item_rank, dims)
    max_rank = p_n - e_n + 1  # no expert has more replicas on a node
    old_n = old.reshape(dims.x_rows, p_n)
    occ = _occurrence(old_n)  # rank of each old slot among its node's slots of that expert
    valid = old_n >= 0
    expert = jnp.where(valid, old_n, num_log)
    node_row = rows(old_n)
    device = jnp.broadcast_to(jnp.arange(p_n, dtype=jnp.int32) // slots, old_n.shape)
    # int32 counts, not a bool scatter: XLA:GPU miscompiles a sliced pred scatter here.
    has = jnp.zeros((dims.x_rows, d_n, num_log + 1), jnp.int32)
    has = has.at[node_row, device, expert].add(1)[:, :, :num_log] > 0  # [X, D_n, E]
    kth = jnp.full((dims.x_rows, num_log + 1, max_rank), -1, jnp.int32)
    kth = kth.at[
        node_row, jnp.where(occ < max_rank, expert, num_log), jnp.minimum(occ, max_rank - 1)
    ]
    kth = kth.set(device, mode="drop")[:, :num_log]  # [X, E, R]: device of the r-th old slot
    # Global expert of each candidate row's node-local ids; X index of each candidate row.
    g = mlog2log.reshape(cx, e_n)
    x_of = jnp.arange(cx, dtype=jnp.int32) % dims.x_rows
    d_ids = jnp.arange(d_n, dtype=jnp.int32)
    flat_has = (x_of[:, None, None] * d_n + d_ids[:, None]) * num_log + g[:, None, :]
    old_has = jnp.take(has.reshape(-1), flat_has)  # [CX, D_n, E_n]
    item_g = jnp.take_along_axis(g, item_e, axis=1)
    flat_kth = (x_of[:, None] * num_log + item_g) * max_rank + jnp.minimum(item_rank, max_rank - 1)
    pref = jnp.take(kth.reshape(-1), flat_kth)
    return old_has, pref


def _old_view_single(
    old: jax.Array, mlog2log: jax.Array, item_e: jax.Array, item_rank: jax.Array, dims: _Dims
) -> tuple[jax.Array, jax.Array]:
    """`_old_view` for a single candidate: node-local old ids, then scatters and a sort per row."""
    e_n, p_n, d_n, slots = dims.e_n, dims.p_n, dims.d_n, dims.slots
    x_rows = dims.x_rows
    slot_node = jnp.arange(dims.num_slots, dtype=jnp.int32) // p_n
    loc = (
        jnp.take_along_axis(inverse(mlog2log), jnp.where(old >= 0, old, 0), axis=1)
        - slot_node * e_n
    )
    loc = jnp.where((old >= 0) & (loc >= 0) & (loc < e_n), loc, -1).reshape(x_rows, p_n)
    loc_or_pad = jnp.where(loc >= 0, loc, e_n)
    device_of_slot = jnp.broadcast_to(jnp.arange(p_n, dtype=jnp.int32) // slots, (x_rows, p_n))
    # int32 counts, not a bool scatter: XLA:GPU miscompiles a sliced pred scatter here.
    old_has = jnp.zeros((x_rows, d_n, e_n + 1), jnp.int32)
    old_has = old_has.at[rows(loc), device_of_slot, loc_or_pad].add(1)[:, :, :e_n] > 0
    _, by_expert = sort_by_key(loc_or_pad)
    old_cnt = jnp.zeros((x_rows, e_n + 1), jnp.int32).at[rows(loc), loc_or_pad].add(1)[:, :e_n]
    start = jnp.cumsum(old_cnt, axis=1) - old_cnt
    has_pref = item_rank < jnp.take_along_axis(old_cnt, item_e, 1)
    pos = jnp.clip(jnp.take_along_axis(start, item_e, 1) + item_rank, 0, p_n - 1)
    pref = jnp.where(has_pref, jnp.take_along_axis(by_expert, pos, 1) // slots, -1)
    return old_has, pref


def _relabelled_scratch(
    fs_rows: jax.Array, old_has: jax.Array, num_cands: int, dims: _Dims
) -> jax.Array:
    """The from-scratch rows with their devices matched to the old ones by overlap (candidate 0),
    repeated for every candidate: int32[CX, D_n, S]."""
    x_rows, d_n, p_n, slots = dims.x_rows, dims.d_n, dims.p_n, dims.slots
    idx = jnp.broadcast_to(fs_rows[:, None, :], (x_rows, d_n, p_n))
    held = jnp.take_along_axis(old_has[:x_rows], idx, axis=2)  # [X, D_n(old), P_n]
    overlap = held.reshape(x_rows, d_n, d_n, slots).sum(-1).astype(jnp.float32)
    device_perm = _greedy_match(jnp.swapaxes(overlap, 1, 2))  # [X, D_n(new)] -> old device
    fs_e = fs_rows.reshape(x_rows, d_n, slots)
    fs_e = jnp.zeros_like(fs_e).at[rows(device_perm), device_perm].set(fs_e, unique_indices=True)
    return jnp.concatenate([fs_e] * num_cands, axis=0)


def _choose(
    variants: jax.Array,
    rep_load: jax.Array,
    old_has: jax.Array,
    limit: jax.Array,
    cands: _Candidates,
    dims: _Dims,
) -> jax.Array:
    """Each row's cheapest variant within ``limit`` (ties: the sticky one), each layer's cheapest
    candidate whose rows all qualify (ties: the lower candidate).

    Args:
      variants: int32[CX, 2, D_n, S] node-local experts of the sticky and the relabelled rows.
      rep_load: float32[CX, E_n] load of one replica of each node-local expert.
      old_has: bool[CX, D_n, E_n] whether each device held each expert before.
      limit: float32[CX] the heaviest device load a row may have.
      cands: the candidates.
      dims: the sizes.

    Returns:
      phy2log int32[L, P] in global expert ids (slots not yet preserved).
    """
    num_layers, nodes, d_n, e_n, slots = dims.num_layers, dims.nodes, dims.d_n, dims.e_n, dims.slots
    num_cands = cands.ok.shape[0]
    cx = num_cands * dims.x_rows
    flat = variants.reshape(cx, 2 * d_n * slots)
    loads = fold_sum(jnp.take_along_axis(rep_load, flat, 1).reshape(cx, 2, d_n, slots))
    device_ids = jnp.broadcast_to(
        jnp.arange(d_n, dtype=jnp.int32)[None, :, None], (2, d_n, slots)
    ).reshape(-1)
    keep = jnp.take_along_axis(old_has.reshape(cx, d_n * e_n), device_ids * e_n + flat, axis=1)
    copies = jnp.sum(~keep.reshape(cx, 2, d_n * slots), axis=2)
    feasible = jnp.max(loads, axis=2) <= limit[:, None]
    # The relabelled from-scratch row only exists for candidate 0.
    feasible = feasible.at[dims.x_rows :, 1].set(False)
    big = jnp.int32(dims.num_slots + 1)
    score = jnp.where(feasible, copies, big)
    v = jnp.argmin(score, axis=1).astype(jnp.int32)  # [CX]
    row_copies = jnp.min(score, axis=1).reshape(num_cands, num_layers, nodes)
    layer_ok = jnp.all(row_copies < big, axis=2) & cands.ok
    layer_cost = jnp.where(layer_ok, row_copies.sum(2), big * nodes)
    c = jnp.argmin(layer_cost, axis=0).astype(jnp.int32)  # [L]
    chosen = jnp.take_along_axis(variants, v[:, None, None, None], axis=1)[:, 0]
    chosen = chosen.reshape(num_cands, num_layers, nodes * dims.p_n)
    chosen = jnp.take_along_axis(chosen, c[None, :, None], axis=0)[0]  # [L, P] node-local
    offset = (jnp.arange(nodes, dtype=jnp.int32) * e_n).repeat(dims.p_n)
    m2l = inverse(cands.log2mlog).reshape(num_cands, num_layers, dims.num_log)
    m2l = jnp.take_along_axis(m2l, c[None, :, None], axis=0)[0]
    return jnp.take_along_axis(m2l, chosen + offset, axis=1)


class Sticky(NamedTuple):
    """The replicas of every candidate row, ready for the sticky packing (`sticky_items`).

    old: int32[L, P] the current placement (-1 = empty or out of range); cands: the candidates;
    item_e: int32[CX, P_n] node-local expert of each replica; rep_load: float32[CX, E_n] load of
    one replica of each node-local expert; item_load: float32[CX, P_n] load of each replica;
    old_has: bool[CX, D_n, E_n] whether each device held each expert before; pref: int32[CX, P_n]
    each replica's preferred device (-1: none); dims: the static sizes.
    """

    old: jax.Array
    cands: _Candidates
    item_e: jax.Array
    rep_load: jax.Array
    item_load: jax.Array
    old_has: jax.Array
    pref: jax.Array
    dims: _Dims


def sticky_items(
    w: jax.Array,
    old: jax.Array,
    fs_log2mlog: jax.Array,
    *,
    num_slots: int,
    groups: int,
    nodes: int,
    num_devices: int,
) -> Sticky:
    """The first half of the migration-aware mode: candidates, their replicas, the old view.

    Args:
      w: float32[L, E] cleaned loads.
      old: int32[L, P] current placement (-1 = empty).
      fs_log2mlog: int32[L, E] the from-scratch node-local id of each expert.
      num_slots, groups, nodes, num_devices: P, the effective groups and nodes, D.
    """
    num_layers, num_log = w.shape
    dims = _Dims(
        num_layers=num_layers,
        num_log=num_log,
        num_slots=num_slots,
        slots=num_slots // num_devices,
        nodes=nodes,
        e_n=num_log // nodes,
        p_n=num_slots // nodes,
        d_n=num_devices // nodes,
        x_rows=num_layers * nodes,
    )
    old = jnp.where((old >= 0) & (old < num_log), old, -1)
    with jax.named_scope("candidates"):
        cands = _candidates(w, old, fs_log2mlog, groups, dims)
    num_cands = cands.ok.shape[0]
    cx = num_cands * dims.x_rows
    with jax.named_scope("replicate"):
        mlog2log = inverse(cands.log2mlog)
        node_w = jnp.take_along_axis(jnp.tile(w, (num_cands, 1)), mlog2log, 1)
        node_w = node_w.reshape(cx, dims.e_n)
        item_e, item_rank, count = replicate(node_w, dims.p_n)
        rep_load = node_w / count.astype(jnp.float32)  # [CX, E_n]
        item_load = jnp.take_along_axis(rep_load, item_e, 1)
    with jax.named_scope("old_view"):
        old_has, pref = _old_view(old, mlog2log, item_e, item_rank, dims)
    return Sticky(old, cands, item_e, rep_load, item_load, old_has, pref, dims)


def pack_both(fs_load: jax.Array, st: Sticky) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """The from-scratch packing of the node rows and the sticky packing of the candidate rows,
    as one scan over both sets of rows where the packs hold more than one replica (half the
    sequential steps of two scans; the same result).

    Args:
      fs_load: float32[X, P_n] the from-scratch replica loads (`deepseek.node_items`).
      st: the candidate rows.

    Returns:
      ((device, rank) int32[X, P_n] of the from-scratch replicas, device int32[CX, P_n] of the
      candidate replicas).
    """
    d_n, x_rows = st.dims.d_n, fs_load.shape[0]
    if st.dims.slots == 1:  # `pack` places single-replica packs in index order without a pref
        return pack(fs_load, d_n), pack(st.item_load, d_n, st.pref)[0]
    loads = jnp.concatenate([fs_load, st.item_load], axis=0)
    pref = jnp.concatenate([jnp.full(fs_load.shape, -1, jnp.int32), st.pref], axis=0)
    device, rank = pack(loads, d_n, pref)
    return (device[:x_rows], rank[:x_rows]), device[x_rows:]


def migrate(st: Sticky, device: jax.Array, fs_slot_mlog: jax.Array, target: jax.Array) -> jax.Array:
    """The migration-aware placement (see ``docs/policy.md``); returns phy2log int32[L, P].

    Candidates (C of them) are group-to-node assignments (`_candidates`). For each candidate and
    node row, the replica counts of that candidate's node loads are packed sticky (each kept
    replica on its old device: `pack_both`) and swap-refined, fewest new copies first, down to the
    from-scratch maximum plus the slack; the first candidate also has the from-scratch row with its
    devices relabelled by overlap. Each row keeps its cheapest variant within the slack (ties: the
    sticky one), each layer its cheapest candidate whose rows all qualify (ties: the lower
    candidate); the relabelled from-scratch rows guarantee one. Cost: remote copies, experts a
    device did not hold before.

    Args:
      st: the candidate rows (`sticky_items`).
      device: int32[CX, P_n] the device of each candidate replica (the sticky packing).
      fs_slot_mlog: int32[L * nodes, P_n] the from-scratch node-local experts per slot (after
        refinement).
      target: float32[L] its heaviest device load per layer.
    """
    dims, cands = st.dims, st.cands
    num_layers, nodes, slots = dims.num_layers, dims.nodes, dims.slots
    num_cands = cands.ok.shape[0]
    cx = num_cands * dims.x_rows
    with jax.named_scope("sticky_pack"):
        # Each device's replicas in item order.
        entries = jnp.take_along_axis(st.item_e, sort_by_key(device)[1], axis=1)
    with jax.named_scope("sticky_refine"):
        # Swaps between devices until each row is within the slack of the from-scratch maximum.
        limit = jnp.tile(jnp.repeat(target, nodes), num_cands) * (1.0 + _MIGRATION_SLACK)
        e_load = jnp.take_along_axis(st.rep_load, entries, 1)
        _, (entries,) = swap_refine(e_load, (entries,), slots, stop=limit, held=st.old_has)
        entries = entries.reshape(cx, dims.d_n, slots)
    with jax.named_scope("relabel_devices"):
        fs_rows = jnp.take_along_axis(
            fs_slot_mlog.reshape(num_layers, nodes, dims.p_n),
            inverse(cands.node_perm)[:, :, None],
            axis=1,
        ).reshape(dims.x_rows, dims.p_n)  # moved to the node each one maps to in candidate 0
        fs_all = _relabelled_scratch(fs_rows, st.old_has, num_cands, dims)
        variants = jnp.stack([entries, fs_all], axis=1)  # [CX, 2, D_n, S]
    with jax.named_scope("choose"):
        phy2log = _choose(variants, st.rep_load, st.old_has, limit, cands, dims)
    with jax.named_scope("preserve_slots"):
        shape = (num_layers, dims.num_slots // slots, slots)
        phy2log = preserve_slots(phy2log.reshape(shape), st.old.reshape(shape))
    return phy2log.reshape(num_layers, dims.num_slots)

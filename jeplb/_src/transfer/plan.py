"""The transfer plan: who sends which row to whom, computed from the maps alone.

Every device evaluates the same jnp program on the same replicated maps, so every device derives the
same plan without talking to the others, and one compiled program serves every plan of the same
shapes. Nothing here moves weights; the engine (`engine`) executes the plan.

Letters: L layers, P physical slots, D devices on the expert-parallel axis, N = P // D slots per
device (N_local), W = table width (N rounded up to a multiple of the chunk capacity C).

Semantics (those of vLLM's rebalance_execute, written for a static-shape SPMD program):

* A slot p with ``new[p] == -1`` or ``new[p] == old[p]`` is *unchanged*: it is never written.
* A changed slot whose new expert is already held by some slot of its own device (in the old map)
  is *received locally*: it copies from the first such slot.
* Otherwise the device receives the expert remotely, once: the lowest changed slot wanting it is the
  *primary*, the others are *duplicates* copied from the primary's staged row at commit.
* The sender of each primary is chosen among the devices holding the expert, greedily: primaries
  with the fewest holders first, each to the holder whose rotation round (shift = dst - src mod D)
  grows least, then to the holder that sends least so far, then the lowest device index. With a
  topology (``devices_per_node``), a holder on the receiver's node comes before every other. Rows
  of a
  round travel in chunks of C rows; the round of shift s runs ceil(max pair load / C) chunks.
* A plan is *feasible* when every expert the new map names is held somewhere in the old map and
  every id is >= -1. An infeasible layer is planned as a no-op and flagged ``ok = False``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jeplb._src.transfer import rows as rows_lib

__all__ = [
    "GlobalPlan",
    "RaggedTables",
    "TransferMetadata",
    "classify",
    "local_metadata",
    "plan_layer",
    "plan_layers",
    "ragged_tables",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransferMetadata:
    """What one device needs to commit one layer's staged rows: vLLM's TransferMetadata, per device.

    The first six fields carry exactly the meaning and order of vLLM's fields of the same names
    (``rebalance_execute.py``); the others are what this transfer's commit needs besides. Arrays
    are per device; rows are local slot indices in ``[0, N)``; packed lists hold their valid
    entries first and are padded with -1.

    Attributes:
      is_unchanged: bool[N]. The slot's expert is the same before and after (-1 to -1 included).
      is_received_locally: bool[N]. The slot needs nothing from another device: it is unchanged,
        or its new expert is held by a slot of this device in the old map.
      recv_primary_mask: bool[N]. The slot receives its expert from another device (the lowest
        slot of this device wanting that expert).
      recv_count: int32[]. Number of primary receives (distinct experts received).
      recv_expert_ids: int32[N]. Packed logical ids of the received experts, ascending.
      recv_dst_rows: int32[N]. Packed local slot of each entry of ``recv_expert_ids``.
      local_src_rows: int32[N]. For a changed slot copied from a slot of this device, that slot;
        else -1.
      commit_dst_rows: int32[N]. Packed local slots written at commit (local copies, primaries,
        duplicates).
      commit_src_rows: int32[N]. For each entry of ``commit_dst_rows``, the staging-buffer row it
        takes (a duplicate takes its primary's row).
      commit_count: int32[]. Number of valid entries of the commit lists.
      ok: bool[]. False when the plan was infeasible; then nothing is staged or committed.
    """

    is_unchanged: jax.Array
    is_received_locally: jax.Array
    recv_primary_mask: jax.Array
    recv_count: jax.Array
    recv_expert_ids: jax.Array
    recv_dst_rows: jax.Array
    local_src_rows: jax.Array
    commit_dst_rows: jax.Array
    commit_src_rows: jax.Array
    commit_count: jax.Array
    ok: jax.Array

    def replace(self, **changes) -> TransferMetadata:
        """Returns a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GlobalPlan:
    """The whole plan of one layer (or, with a leading L axis, of every layer), replicated.

    Attributes:
      changed: bool[P]. Slot is written.
      local: bool[P]. Slot copies from a slot of its own device.
      local_src: int32[P]. Local row (in ``[0, N)``) copied from, for local slots.
      primary: bool[P]. Slot receives its expert from another device.
      primary_of: int32[P]. For changed remote slots, the primary slot (global index) of their
        device and expert; a primary is its own.
      send_rows: int32[D, D, W]. ``send_rows[src, s, j]``: the local row device ``src`` sends as
        the j-th row of rotation round s (to device ``src + s mod D``); -1 pads.
      recv_rows: int32[D, D, W]. ``recv_rows[dst, s, j]``: the local row of device ``dst`` that the
        j-th row of round s (from ``dst - s mod D``) is staged for; -1 pads.
      num_chunks: int32[D]. Chunks of C rows in round s (index 0, the no-shift round, is 0).
      wire_rows: int32[]. Rows the busiest device moves over all rounds, padding included.
      min_rows: int32[]. The most rows any device must send or receive remotely.
      ok: bool[]. The plan is feasible (else it is a no-op).
      inter_node_rows: int32[]. Primaries whose sender is on another node (0 without a
        topology).
      sender: int32[P]. The device each primary receives from; -1 for other slots.
    """

    changed: jax.Array
    local: jax.Array
    local_src: jax.Array
    primary: jax.Array
    primary_of: jax.Array
    send_rows: jax.Array
    recv_rows: jax.Array
    num_chunks: jax.Array
    wire_rows: jax.Array
    min_rows: jax.Array
    ok: jax.Array
    inter_node_rows: jax.Array
    sender: jax.Array


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True along the last axis (0 when there is none)."""
    return jnp.argmax(mask, axis=-1).astype(jnp.int32)


def classify(old: jax.Array, new: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Which slots of one layer are written, and whether the plan is feasible.

    Args:
      old: int32[P] the map before.
      new: int32[P] the map after.

    Returns:
      ``(changed bool[P], ok bool[])``: a slot is written when it wants an expert other than the
      one it holds; ``ok`` when every such expert is held by some old slot and no id is below -1
      (when not ok, nothing is written: ``changed`` is all False).
    """
    wanted = new >= 0
    raw_changed = wanted & (new != old)
    held = ((old[None, :] == new[:, None]) & wanted[:, None]).any(-1)
    ok = jnp.all(~raw_changed | held) & jnp.all(old >= -1) & jnp.all(new >= -1)
    return raw_changed & ok, ok


def plan_layer(
    old: jax.Array,
    new: jax.Array,
    *,
    num_devices: int,
    chunk_rows: int = 1,
    devices_per_node: int | None = None,
) -> GlobalPlan:
    """Plans the transfer of one layer.

    Args:
      old: int32[P] physical-to-logical map before, -1 for empty slots.
      new: int32[P] physical-to-logical map after.
      num_devices: D, devices on the expert-parallel axis (static).
      chunk_rows: C, rows per collective chunk (static).
      devices_per_node: devices per node, in axis order (static; must divide D): senders on the
        receiver's node are preferred. None: a flat network.

    Returns:
      The layer's `GlobalPlan`.
    """
    old = old.astype(jnp.int32)
    new = new.astype(jnp.int32)
    with jax.named_scope("plan_classify"):
        slots = _classify_slots(old, new, num_devices)
    with jax.named_scope("plan_senders"):
        node = devices_per_node or num_devices
        src_dev, rank, round_max, send_load = _assign_senders(slots, num_devices, node)
    with jax.named_scope("plan_tables"):
        plan = _tables(slots, src_dev, rank, round_max, send_load, num_devices, chunk_rows)
    dev = jnp.arange(old.shape[0], dtype=jnp.int32) // (old.shape[0] // num_devices)
    inter = plan.primary & (src_dev // node != dev // node)
    return dataclasses.replace(
        plan,
        inter_node_rows=inter.sum().astype(jnp.int32),
        sender=jnp.where(plan.primary, src_dev, -1).astype(jnp.int32),
    )


class _Slots(NamedTuple):
    """Per slot of one layer (all [P]; ``holds_by_dev`` [P, D, N], ``holder`` [P, D])."""

    changed: jax.Array
    ok: jax.Array
    holds_by_dev: jax.Array
    holder: jax.Array
    local: jax.Array
    local_src: jax.Array
    primary_of: jax.Array
    primary: jax.Array


def _classify_slots(old: jax.Array, new: jax.Array, d: int) -> _Slots:
    """Which slots are written, copied locally, received as primaries or as duplicates."""
    p_total = old.shape[0]
    n = p_total // d
    slot = jnp.arange(p_total, dtype=jnp.int32)
    dev = slot // n
    changed, ok = classify(old, new)
    # holds[p, q]: old slot q holds the expert slot p wants.
    holds = (old[None, :] == new[:, None]) & (new >= 0)[:, None]
    holds_by_dev = holds.reshape(p_total, d, n)
    holder = holds_by_dev.any(-1)  # [P, D]
    own_dev_holds = jnp.take_along_axis(holds_by_dev, dev[:, None, None], axis=1)[:, 0, :]
    local = changed & own_dev_holds.any(-1)
    local_src = jnp.where(local, _first_true(own_dev_holds), -1)
    remote = changed & ~local
    same_want = (
        (new[:, None] == new[None, :])
        & (dev[:, None] == dev[None, :])
        & remote[:, None]
        & remote[None, :]
    )
    primary_of = jnp.where(remote, _first_true(same_want), -1)
    primary = remote & (primary_of == slot)
    return _Slots(changed, ok, holds_by_dev, holder, local, local_src, primary_of, primary)


def _assign_senders(slots: _Slots, d: int, per_node: int):
    """The sender of each primary, greedily (see the module docstring): (src_dev int32[P],
    rank int32[P] its place in its round, round_max int32[D], send_load int32[D]). Devices
    ``[k * per_node, (k + 1) * per_node)`` share a node; same-node holders come first."""
    p_total = slots.primary.shape[0]
    slot = jnp.arange(p_total, dtype=jnp.int32)
    dev = slot // (p_total // d)
    num_holders = slots.holder.sum(-1).astype(jnp.int32)
    order = jnp.argsort(jnp.where(slots.primary, num_holders, d + 1) * p_total + slot, stable=True)
    devs = jnp.arange(d, dtype=jnp.int32)

    def assign(carry, p):
        pair_load, send_load, round_max = carry
        shifts = (dev[p] - devs) % d
        grows = (pair_load[devs, shifts] + 1 > round_max[shifts]).astype(jnp.int32)
        far = (devs // per_node != dev[p] // per_node).astype(jnp.int32)
        score = ((far * 2 + grows) * (p_total + 1) + send_load) * d + devs
        score = jnp.where(slots.holder[p], score, jnp.iinfo(jnp.int32).max)
        src = jnp.argmin(score).astype(jnp.int32)
        s = shifts[src]
        j = pair_load[src, s]
        take = slots.primary[p]
        inc = take.astype(jnp.int32)
        pair_load = pair_load.at[src, s].add(inc)
        send_load = send_load.at[src].add(inc)
        round_max = round_max.at[s].max(jnp.where(take, j + 1, 0))
        return (pair_load, send_load, round_max), (src, j)

    # Inside shard_map the carry varies as the maps do (they may vary when devices disagree).
    vary = rows_lib.varying_axes(slots.holder)
    zeros = rows_lib.make_varying(jnp.zeros((d,), jnp.int32), vary)
    init = (rows_lib.make_varying(jnp.zeros((d, d), jnp.int32), vary), zeros, zeros)
    (_, send_load, round_max), (src_sorted, j_sorted) = jax.lax.scan(assign, init, order)
    src_dev = jnp.zeros((p_total,), jnp.int32).at[order].set(src_sorted)
    rank = jnp.zeros((p_total,), jnp.int32).at[order].set(j_sorted)
    return src_dev, rank, round_max, send_load


def _tables(slots: _Slots, src_dev, rank, round_max, send_load, d: int, c: int) -> GlobalPlan:
    """The rounds' send and receive tables, chunk counts and wire figures."""
    p_total = slots.primary.shape[0]
    n = p_total // d
    width = -(-n // c) * c
    slot = jnp.arange(p_total, dtype=jnp.int32)
    dev, row = slot // n, slot % n
    primary = slots.primary
    shift = (dev - src_dev) % d
    src_holds = jnp.take_along_axis(slots.holds_by_dev, src_dev[:, None, None], axis=1)[:, 0, :]
    src_row = _first_true(src_holds)
    # Non-primaries scatter to an out-of-range index and are dropped.
    sdev = jnp.where(primary, src_dev, d)
    rdev = jnp.where(primary, dev, d)
    empty = jnp.full((d, d, width), -1, jnp.int32)
    send_rows = empty.at[sdev, shift, rank].set(src_row, mode="drop")
    recv_rows = empty.at[rdev, shift, rank].set(row, mode="drop")
    num_chunks = ((round_max + c - 1) // c).at[0].set(0)
    recv_load = jnp.zeros((d,), jnp.int32).at[dev].add(primary.astype(jnp.int32))
    return GlobalPlan(
        changed=slots.changed,
        local=slots.local,
        local_src=slots.local_src,
        primary=primary,
        primary_of=slots.primary_of,
        send_rows=send_rows,
        recv_rows=recv_rows,
        num_chunks=num_chunks.astype(jnp.int32),
        wire_rows=(num_chunks.sum() * c).astype(jnp.int32),
        min_rows=jnp.maximum(recv_load.max(), send_load.max()).astype(jnp.int32),
        ok=slots.ok,
        inter_node_rows=jnp.int32(0),
        sender=jnp.where(primary, src_dev, -1).astype(jnp.int32),
    )


def plan_layers(
    old: jax.Array,
    new: jax.Array,
    *,
    num_devices: int,
    chunk_rows: int = 1,
    devices_per_node: int | None = None,
) -> GlobalPlan:
    """`plan_layer` over a leading layer axis: maps int32[L, P] -> a `GlobalPlan` with leading L."""
    return jax.vmap(
        lambda o, n: plan_layer(
            o, n, num_devices=num_devices, chunk_rows=chunk_rows, devices_per_node=devices_per_node
        )
    )(old, new)


def pack(mask: jax.Array, values: jax.Array) -> jax.Array:
    """The entries of ``values`` where ``mask`` holds, first and in order, padded with -1."""
    order = jnp.argsort(~mask, stable=True)
    count = mask.sum()
    return jnp.where(jnp.arange(mask.shape[0]) < count, values[order], -1).astype(jnp.int32)


def local_metadata(
    plan: GlobalPlan, old: jax.Array, new: jax.Array, device: jax.Array, *, num_devices: int
):
    """One device's view of a one-layer plan.

    Args:
      plan: a one-layer `GlobalPlan` (no leading L).
      old: int32[P] the layer's map before.
      new: int32[P] the layer's map after (as planned: the old map when the plan is infeasible).
      device: int32[] this device's index on the axis.
      num_devices: D (static).

    Returns:
      ``(metadata, send_rows int32[D, W], recv_rows int32[D, W])`` for this device.
    """
    p_total = new.shape[0]
    n = p_total // num_devices
    start = device * n

    def mine(x):
        return jax.lax.dynamic_slice_in_dim(x, start, n)

    changed = mine(plan.changed)
    local = mine(plan.local)
    primary = mine(plan.primary)
    mine_new = mine(jnp.where(plan.ok, new, old).astype(jnp.int32))
    rows = jnp.arange(n, dtype=jnp.int32)
    # vLLM lists the received experts by ascending id.
    by_expert = jnp.argsort(jnp.where(primary, mine_new, jnp.iinfo(jnp.int32).max), stable=True)
    received = rows < primary.sum()
    # A duplicate's primary is on the same device: its local row is primary_of - start.
    staged_row = jnp.where(changed & ~local, mine(plan.primary_of) - start, rows)
    unchanged = mine(old.astype(jnp.int32)) == mine_new
    meta = TransferMetadata(
        is_unchanged=unchanged,
        is_received_locally=unchanged | local,
        recv_primary_mask=primary,
        recv_count=primary.sum().astype(jnp.int32),
        recv_expert_ids=jnp.where(received, mine_new[by_expert], -1),
        recv_dst_rows=jnp.where(received, rows[by_expert], -1),
        local_src_rows=mine(plan.local_src),
        commit_dst_rows=pack(changed, rows),
        commit_src_rows=pack(changed, staged_row),
        commit_count=changed.sum().astype(jnp.int32),
        ok=plan.ok,
    )
    send_rows = jax.lax.dynamic_index_in_dim(plan.send_rows, device, keepdims=False)
    recv_rows = jax.lax.dynamic_index_in_dim(plan.recv_rows, device, keepdims=False)
    return meta, send_rows, recv_rows


class RaggedTables(NamedTuple):
    """One device's tables for `lax.ragged_all_to_all` waves of one layer (what a future
    exact-bytes `collective.Collective` would consume; see docs/transfer.md). S = ``capacity``.

    Attributes:
      num_waves: int32[]. Waves of at most S sent rows per device (the same on every device).
      send_rows: int32[V, S]. Per wave, the local rows packed into the operand, grouped by
        destination (ascending); -1 pads.
      input_offsets: int32[V, D]. Where each destination's segment starts in the operand.
      send_sizes: int32[V, D]. Rows sent to each device.
      output_offsets: int32[V, D]. Where this device's segment lands in each destination's
        output (a receive buffer of N rows, filled over the waves).
      recv_sizes: int32[V, D]. Rows received from each device.
      recv_rows: int32[N]. For each row of the receive buffer, the staging row it belongs to;
        -1 pads.
    """

    num_waves: jax.Array
    send_rows: jax.Array
    input_offsets: jax.Array
    send_sizes: jax.Array
    output_offsets: jax.Array
    recv_sizes: jax.Array
    recv_rows: jax.Array


def ragged_tables(
    plan: GlobalPlan, device: jax.Array, *, num_devices: int, capacity: int
) -> RaggedTables:
    """The exact-bytes exchange of a one-layer plan as waves of one `lax.ragged_all_to_all`.

    No stage runs it yet: it is the plan a future exact-bytes collective (one new module behind
    `collective.Collective`, for GPUs and TPUs; XLA:CPU cannot compile the collective) would
    consume, kept with its tests so that stage only has to move the rows.

    Device a's sends, grouped by destination b ascending (in each pair, the order of the plan's
    round of shift b - a), are cut into waves of ``capacity`` rows. Every table comes from the
    replicated plan, so each device knows where its rows land on its peers without a collective.
    A device receives at most N rows in all, so the output is one N-row receive buffer, filled
    wave after wave, senders ascending within a wave.

    Args:
      plan: a one-layer `GlobalPlan`.
      device: int32[] this device's index.
      num_devices: D (static).
      capacity: S, rows one wave's operand holds (static); V = ceil(P / S) waves at most.

    Returns:
      This device's `RaggedTables` (waves past ``num_waves`` send and receive nothing).
    """
    d, s = num_devices, capacity
    p_total = plan.changed.shape[0]
    n, width = p_total // d, plan.send_rows.shape[-1]
    waves = -(-p_total // s)
    devs = jnp.arange(d, dtype=jnp.int32)
    shift = (devs[None, :] - devs[:, None]) % d  # [src, dst]
    pair = (plan.send_rows >= 0).sum(-1).astype(jnp.int32)  # [src, shift]
    load = jnp.take_along_axis(pair, shift, axis=1) * (shift > 0)  # [src, dst]
    start = jnp.cumsum(load, axis=1) - load  # exclusive, in src's send order
    lo = jnp.arange(waves, dtype=jnp.int32)[:, None, None] * s  # [V, 1, 1]
    seg_lo = jnp.clip(start[None] - lo, 0, s)
    seg_hi = jnp.clip(start[None] + load[None] - lo, 0, s)
    sizes = seg_hi - seg_lo  # [V, src, dst]
    # Receive positions: waves in turn, senders ascending within a wave.
    flat = sizes.transpose(2, 0, 1).reshape(d, waves * d)  # [dst, (wave, src)]
    before = (jnp.cumsum(flat, axis=1) - flat).reshape(d, waves, d).transpose(1, 2, 0)
    # This device's operand rows per wave: entry k of its send list is row j of pair (me, b).
    k = jnp.arange(waves * s, dtype=jnp.int32)
    mine = jax.lax.dynamic_index_in_dim(start, device, keepdims=False)
    mload = jax.lax.dynamic_index_in_dim(load, device, keepdims=False)
    dst = jnp.clip(jnp.sum(mine[None, :] + mload[None, :] <= k[:, None], axis=1), 0, d - 1)
    j = k - mine[dst]
    rows_me = jax.lax.dynamic_index_in_dim(plan.send_rows, device, keepdims=False)
    valid = k < mload.sum()
    sent = jnp.where(valid, rows_me[(dst - device) % d, jnp.clip(j, 0, width - 1)], -1)
    # Receive buffer: for each sender in order, its rows for me, in its pair order.
    got = jax.lax.dynamic_index_in_dim(plan.recv_rows, device, keepdims=False)  # [shift, W]
    src_of = (device - devs) % d  # shift t comes from device - t
    pos = before[:, src_of, device][:, :, None]  # [V, shift, 1]
    rank = jnp.arange(width, dtype=jnp.int32)[None, None, :]
    # Row j of pair (src -> me) travels in the wave holding entry start[src, me] + j.
    entry = jnp.take(start[:, device], src_of)[None, :, None] + rank
    wave_of = entry // s
    in_wave = (wave_of == jnp.arange(waves)[:, None, None]) & (got[None] >= 0)
    first = jnp.clip(jnp.take(start[:, device], src_of)[None, :, None] - lo, 0, s)
    at = pos + (entry - lo) - first
    recv = jnp.full((n + 1,), -1, jnp.int32)
    recv = recv.at[jnp.where(in_wave, at, n)].set(jnp.broadcast_to(got[None], at.shape))
    return RaggedTables(
        num_waves=((load.sum(1).max() + s - 1) // s).astype(jnp.int32),
        send_rows=sent.reshape(waves, s),
        input_offsets=seg_lo[:, device, :],
        send_sizes=sizes[:, device, :],
        output_offsets=before[:, device, :],
        recv_sizes=sizes[:, :, device],
        recv_rows=recv[:n],
    )

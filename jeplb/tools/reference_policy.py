"""A plain numpy implementation of DeepSeek's EPLB placement, written for clarity, not speed.

It serves as the independent reference of the tests and as the baseline of the placement benchmark.
It follows the steps of DeepSeek's hierarchical policy one loop at a time, with the tie rules that
`jeplb._src.policy.deepseek` documents, so the two must agree exactly on every input:

* arithmetic in float32 (loads are cast first; a group's load is the float32 sum of its experts
  left to right; a replica's load is ``load / count`` in float32; a pack's load is the float32
  running sum of its items, in packing order);
* items are packed heaviest first, equal loads in increasing item index;
* an item goes to the lightest pack that still has room, equal loads to the lowest pack index;
* a redundant replica goes to the expert with the largest ``load / count``, equal values to the
  lowest index (node-local order in the hierarchical policy).

Letters: L layers, E logical experts, P physical slots (``num_slots``), D devices.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rebalance_experts_numpy"]


def _pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced packing of the n items of each row into ``num_packs`` packs of n / num_packs.

    Returns (pack, rank): for each item, its pack and its position in that pack (the order in which
    the pack received it).
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return (
            np.tile(np.arange(n, dtype=np.int64), (rows, 1)),
            np.zeros((rows, n), dtype=np.int64),
        )
    pack = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    for x in range(rows):
        order = sorted(range(n), key=lambda i, row=weight[x]: (-float(row[i]), i))
        loads = [np.float32(0.0)] * num_packs
        items = [0] * num_packs
        for i in order:
            best = -1
            for k in range(num_packs):
                if items[k] < per_pack and (best < 0 or loads[k] < loads[best]):
                    best = k
            pack[x, i] = best
            rank[x, i] = items[best]
            loads[best] = np.float32(loads[best] + weight[x, i])
            items[best] += 1
    return pack, rank


def _replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gives each row's experts ``num_phy`` replicas in total, one more at a time to the expert with
    the largest load per replica. Returns (phy2log, rank, count)."""
    rows, num_log = weight.shape
    phy2log = np.zeros((rows, num_phy), dtype=np.int64)
    rank = np.zeros((rows, num_phy), dtype=np.int64)
    count = np.ones((rows, num_log), dtype=np.int64)
    phy2log[:, :num_log] = np.arange(num_log)
    for x in range(rows):
        for p in range(num_log, num_phy):
            per_replica = weight[x] / count[x].astype(np.float32)
            e = int(np.argmax(per_replica))
            phy2log[x, p] = e
            rank[x, p] = count[x, e]
            count[x, e] += 1
    return phy2log, rank, count


def _hierarchical(
    weight: np.ndarray, num_phy: int, num_groups: int, num_nodes: int, num_devices: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    num_layers, num_log = weight.shape
    group_size = num_log // num_groups
    groups_per_node = num_groups // num_nodes
    log_per_node = num_log // num_nodes
    phy_per_node = num_phy // num_nodes
    devices_per_node = num_devices // num_nodes
    slots_per_device = num_phy // num_devices

    # 1. groups onto nodes; node-local ("mlog") order: node, then rank in node, then expert in group
    grouped = weight.reshape(num_layers, num_groups, group_size)
    group_load = grouped[..., 0].copy()
    for k in range(1, group_size):  # left to right in float32, as the jnp implementation
        group_load = (group_load + grouped[..., k]).astype(np.float32)
    node, node_rank = _pack(group_load, num_nodes)
    mlog_of_log = np.zeros((num_layers, num_log), dtype=np.int64)
    for layer in range(num_layers):
        for g in range(num_groups):
            first = (node[layer, g] * groups_per_node + node_rank[layer, g]) * group_size
            mlog_of_log[layer, g * group_size : (g + 1) * group_size] = first + np.arange(
                group_size
            )
    log_of_mlog = np.argsort(mlog_of_log, axis=1)

    # 2. replicas within each node
    node_weight = np.take_along_axis(weight, log_of_mlog, axis=1).reshape(-1, log_per_node)
    phy_mlog, phy_rank, mlog_count = _replicate(node_weight, phy_per_node)

    # 3. each node's replicas onto its devices; the slot is the device's rank of arrival
    replica_load = np.take_along_axis(
        node_weight / mlog_count.astype(np.float32), phy_mlog, axis=1
    ).astype(np.float32)
    device, device_rank = _pack(replica_load, devices_per_node)
    slot = device * slots_per_device + device_rank

    phy2log = np.zeros((num_layers, num_phy), dtype=np.int64)
    rank = np.zeros((num_layers, num_phy), dtype=np.int64)
    for row in range(num_layers * num_nodes):
        layer, n = divmod(row, num_nodes)
        for p in range(phy_per_node):
            dst = n * phy_per_node + slot[row, p]
            phy2log[layer, dst] = log_of_mlog[layer, n * log_per_node + phy_mlog[row, p]]
            rank[layer, dst] = phy_rank[row, p]
    count = np.take_along_axis(mlog_count.reshape(num_layers, num_log), mlog_of_log, axis=1)
    return phy2log, rank, count


def rebalance_experts_numpy(
    load, num_slots: int, num_groups: int, num_nodes: int, num_devices: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek's EPLB placement in numpy (no argument checks beyond shapes dividing).

    Args:
      load: [L, E] load per logical expert.
      num_slots: P, physical slots per layer (a multiple of ``num_devices``, at least E).
      num_groups: expert groups (E / num_groups consecutive experts each).
      num_nodes: nodes; the hierarchical policy is used when ``num_groups % num_nodes == 0``.
      num_devices: D, devices in total (a multiple of ``num_nodes``).

    Returns:
      (phy2log int64[L, P], log2phy int64[L, E, P - E + 1] padded with -1, logcnt int64[L, E]).

    Example:
      >>> w = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
      >>> rebalance_experts_numpy(w, 16, 4, 2, 8)[0].tolist()
      [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """
    weight = np.asarray(load, dtype=np.float32)
    num_layers, num_log = weight.shape
    if num_groups % num_nodes == 0:
        phy2log, rank, count = _hierarchical(weight, num_slots, num_groups, num_nodes, num_devices)
    else:
        phy2log, rank, count = _hierarchical(weight, num_slots, 1, 1, num_devices)
    width = num_slots - num_log + 1
    log2phy = np.full((num_layers, num_log, width), -1, dtype=np.int64)
    for layer in range(num_layers):
        for p in range(num_slots):
            log2phy[layer, phy2log[layer, p], rank[layer, p]] = p
    return phy2log, log2phy, count

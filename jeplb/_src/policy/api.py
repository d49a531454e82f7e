"""The placement policy's entry point: `rebalance_experts`, DeepSeek's EPLB in jnp, jit-able.

Letters: L layers, E logical experts, P physical slots (``num_slots``), D devices
(``num_devices``), S = P // D slots per device; slot p lives on device p // S.

The work is split by what it does: `deepseek` (the from-scratch policy: packing, replication,
node layout), `refine` (swap refinement), `migration` (the migration-aware mode), `budget` (its
move budget), `loads` (the float32 loads, scaled where they would overflow), `checks` (the
argument checks), `ops` (row-wise helpers). This module checks the arguments, runs one jitted
program per shape and configuration and maps the node-local result back to global expert ids.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jeplb._src.policy.budget import within_budget
from jeplb._src.policy.checks import check_args, check_groups
from jeplb._src.policy.deepseek import NodeLayout, node_items, node_layout, node_slots
from jeplb._src.policy.loads import clean, host_load
from jeplb._src.policy.migration import migrate, pack_both, sticky_items
from jeplb._src.policy.ops import fold_sum, log2phy_of, rows, slot_ranks
from jeplb._src.policy.refine import swap_refine
from jeplb._src.validate import check_bool, check_int

__all__ = ["DeepSeekPolicy", "rebalance_experts"]


def _effective(num_groups: int, num_nodes: int) -> tuple[int, int]:
    """The (groups, nodes) the policy runs with: the global policy is the hierarchical one with a
    single group on a single node."""
    if num_groups % num_nodes == 0:
        return num_groups, num_nodes
    return 1, 1


def _scratch_maps(
    lay: NodeLayout, slot_mlog: jax.Array, slot_rank: jax.Array, num_slots: int, nodes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(phy2log, log2phy, logcnt) of the from-scratch node layout in global expert ids."""
    num_layers, num_log = lay.mlog2log.shape
    log_per_node = num_log // nodes
    offset = (jnp.arange(nodes, dtype=jnp.int32) * log_per_node)[None, :, None]
    glob_mlog = (slot_mlog.reshape(num_layers, nodes, -1) + offset).reshape(num_layers, -1)
    phy2log = jnp.take_along_axis(lay.mlog2log, glob_mlog, axis=1)
    rank = slot_rank.reshape(num_layers, num_slots)
    logcnt = jnp.take_along_axis(lay.count.reshape(num_layers, num_log), lay.log2mlog, 1)
    log2phy = log2phy_of(phy2log, rank, num_log, num_slots - num_log + 1)
    return phy2log, log2phy, logcnt


def _placement_maps(phy2log: jax.Array, num_log: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(phy2log, log2phy, logcnt) of a phy2log int32[L, P] with every expert present (-1 slots:
    empty ones a move budget kept), replica ranks in slot order."""
    num_layers, num_slots = phy2log.shape
    rank = slot_ranks(phy2log)
    ids = jnp.where(phy2log >= 0, phy2log, num_log)  # past the end: dropped, not wrapped
    logcnt = jnp.zeros((num_layers, num_log + 1), jnp.int32).at[rows(phy2log), ids].add(1)
    log2phy = log2phy_of(ids, rank, num_log, num_slots - num_log + 1)
    return phy2log, log2phy, logcnt[:, :num_log]


@partial(
    jax.jit,
    static_argnames=("num_slots", "num_groups", "num_nodes", "num_devices", "refine"),
)
def _rebalance_jit(
    load: jax.Array,
    old_phy2log: jax.Array | None,
    move_budget: jax.Array | None = None,
    *,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_devices: int,
    refine: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The policy on checked arguments (``num_groups``, ``num_nodes`` already the effective ones;
    ``move_budget`` None or a traced int32 scalar, used only with ``old_phy2log``)."""
    num_layers, num_log = load.shape
    slots = num_slots // num_devices
    w = clean(load)
    if old_phy2log is None:
        lay = node_layout(w, num_slots, num_groups, num_nodes, num_devices)
    else:  # the from-scratch and the sticky packing in one scan
        items = node_items(w, num_slots, num_groups, num_nodes)
        st = sticky_items(
            w,
            old_phy2log.astype(jnp.int32),
            items.log2mlog,
            num_slots=num_slots,
            groups=num_groups,
            nodes=num_nodes,
            num_devices=num_devices,
        )
        with jax.named_scope("replicas_to_devices"):
            (device, device_rank), sticky_device = pack_both(items.rep_load, st)
            lay = node_slots(items, device, device_rank, slots)
    slot_load, slot_mlog, slot_rank = lay.slot_load, lay.slot_mlog, lay.slot_rank
    if refine:
        with jax.named_scope("refine"):
            slot_load, (slot_mlog, slot_rank) = swap_refine(
                slot_load, (slot_mlog, slot_rank), slots
            )
    if old_phy2log is None:
        with jax.named_scope("to_global"):
            return _scratch_maps(lay, slot_mlog, slot_rank, num_slots, num_nodes)
    target = fold_sum(slot_load.reshape(num_layers, -1, slots)).max(-1)
    phy2log = migrate(st, sticky_device, slot_mlog, target)
    if move_budget is not None:
        with jax.named_scope("move_budget"):
            phy2log = within_budget(
                st.old, phy2log, w, move_budget, slots=slots, groups=num_groups, nodes=num_nodes
            )
    with jax.named_scope("to_global"):
        return _placement_maps(phy2log, num_log)


def _check_budget(move_budget: Any, old_phy2log: Any, num_slots: int) -> jax.Array | None:
    """``move_budget`` as an int32 scalar (at most P: no layer has more copies), or None.

    Raises:
      TypeError: not an int or None. ValueError: negative, or given without ``old_phy2log``.
    """
    check_int("move_budget", move_budget, minimum=0, allow_none=True)
    if move_budget is None:
        return None
    if old_phy2log is None:
        raise ValueError(
            f"move_budget: bounds the moves from an old placement; got move_budget = "
            f"{move_budget} without old_phy2log"
        )
    return jnp.asarray(min(int(move_budget), num_slots), jnp.int32)


def rebalance_experts(
    load: Any,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_devices: int,
    *,
    old_phy2log: Any = None,
    refine: bool = False,
    move_budget: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Places E logical experts onto P physical slots over D devices, balancing the load.

    Without ``old_phy2log`` this is DeepSeek's EPLB policy (hierarchical when
    ``num_groups % num_nodes == 0``, else global) and reproduces its README example exactly; see
    ``docs/policy.md`` for the tie rules. Jit-able: the counts are static, one compilation per
    shape and configuration is cached, and the function may be called inside an outer `jax.jit`.

    Args:
      load: [L, E] load of each logical expert, any real dtype, computed in float32 with each
        layer's proportions kept: integers are never wrapped (int64 and uint64 too), and a layer
        whose largest load is 2**64 or more is scaled down by a power of two first (exact; float64
        loads past float32's range included). Eagerly, NaN, infinite or negative loads raise;
        under an outer jit the values cannot be checked and such entries count as zero load.
      num_slots: P, physical slots per layer; a multiple of ``num_devices`` and at least E.
      num_groups: expert groups (E / num_groups consecutive experts each; must divide E when the
        hierarchical policy is used).
      num_nodes: nodes; hierarchical policy when ``num_groups % num_nodes == 0`` (then
        ``num_devices`` must be a multiple of it), else global.
      num_devices: D, devices in total; S = P // D slots each, slot p on device p // S.
      old_phy2log: optional int [L, P], the current placement (-1 = empty slot; every expert
        present). When given, the placement is migration-aware: see ``docs/policy.md``.
      refine: after packing, swap replicas between devices while that lowers a device's maximum
        load; never worse than the plain policy on any layer.
      move_budget: with ``old_phy2log``, at most this many remote copies per layer (slots whose
        new expert their device did not hold before, as `jeplb.remote_copies` counts them): the
        best-balanced point of a fixed sequence of moves from the old placement towards the
        migration-aware one (see ``docs/policy.md``). None (the default): no bound, the
        migration-aware placement itself. Balance never falls as the budget grows; the value is
        traced, so every budget shares one compilation. An empty old slot may stay empty (-1).

    Returns:
      (phy2log int32[L, P], log2phy int32[L, E, P - E + 1], logcnt int32[L, E]): the expert of each
      slot; for each expert the slot of each replica rank, padded with -1; replicas per expert.

    Raises:
      ValueError, TypeError: a bad argument, named in the message, before anything is computed.

    Example:
      >>> import jax.numpy as jnp
      >>> load = jnp.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
      >>> phy2log, log2phy, logcnt = rebalance_experts(load, 16, 4, 2, 8)
      >>> phy2log.tolist()
      [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
      >>> moved, _, _ = rebalance_experts(load * 2, 16, 4, 2, 8, old_phy2log=phy2log)
      >>> (moved == phy2log).all().item()  # the same proportions: nothing moves
      True
      >>> drift = jnp.array([1.3, 0.8, 1.0, 1.2, 0.7, 1.1, 0.9, 1.0, 1.3, 0.8, 1.1, 0.9])
      >>> kept, _, _ = rebalance_experts(
      ...     load * drift, 16, 4, 2, 8, old_phy2log=phy2log, move_budget=0
      ... )
      >>> (kept == phy2log).all().item()  # no row may cross devices
      True
    """
    load, old, counts = check_args(load, num_slots, num_groups, num_nodes, num_devices, old_phy2log)
    budget = _check_budget(move_budget, old, counts[0])
    return rebalance_checked(load, *counts, old_phy2log=old, refine=refine, move_budget=budget)


def rebalance_checked(
    load: Any,
    num_slots: int,
    num_groups: int,
    num_nodes: int,
    num_devices: int,
    *,
    old_phy2log: Any = None,
    refine: bool = False,
    move_budget: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`rebalance_experts` on arguments already through `check_args` and `_check_budget`
    (checks nothing)."""
    groups, nodes = _effective(num_groups, num_nodes)
    old = old_phy2log
    if old is not None:
        old = jnp.asarray(old, dtype=jnp.int32)
    return _rebalance_jit(
        jnp.asarray(host_load(load)),
        old,
        move_budget,
        num_slots=num_slots,
        num_groups=groups,
        num_nodes=nodes,
        num_devices=num_devices,
        refine=bool(refine),
    )


@dataclasses.dataclass(frozen=True)
class DeepSeekPolicy:
    """DeepSeek's EPLB placement (`rebalance_experts`) as a policy of `jeplb.EplbConfig`.

    Migration-aware when the step passes the current placement (it always does): experts that
    stay keep their slot, within 1% of the from-scratch balance (see docs/policy.md); with
    ``move_budget``, at most that many remote copies per layer.

    Attributes:
      num_groups: expert groups (DeepSeek's ``num_groups``; E must be divisible by it when the
        hierarchical policy is used).
      num_nodes: nodes; hierarchical policy when ``num_groups % num_nodes == 0`` (then D must be
        a multiple of it), else global.
      refine: swap replicas between devices after packing while that lowers a device's maximum.
      move_budget: at most this many remote copies per layer in a rebalance (slots whose new
        expert their device did not hold before), trading balance for bytes moved; None (the
        default) bounds nothing. See `rebalance_experts`.

    Example:
      >>> import jax.numpy as jnp
      >>> policy = DeepSeekPolicy(num_groups=4, num_nodes=2)
      >>> load = jnp.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]], jnp.float32)
      >>> policy.place(load, num_slots=16, num_devices=8, old_phy2log=None).tolist()
      [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]
    """

    name: ClassVar[str] = "deepseek"
    num_groups: int = 1
    num_nodes: int = 1
    refine: bool = False
    move_budget: int | None = None

    def __post_init__(self):
        check_int("num_groups", self.num_groups, minimum=1)
        check_int("num_nodes", self.num_nodes, minimum=1)
        check_bool("refine", self.refine)
        check_int("move_budget", self.move_budget, minimum=0, allow_none=True)

    def check(self, *, num_experts: int, num_slots: int, num_devices: int) -> None:
        """Raises when E, P and D do not fit the groups and nodes (hierarchical policy)."""
        check_groups(num_experts, self.num_groups, self.num_nodes, num_devices)

    def place(self, load, *, num_slots, num_devices, old_phy2log):
        """The placement: int32[L, P] (see `jeplb._src.policy.base.Policy.place`)."""
        groups, nodes = _effective(self.num_groups, self.num_nodes)
        budget = None
        if self.move_budget is not None and old_phy2log is not None:
            budget = jnp.asarray(min(self.move_budget, num_slots), jnp.int32)
        phy2log, _, _ = _rebalance_jit(
            load,
            old_phy2log,
            budget,
            num_slots=num_slots,
            num_groups=groups,
            num_nodes=nodes,
            num_devices=num_devices,
            refine=bool(self.refine),
        )
        return phy2log

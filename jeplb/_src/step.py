"""The rebalance step: window the load, plan a placement on device, move weights, switch maps.

`eplb_step` is a pure function of (state, weights): call it once per model step inside the same
`jax.jit` as the model, so that one compiled program serves every step (the step counter, cursor and
maps are traced values; nothing goes back to the host). Per call:

1. The pass's load (``state.pass_load``) enters the window at ``window_pos``, the window position
   and step counter advance, and the pass load is reset.
2. When the counter reaches a multiple of ``step_interval`` and no rebalance is in progress (and
   some load was recorded), the policy (`jeplb.rebalance_experts`, migration-aware against the
   current ``phy2log``) plans the target placement from the window's sum, on device; the target
   goes to ``pending_*`` and the cursor to layer 0.
3. While the cursor is below L, the weights of the next ``layers_per_step`` layers (all L when it
   is None) move to the target placement through the transfer's rotation rounds, and exactly those
   layers' maps switch to the target, in the same step. So at the end of every step each layer's
   maps describe the weights that are there: the model reads no slot through a map whose weights
   have not arrived.

Every `lax.cond` and loop trip count around a collective depends only on the step counter, the
cursor and the window sum, which are replicated (identical on every device), so every device takes
the same branch.

Where the counts are summed over devices:

* Global view (`eplb_step`, the model under `jax.jit` without `shard_map`): `jeplb.dispatch` counts
  the global token array, so ``pass_load`` is already the global count; XLA inserts any reduction.
* Inside `jax.shard_map` (`eplb_step_local`): `jeplb.dispatch` adds this device's counts, so
  ``pass_load`` is a per-device partial count (varying over the axes the tokens are split over).
  Pass those axes as ``load_axes``: the step sums the pass with one ``psum`` of L x E int32 before it
  enters the window, and the state it returns is replicated again. (`EplbState.record` with
  ``load_axes`` sums earlier instead, per call.)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src import checks, perlayer, programs, step_scalars
from jeplb._src import metrics as balance
from jeplb._src.counts import INT32_MAX, saturating_psum
from jeplb._src.maps import maps_from_phy2log
from jeplb._src.state import EplbState
from jeplb._src.transfer import api as transfer_api
from jeplb._src.transfer import engine as engine_lib
from jeplb._src.transfer.rows import varying_axes
from jeplb._src.validate import check_bool
from jeplb._src.window import slide_window_fast, window_sum

__all__ = ["StepInfo", "eplb_step", "eplb_step_local"]

_log = logging.getLogger("jeplb")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What one `eplb_step` did (replicated arrays).

    Attributes:
      step: int32[]. The step counter after this step.
      fired: bool[]. A rebalance was planned in this step (and moves, now or progressively).
      skipped: bool[]. A rebalance was due in this step but did not pay (`jeplb.ScheduleConfig`'s
        ``skip_above`` / ``min_gain``), or the step was traced with ``idle=True``: no row moves,
        the maps stay.
      planned_balancedness: float32[]. The balancedness the policy's placement would have under
        the window's load (NaN when the policy did not run in this step); with
        ``balancedness`` (the current placement's, when skipped) it says why a rebalance skipped.
      moved: bool[L]. Layers whose weights moved and whose maps switched in this step.
      layer_ok: bool[L]. False for a layer due to move in this step whose transfer plan was
        infeasible (a target naming an expert the current map lacks): it keeps its placement.
      in_progress: bool[]. Layers of the rebalance are left for later steps.
      remote_rows: int32[L]. Expert rows received from other devices in this step, per layer
        (all devices together: one per device and expert it gains; 0 for layers not moved).
      layer_balancedness: float32[L]. Per layer, mean device load / max device load of the window's
        load under the maps after this step (1.0 = perfect; 1.0 where no load was recorded).
      balancedness: float32[]. Over all layers: sum of means / sum of maxima (vLLM's figure;
        `jeplb.Balance` names the same two figures the same way).
    """

    step: jax.Array
    fired: jax.Array
    skipped: jax.Array
    planned_balancedness: jax.Array
    moved: jax.Array
    layer_ok: jax.Array
    in_progress: jax.Array
    remote_rows: jax.Array
    layer_balancedness: jax.Array
    balancedness: jax.Array

    scalars = step_scalars.scalars  # a flat dict of named scalars for metric writers

    @property
    def balancedness_total(self) -> jax.Array:
        """Deprecated name of ``balancedness`` (the scalar; kept for one release)."""
        warnings.warn(
            "StepInfo.balancedness_total is renamed StepInfo.balancedness (the per-layer figure "
            "is StepInfo.layer_balancedness)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.balancedness


# ----------------------------------------------------------------------------------- metrics


def _balancedness(load: jax.Array, phy2log: jax.Array, logcnt: jax.Array, num_devices: int):
    """(per_layer float32[L], total float32[]) of `jeplb.balancedness` for the window's load,
    from the state's replica counts (gathers only: no scatter in the idle step)."""
    b = balance.balance_counted(phy2log, logcnt, load, num_devices)
    return b.layer_balancedness, b.balancedness


# ------------------------------------------------------------------------------------- policy


def _plan_placement(state: EplbState, total: jax.Array):
    """Runs the configured policy on the window's load: the target maps (phy2log, log2phy,
    logcnt)."""
    phy2log = state.config.policy.place(
        total,
        num_slots=state.num_slots,
        num_devices=state.num_devices,
        old_phy2log=state.phy2log,
    )
    phy2log = jnp.asarray(phy2log, jnp.int32)
    # The replica lists are derived here rather than taken from the policy, so that they are
    # consistent with phy2log by construction and have the state's R_max width.
    log2phy, logcnt = maps_from_phy2log(phy2log, state.num_experts, state.max_replicas)
    return phy2log, log2phy, logcnt


# --------------------------------------------------------------------------------- the step


def _window(state: EplbState, load_axes: tuple[str, ...]):
    """The pass's load enters the window: (window, slid total, window_leaving, window_pos, step).

    O(L x E) and branch-free: one row of the window is overwritten in place (when the state is
    donated) and the running total slides with it (`state.slide_window_fast`). The total is the
    window's sum unless ``state.window_total`` had a saturated entry; then the busy branch of the
    step sums the window again (`_exact_total`).
    """
    pass_load = state.pass_load
    if load_axes:
        pass_load = saturating_psum(pass_load, load_axes)
    window, total, leaving, pos = slide_window_fast(
        state.window, state.window_total, state.window_leaving, state.window_pos, pass_load
    )
    return window, total, leaving, pos, state.step + 1


def _transfer(state: EplbState, leaves, pending, cursor, setup: engine_lib.Engine, per_layer=0):
    """Moves the due layers [cursor, cursor + k) to the pending maps; switches exactly the maps
    of the layers that moved. Returns (leaves, maps, cursor, stats, layer_ok). ``per_layer``: K
    leaves per layer of a per-layer sequence (`perlayer.move_groups`), 0 for stacked leaves."""
    num_layers = state.num_layers
    k = state.config.schedule.layers_moved(num_layers)
    count = jnp.clip(num_layers - cursor, 0, k)
    mover = engine_lib.move_layers
    if per_layer:
        mover = functools.partial(perlayer.move_groups, per_layer=per_layer)
    leaves, stats = mover(
        state.phy2log,
        pending[0],
        leaves,
        first=cursor,
        count=count,
        all_or_nothing=False,
        engine=setup,
    )
    moved = stats.moved
    maps = tuple(
        jnp.where(moved.reshape((-1,) + (1,) * (cur.ndim - 1)), target, cur)
        for cur, target in zip((state.phy2log, state.log2phy, state.logcnt), pending, strict=True)
    )
    layers = jnp.arange(num_layers)
    due = (layers >= cursor) & (layers < cursor + count)
    # Devices that disagree on the maps move nothing and keep their cursor (no layer is ok).
    layer_ok = (stats.ok | ~due) & stats.agreed
    cursor = jnp.where((count > 0) & stats.agreed, cursor + count, cursor)
    return leaves, maps, cursor, stats, layer_ok


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Moved:
    """What a branch of the step did besides updating the state (replicated).

    Attributes:
      fired: bool[]. A rebalance was planned (and will move).
      skipped: bool[]. A rebalance was due but skipped (`jeplb.ScheduleConfig` thresholds, or
        the step traced with ``idle=True``).
      planned_balancedness: float32[]. The planned placement's balancedness (NaN: no plan).
      moved: bool[L]. Layers whose weights moved and whose maps switched.
      layer_ok: bool[L]. False for a due layer whose plan was infeasible.
      remote_rows: int32[L]. Rows received from other devices, per layer.
    """

    fired: jax.Array
    skipped: jax.Array
    planned_balancedness: jax.Array
    moved: jax.Array
    layer_ok: jax.Array
    remote_rows: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Decision:
    """The policy phase's outcome: whether a due rebalance runs, and its target maps."""

    fired: jax.Array
    skipped: jax.Array
    planned_balancedness: jax.Array
    pending: tuple[jax.Array, jax.Array, jax.Array]


def _decide(state: EplbState, total: jax.Array, scheduled: jax.Array) -> _Decision:
    """Plans when a rebalance is due (scheduled, some load recorded) and pays: the current
    balancedness below ``skip_above`` (else the policy does not run), the planned one at least
    ``min_gain`` above it (else the plan is dropped). A dropped plan moves nothing at all."""
    schedule, d = state.config.schedule, state.num_devices
    load = total.astype(jnp.float32)
    due = scheduled & jnp.any(total > 0)
    kept = (state.pending_phy2log, state.pending_log2phy, state.pending_logcnt)
    run = due
    if schedule.skip_above is not None or schedule.min_gain is not None:
        _, now = _balancedness(load, state.phy2log, state.logcnt, d)
    if schedule.skip_above is not None:
        run = run & (now < schedule.skip_above)
    planned = lax.cond(run, lambda: _plan_placement(state, load), lambda: kept)
    would = jnp.where(run, _balancedness(load, planned[0], planned[2], d)[1], jnp.nan)
    fired = run
    if schedule.min_gain is not None:
        fired = run & (would - now >= schedule.min_gain)
    pending = tuple(jnp.where(fired, p, k) for p, k in zip(planned, kept, strict=True))
    return _Decision(fired, due & ~fired, would.astype(jnp.float32), pending)


# The state fields the step's branches may change (both return them all, nothing else).
_BRANCH_FIELDS = (
    "window_total", "phy2log", "log2phy", "logcnt", "pending_phy2log", "pending_log2phy",
    "pending_logcnt", "cursor",
)  # fmt: skip


def _busy(state: EplbState, leaves, window, slid, scheduled, setup, per_layer=0):
    """The step's branch when a rebalance is scheduled or under way, or the total saturated:
    the exact total, maybe the policy, the transfer of the due layers. Returns (the state fields
    it changes, by name; leaves; `_Moved`): only those pass through the branch, not the window."""
    saturated = jnp.any(state.window_total == INT32_MAX)
    total = lax.cond(saturated, lambda: window_sum(window), lambda: slid)
    with jax.named_scope("eplb_policy"):
        decision = _decide(state, total, scheduled)
        cursor = jnp.where(decision.fired, 0, state.cursor)
        pending = decision.pending
    with jax.named_scope("eplb_transfer"):
        leaves, maps, cursor, stats, layer_ok = _transfer(
            state, leaves, pending, cursor, setup, per_layer
        )
    changes = dict(
        window_total=total,
        phy2log=maps[0],
        log2phy=maps[1],
        logcnt=maps[2],
        pending_phy2log=pending[0],
        pending_log2phy=pending[1],
        pending_logcnt=pending[2],
        cursor=cursor,
    )
    moved = _Moved(decision.fired, decision.skipped, decision.planned_balancedness, stats.moved,
                   layer_ok, stats.remote_rows)  # fmt: skip
    return changes, leaves, moved


def _quiet(state: EplbState, leaves, slid, skipped=False):
    """The step's branch otherwise: nothing but the slid total; maps and weights pass through.
    ``skipped``: bool[], a rebalance was due on the device but the caller said the step is idle."""
    no = jnp.zeros((state.num_layers,), bool)
    moved = _Moved(
        jnp.bool_(False), jnp.asarray(skipped, bool), jnp.float32(jnp.nan), no, ~no,
        jnp.zeros((state.num_layers,), jnp.int32),
    )  # fmt: skip
    changes = {name: getattr(state, name) for name in _BRANCH_FIELDS}
    return dict(changes, window_total=slid), leaves, moved


def _local_step(
    state: EplbState,
    leaves: list[jax.Array],
    *,
    load_axes: tuple[str, ...],
    setup,
    per_layer=0,
    idle: bool = False,
):
    """The step on this device's shard: leaves [L, N_local, ...] (or, with ``per_layer`` = K,
    L groups of K leaves [N_local, ...]). Runs inside shard_map.

    One `lax.cond` decides the step (on a GPU each costs a device-to-host sync): an idle step
    (no rebalance scheduled or under way, no saturated total) writes the window row, slides the
    total and computes the balancedness, nothing more; the policy, the transfer plan and the
    moves run only in the other branch. ``idle`` (the caller knows nothing is due): that branch
    alone, no conditional; a rebalance due at this step is skipped (``skipped``), moves under way
    wait.
    """
    num_layers = state.num_layers
    with jax.named_scope("eplb_window"):
        window, slid, leaving, window_pos, step = _window(state, load_axes)

    settled = state.cursor >= num_layers  # no rebalance under way
    scheduled = (step % state.config.schedule.step_interval == 0) & settled
    if idle:
        changes, leaves, moved = _quiet(state, leaves, slid, skipped=scheduled & jnp.any(slid > 0))
    else:
        busy = scheduled | ~settled | jnp.any(state.window_total == INT32_MAX)
        changes, leaves, moved = lax.cond(
            busy,
            lambda: _busy(state, leaves, window, slid, scheduled, setup, per_layer),
            lambda: _quiet(state, leaves, slid),
        )
    state = state.replace(**changes)

    with jax.named_scope("eplb_metrics"):
        per_layer, overall = _balancedness(
            state.window_total.astype(jnp.float32), state.phy2log, state.logcnt, state.num_devices
        )
    new_state = state.replace(
        pass_load=jnp.zeros(state.pass_load.shape, jnp.int32),  # not zeros_like: may vary
        window=window,
        window_leaving=leaving,
        window_pos=window_pos,
        step=step,
    )
    info = StepInfo(
        step=step,
        fired=moved.fired,
        skipped=moved.skipped,
        planned_balancedness=moved.planned_balancedness,
        moved=moved.moved,
        layer_ok=moved.layer_ok,
        in_progress=new_state.in_progress,
        remote_rows=moved.remote_rows,
        layer_balancedness=per_layer,
        balancedness=overall,
    )
    return new_state, leaves, info


def _setup(state: EplbState, platform: str, layer_axis: int | None, slot_axis: int | None):
    """The engine setup of a state's transfer: ``state.config.transfer``, its layout replaced by
    the step's ``layer_axis`` / ``slot_axis`` where given."""
    layout = {"layer_axis": layer_axis, "slot_axis": slot_axis}
    config = state.config.transfer.replace(**{k: v for k, v in layout.items() if v is not None})
    return engine_lib.Engine(config=config, num_devices=state.num_devices, platform=platform)


def _check_state(state: Any) -> EplbState:
    if not isinstance(state, EplbState):
        raise TypeError(f"state: expected an EplbState, got {type(state).__name__}")
    return state


def _log_balancedness(state: EplbState, info: StepInfo, *, only_device: jax.Array | None = None):
    """Logs balancedness every ``config.schedule.log_interval`` steps through a debug callback."""
    interval = state.config.schedule.log_interval
    if not interval:
        return

    def emit(step, total, per_layer, moved, device):
        if int(device) != 0:
            return
        _log.info(
            "eplb step %d: balancedness %.4f (per layer min %.4f), layers moved %d",
            int(step),
            float(total),
            float(per_layer.min()),
            int(moved.sum()),
        )

    device = jnp.int32(0) if only_device is None else only_device
    lax.cond(
        info.step % interval == 0,
        lambda: jax.debug.callback(
            emit, info.step, info.balancedness, info.layer_balancedness, info.moved, device
        ),
        lambda: None,
    )


def eplb_step_local(
    state: EplbState,
    expert_weights: Any,
    *,
    load_axes: tuple[str, ...] | str = (),
    layer_axis: int | None = None,
    slot_axis: int | None = None,
    idle: bool = False,
) -> tuple[EplbState, Any, StepInfo]:
    """`eplb_step` for a model whose step already runs inside `jax.shard_map`.

    The expert-parallel axis ``state.config.transfer.axis_name`` must be bound by the enclosing shard_map, the
    state must come in replicated (``PartitionSpec()``) and the weights as this device's shard.

    Args:
      state: the `EplbState`. Its ``pass_load`` may be this device's partial counts (what
        `jeplb.dispatch` records inside shard_map): name the axes they are partial over in
        ``load_axes``.
      expert_weights: pytree of this device's slots, leaves [L, N_local, ...] (the global [L, P,
        ...] sharded ``PartitionSpec(None, state.config.transfer.axis_name)``); or a sequence of
        L per-layer pytrees with leaves [N_local, ...] (see `eplb_step`).
      layer_axis: the leaves' layer dim (0 or 1; default ``state.config.transfer.layer_axis``).
      slot_axis: the leaves' slot dim (1 or 0; default ``state.config.transfer.slot_axis``).
      load_axes: mesh axes over which ``pass_load`` is a partial count (e.g. ``("data", "ep")``);
        summed with one psum before entering the window. Leave empty when ``pass_load`` is
        already global (a psum of a replicated value would multiply it by the axis size, so this
        is checked: an axis over which ``pass_load`` does not vary is refused, and so is a
        varying ``pass_load`` whose axes are not all named).
      idle: as `eplb_step`'s.

    Returns:
      ``(state, expert_weights, info)``: the replicated new state, the local weights moved, a
      `StepInfo`.

    Raises:
      ValueError, TypeError: no such bound axis, an axis size other than ``state.num_devices``,
        leaves not [L, N_local, ...], ``load_axes`` that do not match ``pass_load``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                      window_size=2, step_interval=5)
      >>> from jeplb import dispatch
      >>> def body(s, w, ids):
      ...     s, _ = dispatch(s, 0, ids)  # this device's counts
      ...     return eplb_step_local(s, w, load_axes="ep")
      >>> f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "ep"), P("ep")),
      ...                           out_specs=(P(), P(None, "ep"), P())))
      >>> s, w, info = f(s, jnp.zeros((1, 2, 3)), jnp.array([[0], [1], [1]]))
      >>> s.window[0].tolist(), int(info.step)
      ([[1, 2]], 1)
    """
    state = _check_state(state)
    axis = state.config.transfer.axis_name
    d = checks.bound_axis_size(
        axis,
        arg="state.config.transfer.axis_name",
        hint="eplb_step_local runs inside jax.shard_map over it (use eplb_step(..., mesh=...) "
        "at global view)",
    )
    if d != state.num_devices:
        raise ValueError(
            f"state.num_devices: the state was built for {state.num_devices} devices, the mesh "
            f"axis {axis!r} has {d}"
        )
    axes = _check_load_axes(state, load_axes)
    idle = _check_idle(idle)
    setup = _setup(state, checks.platform_of(), layer_axis, slot_axis)
    leaves, treedef, _, per_layer = _step_leaves(state, expert_weights, setup, mesh=None)
    if not per_layer:  # (per-layer leaves were refused by perlayer.step_leaves)
        problems = engine_lib.leaf_problems(leaves, setup)
        checks.refuse_leaves("expert_weights", checks.leaf_paths(treedef), problems)
    state, leaves, info = _local_step(
        state, leaves, load_axes=axes, setup=setup, per_layer=per_layer, idle=idle
    )
    if not idle:  # (its logging is a conditional: idle steps do not log)
        _log_balancedness(state, info, only_device=lax.axis_index(axis))
    return state, treedef.unflatten(leaves), info


def _step_leaves(state: EplbState, expert_weights: Any, setup, *, mesh):
    """The step's weight leaves, checked: ``(leaves, treedef, specs, per_layer)``; global
    [L, P, ...] leaves with ``mesh``, this device's [L, N_local, ...] without (inside
    shard_map); ``per_layer``: leaves per layer of a per-layer sequence (0: stacked leaves)."""
    local = mesh is None
    lead = _lead_shape(state, setup, local=local)
    if perlayer.is_per_layer(expert_weights, lead, layer_axis=setup.config.layer_axis):
        slots = state.slots_per_device if local else state.num_slots
        return perlayer.step_leaves(expert_weights, state.num_layers, slots, mesh, setup)
    leaves, treedef, specs = checks.weight_leaves(
        expert_weights,
        lead_shape=lead,
        slot_axis=setup.config.slot_axis,
        layer_axis=setup.config.layer_axis,
        mesh=mesh,
        axes=setup.config.axes,
        local=local,
    )
    return leaves, treedef, specs, 0


def _check_load_axes(state: EplbState, load_axes) -> tuple[str, ...]:
    """``load_axes`` as a tuple, checked against how ``state.pass_load`` varies."""
    axes = (load_axes,) if isinstance(load_axes, str) else tuple(load_axes)
    varying = varying_axes(state.pass_load)
    for a in axes:
        if a not in varying:
            raise ValueError(
                f"load_axes: state.pass_load does not vary over {a!r} (it is already summed or "
                f"was never added to per device); summing it again would multiply it by the axis "
                f"size. Drop {a!r} from load_axes"
            )
    if varying - set(axes):
        raise ValueError(
            f"load_axes: state.pass_load holds per-device partial counts over "
            f"{sorted(varying - set(axes))} (from dispatch inside shard_map); name these axes in "
            f"load_axes={tuple(sorted(varying))} so they are summed"
        )
    return axes


def _lead_shape(state: EplbState, setup, *, local: bool) -> tuple[int, int]:
    """The (layer, slot) dims of a leaf in the order they stand: (L, P) or (P, L) (N_local
    instead of P for local leaves)."""
    slots = state.slots_per_device if local else state.num_slots
    lead = (state.num_layers, slots)
    return lead[::-1] if setup.config.slot_major else lead


def eplb_step(
    state: EplbState,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    layer_axis: int | None = None,
    slot_axis: int | None = None,
    expert_specs: Any = None,
    idle: bool = False,
) -> tuple[EplbState, Any, StepInfo]:
    """One rebalance step at global view: window, maybe plan, move due layers, switch their maps.

    Call it once per model step inside the model's `jax.jit` (donate the weights and the state:
    the transfer updates the weights in place). See the module docstring for the order of
    events; the weights returned always match the maps returned, layer by layer.

    Args:
      state: the `EplbState`, replicated. ``pass_load`` must hold global counts (what
        `jeplb.dispatch` records at global view).
      expert_weights: pytree of arrays with leaves [L, P, ...] (or [P, L, ...] with
        ``slot_axis=0, layer_axis=1``) whose slot dim is sharded over ``state.config.transfer.axis_name`` on
        ``mesh``; other dims may be sharded over other mesh axes (any trailing shape, any dtype
        `jeplb.rearrange_expert_weights` moves). They come back with the same shardings. Or a
        sequence of L per-layer pytrees with leaves [P, ...] (serving engines' per-layer
        modules, e.g. tpu-inference's ``w13`` (P, D, 2F) and ``w2`` (P, F, D)), every layer of
        layer 0's structure, shapes, dtypes and shardings: the due layers move in place, each
        under its own `lax.cond` (compile time grows with L; a serving loop uses
        `jeplb.plan_rebalance` and `jeplb.move_layer` instead), nothing is stacked. A list or
        tuple whose leaves all have the stacked leading dims is read as stacked.
      mesh: the device mesh; its ``state.config.transfer.axis_name`` axis must have
        ``state.num_devices`` devices.
      layer_axis: the leaves' layer dim (0 or 1; default ``state.config.transfer.layer_axis``).
      slot_axis: the leaves' slot dim (1 or 0; default ``state.config.transfer.slot_axis``).
      expert_specs: the leaves' PartitionSpecs (one for all, or a pytree of them mirroring
        ``expert_weights``), for leaves traced on a mesh of Auto axes, whose sharding is
        unknown: as `jeplb.rearrange_expert_weights`'s. Needed there when the mesh has other
        axes of size > 1 (e.g. ``PartitionSpec(None, "ep", None, "tp")`` for tensor-parallel
        experts, ``PartitionSpec(None, "ep")`` for leaves replicated over them): undeclared
        leaves are refused, not guessed.
      idle: a Python bool, fixed when the step is traced. True when the caller knows that no
        rebalance is due or under way at this step (`jeplb.HostSchedule.step_due` says so on the
        host): the step only records (window row, running total, step counter, balancedness)
        and is traced without its `lax.cond`. On a GPU that conditional copies its predicate to
        the host and waits for it, about 0.1-0.2 ms of a decode step; a model compiles its step
        twice (``idle`` static) and calls the idle one on most steps. A rebalance due on the
        device at an idle step is skipped (``info.skipped``), layers under way wait; weights
        and maps never part. An idle step does not log (``log_interval``'s logging is itself a
        conditional: read its StepInfo instead), and a saturated ``window_total`` entry stays
        saturated until the next due step sums the window again (so its balancedness may read
        otherwise than the device-decided step's until then).

    Returns:
      ``(state, expert_weights, info)``: the new state, the weights (same structure, shapes,
      dtypes, shardings), and a `StepInfo`.

    Raises:
      ValueError, TypeError: a mesh without the axis or of another size, leaves not [L, P, ...]
        or (when concrete) not sharded on the axis, or whose rows the transfer's row kernel
        cannot move (every bad leaf named by its path); a per-layer sequence of the wrong length
        or whose layers differ from layer 0 (named by path, e.g. ``expert_weights[2]['w2']``).

    Example:
      >>> import functools, jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                      num_redundant_experts=2, window_size=2, step_interval=2)
      >>> w = jax.device_put(jnp.array([[10., 11., 10., 11.]]), NamedSharding(mesh, P(None, "ep")))
      >>> step = jax.jit(functools.partial(eplb_step, mesh=mesh), donate_argnums=(0, 1))
      >>> for _ in range(2):
      ...     s, w, info = step(s.record(jnp.array([[1, 9]])), w)
      >>> bool(info.fired), s.logcnt.tolist()
      (True, [[1, 3]])
      >>> bool(jnp.all(w[0] == 10.0 + s.phy2log[0]))
      True
    """
    state = _check_state(state)
    d = checks.axis_size(mesh, state.config.transfer.axis_name)
    checks.state_on_mesh(state, mesh)
    if d != state.num_devices:
        raise ValueError(
            f"mesh: axis {state.config.transfer.axis_name!r} has {d} devices, but the state was built for "
            f"num_devices = {state.num_devices}"
        )
    idle = _check_idle(idle)
    setup = _setup(state, checks.platform_of(mesh), layer_axis, slot_axis)
    leaves, treedef, given, k = _step_leaves(state, expert_weights, setup, mesh=mesh)
    if not k:
        given = checks.resolve_specs(  # None where unknown (traced, Auto mesh, not declared)
            expert_specs,
            leaves,
            treedef,
            given,
            mesh=mesh,
            slot_axis=setup.config.slot_axis,
            layer_axis=setup.config.layer_axis,
            axes=setup.config.axes,
        )
        transfer_api.check_movable(leaves, treedef, given, mesh, setup)
    program = programs.build(
        _global_body,
        mesh=mesh,
        given=given,
        slot_axis=0 if k else setup.config.slot_axis,
        axes=setup.config.axes,
        num_replicated=1,
        options=(("setup", setup), ("per_layer", k), ("idle", idle)),
        after=None if idle else _log_after,  # (logging is a conditional: idle steps do not log)
        name="eplb_step",
    )
    leaves, (state, info) = program(state, leaves)
    return state, treedef.unflatten(leaves), info


def _global_body(
    state: EplbState,
    leaves: list[jax.Array],
    *,
    setup: engine_lib.Engine,
    per_layer: int = 0,
    idle: bool = False,
):
    """The step at global view is its local step on each device's shard (`programs.build`);
    ``per_layer``: K leaves per layer of a per-layer sequence, 0 for stacked leaves."""
    state, leaves, info = _local_step(
        state, leaves, load_axes=(), setup=setup, per_layer=per_layer, idle=idle
    )
    return leaves, (state, info)


def _check_idle(idle: Any) -> bool:
    """``idle`` as a Python bool: it picks the program when the step is traced."""
    check_bool(
        "idle", idle,
        hint="It decides, when the step is traced, whether the step can rebalance: pass it as a "
        "static argument (jax.jit(..., static_argnames='idle')), e.g. from "
        "jeplb.HostSchedule.step_due()",
    )  # fmt: skip
    return bool(idle)


def _log_after(extra: tuple[EplbState, StepInfo]) -> None:
    _log_balancedness(*extra)

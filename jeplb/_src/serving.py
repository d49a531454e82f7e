"""The serving loop's EPLB: `eplb_step` split so that an idle step runs no EPLB program.

A serving engine compiles one forward per batch bucket. `eplb_step` inside each forward would
compile the policy and the transfer once per bucket; a separate `eplb_step` call per decode step
would run a program even when nothing is due. The split:

* `end_pass` (inside each forward, O(L x E)): the pass's load enters the window, ``step`` + 1;
* `plan_rebalance` (its own program, compiled once for every bucket): on a step where a rebalance
  is due, the policy plans the target maps and the cursor goes to layer 0; no weights;
* `move_layer` (one program for every layer): moves one layer of per-layer weights to the
  target maps, in place, and switches that layer's maps;
* `HostSchedule`: a host mirror of the schedule that counts steps, so the host knows without
  asking the device whether a plan or a move is due this step (idle steps run nothing).

Letters: L layers, E logical experts, P slots, D devices on the expert axis, N_local = P // D.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jeplb._src import checks, perlayer, programs
from jeplb._src.counts import INT32_MAX
from jeplb._src.state import EplbState, check_layer
from jeplb._src.step import _check_load_axes, _check_state, _decide, _setup, _window
from jeplb._src.transfer import api as transfer_api
from jeplb._src.transfer.api import TransferReport
from jeplb._src.window import window_sum

__all__ = ["HostSchedule", "PlanInfo", "end_pass", "move_layer", "plan_rebalance"]


def end_pass(state: EplbState, *, load_axes: tuple[str, ...] | str = ()) -> EplbState:
    """Closes a forward pass: its load (``state.pass_load``) enters the window, ``step`` + 1.

    The recording half of `jeplb.eplb_step`, O(L x E) and branch-free: call it at the end of
    each forward (inside its `jax.jit`, after the layers' `jeplb.dispatch`); `plan_rebalance` and
    `move_layer` do the rest, on the steps `HostSchedule` says they are due.

    Args:
      state: the `jeplb.EplbState`.
      load_axes: inside `jax.shard_map`, the mesh axes over which ``pass_load`` is a partial
        count (as `jeplb.eplb_step_local`'s); empty at global view.

    Returns:
      The state with the pass in the window, ``pass_load`` zero and ``step`` advanced.

    Example:
      >>> import jax.numpy as jnp, jeplb
      >>> s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=1, window_size=2)
      >>> s = jeplb.end_pass(s.record(jnp.array([[3, 1]])))
      >>> s.window_total.tolist(), int(s.step)
      ([[3, 1]], 1)
    """
    state = _check_state(state)
    axes = _check_load_axes(state, load_axes)
    window, total, leaving, pos, step = _window(state, axes)
    return state.replace(
        pass_load=jnp.zeros(state.pass_load.shape, jnp.int32),
        window=window,
        window_total=total,
        window_leaving=leaving,
        window_pos=pos,
        step=step,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """What `plan_rebalance` did (replicated scalars).

    Attributes:
      fired: bool[]. A rebalance was planned: the cursor is at layer 0, layers are due to move.
      skipped: bool[]. A rebalance was due but did not pay (`jeplb.ScheduleConfig`'s
        ``skip_above`` / ``min_gain``).
      planned_balancedness: float32[]. The planned placement's balancedness (NaN: no plan).
    """

    fired: jax.Array
    skipped: jax.Array
    planned_balancedness: jax.Array


@jax.jit
def _plan(state: EplbState) -> tuple[EplbState, PlanInfo]:
    idle = state.cursor >= state.num_layers
    interval = state.config.schedule.step_interval
    scheduled = (state.step > 0) & (state.step % interval == 0) & idle
    saturated = jnp.any(state.window_total == INT32_MAX)
    total = jax.lax.cond(saturated, lambda: window_sum(state.window), lambda: state.window_total)
    decision = _decide(state, total, scheduled)
    pending = decision.pending
    state = state.replace(
        window_total=total,
        pending_phy2log=pending[0],
        pending_log2phy=pending[1],
        pending_logcnt=pending[2],
        cursor=jnp.where(decision.fired, 0, state.cursor),
    )
    return state, PlanInfo(decision.fired, decision.skipped, decision.planned_balancedness)


def plan_rebalance(state: EplbState) -> tuple[EplbState, PlanInfo]:
    """Plans a rebalance when one is due: the policy on the window's load, no weights.

    Due when ``state.step`` is a positive multiple of ``step_interval``, no rebalance is in
    progress and some load was recorded (and, with ``skip_above`` / ``min_gain``, it pays): then
    the target maps go to ``state.pending_*`` and the cursor to layer 0; `move_layer` moves the
    layers. Otherwise the state comes back as it was. One jitted program per state shape and
    configuration, whatever the batch shapes of the forward: call it on the steps
    `HostSchedule.tick` says a plan is due, not in the forward.

    Args:
      state: the `jeplb.EplbState` (replicated).

    Returns:
      ``(state, info)``: the state with the plan, and a `PlanInfo`.

    Example:
      >>> import jax.numpy as jnp, jeplb
      >>> s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                            num_redundant_experts=2, window_size=2, step_interval=1)
      >>> s, info = jeplb.plan_rebalance(jeplb.end_pass(s.record(jnp.array([[1, 9]]))))
      >>> bool(info.fired), s.pending_logcnt.tolist(), int(s.cursor)
      (True, [[1, 3]], 0)
    """
    return _plan(_check_state(state))


def _local_move(state, layer, leaves, *, setup):
    """shard_map body of `move_layer`: state and layer replicated, the layer's local leaves."""
    leaves, stats = perlayer.move_one(
        state.phy2log, state.pending_phy2log, layer, leaves, engine=setup
    )
    moved = stats.moved[0]

    def switch(cur, target):
        row = jnp.where(moved, target[layer], cur[layer])
        return cur.at[layer].set(row)

    state = state.replace(
        phy2log=switch(state.phy2log, state.pending_phy2log),
        log2phy=switch(state.log2phy, state.pending_log2phy),
        logcnt=switch(state.logcnt, state.pending_logcnt),
        cursor=jnp.where(stats.agreed, jnp.maximum(state.cursor, layer + 1), state.cursor),
    )
    report = TransferReport.from_stats(stats)
    return leaves, (state, jax.tree_util.tree_map(lambda a: a[0], report))


def move_layer(
    state: EplbState, layer: Any, layer_weights: Any, *, mesh: jax.sharding.Mesh
) -> tuple[EplbState, Any, TransferReport]:
    """Moves one layer of per-layer expert weights to the planned placement, in place.

    Layer ``layer``'s weights move from ``state.phy2log[layer]`` to
    ``state.pending_phy2log[layer]`` (planned by `plan_rebalance`), that layer's maps switch to
    the target and the cursor passes it. One compiled program serves every layer (the layer
    index is a traced value; every layer has the same shapes), the weights are donated and
    updated in place, and the temporary memory is below one layer's local shard. A layer whose
    maps already match its target is left as it is.

    Args:
      state: the `jeplb.EplbState` (replicated).
      layer: the layer (int or int32 scalar in [0, L)).
      layer_weights: that layer's pytree, leaves [P, ...] (tpu-inference: ``w13`` (P, D, 2F) or
        (P, 2, D, F), ``w2`` (P, F, D)) with the slot dim sharded over
        ``state.config.transfer.axis_name``; other dims may be sharded over other mesh axes.
        Donated: the arrays passed in become invalid.
      mesh: the mesh; its expert axis has ``state.num_devices`` devices.

    Returns:
      ``(state, layer_weights, report)``: the state with the layer's maps switched, the moved
      weights (same shapes, dtypes, shardings) and a `jeplb.TransferReport` of scalars
      (``report.ok`` False: infeasible plan, the layer kept its placement and maps).

    Raises:
      ValueError, TypeError: a mesh of another size, a layer outside [0, L), leaves not
        [P, ...] or not sharded on the expert axis (named by path), an array passed twice.

    Example:
      >>> import jax, jax.numpy as jnp, jeplb
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                            num_redundant_experts=2, window_size=2, step_interval=1)
      >>> s, _ = jeplb.plan_rebalance(jeplb.end_pass(s.record(jnp.array([[1, 9]]))))
      >>> w = jax.device_put(jnp.array([10., 11., 10., 11.]), NamedSharding(mesh, P("ep")))
      >>> s, w, report = jeplb.move_layer(s, 0, w, mesh=mesh)
      >>> bool(jnp.all(w == 10.0 + s.phy2log[0])), int(s.cursor)
      (True, 1)
    """
    state = _check_state(state)
    d = checks.axis_size(mesh, state.config.transfer.axis_name)
    if d != state.num_devices:
        raise ValueError(
            f"mesh: axis {state.config.transfer.axis_name!r} has {d} devices, but the state was "
            f"built for num_devices = {state.num_devices}"
        )
    check_layer(layer, state.num_layers)
    layer = jnp.asarray(layer, jnp.int32)
    setup = perlayer.unit_engine(_setup(state, checks.platform_of(mesh), None, None))
    leaves, treedef, specs = checks.weight_leaves(
        layer_weights,
        lead_shape=(state.num_slots,),
        slot_axis=0,
        layer_axis=None,
        mesh=mesh,
        axes=setup.config.axes,
        name="layer_weights",
    )
    transfer_api._check_no_aliases(leaves, treedef, "layer_weights")
    given = tuple(specs)
    transfer_api.check_movable(leaves, treedef, given, mesh, setup, single_layer=True)
    program = _move_program(mesh, setup, given)
    if all(checks.is_concrete(x) for x in jax.tree_util.tree_leaves(state)):
        # Wherever the state comes from (the forward, `plan_rebalance`), the program sees it
        # replicated on the mesh, so one compilation serves every call.
        state = state.replicated(mesh)
    out, (state, report) = program(state, checks.place_map(layer, mesh), leaves)
    return state, treedef.unflatten(out), report


def _move_program(mesh, setup, given: tuple):
    """The cached program of `move_layer` (`programs.build`)."""
    return programs.build(
        _local_move,
        mesh=mesh,
        given=given,
        slot_axis=0,
        axes=setup.config.axes,
        num_replicated=2,
        options=(("setup", setup),),
        donate=True,
        check_vma=not setup.movers.interpreted,
        name="eplb_move_layer",
    )


@dataclasses.dataclass
class HostSchedule:
    """A host-side mirror of a state's schedule: which EPLB work is due this step, with no device
    program and no sync.

    It counts the steps the forward closes with `end_pass` (one per forward) and follows the
    cursor of the rebalance in progress. Per serving step, after the forward:
    ``if sched.tick(): state, info = plan_rebalance(state); sched.planned(info.fired)`` (the one
    sync, on a step that plans), then ``for layer in sched.take_layers(): move_layer(...)``.
    ``take_layers`` hands out ``layers_per_step`` layers per step (all L when None), so a
    progressive rebalance moves between decode steps; on idle steps both are empty.

    With `jeplb.eplb_step` in the model's step instead: ``due = sched.step_due()``, the step
    traced with ``idle=not due`` (a static argument: two programs), and after a due step
    ``sched.stepped(info)``. Idle steps then run no conditional and nothing syncs.

    Attributes:
      num_layers: L.
      step_interval: steps between rebalances (``state.config.schedule``).
      layers_per_step: layers moved per step.
      step: the state's step counter, as the device has it after the last `end_pass` (or
        `jeplb.eplb_step`).
      cursor: the next layer to move (L: none in progress).

    Example:
      >>> import jeplb
      >>> s = jeplb.EplbState.create(num_layers=4, num_experts=2, num_devices=1,
      ...                            step_interval=3, layers_per_step=2)
      >>> sched = jeplb.HostSchedule.from_state(s)
      >>> [sched.tick() for _ in range(3)]
      [False, False, True]
      >>> sched.planned(True); sched.take_layers(), sched.take_layers(), sched.take_layers()
      ([0, 1], [2, 3], [])
    """

    num_layers: int
    step_interval: int
    layers_per_step: int
    step: int = 0
    cursor: int = 0
    _plans: bool = dataclasses.field(default=False, repr=False, init=False)  # step_due may plan

    @classmethod
    def from_state(cls, state: EplbState) -> HostSchedule:
        """The mirror of ``state`` (reads its step and cursor once: a sync, at setup)."""
        state = _check_state(state)
        schedule = state.config.schedule
        return cls(
            num_layers=state.num_layers,
            step_interval=schedule.step_interval,
            layers_per_step=schedule.layers_moved(state.num_layers),
            step=int(state.step),
            cursor=int(state.cursor),
        )

    @property
    def in_progress(self) -> bool:
        """Layers of a planned rebalance are left to move."""
        return self.cursor < self.num_layers

    def tick(self) -> bool:
        """Counts one forward (one `end_pass`); returns whether `plan_rebalance` may plan now."""
        self.step += 1
        return self.step % self.step_interval == 0 and not self.in_progress

    def planned(self, fired: Any) -> None:
        """Takes `plan_rebalance`'s ``info.fired`` (a sync when it is a device value)."""
        if bool(fired):
            self.cursor = 0

    def step_due(self) -> bool:
        """Counts one `jeplb.eplb_step`; returns whether it may plan or move layers.

        False: call the step with ``idle=True`` (nothing is due; no conditional). True: call it
        with ``idle=False`` and give its `jeplb.StepInfo` to `stepped`.

        Example:
          >>> import jeplb
          >>> s = jeplb.EplbState.create(num_layers=4, num_experts=2, num_devices=1,
          ...                            step_interval=3, layers_per_step=2)
          >>> sched = jeplb.HostSchedule.from_state(s)
          >>> [sched.step_due() for _ in range(3)]
          [False, False, True]
        """
        self._plans = self.tick()
        return self._plans or self.in_progress

    def stepped(self, info: Any) -> None:
        """Takes a due step's `jeplb.StepInfo`: whether layers are left to move (its
        ``in_progress``, a sync, on due steps only); the cursor passes the layers it moved."""
        if not bool(info.in_progress):
            self.cursor = self.num_layers
            return
        start = 0 if self._plans else self.cursor
        self.cursor = min(start + self.layers_per_step, self.num_layers - 1)

    def take_layers(self) -> list[int]:
        """The layers to move this step (empty when none is due); the cursor passes them."""
        end = min(self.num_layers, self.cursor + self.layers_per_step)
        layers = list(range(self.cursor, end))
        self.cursor = max(self.cursor, end)
        return layers

"""`EplbState`: the placement, the recorded expert load and the rebalance schedule, as one pytree.

The state is a frozen dataclass registered as a pytree: its arrays are leaves (they pass through
`jax.jit`, `jax.lax.scan` and `jax.shard_map`), its configuration is static (part of the tree
structure, so a change of configuration is a new compilation, a change of values is not). Update it
with `EplbState.replace` or the functions that return a new state (`EplbState.record`,
`jeplb.dispatch`, `jeplb.eplb_step`).

Letters: L MoE layers, E logical experts per layer, P physical slots per layer (E + redundant),
D devices on the expert-parallel mesh axis, N_local = P // D slots per device, R_max = P - E + 1
the most replicas one expert can have, W the window of recorded passes.

Load is recorded per *logical* expert (int32[L, E]), not per physical slot as vLLM does: a logical
count keeps its meaning when the placement changes under it (progressive mode switches maps layer
by layer while the window fills), and it is what the placement policy consumes. The counts are
global (summed over every device that routes tokens) as soon as they enter the window; see
`jeplb.eplb_step_local` for per-device partial counts inside `jax.shard_map`.

Counts are int32 and never wrap: concrete counts that do not fit, or a sum that would pass
2^31 - 1, raise a ValueError naming the argument; under `jax.jit` (traced counts) they saturate at
2^31 - 1 instead. The map algebra lives in `jeplb._src.maps`, the file format in
`jeplb._src.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src import checkpoint, checks
from jeplb._src.config import EplbConfig
from jeplb._src.counts import (
    as_counts,
    check_ids,
    check_sum,
    check_valid,
    count_ids,
    readable,
    saturating_add,
    saturating_psum,
)
from jeplb._src.maps import check_phy2log, maps_from_phy2log
from jeplb._src.validate import check_int
from jeplb._src.window import check_window

__all__ = ["EplbState", "check_layer"]


_STATIC = {"static": True}
# The state's former static fields and the part of the configuration each moved to.
_FORMER_FIELDS = {
    "step_interval": "schedule",
    "layers_per_step": "schedule",
    "log_interval": "schedule",
    "num_groups": "policy",
    "num_nodes": "policy",
    "refine": "policy",
    "axis_name": "transfer",
    "chunk_rows": "transfer",
}


def _count_rows(ids: Any, valid: Any, num_experts: int, *, rows: int) -> jax.Array:
    """int32[rows, E]: the ids [rows, ..., K] (any integer dtype, compared in it) counted per
    expert, row by row; ids outside [0, E) and tokens whose ``valid`` (broadcast against the ids
    without K) is False are not counted."""
    counted = (ids >= 0) & (ids < num_experts)
    if valid is not None:
        counted = counted & jnp.asarray(valid, bool)[..., None]
    flat = jnp.where(counted, ids, num_experts).astype(jnp.int32)
    return count_ids(flat.reshape(rows, -1), num_experts)


def check_layer(layer: Any, num_layers: int) -> bool:
    """Checks a layer index; returns whether it is traced (then its range cannot be checked).

    Raises:
      ValueError: L = 0, or a concrete index outside [0, L) (negative ones are not wrapped).
      TypeError: an index that is not an integer scalar.
    """
    if num_layers < 1:
        raise ValueError(
            "state: expected a state with at least one layer (L >= 1), got L = 0; build it with "
            "EplbState.create or EplbState.from_placement"
        )
    if isinstance(layer, bool | np.bool_):
        raise TypeError(f"layer: expected an int index, got bool {layer!r}")
    if isinstance(layer, int):
        value = layer
    elif not hasattr(layer, "dtype") or not hasattr(layer, "shape"):
        raise TypeError(f"layer: expected an int index, got {type(layer).__name__} {layer!r}")
    elif tuple(layer.shape) != () or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise TypeError(
            f"layer: expected an int or an integer scalar array, got {type(layer).__name__} of "
            f"dtype {layer.dtype} and shape {tuple(layer.shape)}"
        )
    elif not checks.is_concrete(layer):
        return True
    else:
        value = int(np.asarray(layer))
    if not 0 <= value < num_layers:
        raise ValueError(f"layer: expected an index in [0, num_layers = {num_layers}), got {value}")
    return False


def _check_phy2log(phy2log: Any, num_experts: int, num_devices: int) -> tuple[Any, int, int]:
    """A placement argument (`maps.check_phy2log`): returns ``(phy2log, L, P)``."""
    phy2log = check_phy2log(
        phy2log, name="phy2log", num_experts=num_experts, num_devices=num_devices, require_all=True
    )
    return phy2log, *(int(s) for s in phy2log.shape)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fresh_arrays(phy2log: jax.Array, num_experts: int, window_size: int) -> dict[str, jax.Array]:
    """The arrays of a fresh state on the placement ``phy2log`` int32[L, P]: its maps, an empty
    window, pending maps equal to the current ones. One compiled program per shape (eagerly each
    op would compile on its own)."""
    num_layers, p_total = phy2log.shape
    log2phy, logcnt = maps_from_phy2log(phy2log, num_experts, p_total - num_experts + 1)
    zeros = functools.partial(jnp.zeros, dtype=jnp.int32)
    return dict(
        phy2log=phy2log,
        log2phy=log2phy,
        logcnt=logcnt,
        pass_load=zeros((num_layers, num_experts)),
        window=zeros((window_size, num_layers, num_experts)),
        window_total=zeros((num_layers, num_experts)),
        window_leaving=zeros((num_layers, num_experts)),
        window_pos=zeros(()),
        step=zeros(()),
        cursor=jnp.full((), num_layers, jnp.int32),
    )


def _load_axes(load_axes: Any) -> tuple[str, ...]:
    axes = (load_axes,) if isinstance(load_axes, str) else load_axes
    if not isinstance(axes, tuple | list) or not all(isinstance(a, str) and a for a in axes):
        raise TypeError(
            f"load_axes: expected a mesh axis name (str) or a tuple of them, got {load_axes!r}"
        )
    return tuple(axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EplbState:
    """Expert placement, recorded load and rebalance schedule of a MoE model (a pytree).

    Build it with `EplbState.create` (vLLM's initial placement) or `EplbState.from_placement`.
    Every array is replicated: the same value on every device (``PartitionSpec()``). The
    configuration (`jeplb.EplbConfig`: policy, transfer, schedule) is one static field.

    Attributes:
      phy2log: int32[L, P]. Logical expert held by each physical slot (-1: empty). Slot p lives on
        device p // N_local of the expert-parallel axis.
      log2phy: int32[L, E, R_max]. The slots holding each logical expert, padded with -1.
      logcnt: int32[L, E]. Number of replicas of each logical expert (the non -1 entries of
        log2phy).
      pass_load: int32[L, E]. Tokens routed to each logical expert in the current pass (since the
        last `jeplb.eplb_step`); added to by `jeplb.dispatch` / `EplbState.record` (saturating at
        2^31 - 1 under jit, an error eagerly). Inside `jax.shard_map` it may hold this device's
        partial counts until the step sums them.
      window: int32[W, L, E]. Global logical load of the last W passes (a ring buffer).
      window_total: int32[L, E]. The sum of ``window``'s rows, kept as a running total as passes
        enter and leave, so that a step costs O(L x E), not O(W x L x E); saturates at 2^31 - 1.
        A saturated entry stays saturated through `jeplb.end_pass` and idle steps (``idle=True``)
        even once the true sum falls below it, until a step that sums the window again (a due
        `jeplb.eplb_step`, `jeplb.plan_rebalance`).
      window_leaving: int32[L, E]. ``window[window_pos]``, the pass the next step drops from the
        total. Replace ``window`` or ``window_pos`` only together with these two
        (`EplbState.check_window`).
      window_pos: int32[]. Row of ``window`` the next pass is written to.
      step: int32[]. Steps taken (`jeplb.eplb_step` calls). A rebalance is planned when it reaches a
        multiple of ``config.schedule.step_interval``.
      pending_phy2log: int32[L, P]. Target placement of the rebalance in progress (equal to
        ``phy2log`` for the layers already moved, and for all layers when none is in progress).
      pending_log2phy: int32[L, E, R_max]. Its logical-to-physical map.
      pending_logcnt: int32[L, E]. Its replica counts.
      cursor: int32[]. Next layer whose weights move; L when no rebalance is in progress.
      num_devices: D, devices on the expert-parallel mesh axis (static); the policy spreads the
        slots over these D devices.
      config: the `jeplb.EplbConfig` (static).

    Example:
      >>> s = EplbState.create(num_layers=2, num_experts=4, num_devices=2,
      ...                      num_redundant_experts=2, window_size=3, step_interval=10)
      >>> s.phy2log.tolist()
      [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]
      >>> s.log2phy[0].tolist()
      [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]
      >>> s.config.schedule.window_size, s.config.policy.name
      (3, 'deepseek')
    """

    phy2log: jax.Array
    log2phy: jax.Array
    logcnt: jax.Array
    pass_load: jax.Array
    window: jax.Array
    window_total: jax.Array
    window_leaving: jax.Array
    window_pos: jax.Array
    step: jax.Array
    pending_phy2log: jax.Array
    pending_log2phy: jax.Array
    pending_logcnt: jax.Array
    cursor: jax.Array
    num_devices: int = dataclasses.field(metadata=_STATIC)
    config: EplbConfig = dataclasses.field(default_factory=EplbConfig, metadata=_STATIC)

    # ------------------------------------------------------------------------------ shape facts

    @property
    def num_layers(self) -> int:
        """L, MoE layers."""
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        """E, logical experts per layer."""
        return self.logcnt.shape[1]

    @property
    def num_slots(self) -> int:
        """P, physical slots per layer."""
        return self.phy2log.shape[1]

    @property
    def num_redundant_experts(self) -> int:
        """P - E, replica slots beyond one per expert."""
        return self.num_slots - self.num_experts

    @property
    def slots_per_device(self) -> int:
        """N_local = P // D."""
        return self.num_slots // self.num_devices

    @property
    def max_replicas(self) -> int:
        """R_max, the width of log2phy."""
        return self.log2phy.shape[2]

    @property
    def window_size(self) -> int:
        """W, passes the window keeps (``config.schedule.window_size``)."""
        return self.window.shape[0]

    def __getattr__(self, name: str) -> Any:
        """The former static fields (``step_interval``, ``axis_name``, ...), read from ``config``
        with a DeprecationWarning; kept for one release."""
        part = _FORMER_FIELDS.get(name)
        if part is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(
            f"EplbState.{name} is now EplbState.config.{part}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(getattr(self.config, part), name)

    @property
    def in_progress(self) -> jax.Array:
        """bool[]: a progressive rebalance has layers left to move."""
        return self.cursor < self.num_layers

    # ------------------------------------------------------------------------------ recorded load

    def last_load(self) -> jax.Array:
        """The logical load of the most recent pass in the window: int32[L, E].

        The row `jeplb.eplb_step` (or `jeplb.eplb_step_local`) wrote last,
        ``window[(window_pos - 1) % W]``: the tokens (x top-k) each logical expert of each layer
        received in that pass, summed over every device, valid tokens only. This is the signal a
        router-bias update needs (DeepSeek-V3's auxiliary-loss-free balancing, see
        docs/training.md); it does not depend on the placement. Read it after the step; before
        the step the current pass's counts are ``pass_load`` (inside `jax.shard_map` possibly a
        device's partial counts). All zeros until the first step. Jit-able.

        Example:
          >>> import jax, jax.numpy as jnp, jeplb
          >>> from jax.sharding import NamedSharding, PartitionSpec as P
          >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=2, step_interval=100)
          >>> w = jax.device_put(jnp.zeros((1, 2)), NamedSharding(mesh, P(None, "ep")))
          >>> for load in ([[1, 9]], [[4, 2]], [[5, 5]]):
          ...     s, w, _ = jeplb.eplb_step(s.record(jnp.array(load)), w, mesh=mesh)
          >>> s.last_load().tolist(), s.window_load().tolist()
          ([[5, 5]], [[9, 7]])
        """
        row = (self.window_pos - 1) % self.window_size
        return lax.dynamic_index_in_dim(self.window, row, 0, keepdims=False)

    def window_load(self) -> jax.Array:
        """The logical load summed over the window's last W passes: int32[L, E].

        What the placement policy balances (``window_total``, kept as a running sum as passes
        enter and leave; saturating at 2^31 - 1): a smoother signal than `last_load` for a
        router-bias update with a large speed. Passes not yet recorded count as zeros. Jit-able.

        Example:
          >>> s = EplbState.create(num_layers=2, num_experts=3, num_devices=1,
          ...                      window_size=4, step_interval=9)
          >>> s.window_load().tolist()
          [[0, 0, 0], [0, 0, 0]]
        """
        return self.window_total

    # ------------------------------------------------------------------------------ building

    def replace(self, **changes) -> EplbState:
        """Returns a copy with the given fields replaced (no checks; use for array updates).

        To change the configuration use ``state.replace(config=state.config.replace(...))``.
        """
        return dataclasses.replace(self, **changes)

    def check_window(self) -> None:
        """Checks that ``window_total`` is the window's sum and ``window_leaving`` its row
        ``window_pos`` (what the step keeps true); reads every row, O(W x L x E).

        Raises:
          ValueError: naming the field and the first entry that differs (concrete states only).

        Example:
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=2, step_interval=9)
          >>> s.replace(window=s.window.at[1, 0, 1].set(5)).check_window()
          Traceback (most recent call last):
          ...
          ValueError: window_total[0, 1] = 0: expected the sum of the window's rows (saturating), 5
        """
        check_window(self.window, self.window_total, self.window_leaving, self.window_pos)

    @classmethod
    def create(
        cls,
        *,
        num_layers: int,
        num_experts: int,
        num_devices: int,
        num_redundant_experts: int | str = 0,
        config: EplbConfig | None = None,
        **options,
    ) -> EplbState:
        """A state with vLLM's initial placement: slot p holds expert p % E, no load recorded.

        Slots 0..E-1 hold the experts in order, redundant slot E + i holds expert i % E.

        Args:
          num_layers: L, MoE layers (>= 1).
          num_experts: E, logical experts per layer (>= 1).
          num_devices: D, devices on the expert-parallel mesh axis, which the policy spreads the
            slots over; P = E + num_redundant_experts must be divisible by D.
          num_redundant_experts: P - E, extra replica slots per layer (>= 0), or ``"auto"``:
            the smallest R with (E + R) % D == 0 (0 when D divides E), vLLM's default. More
            replicas buy balance for memory: docs/policy.md has the figures.
          config: the `jeplb.EplbConfig` (default: every option at its default).
          **options: single options of ``config`` by name, as `jeplb.EplbConfig.create` takes
            them: ``window_size``, ``step_interval``, ``layers_per_step``, ``log_interval``
            (schedule); ``axis_name``, ``chunk_rows``, ``row_impl``, ... (transfer); ``policy``
            or its options (``num_groups``, ``num_nodes``, ``refine``).

        Returns:
          The new state (arrays on the default device, uncommitted: jit places them).

        Raises:
          TypeError, ValueError: an argument of the wrong type or out of range, naming it.

        Example:
          >>> s = EplbState.create(num_layers=3, num_experts=8, num_devices=4,
          ...                      num_redundant_experts=4, window_size=10, step_interval=100)
          >>> s.phy2log.shape, s.log2phy.shape, s.window.shape
          ((3, 12), (3, 8, 5), (10, 3, 8))
          >>> EplbState.create(num_layers=1, num_experts=6, num_devices=4,
          ...                  num_redundant_experts="auto").num_slots
          8
        """
        check_int("num_layers", num_layers, minimum=1)
        check_int("num_experts", num_experts, minimum=1)
        check_int("num_devices", num_devices, minimum=1)
        if num_redundant_experts == "auto":
            num_redundant_experts = -num_experts % num_devices
        check_int("num_redundant_experts", num_redundant_experts, minimum=0)
        config = EplbConfig.create(config, where="EplbState.create", **options)
        p_total = num_experts + num_redundant_experts
        # In the configuration's words, before the placement built here is checked (whose
        # check would name phy2log, which the caller never passed).
        config.check_sizes(
            num_layers=num_layers,
            num_experts=num_experts,
            num_slots=p_total,
            num_devices=num_devices,
        )
        phy2log = np.tile(np.arange(p_total, dtype=np.int32) % num_experts, (num_layers, 1))
        return cls.from_placement(
            phy2log, num_experts=num_experts, num_devices=num_devices, config=config
        )

    @classmethod
    def from_placement(
        cls,
        phy2log: Any,
        *,
        num_experts: int,
        num_devices: int,
        config: EplbConfig | None = None,
        **options,
    ) -> EplbState:
        """A state for an existing placement (e.g. the one the weights were loaded in).

        Args:
          phy2log: int[L, P] physical-to-logical map (numpy or jax), -1 for empty slots; every
            expert must have at least one slot in every layer (checked when concrete).
          num_experts: E.
          num_devices: D; P must be divisible by it.
          config, **options: as in `EplbState.create`.

        Returns:
          The state: log2phy and logcnt derived from ``phy2log``, no load recorded.

        Raises:
          TypeError, ValueError: naming the argument, what was expected and what arrived.

        Example:
          >>> s = EplbState.from_placement([[1, 0, 1, 2]], num_experts=3, num_devices=2,
          ...                              window_size=4, step_interval=8)
          >>> s.logcnt.tolist(), s.slots_per_device
          ([[1, 2, 1]], 2)
        """
        check_int("num_experts", num_experts, minimum=1)
        check_int("num_devices", num_devices, minimum=1)
        config = EplbConfig.create(config, where="EplbState.from_placement", **options)
        phy2log, num_layers, p_total = _check_phy2log(phy2log, num_experts, num_devices)
        config.check_sizes(
            num_layers=num_layers,
            num_experts=num_experts,
            num_slots=p_total,
            num_devices=num_devices,
        )
        window_size = config.schedule.window_size
        arrays = _fresh_arrays(jnp.asarray(phy2log, jnp.int32), num_experts, window_size)
        # Distinct buffers: a state may be donated, and XLA refuses one buffer donated twice.
        pending = {
            f"pending_{k}": jnp.array(arrays[k], copy=True)
            for k in ("phy2log", "log2phy", "logcnt")
        }
        return cls(**arrays, **pending, num_devices=int(num_devices), config=config)

    def replicated(self, mesh: jax.sharding.Mesh) -> EplbState:
        """The state with every array placed on ``mesh``, replicated (``PartitionSpec()``).

        Do this once before the first jitted step: a jitted step's outputs live on the mesh, so
        inputs already there make the first call compile the same program as every later one.

        Args:
          mesh: the device mesh of the model.

        Returns:
          The same state, its arrays committed to ``mesh``.

        Example:
          >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1).replicated(mesh)
          >>> s.phy2log.sharding.spec == jax.sharding.PartitionSpec()
          True
        """
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), self)

    # ------------------------------------------------------------------------------ recording

    def record(
        self, load: Any, *, layer: Any = None, load_axes: tuple[str, ...] | str = ()
    ) -> EplbState:
        """Adds routed-token counts to the current pass's load.

        Use it with `jeplb.dispatch_layer`, e.g. after a layer scan that returns each layer's
        counts.

        Counts never wrap. Eagerly (concrete values), a count below 0 or above 2^31 - 1 (any
        integer dtype: uint32, int64 ...), or a sum with ``pass_load`` past 2^31 - 1, raises a
        ValueError naming ``load``; step (`jeplb.eplb_step`) more often or record smaller parts.
        Under `jax.jit` (traced counts or state) nothing can raise: counts are clipped into
        [0, 2^31 - 1] and every sum saturates at 2^31 - 1.

        Args:
          load: int[L, E] counts of every layer, or int[E] of one layer with ``layer``.
          layer: the layer index (int, or an integer scalar array) when ``load`` is [E]. A
            concrete index outside [0, L) is refused (negative indices are not wrapped); a traced
            one outside [0, L) adds nothing.
          load_axes: mesh axes the counts are partial over (inside `jax.shard_map`): they are
            summed with one ``psum`` (saturating) before being added, which keeps the state
            replicated. Leave it empty at global view, or to defer the sum to
            `jeplb.eplb_step_local`.

        Returns:
          The state with ``pass_load`` updated.

        Raises:
          TypeError, ValueError: naming ``load``, ``layer`` or ``load_axes`` (also when
            ``load_axes`` names an axis that no enclosing `jax.shard_map` binds).

        Example:
          >>> s = EplbState.create(num_layers=2, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> s.record(jnp.array([3, 1]), layer=1).pass_load.tolist()
          [[0, 0], [3, 1]]
        """
        num_layers, num_experts = self.num_layers, self.num_experts
        one = layer is not None
        if one:
            check_layer(layer, num_layers)
        elif num_layers < 1:
            check_layer(0, num_layers)
        axes = _load_axes(load_axes)
        shape = (num_experts,) if one else (num_layers, num_experts)
        load = as_counts(load, shape, "[E]" if one else "[L, E]")
        return self._add_counts(load, layer=layer, axes=axes)

    def record_ids(
        self,
        topk_ids: Any,
        *,
        valid: Any = None,
        layer: Any = None,
        load_axes: tuple[str, ...] | str = (),
    ) -> EplbState:
        """Counts routed logical expert ids per expert and adds them to the current pass's load.

        The counting half of `jeplb.dispatch`, for a model that maps every layer's ids with
        ``dispatch(..., record=False)``, keeps them, and counts all layers at once after its
        forward: the same ``pass_load``, bit for bit, from one count per step instead of one per
        layer (on a GPU a few kernels per step instead of four per layer;
        docs/performance.md has the figures).

        Ids outside [0, E) and tokens with ``valid`` False are not counted; eagerly an
        out-of-range id of a valid token raises, as in `jeplb.dispatch`. The sums saturate as in
        `EplbState.record`.

        Args:
          topk_ids: int[L, ..., K] every layer's router ids, stacked on a leading layer axis (for
            example [L, T, K]); or int[..., K] of one layer with ``layer``.
          valid: optional bool mask of the tokens: ``topk_ids``' shape without its K axis.
          layer: the layer index when ``topk_ids`` holds one layer (as in `EplbState.record`).
          load_axes: mesh axes the ids are split over inside `jax.shard_map` (the counts are
            summed over them, as in `EplbState.record`).

        Returns:
          The state with ``pass_load`` updated.

        Raises:
          TypeError, ValueError: naming ``topk_ids``, ``valid``, ``layer`` or ``load_axes``.

        Example:
          >>> s = EplbState.create(num_layers=2, num_experts=3, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> ids = jnp.array([[[0, 1], [0, 2]], [[2, 2], [1, 0]]])  # [L = 2, T = 2, K = 2]
          >>> s.record_ids(ids).pass_load.tolist()
          [[2, 1, 1], [1, 1, 2]]
          >>> s.record_ids(ids[1], layer=1, valid=jnp.array([True, False])).pass_load.tolist()
          [[0, 0, 0], [0, 0, 2]]
        """
        num_layers, num_experts = self.num_layers, self.num_experts
        one = layer is not None
        check_layer(layer if one else 0, num_layers)
        axes = _load_axes(load_axes)
        ids = checks.int_array(topk_ids, "topk_ids", "[..., K]" if one else "[L, ..., K]")
        lead = () if one else (num_layers,)
        if ids.ndim < len(lead) + 1 or tuple(ids.shape[: len(lead)]) != lead:
            expected = "[..., K] (one layer's ids)" if one else f"[L = {num_layers}, ..., K]"
            raise ValueError(
                f"topk_ids: expected shape {expected}, got {tuple(ids.shape)}"
                + ("" if one else "; pass layer= to record one layer's ids")
            )
        batch = tuple(ids.shape[:-1])
        check_valid(valid, batch)
        check_ids(ids, valid, num_experts)
        with jax.named_scope("eplb_count"):
            counts = _count_rows(ids, valid, num_experts, rows=1 if one else num_layers)
        counts = counts[0] if one else counts
        return self._add_counts(counts, layer=layer, axes=axes, name="topk_ids' counts")

    def record_slots(
        self, kept_slots: Any, *, valid: Any = None, load_axes: tuple[str, ...] | str = ()
    ) -> EplbState:
        """Counts every layer's kept physical slots per logical expert and adds them to the
        current pass's load.

        The counting half of `jeplb.dispatch_kept`: slot ``p`` of layer ``l`` counts for expert
        ``phy2log[l, p]``, so the sums equal those of `EplbState.record_ids` on the ids the
        slots were mapped from. Slots outside [0, P) (-1: an id outside [0, E), or a row never
        written) and tokens with ``valid`` False are not counted. The sums saturate as in
        `EplbState.record`.

        Args:
          kept_slots: int[L, ..., K] every layer's physical slots (``kept`` of
            `jeplb.dispatch_kept`), read with this state's maps (call it before a rebalance
            changes them).
          valid: optional bool mask of the tokens: ``kept_slots``' shape without its L and K axes.
          load_axes: mesh axes the tokens are split over inside `jax.shard_map` (the counts are
            summed over them, as in `EplbState.record`).

        Returns:
          The state with ``pass_load`` updated.

        Raises:
          TypeError, ValueError: naming ``kept_slots``, ``valid`` or ``load_axes``.

        Example:
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      num_redundant_experts=1, window_size=1, step_interval=1)
          >>> s.phy2log.tolist()
          [[0, 1, 0]]
          >>> s.record_slots(jnp.array([[[0, 2], [1, -1]]])).pass_load.tolist()
          [[2, 1]]
        """
        num_layers, num_experts = self.num_layers, self.num_experts
        axes = _load_axes(load_axes)
        slots = checks.int_array(kept_slots, "kept_slots", "[L, ..., K]")
        if slots.ndim < 2 or slots.shape[0] != num_layers:
            raise ValueError(
                f"kept_slots: expected shape [L = {num_layers}, ..., K] (every layer's slots, as "
                f"jeplb.dispatch_kept keeps them), got {tuple(slots.shape)}"
            )
        check_valid(valid, tuple(slots.shape[1:-1]), shape_of="kept_slots without its L and K axes")
        # The range check runs in the slots' own dtype: an int64 slot of 2**32 + 1 cast first
        # would read as slot 1.
        held = (slots >= 0) & (slots < self.num_slots)
        safe = (np if isinstance(slots, np.ndarray) else jnp).where(held, slots, 0)
        with jax.named_scope("eplb_count"):
            safe = jnp.asarray(safe).astype(jnp.int32)
            expert = jnp.take_along_axis(self.phy2log, safe.reshape(num_layers, -1), axis=1)
            ids = jnp.where(jnp.asarray(held), expert.reshape(safe.shape), -1)
            counts = _count_rows(ids, valid, num_experts, rows=num_layers)
        return self._add_counts(counts, layer=None, axes=axes, name="kept_slots' counts")

    def _add_counts(
        self, load: jax.Array, *, layer: Any, axes: tuple[str, ...] = (), name: str = "load"
    ) -> EplbState:
        """`record` of checked values (int32 counts of the right shape, a checked ``layer`` or
        None, a tuple of axes): what `jeplb.dispatch` calls after its own checks."""
        num_layers, one = self.num_layers, layer is not None
        with jax.named_scope("eplb_record"):
            if axes:
                try:
                    load = saturating_psum(load, axes)
                except NameError as err:
                    raise ValueError(
                        f"load_axes: no mesh axis among {axes} is bound here; load_axes sums "
                        f"partial counts inside jax.shard_map over those axes: call record there, "
                        f"or leave load_axes empty at global view"
                    ) from err
            elif readable(load) and readable(self.pass_load) and checks.is_concrete(layer):
                check_sum(self.pass_load, load, layer, name)
            if not one:
                return self.replace(pass_load=saturating_add(self.pass_load, load))
            ok = (layer >= 0) & (layer < num_layers)
            row = self.pass_load[jnp.clip(layer, 0, num_layers - 1)]
            index = jnp.where(ok, layer, num_layers).astype(jnp.int32)
            added = self.pass_load.at[index].set(saturating_add(row, load), mode="drop")
            return self.replace(pass_load=added)

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Writes placement, load statistics and configuration to ``path``, atomically.

        ``.json``: human-readable (arrays as nested lists); ``.npz``: compact binary. Both hold the
        same fields and restore into an identical state with `EplbState.restore`. The file is
        written to a temporary file in the same folder, flushed to disk and renamed over
        ``path``: a reader sees the old file or the new one, never a part, and a failed save
        leaves the old file as it was.

        Args:
          path: a file name ending in ``.json`` or ``.npz``.

        Raises:
          ValueError: another suffix. OSError: the write failed (``path`` unchanged).

        Example:
          >>> import tempfile, os
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> p = os.path.join(tempfile.mkdtemp(), "eplb.json")
          >>> s.save(p); EplbState.restore(p).phy2log.tolist()
          [[0, 1]]
        """
        checkpoint.save(self, path)

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike,
        *,
        like: EplbState | None = None,
        num_layers: int | None = None,
        num_experts: int | None = None,
        num_devices: int | None = None,
        num_redundant_experts: int | None = None,
        window_size: int | None = None,
    ) -> EplbState:
        """Reads a state written by `EplbState.save`, checking it against what the model expects.

        Every field of the file is checked as `EplbState.create` checks its arguments (the same
        checks), and so are the arrays: maps that agree with each other, ids and slots in range,
        counts >= 0, ``window_pos`` in [0, W), ``cursor`` in [0, L], ``step`` >= 0, every value
        an int32. Files of every earlier format version load (see docs/concepts.md).

        Args:
          path: a ``.json`` or ``.npz`` file from `EplbState.save`.
          like: a state of the model being resumed (e.g. from `EplbState.create`): the file's
            arrays must have its shapes, and the result takes its configuration (so a resumed
            run may change e.g. ``step_interval`` while keeping placement and loads).
          num_layers, num_experts, num_devices, num_redundant_experts, window_size: sizes the
            file must have (each checked when given).

        Returns:
          The state (arrays on the default device).

        Raises:
          ValueError: a damaged file (naming the field, what was expected and what was found),
            a size or shape that does not match, a file that is not a saved state.

        Example:
          >>> import tempfile, os
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> p = os.path.join(tempfile.mkdtemp(), "eplb.npz")
          >>> s.save(p); EplbState.restore(p, like=s).num_experts
          2
        """
        sizes = dict(
            num_layers=num_layers,
            num_experts=num_experts,
            num_devices=num_devices,
            num_redundant_experts=num_redundant_experts,
            window_size=window_size,
        )
        if like is not None:
            if not isinstance(like, EplbState):
                raise TypeError(f"like: expected an EplbState, got {type(like).__name__}")
            sizes = {name: getattr(like, name) for name in sizes}
        saved = checkpoint.load(path, sizes=sizes, from_like=like is not None)
        arrays = {k: jnp.asarray(v) for k, v in saved.arrays.items()}
        if like is not None:
            return cls(**arrays, num_devices=like.num_devices, config=like.config)
        return cls(**arrays, num_devices=saved.num_devices, config=saved.config)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> EplbState:
        """Deprecated name of `EplbState.restore` (kept for one release)."""
        warnings.warn(
            "EplbState.load is renamed EplbState.restore ('load' names token counts)",
            DeprecationWarning,
            stacklevel=2,
        )
        return cls.restore(path, **kwargs)

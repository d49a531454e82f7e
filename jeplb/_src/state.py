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
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EplbState", "maps_from_phy2log"]

_FORMAT = "jeplb.EplbState"
_VERSION = 1

# Array fields in save order, with the letters of their shapes.
_ARRAY_FIELDS = {
    "phy2log": ("L", "P"),
    "log2phy": ("L", "E", "R_max"),
    "logcnt": ("L", "E"),
    "pass_load": ("L", "E"),
    "window": ("W", "L", "E"),
    "window_pos": (),
    "step": (),
    "pending_phy2log": ("L", "P"),
    "pending_log2phy": ("L", "E", "R_max"),
    "pending_logcnt": ("L", "E"),
    "cursor": (),
}

_STATIC_FIELDS = (
    "num_devices",
    "window_size",
    "step_interval",
    "num_redundant_experts",
    "layers_per_step",
    "num_groups",
    "num_nodes",
    "num_gpus",
    "refine",
    "axis_name",
    "chunk_rows",
    "log_interval",
)


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"static": True})


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_int(name: str, value: Any, *, minimum: int | None = None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def maps_from_phy2log(phy2log: jax.Array, num_experts: int, max_replicas: int):
    """The logical-to-physical map and replica counts that a physical-to-logical map implies.

    Replicas are listed in ascending slot order. Works on concrete and traced maps.

    Args:
      phy2log: int32[L, P] (or [P]) physical-to-logical map, -1 for empty slots.
      num_experts: E.
      max_replicas: R_max, width of the returned log2phy (replicas beyond it are dropped).

    Returns:
      ``(log2phy int32[L, E, R_max] padded with -1, logcnt int32[L, E])`` (no L for a [P] map).

    Example:
      >>> import jax.numpy as jnp
      >>> log2phy, logcnt = maps_from_phy2log(jnp.array([0, 1, 0, -1]), 2, 3)
      >>> log2phy.tolist(), logcnt.tolist()
      ([[0, 2, -1], [1, -1, -1]], [2, 1])
    """
    phy2log = jnp.asarray(phy2log, jnp.int32)
    if phy2log.ndim == 1:
        l2p, cnt = maps_from_phy2log(phy2log[None], num_experts, max_replicas)
        return l2p[0], cnt[0]
    num_layers, p_total = phy2log.shape
    slots = jnp.arange(p_total, dtype=jnp.int32)
    same = phy2log[:, :, None] == phy2log[:, None, :]  # [L, P, P]
    earlier = slots[None, :] < slots[:, None]  # [P, P]: q < p
    rank = jnp.sum(same & earlier[None], axis=-1).astype(jnp.int32)  # [L, P]
    valid = (phy2log >= 0) & (phy2log < num_experts)
    layer = jnp.broadcast_to(jnp.arange(num_layers, dtype=jnp.int32)[:, None], phy2log.shape)
    expert = jnp.where(valid, phy2log, num_experts)  # out of range: dropped
    log2phy = (
        jnp.full((num_layers, num_experts, max_replicas), -1, jnp.int32)
        .at[layer, expert, rank]
        .set(jnp.broadcast_to(slots, phy2log.shape), mode="drop")
    )
    logcnt = (
        jnp.zeros((num_layers, num_experts), jnp.int32)
        .at[layer, expert]
        .add(valid.astype(jnp.int32), mode="drop")
    )
    return log2phy, jnp.minimum(logcnt, max_replicas)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EplbState:
    """Expert placement, recorded load and rebalance schedule of a MoE model (a pytree).

    Build it with `EplbState.create` (vLLM's initial placement) or `EplbState.from_placement`.
    Every array is replicated: the same value on every device (``PartitionSpec()``).

    Attributes:
      phy2log: int32[L, P]. Logical expert held by each physical slot (-1: empty). Slot p lives on
        device p // N_local of the expert-parallel axis.
      log2phy: int32[L, E, R_max]. The slots holding each logical expert, padded with -1.
      logcnt: int32[L, E]. Number of replicas of each logical expert (the non -1 entries of
        log2phy).
      pass_load: int32[L, E]. Tokens routed to each logical expert in the current pass (since the last
        `jeplb.eplb_step`); added to by `jeplb.dispatch` / `EplbState.record`. Inside
        `jax.shard_map` it may hold this device's partial counts until the step sums them.
      window: int32[W, L, E]. Global logical load of the last W passes (a ring buffer).
      window_pos: int32[]. Row of ``window`` the next pass is written to.
      step: int32[]. Steps taken (`jeplb.eplb_step` calls). A rebalance is planned when it reaches a
        multiple of ``step_interval``.
      pending_phy2log: int32[L, P]. Target placement of the rebalance in progress (equal to
        ``phy2log`` for the layers already moved, and for all layers when none is in progress).
      pending_log2phy: int32[L, E, R_max]. Its logical-to-physical map.
      pending_logcnt: int32[L, E]. Its replica counts.
      cursor: int32[]. Next layer whose weights move; L when no rebalance is in progress.
      num_devices: D, devices on the expert-parallel mesh axis (static).
      window_size: W, passes the window keeps (static).
      step_interval: steps between rebalances (static).
      num_redundant_experts: P - E (static).
      layers_per_step: layers moved per step; None moves all layers in the step that plans the
        rebalance (static).
      num_groups: expert groups of the policy (DeepSeek's ``num_groups``; static).
      num_nodes: nodes of the policy (static).
      num_gpus: devices the policy spreads slots over (static; normally D).
      refine: the policy's refinement option (static).
      axis_name: the expert-parallel mesh axis name (static).
      chunk_rows: rows per collective chunk of the transfer (static).
      log_interval: log balancedness every this many steps; 0 never (static).

    Example:
      >>> s = EplbState.create(num_layers=2, num_experts=4, num_devices=2,
      ...                      num_redundant_experts=2, window_size=3, step_interval=10)
      >>> s.phy2log.tolist()
      [[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]]
      >>> s.log2phy[0].tolist()
      [[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]]
    """

    phy2log: jax.Array
    log2phy: jax.Array
    logcnt: jax.Array
    pass_load: jax.Array
    window: jax.Array
    window_pos: jax.Array
    step: jax.Array
    pending_phy2log: jax.Array
    pending_log2phy: jax.Array
    pending_logcnt: jax.Array
    cursor: jax.Array
    num_devices: int = _static()
    window_size: int = _static()
    step_interval: int = _static()
    num_redundant_experts: int = _static()
    layers_per_step: int | None = _static(None)
    num_groups: int = _static(1)
    num_nodes: int = _static(1)
    num_gpus: int | None = _static(None)
    refine: bool = _static(False)
    axis_name: str = _static("ep")
    chunk_rows: int = _static(1)
    log_interval: int = _static(0)

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
    def slots_per_device(self) -> int:
        """N_local = P // D."""
        return self.num_slots // self.num_devices

    @property
    def max_replicas(self) -> int:
        """R_max, the width of log2phy."""
        return self.log2phy.shape[2]

    @property
    def effective_layers_per_step(self) -> int:
        """Layers moved per step: ``layers_per_step``, or L when it is None."""
        return self.num_layers if self.layers_per_step is None else self.layers_per_step

    @property
    def in_progress(self) -> jax.Array:
        """bool[]: a progressive rebalance has layers left to move."""
        return self.cursor < self.num_layers

    # ------------------------------------------------------------------------------ building

    def replace(self, **changes) -> EplbState:
        """Returns a copy with the given fields replaced (no checks; use for array updates)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(
        cls,
        *,
        num_layers: int,
        num_experts: int,
        num_devices: int,
        num_redundant_experts: int = 0,
        window_size: int = 1000,
        step_interval: int = 3000,
        layers_per_step: int | None = None,
        num_groups: int = 1,
        num_nodes: int = 1,
        num_gpus: int | None = None,
        refine: bool = False,
        axis_name: str = "ep",
        chunk_rows: int = 1,
        log_interval: int = 0,
    ) -> EplbState:
        """A state with vLLM's initial placement: slot p holds expert p % E, no load recorded.

        Slots 0..E-1 hold the experts in order, redundant slot E + i holds expert i % E.

        Args:
          num_layers: L, MoE layers (>= 1).
          num_experts: E, logical experts per layer (>= 1).
          num_devices: D, devices on the expert-parallel mesh axis; P = E + num_redundant_experts
            must be divisible by D.
          num_redundant_experts: P - E, extra replica slots per layer (>= 0).
          window_size: W, passes of load the window keeps (>= 1; vLLM's default 1000).
          step_interval: steps between rebalances (>= 1; vLLM's default 3000). With
            ``layers_per_step`` it must be at least ceil(L / layers_per_step), so a rebalance
            ends before the next one is planned.
          layers_per_step: progressive mode: move this many layers per step (1..L), spreading the
            transfer over ceil(L / layers_per_step) steps; None moves every layer in one step.
          num_groups: expert groups (DeepSeek's ``num_groups``; E must be divisible by it).
          num_nodes: nodes for the hierarchical policy.
          num_gpus: devices the policy spreads slots over; defaults to D.
          refine: passed to the policy.
          axis_name: the expert-parallel mesh axis name.
          chunk_rows: rows per collective chunk of the weight transfer (>= 1).
          log_interval: log balancedness every this many steps (0: never).

        Returns:
          The new state (arrays on the default device, uncommitted: jit places them).

        Raises:
          TypeError, ValueError: an argument of the wrong type or out of range, naming it.

        Example:
          >>> s = EplbState.create(num_layers=3, num_experts=8, num_devices=4,
          ...                      num_redundant_experts=4, window_size=10, step_interval=100)
          >>> s.phy2log.shape, s.log2phy.shape, s.window.shape
          ((3, 12), (3, 8, 5), (10, 3, 8))
        """
        _check_int("num_layers", num_layers, minimum=1)
        _check_int("num_experts", num_experts, minimum=1)
        _check_int("num_devices", num_devices, minimum=1)
        _check_int("num_redundant_experts", num_redundant_experts, minimum=0)
        p_total = num_experts + num_redundant_experts
        phy2log = np.tile(np.arange(p_total, dtype=np.int32) % num_experts, (num_layers, 1))
        return cls.from_placement(
            phy2log,
            num_experts=num_experts,
            num_devices=num_devices,
            window_size=window_size,
            step_interval=step_interval,
            layers_per_step=layers_per_step,
            num_groups=num_groups,
            num_nodes=num_nodes,
            num_gpus=num_gpus,
            refine=refine,
            axis_name=axis_name,
            chunk_rows=chunk_rows,
            log_interval=log_interval,
        )

    @classmethod
    def from_placement(
        cls,
        phy2log: Any,
        *,
        num_experts: int,
        num_devices: int,
        window_size: int = 1000,
        step_interval: int = 3000,
        layers_per_step: int | None = None,
        num_groups: int = 1,
        num_nodes: int = 1,
        num_gpus: int | None = None,
        refine: bool = False,
        axis_name: str = "ep",
        chunk_rows: int = 1,
        log_interval: int = 0,
    ) -> EplbState:
        """A state for an existing placement (e.g. the one the weights were loaded in).

        Args:
          phy2log: int[L, P] physical-to-logical map (numpy or jax), -1 for empty slots; every
            expert must have at least one slot in every layer (checked when concrete).
          num_experts: E.
          num_devices: D; P must be divisible by it.
          window_size, step_interval, layers_per_step, num_groups, num_nodes, num_gpus, refine,
            axis_name, chunk_rows, log_interval: as in `EplbState.create`.

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
        _check_int("num_experts", num_experts, minimum=1)
        _check_int("num_devices", num_devices, minimum=1)
        if isinstance(phy2log, list | tuple):
            phy2log = np.asarray(phy2log)
        if not hasattr(phy2log, "shape") or not hasattr(phy2log, "dtype"):
            raise TypeError(f"phy2log: expected an int array [L, P], got {type(phy2log).__name__}")
        if not np.issubdtype(np.dtype(phy2log.dtype), np.integer):
            raise TypeError(f"phy2log: expected an integer dtype (int32), got {phy2log.dtype}")
        if phy2log.ndim != 2:
            raise ValueError(
                f"phy2log: expected a 2-D map [L, P], got shape {tuple(phy2log.shape)}"
            )
        num_layers, p_total = (int(s) for s in phy2log.shape)
        if num_layers < 1:
            raise ValueError("phy2log: expected at least one layer (L >= 1), got L = 0")
        if p_total < num_experts:
            raise ValueError(
                f"phy2log: expected P >= num_experts = {num_experts} slots per layer, got P = "
                f"{p_total}"
            )
        if p_total % num_devices:
            raise ValueError(
                f"num_devices: P = {p_total} slots per layer (num_experts {num_experts} + "
                f"num_redundant_experts {p_total - num_experts}) is not divisible by num_devices = "
                f"{num_devices}; every device must hold P // D slots"
            )
        _check_config(
            num_layers=num_layers,
            num_experts=num_experts,
            p_total=p_total,
            num_devices=num_devices,
            window_size=window_size,
            step_interval=step_interval,
            layers_per_step=layers_per_step,
            num_groups=num_groups,
            num_nodes=num_nodes,
            num_gpus=num_gpus,
            axis_name=axis_name,
            chunk_rows=chunk_rows,
            log_interval=log_interval,
        )
        if not _is_tracer(phy2log):
            _check_placement(np.asarray(phy2log), num_experts, "phy2log")
        phy2log = jnp.asarray(phy2log, jnp.int32)
        max_replicas = p_total - num_experts + 1
        log2phy, logcnt = maps_from_phy2log(phy2log, num_experts, max_replicas)
        return cls(
            phy2log=phy2log,
            log2phy=log2phy,
            logcnt=logcnt,
            pass_load=jnp.zeros((num_layers, num_experts), jnp.int32),
            window=jnp.zeros((window_size, num_layers, num_experts), jnp.int32),
            window_pos=jnp.zeros((), jnp.int32),
            step=jnp.zeros((), jnp.int32),
            # Distinct buffers: a state may be donated, and XLA refuses one buffer donated twice.
            pending_phy2log=jnp.array(phy2log, copy=True),
            pending_log2phy=jnp.array(log2phy, copy=True),
            pending_logcnt=jnp.array(logcnt, copy=True),
            cursor=jnp.full((), num_layers, jnp.int32),
            num_devices=int(num_devices),
            window_size=int(window_size),
            step_interval=int(step_interval),
            num_redundant_experts=p_total - num_experts,
            layers_per_step=None if layers_per_step is None else int(layers_per_step),
            num_groups=int(num_groups),
            num_nodes=int(num_nodes),
            num_gpus=int(num_devices if num_gpus is None else num_gpus),
            refine=bool(refine),
            axis_name=axis_name,
            chunk_rows=int(chunk_rows),
            log_interval=int(log_interval),
        )

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
        self, counts: Any, *, layer: Any = None, load_axes: tuple[str, ...] | str = ()
    ) -> EplbState:
        """Adds routed-token counts to the current pass's load.

        Use it with `jeplb.dispatch_layer`, e.g. after a layer scan that returns each layer's
        counts.

        Args:
          counts: int[L, E] counts of every layer, or int[E] of one layer with ``layer``.
          layer: the layer index (int or traced int32[]) when ``counts`` is [E].
          load_axes: mesh axes the counts are partial over (inside `jax.shard_map`): they are
            summed with one ``psum`` before being added, which keeps the state replicated. Leave
            it empty at global view, or to defer the sum to `jeplb.eplb_step_local`.

        Returns:
          The state with ``pass_load`` updated.

        Example:
          >>> s = EplbState.create(num_layers=2, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> s.record(jnp.array([3, 1]), layer=1).pass_load.tolist()
          [[0, 0], [3, 1]]
        """
        counts = jnp.asarray(counts)
        if not jnp.issubdtype(counts.dtype, jnp.integer):
            raise TypeError(f"counts: expected integer token counts, got dtype {counts.dtype}")
        want = (self.num_experts,) if layer is not None else (self.num_layers, self.num_experts)
        if tuple(counts.shape) != want:
            letters = "[E]" if layer is not None else "[L, E]"
            raise ValueError(
                f"counts: expected shape {letters} = {want}, got {tuple(counts.shape)}"
                + ("" if layer is not None else " (pass layer= to record one layer's [E] counts)")
            )
        is_int = isinstance(layer, int | np.integer) and not isinstance(layer, bool)
        if is_int and not 0 <= int(layer) < self.num_layers:
            raise ValueError(
                f"layer: expected an index in [0, num_layers = {self.num_layers}), got {layer}"
            )
        if not _is_tracer(counts) and bool(jnp.any(counts < 0)):
            bad = tuple(int(i) for i in np.argwhere(np.asarray(counts) < 0)[0])
            raise ValueError(
                f"counts{list(bad)} = {int(np.asarray(counts)[bad])}: expected token counts >= 0"
            )
        axes = (load_axes,) if isinstance(load_axes, str) else tuple(load_axes)
        counts = counts.astype(jnp.int32)
        if axes:
            counts = jax.lax.psum(counts, axes)
        if layer is None:
            return self.replace(pass_load=self.pass_load + counts)
        return self.replace(pass_load=self.pass_load.at[layer].add(counts))

    # ------------------------------------------------------------------------------ save / load

    def config(self) -> dict[str, Any]:
        """The static configuration as a plain dict (what `EplbState.save` stores)."""
        return {name: getattr(self, name) for name in _STATIC_FIELDS}

    def save(self, path: str | os.PathLike) -> None:
        """Writes placement, load statistics and configuration to ``path``.

        ``.json``: human-readable (arrays as nested lists); ``.npz``: compact binary. Both hold the
        same fields and load back into an identical state with `EplbState.load`.

        Args:
          path: a file name ending in ``.json`` or ``.npz``.

        Raises:
          ValueError: another suffix.

        Example:
          >>> import tempfile, os
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> p = os.path.join(tempfile.mkdtemp(), "eplb.json")
          >>> s.save(p); EplbState.load(p).phy2log.tolist()
          [[0, 1]]
        """
        kind = _kind(path, "path")
        arrays = {name: np.asarray(jax.device_get(getattr(self, name))) for name in _ARRAY_FIELDS}
        header = {
            "format": _FORMAT,
            "version": _VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "config": self.config(),
        }
        if kind == "json":
            doc = dict(header, arrays={k: v.tolist() for k, v in arrays.items()})
            with open(path, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
        else:
            with open(path, "wb") as f:
                np.savez_compressed(f, __header__=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(
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

        Args:
          path: a ``.json`` or ``.npz`` file from `EplbState.save`.
          like: a state of the model being resumed (e.g. from `EplbState.create`): the file's
            arrays must have its shapes, and the result takes its static configuration (so a
            resumed run may change e.g. ``step_interval`` while keeping placement and loads).
          num_layers, num_experts, num_devices, num_redundant_experts, window_size: sizes the
            file must have (each checked when given).

        Returns:
          The state (arrays on the default device).

        Raises:
          ValueError: a size or shape that does not match, naming the field with the expected
            and the found value; a file that is not a saved state; maps that contradict each
            other.

        Example:
          >>> import tempfile, os
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> p = os.path.join(tempfile.mkdtemp(), "eplb.npz")
          >>> s.save(p); EplbState.load(p, like=s).num_experts
          2
        """
        kind = _kind(path, "path")
        header, raw = _read_saved(path, kind)
        if header.get("version") != _VERSION:
            raise ValueError(
                f"version: expected {_VERSION}, found {header.get('version')!r} in "
                f"{os.fspath(path)!r}"
            )
        missing = [k for k in _ARRAY_FIELDS if k not in raw]
        if missing:
            raise ValueError(f"{missing[0]}: missing from {os.fspath(path)!r}")
        try:
            arrays = {k: _int_array(raw[k]) for k in _ARRAY_FIELDS}
            config = dict(header["config"])
            sizes = {
                "L": int(header["num_layers"]),
                "E": int(header["num_experts"]),
                "P": int(header["num_slots"]),
                "W": int(config["window_size"]),
            }
            missing = [k for k in _STATIC_FIELDS if k not in config]
            if missing:
                raise KeyError(missing[0])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(
                f"path: {os.fspath(path)!r} is a damaged saved {_FORMAT}: its header or arrays "
                f"do not parse ({type(err).__name__}: {err})"
            ) from err
        sizes["R_max"] = sizes["P"] - sizes["E"] + 1
        # The file against itself.
        for name, letters in _ARRAY_FIELDS.items():
            want = tuple(sizes[c] for c in letters)
            got = arrays[name].shape
            if got != want:
                raise ValueError(
                    f"{name}: expected shape [{', '.join(letters)}] = {want} (from the file's "
                    f"header), found {got} in {os.fspath(path)!r}"
                )
        # The file against the caller's expectations.
        expected = {
            "num_layers": (num_layers, sizes["L"]),
            "num_experts": (num_experts, sizes["E"]),
            "num_devices": (num_devices, config["num_devices"]),
            "num_redundant_experts": (num_redundant_experts, sizes["P"] - sizes["E"]),
            "window_size": (window_size, sizes["W"]),
        }
        if like is not None:
            if not isinstance(like, EplbState):
                raise TypeError(f"like: expected an EplbState, got {type(like).__name__}")
            for name in ("num_layers", "num_experts", "num_devices", "num_redundant_experts"):
                expected[name] = (getattr(like, name), expected[name][1])
            expected["window_size"] = (like.window_size, sizes["W"])
        for name, (want, found) in expected.items():
            if want is not None and want != found:
                raise ValueError(
                    f"{name}: expected {want}, found {found} in {os.fspath(path)!r}"
                    + (" (from like=)" if like is not None else "")
                )
        _check_saved_maps(arrays, sizes["E"], os.fspath(path))
        if like is not None:
            config = like.config()
        return cls(
            **{k: jnp.asarray(v) for k, v in arrays.items()},
            **{k: config[k] for k in _STATIC_FIELDS},
        )


# ---------------------------------------------------------------------------------- checks


def _read_saved(path: Any, kind: str) -> tuple[dict, dict]:
    """The header and the raw arrays of a saved state; a ValueError for anything else."""
    where = os.fspath(path)
    try:
        if kind == "json":
            with open(path) as f:
                doc = json.load(f)
            header = doc if isinstance(doc, dict) else {}
            raw = header.get("arrays", {})
        else:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["__header__"])) if "__header__" in z.files else {}
                raw = {k: z[k] for k in z.files if k != "__header__"}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"path: {where!r} is not a saved {_FORMAT} ({'JSON' if kind == 'json' else 'npz'}; "
            f"it does not parse: {type(err).__name__}: {err})"
        ) from err
    if not isinstance(header, dict) or header.get("format") != _FORMAT or not isinstance(raw, dict):
        raise ValueError(
            f"path: {where!r} is not a saved {_FORMAT} ({'JSON' if kind == 'json' else 'npz'})"
        )
    return header, raw


def _int_array(x: Any) -> np.ndarray:
    """A saved array as int32; non-integer values are refused rather than truncated."""
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise TypeError(f"expected integer arrays, found dtype {a.dtype}")
    return a.astype(np.int32)


def _kind(path: Any, name: str) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file name (str or os.PathLike), got {type(path)}")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"{name}: expected a file name ending in .json or .npz, got {path!r}")
    return suffix[1:]


def _check_config(
    *,
    num_layers,
    num_experts,
    p_total,
    num_devices,
    window_size,
    step_interval,
    layers_per_step,
    num_groups,
    num_nodes,
    num_gpus,
    axis_name,
    chunk_rows,
    log_interval,
) -> None:
    _check_int("window_size", window_size, minimum=1)
    _check_int("step_interval", step_interval, minimum=1)
    _check_int("layers_per_step", layers_per_step, minimum=1, allow_none=True)
    _check_int("num_groups", num_groups, minimum=1)
    _check_int("num_nodes", num_nodes, minimum=1)
    _check_int("num_gpus", num_gpus, minimum=1, allow_none=True)
    _check_int("chunk_rows", chunk_rows, minimum=1)
    _check_int("log_interval", log_interval, minimum=0)
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"axis_name: expected a mesh axis name (str), got {axis_name!r}")
    if layers_per_step is not None:
        if layers_per_step > num_layers:
            raise ValueError(
                f"layers_per_step: expected at most num_layers = {num_layers}, got "
                f"{layers_per_step}"
            )
        steps = -(-num_layers // layers_per_step)
        if step_interval < steps:
            raise ValueError(
                f"step_interval: a progressive rebalance of {num_layers} layers at "
                f"layers_per_step = {layers_per_step} takes {steps} steps, so step_interval must "
                f"be >= {steps}; got {step_interval}"
            )
    gpus = num_devices if num_gpus is None else num_gpus
    if p_total % gpus:
        raise ValueError(f"num_gpus: P = {p_total} slots is not divisible by num_gpus = {gpus}")
    # The policy's rules: hierarchical when num_groups % num_nodes == 0, else global.
    if num_groups % num_nodes == 0:
        if num_experts % num_groups:
            raise ValueError(
                f"num_groups: expected a divisor of num_experts = {num_experts} (hierarchical "
                f"policy, used because num_groups % num_nodes == 0), got {num_groups}"
            )
        if gpus % num_nodes:
            raise ValueError(
                f"num_nodes: num_gpus = {gpus} is not divisible by num_nodes = {num_nodes} "
                f"(hierarchical policy, used because num_groups % num_nodes == 0)"
            )


def _check_placement(phy2log: np.ndarray, num_experts: int, name: str) -> None:
    """Concrete checks of a map [L, P]: ids in [-1, E), every expert present in every layer."""
    bad = np.argwhere((phy2log < -1) | (phy2log >= num_experts))
    if bad.size:
        lay, p = (int(i) for i in bad[0])
        raise ValueError(
            f"{name}[{lay}, {p}] = {int(phy2log[lay, p])}: expected an expert id in "
            f"[0, num_experts = {num_experts}) or -1 (empty slot)"
        )
    for lay in range(phy2log.shape[0]):
        present = np.zeros(num_experts, bool)
        present[phy2log[lay][phy2log[lay] >= 0]] = True
        if not present.all():
            e = int(np.argmin(present))
            raise ValueError(
                f"{name}[{lay}]: expert {e} has no slot; every logical expert needs at least one "
                f"replica in every layer"
            )


def _check_saved_maps(arrays: dict[str, np.ndarray], num_experts: int, where: str) -> None:
    for prefix in ("", "pending_"):
        p2l = arrays[prefix + "phy2log"]
        _check_placement(p2l, num_experts, prefix + "phy2log")
        l2p = arrays[prefix + "log2phy"]
        cnt = arrays[prefix + "logcnt"]
        want_cnt = np.stack(
            [np.bincount(row[row >= 0], minlength=num_experts) for row in p2l]
        ).astype(np.int32)
        if not np.array_equal(cnt, want_cnt):
            lay, e = (int(i) for i in np.argwhere(cnt != want_cnt)[0])
            raise ValueError(
                f"{prefix}logcnt[{lay}, {e}]: expected {want_cnt[lay, e]} (replicas of expert {e} "
                f"in {prefix}phy2log), found {cnt[lay, e]} in {where!r}"
            )
        listed = (l2p >= 0).sum(-1)
        if not np.array_equal(listed, cnt):
            lay, e = (int(i) for i in np.argwhere(listed != cnt)[0])
            raise ValueError(
                f"{prefix}log2phy[{lay}, {e}]: expected {cnt[lay, e]} slots (its logcnt), found "
                f"{listed[lay, e]} in {where!r}"
            )
        for lay, e, r in np.argwhere(l2p >= 0):
            p = l2p[lay, e, r]
            if p >= p2l.shape[1] or p2l[lay, p] != e or r >= cnt[lay, e]:
                raise ValueError(
                    f"{prefix}log2phy[{lay}, {e}, {r}] = {p}: expected a slot holding expert {e} "
                    f"in {prefix}phy2log, found one holding "
                    f"{p2l[lay, p] if p < p2l.shape[1] else 'nothing'} in {where!r}"
                )

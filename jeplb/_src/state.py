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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src import checks
from jeplb._src.maps import check_phy2log, maps_from_phy2log
from jeplb._src.validate import check_axis_name, check_bool, check_int

__all__ = [
    "EplbState",
    "array_fields",
    "as_counts",
    "check_axis_name",
    "check_config",
    "check_int",
    "check_layer",
    "check_window",
    "saturating_add",
    "saturating_psum",
    "slide_window",
    "slide_window_fast",
    "static_fields",
    "window_sum",
]

INT32_MAX = 2**31 - 1


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"static": True})


def _readable(x: Any) -> bool:
    """Whether this process can read ``x``'s values (not traced, every shard addressable)."""
    return checks.is_concrete(x) and getattr(x, "is_fully_addressable", True)


# ---------------------------------------------------------------------------------- checks


def check_config(
    *,
    num_layers: Any,
    num_experts: Any,
    num_devices: Any,
    num_redundant_experts: Any,
    window_size: Any,
    step_interval: Any,
    layers_per_step: Any,
    num_groups: Any,
    num_nodes: Any,
    refine: Any,
    axis_name: Any,
    chunk_rows: Any,
    log_interval: Any,
) -> None:
    """The one check of a state's sizes and configuration (`EplbState.create`, `from_placement`
    and `EplbState.load` all go through it).

    Raises:
      TypeError, ValueError: naming the field, what was expected and what arrived.
    """
    for name, value, minimum in (
        ("num_layers", num_layers, 1),
        ("num_experts", num_experts, 1),
        ("num_devices", num_devices, 1),
        ("num_redundant_experts", num_redundant_experts, 0),
        ("window_size", window_size, 1),
        ("step_interval", step_interval, 1),
        ("num_groups", num_groups, 1),
        ("num_nodes", num_nodes, 1),
        ("chunk_rows", chunk_rows, 1),
        ("log_interval", log_interval, 0),
    ):
        check_int(name, value, minimum=minimum)
    check_int("layers_per_step", layers_per_step, minimum=1, allow_none=True)
    check_bool("refine", refine)
    check_axis_name("axis_name", axis_name)
    check_slots(num_experts, num_redundant_experts, num_devices)
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
    # The policy's rules: hierarchical when num_groups % num_nodes == 0, else global.
    if num_groups % num_nodes == 0:
        if num_experts % num_groups:
            raise ValueError(
                f"num_groups: expected a divisor of num_experts = {num_experts} (hierarchical "
                f"policy, used because num_groups % num_nodes == 0), got {num_groups}"
            )
        if num_devices % num_nodes:
            raise ValueError(
                f"num_nodes: num_devices = {num_devices} is not divisible by num_nodes = "
                f"{num_nodes} (hierarchical policy, used because num_groups % num_nodes == 0)"
            )


def check_slots(num_experts: int, num_redundant_experts: int, num_devices: int) -> None:
    """P = E + redundant slots divisible by D (checked ints), in the configuration's words: for
    `EplbState.create` before it builds its placement (whose check would name ``phy2log``)."""
    p_total = num_experts + num_redundant_experts
    if p_total % num_devices:
        raise ValueError(
            f"num_devices: P = {p_total} slots per layer (num_experts {num_experts} + "
            f"num_redundant_experts {num_redundant_experts}) is not divisible by num_devices = "
            f"{num_devices}; every device must hold P // D slots"
        )


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


def _plain(value: Any) -> Any:
    """A checked configuration value as a plain Python value (numpy ints and bools unwrapped)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _first_bad(name: str, a: np.ndarray, bad: np.ndarray) -> str:
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{name}{list(where)} = {int(a[where])}"


def as_counts(load: Any, shape: tuple[int, ...], letters: str, name: str = "load"):
    """Token counts as int32 that never wrap: concrete ones are checked (>= 0 and < 2^31), traced
    ones are clipped into [0, 2^31 - 1].

    Raises:
      TypeError: not an integer array. ValueError: the wrong shape, a negative count or one that
        does not fit int32, naming ``name`` and the first bad entry.
    """
    load = checks.int_array(load, name, letters)
    if tuple(load.shape) != shape:
        hint = " (pass layer= to record one layer's [E] counts)" if letters == "[L, E]" else ""
        raise ValueError(
            f"{name}: expected shape {letters} = {shape}, got {tuple(load.shape)}{hint}"
        )
    info = jnp.iinfo(load.dtype)
    if not _readable(load):
        if info.min < 0:
            load = jnp.maximum(load, 0)
        if info.max > INT32_MAX:
            load = jnp.minimum(load, INT32_MAX)
        return load.astype(jnp.int32)
    a = np.asarray(load)
    if info.min < 0 and (a < 0).any():
        raise ValueError(f"{_first_bad(name, a, a < 0)}: expected token counts >= 0")
    if info.max > INT32_MAX and (a > INT32_MAX).any():
        raise ValueError(
            f"{_first_bad(name, a, a > INT32_MAX)}: expected token counts below 2^31 (they are "
            f"kept as int32); record them in smaller parts or step more often"
        )
    return jnp.asarray(a.astype(np.int32))


def saturating_add(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a + b`` for int32 counts ``b >= 0``, saturating at 2^31 - 1 instead of wrapping."""
    return jnp.where(a > INT32_MAX - b, INT32_MAX, a + b)


def saturating_psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.psum`` of int32 counts ``x >= 0`` that saturates at 2^31 - 1 instead of wrapping.

    The counts are summed as two 16-bit halves (one psum of [2, ...]), exact for up to 2^15
    devices over ``axes``.
    """
    both = jax.lax.psum(jnp.stack([x & 0xFFFF, x >> 16]), axes)
    high = both[1] + (both[0] >> 16)
    return jnp.where(high > 0x7FFF, INT32_MAX, (high << 16) | (both[0] & 0xFFFF))


def window_sum(window: Any) -> jax.Array:
    """The sum of a window's W rows, int32[L, E], saturating at 2^31 - 1 (exact below it).

    What ``EplbState.window_total`` must equal. Costs O(W x L x E): one pass over the rows, one row
    at a time (no [W, L, E] temporary); the step calls it only while some total is saturated.

    Args:
      window: int32[W, L, E] counts >= 0.

    Returns:
      int32[L, E].
    """
    window = jnp.asarray(window, jnp.int32)
    return lax.fori_loop(
        0,
        window.shape[0],
        lambda i, acc: saturating_add(acc, lax.dynamic_index_in_dim(window, i, 0, False)),
        jnp.zeros(window.shape[1:], jnp.int32),
    )


def check_window(window: Any, total: Any, leaving: Any, pos: Any) -> None:
    """Checks a window's derived fields: ``total`` its sum (`window_sum`, saturating at
    2^31 - 1) and ``leaving`` its row ``pos``. Concrete arrays only; numpy, O(W x L x E).

    Raises:
      ValueError: naming ``window_total`` or ``window_leaving`` and the first entry that differs.
    """
    window = np.asarray(window)
    want = np.minimum(window.sum(axis=0, dtype=np.int64), INT32_MAX)  # int64: no overflow
    for name, got, expected, what in (
        ("window_total", np.asarray(total), want, "the sum of the window's rows (saturating)"),
        ("window_leaving", np.asarray(leaving), window[int(np.asarray(pos))], "window[window_pos]"),
    ):
        if got.shape != expected.shape:
            raise ValueError(f"{name}: expected shape {expected.shape}, got {got.shape}")
        bad = got != expected
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}{list(at)} = {int(got[at])}: expected {what}, {int(expected[at])}"
            )


def slide_window(
    window: jax.Array, total: jax.Array, leaving: jax.Array, pos: jax.Array, row: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Writes ``row`` into ``window`` at ``pos`` and keeps the running total: O(L x E).

    The row it overwrites (``leaving``, a copy of ``window[pos]``) is subtracted from ``total`` and
    the new one added, so the total stays the window's sum (`window_sum`): exact below 2^31 - 1,
    saturated at it, never wrapped. A saturated entry's true sum is not known, so while any entry
    of ``total`` is saturated the total is summed again from the window (O(W x L x E), only then).
    The window is only read after it is written (the next ``leaving`` row): a read of the donated
    window before the write would make XLA copy all of it.

    Args:
      window: int32[W, L, E] (updated in place when donated).
      total: int32[L, E], the window's sum.
      leaving: int32[L, E], ``window[pos]``.
      pos: int32[], the row to overwrite.
      row: int32[L, E] counts >= 0.

    Returns:
      ``(window, total, leaving, pos)`` after the write: the next ``leaving`` row and position.
    """
    saturated = jnp.any(total == INT32_MAX)
    window, slid, leaving, pos = slide_window_fast(window, total, leaving, pos, row)
    total = lax.cond(saturated, lambda: window_sum(window), lambda: slid)
    return window, total, leaving, pos


def slide_window_fast(
    window: jax.Array, total: jax.Array, leaving: jax.Array, pos: jax.Array, row: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`slide_window` without its re-sum: branch-free, a handful of fused kernels.

    The total it returns is the window's sum only while no entry of the ``total`` it was given is
    saturated (``jnp.any(total == INT32_MAX)`` false); otherwise the caller must replace it with
    `window_sum` of the returned window (what `slide_window` does), e.g. inside a branch that runs
    only then.

    Returns:
      ``(window, total, leaving, pos)`` as `slide_window`.
    """
    window = lax.dynamic_update_index_in_dim(window, row, pos, 0)
    # Below the limit the total is exact, so it holds the row it loses (max: a hand-made state).
    slid = saturating_add(jnp.maximum(total - leaving, 0), row)
    pos = (pos + 1) % window.shape[0]
    return window, slid, lax.dynamic_index_in_dim(window, pos, 0, keepdims=False), pos


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
    Every array is replicated: the same value on every device (``PartitionSpec()``).

    Attributes:
      phy2log: int32[L, P]. Logical expert held by each physical slot (-1: empty). Slot p lives on
        device p // N_local of the expert-parallel axis.
      log2phy: int32[L, E, R_max]. The slots holding each logical expert, padded with -1.
      logcnt: int32[L, E]. Number of replicas of each logical expert (the non -1 entries of
        log2phy).
      pass_load: int32[L, E]. Tokens routed to each logical expert in the current pass (since the last
        `jeplb.eplb_step`); added to by `jeplb.dispatch` / `EplbState.record` (saturating at
        2^31 - 1 under jit, an error eagerly). Inside
        `jax.shard_map` it may hold this device's partial counts until the step sums them.
      window: int32[W, L, E]. Global logical load of the last W passes (a ring buffer).
      window_total: int32[L, E]. The sum of ``window``'s rows (`window_sum`), kept as a running
        total as passes enter and leave, so that a step costs O(L x E), not O(W x L x E);
        saturates at 2^31 - 1.
      window_leaving: int32[L, E]. ``window[window_pos]``, the pass the next step drops from the
        total (kept apart so the step reads the window only after writing it). Replace
        ``window`` or ``window_pos`` only together with these two (`EplbState.check_window`).
      window_pos: int32[]. Row of ``window`` the next pass is written to.
      step: int32[]. Steps taken (`jeplb.eplb_step` calls). A rebalance is planned when it reaches a
        multiple of ``step_interval``.
      pending_phy2log: int32[L, P]. Target placement of the rebalance in progress (equal to
        ``phy2log`` for the layers already moved, and for all layers when none is in progress).
      pending_log2phy: int32[L, E, R_max]. Its logical-to-physical map.
      pending_logcnt: int32[L, E]. Its replica counts.
      cursor: int32[]. Next layer whose weights move; L when no rebalance is in progress.
      num_devices: D, devices on the expert-parallel mesh axis (static); the policy spreads the
        slots over these D devices.
      window_size: W, passes the window keeps (static).
      step_interval: steps between rebalances (static).
      num_redundant_experts: P - E (static).
      layers_per_step: layers moved per step; None moves all layers in the step that plans the
        rebalance (static).
      num_groups: expert groups of the policy (DeepSeek's ``num_groups``; static).
      num_nodes: nodes of the policy (static).
      refine: the policy's refinement option (static).
      axis_name: the expert-parallel mesh axis name, or a tuple of them (static).
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
    window_total: jax.Array
    window_leaving: jax.Array
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
    refine: bool = _static(False)
    axis_name: str | tuple[str, ...] = _static("ep")
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
        """Returns a copy with the given fields replaced (no checks; use for array updates)."""
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
        num_redundant_experts: int = 0,
        window_size: int = 1000,
        step_interval: int = 3000,
        layers_per_step: int | None = None,
        num_groups: int = 1,
        num_nodes: int = 1,
        refine: bool = False,
        axis_name: str | tuple[str, ...] = "ep",
        chunk_rows: int = 1,
        log_interval: int = 0,
    ) -> EplbState:
        """A state with vLLM's initial placement: slot p holds expert p % E, no load recorded.

        Slots 0..E-1 hold the experts in order, redundant slot E + i holds expert i % E.

        Args:
          num_layers: L, MoE layers (>= 1).
          num_experts: E, logical experts per layer (>= 1).
          num_devices: D, devices on the expert-parallel mesh axis, which the policy spreads the
            slots over; P = E + num_redundant_experts must be divisible by D.
          num_redundant_experts: P - E, extra replica slots per layer (>= 0).
          window_size: W, passes of load the window keeps (>= 1; vLLM's default 1000).
          step_interval: steps between rebalances (>= 1; vLLM's default 3000). With
            ``layers_per_step`` it must be at least ceil(L / layers_per_step), so a rebalance
            ends before the next one is planned.
          layers_per_step: progressive mode: move this many layers per step (1..L), spreading the
            transfer over ceil(L / layers_per_step) steps; None moves every layer in one step.
          num_groups: expert groups (DeepSeek's ``num_groups``; E must be divisible by it).
          num_nodes: nodes for the hierarchical policy.
          refine: passed to the policy (a bool).
          axis_name: the expert-parallel mesh axis name, or a tuple of them.
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
        check_int("num_layers", num_layers, minimum=1)
        check_int("num_experts", num_experts, minimum=1)
        check_int("num_devices", num_devices, minimum=1)
        check_int("num_redundant_experts", num_redundant_experts, minimum=0)
        check_slots(num_experts, num_redundant_experts, num_devices)
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
        refine: bool = False,
        axis_name: str | tuple[str, ...] = "ep",
        chunk_rows: int = 1,
        log_interval: int = 0,
    ) -> EplbState:
        """A state for an existing placement (e.g. the one the weights were loaded in).

        Args:
          phy2log: int[L, P] physical-to-logical map (numpy or jax), -1 for empty slots; every
            expert must have at least one slot in every layer (checked when concrete).
          num_experts: E.
          num_devices: D; P must be divisible by it.
          window_size, step_interval, layers_per_step, num_groups, num_nodes, refine, axis_name,
            chunk_rows, log_interval: as in `EplbState.create`.

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
        phy2log, num_layers, p_total = _check_phy2log(phy2log, num_experts, num_devices)
        config = dict(
            num_devices=num_devices,
            num_redundant_experts=p_total - num_experts,
            window_size=window_size,
            step_interval=step_interval,
            layers_per_step=layers_per_step,
            num_groups=num_groups,
            num_nodes=num_nodes,
            refine=refine,
            axis_name=axis_name,
            chunk_rows=chunk_rows,
            log_interval=log_interval,
        )
        check_config(num_layers=num_layers, num_experts=num_experts, **config)
        arrays = _fresh_arrays(jnp.asarray(phy2log, jnp.int32), num_experts, window_size)
        # Distinct buffers: a state may be donated, and XLA refuses one buffer donated twice.
        pending = {
            f"pending_{k}": jnp.array(arrays[k], copy=True)
            for k in ("phy2log", "log2phy", "logcnt")
        }
        return cls(**arrays, **pending, **{k: _plain(v) for k, v in config.items()})

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

    def _add_counts(self, load: jax.Array, *, layer: Any, axes: tuple[str, ...] = ()) -> EplbState:
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
            elif _readable(load) and _readable(self.pass_load) and checks.is_concrete(layer):
                _check_sum(self.pass_load, load, layer)
            if not one:
                return self.replace(pass_load=saturating_add(self.pass_load, load))
            ok = (layer >= 0) & (layer < num_layers)
            row = self.pass_load[jnp.clip(layer, 0, num_layers - 1)]
            index = jnp.where(ok, layer, num_layers).astype(jnp.int32)
            added = self.pass_load.at[index].set(saturating_add(row, load), mode="drop")
            return self.replace(pass_load=added)

    # ------------------------------------------------------------------------------ save / load

    def config(self) -> dict[str, Any]:
        """The static configuration as a plain dict (what `EplbState.save` stores)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _is_static(f)}

    def save(self, path: str | os.PathLike) -> None:
        """Writes placement, load statistics and configuration to ``path``, atomically.

        ``.json``: human-readable (arrays as nested lists); ``.npz``: compact binary. Both hold the
        same fields and load back into an identical state with `EplbState.load`. The file is
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
          >>> s.save(p); EplbState.load(p).phy2log.tolist()
          [[0, 1]]
        """
        from jeplb._src import checkpoint

        checkpoint.save(self, path)

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

        Every field of the file is checked as `EplbState.create` checks its arguments (the same
        checker), and so are the arrays: maps that agree with each other, ids and slots in range,
        counts >= 0, ``window_pos`` in [0, W), ``cursor`` in [0, L], ``step`` >= 0, every value
        an int32. A file from before ``num_gpus`` was removed loads when its ``num_gpus`` is null
        or equal to ``num_devices``.

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
          ValueError: a damaged file (naming the field, what was expected and what was found),
            a size or shape that does not match, a file that is not a saved state.

        Example:
          >>> import tempfile, os
          >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
          ...                      window_size=1, step_interval=1)
          >>> p = os.path.join(tempfile.mkdtemp(), "eplb.npz")
          >>> s.save(p); EplbState.load(p, like=s).num_experts
          2
        """
        from jeplb._src import checkpoint

        return checkpoint.load(
            cls,
            path,
            like=like,
            num_layers=num_layers,
            num_experts=num_experts,
            num_devices=num_devices,
            num_redundant_experts=num_redundant_experts,
            window_size=window_size,
        )


def _is_static(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get("static"))


def static_fields() -> tuple[str, ...]:
    """Names of the static (configuration) fields of `EplbState`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(EplbState) if _is_static(f))


def array_fields() -> tuple[str, ...]:
    """Names of the array fields of `EplbState`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(EplbState) if not _is_static(f))


def _check_sum(pass_load: jax.Array, load: jax.Array, layer: Any) -> None:
    """Eagerly: raises when adding ``load`` to ``pass_load`` (row ``layer``) would pass 2^31 - 1."""
    before = np.asarray(pass_load, np.int64)
    if layer is not None:
        before = before[int(np.asarray(layer))]
    total = before + np.asarray(load, np.int64)
    over = total > INT32_MAX
    if over.any():
        where = tuple(int(i) for i in np.argwhere(over)[0])
        row = () if layer is None else (int(np.asarray(layer)),)
        raise ValueError(
            f"load{list(where)} = {int(np.asarray(load)[where])}: adding it to "
            f"state.pass_load{list(row + where)} = {int(before[where])} gives {int(total[where])}, "
            f"past the int32 maximum 2^31 - 1; call jeplb.eplb_step more often (it moves the "
            f"pass into the window and resets pass_load)"
        )

"""`EplbConfig`: every static option of EPLB in one frozen object, made of four parts.

* ``policy``: the placement policy and its options (`jeplb.DeepSeekPolicy` by default; any
  policy of `jeplb._src.policy.registry.POLICIES`);
* ``transfer``: how weights move (`jeplb.TransferConfig`: the expert axis, chunk rows, row mover,
  staging passes, layout, devices per node);
* ``schedule``: when (`ScheduleConfig`: the load window, the rebalance interval, progressive
  layers per step, logging);
* ``dispatch``: how `jeplb.dispatch` picks a replica for each token (`DispatchConfig`).

Each part checks its own values when built; `EplbConfig.check_sizes` checks what needs the
model's sizes (L, E, P, D) once, when a state is built. The configuration is static: it sits in
`jeplb.EplbState` as one static field (a change of configuration is a new compilation, a change
of values is not), the way flax's ``TrainState`` keeps its ``apply_fn``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jeplb._src.policy import registry
from jeplb._src.policy.api import DeepSeekPolicy
from jeplb._src.policy.base import Policy
from jeplb._src.transfer.config import TransferConfig
from jeplb._src.validate import check_choice, check_fraction, check_int

__all__ = ["REPLICA_CHOICES", "DispatchConfig", "EplbConfig", "ScheduleConfig"]

# How `jeplb.dispatch` picks one of an expert's replicas for a (token, k) pair.
REPLICA_CHOICES = ("hash", "local", "balanced")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """When EPLB records, plans and moves.

    Attributes:
      window_size: W, passes of load the window keeps (>= 1; vLLM's default 1000).
      step_interval: steps between rebalances (>= 1; vLLM's default 3000). With
        ``layers_per_step`` at least ceil(L / layers_per_step), so a rebalance ends before the
        next is planned.
      layers_per_step: progressive mode: move this many layers per step (1..L); None moves every
        layer in the step that plans the rebalance.
      log_interval: log balancedness every this many steps (0: never).
      skip_above: skip a due rebalance when the current placement's balancedness under the
        window's load is at least this (in [0, 1]; None: never skip on it). The policy does not
        run; nothing moves. SGLang's utilisation threshold.
      min_gain: skip a due rebalance when the planned placement's balancedness is not at least
        this much above the current one (in [0, 1]; None: never skip on it). The policy runs,
        nothing moves. Progressive mode skips the whole rebalance, never a part of one.

    Example:
      >>> ScheduleConfig(window_size=10, step_interval=100).layers_per_step is None
      True
    """

    window_size: int = 1000
    step_interval: int = 3000
    layers_per_step: int | None = None
    log_interval: int = 0
    skip_above: float | None = None
    min_gain: float | None = None

    def __post_init__(self):
        check_int("window_size", self.window_size, minimum=1)
        check_int("step_interval", self.step_interval, minimum=1)
        check_int("layers_per_step", self.layers_per_step, minimum=1, allow_none=True)
        check_int("log_interval", self.log_interval, minimum=0)
        check_fraction("skip_above", self.skip_above, allow_none=True)
        check_fraction("min_gain", self.min_gain, allow_none=True)

    def layers_moved(self, num_layers: int) -> int:
        """Layers moved per step: ``layers_per_step``, or L when it is None."""
        return num_layers if self.layers_per_step is None else self.layers_per_step


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How `jeplb.dispatch` spreads an expert's tokens over its replicas.

    Attributes:
      replica_choice: ``"hash"`` (vLLM's: a hash of the token's index modulo the replica count,
        even in expectation), ``"local"`` (a replica on the token's own device when the expert
        has one there, else the hash) or ``"balanced"`` (each batch's pairs of an expert split
        floor / ceil over its replicas, each expert's remainders starting at another replica:
        every device gets the placement's even split of the batch, to within the remainders).
        See docs/concepts.md.

    Example:
      >>> DispatchConfig(replica_choice="balanced").replica_choice
      'balanced'
    """

    replica_choice: str = "hash"

    def __post_init__(self):
        check_choice("replica_choice", self.replica_choice, REPLICA_CHOICES)


_PARTS = {
    "policy": Policy,
    "transfer": TransferConfig,
    "schedule": ScheduleConfig,
    "dispatch": DispatchConfig,
}
# Parts a saved configuration may lack (files written before the part existed): their defaults.
_OPTIONAL_PARTS = ("dispatch",)


def _option_names(part: Any) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(part))


@dataclasses.dataclass(frozen=True)
class EplbConfig:
    """The static configuration of EPLB: policy, transfer, schedule and dispatch (frozen, hashable).

    Build it from its parts, or with `EplbConfig.create` from option names alone; change it with
    `EplbConfig.replace`. `jeplb.EplbState` carries it (``state.config``) and every entry point
    reads its options from there.

    Attributes:
      policy: the placement policy (`jeplb.DeepSeekPolicy`, `jeplb.SnakePolicy`, ...).
      transfer: the transfer options (`jeplb.TransferConfig`).
      schedule: the schedule (`jeplb.ScheduleConfig`).
      dispatch: the replica choice of `jeplb.dispatch` (`jeplb.DispatchConfig`).

    Example:
      >>> cfg = EplbConfig.create(window_size=10, step_interval=50, num_groups=4, chunk_rows=2)
      >>> cfg.schedule.window_size, cfg.policy.num_groups, cfg.transfer.chunk_rows
      (10, 4, 2)
      >>> cfg.replace(policy="snake").policy.name
      'snake'
    """

    policy: Policy = dataclasses.field(default_factory=DeepSeekPolicy)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    dispatch: DispatchConfig = dataclasses.field(default_factory=DispatchConfig)

    def __post_init__(self):
        object.__setattr__(self, "policy", registry.as_policy(self.policy))
        for name in ("transfer", "schedule", "dispatch"):
            value = getattr(self, name)
            if not isinstance(value, _PARTS[name]):
                raise TypeError(
                    f"{name}: expected a {_PARTS[name].__name__}, got {type(value).__name__} "
                    f"{value!r}"
                )

    @classmethod
    def create(cls, config: EplbConfig | None = None, *, where="EplbConfig.create", **options):
        """A configuration from option names, each routed to the part that has it.

        Args:
          config: the configuration to start from (default: all defaults).
          where: the caller's name, for the unknown-option error.
          **options: ``policy`` (a policy object or a registry name), ``transfer`` /
            ``schedule`` / ``dispatch`` (whole parts), or any option of a part by its own name:
            the policy's (``num_groups``, ``num_nodes``, ``refine`` for DeepSeek's),
            `TransferConfig`'s (``axis_name``, ``chunk_rows``, ``row_impl``, ...),
            `ScheduleConfig`'s (``window_size``, ``step_interval``, ``layers_per_step``,
            ``log_interval``) or `DispatchConfig`'s (``replica_choice``).

        Raises:
          TypeError: an option no part has (named, with the valid names); a bad value (from the
            part's own check).
        """
        config = cls() if config is None else config
        if not isinstance(config, EplbConfig):
            raise TypeError(f"config: expected an EplbConfig, got {type(config).__name__}")
        whole = {k: options.pop(k) for k in tuple(options) if k in _PARTS}
        if "policy" in whole:
            whole["policy"] = registry.as_policy(whole["policy"])
        config = dataclasses.replace(config, **whole)
        changes: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
        for key, value in options.items():
            part = next((p for p in _PARTS if key in _option_names(getattr(config, p))), None)
            if part is None:
                valid = sorted(n for p in _PARTS for n in _option_names(getattr(config, p)))
                raise TypeError(
                    f"{where}() got an unexpected keyword argument {key!r}; the options are "
                    f"{', '.join(valid)}, or whole parts policy=, transfer=, schedule=, dispatch="
                )
            changes[part][key] = value
        parts = {
            p: dataclasses.replace(getattr(config, p), **changes[p]) for p in _PARTS if changes[p]
        }
        return dataclasses.replace(config, **parts)

    def replace(self, **options) -> EplbConfig:
        """A copy with whole parts or single options replaced (see `EplbConfig.create`).

        Example:
          >>> EplbConfig().replace(chunk_rows=4).transfer.chunk_rows
          4
        """
        return EplbConfig.create(self, where="EplbConfig.replace", **options)

    def check_sizes(
        self, *, num_layers: int, num_experts: int, num_slots: int, num_devices: int
    ) -> None:
        """Checks a model's sizes (L layers, E experts, P slots, D devices) against each other and
        the options: P divisible by D first, then the schedule, the transfer, the policy.

        Raises:
          ValueError: naming the option, what was expected and what arrived.
        """
        if num_slots % num_devices:
            raise ValueError(
                f"num_devices: P = {num_slots} slots per layer (num_experts {num_experts} + "
                f"num_redundant_experts {num_slots - num_experts}) is not divisible by "
                f"num_devices = {num_devices}; every device must hold P // D slots"
            )
        schedule, transfer = self.schedule, self.transfer
        if schedule.layers_per_step is not None:
            if schedule.layers_per_step > num_layers:
                raise ValueError(
                    f"layers_per_step: expected at most num_layers = {num_layers}, got "
                    f"{schedule.layers_per_step}"
                )
            steps = -(-num_layers // schedule.layers_per_step)
            if schedule.step_interval < steps:
                raise ValueError(
                    f"step_interval: a progressive rebalance of {num_layers} layers at "
                    f"layers_per_step = {schedule.layers_per_step} takes {steps} steps, so "
                    f"step_interval must be >= {steps}; got {schedule.step_interval}"
                )
        transfer.check_devices(num_devices)
        self.policy.check(num_experts=num_experts, num_slots=num_slots, num_devices=num_devices)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (what a saved state records); `EplbConfig.from_json` reads them."""
        transfer = dataclasses.asdict(self.transfer)
        if isinstance(transfer["axis_name"], tuple):
            transfer["axis_name"] = list(transfer["axis_name"])
        return {
            "policy": registry.encode(self.policy),
            "transfer": transfer,
            "schedule": dataclasses.asdict(self.schedule),
            "dispatch": dataclasses.asdict(self.dispatch),
        }

    @classmethod
    def from_json(cls, data: Any) -> EplbConfig:
        """The configuration `EplbConfig.to_json` wrote; every value checked by its part. A
        missing ``dispatch`` part (files written before it existed) takes its defaults.

        Raises:
          TypeError, ValueError: a missing part, an unknown option, a bad value (named).
        """
        if not isinstance(data, dict):
            raise TypeError(f"config: expected an object of parts, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_PARTS))
        if unknown:
            raise ValueError(f"config.{unknown[0]}: not a part of the configuration")
        missing = [p for p in _PARTS if p not in data and p not in _OPTIONAL_PARTS]
        if missing:
            raise ValueError(f"config.{missing[0]}: missing")
        parts = {}
        for name, kind in (
            ("transfer", TransferConfig),
            ("schedule", ScheduleConfig),
            ("dispatch", DispatchConfig),
        ):
            if name not in data:  # an optional part (checked above)
                continue
            values = data[name]
            if not isinstance(values, dict):
                raise TypeError(f"config.{name}: expected an object, got {values!r}")
            extra = sorted(set(values) - set(_option_names(kind)))
            if extra:
                raise ValueError(f"config.{name}.{extra[0]}: not an option of {kind.__name__}")
            parts[name] = kind(**values)
        return cls(policy=registry.decode(data["policy"]), **parts)

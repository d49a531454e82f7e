"""What a placement policy is: the protocol every policy implements.

A policy is a frozen, hashable dataclass whose fields are its options (so it can sit in the static
`jeplb.EplbConfig` and key a compilation), with a registry name and two methods:

* ``check(num_experts=, num_slots=, num_devices=)``: raises a ValueError / TypeError naming the
  option when the policy cannot place E experts on P slots over D devices (run once, when a state
  is built, never inside a program);
* ``place(load, num_slots=, num_devices=, old_phy2log=)``: the placement, in jnp, jit-able, the
  same on every device and process for the same inputs.

Adding a policy: one module defining such a class, plus one line in `registry.POLICIES`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import jax

__all__ = ["Policy"]


@runtime_checkable
class Policy(Protocol):
    """A placement policy (see the module docstring).

    Attributes:
      name: the registry name (class attribute; what saved files record).
    """

    name: ClassVar[str]

    def check(self, *, num_experts: int, num_slots: int, num_devices: int) -> None:
        """Raises (naming the option) when the policy cannot place E experts on P slots over D
        devices with its options."""
        ...

    def place(
        self,
        load: jax.Array,
        *,
        num_slots: int,
        num_devices: int,
        old_phy2log: jax.Array | None,
    ) -> jax.Array:
        """The new placement.

        Args:
          load: float32[L, E] the load of each logical expert (>= 0, finite).
          num_slots: P (static).
          num_devices: D (static); slot p lives on device p // (P // D).
          old_phy2log: int32[L, P] the current placement (every expert present), or None.

        Returns:
          int32[L, P]: the expert of each slot, every expert in at least one slot of each layer.
        """
        ...

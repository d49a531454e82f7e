"""A small placement policy: greedy replication, then replicas dealt to devices in snake order.

Each of the P - E redundant slots goes, one at a time, to the expert whose load per replica is the
largest (the first such expert on a tie). The P replicas, sorted by load per replica (descending,
stable), are then dealt over the D devices in rounds, left to right and right to left in turn
(device i, then D - 1 - i), so every device gets P // D of them. It is not migration-aware: the
placement depends on the load alone. Cheaper to plan than DeepSeek's policy and usually a little
less balanced; see docs/policy.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["SnakePolicy"]


def _replica_counts(load: jax.Array, num_slots: int) -> jax.Array:
    """int32[L, E] replicas per expert: one each, then the redundant slots one at a time to the
    expert with the largest load per replica."""
    num_layers, num_experts = load.shape
    layers = jnp.arange(num_layers)

    def add(_, count):
        heaviest = jnp.argmax(load / count, axis=1)
        return count.at[layers, heaviest].add(1)

    count = jnp.ones((num_layers, num_experts), jnp.int32)
    return lax.fori_loop(0, num_slots - num_experts, add, count)


@dataclasses.dataclass(frozen=True)
class SnakePolicy:
    """Greedy replication and a snake deal of replicas over devices (no options).

    Example:
      >>> import jax.numpy as jnp
      >>> SnakePolicy().place(jnp.array([[6.0, 1.0, 1.0]]), num_slots=4, num_devices=2,
      ...                     old_phy2log=None).tolist()
      [[0, 2, 0, 1]]
    """

    name: ClassVar[str] = "snake"

    def check(self, *, num_experts: int, num_slots: int, num_devices: int) -> None:
        """Any E <= P with D dividing P fits (the state checks those)."""

    def place(self, load, *, num_slots, num_devices, old_phy2log):
        """The placement: int32[L, P] (see `jeplb._src.policy.base.Policy.place`)."""
        del old_phy2log  # not migration-aware
        num_layers = load.shape[0]
        count = _replica_counts(load, num_slots)
        ends = jnp.cumsum(count, axis=1)  # [L, E]
        ranks = jnp.arange(num_slots, dtype=jnp.int32)
        expert = jax.vmap(lambda e: jnp.searchsorted(e, ranks, side="right"))(ends)  # [L, P]
        per_replica = jnp.take_along_axis(load / count, expert, axis=1)
        order = jnp.argsort(-per_replica, axis=1, stable=True)
        expert = jnp.take_along_axis(expert, order, axis=1).astype(jnp.int32)
        rounds, column = ranks // num_devices, ranks % num_devices
        device = jnp.where(rounds % 2 == 0, column, num_devices - 1 - column)
        slot = device * (num_slots // num_devices) + rounds
        rows = jnp.arange(num_layers)[:, None]
        return jnp.zeros_like(expert).at[rows, slot[None, :]].set(expert)

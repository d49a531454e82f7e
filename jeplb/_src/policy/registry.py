"""The placement policies by name: what `jeplb.EplbConfig` accepts and saved files record.

Adding a policy: a module with a class that follows `base.Policy`, plus one line in `POLICIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jeplb._src.policy.api import DeepSeekPolicy
from jeplb._src.policy.base import Policy
from jeplb._src.policy.snake import SnakePolicy

__all__ = ["POLICIES", "as_policy", "decode", "encode"]

POLICIES: dict[str, type] = {
    DeepSeekPolicy.name: DeepSeekPolicy,
    SnakePolicy.name: SnakePolicy,
}


def as_policy(value: Any, *, name: str = "policy") -> Policy:
    """A policy from a registry name (its default options) or a policy object.

    Raises:
      ValueError: an unknown name. TypeError: neither a name nor a policy.
    """
    if isinstance(value, str):
        if value not in POLICIES:
            raise ValueError(f"{name}: expected one of {tuple(POLICIES)}, got {value!r}")
        return POLICIES[value]()
    if not isinstance(value, Policy) or not dataclasses.is_dataclass(value):
        raise TypeError(
            f"{name}: expected a policy name {tuple(POLICIES)} or a policy object (a frozen "
            f"dataclass with name, check and place), got {type(value).__name__} {value!r}"
        )
    return value


def encode(policy: Policy) -> dict[str, Any]:
    """The policy as plain JSON values: ``{"name": ..., option: value, ...}``."""
    return {"name": policy.name, **dataclasses.asdict(policy)}


def decode(data: Any) -> Policy:
    """The policy `encode` wrote (options checked by the policy's constructor).

    Raises:
      TypeError, ValueError: not an object with a known name, or a bad option (named).
    """
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise TypeError(f"policy: expected an object with a 'name', got {data!r}")
    options = {k: v for k, v in data.items() if k != "name"}
    cls = type(as_policy(data["name"]))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"policy.{unknown[0]}: not an option of policy {data['name']!r}")
    return cls(**options)

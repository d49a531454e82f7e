"""Argument checks of `rebalance_experts`: every message names the argument, what was expected and
what arrived; all raised before anything is computed."""

from __future__ import annotations

from typing import Any

from jeplb._src.checks import check_load
from jeplb._src.maps import check_phy2log
from jeplb._src.validate import check_int

__all__ = ["check_args", "check_groups"]


def _as_count(value: Any, name: str) -> int:
    check_int(name, value, minimum=1)
    return int(value)


def _check_counts(
    num_log: int, num_slots: Any, num_groups: Any, num_nodes: Any, num_devices: Any
) -> tuple[int, int, int, int]:
    """The four counts as Python ints, consistent with each other and with E."""
    num_slots = _as_count(num_slots, "num_slots")
    num_groups = _as_count(num_groups, "num_groups")
    num_nodes = _as_count(num_nodes, "num_nodes")
    num_devices = _as_count(num_devices, "num_devices")
    if num_slots < num_log:
        raise ValueError(
            f"num_slots: expected at least one slot per logical expert (>= E = {num_log}), "
            f"got {num_slots}"
        )
    if num_slots % num_devices:
        raise ValueError(
            f"num_slots: expected a multiple of num_devices = {num_devices} (every device holds "
            f"the same number of slots), got {num_slots}"
        )
    check_groups(num_log, num_groups, num_nodes, num_devices)
    return num_slots, num_groups, num_nodes, num_devices


def check_groups(num_log: int, num_groups: int, num_nodes: int, num_devices: int) -> None:
    """The hierarchical policy's rules (used when ``num_groups % num_nodes == 0``): groups divide
    E and nodes divide D."""
    if num_groups % num_nodes:  # global policy: no constraint
        return
    if num_log % num_groups:
        raise ValueError(
            f"num_groups: expected a divisor of the E = {num_log} logical experts (groups "
            f"of E / num_groups consecutive experts), got {num_groups}"
        )
    if num_devices % num_nodes:
        raise ValueError(
            f"num_devices: expected a multiple of num_nodes = {num_nodes} (the hierarchical "
            f"policy, used because num_groups % num_nodes == 0, puts the same number of "
            f"devices on every node), got {num_devices}"
        )


def check_args(
    load: Any,
    num_slots: Any,
    num_groups: Any,
    num_nodes: Any,
    num_devices: Any,
    old_phy2log: Any,
    *,
    load_shape: tuple[int, int] | None = None,
    load_shape_from: str = "",
) -> tuple[Any, Any, tuple[int, int, int, int]]:
    """Checks every argument of `rebalance_experts` (``load_shape``: the [L, E] its caller
    implies); returns ``(load, old_phy2log, counts)``: lists as numpy arrays, the four counts as
    Python ints."""
    load = check_load(load, shape=load_shape, shape_from=load_shape_from)
    num_layers, num_log = load.shape
    counts = _check_counts(num_log, num_slots, num_groups, num_nodes, num_devices)
    if old_phy2log is not None:
        old_phy2log = check_phy2log(
            old_phy2log,
            name="old_phy2log",
            num_experts=num_log,
            num_devices=counts[3],
            require_all=True,
            shape=(num_layers, counts[0]),
            shape_from="load's layers x num_slots",
        )
    return load, old_phy2log, counts

"""`TransferConfig`: every static option of the weight transfer, in one frozen object.

The options decide the compiled program (its loops, collectives and buffers), never the plan, so
they are static: two calls with equal configs and equal shapes share one compilation. The object
is hashable and travels whole from the public functions to the engine, the stages and the row
kernels; nothing below reads an option from anywhere else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jeplb._src.transfer.rows import ROW_IMPLS
from jeplb._src.validate import check_axis_name, check_choice, check_int

__all__ = ["ROW_IMPLS", "TransferConfig", "axis_tuple"]


def axis_tuple(axis_name: str | tuple[str, ...]) -> tuple[str, ...]:
    """The expert axis as a tuple of mesh axis names (a str is one axis)."""
    if isinstance(axis_name, str):
        return (axis_name,)
    if not isinstance(axis_name, tuple | list) or not all(isinstance(a, str) for a in axis_name):
        raise TypeError(
            f"axis_name: expected a mesh axis name or a tuple of them, got {axis_name!r}"
        )
    return tuple(axis_name)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Static options of the weight transfer, checked when built.

    Pass one as ``config=`` to `jeplb.rearrange_expert_weights`, `jeplb.transfer_layer`,
    `jeplb.move_to_buffer` or `jeplb.move_from_buffer`; those functions also take any field as a
    keyword, which overrides the config's value (`merged`).

    Attributes:
      axis_name: the expert-parallel mesh axis the slot dim is sharded over, or a tuple of axes
        (D is the product of their sizes; slot p lives on the p // N_local-th device in the
        order of the tuple, as in a ``PartitionSpec`` entry).
      chunk_rows: C, rows per collective chunk (1 wastes no bandwidth on padding; larger chunks
        amortise per-collective latency for small rows).
      row_impl: how rows move inside a device: ``auto`` (a Pallas kernel on GPUs for rows of at
        least 64 KiB, else a loop of dynamic_update_slice), ``loop``, ``pallas`` or ``scatter``.
      staging_passes: on D > 1 devices, rows are staged and committed in this many blocks of
        columns (None: the fewest that keep the staging memory below one layer of the device's
        local weights).
      layer_axis: the layer dim of a leaf (0 or 1; the other of the two is the slot dim). For
        one-layer calls (`jeplb.transfer_layer`) it is ignored.
      slot_axis: the slot dim of a leaf (1 or 0; one-layer calls: 0).
      devices_per_node: devices of one node (host) on the expert axis, in axis order: devices
        ``[k * devices_per_node, (k + 1) * devices_per_node)`` share node k (fast links). Senders
        are then chosen on the receiver's node where a replica is there (as SGLang does), and
        the report counts the rows that cross nodes. None: one flat network. Must divide D.

    Example:
      >>> import jeplb
      >>> config = jeplb.TransferConfig(chunk_rows=4, row_impl="loop")
      >>> config.replace(chunk_rows=2).chunk_rows
      2
      >>> jeplb.TransferConfig.merged(config, axis_name="expert").axis_name
      'expert'
    """

    axis_name: str | tuple[str, ...] = "ep"
    chunk_rows: int = 1
    row_impl: str = "auto"
    staging_passes: int | None = None
    layer_axis: int = 0
    slot_axis: int = 1
    devices_per_node: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "axis_name", check_axis_name("axis_name", self.axis_name))
        check_int("chunk_rows", self.chunk_rows, minimum=1)
        check_int("staging_passes", self.staging_passes, minimum=1, allow_none=True)
        check_int("devices_per_node", self.devices_per_node, minimum=1, allow_none=True)
        check_choice("row_impl", self.row_impl, ROW_IMPLS)
        for name in ("layer_axis", "slot_axis"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in (0, 1):
                raise ValueError(
                    f"{name}: expected 0 or 1 (leaves are [L, P, ...] or [P, L, ...]), got "
                    f"{value!r}"
                )
        if self.layer_axis == self.slot_axis:
            raise ValueError(
                f"layer_axis and slot_axis: expected two different dims, got both {self.slot_axis}"
            )

    @property
    def axes(self) -> tuple[str, ...]:
        """``axis_name`` as a tuple."""
        return axis_tuple(self.axis_name)

    @property
    def slot_major(self) -> bool:
        """Leaves are [P, L, ...] (the slot dim first)."""
        return self.slot_axis == 0

    def replace(self, **changes) -> TransferConfig:
        """A copy with the given options replaced (checked again)."""
        return dataclasses.replace(self, **changes)

    def check_devices(self, num_devices: int) -> None:
        """Checks the options against D, the devices on the expert axis.

        Raises:
          ValueError: ``devices_per_node`` does not divide D.
        """
        if self.devices_per_node is not None and num_devices % self.devices_per_node:
            raise ValueError(
                f"devices_per_node: expected a divisor of the {num_devices} devices on the expert "
                f"axis {self.axis_name!r}, got {self.devices_per_node}"
            )

    @classmethod
    def merged(
        cls,
        config: TransferConfig | None = None,
        where: str = "TransferConfig.merged",
        /,
        **options: Any,
    ) -> TransferConfig:
        """``config`` (default: the defaults) with ``options`` (field names) replacing its values.

        The entry points' one way of taking options: ``f(..., config=c, chunk_rows=4)``.

        Raises:
          TypeError: ``config`` is not a TransferConfig, or an option is not a field (named,
            with the valid ones listed; ``where``, positional, names the function called).
        """
        if config is None:
            config = cls()
        elif not isinstance(config, cls):
            raise TypeError(
                f"config: expected a jeplb.TransferConfig or None, got {type(config).__name__}"
            )
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in fields]
        if unknown:
            raise TypeError(
                f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"the transfer's options are {', '.join(fields)}"
            )
        return dataclasses.replace(config, **options) if options else config

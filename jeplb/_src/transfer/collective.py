"""The cross-device stage behind one interface: how a layer's rows reach the devices that
receive them.

A `Collective` receives what the plan computed on every device (its `plan.TransferMetadata` and
its `stages.Rounds`) and the staging buffers already holding the local copies, and fills in the
rows that come from other devices. The engine picks one implementation once per setup
(`pick`, at `engine.Engine`'s construction) and the stages call it; no loop compares names.

Adding a collective: one module with a class implementing `Collective` (see `rotation`, the
ppermute rounds), plus one line in `REGISTRY`, ahead of the ones it should win over on the
platforms it ``supports``. An exact-bytes stage (`lax.ragged_all_to_all` on GPUs and TPUs) would
consume `plan.ragged_tables`.
"""

from __future__ import annotations

from typing import Protocol

import jax

from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rotation
from jeplb._src.transfer.layout import RowSpace
from jeplb._src.transfer.stages import Impls, Rounds

__all__ = ["REGISTRY", "Collective", "pick"]


class Collective(Protocol):
    """What a cross-device stage of one layer's rows provides to the engine and the stages.

    Implementations are frozen, hashable values (they are part of the engine's static setup).
    """

    name: str

    def supports(self, platform: str) -> bool:
        """Whether it runs on ``platform`` (``cpu``, ``gpu``, ``tpu``)."""
        ...

    def exchange(
        self,
        spaces: tuple[RowSpace, ...],
        bufs: tuple[jax.Array, ...],
        meta: plan_lib.TransferMetadata,
        rounds: Rounds,
        *,
        axes: tuple[str, ...],
        num_devices: int,
        chunk_rows: int,
        impls: tuple[Impls, ...],
    ) -> tuple[jax.Array, ...]:
        """Fills the staging buffers ([N_local, w] each, local copies already in) with the rows
        this device receives from other devices, reading them from ``spaces`` on the senders.

        Called inside `jax.shard_map` over ``axes`` on D = ``num_devices`` > 1 devices. Every
        trip count and branch must come from the replicated plan (the same on every device);
        the memory used must depend on the shapes only (``chunk_rows``: C, rows per chunk).
        Rows move with ``impls`` (`rows.Mover`s) and arrive bit for bit.
        """
        ...


# Tried in order; the first that supports the platform is used.
REGISTRY: tuple[Collective, ...] = (rotation.ROTATION,)


def pick(platform: str) -> Collective:
    """The collective the engine uses on ``platform``."""
    return next(c for c in REGISTRY if c.supports(platform))

"""Placement files: just the expert placement (``phy2log`` [L, P], E, D), apart from the load.

A placement file is what a deployment starts from (SGLang's ``--init-expert-location``, vLLM's
expert map file): the slot of every expert replica, measured and planned in an earlier run or
offline (``jeplb plan``), without the recorded load or the schedule a saved `jeplb.EplbState`
carries.

Format ``"jeplb.Placement"`` version 1, the same fields in both encodings:

* ``.json``: ``{"format": "jeplb.Placement", "version": 1, "num_layers": L, "num_experts": E,
  "num_slots": P, "num_devices": D, "arrays": {"phy2log": [[...], ...]}}``;
* ``.npz``: the array ``phy2log`` and the same header (without ``arrays``) as a JSON string in
  ``__header__``.

Writing is atomic and reading checks everything, with the helpers of the saved-state file
(`jeplb._src.checkpoint`). Its map checks are `maps.check_phy2log`, as everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jeplb._src import checkpoint, checks
from jeplb._src.maps import check_phy2log
from jeplb._src.validate import check_int

__all__ = ["FORMAT", "VERSION", "Placement", "read_placement", "write_placement"]

FORMAT = "jeplb.Placement"
VERSION = 1
_SIZES = ("num_layers", "num_experts", "num_slots", "num_devices")


def _check_map(phy2log: np.ndarray, num_experts: int, num_devices: int, name: str) -> None:
    """The concrete checks of a placement (`maps.check_phy2log`, the library's one map check):
    P divisible by D, ids in [-1, E), every expert in every layer."""
    check_phy2log(
        phy2log, name=name, num_experts=num_experts, num_devices=num_devices, require_all=True
    )


def _as_map(phy2log: Any, name: str) -> np.ndarray:
    """A concrete int[L, P] map as int32 numpy (values past int32 refused, not cast)."""
    if not checks.is_concrete(phy2log):
        raise TypeError(f"{name}: expected a concrete map (a file holds values), got a tracer")
    if isinstance(phy2log, list | tuple):
        phy2log = np.asarray(phy2log)
    if not hasattr(phy2log, "shape") or not hasattr(phy2log, "dtype"):
        raise TypeError(f"{name}: expected an int array [L, P], got {type(phy2log).__name__}")
    if not np.issubdtype(np.dtype(phy2log.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {phy2log.dtype}")
    if phy2log.ndim != 2 or 0 in phy2log.shape:
        raise ValueError(
            f"{name}: expected a map [L, P] with L >= 1 and P >= 1, got shape "
            f"{tuple(phy2log.shape)}"
        )
    return checkpoint._int32_array(name, np.asarray(jax.device_get(phy2log)))


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """An expert placement on its own: which logical expert each physical slot holds.

    Built checked (P divisible by D, ids in [-1, E), every expert in every layer). Read one from
    a file with `jeplb.read_placement`, write one with `jeplb.write_placement`; take the current
    placement of a running state with `Placement.of_state`; start a state from one with
    ``EplbState.from_placement(p.phy2log, num_experts=p.num_experts, num_devices=p.num_devices)``.

    Attributes:
      phy2log: int32[L, P] numpy: the logical expert of each slot (-1: empty). Slot p lives on
        device p // (P // D).
      num_experts: E, logical experts per layer.
      num_devices: D, devices the slots are spread over.

    Example:
      >>> p = Placement([[0, 1, 2, 0]], num_experts=3, num_devices=2)
      >>> p.num_layers, p.num_slots, p.logcnt().tolist()
      (1, 4, [[2, 1, 1]])
    """

    phy2log: np.ndarray
    num_experts: int
    num_devices: int

    def __post_init__(self):
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("num_devices", self.num_devices, minimum=1)
        phy2log = _as_map(self.phy2log, "phy2log")
        phy2log.setflags(write=False)
        _check_map(phy2log, int(self.num_experts), int(self.num_devices), "phy2log")
        object.__setattr__(self, "phy2log", phy2log)
        object.__setattr__(self, "num_experts", int(self.num_experts))
        object.__setattr__(self, "num_devices", int(self.num_devices))

    @property
    def num_layers(self) -> int:
        """L, MoE layers."""
        return self.phy2log.shape[0]

    @property
    def num_slots(self) -> int:
        """P, physical slots per layer."""
        return self.phy2log.shape[1]

    def logcnt(self) -> np.ndarray:
        """int32[L, E]: replicas of each logical expert."""
        rows = [np.bincount(r[r >= 0], minlength=self.num_experts) for r in self.phy2log]
        return np.stack(rows).astype(np.int32)

    def __repr__(self) -> str:
        return (
            f"Placement(L={self.num_layers}, E={self.num_experts}, P={self.num_slots}, "
            f"D={self.num_devices})"
        )

    @classmethod
    def of_state(cls, state: Any) -> Placement:
        """The current placement of a `jeplb.EplbState`: the maps its weights are in now.

        During a progressive rebalance that is the mix of moved and not yet moved layers that
        ``state.phy2log`` describes. Reads ``state.phy2log`` from the device (a host sync).

        Example:
          >>> import jeplb
          >>> s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=2,
          ...                            num_redundant_experts=2, window_size=1, step_interval=1)
          >>> Placement.of_state(s).phy2log.tolist()
          [[0, 1, 0, 1]]
        """
        from jeplb._src.state import EplbState  # the state module does not import this one

        if not isinstance(state, EplbState):
            raise TypeError(f"state: expected an EplbState, got {type(state).__name__}")
        return cls(
            np.asarray(jax.device_get(state.phy2log)),
            num_experts=state.num_experts,
            num_devices=state.num_devices,
        )

    def for_devices(self, num_devices: int, *, num_slots: int | None = None) -> Placement:
        """This placement converted to another device count (and optionally slot count).

        The file holds no load, so the conversion keeps what it implies: each expert's replica
        count (a policy gives replicas in proportion to load). `jeplb.rebalance_experts` (the
        global policy) runs on those counts as the load, onto ``num_slots`` slots over
        ``num_devices`` devices: with the same P every expert keeps its number of replicas (empty
        slots get filled) and the replicas are spread evenly over the new devices. Plan from a measured load
        (``jeplb plan``) when one is at hand.

        Args:
          num_devices: the new D; ``num_slots`` must be divisible by it.
          num_slots: the new P (default: this placement's), at least E.

        Returns:
          A new `Placement` over ``num_devices`` devices.

        Example:
          >>> p = Placement([[0, 1, 2, 3, 0, 0]], num_experts=4, num_devices=3)
          >>> q = p.for_devices(2)
          >>> q.num_devices, q.logcnt().tolist()
          (2, [[3, 1, 1, 1]])
        """
        from jeplb._src.policy.api import rebalance_experts

        check_int("num_devices", num_devices, minimum=1)
        num_slots = self.num_slots if num_slots is None else num_slots
        check_int("num_slots", num_slots, minimum=self.num_experts)
        if num_slots % num_devices:
            raise ValueError(
                f"num_devices: P = {num_slots} slots per layer is not divisible by "
                f"num_devices = {num_devices}; pass num_slots= a multiple of it"
            )
        load = self.logcnt().astype(np.float32)
        phy2log, _, _ = rebalance_experts(load, num_slots, 1, 1, num_devices)
        return Placement(np.asarray(phy2log), num_experts=self.num_experts, num_devices=num_devices)


def _placement_of(placement: Any, num_experts: Any, num_devices: Any) -> Placement:
    """`write_placement`'s argument as a `Placement`; sizes given with a state or a placement
    must agree with it."""
    from jeplb._src.state import EplbState

    if isinstance(placement, EplbState):
        placement = Placement.of_state(placement)
    if not isinstance(placement, Placement):
        if num_experts is None or num_devices is None:
            raise TypeError(
                "write_placement: a phy2log array needs num_experts= and num_devices= (a "
                "Placement or an EplbState carries them)"
            )
        return Placement(placement, num_experts=num_experts, num_devices=num_devices)
    for name, want in (("num_experts", num_experts), ("num_devices", num_devices)):
        if want is not None and want != getattr(placement, name):
            raise ValueError(
                f"{name}: expected {getattr(placement, name)} (the placement's), got {want}"
            )
    return placement


def write_placement(
    path: str | os.PathLike,
    placement: Any,
    *,
    num_experts: int | None = None,
    num_devices: int | None = None,
) -> Placement:
    """Writes an expert placement, and nothing else, to ``path`` (``.json`` or ``.npz``), atomically.

    The file is written to a temporary file in the same folder, flushed and renamed over
    ``path``: a reader sees the old file or the new one, never a part. Read it back with
    `jeplb.read_placement`; docs/concepts.md describes the format.

    Args:
      path: a file name ending in ``.json`` (readable, nested lists) or ``.npz`` (compact).
      placement: int[L, P] ``phy2log`` (numpy or jax, -1: empty slot), or a `jeplb.Placement`,
        or a `jeplb.EplbState` (its current placement: ``state.phy2log``, a host sync).
      num_experts: E; needed with an array, checked against a state or placement when given.
      num_devices: D; needed with an array (P must be divisible by it), checked likewise.

    Returns:
      The `jeplb.Placement` written.

    Raises:
      TypeError, ValueError: a bad argument or map, naming it, before anything is written.
      OSError: the write failed (``path`` unchanged).

    Example:
      >>> import os, tempfile, jeplb
      >>> path = os.path.join(tempfile.mkdtemp(), "placement.json")
      >>> write_placement(path, [[0, 1, 2, 0], [2, 1, 0, 1]], num_experts=3, num_devices=2)
      Placement(L=2, E=3, P=4, D=2)
      >>> s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                            window_size=1, step_interval=1)
      >>> write_placement(path, s).phy2log.tolist()  # a running state's placement
      [[0, 1]]
    """
    kind = checkpoint._kind(path, "path")
    placement = _placement_of(placement, num_experts, num_devices)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": placement.num_layers,
        "num_experts": placement.num_experts,
        "num_slots": placement.num_slots,
        "num_devices": placement.num_devices,
    }
    arrays = {"phy2log": np.asarray(placement.phy2log)}
    writer = checkpoint._write_json if kind == "json" else checkpoint._write_npz
    checkpoint._write_atomic(os.fspath(path), lambda f: writer(f, header, arrays))
    return placement


def read_placement(
    path: str | os.PathLike,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    num_devices: int | None = None,
) -> Placement:
    """Reads a placement written by `jeplb.write_placement`, checking it and the sizes expected.

    Checked: the header's sizes (ints >= 1, P divisible by D), ``phy2log``'s shape [L, P] against
    them, its values (int32, ids in [-1, E), every expert in every layer), and each size given
    here. A placement planned over another device count is refused with a ValueError that says
    so; convert it with `Placement.for_devices` (documented there) or plan again (``jeplb plan``).

    Start a state from it with ``jeplb.EplbState.from_placement(p.phy2log,
    num_experts=p.num_experts, num_devices=p.num_devices, ...)`` and lay the model's logical
    weights out for it with ``jeplb.place_experts(weights, p.phy2log, mesh=mesh)``.

    Args:
      path: a ``.json`` or ``.npz`` file from `jeplb.write_placement`.
      num_layers, num_experts, num_devices: sizes the file must have (each checked when given).

    Returns:
      The `jeplb.Placement`.

    Raises:
      ValueError: a damaged file, a file that is not a placement, or a size that does not
        match: naming the file, the field, what was expected and what was found.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "placement.npz")
      >>> _ = write_placement(path, [[0, 1, 2, 0]], num_experts=3, num_devices=2)
      >>> read_placement(path, num_experts=3).phy2log.tolist()
      [[0, 1, 2, 0]]
      >>> read_placement(path, num_devices=4)
      Traceback (most recent call last):
      ...
      ValueError: num_devices: expected 4, found 2 in '...placement.npz': the placement was planned over 2 devices; convert it with Placement.for_devices(4) or plan again (jeplb plan)
    """
    kind = checkpoint._kind(path, "path")
    where = os.fspath(path)
    header, raw = checkpoint._read_saved(path, kind, FORMAT)
    version = header.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"version: expected {VERSION}, found {version!r} in {where!r}")
    try:
        placement = _parse(header, raw)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"path: {where!r} is a damaged {FORMAT} file: {err}") from err
    wanted = {"num_layers": num_layers, "num_experts": num_experts, "num_devices": num_devices}
    for name, want in wanted.items():
        if want is None:
            continue
        check_int(name, want, minimum=1)
        found = getattr(placement, name)
        if want != found:
            hint = (
                f": the placement was planned over {found} devices; convert it with "
                f"Placement.for_devices({want}) or plan again (jeplb plan)"
                if name == "num_devices"
                else ""
            )
            raise ValueError(f"{name}: expected {want}, found {found} in {where!r}{hint}")
    return placement


def _parse(header: dict, raw: dict) -> Placement:
    """The checked placement of a file's header and arrays; raises naming the bad field."""
    for key in _SIZES:
        if key not in header:
            raise ValueError(f"{key}: missing from the header")
        check_int(key, header[key], minimum=1)
    if "phy2log" not in raw:
        raise ValueError("phy2log: missing from the file")
    sizes = {k: int(header[k]) for k in _SIZES}
    phy2log = checkpoint._int32_array("phy2log", raw["phy2log"])
    want = (sizes["num_layers"], sizes["num_slots"])
    if phy2log.shape != want:
        raise ValueError(
            f"phy2log: expected shape [L, P] = {want} (from the file's header), found "
            f"{phy2log.shape}"
        )
    return Placement(phy2log, num_experts=sizes["num_experts"], num_devices=sizes["num_devices"])

"""Map algebra: the logical-to-physical map and replica counts that a physical-to-logical map implies,
and the one check of a map argument (`check_phy2log`).

Letters: L MoE layers, E logical experts per layer, P physical slots per layer, R_max the width of
log2phy. ``phy2log`` int32[L, P] (-1: empty slot) is the source of truth; ``log2phy``
int32[L, E, R_max] (padded with -1) and ``logcnt`` int32[L, E] are derived from it here, so the three
can never disagree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.validate import check_int

__all__ = ["check_derived_maps", "check_phy2log", "maps_from_phy2log"]

_INT32_MAX = int(np.iinfo(np.int32).max)


def maps_from_phy2log(phy2log: jax.Array, num_experts: int, max_replicas: int):
    """The logical-to-physical map and replica counts that a physical-to-logical map implies.

    Replicas are listed in ascending slot order. Works on concrete and traced maps.

    Args:
      phy2log: int32[L, P] (or [P]) physical-to-logical map, -1 for empty slots; L >= 1, P >= 1.
      num_experts: E (>= 1).
      max_replicas: R_max (>= 1), width of the returned log2phy (replicas beyond it are dropped).

    Returns:
      ``(log2phy int32[L, E, R_max] padded with -1, logcnt int32[L, E])`` (no L for a [P] map).

    Raises:
      ValueError: a map with no layers or no slots, or a size below 1, naming the argument.

    Example:
      >>> import jax.numpy as jnp
      >>> log2phy, logcnt = maps_from_phy2log(jnp.array([0, 1, 0, -1]), 2, 3)
      >>> log2phy.tolist(), logcnt.tolist()
      ([[0, 2, -1], [1, -1, -1]], [2, 1])
    """
    for name, value in (("num_experts", num_experts), ("max_replicas", max_replicas)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    phy2log = jnp.asarray(phy2log, jnp.int32)
    if phy2log.ndim == 1:
        l2p, cnt = maps_from_phy2log(phy2log[None], num_experts, max_replicas)
        return l2p[0], cnt[0]
    if phy2log.ndim != 2 or 0 in phy2log.shape:
        raise ValueError(
            f"phy2log: expected a map [L, P] with L >= 1 layers and P >= 1 slots, got shape "
            f"{tuple(phy2log.shape)}"
        )
    return _maps(phy2log, num_experts, max_replicas)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _maps(phy2log: jax.Array, num_experts: int, max_replicas: int):
    """`maps_from_phy2log` on a checked int32[L, P] map: one compiled program per shape (eagerly
    the ops would each compile on their own, a second or more per new shape)."""
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


def check_phy2log(
    x: Any,
    *,
    name: str,
    ndim: int | None = 2,
    num_experts: int | None = None,
    num_devices: int | None = None,
    require_all: bool = False,
    old: Any = None,
    old_name: str = "old_phy2log",
    shape: tuple[int, ...] | None = None,
    shape_from: str = "",
    traced: bool = True,
) -> Any:
    """THE check of a physical-to-logical map argument; every public function that takes a map
    calls it once, at its boundary, so a bad map gets the same exception and words everywhere.

    Checks, in this order (the first problem found is raised):

    1. an array (a list or tuple is converted with numpy), else TypeError;
    2. an integer dtype, else TypeError (a float map, a list of strings);
    3. concrete, when ``traced`` is False, else TypeError;
    4. ``ndim`` dims (``[L, P]`` for 2, ``[P]`` for 1, either for None) and no empty dim;
    5. P divisible by ``num_devices`` (when given; D is checked to be an int >= 1);
    6. the ``shape`` the other arguments imply (``shape_from`` says which), or ``old``'s shape;
    7. with ``require_all`` and ``num_experts``: P >= E;
    8. concrete maps only: ids in [-1, E) (``num_experts``; [-1, 2^31 - 1) without it); with
       ``require_all`` every expert of [0, E) in some slot of every layer (E = the largest id + 1
       when ``num_experts`` is None); with ``old`` (a map already through this check) every
       expert of each layer in some slot of ``old``'s layer.

    Args:
      x: the map: int[L, P] (or int[P] with ``ndim=1``), -1 for empty slots.
      name: the argument's name, used in every message (``old_phy2log``).
      ndim: 2, 1, or None for either.
      num_experts: E, when known.
      num_devices: D, when known.
      require_all: every expert needs a slot in every layer (a placement that serves the model).
      old: the map ``x`` replaces (the same shape; each expert of ``x`` present in it).
      old_name: ``old``'s argument name.
      shape: the expected shape, e.g. (L, num_slots).
      shape_from: where ``shape`` comes from, for the message (``"load's layers x num_slots"``).
      traced: whether a traced map is accepted (its values are then not checked).

    Returns:
      ``x`` (a list or tuple as a numpy array), otherwise unchanged.

    Raises:
      TypeError: not an integer array (or traced when ``traced`` is False).
      ValueError: the wrong dims or shape, P not divisible by D, an id out of range, an expert
        with no slot, or an expert missing from ``old``; naming ``name[layer, slot]``.

    Example:
      >>> check_phy2log([[0, 1, 0, -1]], name="phy2log", num_devices=2).shape
      (1, 4)
      >>> check_phy2log([[0, 2]], name="phy2log", num_experts=2)
      Traceback (most recent call last):
      ...
      ValueError: phy2log[0, 1] = 2: expected an expert id in [0, num_experts = 2) or -1 (empty slot)
    """
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    letters = {1: "[P]", 2: "[L, P]", None: "[L, P] or [P]"}[ndim]
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an integer array {letters}, got {type(x).__name__}")
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {x.dtype}")
    concrete = not isinstance(x, jax.core.Tracer)
    if not traced and not concrete:
        raise TypeError(f"{name}: expected a concrete integer array {letters}, got a traced value")
    _check_dims(x, name, ndim, letters)
    p_total = int(x.shape[-1])
    if num_devices is not None:
        check_int("num_devices", num_devices, minimum=1)
        if p_total % num_devices:
            raise ValueError(
                f"{name}: P = {p_total} slots is not divisible by D = {num_devices} devices; "
                f"every device must hold the same number of slots (P // D)"
            )
    if old is not None:
        shape, shape_from = tuple(old.shape), f"{old_name}'s"
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape {letters} = {tuple(shape)} ({shape_from}), got "
            f"{tuple(x.shape)}"
        )
    if num_experts is not None:
        check_int("num_experts", num_experts, minimum=1)
        if require_all and p_total < num_experts:
            raise ValueError(
                f"{name}: P = {p_total} slots cannot hold num_experts = {num_experts} experts; "
                f"every logical expert needs at least one slot in every layer"
            )
    if not concrete:
        return x
    rows = np.asarray(x).reshape(-1, p_total)
    _check_ids(rows, name, len(x.shape), num_experts)
    if require_all:
        _check_complete(rows, name, len(x.shape), num_experts)
    if old is not None and not isinstance(old, jax.core.Tracer):
        _check_in_old(rows, np.asarray(old).reshape(-1, p_total), name, old_name, len(x.shape))
    return x


def _check_dims(x: Any, name: str, ndim: int | None, letters: str) -> None:
    if len(x.shape) not in ((1, 2) if ndim is None else (ndim,)):
        dims = "1-D or 2-D" if ndim is None else f"{ndim}-D"
        raise ValueError(f"{name}: expected a {dims} map {letters}, got shape {tuple(x.shape)}")
    if 0 in x.shape:
        what = "one layer and one slot" if len(x.shape) == 2 else "one slot"
        raise ValueError(f"{name}: expected at least {what}, got shape {tuple(x.shape)}")


def _at(layer: int, slot: int | None, ndim: int) -> str:
    """``[layer, slot]`` of a 2-D map, ``[slot]`` of a 1-D one (``[layer]`` / ``""`` without a
    slot)."""
    parts = ([layer] if ndim == 2 else []) + ([] if slot is None else [slot])
    return "[" + ", ".join(map(str, parts)) + "]" if parts else ""


def _check_ids(rows: np.ndarray, name: str, ndim: int, num_experts: int | None) -> None:
    high = _INT32_MAX if num_experts is None else num_experts
    bad = np.argwhere((rows < -1) | (rows >= high))
    if bad.size:
        lay, p = (int(i) for i in bad[0])
        bound = "2^31 - 1" if num_experts is None else f"num_experts = {num_experts}"
        raise ValueError(
            f"{name}{_at(lay, p, ndim)} = {int(rows[lay, p])}: expected an expert id in "
            f"[0, {bound}) or -1 (empty slot)"
        )


def _check_complete(rows: np.ndarray, name: str, ndim: int, num_experts: int | None) -> None:
    num_experts = int(rows.max()) + 1 if num_experts is None else num_experts
    held = np.zeros((rows.shape[0], max(num_experts, 0)), bool)
    lay, p = np.nonzero(rows >= 0)
    held[lay, rows[lay, p]] = True
    missing = np.argwhere(~held)
    if missing.size:
        lay, e = (int(i) for i in missing[0])
        raise ValueError(
            f"{name}{_at(lay, None, ndim)}: expert {e} has no slot; every logical expert needs "
            f"at least one slot in every layer"
        )


def _check_in_old(rows: np.ndarray, old: np.ndarray, name: str, old_name: str, ndim: int):
    for lay in range(rows.shape[0]):
        present = np.isin(rows[lay], old[lay]) | (rows[lay] == -1)
        if not present.all():
            p = int(np.argmin(present))
            e = int(rows[lay, p])
            raise ValueError(
                f"{name}{_at(lay, p, ndim)} = {e}, but no slot of {old_name}{_at(lay, None, ndim)} "
                f"holds expert {e}: every expert of the new placement must have a copy in the old "
                f"one (restore lost experts from their source first)"
            )


def check_derived_maps(
    phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, *, prefix: str = ""
) -> None:
    """Concrete check that ``log2phy`` and ``logcnt`` describe exactly the slots of ``phy2log``.

    Args:
      phy2log: int[L, P], already through `check_phy2log` (``require_all=True``).
      log2phy: int[L, E, R_max].
      logcnt: int[L, E].
      prefix: prepended to the field names in messages (e.g. ``"pending_"``).

    Raises:
      ValueError: naming the first entry that disagrees, with the expected and the found value.
    """
    num_experts = logcnt.shape[1]
    want_cnt = np.stack(
        [np.bincount(row[row >= 0], minlength=num_experts) for row in phy2log]
    ).astype(np.int64)
    if not np.array_equal(logcnt, want_cnt):
        lay, e = (int(i) for i in np.argwhere(logcnt != want_cnt)[0])
        raise ValueError(
            f"{prefix}logcnt[{lay}, {e}]: expected {want_cnt[lay, e]} (replicas of expert {e} "
            f"in {prefix}phy2log), found {logcnt[lay, e]}"
        )
    listed = (log2phy >= 0).sum(-1)
    if not np.array_equal(listed, logcnt):
        lay, e = (int(i) for i in np.argwhere(listed != logcnt)[0])
        raise ValueError(
            f"{prefix}log2phy[{lay}, {e}]: expected {logcnt[lay, e]} slots (its logcnt), found "
            f"{listed[lay, e]}"
        )
    p_total = phy2log.shape[1]
    bad = np.argwhere((log2phy < -1) | (log2phy >= p_total))
    if bad.size:
        lay, e, r = (int(i) for i in bad[0])
        raise ValueError(
            f"{prefix}log2phy[{lay}, {e}, {r}] = {log2phy[lay, e, r]}: expected a slot in "
            f"[0, P = {p_total}) or -1 (padding)"
        )
    for lay, e, r in np.argwhere(log2phy >= 0):
        p = log2phy[lay, e, r]
        if p >= p_total or phy2log[lay, p] != e or r >= logcnt[lay, e]:
            raise ValueError(
                f"{prefix}log2phy[{lay}, {e}, {r}] = {p}: expected a slot holding expert {e} "
                f"in {prefix}phy2log, found one holding "
                f"{phy2log[lay, p] if p < p_total else 'nothing'}"
            )

"""Map algebra: the logical-to-physical map and replica counts that a physical-to-logical map implies,
and the concrete checks of maps.

Letters: L MoE layers, E logical experts per layer, P physical slots per layer, R_max the width of
log2phy. ``phy2log`` int32[L, P] (-1: empty slot) is the source of truth; ``log2phy``
int32[L, E, R_max] (padded with -1) and ``logcnt`` int32[L, E] are derived from it here, so the three
can never disagree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_derived_maps", "check_placement", "maps_from_phy2log"]


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


def check_placement(phy2log: np.ndarray, num_experts: int, name: str) -> None:
    """Concrete checks of a map [L, P]: ids in [-1, E), every expert present in every layer.

    Raises:
      ValueError: naming ``name[layer, slot]`` (or ``name[layer]``) and what was expected.
    """
    bad = np.argwhere((phy2log < -1) | (phy2log >= num_experts))
    if bad.size:
        lay, p = (int(i) for i in bad[0])
        raise ValueError(
            f"{name}[{lay}, {p}] = {int(phy2log[lay, p])}: expected an expert id in "
            f"[0, num_experts = {num_experts}) or -1 (empty slot)"
        )
    for lay in range(phy2log.shape[0]):
        present = np.zeros(num_experts, bool)
        present[phy2log[lay][phy2log[lay] >= 0]] = True
        if not present.all():
            e = int(np.argmin(present))
            raise ValueError(
                f"{name}[{lay}]: expert {e} has no slot; every logical expert needs at least one "
                f"replica in every layer"
            )


def check_derived_maps(
    phy2log: np.ndarray, log2phy: np.ndarray, logcnt: np.ndarray, *, prefix: str = ""
) -> None:
    """Concrete check that ``log2phy`` and ``logcnt`` describe exactly the slots of ``phy2log``.

    Args:
      phy2log: int[L, P], already through `check_placement`.
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

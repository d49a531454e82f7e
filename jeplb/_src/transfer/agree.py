"""Map agreement: every device (and every process) must plan from the same maps.

The transfer plan is computed from the maps on every device independently, and the trip counts of
the collective loops come from that plan. If two devices held different maps (two processes that
computed their maps from different inputs, say), they would run different numbers of collectives
and hang, or move the wrong rows. So before anything moves, the maps are fingerprinted and the
fingerprints compared:

* on device, inside the transfer's `jax.shard_map`: a few uint32 hash lanes of the maps, compared
  with one ``pmin`` and one ``pmax`` over the axis (a few bytes per device). On a mismatch the plan
  counts as infeasible: no collective loop runs, the weights stay as they were, the report's ``ok``
  flags are False and a warning is logged. This works with traced maps under an outer `jax.jit`.
* on the host, for concrete maps in a multi-process run (`jax.process_count()` > 1): the
  fingerprints of all processes are gathered (`jax.experimental.multihost_utils`) and a mismatch
  raises a ValueError on every process, before any validation that could fail on one process only
  (a process that raised alone would leave the others waiting in the next collective).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer.config import axis_tuple
from jeplb._src.transfer.rows import make_varying

__all__ = [
    "already_agreed",
    "check_processes_agree",
    "fingerprint",
    "maps_agree",
    "static_signature",
]

# Odd 32-bit constants, one per lane (the lanes must hash independently).
_LANE_SEEDS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)
_POS_MULT = 0x61C88647


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit finaliser (xor-shift-multiply) on uint32: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _mix32_np(x: np.ndarray) -> np.ndarray:
    """`_mix32` on the host, for uint64 arrays holding 32-bit values."""
    m = np.uint64(0xFFFFFFFF)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & m
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & m
    return x ^ (x >> np.uint64(16))


def fingerprint(*maps: jax.Array) -> jax.Array:
    """A uint32[4] fingerprint of integer arrays (values, positions and shapes). Jit-able.

    Each lane sums a mixed hash of (value, flat position, lane seed) over all entries, so a change
    of any entry or of the order changes every lane with overwhelming probability.

    Args:
      *maps: integer arrays of any shapes (e.g. old and new phy2log, int32[L, P]).

    Returns:
      uint32[4].

    Example:
      >>> import jax.numpy as jnp
      >>> a = fingerprint(jnp.array([[0, 1, 2]]))
      >>> bool((a == fingerprint(jnp.array([[0, 1, 2]]))).all())
      True
      >>> bool((a == fingerprint(jnp.array([[0, 2, 1]]))).any())
      False
    """
    lanes = []
    for k, seed in enumerate(_LANE_SEEDS):
        acc = jnp.uint32(0)
        for i, m in enumerate(maps):
            v = jnp.ravel(m).astype(jnp.uint32)
            pos = jnp.arange(v.shape[0], dtype=jnp.uint32)
            h = _mix32(v * jnp.uint32(2 * k + 3) + pos * jnp.uint32(_POS_MULT) + jnp.uint32(seed))
            shape_tag = jnp.uint32((hash((i, tuple(m.shape))) ^ seed) & 0xFFFFFFFF)
            acc = acc + jnp.sum(h, dtype=jnp.uint32) + _mix32(shape_tag)
        lanes.append(acc)
    return jnp.stack(lanes)


def maps_agree(maps: tuple[jax.Array, ...], axis_name: str | tuple[str, ...]) -> jax.Array:
    """bool[]: every device on ``axis_name`` holds the same ``maps``. Call inside shard_map.

    The result is the same on every device (it comes from a ``pmin`` and a ``pmax``), so it may
    gate a collective loop.

    Args:
      maps: integer arrays that should be replicated over the axis.
      axis_name: the bound mesh axis.

    Returns:
      bool[], identical on every device of the axis.
    """
    fp = lax.bitcast_convert_type(fingerprint(*maps), jnp.int32)
    # Typed as varying, so that the reductions are real collectives even when shard_map believes
    # the maps replicated (a pmin of a value it types as replicated would be folded away).
    fp = make_varying(fp, axis_tuple(axis_name))
    return jnp.all(lax.pmin(fp, axis_name) == lax.pmax(fp, axis_name))


def _host_fingerprint(maps: dict[str, Any]) -> np.ndarray:
    """int64[2 + 4 * len(maps)] on the host: shapes and a hash of each map (or a sentinel)."""
    out = [len(maps)]
    for x in maps.values():
        if x is None:
            out += [-1, 0, 0, 0]
            continue
        try:
            a = np.asarray(x)
        except Exception:  # not fetchable here: treated as a value the others cannot match
            out += [-2, 0, 0, 0]
            continue
        if a.dtype.kind not in "iub":
            out += [-3, a.ndim, 0, 0]
            continue
        m = np.uint64(0xFFFFFFFF)
        v = a.astype(np.int64).ravel().astype(np.uint64) & m
        pos = np.arange(v.size, dtype=np.uint64)
        with np.errstate(over="ignore"):
            h1 = _mix32_np((v * np.uint64(3) + pos * np.uint64(_POS_MULT) + np.uint64(7)) & m)
            h2 = _mix32_np((v * np.uint64(5) + pos * np.uint64(0x9E3779B1) + np.uint64(11)) & m)
        out += [a.ndim, hash(a.shape) & 0x7FFFFFFF, int(h1.sum() & m), int(h2.sum() & m)]
    return np.asarray(out, np.int64)


def static_signature(*values: Any) -> np.ndarray:
    """int32[4]: a fingerprint of static values (their repr), the same in every process."""
    digest = hashlib.sha256(repr(values).encode()).digest()[:16]
    return np.frombuffer(digest, np.int32).copy()


_AGREED = contextvars.ContextVar("jeplb_processes_agreed", default=False)


@contextlib.contextmanager
def already_agreed() -> Iterator[None]:
    """Within it `check_processes_agree` gathers nothing: for a public function that gathered
    every input of a public function it calls (``recover_experts`` around its transfer), so one
    call makes one cross-process gather. Values derived deterministically from agreed inputs
    agree."""
    token = _AGREED.set(True)
    try:
        yield
    finally:
        _AGREED.reset(token)


def check_processes_agree(maps: dict[str, Any], *, where: str) -> None:
    """Raises the same ValueError on every process if the processes passed different values.

    Does nothing in a single-process run or when a value is traced (the on-device check covers
    that). Every process must call it with the same names (it is a collective over processes).

    Args:
      maps: argument name -> its value (an integer array, or None).
      where: the function being called, for the message.
    """
    if jax.process_count() == 1 or _AGREED.get():
        return
    if any(isinstance(x, jax.core.Tracer) for x in maps.values()):
        return
    from jax.experimental import multihost_utils

    mine = _host_fingerprint(maps)
    # process_allgather moves int32 reliably everywhere; split the int64 lanes in two halves.
    halves = np.concatenate([(mine & 0xFFFFFFFF).astype(np.uint32).view(np.int32), (mine >> 32)])
    everyone = np.asarray(multihost_utils.process_allgather(halves.astype(np.int32)))
    if (everyone == everyone[0]).all():
        return
    differ = [int(p) for p in np.nonzero((everyone != everyone[0]).any(axis=1))[0]]
    # Entry k of the fingerprint spans columns 1 + 4k .. 4 + 4k of each half.
    width = mine.shape[0]
    columns = np.nonzero((everyone != everyone[0]).any(axis=0))[0] % width
    names = [n for k, n in enumerate(maps) if any(1 + 4 * k <= c < 5 + 4 * k for c in columns)]
    raise ValueError(
        f"{', '.join(names) or ', '.join(maps)}: the processes passed different values to {where} "
        f"(process {jax.process_index()} of {jax.process_count()}; processes {differ} differ from "
        f"process 0). Every process must pass identical arguments: compute the maps from the same "
        f"inputs (the policy is deterministic), or send process 0's with "
        f"jax.experimental.multihost_utils.broadcast_one_to_all. Nothing was moved."
    )

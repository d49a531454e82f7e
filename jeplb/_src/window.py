"""The load window: a ring buffer of the last W passes' counts and its running total.

``window`` int32[W, L, E] holds one row per pass; ``window_total`` int32[L, E] is kept equal to the
sum of its rows as passes enter and leave (O(L x E) per step, not O(W x L x E)), saturating at
2^31 - 1; ``window_leaving`` is the row the next pass replaces.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.counts import INT32_MAX, saturating_add

__all__ = ["check_window", "slide_window", "slide_window_fast", "window_sum"]


def window_sum(window: Any) -> jax.Array:
    """The sum of a window's W rows, int32[L, E], saturating at 2^31 - 1 (exact below it).

    What ``EplbState.window_total`` must equal. Costs O(W x L x E): one pass over the rows, one row
    at a time (no [W, L, E] temporary); the step calls it only while some total is saturated.

    Args:
      window: int32[W, L, E] counts >= 0.

    Returns:
      int32[L, E].
    """
    window = jnp.asarray(window, jnp.int32)
    return lax.fori_loop(
        0,
        window.shape[0],
        lambda i, acc: saturating_add(acc, lax.dynamic_index_in_dim(window, i, 0, False)),
        jnp.zeros(window.shape[1:], jnp.int32),
    )


def check_window(window: Any, total: Any, leaving: Any, pos: Any) -> None:
    """Checks a window's derived fields: ``total`` its sum (`window_sum`, saturating at
    2^31 - 1; an entry of 2^31 - 1 is always accepted: a saturated total slid without a re-sum
    stays there until the next re-sum, `slide_window_fast`) and ``leaving`` its row ``pos``.
    Concrete arrays only; numpy, O(W x L x E).

    Raises:
      ValueError: naming ``window_total`` or ``window_leaving`` and the first entry that differs.
    """
    window = np.asarray(window)
    want = np.minimum(window.sum(axis=0, dtype=np.int64), INT32_MAX)  # int64: no overflow
    for name, got, expected, what in (
        ("window_total", np.asarray(total), want, "the sum of the window's rows (saturating)"),
        ("window_leaving", np.asarray(leaving), window[int(np.asarray(pos))], "window[window_pos]"),
    ):
        if got.shape != expected.shape:
            raise ValueError(f"{name}: expected shape {expected.shape}, got {got.shape}")
        bad = got != expected
        if name == "window_total":
            bad &= got != INT32_MAX  # saturated, to be summed again
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name}{list(at)} = {int(got[at])}: expected {what}, {int(expected[at])}"
            )


def slide_window(
    window: jax.Array, total: jax.Array, leaving: jax.Array, pos: jax.Array, row: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Writes ``row`` into ``window`` at ``pos`` and keeps the running total: O(L x E).

    The row it overwrites (``leaving``, a copy of ``window[pos]``) is subtracted from ``total`` and
    the new one added, so the total stays the window's sum (`window_sum`): exact below 2^31 - 1,
    saturated at it, never wrapped. A saturated entry's true sum is not known, so while any entry
    of ``total`` is saturated the total is summed again from the window (O(W x L x E), only then).
    The window is only read after it is written (the next ``leaving`` row): a read of the donated
    window before the write would make XLA copy all of it.

    Args:
      window: int32[W, L, E] (updated in place when donated).
      total: int32[L, E], the window's sum.
      leaving: int32[L, E], ``window[pos]``.
      pos: int32[], the row to overwrite.
      row: int32[L, E] counts >= 0.

    Returns:
      ``(window, total, leaving, pos)`` after the write: the next ``leaving`` row and position.
    """
    saturated = jnp.any(total == INT32_MAX)
    window, slid, leaving, pos = slide_window_fast(window, total, leaving, pos, row)
    total = lax.cond(saturated, lambda: window_sum(window), lambda: slid)
    return window, total, leaving, pos


def slide_window_fast(
    window: jax.Array, total: jax.Array, leaving: jax.Array, pos: jax.Array, row: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`slide_window` without its re-sum: branch-free, a handful of fused kernels.

    The total it returns is the window's sum only while no entry of the ``total`` it was given is
    saturated (``jnp.any(total == INT32_MAX)`` false); otherwise the caller must replace it with
    `window_sum` of the returned window (what `slide_window` does), e.g. inside a branch that runs
    only then. A saturated entry stays saturated (its true sum is not known, so subtracting the
    leaving row from it would give a wrong, unsaturated count): a caller that re-sums later, not
    at once (`jeplb.end_pass`, an idle `jeplb.eplb_step`), still sees that it must.

    Returns:
      ``(window, total, leaving, pos)`` as `slide_window`.
    """
    window = lax.dynamic_update_index_in_dim(window, row, pos, 0)
    # Below the limit the total is exact, so it holds the row it loses (max: a hand-made state).
    slid = saturating_add(jnp.maximum(total - leaving, 0), row)
    slid = jnp.where(total == INT32_MAX, INT32_MAX, slid)
    pos = (pos + 1) % window.shape[0]
    return window, slid, lax.dynamic_index_in_dim(window, pos, 0, keepdims=False), pos

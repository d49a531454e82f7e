"""Slot-expanded gating: router scores [T, E] laid over the physical slots [T, P] of one layer.

For MoE kernels that do their own top-k over the expert axis (tpu-inference's fused MoE takes
[T, E] router logits): give them the [T, P] form instead and their top-k picks physical slots.
Each (token, expert) keeps its score in exactly one of the expert's replicas, the one
`jeplb.dispatch_layer` chooses for it, and every other replica gets ``fill`` (-inf for logits, 0
for probabilities), so a softmax over the [T, P] row equals the softmax over the [T, E] row and a
top-k picks the same experts with the same scores.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.dispatch import dispatch_layer
from jeplb._src.validate import check_int

__all__ = ["expand_gating"]


def _check(scores: Any, log2phy: Any, top_k: Any, num_slots: Any) -> tuple[int, int, int]:
    """(E, R_max, P) of checked arguments."""
    if not hasattr(scores, "shape") or not hasattr(scores, "dtype"):
        raise TypeError(f"scores: expected a float array [T, E], got {type(scores).__name__}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"scores: expected a floating dtype, got {scores.dtype}")
    if not hasattr(log2phy, "shape") or len(log2phy.shape) != 2:
        raise ValueError(
            f"log2phy: expected one layer's map [E, R_max], got shape "
            f"{getattr(log2phy, 'shape', type(log2phy).__name__)} (slice it: state.log2phy[layer])"
        )
    num_experts, r_max = (int(n) for n in log2phy.shape)
    if scores.ndim != 2 or scores.shape[1] != num_experts:
        raise ValueError(
            f"scores: expected shape [T, E] with E = {num_experts} (from log2phy), got "
            f"{tuple(scores.shape)}"
        )
    check_int("top_k", top_k, minimum=1)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected at most E = {num_experts}, got {top_k}")
    if num_slots is None:
        num_slots = num_experts + r_max - 1  # log2phy's width in a state: R_max = P - E + 1
    check_int("num_slots", num_slots, minimum=num_experts)
    return num_experts, r_max, int(num_slots)


def expand_gating(
    scores: jax.Array,
    log2phy: jax.Array,
    logcnt: jax.Array,
    *,
    top_k: int,
    num_slots: int | None = None,
    fill: float = -np.inf,
    token_index: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lays router scores over one layer's physical slots, one replica per (token, expert).

    The K experts a token picks (``lax.top_k`` over its [E] scores) get the replicas
    `jeplb.dispatch_layer` assigns them (the hash of token index and top-k rank); every other
    expert keeps its score in its first replica (so a softmax over the slots still sees it once).
    All other slots, and empty ones, get ``fill``. Then ``lax.top_k(expanded, K)`` picks the
    slots ``physical_ids`` names, with the scores of the logical top-k, and the slots' experts
    are the logical top-k's (exact ties between experts aside: each top-k takes the lower index).
    Jit-able; O(T x P) memory.

    Args:
      scores: float[T, E] router logits (``fill=-inf``) or weights / probabilities (``fill=0``).
      log2phy: int32[E, R_max] the layer's logical-to-physical map (``state.log2phy[layer]``).
      logcnt: int32[E] the layer's replica counts (``state.logcnt[layer]``).
      top_k: K, experts per token (static).
      num_slots: P (static; default E + R_max - 1, a state's log2phy width).
      fill: the score of slots that must not be picked.
      token_index, valid: as in `jeplb.dispatch_layer` (the hash's token index, tokens counted).

    Returns:
      ``(expanded [T, P] of scores' dtype, physical_ids int32[T, K], counts int32[E])``:
      ``physical_ids`` and ``counts`` are `jeplb.dispatch_layer`'s for the logical top-k ids
      (record the counts with `jeplb.EplbState.record`).

    Raises:
      TypeError, ValueError: shapes, dtypes or sizes that do not fit, naming the argument.

    Example:
      >>> import jax, jax.numpy as jnp, jeplb
      >>> s = jeplb.EplbState.create(num_layers=1, num_experts=3, num_devices=1,
      ...                            num_redundant_experts=1, window_size=1, step_interval=1)
      >>> logits = jnp.array([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]])
      >>> x, phys, counts = expand_gating(logits, s.log2phy[0], s.logcnt[0], top_k=2)
      >>> x.tolist()  # slot 3 is expert 0's second replica
      [[2.0, 0.5, 1.0, -inf], [0.0, 3.0, 1.0, -inf]]
      >>> phys.tolist(), counts.tolist()
      ([[0, 2], [1, 2]], [1, 1, 2])
      >>> jax.lax.top_k(x, 2)[1].tolist()  # the kernel's top-k: the slots dispatch chose
      [[0, 2], [1, 2]]
    """
    num_experts, _, num_slots = _check(scores, log2phy, top_k, num_slots)
    num_tokens = scores.shape[0]
    _, ids = jax.lax.top_k(scores, top_k)  # [T, K] logical
    phys, counts = dispatch_layer(log2phy, logcnt, ids, token_index=token_index, valid=valid)
    log2phy = jnp.asarray(log2phy, jnp.int32)
    with jax.named_scope("eplb_expand_gating"):
        rows = jnp.arange(num_tokens, dtype=jnp.int32)[:, None]
        chosen = jnp.broadcast_to(log2phy[:, 0], (num_tokens, num_experts))  # [T, E]
        chosen = chosen.at[rows, ids].set(phys)
        # The expert of each slot (-1: empty), from log2phy.
        experts = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32)[:, None], log2phy.shape)
        slot_expert = (
            jnp.full((num_slots,), -1, jnp.int32)
            .at[jnp.where(log2phy >= 0, log2phy, num_slots)]
            .set(experts, mode="drop")
        )
        safe = jnp.maximum(slot_expert, 0)
        slots = jnp.arange(num_slots, dtype=jnp.int32)
        keep = (slot_expert >= 0)[None, :] & (chosen[:, safe] == slots[None, :])  # [T, P]
        expanded = jnp.where(keep, scores[:, safe], jnp.asarray(fill, scores.dtype))
    return expanded, phys, counts

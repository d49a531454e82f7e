"""Combining a token's expert outputs so that a rebalance cannot change the result's bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["combine_topk"]


def combine_topk(expert_out: jax.Array, weights: jax.Array) -> jax.Array:
    """Combines each token's K expert outputs in top-k order: bitwise stable across rebalances.

    ``out = w_0 * y_0 + w_1 * y_1 + ... + w_{K-1} * y_{K-1}``, accumulated one k after the other.
    The operands of every token are its routing weights and its experts' outputs, which do not
    depend on the slots that computed them, and so neither does the sum. A combine over slots
    (an einsum of [T, P] weights with [T, P, H] outputs, or a scatter-add into slots) adds the
    same terms in slot order instead, which a rebalance permutes: outputs then move by rounding
    (about 1e-6 in float32).

    Args:
      expert_out: [..., K, H] each (token, k) pair's expert output, in the router's top-k order.
      weights: [..., K] the routing weights of those pairs.

    Returns:
      [..., H] the combined outputs, in ``expert_out``'s dtype.

    Example:
      >>> import jax.numpy as jnp, jeplb
      >>> y = jnp.array([[[1.0, 2.0], [10.0, 20.0]]])  # [T = 1, K = 2, H = 2]
      >>> jeplb.combine_topk(y, jnp.array([[0.75, 0.25]])).tolist()
      [[3.25, 6.5]]
    """
    expert_out, weights = jnp.asarray(expert_out), jnp.asarray(weights)
    if expert_out.ndim < 2:
        raise ValueError(f"expert_out: expected [..., K, H], got shape {expert_out.shape}")
    if expert_out.shape[:-1] != weights.shape:
        raise ValueError(
            f"weights: expected shape {expert_out.shape[:-1]} (expert_out without its last dim), "
            f"got {weights.shape}"
        )
    w = weights.astype(expert_out.dtype)[..., None]
    out = w[..., 0, :] * expert_out[..., 0, :]
    for k in range(1, expert_out.shape[-2]):
        out = out + w[..., k, :] * expert_out[..., k, :]
    return out

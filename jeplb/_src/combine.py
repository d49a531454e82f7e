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
      [..., H] the combined outputs, in ``jnp.result_type(expert_out, weights)``: JAX's
      promotion of the two dtypes (bf16 outputs with bf16 weights stay bf16; bf16 outputs with
      float32 weights, or int32 outputs with float32 weights, give float32). The products and
      the sum are taken in that dtype. With K = 0 the result is zeros.

    Raises:
      ValueError: shapes that do not fit. TypeError: dtypes JAX does not promote (fp8 outputs
        with weights of another float dtype): cast one of them first.

    Example:
      >>> import jax.numpy as jnp, jeplb
      >>> y = jnp.array([[[1.0, 2.0], [10.0, 20.0]]])  # [T = 1, K = 2, H = 2]
      >>> jeplb.combine_topk(y, jnp.array([[0.75, 0.25]])).tolist()
      [[3.25, 6.5]]
      >>> jeplb.combine_topk(jnp.array([[[1, 2], [10, 20]]]), jnp.array([[0.75, 0.25]])).tolist()
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
    # Promoted, not cast to the outputs' dtype: int outputs with weights 0.75 / 0.25 would
    # multiply by int(0.75) = 0.
    try:
        dtype = jnp.result_type(expert_out, weights)
    except (TypeError, ValueError) as err:  # fp8 with bf16: jax.dtypes.TypePromotionError
        raise TypeError(
            f"expert_out, weights: JAX has no promotion of {expert_out.dtype} with "
            f"{weights.dtype}; cast one to the dtype to combine in (e.g. "
            f"expert_out.astype(weights.dtype))"
        ) from err
    y, w = expert_out.astype(dtype), weights.astype(dtype)[..., None]
    if y.shape[-2] == 0:
        return jnp.zeros(y.shape[:-2] + y.shape[-1:], dtype)
    out = w[..., 0, :] * y[..., 0, :]
    for k in range(1, y.shape[-2]):
        out = out + w[..., k, :] * y[..., k, :]
    return out

"""A MoE layer that runs inside its own `jax.shard_map`, with tokens exchanged by all-to-all.

MaxText's sparse path, tpu-inference's GMM_EP path and most production MoE layers work this way:
each device holds a shard of the tokens and N_local = P // D expert slots; it routes its tokens,
sends each (token, k) pair to the device that holds the pair's slot (`lax.all_to_all`), runs its
own experts on what it received, and sends the results back. jeplb fits in three places:

1. **Dispatch with global token indices.** `jeplb.dispatch_layer(..., token_index=...)` with each
   token's index in the global batch (device d's t-th token is ``d * T_local + t``), so that the
   replica choice is the one a global-view dispatch makes, whatever the device count.
2. **Counts summed once.** Each device counts its own tokens; `EplbState.record(counts,
   layer=..., load_axes=axis)` sums them with one psum over the token axis and keeps the state
   replicated (or leave them partial and pass ``load_axes`` to `jeplb.eplb_step_local` once per
   step, which sums the whole [L, E] pass at once).
3. **Combine in top-k order** (`jeplb.combine_topk`), so a rebalance does not change the output
   bits.

Letters: D devices on ``axis``, T_local tokens per device, K top-k, H width, N_local slots per
device; C = T_local * K is the send buffer's rows per destination (every pair of a device could
go to one device, so nothing is dropped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

import jeplb

__all__ = ["moe_layer_local"]


def _bucket_positions(dest: jax.Array, num_devices: int) -> jax.Array:
    """int32[M]: each pair's row in its destination's bucket (pairs in order, per destination)."""
    one_hot = jax.nn.one_hot(dest, num_devices, dtype=jnp.int32)  # [M, D]
    return jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - 1, dest[:, None], axis=1)[:, 0]


def moe_layer_local(state, layer, w_local, x, topk_ids, gates, *, axis: str = "ep"):
    """One MoE layer on this device's tokens and slots; call inside `jax.shard_map` over ``axis``.

    Args:
      state: the `jeplb.EplbState`, replicated.
      layer: the layer's index (int).
      w_local: [N_local, H, H] this device's expert slots (the global [P, H, H] sharded over
        ``axis``), one matrix per slot.
      x: [T_local, H] this device's tokens.
      topk_ids: int32[T_local, K] the router's logical expert ids.
      gates: [T_local, K] the routing weights.

    Returns:
      ``(state, y)``: the state with the layer's counts added (summed over ``axis``: replicated)
      and y [T_local, H].
    """
    num_devices = lax.axis_size(axis)
    t_local, k = topk_ids.shape
    n_local = w_local.shape[0]
    token = lax.axis_index(axis) * t_local + jnp.arange(t_local)  # global token indices
    phys, counts = jeplb.dispatch_layer(
        state.log2phy[layer], state.logcnt[layer], topk_ids, token_index=token
    )
    state = state.record(counts, layer=layer, load_axes=axis)  # one psum of [E]
    pairs = phys.reshape(-1)  # [M = T_local * K]
    dest, slot = pairs // n_local, pairs % n_local
    row = _bucket_positions(dest, num_devices)
    cap = t_local * k
    tokens = jnp.repeat(x, k, axis=0)  # pair m carries token m // K
    send = jnp.zeros((num_devices, cap, x.shape[1]), x.dtype).at[dest, row].set(tokens)
    send_slot = jnp.full((num_devices, cap), -1, jnp.int32).at[dest, row].set(slot)
    recv = lax.all_to_all(send, axis, 0, 0, tiled=False)  # [D (source), C, H]
    recv_slot = lax.all_to_all(send_slot, axis, 0, 0, tiled=False)
    mats = w_local[jnp.maximum(recv_slot, 0)]  # [D, C, H, H]
    out = jnp.where((recv_slot >= 0)[..., None], jnp.einsum("sch,schg->scg", recv, mats), 0)
    back = lax.all_to_all(out, axis, 0, 0, tiled=False)  # [D (destination), C, H]
    per_pair = back[dest, row].reshape(t_local, k, -1)
    return state, jeplb.combine_topk(per_pair, gates)

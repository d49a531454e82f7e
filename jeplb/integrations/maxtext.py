"""EPLB for MaxText 0.2.x's own MoE layer (`maxtext.layers.moe.RoutedMoE`, Flax NNX).

MaxText's `RoutedMoE` has one ``num_experts`` for the router's width and the expert kernels'
rows. `EplbRoutedMoE` splits them: its kernels ``wi_0``, ``wi_1``, ``wo`` (and biases and
scales, if any) have P = E + R rows, one per physical slot, while its router ``gate`` keeps E
outputs. After MaxText's own top-k (its routed bias, DeepSeek group routing, ``norm_topk_prob``
all as configured) the layer maps the E logical ids to slots with `jeplb.dispatch_layer`, and
counts the tokens each logical expert got. Everything on the router's side stays on logical ids:
``load_balance_loss``, the routed-bias (loss-free balancing) updates, forced routing.

The layer keeps its maps and counts in NNX variables that are not parameters (`EplbMaps`,
`EplbCounts`), so MaxText's layer scan (`maxtext.layers.nnx_scan`, or ``nnx.vmap`` over layers)
stacks them per layer ``[L, ...]`` (at axis 0 whatever ``param_scan_axis`` is) next to the
parameters ``[P, L, ...]`` (``param_scan_axis=1``, MaxText's default) or ``[L, P, ...]``. A step
then is::

    maxtext.set_maps(model, state)                      # the state's maps into every layer
    y = model(x)                                        # MaxText's forward, dispatching
    state, info = maxtext.eplb_step(model, state, mesh=mesh, config=config)  # record, rebalance

all inside one `jax.jit` (split and merge the model, donate its state and the `EplbState`).

Expert paths (``config.sparse_matmul``):

* dense (``sparse_matmul=False``, ``capacity_factor <= 0``): every slot runs on every token with
  MaxText's einsums, each (token, k) pair takes its slot's output, and the K outputs are added in
  top-k order (`jeplb.combine_topk`): outputs are bitwise identical before and after every
  rebalance. MaxText's own combine (``einsum("BSEM,BSE")`` over the expert axis) adds them in slot
  order and drifts by rounding across a rebalance; this layer does not use it. Token dropping
  (``capacity_factor > 0``) is refused: its capacity is per slot.
* sparse (``sparse_matmul=True``): the layer runs MaxText's own `sparse_matmul` with P as the
  number of expert groups, dispatching inside MaxText's ``shard_map`` with global token indices
  (the same replicas as at global view). Only the ring of experts (``use_ring_of_experts=True``)
  is supported, with MaxText's megablox kernel (``megablox=True``, or ``use_tokamax_gmm``) when
  the expert axis is larger than 1. NNX variables cannot be written inside that ``shard_map``,
  so the counts (which depend on the router's top-k only) are taken once at global view from the
  same logits. MaxText's default sparse route is a ``ragged_all_to_all``, which XLA:CPU cannot
  compile; the ring route runs on CPU. Outputs are MaxText's sparse computation's: each expert
  shard adds the weighted outputs of its own slots per token and a reduce-scatter adds the
  shards, so a rebalance that moves a token's experts to other shards regroups those K adds and
  moves outputs by rounding (a few ulp; MaxText's own layer does the same when its experts are
  laid out in another order), never more. The layer must run where MaxText runs its models:
  inside ``nn.logical_axis_rules(config.logical_axis_rules)`` (and ``jax.set_mesh(mesh)``).
  Without the rules MaxText's ``shard_map`` replicates the expert kernels and the ring computes
  every token with other slots' experts too (MaxText's own `RoutedMoE` as well); the layer
  refuses to run there.

``with use_in_maxtext(num_redundant_experts=R):`` around a model's construction makes MaxText's
own models build `EplbRoutedMoE` where they build `RoutedMoE`.

Requires ``maxtext==0.2.5`` (Python >= 3.12; ``pip install "jeplb[maxtext]"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jeplb

try:
    from maxtext.layers import moe as _moe
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "jeplb.integrations.maxtext needs MaxText 0.2.x (Python >= 3.12): "
        'pip install "jeplb[maxtext]"'
    ) from err

# MaxText's class as imported, whatever `use_in_maxtext` puts in its module while it is open.
_RoutedMoE = _moe.RoutedMoE

__all__ = [
    "SLOT_PARAMS",
    "EplbCounts",
    "EplbMaps",
    "EplbRoutedMoE",
    "eplb_step",
    "expert_filter",
    "expert_params",
    "layout",
    "place_experts",
    "set_expert_params",
    "set_maps",
    "take_counts",
    "use_in_maxtext",
]

# The parameters of RoutedMoE with one row per expert (slot) in dim 0 of a layer.
SLOT_PARAMS = (
    "wi_0", "wi_1", "wi", "wo", "wi_0_bias", "wi_1_bias", "wo_bias",
    "wi_0_scale", "wi_1_scale", "wi_scale", "wo_scale",
)  # fmt: skip


class EplbMaps(nnx.Variable):
    """A layer's placement maps (int32, not a parameter): no gradient, scanned per layer."""


class EplbCounts(nnx.Variable):
    """A layer's routed-token counts per logical expert (int32[E]) of the last forward."""


class EplbRoutedMoE(_RoutedMoE):
    """MaxText's `RoutedMoE` with P physical slots behind an E-wide router.

    Built with MaxText's own arguments plus ``num_redundant_experts``: the kernels get
    P = ``num_experts`` + ``num_redundant_experts`` rows, sharded on MaxText's ``"exp"`` logical
    axis as before; the ``num_experts`` passed in (E, ``self.num_logical_experts``) stays the
    router's width and the id space of the top-k, the load-balance loss and the routed bias.
    ``self.num_experts`` is E on the dense path and P on the sparse path, where MaxText's sort
    groups tokens by it. A token with a -1 id (forced-routing padding) is mapped, not counted. The maps start as `jeplb.EplbState.create`'s
    (slot p holds expert p % E); `set_maps` writes a state's maps in before a forward.

    Args:
      config, num_experts, num_experts_per_tok, mesh, kernel_init, kernel_axes, rngs, **kwargs:
        as `maxtext.layers.moe.RoutedMoE` takes them (``num_experts`` is E, the logical experts).
      num_redundant_experts: R >= 0, the replica slots per layer; P = E + R must be divisible by
        the size of the expert mesh axis.

    Raises:
      ValueError: a P that the expert axis does not divide, or a MaxText configuration the
        adapter does not cover (token dropping on the dense path, the sparse path without the
        ring of experts or, on an expert axis larger than 1, without megablox, hash or random
        routing, the fused vLLM path, TE's MoE block, Gemma4's per-expert scale), named by its
        config key.
    """

    def __init__(
        self,
        config: Any,
        num_experts: int,
        num_experts_per_tok: int,
        mesh: jax.sharding.Mesh,
        kernel_init: Any,
        kernel_axes: tuple,
        rngs: nnx.Rngs,
        *,
        num_redundant_experts: int,
        **kwargs: Any,
    ):
        if not isinstance(num_redundant_experts, int) or num_redundant_experts < 0:
            raise ValueError(
                f"num_redundant_experts: expected an int >= 0, got {num_redundant_experts!r}"
            )
        _check_config(config, kwargs)
        num_slots = num_experts + num_redundant_experts
        slots_config = _SlotsConfig(config, num_slots) if config.sparse_matmul else config
        super().__init__(
            slots_config, num_slots, num_experts_per_tok, mesh, kernel_init, kernel_axes, rngs,
            **kwargs,
        )  # fmt: skip
        ep = self.get_expert_parallelism_size()
        if num_slots % ep:
            raise ValueError(
                f"num_redundant_experts: P = num_experts + num_redundant_experts = {num_slots} "
                f"must be divisible by the expert axis size {ep}"
            )
        if config.sparse_matmul and ep > 1 and not (config.megablox or config.use_tokamax_gmm):
            raise ValueError(
                f"config: EplbRoutedMoE does not support megablox=False with sparse_matmul=True "
                f"on an expert axis of {ep}: MaxText's ring of experts hands jax.lax.ragged_dot "
                f"the group sizes of all {num_slots} slots and the kernels of the "
                f"{num_slots // ep} local ones; set megablox=True (its kernel takes the local "
                f"groups)"
            )
        # MaxText's sparse path sorts and counts tokens by self.num_experts: there it stays P.
        self.num_experts = num_slots if config.sparse_matmul else num_experts
        self.num_logical_experts = num_experts
        self.num_slots = num_slots
        self.gate = _gate_with_width(self.gate, num_experts, rngs)
        phy2log = jnp.arange(num_slots, dtype=jnp.int32) % num_experts
        state = jeplb.EplbState.from_placement(
            phy2log[None], num_experts=num_experts, num_devices=ep
        )
        self.eplb_phy2log = EplbMaps(phy2log)  # int32[P]
        self.eplb_log2phy = EplbMaps(state.log2phy[0])  # int32[E, R_max]
        self.eplb_logcnt = EplbMaps(state.logcnt[0])  # int32[E]
        self.eplb_counts = EplbCounts(jnp.zeros((num_experts,), jnp.int32))  # int32[E]

    # -- routing -------------------------------------------------------------------------------

    def _dispatch(self, ids: jax.Array, token_index: jax.Array | None = None):
        """[B, S, K] logical ids (-1: none) -> ([B, S, K] slots, int32[E] counts of valid ids)."""
        valid = jnp.all(ids >= 0, axis=-1)
        slots, counts = jeplb.dispatch_layer(
            self.eplb_log2phy[...], self.eplb_logcnt[...], jnp.where(ids >= 0, ids, 0),
            valid=valid, token_index=token_index,
        )  # fmt: skip
        return jnp.where(ids >= 0, slots, ids), counts

    def get_topk(
        self, gate_logits, pre_bias_logits, rngs=None, input_ids=None, forced_routed_experts=None
    ):
        """MaxText's top-k on logical ids, then their slots (the sparse path calls this).

        Inside MaxText's shard_map, ring of experts: every expert shard holds the tokens of its
        batch group, all-gathered over the expert axis (the minor-most batch axis), so a row's
        global token index is its group's offset plus its position: the same index, and so the
        same replica, as at global view.
        """
        weights, ids = super().get_topk(
            gate_logits, pre_bias_logits, rngs, input_ids, forced_routed_experts
        )
        ep_axis = _names(self._expert_parallelism_name)
        batch_axes = tuple(
            a for a in self.mesh.axis_names if self.mesh.shape[a] > 1 and a not in ep_axis
        )
        tokens = ids.shape[0] * ids.shape[1]
        offset = _axis_index(batch_axes, self.mesh) if batch_axes else 0
        index = offset * tokens + jnp.arange(tokens, dtype=jnp.int32).reshape(ids.shape[:2])
        slots, _ = self._dispatch(ids, token_index=index)
        return weights, slots

    def sparse_matmul(self, inputs, gate_logits, pre_bias_logits, *args, **kwargs):
        """MaxText's sparse path on P slots; the counts are taken once, at global view.

        The counts per logical expert depend only on the router's top-k, not on the replicas
        chosen, so they are counted here from the same logits MaxText routes inside its
        shard_map (a [T, E] top-k more; NNX variables cannot be written inside the shard_map).

        Raises:
          RuntimeError: called without MaxText's logical axis rules on an expert axis larger
            than 1 (the expert kernels would be replicated inside MaxText's shard_map).
        """
        _require_axis_rules(self.get_expert_parallelism_size())
        _, ids = _RoutedMoE.get_topk(
            self, gate_logits, pre_bias_logits, self.rngs, kwargs.get("input_ids"),
            kwargs.get("forced_routed_experts"),
        )  # fmt: skip
        _, counts = self._dispatch(ids)
        self.eplb_counts[...] = self.eplb_counts[...] + counts
        return super().sparse_matmul(inputs, gate_logits, pre_bias_logits, *args, **kwargs)

    def load_balance_loss(self, top_k_indices, logits, density_prob=None):
        """MaxText's loss, always over the E logical experts.

        MaxText's sparse path hands it the slot ids its top-k returned: they are mapped back to
        logical ids. Its Megatron-style loss (and the dense path) hand it logical ids.
        """
        if self.config.sparse_matmul and not _moe.uses_megatron_seq_aux_loss(self.config):
            top_k_indices = self.eplb_phy2log[...][top_k_indices]
        # A static int swapped for the call (NNX refuses attribute writes inside shard_map).
        width = self.num_experts
        object.__setattr__(self, "num_experts", self.num_logical_experts)
        try:
            return super().load_balance_loss(top_k_indices, logits, density_prob)
        finally:
            object.__setattr__(self, "num_experts", width)

    # -- the dense path ------------------------------------------------------------------------

    def dense_matmul(
        self, inputs, gate_logits, pre_bias_logits, w0_kernel, w1_kernel, wo_kernel,
        w0_bias, w1_bias, wo_bias, input_ids=None, forced_routed_experts=None,
    ):  # fmt: skip
        """MaxText's dropless dense path on P slots, combined in top-k order."""
        batch_axes = ("activation_batch_moe", "activation_length_moe", None)
        gate_logits = self._maybe_shard_with_logical(gate_logits, batch_axes)
        if forced_routed_experts is not None:
            forced_routed_experts = self._maybe_shard_with_logical(
                forced_routed_experts, batch_axes
            )
        weights, ids = _RoutedMoE.get_topk(
            self, gate_logits, pre_bias_logits, self.rngs, input_ids=input_ids,
            forced_routed_experts=forced_routed_experts,
        )  # fmt: skip
        lb_loss = self._router_loss(gate_logits, pre_bias_logits, ids)
        bias_updates = self._bias_updates(ids)
        slots, counts = self._dispatch(ids)  # [B, S, K], [E]
        self.eplb_counts[...] = self.eplb_counts[...] + counts
        x = self._maybe_shard_with_logical(
            inputs, ("activation_batch_moe", "activation_norm_length_moe", "activation_embed_moe")
        )
        y = self._experts_all_slots(x, w0_kernel, w1_kernel, wo_kernel, w0_bias, w1_bias, wo_bias)
        y = jnp.take_along_axis(y, jnp.maximum(slots, 0)[..., None], axis=2)  # [B, S, K, M]
        if self.config.float32_weight_sum:
            y, weights = y.astype(jnp.float32), weights.astype(jnp.float32)
        else:
            weights = weights.astype(y.dtype)
        weights = jnp.where(slots >= 0, weights, 0)
        return jeplb.combine_topk(y, weights).astype(self.dtype), lb_loss, bias_updates

    def _experts_all_slots(self, x, w0, w1, wo, b0, b1, bo):
        """[B, S, M] tokens -> [B, S, P, M]: every slot's expert on every token."""
        precision = jax.lax.Precision(self.config.matmul_precision)
        f32 = self.config.activations_in_float32

        def project(name, spec, h, kernel, bias, axes):
            out = self.get_einsum(rhs_mesh_axes=axes, einsum_name=name)(
                spec, h, kernel, precision=precision
            )
            if bias is not None:
                out = out + bias[None, None]
            return out.astype(jnp.float32) if f32 else out

        h0 = project(_moe.WI_0, "BSM,EMH -> BSEH", x, w0, b0, self.wi_kernel_axes)
        h1 = project(_moe.WI_1, "BSM,EMH -> BSEH", x, w1, b1, self.wi_kernel_axes)
        act = self.apply_ffn_activation(h0, h1)
        return project(_moe.WO, "BSEH,EHM -> BSEM", act, wo, bo, self.wo_kernel_axes)

    def _router_loss(self, gate_logits, pre_bias_logits, ids):
        cfg = self.config
        if cfg.model_call_mode == "inference" or cfg.load_balance_loss_weight <= 0.0:
            return None
        if _moe.uses_megatron_seq_aux_loss(cfg):
            return self.megatron_seq_aux_loss(
                pre_bias_logits if pre_bias_logits is not None else gate_logits
            )
        probs = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        return self.load_balance_loss(ids, probs)

    def _bias_updates(self, ids):
        if not self.should_update_load_balance():
            return None
        if getattr(self.config, "gradient_accumulation_steps", 1) > 1:
            return _moe.calculate_expert_counts(ids, self.num_logical_experts, axis_names=None)
        rate = self.config.routed_bias_update_rate
        return _moe.calculate_load_balance_updates(
            ids, self.num_logical_experts, rate, axis_names=None
        )


@contextlib.contextmanager
def use_in_maxtext(*, num_redundant_experts: int):
    """Inside the block, MaxText's models build `EplbRoutedMoE` where they build `RoutedMoE`.

    MaxText's decoder layers (Mixtral, Qwen3's routed experts, GPT-OSS, and through
    `RoutedAndSharedMoE` DeepSeek and Llama4) look ``maxtext.layers.moe.RoutedMoE`` up when they
    are built; inside the block that name is a subclass of `EplbRoutedMoE` with
    ``num_redundant_experts`` bound. Build (or ``nnx.eval_shape``) the model inside it; the model
    keeps its layers after the block closes. A model that imported the class by name before is
    not affected: build `EplbRoutedMoE` there yourself.

    Args:
      num_redundant_experts: R, replica slots per MoE layer (P = E + R).
    """
    if not isinstance(num_redundant_experts, int) or num_redundant_experts < 0:
        raise ValueError(
            f"num_redundant_experts: expected an int >= 0, got {num_redundant_experts!r}"
        )

    class Bound(EplbRoutedMoE):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("num_redundant_experts", num_redundant_experts)
            super().__init__(*args, **kwargs)

    Bound.__name__ = Bound.__qualname__ = "EplbRoutedMoE"
    previous, _moe.RoutedMoE = _moe.RoutedMoE, Bound
    try:
        yield
    finally:
        _moe.RoutedMoE = previous


def _require_axis_rules(expert_axis_size: int) -> None:
    """The sparse path's shard_map takes its specs from MaxText's logical axis rules.

    Without rules every spec is replicated: each expert shard gets all P kernels, while MaxText's
    ring still rolls the slot ids by the shard's offset (its first local slot), so shard s runs
    the tokens of slot p through the kernel of slot p - offset(s) (the right one on shard 0 only)
    and the reduce-scatter adds those outputs over the shards. Refused rather than computed.
    """
    if expert_axis_size > 1 and not _moe.get_logical_axis_rules():
        raise RuntimeError(
            "EplbRoutedMoE: sparse_matmul=True on an expert axis of "
            f"{expert_axis_size} needs MaxText's logical axis rules while the layer runs: call "
            "the model inside nn.logical_axis_rules(config.logical_axis_rules) and "
            "jax.set_mesh(mesh), as MaxText's own loops do (without them MaxText's shard_map "
            "replicates the expert kernels and the ring of experts multiplies tokens with "
            "other slots' experts)"
        )


def _names(axis) -> tuple:
    return axis if isinstance(axis, tuple) else (axis,)


def _axis_index(axis, mesh):
    index = 0
    for a in _names(axis):
        index = index * mesh.shape[a] + jax.lax.axis_index(a)
    return index


class _SlotsConfig:
    """MaxText's config with ``num_experts`` = P, for the sparse path's slot bookkeeping."""

    def __init__(self, config, num_slots: int):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "num_experts", num_slots)

    def __getattr__(self, name):
        return getattr(self._config, name)


def _check_config(config, kwargs) -> None:
    """Refuses the MaxText configurations the adapter does not cover, naming the key."""
    refused = []
    if config.sparse_matmul and not config.use_ring_of_experts:
        refused.append(
            "sparse_matmul=True needs use_ring_of_experts=True (the ragged all-to-all route "
            "dispatches before the top-k is visible to the layer)"
        )
    if not config.sparse_matmul and config.capacity_factor > 0:
        refused.append("capacity_factor > 0 (token dropping per slot) on the dense path")
    if config.te_moe_block:
        refused.append("te_moe_block=True")
    if config.use_random_routing:
        refused.append("use_random_routing=True")
    if kwargs.get("is_hash_routing"):
        refused.append("is_hash_routing=True")
    if config.attention in ("vllm_rpa", "vllm_batched_rpa"):
        refused.append(f"attention={config.attention!r} (the fused vLLM MoE path)")
    if config.decoder_block == _moe.ctypes.DecoderBlockType.GEMMA4:
        refused.append("decoder_block=gemma4 (a per-expert scale on logical ids)")
    if config.sparse_matmul and config.routed_bias and config.routed_bias_update_rate > 0.0:
        refused.append(
            "routed_bias_update_rate > 0 with sparse_matmul=True (MaxText counts the slots there)"
        )
    if config.sparse_matmul and getattr(config, "moe_topk_before_ep_all_gather", False):
        refused.append("moe_topk_before_ep_all_gather=True")
    if refused:
        raise ValueError("config: EplbRoutedMoE does not support " + "; ".join(refused))


def _gate_with_width(gate, width: int, rngs: nnx.Rngs):
    """MaxText's GateLogit rebuilt with ``width`` outputs, every other setting as ``gate``'s."""
    return _moe.GateLogit(
        in_features_shape=gate.in_features_shape,
        out_features_shape=width,
        model_name=gate.model_name,
        mesh=gate.mesh,
        rngs=rngs,
        axis=gate.axis,
        weight_dtype=gate.weight_dtype,
        dtype=gate.dtype,
        kernel_init=gate.kernel_init,
        kernel_axes=gate.kernel_axes,
        use_bias=gate.use_bias,
        score_func=gate.score_func,
        quant=gate.quant,
        shard_mode=gate.shard_mode,
        matmul_precision=gate.matmul_precision,
    )


# -- the model's side: maps in, counts out, expert parameters ------------------------------------


def _flat(model, kind) -> list[tuple[tuple, Any]]:
    return list(nnx.to_flat_state(nnx.state(model, kind)))


def _moe_prefixes(model) -> list[tuple]:
    prefixes = [path[:-1] for path, _ in _flat(model, EplbMaps) if path[-1] == "eplb_phy2log"]
    if not prefixes:
        raise ValueError("model: expected a module holding an EplbRoutedMoE, found none")
    return prefixes


def set_maps(model: nnx.Module, state: jeplb.EplbState) -> None:
    """Writes the state's maps into every EplbRoutedMoE of ``model`` and zeroes their counts.

    The model holds one scanned stack of L MoE layers (its map variables are ``[L, ...]``), or
    MoE layers that together count L (a list of stacks or of single layers, taken in the
    model's state order). Call it inside the jitted step, before the forward pass.

    Raises:
      ValueError: when the model's MoE layers do not count ``state.num_layers`` layers of the
        state's E and P, naming the mismatch.
    """
    maps = {"eplb_phy2log": state.phy2log, "eplb_log2phy": state.log2phy,
            "eplb_logcnt": state.logcnt}  # fmt: skip
    updates, start = [], 0
    for prefix in _moe_prefixes(model):
        layer = _get(model, prefix)
        stacked = layer.eplb_phy2log[...].ndim == 2
        n = layer.eplb_phy2log[...].shape[0] if stacked else 1
        for name, full in maps.items():
            part = full[start : start + n]
            want = getattr(layer, name)[...].shape
            got = part.shape if stacked else part.shape[1:]
            if tuple(want) != tuple(got):
                raise ValueError(
                    f"state: {name[5:]} of layers {start}..{start + n - 1} has shape {got}, the "
                    f"model's EplbRoutedMoE at {'.'.join(map(str, prefix))} has {tuple(want)}"
                )
            updates.append((layer, name, part if stacked else part[0]))
        updates.append((layer, "eplb_counts", jnp.zeros_like(layer.eplb_counts[...])))
        start += n
    if start != state.num_layers:
        raise ValueError(f"state: {state.num_layers} layers, the model has {start} MoE layers")
    for layer, name, value in updates:
        getattr(layer, name)[...] = value


def take_counts(model: nnx.Module) -> jax.Array:
    """int32[L, E]: the tokens each logical expert got in every MoE layer since `set_maps`."""
    parts = []
    for prefix in _moe_prefixes(model):
        counts = _get(model, prefix).eplb_counts[...]
        parts.append(counts if counts.ndim == 2 else counts[None])
    return jnp.concatenate(parts, axis=0)


def _get(model, path):
    for key in path:
        model = model[key] if isinstance(key, int) else getattr(model, key)
    return model


def expert_filter(model: nnx.Module):
    """An NNX filter taking the slot parameters (`SLOT_PARAMS`) of every EplbRoutedMoE.

    Use it to split a model's expert weights from the rest, e.g. for training:
    ``graphdef, experts, rest = nnx.split(model, expert_filter(model), ...)``.
    """
    prefixes = set(_moe_prefixes(model))

    def take(path, value) -> bool:
        return (
            isinstance(value, nnx.Param)
            and len(path) > 0
            and path[-1] in SLOT_PARAMS
            and tuple(path[:-1]) in prefixes
        )

    return take


def expert_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The slot parameters of every EplbRoutedMoE: ``{"path.to.wi_0": array, ...}``."""
    flat = nnx.to_flat_state(nnx.state(model, expert_filter(model)))
    return {".".join(map(str, path)): v[...] for path, v in flat}


def set_expert_params(model: nnx.Module, experts: dict[str, jax.Array]) -> None:
    """Writes back what `expert_params` returned (same keys)."""
    for key, value in experts.items():
        path = tuple(int(k) if k.isdigit() else k for k in key.split("."))
        _get(model, path[:-1]).__getattribute__(path[-1])[...] = value


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a MaxText config puts the layer and slot dims of stacked expert parameters."""

    layer_axis: int
    slot_axis: int

    def kwargs(self) -> dict[str, int]:
        return {"layer_axis": self.layer_axis, "slot_axis": self.slot_axis}


def layout(config: Any) -> Layout:
    """The stacked experts' dims for MaxText's ``param_scan_axis`` (1: ``[P, L, ...]``).

    Example:
      >>> import types
      >>> layout(types.SimpleNamespace(param_scan_axis=1)).kwargs()
      {'layer_axis': 1, 'slot_axis': 0}
    """
    axis = int(config.param_scan_axis)
    if axis not in (0, 1):
        raise ValueError(f"config: param_scan_axis must be 0 or 1, got {axis}")
    return Layout(layer_axis=axis, slot_axis=1 - axis)


def place_experts(
    model: nnx.Module,
    logical: dict[str, jax.Array],
    state: jeplb.EplbState,
    *,
    mesh: jax.sharding.Mesh,
    config: Any,
) -> None:
    """Lays logical expert weights (E rows) onto the state's slots in ``model``.

    Args:
      model: holds the EplbRoutedMoE layers.
      logical: `expert_params`' keys, each leaf with E rows where the model has P (a checkpoint
        of the model without redundant experts, in the same ``param_scan_axis`` layout).
      state: the placement (slot p of layer l gets expert ``phy2log[l, p]``).
      mesh: the model's mesh; the slot dim is sharded over the state's expert axis and every
        other dim keeps the sharding of the model's own parameter.
      config: MaxText's config (for ``param_scan_axis``).
    """
    current = expert_params(model)
    if set(logical) != set(current):
        raise ValueError(f"logical: expected the keys {sorted(current)}, got {sorted(logical)}")
    placed = jeplb.place_experts(
        logical, state.phy2log, mesh=mesh, axis_name=state.config.transfer.axis_name,
        **layout(config).kwargs(),
    )  # fmt: skip
    set_expert_params(model, {k: jax.device_put(v, current[k].sharding) for k, v in placed.items()})


def eplb_step(
    model: nnx.Module, state: jeplb.EplbState, *, mesh: jax.sharding.Mesh, config: Any
) -> tuple[jeplb.EplbState, jeplb.StepInfo]:
    """Records the forward's counts and runs `jeplb.eplb_step` on the model's expert weights.

    The weights are moved in place in the model (write the model's state out of the jitted
    step). For training, move the optimizer state with them instead: take the counts with
    `take_counts`, and pass `jeplb.expert_state` parts to `jeplb.eplb_step` yourself.

    Returns:
      ``(state, info)``: the new `jeplb.EplbState` and the step's `jeplb.StepInfo`.
    """
    state = state.record(take_counts(model))
    experts = expert_params(model)
    state, experts, info = jeplb.eplb_step(state, experts, mesh=mesh, **layout(config).kwargs())
    set_expert_params(model, experts)
    return state, info

"""A MaxText-style routed MoE stack in Flax Linen whose expert slots are placed and moved by jeplb.

The layout is the one MaxText-like JAX MoE code keeps (written here from the layout facts alone):

* per layer, gate/up projections ``wi_0``, ``wi_1``: [P, H, F] and the down projection ``wo``:
  [P, F, H] (the expert dim, here the physical slot dim P, first), plus a router ``gate`` [H, E];
* layers stacked by Linen `nn.scan` with ``param_scan_axis`` 0 or 1, so the stacked expert leaves are
  [L, P, ...] (0) or slot-major [P, L, ...] (1): pass ``layer_axis`` / ``slot_axis`` to jeplb to match;
* a mesh ``("data", "expert", "tensor")``; flax logical partitioning maps the slot dim to
  ``"expert"`` and F to ``"tensor"`` (`LOGICAL_RULES`), so ``wi_0`` is sharded
  ``PartitionSpec(None, "expert", None, "tensor")`` (scan axis 0) or ``PartitionSpec("expert", None,
  None, "tensor")`` (scan axis 1), and jeplb moves the rows inside each tensor shard.

Each layer routes every token to its top-k LOGICAL experts, maps them to physical slots with
`jeplb.dispatch_layer` (and returns the counts; the stack's [L, E] counts go to
`EplbState.record`), computes the experts on one of two paths, and combines the K outputs of a
token with `jeplb.combine_topk` (in top-k order):

* ``"dense"``: every slot on every token ([T, P, F] hidden), then each (token, k) picks its slot's row;
* ``"ragged"``: the (token, k) pairs sorted by slot, `jax.lax.ragged_dot` over the slot groups, and
  unsorted back to [T, K, H].

The combine's sum order is the top-k order, not the slot order, so a token's output depends only on
its experts' outputs. The dense path computes each slot as its own batch entry, so its outputs are
bitwise identical before, during and after a rebalance on any backend. The ragged path is too on
XLA:CPU when H and F / tensor are multiples of 32 (its emulated `ragged_dot` is a masked dense dot
over the groups, whose sum order can otherwise depend on a row's group); on the H200 (jax 0.11.2)
XLA's `ragged_dot` result for a row depends on its group, so there the ragged path is equal only
to rounding across a rebalance (docs/integration.md, "A MaxText-style layer").

Letters: L layers, E logical experts, P physical slots, K experts per token, T tokens, H model width
(MaxText's D_model), F expert hidden width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb import combine_topk as combine_topk

from .moe import _check_int

__all__ = [
    "EXPERT_LEAVES",
    "LOGICAL_RULES",
    "MaxTextConfig",
    "MoEStack",
    "combine_topk",
    "init_params",
    "make_step",
    "param_shardings",
]

EXPERT_LEAVES = ("wi_0", "wi_1", "wo")
"""The expert weight leaves of ``params["layers"]``: what `jeplb.eplb_step` moves."""

LOGICAL_RULES = (("layers", None), ("exp", "expert"), ("embed", None), ("mlp", "tensor"))
"""Flax logical axis rules: the slot (expert) dim over "expert", the MLP dim F over "tensor"."""


@dataclasses.dataclass(frozen=True)
class MaxTextConfig:
    """Sizes and choices of the example stack.

    Attributes:
      num_layers: L, scanned MoE layers.
      num_experts: E, logical experts per layer.
      num_slots: P, physical slots per layer (E plus redundant replicas).
      top_k: K, experts per token (<= E).
      d_model: H, model width.
      d_ff: F, hidden width of one expert.
      path: ``"dense"`` (every slot on every token) or ``"ragged"`` (permute, ragged_dot,
        unpermute).
      param_scan_axis: where `nn.scan` stacks the layer dim of the parameters (0 or 1).
      dtype: parameter and activation dtype (the router runs in float32).

    Example:
      >>> MaxTextConfig(param_scan_axis=1).axes
      {'layer_axis': 1, 'slot_axis': 0}
    """

    num_layers: int = 2
    num_experts: int = 8
    num_slots: int = 16
    top_k: int = 2
    d_model: int = 32
    d_ff: int = 64
    path: str = "ragged"
    param_scan_axis: int = 0
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k", "d_model", "d_ff"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_slots", self.num_slots, self.num_experts)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: expected at most num_experts = {self.num_experts}, got {self.top_k}"
            )
        if self.path not in ("dense", "ragged"):
            raise ValueError(f"path: expected 'dense' or 'ragged', got {self.path!r}")
        if self.param_scan_axis not in (0, 1) or isinstance(self.param_scan_axis, bool):
            raise ValueError(f"param_scan_axis: expected 0 or 1, got {self.param_scan_axis!r}")

    @property
    def axes(self) -> dict[str, int]:
        """The ``layer_axis`` / ``slot_axis`` keywords jeplb needs for this stacking."""
        scan = self.param_scan_axis
        return {"layer_axis": scan, "slot_axis": 1 - scan}


def _rms_norm(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def _dense_experts(x, phys, wi_0, wi_1, wo):
    """Every slot on every token, then each pair's slot row. x [T, H], phys int32[T, K] ->
    [T, K, H]."""
    h = jax.nn.silu(jnp.einsum("th,phf->tpf", x, wi_0)) * jnp.einsum("th,phf->tpf", x, wi_1)
    y = jnp.einsum("tpf,pfh->tph", h, wo)  # [T, P, H]
    return jnp.take_along_axis(y, phys[:, :, None], axis=1)


def _ragged_experts(x, phys, wi_0, wi_1, wo):
    """Permute the (token, k) pairs by slot, ragged_dot per slot group, unpermute. x [T, H],
    phys int32[T, K] -> [T, K, H]."""
    t, k = phys.shape
    flat = phys.reshape(-1)  # [T*K]
    order = jnp.argsort(flat, stable=True)  # pairs grouped by slot, slot 0 first
    sizes = jnp.zeros((wi_0.shape[0],), jnp.int32).at[flat].add(1)  # [P]
    xs = x[order // k]  # [T*K, H]
    h = jax.nn.silu(lax.ragged_dot(xs, wi_0, sizes)) * lax.ragged_dot(xs, wi_1, sizes)
    ys = lax.ragged_dot(h, wo, sizes)  # [T*K, H]
    return jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)


class MoELayer(nn.Module):
    """One routed MoE block (pre-norm, residual), the body of the layer scan.

    Attributes:
      config: the `MaxTextConfig`.
    """

    config: MaxTextConfig

    @nn.compact
    def __call__(self, x, log2phy, logcnt):
        """x [T, H]; log2phy int32[E, R_max], logcnt int32[E] this layer's maps. Returns
        ``(x + moe(x) [T, H], counts int32[E])``."""
        cfg = self.config
        e, p, h, f = cfg.num_experts, cfg.num_slots, cfg.d_model, cfg.d_ff

        def param(name, shape, names, dtype):
            batch = tuple(range(len(shape) - 2))  # the slot dim: one fan-in scaled matrix per slot
            init = nn.initializers.lecun_normal(batch_axis=batch)
            return self.param(name, nn.with_logical_partitioning(init, names), shape, dtype)

        gate = param("gate", (h, e), ("embed", None), jnp.float32)
        wi_0 = param("wi_0", (p, h, f), ("exp", "embed", "mlp"), cfg.dtype)
        wi_1 = param("wi_1", (p, h, f), ("exp", "embed", "mlp"), cfg.dtype)
        wo = param("wo", (p, f, h), ("exp", "mlp", "embed"), cfg.dtype)
        tokens = _rms_norm(x)
        with jax.named_scope("router"):
            top, ids = lax.top_k(tokens.astype(jnp.float32) @ gate, cfg.top_k)  # [T, K] logical
            weights = jax.nn.softmax(top, axis=-1)
        with jax.named_scope("eplb_dispatch"):
            phys, counts = jeplb.dispatch_layer(log2phy, logcnt, ids)  # [T, K] slots, [E]
        with jax.named_scope("experts"):
            experts = _dense_experts if cfg.path == "dense" else _ragged_experts
            y = experts(tokens, phys, wi_0, wi_1, wo)  # [T, K, H]
        with jax.named_scope("combine"):
            return x + combine_topk(y, weights.astype(y.dtype)), counts  # in y's dtype


class MoEStack(nn.Module):
    """L `MoELayer` blocks stacked by `nn.scan` (parameters stacked at ``param_scan_axis``).

    Call it with the state's stacked maps: ``model.apply({"params": params}, x, state.log2phy,
    state.logcnt)`` returns ``(y [T, H], counts int32[L, E])``.

    Attributes:
      config: the `MaxTextConfig`.
    """

    config: MaxTextConfig

    @nn.compact
    def __call__(self, x, log2phy, logcnt):
        cfg = self.config
        scanned = nn.scan(
            MoELayer,
            variable_axes={"params": cfg.param_scan_axis},
            split_rngs={"params": True},
            in_axes=(0, 0),  # the maps are [L, ...] whatever the parameter stacking
            out_axes=0,
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(cfg, name="layers")(x, log2phy, logcnt)


def _identity_maps(config: MaxTextConfig):
    """Maps of the placement slot e = expert e (P = E): log2phy [L, E, 1], logcnt [L, E]."""
    lay, e = config.num_layers, config.num_experts
    log2phy = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32)[None, :, None], (lay, e, 1))
    return log2phy, jnp.ones((lay, e), jnp.int32)


def param_shardings(config: MaxTextConfig, mesh: jax.sharding.Mesh) -> Any:
    """The `NamedSharding` of every parameter of ``MoEStack(config)``, from `LOGICAL_RULES`."""
    x = jax.ShapeDtypeStruct((1, config.d_model), config.dtype)
    abstract = jax.eval_shape(MoEStack(config).init, jax.random.key(0), x, *_identity_maps(config))
    specs = nn.get_partition_spec(abstract)["params"]
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)
    return jax.tree.map(lambda s: NamedSharding(mesh, _trimmed(s.spec)), shardings)


def _trimmed(spec: P) -> P:
    """``spec`` without trailing Nones: the form a jitted program's outputs carry, so that the
    parameters compare equal before and after a step."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@functools.lru_cache(maxsize=16)
def _init_program(config: MaxTextConfig, mesh: jax.sharding.Mesh):
    """``MoEStack(config).init`` jitted to the parameters' shardings (compiled once per config)."""
    shardings = param_shardings(config, mesh)
    return jax.jit(MoEStack(config).init, out_shardings={"params": shardings})


def init_params(config: MaxTextConfig, mesh: jax.sharding.Mesh, key: jax.Array, phy2log: Any):
    """Draws a model of E logical experts and lays its experts onto the slots of ``phy2log``.

    The logical model (P = E) is initialised sharded by `LOGICAL_RULES`; `jeplb.place_experts`
    then gives slot p of layer l the weights of expert ``phy2log[l, p]``, its slot dim sharded over
    "expert" and F still over "tensor". The same key gives the same logical model whatever the
    placement (what loading a checkpoint of logical experts does).

    Args:
      config: the `MaxTextConfig` (P = ``config.num_slots``).
      mesh: a mesh with axes "expert" and "tensor" (E, P and F divisible by their sizes).
      key: a `jax.random.key`.
      phy2log: int[L, P] the placement (e.g. ``state.phy2log``).

    Returns:
      ``(params, logical)``: the physical parameters of ``MoEStack(config)`` and the logical
      expert weights {name: [L, E, ...] or [E, L, ...]} they were laid out from.
    """
    # The parameters do not depend on the path: one logical program serves both.
    logical_cfg = dataclasses.replace(config, num_slots=config.num_experts, path="dense")
    x = jnp.zeros((1, config.d_model), config.dtype)
    params = nn.unbox(_init_program(logical_cfg, mesh)(key, x, *_identity_maps(config)))["params"]
    logical = {name: params["layers"][name] for name in EXPERT_LEAVES}
    placed = jeplb.place_experts(logical, phy2log, mesh=mesh, axis_name="expert", **config.axes)
    return {**params, "layers": {**params["layers"], **placed}}, logical


def make_step(config: MaxTextConfig, mesh: jax.sharding.Mesh):
    """A jitted serving step: the stack's forward, the load recorded, then `jeplb.eplb_step`.

    Args:
      config: the `MaxTextConfig`.
      mesh: the ("data", "expert", "tensor") mesh the parameters live on.

    Returns:
      ``step(params, state, x) -> (params, state, y [T, H], info)``, params and state donated
      (the weights move in place); every parameter comes back with the sharding of
      `param_shardings`, so one compilation serves every step.
    """
    model = MoEStack(config)
    shardings = param_shardings(config, mesh)
    # Traced on an Auto mesh the leaves do not say that F is on "tensor": declare it, so the
    # step moves rows inside each shard and gathers nothing.
    expert_specs = {name: shardings["layers"][name] for name in EXPERT_LEAVES}

    def step(params, state, x):
        y, counts = model.apply({"params": params}, x, state.log2phy, state.logcnt)
        state = state.record(counts)  # [L, E] routed pairs of this pass
        experts = {name: params["layers"][name] for name in EXPERT_LEAVES}
        state, experts, info = jeplb.eplb_step(
            state, experts, mesh=mesh, expert_specs=expert_specs, **config.axes
        )
        params = {**params, "layers": {**params["layers"], **experts}}
        return jax.lax.with_sharding_constraint(params, shardings), state, y, info

    return jax.jit(step, donate_argnums=(0, 1))

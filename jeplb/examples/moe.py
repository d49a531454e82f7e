"""An example MoE transformer in Flax NNX whose experts are placed and moved by jeplb.

DeepSeek/Mixtral style: every layer is pre-norm causal self-attention followed by a MoE feed-forward
block (a top-k softmax router over E logical experts, SwiGLU experts). The expert weights of all
layers are stacked in the MaxText layout with a physical slot axis P in place of the expert axis:

* ``wi_0``, ``wi_1``: [L, P, H, F] (gate and up projections), ``wo``: [L, P, F, H],

sharded ``PartitionSpec(None, "ep")``: device d holds slots d * N_local ... (d + 1) * N_local - 1.
Slot p holds logical expert ``state.phy2log[layer, p]``.

Each token's top-k logical experts go through `jeplb.dispatch` (which also records the load) to
physical slots; inside `jax.shard_map` every device gathers the tokens routed to its own slots
(up to ``capacity`` per slot), runs its experts on them, and the per-(token, k) results are summed
over the axis (each has exactly one producer, so the sum is exact). The k results of a token are
combined in top-k order, so a token's output does not depend on which replica or device computed
it: outputs are bitwise identical before, during and after a rebalance.

Letters: L layers, E logical experts, P physical slots, D devices on the "ep" axis,
N_local = P // D, K experts per token, B sequences, S tokens per sequence, T = B * S tokens, H model width, F expert
hidden width, C slot capacity.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src.dispatch import dispatch
from jeplb._src.state import EplbState
from jeplb._src.step import eplb_step

__all__ = ["MoEConfig", "MoETransformer", "make_step"]

_EXPERT_LEAVES = ("wi_0", "wi_1", "wo")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Sizes of the example model.

    Attributes:
      num_layers: L, transformer layers (each has one MoE block).
      num_experts: E, logical experts per layer.
      num_redundant_experts: P - E, extra replica slots per layer.
      top_k: K, experts per token (<= E).
      d_model: H, model width.
      d_ff: F, hidden width of one expert.
      capacity: C, tokens one slot computes per step; (token, k) pairs beyond it are dropped
        (their expert output is zero), as capacity-based MoE layers do. None: T (nothing is ever
        dropped, since a token reaches a slot at most once).
      dtype: parameter and activation dtype (the router runs in float32).
      axis_name: the expert-parallel mesh axis.

    Example:
      >>> MoEConfig(num_layers=2, num_experts=8, num_redundant_experts=8).num_slots
      16
    """

    num_layers: int = 4
    num_experts: int = 16
    num_redundant_experts: int = 8
    top_k: int = 2
    d_model: int = 64
    d_ff: int = 128
    capacity: int | None = None
    dtype: Any = jnp.float32
    axis_name: str = "ep"

    def __post_init__(self):
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("num_redundant_experts", self.num_redundant_experts, 0)
        _check_int("top_k", self.top_k, 1)
        _check_int("d_model", self.d_model, 1)
        _check_int("d_ff", self.d_ff, 1)
        if self.capacity is not None:
            _check_int("capacity", self.capacity, 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k: expected at most num_experts = {self.num_experts}, got {self.top_k}"
            )

    @property
    def num_slots(self) -> int:
        """P = E + num_redundant_experts."""
        return self.num_experts + self.num_redundant_experts

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (one row of every expert leaf)."""
        return 3 * self.d_model * self.d_ff * jnp.dtype(self.dtype).itemsize


def _rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * scale).astype(x.dtype)


def _local_experts(x, phys, wi_0, wi_1, wo, *, axis_name: str, capacity: int):
    """This device's share of one MoE block. Runs inside shard_map.

    Args:
      x: [T, H] every token (replicated).
      phys: int32[T, K] physical slot of each (token, k) (replicated).
      wi_0, wi_1: [N_local, H, F] this device's slots; wo: [N_local, F, H].

    Returns:
      [T, K, H] expert outputs of the pairs routed to this device's slots (zero elsewhere), summed
      over the axis: every pair's output, exactly; and int32[] pairs dropped for capacity.
    """
    t, k = phys.shape
    n_local = wi_0.shape[0]
    first = lax.axis_index(axis_name) * n_local
    flat = phys.reshape(-1)  # [T*K]
    local = flat - first
    mine = (local >= 0) & (local < n_local) & (flat >= 0)
    slot = jnp.where(mine, local, n_local)
    onehot = slot[:, None] == jnp.arange(n_local)[None, :]  # [T*K, N_local]
    rank = jnp.sum(jnp.where(onehot, jnp.cumsum(onehot, axis=0) - 1, 0), axis=-1)
    keep = mine & (rank < capacity)
    pairs = jnp.arange(t * k, dtype=jnp.int32)
    # Which pair sits in each (slot, row) of the capacity buffer; t * k marks an empty row.
    table = (
        jnp.full((n_local, capacity), t * k, jnp.int32)
        .at[jnp.where(keep, slot, n_local), rank]
        .set(pairs, mode="drop")
    )
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    tokens = jnp.where(table < t * k, table // k, t)
    xin = x_pad[tokens]  # [N_local, C, H]
    h = jax.nn.silu(jnp.einsum("nch,nhf->ncf", xin, wi_0)) * jnp.einsum("nch,nhf->ncf", xin, wi_1)
    y = jnp.einsum("ncf,nfh->nch", h, wo)  # [N_local, C, H]
    out = jnp.zeros((t * k + 1, x.shape[1]), y.dtype).at[table].set(y)[: t * k]
    out = lax.psum(out, axis_name)
    dropped = lax.psum(jnp.sum(mine & ~keep).astype(jnp.int32), axis_name)
    return out.reshape(t, k, x.shape[1]), dropped


class MoETransformer(nnx.Module):
    """A small decoder-only MoE transformer whose expert slots follow an `EplbState` placement.

    Args:
      config: the `MoEConfig`.
      mesh: a mesh with the ``config.axis_name`` axis; P must be divisible by its size D.
      rngs: `flax.nnx.Rngs` for the initial parameters.
      phy2log: optional int[L, P] initial placement (default: slot p holds expert p % E, as
        `EplbState.create`). The logical experts are drawn first and then laid out, so the same
        seed gives the same logical model whatever the placement.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> cfg = MoEConfig(num_layers=1, num_experts=4, num_redundant_experts=0, d_model=8, d_ff=16)
      >>> model = MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
      >>> {k: v.shape for k, v in model.experts().items()}  # [L, P, H, F] / [L, P, F, H]
      {'wi_0': (1, 4, 8, 16), 'wi_1': (1, 4, 8, 16), 'wo': (1, 4, 16, 8)}
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        mesh: jax.sharding.Mesh,
        rngs: nnx.Rngs,
        phy2log: Any = None,
    ):
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        if not isinstance(mesh, jax.sharding.Mesh) or config.axis_name not in mesh.axis_names:
            raise ValueError(
                f"mesh: expected a jax.sharding.Mesh with an axis {config.axis_name!r}, got "
                f"{getattr(mesh, 'axis_names', type(mesh).__name__)}"
            )
        d = mesh.shape[config.axis_name]
        if config.num_slots % d:
            raise ValueError(
                f"mesh: P = {config.num_slots} slots are not divisible by the {d} devices of "
                f"axis {config.axis_name!r}"
            )
        lay, e, h, f = config.num_layers, config.num_experts, config.d_model, config.d_ff
        if phy2log is None:
            phy2log = np.tile(np.arange(config.num_slots) % e, (lay, 1))
        phy2log = np.asarray(phy2log)
        if phy2log.shape != (lay, config.num_slots):
            raise ValueError(
                f"phy2log: expected shape [L, P] = {(lay, config.num_slots)}, got {phy2log.shape}"
            )
        self.config = config
        self.mesh = mesh
        dt = config.dtype

        def normal(shape, scale):
            return (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dt)

        self.attn_norm = nnx.Param(jnp.ones((lay, h), dt))
        self.wq = nnx.Param(normal((lay, h, h), h**-0.5))
        self.wk = nnx.Param(normal((lay, h, h), h**-0.5))
        self.wv = nnx.Param(normal((lay, h, h), h**-0.5))
        self.wout = nnx.Param(normal((lay, h, h), h**-0.5))
        self.moe_norm = nnx.Param(jnp.ones((lay, h), dt))
        self.router = nnx.Param(normal((lay, h, e), h**-0.5).astype(jnp.float32))
        logical = {
            "wi_0": normal((lay, e, h, f), h**-0.5),
            "wi_1": normal((lay, e, h, f), h**-0.5),
            "wo": normal((lay, e, f, h), f**-0.5),
        }
        sharding = NamedSharding(mesh, P(None, config.axis_name))
        rows = np.arange(lay)[:, None]
        for name in _EXPERT_LEAVES:
            physical = jax.device_put(logical[name][rows, phy2log], sharding)
            setattr(self, name, nnx.Param(physical))

    # ------------------------------------------------------------------------------ experts

    def experts(self) -> dict[str, jax.Array]:
        """The expert weights as the pytree `jeplb.eplb_step` moves: leaves [L, P, ...]."""
        return {name: getattr(self, name)[...] for name in _EXPERT_LEAVES}

    def set_experts(self, weights: dict[str, jax.Array]) -> None:
        """Replaces the expert weights (e.g. with what `jeplb.eplb_step` returned)."""
        for name in _EXPERT_LEAVES:
            getattr(self, name)[...] = weights[name]

    # ------------------------------------------------------------------------------ forward

    def _attention(self, layer: int, x: jax.Array) -> jax.Array:
        """Single-head causal self-attention; x [B, S, H]."""
        h = _rms_norm(x, self.attn_norm[layer])
        q = h @ self.wq[layer]
        k = h @ self.wk[layer]
        v = h @ self.wv[layer]
        s = x.shape[1]
        logits = jnp.einsum("bqh,bkh->bqk", q, k).astype(jnp.float32) * x.shape[-1] ** -0.5
        causal = jnp.tril(jnp.ones((s, s), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1).astype(x.dtype)
        return jnp.einsum("bqk,bkh->bqh", probs, v) @ self.wout[layer]

    def _moe(self, layer: int, x: jax.Array, route_bias: jax.Array, state: EplbState, record):
        cfg = self.config
        b, s, h = x.shape
        t = b * s
        tokens = _rms_norm(x, self.moe_norm[layer]).reshape(t, h)
        with jax.named_scope("router"):
            logits = tokens.astype(jnp.float32) @ self.router[layer] + route_bias[layer]
            top, ids = lax.top_k(logits, cfg.top_k)  # [T, K]
            gates = jax.nn.softmax(top, axis=-1).astype(x.dtype)
        with jax.named_scope("eplb_dispatch"):
            if record:
                state, phys = dispatch(state, layer, ids)
            else:
                phys = state.log2phy[layer, ids, 0]  # first replica, nothing recorded
        capacity = t if cfg.capacity is None else cfg.capacity
        local = functools.partial(_local_experts, axis_name=cfg.axis_name, capacity=capacity)
        spec = P(cfg.axis_name)
        with jax.named_scope("experts"):
            y, dropped = jax.shard_map(
                local,
                mesh=self.mesh,
                in_specs=(P(), P(), spec, spec, spec),
                out_specs=(P(), P()),
            )(tokens, phys, self.wi_0[layer], self.wi_1[layer], self.wo[layer])
        with jax.named_scope("combine"):
            out = gates[:, 0, None] * y[:, 0]
            for k in range(1, cfg.top_k):  # top-k order: the same sum whatever the placement
                out = out + gates[:, k, None] * y[:, k]
        slot_load = jnp.zeros((cfg.num_slots,), jnp.int32).at[phys.reshape(-1)].add(1, mode="drop")
        return out.reshape(b, s, h), state, slot_load, dropped

    def __call__(
        self, x: jax.Array, route_bias: jax.Array, state: EplbState, *, record: bool = True
    ) -> tuple[jax.Array, EplbState, dict[str, jax.Array]]:
        """Runs the model on a batch.

        Args:
          x: [B, S, H] token vectors.
          route_bias: float[L, E] added to each layer's router logits (the workload's skew; pass
            zeros for the plain router).
          state: the `EplbState` whose maps route the tokens; its load is recorded.
          record: record the routed load (`jeplb.dispatch`); False takes each expert's first
            replica and records nothing (the model without EPLB).

        Returns:
          ``(y [B, S, H], state, aux)``; aux: ``slot_load`` int32[L, P] the (token, k) pairs each
          slot computed, ``dropped`` int32[] pairs dropped for capacity.
        """
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x: expected [B, S, H = {cfg.d_model}], got shape {x.shape}")
        if tuple(route_bias.shape) != (cfg.num_layers, cfg.num_experts):
            raise ValueError(
                f"route_bias: expected [L, E] = {(cfg.num_layers, cfg.num_experts)}, got "
                f"{tuple(route_bias.shape)}"
            )
        if not isinstance(state, EplbState):
            raise TypeError(f"state: expected an EplbState, got {type(state).__name__}")
        x = jnp.asarray(x, cfg.dtype)
        loads, dropped = [], jnp.int32(0)
        for layer in range(cfg.num_layers):
            with jax.named_scope(f"layer_{layer}"):
                x = x + self._attention(layer, x)
                y, state, load, drop = self._moe(layer, x, route_bias, state, record)
                x = x + y
            loads.append(load)
            dropped = dropped + drop
        return x, state, {"slot_load": jnp.stack(loads), "dropped": dropped}


def make_step(model: MoETransformer, *, rebalance: bool = True):
    """A jitted serving step for ``model``: forward, then (optionally) `jeplb.eplb_step`.

    The returned function takes and returns the model's parameters as an `nnx.State` (donated),
    so weights moved by a rebalance are updated in place.

    Args:
      model: the `MoETransformer`.
      rebalance: run `jeplb.eplb_step` after the forward pass (and record the load); False is
        the model without EPLB.

    Returns:
      ``(step, params)``: ``step(params, state, x, route_bias) -> (params, state, y, info, aux)``
      with ``info`` a `jeplb.StepInfo` (None without rebalance), and the model's current params.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> cfg = MoEConfig(num_layers=1, num_experts=4, num_redundant_experts=0, d_model=8, d_ff=16)
      >>> model = MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(0))
      >>> state = EplbState.create(num_layers=1, num_experts=4, num_devices=1,
      ...                          window_size=2, step_interval=2).replicated(mesh)
      >>> step, params = make_step(model)
      >>> for _ in range(2):
      ...     params, state, y, info, aux = step(params, state, jnp.ones((1, 4, 8)),
      ...                                        jnp.zeros((1, 4)))
      >>> int(info.step), bool(info.fired)
      (2, True)
    """
    graphdef, params = nnx.split(model)
    mesh = model.mesh
    # Dense parameters built on one device, uncommitted, placed as the step returns them
    # (replicated), so the step compiles once rather than again after its first call.
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda x: x if x.committed else jax.device_put(x, replicated), params)

    def step(params, state, x, route_bias):
        m = nnx.merge(graphdef, params)
        y, state, aux = m(x, route_bias, state, record=rebalance)
        info = None
        if rebalance:
            state, weights, info = eplb_step(state, m.experts(), mesh=mesh)
            m.set_experts(weights)
        return nnx.state(m), state, y, info, aux

    return jax.jit(step, donate_argnums=(0, 1)), params

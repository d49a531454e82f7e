"""Training the example MoE model with EPLB: replicas that stay identical, a loss that does not move.

The model is `jeplb.examples.MoETransformer` (Flax NNX; expert weights ``wi_0``, ``wi_1`` [L, P, H,
F] and ``wo`` [L, P, F, H], sharded over the "ep" axis), trained with optax Adam on a regression
task: map each token vector x to ``tanh(x @ A)`` for a fixed random teacher matrix A, under the
skewed router bias of a `jeplb.examples.DriftingZipf` workload. One jitted training step:

1. forward and backward: each token's top-k logical experts go through `jeplb.dispatch` to one of
   their replica slots (which records the load); the gradient of a slot covers only the tokens that
   slot computed;
2. `jeplb.sync_replica_grads`: every replica slot of an expert gets the sum of the gradients of all
   its replicas (ascending-slot order), so every replica holds the logical expert's gradient, bitwise
   the same;
3. global-norm clipping with `jeplb.global_norm` (each logical expert counted once, so the norm is
   the reference model's), then the optimizer update (Adam is element-wise: identical gradients
   and moments give identical updates, so replicas stay bitwise identical);
4. `jeplb.eplb_step`: window the load and, when due, re-place the experts, moving the weights and
   the Adam moments (``mu``, ``nu``) that mirror them together, so that every slot keeps the
   optimizer state of the expert it holds (`jeplb.expert_state` finds them by structure).

The gradient sync and the rebalance each take the expert leaves fused into one [L, P, X] array per
dtype: jeplb compiles one transfer program per leaf, and this example is compiled often (tests).

The reference is the same model without redundant experts (P = E, slot p holds expert p, no
rebalancing) from the same initialisation (the logical experts are drawn before they are laid out)
and the same data: its loss curve is what training with EPLB must reproduce, up to the rounding of
summing an expert's gradient in another order.

Letters: L layers, E logical experts, P physical slots, D devices on the "ep" axis, B sequences,
S tokens per sequence, H model width, F expert hidden width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb

from .moe import MoEConfig, MoETransformer
from .workload import DriftingZipf

__all__ = ["TrainRun", "make_train_step", "replicas_identical", "teacher", "train"]

_EXPERTS = ("wi_0", "wi_1", "wo")


def teacher(d_model: int, seed: int = 0) -> np.ndarray:
    """float32[H, H]: the fixed matrix A of the regression target ``tanh(x @ A)``."""
    rng = np.random.default_rng((seed, 2))
    return (rng.standard_normal((d_model, d_model)) * d_model**-0.5).astype(np.float32)


def _on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Leaves not yet placed (built on one device) replicated on ``mesh``, as the step returns
    them, so that the step compiles once and not again after the first call."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, replicated), tree)


def _fuse(tree: Any) -> tuple[list[jax.Array], Any]:
    """The leaves [L, P, ...] of ``tree`` as one [L, P, X] array per dtype, and the inverse.

    jeplb compiles one transfer program per leaf it moves; one array per dtype compiles in a
    fraction of the time (12 s instead of 29 s for this step on a loaded 2-core CPU), at the
    price of copying the leaves on the way in and out. At real sizes move the leaves as they are.
    """
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = sorted({x.dtype.name for x in leaves})
    groups = [[i for i, x in enumerate(leaves) if x.dtype.name == d] for d in dtypes]
    fused = [
        jnp.concatenate([leaves[i].reshape(*leaves[i].shape[:2], -1) for i in g], axis=-1)
        for g in groups
    ]

    def unfuse(fused: list[jax.Array]) -> Any:
        out = list(leaves)
        for g, f in zip(groups, fused, strict=True):
            cuts = np.cumsum([int(np.prod(leaves[i].shape[2:])) for i in g])[:-1]
            for i, part in zip(g, jnp.split(f, cuts.tolist(), axis=-1), strict=True):
                out[i] = part.reshape(leaves[i].shape)
        return jax.tree.unflatten(treedef, out)

    return fused, unfuse


def _clip(grads: dict, phy2log: jax.Array, clip_norm: float) -> tuple[dict, jax.Array]:
    """``optax.clip_by_global_norm`` with each logical expert counted once (`jeplb.global_norm`)."""
    norm = jeplb.global_norm(grads["experts"], phy2log, rest=grads["dense"])
    scale = jnp.where(norm < clip_norm, 1.0, clip_norm / norm)
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def make_train_step(
    model: MoETransformer,
    optimizer: optax.GradientTransformation,
    *,
    rebalance: bool = True,
    clip_norm: float | None = None,
):
    """A jitted training step for ``model``: loss, gradients, replica sync, update, rebalance.

    The parameters are split into ``{"experts": ..., "dense": ...}`` (two `nnx.State`): the expert
    weights [L, P, ...] and everything else; the optimizer state mirrors that split, so
    `jeplb.expert_state` finds the expert weights and their Adam moments by structure.

    Args:
      model: the `MoETransformer` (its slots follow the `jeplb.EplbState` passed to the step).
      optimizer: an optax transformation. Element-wise ones (Adam, SGD, weight decay) keep the
        replicas identical; see docs/training.md for those that take norms.
      rebalance: record the load, sync the replica gradients and run `jeplb.eplb_step`; False is
        the model without EPLB (first replica of every expert, nothing recorded, nothing moved).
      clip_norm: clip the gradients to this global norm before the optimizer, the norm counting
        each logical expert once (`jeplb.global_norm`); None: no clipping.

    Returns:
      ``(step, params, opt_state)``: ``step(params, opt_state, state, x, bias, target) ->
      (params, opt_state, state, out)``; ``out`` holds ``loss`` float32[], ``grad_norm``
      float32[] (NaN without clipping), ``slot_load`` int32[L, P] (the (token, k) pairs each slot
      computed) and ``info`` (a `jeplb.StepInfo`; None without rebalance). ``params``,
      ``opt_state`` and ``state`` are donated.
    """
    mesh = model.mesh
    graphdef, experts, dense = nnx.split(model, lambda path, _: path[0] in _EXPERTS, ...)
    params = _on_mesh({"experts": experts, "dense": dense}, mesh)
    opt_state = _on_mesh(optimizer.init(params), mesh)

    def loss_fn(params, state, x, bias, target):
        m = nnx.merge(graphdef, params["experts"], params["dense"])
        y, state, aux = m(x, bias, state, record=rebalance)
        return jnp.mean(jnp.square(y - target)), (state, aux)

    def step(params, opt_state, state, x, bias, target):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (state, aux)), grads = grad_fn(params, state, x, bias, target)
        if rebalance:  # every replica gets its expert's whole gradient, the same bits
            fused, unfuse = _fuse(grads["experts"])
            fused = jeplb.sync_replica_grads(fused, state.phy2log, mesh=mesh)
            grads = dict(grads, experts=unfuse(fused))
        norm = jnp.float32(jnp.nan)
        if clip_norm is not None:
            grads, norm = _clip(grads, state.phy2log, clip_norm)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        info = None
        if rebalance:  # the weights and the moments that mirror them move together
            parts, put_back = jeplb.expert_state((params, opt_state), params["experts"])
            fused, unfuse = _fuse(parts)
            state, fused, info = jeplb.eplb_step(state, fused, mesh=mesh)
            params, opt_state = put_back(unfuse(fused))
        out = dict(loss=loss, grad_norm=norm, slot_load=aux["slot_load"], info=info)
        return params, opt_state, state, out

    return jax.jit(step, donate_argnums=(0, 1, 2)), params, opt_state


def replicas_identical(experts: dict[str, Any], phy2log: Any) -> bool:
    """True when every slot holding an expert has the same bits as the first slot holding it.

    Args:
      experts: pytree of arrays [L, P, ...] (weights, gradients or optimizer moments).
      phy2log: int[L, P] the placement they follow.
    """
    phy2log = np.asarray(phy2log)
    first = np.argmax(phy2log[:, :, None] == phy2log[:, None, :], axis=-1)  # [L, P]
    rows = np.arange(phy2log.shape[0])[:, None]
    held = phy2log >= 0  # empty slots (-1) hold nothing to compare
    for leaf in jax.tree.leaves(experts):
        a = np.asarray(leaf)
        bits = a.view(np.dtype(f"u{a.dtype.itemsize}"))
        if not np.array_equal(bits[held], bits[rows, first][held]):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """Per-step figures of one training run (numpy arrays of length ``steps``).

    Attributes:
      loss: float32 training loss of each step (before its update).
      max_device_load: int each layer's busiest device's (token, k) pairs, summed over layers.
      mean_device_load: float the mean device's pairs, summed over layers.
      balancedness: float mean / max device load of the step's batch (sum over layers of the
        means over the sum of the maxima; 1.0 is perfect).
      grad_norm: float32 the global gradient norm (each logical expert once; NaN unclipped).
      fired: bool a rebalance was planned in the step (all False without EPLB).
      layers_moved: int layers whose weights (and moments) moved in the step.
      replicas_identical: bool every replica of every expert held the same bits in weights,
        ``mu`` and ``nu`` after the step (None when not checked or without EPLB).
      num_slots: P of the model trained.
      compile_seconds: time to compile the step.
    """

    loss: np.ndarray
    max_device_load: np.ndarray
    mean_device_load: np.ndarray
    balancedness: np.ndarray
    grad_norm: np.ndarray
    fired: np.ndarray
    layers_moved: np.ndarray
    replicas_identical: np.ndarray | None
    num_slots: int
    compile_seconds: float


def train(
    config: MoEConfig,
    *,
    mesh: jax.sharding.Mesh,
    workload: DriftingZipf,
    steps: int,
    eplb: bool = True,
    learning_rate: float = 1e-3,
    window_size: int = 5,
    step_interval: int = 10,
    layers_per_step: int | None = None,
    seed: int = 0,
    check_replicas: bool = False,
    clip_norm: float | None = 1.0,
    on_step=None,
) -> TrainRun:
    """Trains the example model for ``steps`` steps with Adam, with EPLB or as the reference.

    Args:
      config: the model's sizes; ``num_redundant_experts`` is ignored (0) when ``eplb`` is False.
      mesh: a mesh with the config's axis.
      workload: tokens and the skewed router bias of each step (its sizes must match config's).
      steps: training steps.
      eplb: train with EPLB (replicas, gradient sync, rebalancing); False trains the reference:
        the same model with P = E (slot p holds expert p) and no rebalancing, from the same
        initialisation and data.
      learning_rate: Adam's.
      window_size, step_interval, layers_per_step: the `jeplb.EplbState` schedule (None moves all
        layers in one step; an int moves that many layers per step).
      seed: the model's initialisation (the teacher and tokens come from ``workload.seed``).
      clip_norm: global-norm clipping of the gradients (each logical expert counted once);
        None: none.
      check_replicas: after every step, check that the replicas of every expert hold the same
        bits (weights and Adam moments); costs a copy of the expert weights to the host.
      on_step: optional ``on_step(i, loss)`` called after every step (progress).

    Returns:
      A `TrainRun`.
    """
    import time

    if not eplb:
        config = dataclasses.replace(config, num_redundant_experts=0)
    d = mesh.shape[config.axis_name]
    state = jeplb.EplbState.create(
        num_layers=config.num_layers,
        num_experts=config.num_experts,
        num_devices=d,
        num_redundant_experts=config.num_redundant_experts,
        window_size=window_size,
        step_interval=step_interval,
        layers_per_step=layers_per_step,
        axis_name=config.axis_name,
    ).replicated(mesh)
    model = MoETransformer(config, mesh=mesh, rngs=nnx.Rngs(seed), phy2log=state.phy2log)
    step, params, opt_state = make_train_step(
        model, optax.adam(learning_rate), rebalance=eplb, clip_norm=clip_norm
    )
    a = teacher(config.d_model, workload.seed)

    def data(i):
        x, bias = workload.batch_at(i)
        return x, bias, np.tanh(x @ a)

    t = time.perf_counter()
    step = step.lower(params, opt_state, state, *data(0)).compile()
    compile_s = time.perf_counter() - t
    rows: dict[str, list] = {k: [] for k in ("loss", "norm", "load", "fired", "moved", "same")}
    for i in range(steps):
        params, opt_state, state, out = step(params, opt_state, state, *data(i))
        load = np.asarray(out["slot_load"]).reshape(config.num_layers, d, -1).sum(-1)  # [L, D]
        rows["loss"].append(float(out["loss"]))
        rows["norm"].append(float(out["grad_norm"]))
        rows["load"].append(load)
        info = out["info"]
        rows["fired"].append(bool(info.fired) if eplb else False)
        rows["moved"].append(int(np.sum(info.moved)) if eplb else 0)
        if eplb and check_replicas:
            parts, _ = jeplb.expert_state((params, opt_state), params["experts"])
            rows["same"].append(replicas_identical(parts, state.phy2log))
        if on_step is not None:
            on_step(i, rows["loss"][-1])
    load = np.stack(rows["load"])  # [steps, L, D]
    return TrainRun(
        loss=np.asarray(rows["loss"], np.float32),
        max_device_load=load.max(-1).sum(-1),
        mean_device_load=load.mean(-1).sum(-1),
        balancedness=load.mean(-1).sum(-1) / np.maximum(load.max(-1).sum(-1), 1),
        grad_norm=np.asarray(rows["norm"], np.float32),
        fired=np.asarray(rows["fired"]),
        layers_moved=np.asarray(rows["moved"]),
        replicas_identical=np.asarray(rows["same"]) if rows["same"] else None,
        num_slots=config.num_slots,
        compile_seconds=compile_s,
    )

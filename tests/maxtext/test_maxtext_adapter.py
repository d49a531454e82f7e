"""jeplb.integrations.maxtext against the real MaxText 0.2.5 package on 8 CPU devices.

MaxText's own config (base.yml through pyconfig), its mesh (get_mesh_from_config: expert axis 8),
its logical sharding rules, its layer scan (maxtext.layers.nnx_scan, param_scan_axis=1: expert
parameters [P, L, ...]) and its RoutedMoE, dense dropless path, with P = 24 slots behind a 16-wide
router. Serving: every slot holds its expert exactly after each of several rebalances, outputs are
bitwise identical across them, balancedness rises, one compilation, shardings kept. Training (optax
Adam): replicas and their moments bitwise identical after every step and the loss within 1e-5
relative of MaxText's plain RoutedMoE with the E logical experts (no redundant slots).

MaxText needs Python >= 3.12: `.ci/run` runs this directory in its own environment; elsewhere the
module is skipped.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("maxtext.layers.moe", reason="MaxText 0.2.x (Python >= 3.12) not installed")

import maxtext
import optax
from flax import linen as nn
from flax import nnx
from maxtext.configs import pyconfig
from maxtext.layers import initializers, moe, nnx_scan
from maxtext.utils import maxtext_utils
from maxtext.utils import sharding as mt_sharding

import jeplb
from jeplb.integrations import maxtext as jm
from tests.transfer_model import compilations

pytestmark = pytest.mark.devices(8)

L, E, R, K, H = 2, 16, 8, 2, 32  # P = 24 slots, 3 per device on the expert axis of 8
STEPS = 7  # rebalances at the end of steps 1, 3, 5 (step_interval 2)


@functools.cache
def _config(**overrides):
    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    options = dict(
        run_name="jeplb", enable_checkpointing=False, skip_jax_distributed_system=True,
        hardware="cpu", num_experts=E, num_experts_per_tok=K, base_emb_dim=H,
        base_moe_mlp_dim=H, base_mlp_dim=H, base_num_decoder_layers=L, ici_expert_parallelism=8,
        sparse_matmul=False, capacity_factor=-1, per_device_batch_size=1, max_target_length=8,
        dtype="float32", weight_dtype="float32", load_balance_loss_weight=0.01,
    )  # fmt: skip
    options.update(overrides)
    return pyconfig.initialize([None, base], **options)


class Stack(nnx.Module):
    """L MaxText MoE layers in MaxText's NNX layer scan, residual around each."""

    def __init__(self, cfg, mesh, rngs, *, redundant: int | None):
        def factory(r):
            args = (cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
                    ("embed", None), r)  # fmt: skip
            kw = dict(
                intermediate_dim=cfg.moe_mlp_dim, dtype=cfg.dtype, weight_dtype=cfg.weight_dtype
            )
            if redundant is None:
                return moe.RoutedMoE(*args, **kw)
            return jm.EplbRoutedMoE(*args, num_redundant_experts=redundant, **kw)

        self.cfg = cfg
        self.layers = nnx_scan.create_scanned_layers(
            factory, length=L, param_scan_axis=cfg.param_scan_axis, metadata_axis_name="layers",
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        def layer(module, carry):
            h, aux = carry
            y, lb_loss, _ = module(h)
            return h + y, aux + lb_loss

        return nnx_scan.apply_scanned_layers(
            self.layers, (x, jnp.zeros((), jnp.float32)), length=L,
            param_scan_axis=self.cfg.param_scan_axis, apply_fn=layer,
        )  # fmt: skip


def _build(cfg, mesh, redundant):
    """The model on MaxText's shardings (its logical rules), and those shardings."""
    with nn.logical_axis_rules(cfg.logical_axis_rules):

        def create():
            return Stack(cfg, mesh, nnx.Rngs(0), redundant=redundant)

        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = mt_sharding.nnx_construct_named_sharding(abstract, mesh)
        variables = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, variables), shardings


PATHS = {"dense": {}, "sparse": dict(sparse_matmul=True, use_ring_of_experts=True, megablox=False)}


@functools.cache
def _setup(path: str = "dense"):
    cfg = _config(**PATHS[path])
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    model, shardings = _build(cfg, mesh, R)
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=8, num_redundant_experts=R, window_size=2,
        step_interval=2, axis_name="expert",
    ).replicated(mesh)  # fmt: skip
    # The model's first E slots as the logical experts, laid onto the state's placement.
    logical = {k: np.asarray(v[:E]) for k, v in jm.expert_params(model).items()}
    jm.place_experts(model, logical, state, mesh=mesh, config=cfg)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    x = [
        jax.device_put(jax.random.normal(jax.random.key(i), (8, 8, H)) + s, batch)
        for i, s in ((1, 1.0), (2, -1.0))
    ]  # fmt: skip  two opposite skews of the router
    return cfg, mesh, model, shardings, state, logical, x


def _slots_hold_their_experts(experts, logical, phy2log):
    """Every slot p of layer l holds expert phy2log[l, p]'s weights, bit for bit."""
    for name, w in experts.items():
        w, want = np.asarray(w), logical[name]  # [P, L, ...], [E, L, ...]
        for layer in range(L):
            for slot, e in enumerate(np.asarray(phy2log)[layer]):
                np.testing.assert_array_equal(w[slot, layer], want[e, layer], err_msg=name)


@functools.cache
def _serve(path: str):
    cfg, mesh, model, shardings, state, logical, xs = _setup(path)
    graphdef, variables = nnx.split(model)
    specs_in = jax.tree.map(lambda a: a.sharding, variables)

    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=(shardings, None, None, None))
    def step(variables, state, x):
        model = nnx.merge(graphdef, variables)
        jm.set_maps(model, state)
        y, _ = model(x)
        state, info = jm.eplb_step(model, state, mesh=mesh, config=cfg)
        nnx.pop(model, nnx.Intermediate)  # what MaxText's sparse path sows
        return nnx.state(model), state, y, info

    runs = []
    with compilations() as compiled:
        for i in range(STEPS):
            before = np.asarray(state.phy2log)
            variables, state, y, info = step(variables, state, xs[(i // 2) % 2])
            runs.append(dict(y=np.asarray(y), fired=bool(info.fired), phy2log=before,
                             after=np.asarray(state.phy2log),
                             balance=float(info.balancedness),
                             experts={k: np.asarray(v) for k, v in
                                      jm.expert_params(nnx.merge(graphdef, variables)).items()}))  # fmt: skip
    specs_out = jax.tree.map(lambda a: a.sharding, variables)
    slot_spec = jm.expert_params(nnx.merge(graphdef, variables))["layers.wi_0"].sharding.spec
    return runs, len(compiled), specs_in, specs_out, slot_spec, logical


@pytest.mark.parametrize("path", PATHS)
def test_serving_every_slot_exact_after_each_rebalance(path):
    runs, *_, logical = _serve(path)
    assert sum(r["fired"] for r in runs) >= 3
    for r in runs:
        _slots_hold_their_experts(r["experts"], logical, r["after"])
    assert any((r["after"] != r["phy2log"]).any() for r in runs)


def test_serving_outputs_bitwise_identical_across_rebalances():
    runs, *_ = _serve("dense")
    # Steps 0-1 and 4-5 see batch a, 2-3 and 6 batch b; rebalances in between move experts.
    for i, j in ((0, 1), (0, 4), (0, 5), (2, 3), (2, 6)):
        np.testing.assert_array_equal(runs[i]["y"], runs[j]["y"])
    assert not np.array_equal(runs[0]["phy2log"], runs[4]["phy2log"])


@pytest.mark.parametrize("path", PATHS)
def test_serving_balancedness_rises(path):
    runs, *_ = _serve(path)
    balance = [r["balance"] for r in runs]  # 0.34 on the initial placement, 0.58 to 0.94 after
    assert min(balance[1:]) > balance[0] + 0.15, balance
    assert max(balance) > 0.9, balance


@pytest.mark.parametrize("path", PATHS)
def test_serving_one_compilation_and_shardings_kept(path):
    _, compiled, specs_in, specs_out, spec, _ = _serve(path)
    assert compiled == 1
    assert jax.tree.leaves(specs_in) == jax.tree.leaves(specs_out)
    assert spec[0] == "expert", spec  # the slot dim on MaxText's expert axis, [P, L, ...]


def test_sparse_path_counts_what_the_dense_path_counts():
    """The sparse path counts once at global view: the same loads, so the same placements.

    Layer 0 only: the layers after it see layer 0's outputs, and MaxText's sparse path on XLA:CPU
    computes other outputs than its dense path (docs/integration.md).
    """
    dense, sparse = _serve("dense")[0], _serve("sparse")[0]
    assert any((d["after"][0] != d["phy2log"][0]).any() for d in dense)
    for d, s in zip(dense, sparse):
        np.testing.assert_array_equal(d["after"][0], s["after"][0])


def test_sparse_path_is_maxtext_sparse_path_without_replicas():
    """R = 0, same weights: the adapter's sparse path gives MaxText's own sparse layer's bits."""
    cfg, mesh, *_ = _setup("sparse")
    ours, _ = _build(cfg, mesh, 0)
    theirs, _ = _build(cfg, mesh, None)
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = jax.random.normal(jax.random.key(3), (8, 8, H)) + 1.0
    (y1, a1), (y2, a2) = ours(x), theirs(x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert float(a1) == float(a2)  # the load-balance loss, on logical ids


def test_dense_combine_matches_maxtext_routed_moe():
    """With R = 0 and identical weights the adapter is MaxText's layer up to the combine's order."""
    cfg, mesh, *_ = _setup()
    ours, _ = _build(cfg, mesh, 0)
    theirs, _ = _build(cfg, mesh, None)
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = jax.random.normal(jax.random.key(3), (8, 8, H))
    (y1, a1), (y2, a2) = ours(x), theirs(x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(a1), float(a2), rtol=1e-6)  # load-balance loss, logical


# -- training -------------------------------------------------------------------------------------


def _train_step(graphdef, mesh, tx, eplb: bool):
    def loss_fn(params, rest, state, x):
        # Fresh variables for this trace: the maps are written inside the differentiated function.
        model = nnx.merge(graphdef, *params, jax.tree.map(jnp.asarray, rest))
        if eplb:
            jm.set_maps(model, state)
        y, aux = model(x)
        loss = jnp.mean((y - jnp.sin(x)) ** 2) + aux
        return loss, jm.take_counts(model) if eplb else None

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, state, rest, x):
        (loss, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, state, x)
        if eplb:
            experts = jeplb.sync_replica_grads(
                grads[0], state.phy2log, mesh=mesh, axis_name="expert", layer_axis=1, slot_axis=0
            )
            grads = (experts, grads[1])
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if eplb:
            state = state.record(counts)
            parts, put_back = jeplb.expert_state((params, opt_state), params[0])
            state, parts, _ = jeplb.eplb_step(state, parts, mesh=mesh, layer_axis=1, slot_axis=0)
            params, opt_state = put_back(parts)
        return params, opt_state, state, loss

    return step


@functools.cache
def _train():
    cfg, mesh, _, _, _, logical, xs = _setup()
    tx = optax.adam(1e-2)
    curves, replicas, router = {}, [], None
    for eplb in (True, False):
        model, _ = _build(cfg, mesh, R if eplb else None)
        state = jeplb.EplbState.create(
            num_layers=L, num_experts=E, num_devices=8, num_redundant_experts=R if eplb else 0,
            window_size=2, step_interval=2, axis_name="expert",
        ).replicated(mesh)  # fmt: skip
        if eplb:
            jm.place_experts(model, logical, state, mesh=mesh, config=cfg)
            router = jax.tree.map(jnp.copy, nnx.state(model.layers.gate))
        else:  # MaxText's own layer with the E logical experts and the same router
            for name, w in logical.items():
                param = getattr(model.layers, name.split(".")[-1])
                param[...] = jax.device_put(w, param[...].sharding)
            nnx.update(model.layers.gate, router)
        graphdef, experts, dense, rest = nnx.split(model, _slot_params, nnx.Param, ...)
        params = (experts, dense)
        opt_state = tx.init(params)
        step = _train_step(graphdef, mesh, tx, eplb)
        losses = []
        for i in range(STEPS):
            params, opt_state, state, loss = step(params, opt_state, state, rest, xs[(i // 2) % 2])
            losses.append(float(loss))
            if eplb:
                trees = (params[0], opt_state[0].mu[0], opt_state[0].nu[0])
                replicas.append((np.asarray(state.phy2log), *map(_numpy, trees)))
        curves[eplb] = np.array(losses)
    return curves, replicas


def _numpy(tree):
    return [np.asarray(w) for w in jax.tree.leaves(tree)]


def _slot_params(path, value):
    return isinstance(value, nnx.Param) and path[-1] in jm.SLOT_PARAMS


def test_training_replicas_and_moments_bitwise_identical():
    _, replicas = _train()
    moved = 0
    for phy2log, *trees in replicas:
        for tree in trees:
            for w in tree:  # [P, L, ...]
                for layer in range(L):
                    for e in range(E):
                        slots = np.flatnonzero(phy2log[layer] == e)
                        moved += len(slots) - 1
                        for s in slots[1:]:
                            np.testing.assert_array_equal(w[s, layer], w[slots[0], layer])
    assert moved > 0


def test_training_loss_matches_model_without_redundant_experts():
    curves, _ = _train()
    assert curves[True][-1] < curves[True][0]  # it learns
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)


# -- what the adapter refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(capacity_factor=1.0), "capacity_factor"),
        (dict(sparse_matmul=True, use_ring_of_experts=False), "use_ring_of_experts"),
    ],
)
def test_refused_configurations_name_the_key(overrides, words):
    cfg = _config(**overrides)
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    with pytest.raises(ValueError, match=words):
        jm.EplbRoutedMoE(
            cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
            ("embed", None), nnx.Rngs(0), num_redundant_experts=R,
        )  # fmt: skip


def test_slots_not_divisible_by_expert_axis():
    cfg = _config()
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        jm.EplbRoutedMoE(
            cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
            ("embed", None), nnx.Rngs(0), num_redundant_experts=3,
        )  # fmt: skip

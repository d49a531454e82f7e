"""jeplb.integrations.maxtext serving against the real MaxText 0.2.5 package on 8 CPU devices.

Both expert paths (dense; sparse with the ring of experts, the one XLA:CPU compiles), seven steps
of one jitted step on two opposite skews, three rebalances: every slot holds its expert exactly
after each, outputs bitwise identical across them (dense) or within the rounding MaxText's own
sparse layer shows when its experts are laid out in another order (sparse), balancedness rises,
one compilation, shardings kept; and the adapter against MaxText's own RoutedMoE. Forwards run in
MaxText's mesh and logical axis rules (`rules`), as MaxText runs its models. MaxText needs
Python >= 3.12: `.ci/run` runs this directory in its own environment; elsewhere the module is
skipped.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("maxtext.layers.moe", reason="MaxText 0.2.x (Python >= 3.12) not installed")

from flax import linen as nn
from flax import nnx
from maxtext.layers import initializers
from maxtext.utils import maxtext_utils

import jeplb
from jeplb.integrations import maxtext as jm
from tests.maxtext.maxtext_model import PATHS, STEPS, E, H, K, L, R, build, maxtext_config, setup
from tests.maxtext.maxtext_model import rules as maxtext_rules
from tests.transfer_model import compilations

pytestmark = pytest.mark.devices(8)


def _slots_hold_their_experts(experts, logical, phy2log):
    """Every slot p of layer l holds expert phy2log[l, p]'s weights, bit for bit."""
    for name, w in experts.items():
        w, want = np.asarray(w), logical[name]  # [P, L, ...], [E, L, ...]
        for layer in range(L):
            for slot, e in enumerate(np.asarray(phy2log)[layer]):
                np.testing.assert_array_equal(w[slot, layer], want[e, layer], err_msg=name)


@functools.cache
def _serve(path: str):
    cfg, mesh, model, shardings, state, logical, xs = setup(path)
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
    with compilations() as compiled, maxtext_rules(cfg, mesh):
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
    balance = [r["balance"] for r in runs]  # 0.43 on the initial placement, 0.70 to 0.93 after
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

    Every layer: the sparse path computes the dense path's function, its outputs within one ulp
    at their largest magnitude (the sparse path's own tolerance, below; 2.4e-7 measured), so
    layer 1 sees the same inputs up to rounding and its router picks the same top-k.
    """
    dense, sparse = _serve("dense")[0], _serve("sparse")[0]
    for layer in range(L):
        assert any((d["after"][layer] != d["phy2log"][layer]).any() for d in dense)
    for d, s in zip(dense, sparse, strict=True):
        np.testing.assert_array_equal(d["after"], s["after"])
        ulp = np.spacing(np.abs(d["y"]).max())
        np.testing.assert_allclose(s["y"], d["y"], rtol=0, atol=ulp)


@functools.cache
def _maxtext_sparse_relaid():
    """MaxText's own sparse layer (R = 0) on the serving batches, its E experts in 6 slot orders.

    The logical experts and the router of the served model; order 0 is the identity, the others
    permute the expert kernels' rows and the router's columns alike: the same function, so the
    outputs differ only by how MaxText's sparse combine groups each token's K adds (per expert
    shard, then a reduce-scatter over the 8 shards), which the order decides. Returns
    ``({order: [y per batch]}, max |y|)``.
    """
    cfg, mesh, *_, logical, xs = setup("sparse")
    router = nnx.state(build(cfg, mesh, R)[0].layers.gate)  # the served model's (same init)
    theirs, _ = build(cfg, mesh, None)
    graphdef = nnx.graphdef(theirs)
    forward = jax.jit(lambda variables, x: nnx.merge(graphdef, variables)(x)[0])
    orders = [np.arange(E), np.arange(E)[::-1]]
    orders += [np.random.default_rng(seed).permutation(E) for seed in range(4)]
    out = {}
    for i, order in enumerate(orders):
        for name, w in logical.items():  # [E, L, ...]
            param = getattr(theirs.layers, name.split(".")[-1])
            param[...] = jax.device_put(w[order], param[...].sharding)
        nnx.update(theirs.layers.gate, jax.tree.map(lambda k, o=order: k[..., o], router))
        with maxtext_rules(cfg, mesh):
            out[i] = [np.asarray(forward(nnx.state(theirs), x)) for x in xs]
    return out, max(float(np.abs(y).max()) for y in out[0])


def test_sparse_outputs_stable_across_rebalances_within_maxtexts_own_rounding():
    """Sparse path: every step's outputs, before and after each of three rebalances, are MaxText's
    own sparse layer's (R = 0, the same experts and router) within that layer's own tolerance.

    MaxText's sparse combine adds each token's K weighted expert outputs per expert shard, then
    over the shards (a reduce-scatter), so the slots' layout decides how those adds group: its
    own layer is not bitwise stable when its experts are laid out in another order (the same
    function). Measured here over 5 other orders: up to 2.4e-7, half a unit in the last place at
    the outputs' largest magnitude (4.8: one ulp there is 4.8e-7). That ulp is the tolerance; the
    measured spread must be nonzero and within it. A rebalance moves the adapter's slots the same
    way, and its outputs may not move further. Outputs computed with the wrong experts (MaxText's
    specs replicated, no axis rules) are 0.09 off.
    """
    runs, *_ = _serve("sparse")
    relaid, scale = _maxtext_sparse_relaid()
    tol = float(np.spacing(np.float32(scale)))  # one ulp at the outputs' largest magnitude
    own = max(
        float(np.abs(y - y0).max())
        for order, ys in relaid.items() if order
        for y, y0 in zip(ys, relaid[0], strict=True)
    )  # fmt: skip
    assert 0.0 < own <= tol, (own, tol)
    for i, r in enumerate(runs):
        ref = relaid[0][(i // 2) % 2]  # steps 0-1 and 4-5 batch a, 2-3 and 6 batch b
        assert np.abs(r["y"] - ref).max() <= tol, (i, np.abs(r["y"] - ref).max(), tol)
    for i, j in ((0, 4), (0, 5), (2, 3), (2, 6)):  # before and after rebalances
        assert np.abs(runs[i]["y"] - runs[j]["y"]).max() <= tol
    assert not np.array_equal(runs[0]["phy2log"], runs[4]["phy2log"])
    assert not np.array_equal(runs[2]["phy2log"], runs[6]["phy2log"])


def test_sparse_path_is_maxtext_sparse_path_without_replicas():
    """R = 0, same weights: the adapter's sparse path gives MaxText's own sparse layer's bits."""
    cfg, mesh, *_ = setup("sparse")
    ours, _ = build(cfg, mesh, 0)
    theirs, _ = build(cfg, mesh, None)
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = jax.random.normal(jax.random.key(3), (8, 8, H)) + 1.0
    with maxtext_rules(cfg, mesh):
        (y1, a1), (y2, a2) = ours(x), theirs(x)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert float(a1) == float(a2)  # the load-balance loss, on logical ids


def test_sparse_path_refuses_to_run_without_maxtexts_axis_rules():
    """Without MaxText's logical axis rules its shard_map replicates the expert kernels and the
    ring of experts computes with other shards' experts; the adapter refuses instead."""
    cfg, mesh, *_ = setup("sparse")
    ours, _ = build(cfg, mesh, R)
    x = jax.random.normal(jax.random.key(3), (8, 8, H))
    with pytest.raises(RuntimeError, match="logical_axis_rules"):
        ours(x)


def test_dense_combine_matches_maxtext_routed_moe():
    """With R = 0 and identical weights the adapter is MaxText's layer up to the combine's order."""
    cfg, mesh, *_ = setup()
    ours, _ = build(cfg, mesh, 0)
    theirs, _ = build(cfg, mesh, None)
    nnx.update(theirs, nnx.state(ours, nnx.Param))
    x = jax.random.normal(jax.random.key(3), (8, 8, H))
    with maxtext_rules(cfg, mesh):
        (y1, a1), (y2, a2) = ours(x), theirs(x)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-5, atol=1e-6)
    assert float(a1) == float(a2)  # the load-balance loss, on logical ids


# -- what the adapter refuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(capacity_factor=1.0), "capacity_factor"),
        (dict(sparse_matmul=True, use_ring_of_experts=False), "use_ring_of_experts"),
        (dict(PATHS["sparse"], megablox=False), "megablox"),
        (
            dict(
                PATHS["sparse"],
                decoder_block="deepseek",
                routed_bias=True,
                routed_bias_update_rate=0.01,
            ),
            "routed_bias",
        ),
    ],
)
def test_refused_configurations_name_the_key(overrides, words):
    cfg = maxtext_config(**overrides)
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    with pytest.raises(ValueError, match=words):
        jm.EplbRoutedMoE(
            cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
            ("embed", None), nnx.Rngs(0), num_redundant_experts=R,
        )  # fmt: skip


def test_slots_not_divisible_by_expert_axis():
    cfg = maxtext_config()
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        jm.EplbRoutedMoE(
            cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
            ("embed", None), nnx.Rngs(0), num_redundant_experts=3,
        )  # fmt: skip


def test_set_maps_refuses_a_state_of_other_sizes():
    cfg, mesh, *_ = setup()
    model, _ = build(cfg, mesh, R)
    before = jm.take_counts(model)
    for other, words in (
        (dict(num_layers=L + 1, num_experts=E, num_redundant_experts=R), "state: 3 layers"),
        (dict(num_layers=L, num_experts=E, num_redundant_experts=R + 8), "phy2log"),
    ):
        state = jeplb.EplbState.create(num_devices=8, axis_name="expert", **other)
        with pytest.raises(ValueError, match=words):
            jm.set_maps(model, state)
    np.testing.assert_array_equal(jm.take_counts(model), before)  # nothing written


def test_use_in_maxtext_puts_slots_into_maxtext_decoder_layers():
    """One call: MaxText's own Mixtral decoder layer (attention + MoE) built on slots."""
    from maxtext.layers import moe
    from maxtext.models import mixtral

    cfg = maxtext_config(
        decoder_block="mixtral", base_num_query_heads=4, base_num_kv_heads=4, head_dim=8,
        attention="dot_product",
    )  # fmt: skip
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    layers = {}
    for redundant in (None, 0, R):
        with nn.logical_axis_rules(cfg.logical_axis_rules), contextlib.ExitStack() as stack:
            if redundant is not None:
                stack.enter_context(jm.use_in_maxtext(num_redundant_experts=redundant))
            layers[redundant] = mixtral.MixtralDecoderLayer(cfg, mesh, "train", rngs=nnx.Rngs(0))
    assert moe.RoutedMoE is jm._RoutedMoE  # restored
    block = layers[R].MoeBlock_0
    assert isinstance(block, jm.EplbRoutedMoE)
    assert block.wi_0[...].shape == (E + R, H, cfg.mlp_dim)
    assert block.gate.kernel[...].shape == (H, E)
    assert type(layers[None].MoeBlock_0) is moe.RoutedMoE

    # With R = 0 and the same parameters, MaxText's layer up to the combine's rounding.
    nnx.update(layers[0], nnx.state(layers[None], nnx.Param))
    x = jax.random.normal(jax.random.key(0), (8, 8, H))
    args = (jnp.ones((8, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (8, 8)), True, "train")
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.logical_axis_rules):
        for redundant in (0, R):
            jm.set_maps(
                layers[redundant],
                jeplb.EplbState.create(num_layers=1, num_experts=E, num_devices=8,
                                       num_redundant_experts=redundant, axis_name="expert"),
            )  # fmt: skip
        ours, theirs = layers[0](x, *args)[0], layers[None](x, *args)[0]
        layers[R](x, *args)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    counts = np.asarray(jm.take_counts(layers[R]))
    assert counts.shape == (1, E) and counts.sum() == 8 * 8 * K


def test_docstring_examples_run():
    import doctest

    failed, tried = doctest.testmod(jm, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failed == 0

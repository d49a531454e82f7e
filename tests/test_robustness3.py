"""Robustness, round 3: each test pins one class of fault that gave a silent wrong result or an
error naming nothing, and fails without its fix.

x64 cases run inside ``jax.enable_x64(True)`` so the rest of the suite keeps 32-bit defaults.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import checks
from jeplb._src.transfer import layout
from tests.helpers import mesh_of
from tests.transfer_model import check_rows, make_plan

L, N, D = 2, 2, 8  # layers, slots per device, devices
PT = N * D


# ------------------------------------------------------------------ 1. x64 ids in dispatch


def test_x64_dispatch_range_checks_ids_before_the_int32_cast():
    # An int64 id of 2**32 + 1 cast to int32 first reads as expert 1: it must map to -1, uncounted.
    log2phy = jnp.array([[0, 2], [1, -1], [3, -1]], jnp.int32)
    logcnt = jnp.array([2, 1, 1], jnp.int32)
    with jax.enable_x64(True):
        ids = jnp.array([[2**32 + 1, 0], [1, -(2**32) + 2]], jnp.int64)
        phys, counts = jax.jit(jeplb.dispatch_layer)(log2phy, logcnt, ids)
        assert phys[0, 0] == -1 and phys[1, 1] == -1
        assert phys[1, 0] == 1
        assert counts.tolist() == [1, 1, 0]


def test_x64_dispatch_range_checks_the_device_index_before_the_int32_cast():
    # Expert 0 has a replica on device 1 (slot 2); a device index 2**32 + 1 is no device at all,
    # so the choice is the plain hash one, not device 1's replica.
    log2phy = jnp.array([[0, 2], [1, -1]], jnp.int32)
    logcnt = jnp.array([2, 1], jnp.int32)
    ids = jnp.zeros((16, 1), jnp.int32)
    kw = dict(replica_choice="local", slots_per_device=2, num_devices=2)
    with jax.enable_x64(True):
        f = jax.jit(lambda dev: jeplb.dispatch_layer(log2phy, logcnt, ids, device_index=dev, **kw))
        far = f(jnp.int64(2**32 + 1))[0]
        on_one = f(jnp.int64(1))[0]
    plain = jeplb.dispatch_layer(log2phy, logcnt, ids)[0]
    assert set(on_one.ravel().tolist()) == {2}
    np.testing.assert_array_equal(far, plain)
    assert set(plain.ravel().tolist()) == {0, 2}


# ---------------------------------------------------- 4. a -1 slot holding inf or NaN in norms


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_global_norm_ignores_what_a_minus_one_slot_holds(bad):
    g = jnp.array([[[3.0], [4.0], [3.0], [bad]]])  # expert 0 in slots 0 and 2, slot 3 empty
    m = jnp.array([[0, 1, 0, -1]])
    assert float(global_norm(g, m)) == 5.0
    assert float(jax.jit(global_norm)(g, m)) == 5.0


def global_norm(g, m):
    return jeplb.global_norm(g, m)


# -------------------------------------------------------- 5, 11. combine_topk's result dtype

DTYPES = ["bfloat16", "float16", "float32", "int8", "int32", "uint8", "float8_e4m3fn"]


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", ["bfloat16", "float32", "int32"])
def test_combine_topk_promotes_outputs_and_weights(out_dtype, w_dtype):
    y = jnp.array([[[1, 2], [8, 4]]]).astype(out_dtype)  # [T = 1, K = 2, H = 2]
    w = jnp.array([[1.0, 0.5]] if w_dtype != "int32" else [[1, 2]]).astype(w_dtype)
    if out_dtype == "float8_e4m3fn" and w_dtype != "int32":  # JAX promotes fp8 with no float
        with pytest.raises(TypeError, match=r"expert_out, weights: JAX has no promotion"):
            jeplb.combine_topk(y, w)
        return
    got = jeplb.combine_topk(y, w)
    dtype = jnp.result_type(y, w)
    assert got.dtype == dtype
    want = np.asarray(w, np.float64)[0] @ np.asarray(y, np.float64)[0]
    np.testing.assert_array_equal(np.asarray(got, np.float64)[0], want.astype(dtype))


def test_combine_topk_int_outputs_with_fractional_weights():
    got = jeplb.combine_topk(jnp.array([[[1, 2], [10, 20]]], jnp.int32), jnp.array([[0.75, 0.25]]))
    assert got.dtype == jnp.float32 and got.tolist() == [[3.25, 6.5]]


def test_combine_topk_with_k_zero_gives_zeros():
    got = jeplb.combine_topk(jnp.zeros((3, 0, 4), jnp.bfloat16), jnp.zeros((3, 0), jnp.float32))
    assert got.shape == (3, 4) and got.dtype == jnp.float32 and not got.any()


# ------------------------------------------------------------- 17, 18. loads and the policy


def test_bfloat16_loads_are_real_loads():
    load = jnp.array([[3.0, 1.0, 2.0, 5.0]], jnp.bfloat16)
    m, _, _ = jeplb.rebalance_experts(load, 6, 1, 1, 2)
    want, _, _ = jeplb.rebalance_experts(load.astype(jnp.float32), 6, 1, 1, 2)
    np.testing.assert_array_equal(m, want)
    np.testing.assert_allclose(
        jeplb.device_loads(m, load, 2), jeplb.device_loads(m, load.astype(jnp.float32), 2)
    )
    got = jeplb.balancedness(m, load, 2).balancedness
    assert float(got) == float(jeplb.balancedness(m, load.astype(jnp.float32), 2).balancedness)


def test_x64_migration_policy_warns_nothing():
    load = np.random.default_rng(0).integers(0, 100, (2, 8))  # 4 groups on 2 nodes: hierarchical
    with jax.enable_x64(True), warnings.catch_warnings():
        warnings.simplefilter("error")
        old, _, _ = jeplb.rebalance_experts(load, 12, 4, 2, 4)
        new, _, _ = jeplb.rebalance_experts(load[:, ::-1].copy(), 12, 4, 2, 4, old_phy2log=old)
    assert new.dtype == jnp.int32 and new.shape == (2, 12)


# ------------------------------------------------------------------------ 10, 16. state files


def _small_state():
    return jeplb.EplbState.create(
        num_layers=2, num_experts=4, num_devices=2, num_redundant_experts=2, window_size=3,
        step_interval=5,
    )  # fmt: skip


def test_byte_flipped_npz_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "s.npz"
    _small_state().save(path)
    data = path.read_bytes()
    q = tmp_path / "flipped.npz"
    kinds = set()
    for i in range(0, len(data), 5):
        b = bytearray(data)
        b[i] ^= 0xFF
        q.write_bytes(bytes(b))
        try:
            jeplb.EplbState.restore(q)
        except ValueError as err:
            assert str(q) in str(err)
            kinds.add(type(err.__cause__).__name__)
    assert "error" in kinds  # zlib.error among the causes: a damaged deflate stream


def test_longest_legal_file_name_saves(tmp_path):
    path = tmp_path / ("s" * 246 + ".npz")  # 250 bytes, the limit is 255
    s = _small_state()
    s.save(path)
    np.testing.assert_array_equal(jeplb.EplbState.restore(path).phy2log, s.phy2log)
    assert os.listdir(tmp_path) == [path.name]


# ------------------------------------------------------------------- 8. 2-bit integer leaves


@pytest.mark.parametrize("dtype", [jnp.int2, jnp.uint2])
def test_two_bit_leaves_move_bit_for_bit(mesh, dtype):
    old, new = make_plan("random", 7, L, PT, 8, D)
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 4, (L, PT, 4, 3), dtype=np.uint8)
    w = jax.device_put(
        layout.convert_rows(jnp.asarray(bits), dtype), NamedSharding(mesh, P(None, "ep"))
    )
    out = jeplb.rearrange_expert_weights(old, new, {"w": w}, mesh=mesh)[0]["w"]
    assert out.dtype == dtype and out.sharding.spec == P(None, "ep")
    check_rows(bits, np.asarray(layout.bits_view(out)), old, new, D)


def test_other_sub_byte_leaves_are_refused_by_path(mesh):
    old, new = make_plan("random", 7, L, PT, 8, D)
    w = jax.device_put(jnp.zeros((L, PT, 2), jnp.int1), NamedSharding(mesh, P(None, "ep")))
    with pytest.raises(TypeError, match=r"expert_weights\['w'\] has dtype int1, which is not"):
        jeplb.rearrange_expert_weights(old, new, {"w": w}, mesh=mesh)
    # XLA:CPU holds no float6 array: the leaf check sees its shape and dtype.
    leaf = jax.ShapeDtypeStruct((L, N, 2), jnp.float6_e2m3fn)
    with pytest.raises(TypeError, match=r"grads\['w'\] has dtype float6_e2m3fn, which is not"):
        checks.weight_leaves({"w": leaf}, lead_shape=(L, N), slot_axis=1, layer_axis=0,
                             mesh=None, axes=("ep",), name="grads", local=True)  # fmt: skip


# --------------------------------------- 2, 3. optimizer moments under masks, splits, factoring


def _optimizers():
    import optax

    labels = {"moe": {"w13": "a", "w2": "s"}, "dense": "a"}
    mask = {"moe": {"w13": True, "w2": False}, "dense": True}
    return {
        "multi_transform": optax.multi_transform(
            {"a": optax.adam(1e-3), "s": optax.sgd(1e-3, momentum=0.9)}, labels
        ),
        "masked": optax.masked(optax.adam(1e-3), mask),
        "inject_hyperparams": optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
        "lion": optax.lion(1e-3),
        "adafactor": optax.adafactor(1e-3, min_dim_size_to_factor=5),
        "chain": optax.chain(
            optax.clip(1.0),
            optax.masked(optax.lion(1e-3), {"moe": {"w13": False, "w2": True}, "dense": False}),
            optax.inject_hyperparams(optax.adafactor)(learning_rate=1e-3, min_dim_size_to_factor=5),
        ),
    }


@pytest.mark.parametrize("name", list(_optimizers()))
def test_expert_state_moves_every_moment_with_its_param(name):
    pytest.importorskip("optax")
    opt = _optimizers()[name]
    rng = np.random.default_rng(0)
    params = {
        "moe": {"w13": jnp.asarray(rng.random((2, 4, 8, 6)), jnp.float32),
                "w2": jnp.asarray(rng.random((2, 4, 6, 8)), jnp.float32)},
        "dense": jnp.asarray(rng.random((3, 3)), jnp.float32),
    }  # fmt: skip
    grads = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params
    )
    _, opt_state = opt.update(grads, opt.init(params), params)  # moments that differ per slot
    state = (params, opt_state)
    parts, put_back = jeplb.expert_state(state, params["moe"])
    moved = jax.tree_util.tree_map(lambda x: jnp.roll(x, 1, axis=1), parts)  # a slot rotation
    after = put_back(moved)
    flat_before = jax.tree_util.tree_flatten_with_path(state)[0]
    flat_after = jax.tree_util.tree_leaves(after)
    for (path, x), y in zip(flat_before, flat_after, strict=True):
        per_slot = x.ndim >= 3 and x.shape[:2] == (2, 4)  # every leaf [L, P, ...] of the experts
        want = np.roll(np.asarray(x), 1, axis=1) if per_slot else np.asarray(x)
        np.testing.assert_array_equal(np.asarray(y), want, err_msg=jax.tree_util.keystr(path))
        if per_slot:
            assert not np.array_equal(np.asarray(y), np.asarray(x)), jax.tree_util.keystr(path)


def test_adafactor_slot_factored_statistic_is_refused_by_structure():
    optax = pytest.importorskip("optax")
    # P = 16 equals the first trailing dim: optax factors dims 1 and 2 (argsort ties by index),
    # v_col averages over the slots although its shape [2, 16, 8] has the [L, P] lead.
    params = {"w": jnp.ones((2, 16, 16, 8))}
    st = optax.adafactor(1e-3, min_dim_size_to_factor=5).init(params)
    with pytest.raises(ValueError, match=r"state\[0\]\.v_col\['w'\] has shape \(2, 16, 8\)"):
        jeplb.expert_state(st, params)
    # Three trailing-equal dims: optax factors dims 2 and 3, both statistics are per slot.
    params = {"w": jnp.ones((2, 16, 16, 16))}
    st = optax.adafactor(1e-3, min_dim_size_to_factor=5).init(params)
    parts, _ = jeplb.expert_state(st, params)
    assert list(parts) == ["[0].v_row", "[0].v_col"]


def test_ambiguous_statistic_outside_adafactor_is_refused_by_path():
    # A [2, 16, 8] leaf mirroring [2, 16, 16, 8]: over the slots or over a trailing dim?
    experts = {"w": jnp.ones((2, 16, 16, 8))}
    state = {"params": experts, "stat": {"w": jnp.ones((2, 16, 8))}}
    with pytest.raises(
        ValueError, match=r"state\['stat'\]\['w'\] has shape \(2, 16, 8\).*cannot be told"
    ):
        jeplb.expert_state(state, experts)


# ------------------------------------------------------------- 6, 7, 19. the gradient sync

SYNC_MAP = np.array([[0, 1, 2, 3, 0, 1, 4, 5], [5, 4, 3, 2, 1, 0, 5, -1]], np.int32)


def np_sync(g: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The sync's semantics: each slot the sum of its expert's slots, in ascending slot order."""
    out = g.copy()
    for layer, row in enumerate(m):
        for e in set(row.tolist()) - {-1}:
            slots = np.flatnonzero(row == e)
            total = g[layer, slots[0]]
            for p in slots[1:]:
                total = total + g[layer, p]
            out[layer, slots] = total
    return out


def test_sync_under_jit_keeps_a_tensor_parallel_sharding(mesh_ep_tp):
    mesh = mesh_ep_tp
    spec = P(None, "ep", None, "tp")
    host = np.random.default_rng(0).standard_normal((2, 8, 3, 4)).astype(np.float32)
    g = jax.device_put(host, NamedSharding(mesh, spec))
    guess = jax.jit(lambda g, m: jeplb.sync_replica_grads(g, m, mesh=mesh))
    with pytest.raises(ValueError, match=r"^grads: traced on a mesh of Auto axes.*expert_specs="):
        guess(g, SYNC_MAP)  # undeclared: refused, not guessed
    sync = jax.jit(lambda g, m: jeplb.sync_replica_grads(g, m, mesh=mesh, expert_specs=spec))
    out = sync(g, SYNC_MAP)
    assert out.sharding.spec == spec  # was P(None, "ep"): the "tp" dim gathered
    np.testing.assert_array_equal(np.asarray(out), np_sync(host, SYNC_MAP))


def test_sync_local_with_a_map_typed_varying():
    mesh = mesh_of(4)
    host = np.random.default_rng(1).standard_normal((2, 8, 3)).astype(np.float32)
    g = jax.device_put(host, NamedSharding(mesh, P(None, "ep")))

    def body(g, m):  # the same values everywhere, typed as varying over "ep"
        return jeplb.sync_replica_grads_local(g, m + 0 * jax.lax.axis_index("ep"))

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "ep"), P()), out_specs=P(None, "ep"))
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(g, SYNC_MAP)), np_sync(host, SYNC_MAP))


def test_grad_through_the_sync_is_the_sync_of_the_cotangent():
    # The sync is linear and symmetric: d/dg sum(sync(g) * w) = sync(w).
    mesh = mesh_of(4)
    rng = np.random.default_rng(2)
    host, w = (rng.standard_normal((2, 8, 3)).astype(np.float32) for _ in range(2))
    g = jax.device_put(host, NamedSharding(mesh, P(None, "ep")))

    def loss(g, m):
        return jnp.sum(jeplb.sync_replica_grads(g, m, mesh=mesh) * w)

    got = jax.jit(jax.grad(loss))(g, SYNC_MAP)
    np.testing.assert_allclose(np.asarray(got), np_sync(w, SYNC_MAP), rtol=1e-6)

    def local_loss(g, m):
        return jnp.sum(jeplb.sync_replica_grads_local(g, m) * 2.0)

    f = jax.shard_map(
        jax.grad(local_loss), mesh=mesh, in_specs=(P(None, "ep"), P()), out_specs=P(None, "ep")
    )
    np.testing.assert_array_equal(
        np.asarray(jax.jit(f)(g, SYNC_MAP)), np_sync(np.full_like(host, 2.0), SYNC_MAP)
    )


# --------------------------------------------------------------- 9, 12. recover_experts


def _two_device_weights():
    devs = jax.devices()[:2]
    old_mesh = mesh_of(devices=devs)
    old = np.array([[0, 0, 1, 1], [1, 1, 0, 0]], np.int32)  # N_local = 2
    w = jax.device_put(
        jnp.asarray(old[:, :, None] * 10 + np.arange(3), jnp.float32),
        NamedSharding(old_mesh, P(None, "ep")),
    )
    return devs, old, w


def _row(layer, expert):
    return (expert * 10 + np.arange(3)).astype(np.float32)


def test_x64_recover_experts_loads_experts():
    devs, old, w = _two_device_weights()
    new_mesh = mesh_of(devices=devs[:1])
    with jax.enable_x64(True):
        out, rec = jeplb.recover_experts(old, w, _row, mesh=new_mesh, num_experts=2)
        want = np.asarray(rec.phy2log)[:, :, None] * 10 + np.arange(3)
        np.testing.assert_array_equal(np.asarray(out), want)
    assert rec.loaded == ((0, 1), (1, 0))  # the experts device 1 alone held


def test_recover_experts_refuses_a_mesh_listing_a_device_twice():
    devs, old, w = _two_device_weights()
    new_mesh = mesh_of(devices=[devs[0], devs[0]])
    with pytest.raises(ValueError, match=r"mesh: lists device .* more than once"):
        jeplb.recover_experts(old, w, _row, mesh=new_mesh, num_experts=2)
    np.testing.assert_array_equal(np.asarray(w)[:, :, 0], old * 10)


# ------------------------------------------------- 13. NaN payloads through the two stages


def test_stages_keep_bf16_signalling_nan_payloads():
    mesh = mesh_of(4)
    old, new = (m[0] for m in make_plan("random", 11, 1, 8, 6, 4))  # P = 8 over 4 devices
    rng = np.random.default_rng(4)
    payload = rng.integers(1, 1 << 6, (8, 5)).astype(np.uint16)  # quiet bit clear, payload != 0
    bits = np.uint16(0x7F80) | payload | (rng.integers(0, 2, (8, 5)).astype(np.uint16) << 15)
    w = jax.device_put(jnp.asarray(bits).view(jnp.bfloat16), NamedSharding(mesh, P("ep")))

    def step(old, new, w):
        buf, meta = jeplb.move_to_buffer(old, new, w, axis_name="ep")
        return jeplb.move_from_buffer(w, buf, meta), buf

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("ep")),
                              out_specs=(P("ep"), P("ep"))))  # fmt: skip
    out, buf = f(old, new, w)
    assert buf.dtype == jnp.bfloat16
    after = np.asarray(out).view(np.uint16)
    check_rows(bits[None].view(np.uint8), after[None].view(np.uint8), old[None], new[None], 4)
    assert (after & 0x7FC0 == 0x7F80).all()  # every row still a signalling NaN


# ------------------------------------------------------- 15. a state on another mesh's devices


@pytest.mark.parametrize("other", ["other_devices", "other_order"])
def test_step_refuses_a_state_on_another_mesh(other):
    devs = jax.devices()[:4]
    mesh_a = mesh_of(devices=devs[:2])
    mesh_b = mesh_of(devices=devs[2:4] if other == "other_devices" else devs[1::-1])
    s = jeplb.EplbState.create(num_layers=1, num_experts=2, num_devices=2,
                               num_redundant_experts=2, window_size=1, step_interval=1)  # fmt: skip
    s = jax.device_put(s, NamedSharding(mesh_a, P()))
    w = jax.device_put(jnp.zeros((1, 4, 3)), NamedSharding(mesh_b, P(None, "ep")))
    with pytest.raises(ValueError, match=r"state, mesh: state\.phy2log is on devices \[0, 1\]"):
        jeplb.eplb_step(s, w, mesh=mesh_b)


def test_x64_traced_maps_past_int32_are_refused_not_wrapped():
    # Same class as the dispatch ids: a traced int64 map entry 2**32 + 1 cast first reads as
    # expert 1. The transfer must refuse the plan and the sync must sum nothing.
    mesh = mesh_of(4)
    with jax.enable_x64(True):
        old = np.array([[0, 1, 2, 3, 0, 1, 2, 3]], np.int64)
        new = old.copy()
        new[0, 0] = 2**32 + 1
        host = old[:, :, None] * np.ones(3)
        w = jax.device_put(jnp.asarray(host), NamedSharding(mesh, P(None, "ep")))
        move = jax.jit(lambda o, n, w: jeplb.rearrange_expert_weights(
            o, n, w, mesh=mesh, donate=False))  # fmt: skip
        out, report = move(old, new, w)
        assert not bool(report.ok[0])
        np.testing.assert_array_equal(np.asarray(out), host)
        sync = jax.jit(lambda g, m: jeplb.sync_replica_grads(g, m, mesh=mesh))
        np.testing.assert_array_equal(np.asarray(sync(w, new)), host)


def test_x64_place_experts_does_not_wrap_a_traced_id_onto_an_expert():
    mesh = mesh_of(2)
    with jax.enable_x64(True):
        logical = jnp.array([[10.0, 11.0]])  # [L = 1, E = 2]
        m = jnp.array([[0, 1, 2**32 + 1, 1]], jnp.int64)
        out = jax.jit(lambda w, m: jeplb.place_experts(w, m, mesh=mesh))(logical, m)
        assert out.tolist() == [[10.0, 11.0, 0.0, 11.0]]  # not 11.0: expert 1

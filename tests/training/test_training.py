"""Training helpers: replica gradient sums checked bit for bit against an independent numpy model
(sequential ascending-slot sums), the optimizer state found by structure, norms that count each
logical expert once, and errors that name the leaf."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import checks, training
from tests.helpers import mesh_of

L, N, E = 2, 3, 9  # P = 8 * N = 24 slots over 8 devices: 15 replicas or empty slots per layer


def _plan(rng, num_layers=L, num_slots=8 * N, num_experts=E) -> np.ndarray:
    """int32[L, P]: every expert once, the other slots replicas or -1 (at least one), shuffled;
    then layer 0 gets expert 0 in slots 0-2 (one device) and N + 1 (the next)."""
    out = []
    for _ in range(num_layers):
        extra = rng.integers(-1, num_experts, num_slots - num_experts)
        extra[0] = -1
        row = rng.permutation(np.concatenate([np.arange(num_experts), extra]))
        out.append(row)
    m = np.stack(out).astype(np.int32)
    m[0, :N] = m[0, N + 1] = 0
    return m


def reference(g: np.ndarray, m: np.ndarray, slot_axis: int = 1) -> np.ndarray:
    """The numpy model: each expert's slots get ((g_p0 + g_p1) + g_p2) ..., in the dtype."""
    g = np.swapaxes(g, 0, 1) if slot_axis == 0 else g
    out = g.copy()
    for layer in range(m.shape[0]):
        for e in np.unique(m[layer][m[layer] >= 0]):
            slots = np.nonzero(m[layer] == e)[0]
            acc = g[layer, slots[0]]
            for p in slots[1:]:
                acc = (acc + g[layer, p]).astype(g.dtype)
            out[layer, slots] = acc
    return np.swapaxes(out, 0, 1) if slot_axis == 0 else out


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _grads(rng, lead, mesh, spec):
    """A two-leaf gradient tree (f32 and bf16) with the given lead dims, and its numpy copy."""
    host = {
        "w13": rng.standard_normal((*lead, 4)).astype(np.float32),
        "w2": rng.standard_normal((*lead, 2, 3)).astype(ml_dtypes.bfloat16),
    }
    put = {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in host.items()}
    return host, put


def _check(out, host, m, specs, slot_axis=1):
    for k, x in host.items():
        assert out[k].dtype == x.dtype and out[k].shape == x.shape, k
        assert out[k].sharding.spec == specs[k], (k, out[k].sharding.spec)
        np.testing.assert_array_equal(_bits(out[k]), _bits(reference(x, m, slot_axis)), k)


@pytest.mark.devices(8)
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_major_f32_bf16_bitwise(mesh8, seed):
    rng = np.random.default_rng(seed)
    m = _plan(rng)
    host, g = _grads(rng, (L, 8 * N), mesh8, P(None, "ep"))
    out = jeplb.sync_replica_grads(g, m, mesh=mesh8)
    _check(out, host, m, {k: P(None, "ep") for k in host})


@pytest.mark.devices(8)
def test_slot_major(mesh8):
    rng = np.random.default_rng(2)
    m = _plan(rng)
    host, g = _grads(rng, (8 * N, L), mesh8, P("ep"))
    out = jeplb.sync_replica_grads(g, m, mesh=mesh8, layer_axis=1, slot_axis=0)
    _check(out, host, m, {k: P("ep") for k in host}, slot_axis=0)


@pytest.mark.devices(8)
def test_tensor_sharded_trailing_dim_on_2d_mesh():
    mesh = mesh_of(8, ("ep", "tensor"), shape=(4, 2))
    rng = np.random.default_rng(3)
    m = _plan(rng, num_slots=4 * N, num_experts=5)
    host = {"w": rng.standard_normal((L, 4 * N, 3, 4)).astype(ml_dtypes.bfloat16)}
    spec = P(None, "ep", None, "tensor")
    g = {"w": jax.device_put(host["w"], NamedSharding(mesh, spec))}
    out = jeplb.sync_replica_grads(g, m, mesh=mesh)
    _check(out, host, m, {"w": spec})


@pytest.mark.devices(8)
def test_tuple_expert_axis(mesh_ep_tp):
    mesh = mesh_ep_tp
    rng = np.random.default_rng(4)
    m = _plan(rng)
    host = {"w": rng.standard_normal((L, 8 * N, 5)).astype(np.float32)}
    spec = P(None, ("ep", "tp"))
    g = {"w": jax.device_put(host["w"], NamedSharding(mesh, spec))}
    out = jeplb.sync_replica_grads(g, m, mesh=mesh, axis_name=("ep", "tp"))
    _check(out, host, m, {"w": spec})


def test_one_device_is_a_local_sum():
    mesh = mesh_of(1)
    rng = np.random.default_rng(5)
    m = _plan(rng)
    host, g = _grads(rng, (L, 8 * N), mesh, P(None, "ep"))
    out = jeplb.sync_replica_grads(g, m, mesh=mesh)
    _check(out, host, m, {k: P(None, "ep") for k in host})
    text = training.sync_program(mesh, [(None, "ep")] * 2).lower(m, [g["w13"], g["w2"]]).as_text()
    assert not re.search(r"collective.permute|all.reduce|all.gather|all.to.all", text)


def test_one_device_slot_major_local_many_replicas_and_bad_maps():
    """The one-device path: slot-major leaves, the local variant, experts with more replicas than
    a chunk holds (several chunks per rank and for the copies), a traced map with an id below -1
    (nothing summed)."""
    mesh = mesh_of(1)
    rng = np.random.default_rng(9)
    m = _plan(rng, num_slots=8 * N, num_experts=3)
    m[1, : 8 * N - 2] = 1  # 22 slots of expert 1: ranks 1..21, 21 copies
    host, g = _grads(rng, (8 * N, L), mesh, P("ep"))
    out = jeplb.sync_replica_grads(g, m, mesh=mesh, layer_axis=1, slot_axis=0)
    _check(out, host, m, {k: P("ep") for k in host}, slot_axis=0)
    f = jax.jit(
        jax.shard_map(
            lambda g, m: jeplb.sync_replica_grads_local(g, m, layer_axis=1, slot_axis=0),
            mesh=mesh,
            in_specs=(P("ep"), P()),
            out_specs=P("ep"),
        )
    )
    local = f(g, jnp.asarray(m))
    for k, x in host.items():
        np.testing.assert_array_equal(_bits(local[k]), _bits(reference(x, m, 0)), k)
    bad = jnp.asarray(m).at[0, 0].set(-3)
    same = f(g, bad)
    for k, x in host.items():
        np.testing.assert_array_equal(_bits(same[k]), _bits(x), k)


def test_one_device_sum_of_natively_moving_bf16():
    """The plan-free one-device sum on bf16 rows as a GPU moves them (natively; XLA:CPU takes
    the engine for bf16), bit for bit, layer- and slot-major."""
    from jeplb._src.transfer import engine
    from jeplb._src.transfer.config import TransferConfig

    rng = np.random.default_rng(10)
    m = _plan(rng, num_slots=8 * N, num_experts=4)
    for slot_axis in (1, 0):
        config = TransferConfig(layer_axis=1 - slot_axis, slot_axis=slot_axis)
        setup = engine.Engine(config=config, num_devices=1, platform="gpu")
        lead = (L, 8 * N) if slot_axis else (8 * N, L)
        x = rng.standard_normal((*lead, 3, 2)).astype(ml_dtypes.bfloat16)
        f = jax.jit(lambda g, m, s=setup: training._sum_one_device(m, [g], jnp.all(m >= -1), s)[0])
        got = f(jnp.asarray(x), jnp.asarray(m))
        np.testing.assert_array_equal(_bits(got), _bits(reference(x, m, slot_axis)))


@pytest.mark.parametrize("slot_axis", [1, 0])
def test_one_device_kernel_bitwise(slot_axis):
    """The one-device Pallas kernel (GPUs; interpreted here, forced with row_impl='pallas'):
    f32, bf16 and f16 rows, every group summed in slot order, other rows untouched; a traced map
    with an id below -1 sums nothing."""
    mesh = mesh_of(1)
    rng = np.random.default_rng(11 + slot_axis)
    m = _plan(rng, num_slots=8 * N, num_experts=5)
    m[1, :9] = 2  # a group of 9 or more slots
    lead = (L, 8 * N) if slot_axis else (8 * N, L)
    spec = P(None, "ep") if slot_axis else P("ep")
    host = {
        "f32": rng.standard_normal((*lead, 2, 256)).astype(np.float32),
        "bf16": rng.standard_normal((*lead, 512)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((*lead, 1024)).astype(np.float16),
    }
    g = {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in host.items()}
    options = dict(layer_axis=1 - slot_axis, slot_axis=slot_axis, row_impl="pallas")
    program = training.sync_program(mesh, [tuple(spec)] * 3, **options)
    setup = training.engine.Engine(
        config=training.TransferConfig(**options), num_devices=1, platform="cpu"
    )
    assert all(training._route(x, setup) == "kernel" for x in host.values())
    leaves = [g[k] for k in sorted(host)]
    out, _ = program(jnp.asarray(m), leaves)
    for k, x in zip(sorted(host), out, strict=True):
        np.testing.assert_array_equal(_bits(x), _bits(reference(host[k], m, slot_axis)), k)
    same, _ = program(jnp.asarray(m).at[0, 0].set(-3), leaves)
    for k, x in zip(sorted(host), same, strict=True):
        np.testing.assert_array_equal(_bits(x), _bits(host[k]), k)


@pytest.mark.devices(8)
def test_traced_maps_one_compile_for_two_placements(mesh8):
    rng = np.random.default_rng(6)
    host, g = _grads(rng, (L, 8 * N), mesh8, P(None, "ep"))
    traces = []

    @jax.jit
    def step(g, m):
        traces.append(1)
        return jeplb.sync_replica_grads(g, m, mesh=mesh8)

    for _ in range(2):
        m = _plan(rng)
        _check(step(g, jnp.asarray(m)), host, m, {k: P(None, "ep") for k in host})
    assert len(traces) == 1


@pytest.mark.devices(8)
def test_local_variant_inside_shard_map(mesh8):
    rng = np.random.default_rng(7)
    m = _plan(rng)
    host, g = _grads(rng, (L, 8 * N), mesh8, P(None, "ep"))
    f = jax.jit(
        jax.shard_map(
            lambda g, m: jeplb.sync_replica_grads_local(g, m),
            mesh=mesh8,
            in_specs=(P(None, "ep"), P()),
            out_specs=P(None, "ep"),
        )
    )
    _check(f(g, jnp.asarray(m)), host, m, {k: P(None, "ep") for k in host})


@pytest.mark.devices(8)
def test_no_replicas_is_identity_and_moves_nothing(mesh8):
    rng = np.random.default_rng(8)
    m = np.stack([rng.permutation(8 * N) for _ in range(L)]).astype(np.int32)
    host, g = _grads(rng, (L, 8 * N), mesh8, P(None, "ep"))
    program = training.sync_program(mesh8, [(None, "ep")] * 2)
    # The map replicated as sync_replica_grads places it: the program test_layer_major_* ran.
    out, stats = program(checks.place_map(m, mesh8), [g["w13"], g["w2"]])
    np.testing.assert_array_equal(np.asarray(out[0]), host["w13"])
    assert int(stats.gather_wire_rows.sum()) == 0 and int(stats.broadcast_wire_rows.sum()) == 0


@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "dtypes, width", [(("float32",), 4096), (("float32", "bfloat16"), 2048)], ids=["f32", "mix"]
)
def test_temporary_memory_below_one_layer(mesh8, dtypes, width):
    """The gather and the broadcast share one set of staging buffers: the compiled temporaries
    (deterministic, per device) stay within one layer of the device's local gradients (they were
    1.8-1.9 layers when each phase had its own)."""
    sharding = NamedSharding(mesh8, P(None, "ep"))
    leaves = [jax.ShapeDtypeStruct((L, 8 * N, width), d, sharding=sharding) for d in dtypes]
    maps = jax.ShapeDtypeStruct((L, 8 * N), jnp.int32, sharding=NamedSharding(mesh8, P()))
    program = training.sync_program(mesh8, [(None, "ep")] * len(leaves))
    temp = program.lower(maps, leaves).compile().memory_analysis().temp_size_in_bytes
    layer = N * width * sum(np.dtype(d).itemsize for d in dtypes)
    assert temp <= 1.05 * layer, (temp, layer, temp / layer)


@pytest.mark.parametrize("shape", [(7,), (3, 9), (2, 3, 16)])
def test_replica_ranks_match_a_pairwise_count(shape):
    rng = np.random.default_rng(11)
    m = rng.integers(-1, 4, size=shape).astype(np.int32)
    same = (m[..., :, None] == m[..., None, :]) & (m >= 0)[..., :, None]
    lower = np.arange(shape[-1])[None, :] < np.arange(shape[-1])[:, None]
    rank, count = training.replica_ranks(jnp.asarray(m))
    np.testing.assert_array_equal(np.asarray(rank), (same & lower).sum(-1))
    np.testing.assert_array_equal(np.asarray(count), same.sum(-1))


def test_errors_name_the_leaf_before_anything_runs():
    mesh = mesh_of(2) if jax.device_count() >= 2 else mesh_of(1)
    d = mesh.shape["ep"]
    good = jax.device_put(jnp.zeros((L, 4 * d, 2)), NamedSharding(mesh, P(None, "ep")))
    m = np.zeros((L, 4 * d), np.int32)
    with pytest.raises(ValueError, match=r"grads\['b'\] has shape \(2, 3, 2\)"):
        jeplb.sync_replica_grads({"a": good, "b": jnp.zeros((L, 3, 2))}, m, mesh=mesh)
    with pytest.raises(TypeError, match=r"grads\['i'\] has dtype int32"):
        jeplb.sync_replica_grads({"a": good, "i": good.astype(jnp.int32)}, m, mesh=mesh)
    if d > 1:
        unsharded = jax.device_put(jnp.zeros((L, 4 * d, 2)), NamedSharding(mesh, P()))
        with pytest.raises(ValueError, match=r"grads\[1\] is sharded"):
            jeplb.sync_replica_grads([good, unsharded], m, mesh=mesh)
    with pytest.raises(ValueError, match=r"phy2log: expected a 2-D map"):
        jeplb.sync_replica_grads(good, m[0], mesh=mesh)
    with pytest.raises(TypeError, match=r"phy2log: expected an integer dtype"):
        jeplb.sync_replica_grads(good, m.astype(np.float32), mesh=mesh)
    with pytest.raises(ValueError, match=r"phy2log\[0, 2\] = -3"):
        jeplb.sync_replica_grads(good, np.where(np.arange(4 * d) == 2, -3, m), mesh=mesh)
    with pytest.raises(ValueError, match=r"no mesh axis 'ep' is bound"):
        jeplb.sync_replica_grads_local(good, m)


# ------------------------------------------------------------------ optimizer state and norms


def _train_state(tx):
    params = {
        "moe": {
            "w13": jnp.arange(L * 8 * N * 2.0).reshape(L, 8 * N, 2),
            "w2": jnp.ones((L, 8 * N)),
        },
        "dense": jnp.ones((3, 4)),
    }
    return params, tx.init(params)


@pytest.mark.parametrize(
    "tx, want",
    [
        (optax.adam(1e-3), ["[0]['moe']", "[1][0].mu['moe']", "[1][0].nu['moe']"]),
        (
            optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
            ["[0]['moe']", "[1][1][0].mu['moe']", "[1][1][0].nu['moe']"],
        ),
    ],
)
def test_expert_state_finds_params_and_moments_by_structure(tx, want):
    params, opt_state = _train_state(tx)
    parts, put_back = jeplb.expert_state((params, opt_state), params["moe"])
    assert list(parts) == want
    moved = jax.tree.map(lambda x: x + 7, parts)
    params2, opt2 = put_back(moved)
    np.testing.assert_array_equal(params2["moe"]["w13"], params["moe"]["w13"] + 7)
    np.testing.assert_array_equal(params2["dense"], params["dense"])
    adam = opt2[0] if isinstance(opt2[0], optax.ScaleByAdamState) else opt2[1][0]
    np.testing.assert_array_equal(adam.nu["moe"]["w2"], jnp.full((L, 8 * N), 7.0))
    np.testing.assert_array_equal(adam.nu["dense"], jnp.zeros((3, 4)))
    # The optimizer runs on the state put back (its structure is intact).
    grads = jax.tree.map(jnp.ones_like, params2)
    jax.jit(tx.update)(grads, opt2, params2)  # one program, not one per op


@pytest.mark.devices(8)
def test_expert_state_moves_moments_with_the_weights(mesh8):
    sharding = NamedSharding(mesh8, P(None, "ep"))
    params, opt_state = _train_state(optax.adam(1e-3))
    parts, put_back = jeplb.expert_state((params, opt_state), params["moe"])
    parts = jax.device_put(parts, sharding)
    parts["[1][0].mu['moe']"] = jax.tree.map(lambda x: x + 1.0, parts["[0]['moe']"])
    old = np.tile(np.arange(8 * N, dtype=np.int32), (L, 1))
    new = np.roll(old, 5, axis=1)
    moved, _ = jeplb.rearrange_expert_weights(old, new, parts, mesh=mesh8, donate=False)
    params2, opt2 = put_back(moved)
    w = np.asarray(params2["moe"]["w13"])
    np.testing.assert_array_equal(w, np.asarray(params["moe"]["w13"])[:, new[0]])
    np.testing.assert_array_equal(np.asarray(opt2[0].mu["moe"]["w13"]), w + 1.0)


def test_expert_state_errors():
    params, opt_state = _train_state(optax.adam(1e-3))
    with pytest.raises(ValueError, match="no subtree mirrors experts"):
        jeplb.expert_state((params, opt_state), {"w13": jnp.zeros((5, 5))})
    parts, put_back = jeplb.expert_state((params, opt_state), params["moe"])
    with pytest.raises(ValueError, match="expected a dict with keys"):
        put_back(list(parts.values()))
    with pytest.raises(
        ValueError, match=r"parts\[\"\[0\]\['moe'\]\"\] has structure PyTreeDef\(\*\)"
    ):
        put_back({**parts, "[0]['moe']": parts["[0]['moe']"]["w13"]})


@pytest.mark.devices(8)
@pytest.mark.parametrize(
    "select",
    [["wi_0", "wi_1", "wo"], [("wi_0",), "['wi_1']", "wo"], lambda path, x: "gate" not in path],
    ids=["keys", "paths", "filter"],
)
def test_expert_state_selects_experts_beside_the_router(mesh8, select):
    # MaxText keeps the router's gate [L, E, H] in the same dict as the experts [L, P, ...]: the
    # experts are selected where they stand; the gate and its moments stay; Adam's moments move
    # with the weights, bit for bit.
    rng = np.random.default_rng(21)
    p_total = 8 * N
    moe = {
        "gate": jnp.asarray(rng.standard_normal((L, 6, 4)), jnp.float32),
        "wi_0": jnp.asarray(rng.standard_normal((L, p_total, 4, 3)), jnp.float32),
        "wi_1": jnp.asarray(rng.standard_normal((L, p_total, 4, 3)), jnp.float32),
        "wo": jnp.asarray(rng.standard_normal((L, p_total, 3, 4)), jnp.float32),
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(moe)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), moe)
    update = jax.jit(tx.update)  # one program, not one per op
    _, opt_state = update(grads, opt_state, moe)  # moments that differ from slot to slot
    with pytest.raises(ValueError, match=r"state\[0\] holds these leaves next to others: pass "
                       r"that subtree as experts, with select=\['wi_0', 'wi_1', 'wo'\]"):  # fmt: skip
        jeplb.expert_state((moe, opt_state), {k: moe[k] for k in ("wi_0", "wi_1", "wo")})
    parts, put_back = jeplb.expert_state((moe, opt_state), moe, select=select)
    assert list(parts) == ["[0]", "[1][0].mu", "[1][0].nu"]
    assert all(part["gate"] is None for part in parts.values())
    parts = jax.device_put(parts, NamedSharding(mesh8, P(None, "ep")))
    old = np.tile(np.arange(p_total, dtype=np.int32), (L, 1))
    new = np.stack([np.roll(old[0], 5), old[0][::-1]]).astype(np.int32)
    moved, _ = jeplb.rearrange_expert_weights(old, new, parts, mesh=mesh8, donate=False)
    moe2, opt2 = put_back(moved)
    before = (moe, opt_state[0].mu, opt_state[0].nu)
    after = (moe2, opt2[0].mu, opt2[0].nu)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(a["gate"]), np.asarray(b["gate"]))
        for name in ("wi_0", "wi_1", "wo"):
            want = np.take_along_axis(np.asarray(b[name]), new[:, :, None, None], 1)
            np.testing.assert_array_equal(np.asarray(a[name]), want)
    update(grads, opt2, moe2)  # the optimizer runs on the state put back
    with pytest.raises(ValueError, match=r"select: experts has no leaf 'w13'"):
        jeplb.expert_state((moe, opt_state), moe, select=["w13"])


def _adafactor_state(trailing, min_dim):
    """Params with an expert leaf [L, 8, *trailing] and a real (factored) Adafactor state after
    one update with random gradients, so that every statistic differs from slot to slot."""
    rng = np.random.default_rng(12)
    params = {
        "moe": {"w": jnp.asarray(rng.standard_normal((L, 8, *trailing)), jnp.float32)},
        "dense": jnp.ones((3, 4)),
    }
    tx = optax.adafactor(1e-2, min_dim_size_to_factor=min_dim)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    _, state = jax.jit(tx.update)(grads, state, params)  # one program, not one per op
    return tx, params, state


@pytest.mark.devices(8)
def test_expert_state_moves_adafactor_factored_stats(mesh8):
    # [L, 8, 12, 10] with min_dim_size_to_factor 8: the two largest dims (12, 10) are factored,
    # so v_row is [L, 8, 10] and v_col [L, 8, 12]; v is an unused [1] placeholder.
    tx, params, opt_state = _adafactor_state((12, 10), 8)
    factored = opt_state[0]
    assert factored.v_row["moe"]["w"].shape == (L, 8, 10)
    assert factored.v_col["moe"]["w"].shape == (L, 8, 12)
    parts, put_back = jeplb.expert_state((params, opt_state), params["moe"])
    assert list(parts) == ["[0]['moe']", "[1][0].v_row['moe']", "[1][0].v_col['moe']"]
    rng = np.random.default_rng(13)
    old = np.stack([rng.permutation(8) for _ in range(L)]).astype(np.int32)
    new = np.stack([rng.choice(8, 8) for _ in range(L)]).astype(np.int32)  # with replicas
    layers = np.arange(L)[:, None]
    src = np.argsort(old, axis=1)[layers, new]  # the old slot of each new slot's expert
    parts = jax.device_put(parts, NamedSharding(mesh8, P(None, "ep")))
    moved, _ = jeplb.rearrange_expert_weights(old, new, parts, mesh=mesh8, donate=False)
    params2, opt2 = put_back(moved)

    def model(x):  # the numpy model: slot p of layer l takes old slot src[l, p]'s values
        return np.asarray(x)[layers, src]

    np.testing.assert_array_equal(_bits(params2["moe"]["w"]), _bits(model(params["moe"]["w"])))
    for name in ("v_row", "v_col"):
        got, was = getattr(opt2[0], name)["moe"]["w"], getattr(factored, name)["moe"]["w"]
        np.testing.assert_array_equal(_bits(got), _bits(model(was)), name)
        assert not np.array_equal(np.asarray(got), np.asarray(was)), name  # something moved
    assert opt2[0].v["moe"]["w"] is factored.v["moe"]["w"]  # the placeholder stays
    np.testing.assert_array_equal(opt2[0].v["dense"], factored.v["dense"])
    grads = jax.tree.map(jnp.ones_like, params2)
    jax.jit(tx.update)(grads, opt2, params2)  # the optimizer runs on the state put back


def test_expert_state_refuses_a_factored_slot_dim():
    # [L, 8, 6, 4] with min_dim_size_to_factor 4: the two largest dims are the slots (8) and 6,
    # so v_row ([L, 6, 4]) is averaged over the slots: it cannot move, and nothing is returned.
    _, params, opt_state = _adafactor_state((6, 4), 4)
    with pytest.raises(
        ValueError,
        match=r"state\[1\]\[0\]\.v_row\['moe'\]\['w'\] has shape \(2, 6, 4\): the shape "
        r"\(2, 8, 6, 4\) of experts\['w'\] without its dim 1 .*min_dim_size_to_factor",
    ):
        jeplb.expert_state((params, opt_state), params["moe"])
    # Not factored: v mirrors the weights and moves; v_row and v_col are [1] placeholders.
    state = optax.adafactor(1e-2, factored=False).init(params)
    parts, _ = jeplb.expert_state(state, params["moe"])
    assert list(parts) == ["[0].v['moe']"]


def test_replica_scale_and_global_norm_count_each_expert_once():
    rng = np.random.default_rng(9)
    m = _plan(rng)
    g = reference(rng.standard_normal((L, 8 * N, 3)).astype(np.float32), m)
    scale = np.asarray(jeplb.replica_scale(m))
    counts = np.array([[np.sum(row == e) if e >= 0 else 0 for e in row] for row in m])
    want_scale = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0).astype(np.float32)
    np.testing.assert_array_equal(scale, want_scale)
    # The norm of the model without redundant experts: each logical expert's row once.
    logical = [
        g[layer, np.nonzero(m[layer] == e)[0][0]]
        for layer in range(L)
        for e in np.unique(m[layer][m[layer] >= 0])
    ]
    dense = rng.standard_normal((4,)).astype(np.float32)
    want = np.sqrt(np.sum(np.square(logical)) + np.sum(np.square(dense)))
    got = jeplb.global_norm({"w": jnp.asarray(g)}, m, rest={"d": dense})
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    slot_major = jeplb.global_norm(
        jnp.asarray(g).swapaxes(0, 1), m, rest=dense, slot_axis=0, layer_axis=1
    )
    np.testing.assert_allclose(float(slot_major), want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"grads\['x'\] has shape \(3, 3\)"):
        jeplb.global_norm({"w": jnp.asarray(g), "x": jnp.zeros((3, 3))}, m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_one_device_kernel_compiled_on_gpu(dtype):
    """The compiled (not interpreted) kernel under the default row_impl on one GPU, bit for bit,
    layer-major with a group of many slots."""
    gpu = jax.devices("gpu")[:1]
    mesh = mesh_of(devices=gpu)
    rng = np.random.default_rng(12)
    m = _plan(rng, num_slots=8 * N, num_experts=5)
    m[1, :9] = 2
    x = rng.standard_normal((L, 8 * N, 1 << 14)).astype(dtype)
    g = jax.device_put(x, NamedSharding(mesh, P(None, "ep")))
    setup = training.engine.Engine(config=training.TransferConfig(), num_devices=1, platform="gpu")
    assert training._route(g, setup) == "kernel"
    out = jeplb.sync_replica_grads(g, m, mesh=mesh)
    np.testing.assert_array_equal(_bits(out), _bits(reference(x, m)))

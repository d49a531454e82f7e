"""Leaves as MoE stacks keep them: slot-major, a tuple expert axis, sub-byte dtypes, x64 maps.

Each case moves random bits and checks every slot against the independent numpy model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src.transfer import layout
from tests.helpers import mesh_of
from tests.transfer_model import check_rows, make_plan

L, N = 2, 3


def _bits(rng, shape, dtype) -> np.ndarray:
    """Random bit patterns of ``dtype`` as its unsigned-integer view (nibbles for 4-bit types)."""
    if np.dtype(dtype).name in layout.SUB_BYTE:
        return rng.integers(0, 16, shape, dtype=np.uint8)
    raw = rng.integers(0, 256, (*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(layout.bits_dtype(dtype)).reshape(shape)


def _put(bits, dtype, sharding):
    return jax.device_put(layout.convert_rows(jnp.asarray(bits), dtype), sharding)


def _back(x) -> np.ndarray:
    return np.asarray(layout.bits_view(x))


@pytest.mark.devices(8)
def test_slot_major_leaves_move_in_place():
    mesh = mesh_of(8)
    old, new = make_plan("random", 3, L, 8 * N, 16, 8)
    bits = _bits(np.random.default_rng(0), (8 * N, L, 6), jnp.bfloat16)  # [P, L, ...]
    w = _put(bits, jnp.bfloat16, NamedSharding(mesh, P("ep")))
    out, _ = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh, layer_axis=1, slot_axis=0)
    assert out.sharding.spec == P("ep") and out.dtype == jnp.bfloat16
    check_rows(
        bits.transpose(1, 0, 2).view(np.uint8),
        _back(out).transpose(1, 0, 2).view(np.uint8),
        old,
        new,
        8,
    )


@pytest.mark.devices(8)
def test_tuple_expert_axis():
    # Experts sharded over ("context", "expert"): D is the product, slots in the tuple's order.
    mesh = mesh_of(8, ("context", "expert"), shape=(2, 4))
    old, new = make_plan("hotspot", 4, L, 8 * N, 16, 8)
    bits = _bits(np.random.default_rng(1), (L, 8 * N, 4), jnp.float32)
    spec = P(None, ("context", "expert"))
    w = _put(bits, jnp.float32, NamedSharding(mesh, spec))
    out, report = jeplb.rearrange_expert_weights(
        old, new, {"w": w}, mesh=mesh, axis_name=("context", "expert")
    )
    assert bool(report.ok.all()) and out["w"].sharding.spec == spec
    check_rows(bits.view(np.uint8), _back(out["w"]).view(np.uint8), old, new, 8)


@pytest.mark.devices(8)
@pytest.mark.parametrize("dtype", [jnp.int4, jnp.uint4, jnp.float4_e2m1fn, jnp.float8_e5m2])
def test_sub_byte_and_fp8_leaves_with_their_scales(dtype):
    # 4-bit weights and their f32 block scales move together, bit for bit.
    mesh = mesh_of(8)
    old, new = make_plan("drift", 5, L, 8 * N, 16, 8)
    rng = np.random.default_rng(2)
    sharding = NamedSharding(mesh, P(None, "ep"))
    bits = {
        "w": _bits(rng, (L, 8 * N, 8, 4), dtype),
        "scale": _bits(rng, (L, 8 * N, 8), jnp.float32),
    }
    dtypes = {"w": dtype, "scale": jnp.float32}
    w = {k: _put(v, dtypes[k], sharding) for k, v in bits.items()}
    out, _ = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)
    for k, before in bits.items():
        assert out[k].dtype == dtypes[k]
        check_rows(before.view(np.uint8), _back(out[k]).view(np.uint8), old, new, 8)


@pytest.mark.devices(8)
def test_x64_maps_and_weights():
    # With jax_enable_x64, int64 maps and f64 weights move as int32 maps and f32 weights do.
    with jax.enable_x64(True):
        mesh = mesh_of(8)
        old, new = make_plan("random", 6, L, 8 * N, 16, 8)
        bits = _bits(np.random.default_rng(3), (L, 8 * N, 3), jnp.float64)
        w = _put(bits, jnp.float64, NamedSharding(mesh, P(None, "ep")))
        out, _ = jeplb.rearrange_expert_weights(
            old.astype(np.int64), new.astype(np.int64), w, mesh=mesh
        )
        check_rows(bits.view(np.uint8), _back(out).view(np.uint8), old, new, 8)


def test_one_device_output_keeps_its_sharding():
    # On a one-device mesh the leaves come back P(None, "ep"), so calls chain back to back.
    mesh = mesh_of(1)
    w = jax.device_put(jnp.arange(8.0).reshape(2, 4), NamedSharding(mesh, P(None, "ep")))
    old = np.tile(np.arange(4), (2, 1))
    new = old[:, ::-1].copy()
    once, _ = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)
    assert once.sharding.spec == P(None, "ep")
    twice, _ = jeplb.rearrange_expert_weights(new, old, once, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(twice), np.arange(8.0).reshape(2, 4))


@pytest.mark.devices(8)
@pytest.mark.parametrize("slot_major", [False, True])
def test_place_experts_any_layout_keeps_other_axes(slot_major):
    # Logical experts [L, E, H, F] with F on "tensor" -> slots [L, P, H, F] with P on "ep" and F
    # still on "tensor"; empty slots hold zeros. Then the transfer takes them as they are.
    mesh = mesh_of(8, ("ep", "tensor"), shape=(4, 2))
    e, p_total = 6, 4 * N
    rng = np.random.default_rng(7)
    logical = rng.standard_normal((L, e, 3, 4)).astype(np.float32)
    phy2log = np.stack([rng.permutation(np.arange(p_total) % e) for _ in range(L)]).astype(np.int32)
    phy2log[1, 5] = -1
    axes = (1, 0) if slot_major else (0, 1)  # (layer, slot) dims
    given = logical.transpose(1, 0, 2, 3) if slot_major else logical
    spec_in = P(None, None, None, "tensor")
    x = jax.device_put(given, NamedSharding(mesh, spec_in))
    out = jeplb.place_experts(x, phy2log, mesh=mesh, layer_axis=axes[0], slot_axis=axes[1])
    want_spec = P("ep", None, None, "tensor") if slot_major else P(None, "ep", None, "tensor")
    assert out.sharding.spec == want_spec
    got = np.asarray(out).transpose(1, 0, 2, 3) if slot_major else np.asarray(out)
    for layer in range(L):
        for p in range(p_total):
            want = logical[layer, phy2log[layer, p]] if phy2log[layer, p] >= 0 else 0.0
            np.testing.assert_array_equal(got[layer, p], want)
    new = phy2log.copy()
    new[0] = np.roll(new[0], 3)
    moved, _ = jeplb.rearrange_expert_weights(
        phy2log, new, out, mesh=mesh, layer_axis=axes[0], slot_axis=axes[1]
    )
    assert moved.sharding.spec == want_spec


def test_place_experts_refuses_ids_past_e():
    mesh = mesh_of(1)
    with pytest.raises(
        ValueError, match=r"phy2log\[0, 1\] = 3: expected an expert id in \[0, num_experts = 3\)"
    ):
        jeplb.place_experts(jnp.zeros((1, 3, 2)), np.array([[0, 3]]), mesh=mesh)
    with pytest.raises(ValueError, match=r"logical_weights\['w'\] has shape \(2, 3\), expected"):
        jeplb.place_experts({"w": jnp.zeros((2, 3))}, np.array([[0, 1]]), mesh=mesh)


@pytest.mark.devices(8)
def test_jitted_auto_mesh_undeclared_leaves_are_refused_declared_ones_kept():
    # Under an outer jit on an Auto mesh the tracer does not say that F is on "tensor": undeclared,
    # the call refuses to guess (naming the leaf and the fix); declared, the leaf comes back on
    # "tensor" with every slot's rows right, and the second plan reuses the compiled program.
    mesh = mesh_of(8, ("ep", "tensor"), shape=(4, 2))
    spec = P(None, "ep", None, "tensor")
    bits = _bits(np.random.default_rng(5), (L, 4 * N, 3, 4), jnp.float32)
    w = _put(bits, jnp.float32, NamedSharding(mesh, spec))
    plans = [make_plan("random", seed, L, 4 * N, 8, 4) for seed in (6, 7)]
    undeclared = jax.jit(lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh)[0])
    with pytest.raises(
        ValueError,
        match=r"^expert_weights: traced on a mesh of Auto axes, so how their dims are sharded over "
        r"\['tensor'\] is unknown .* Declare it with expert_specs= .*PartitionSpec\(None, 'ep', "
        r"None, 'tensor'\)",
    ):
        undeclared(*plans[0], w)
    step = jax.jit(
        lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh, expert_specs=spec)[0],
        donate_argnums=2,
    )
    want = bits
    for old, new in plans:
        w = step(old, new, w)
        assert w.sharding.spec == spec
        got = _back(w)
        check_rows(want.view(np.uint8), got.view(np.uint8), old, new, 4)
        want = got
    assert step._cache_size() == 1


@pytest.mark.devices(8)
def test_jitted_eplb_step_on_auto_mesh_keeps_tensor_sharding():
    # The step under jit on an Auto mesh: the weights come back on "tensor" as they came in, and
    # every slot holds its new expert's logical row.
    mesh = mesh_of(8, ("ep", "tensor"), shape=(4, 2))
    num_experts, num_slots = 8, 12
    state = jeplb.EplbState.create(
        num_layers=L,
        num_experts=num_experts,
        num_devices=4,
        num_redundant_experts=num_slots - num_experts,
        window_size=1,
        step_interval=1,
    ).replicated(mesh)
    logical = np.random.default_rng(9).standard_normal((L, num_experts, 3, 4)).astype(np.float32)
    spec = P(None, "ep", None, "tensor")
    w = jeplb.place_experts(
        jax.device_put(logical, NamedSharding(mesh, P(None, None, None, "tensor"))),
        state.phy2log,
        mesh=mesh,
    )
    assert w.sharding.spec == spec
    load = np.tile(np.arange(1, num_experts + 1) ** 3, (L, 1)).astype(np.int32)

    @jax.jit
    def step(state, w):
        state = state.record(jnp.asarray(load))
        state, w, info = jeplb.eplb_step(state, w, mesh=mesh, expert_specs=spec)
        return state, w, info

    state, w, info = step(state, w)
    assert bool(info.fired) and w.sharding.spec == spec
    phy2log = np.asarray(state.phy2log)
    assert (phy2log != np.asarray(jnp.tile(jnp.arange(num_slots) % num_experts, (L, 1)))).any()
    np.testing.assert_array_equal(
        np.asarray(w), np.take_along_axis(logical, phy2log[..., None, None], 1)
    )

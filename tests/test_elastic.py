"""Elastic EP: lose devices or add them; every expert arrives bit-exact, the loader reads only the lost.

Lost devices' shards are overwritten with garbage before recovery, so a recovery that read one of
them would fail the bit-exact check. The single-device losses all lose device 3: one 7-device mesh,
so its transfer program is compiled once for the module.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of
from tests.transfer_model import make_leaves, placement

L, E, N_LOCAL = 2, 12, 3


def logical_weights(seed: int):
    """One row per (layer, logical expert) per leaf: random bytes (NaN payloads included)."""
    return make_leaves(np.random.default_rng(seed), L, E, names=("w13", "w2", "q"))


def physical(logical, phy2log, mesh, lost=(), garbage_seed=0):
    """Leaves [L, P, ...] on ``mesh`` for ``phy2log``; the shards of ``lost`` hold garbage."""
    lay = np.arange(L)[:, None]
    rng = np.random.default_rng(garbage_seed)
    devices = list(mesh.devices.flat)
    n = phy2log.shape[1] // len(devices)
    sharding = NamedSharding(mesh, P(None, "ep"))
    out = {}
    for k, v in logical.items():
        full = v[lay, phy2log]
        shards = []
        for i, dev in enumerate(devices):
            part = full[:, i * n : (i + 1) * n]
            if i in lost:
                raw = rng.integers(0, 256, part.nbytes, dtype=np.uint8)
                part = raw.view(part.dtype).reshape(part.shape)
            shards.append(jax.device_put(part, dev))
        out[k] = jax.make_array_from_single_device_arrays(full.shape, sharding, shards)
    return out


def as_bytes(x):
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


class Loader:
    """Reads one expert from the logical weights, recording what it was asked for."""

    def __init__(self, logical):
        self.logical = logical
        self.calls = []

    def __call__(self, layer, expert):
        self.calls.append((layer, expert))
        return {k: np.array(v[layer, expert]) for k, v in self.logical.items()}


def expected_lost(old, num_devices, lost):
    n = old.shape[1] // num_devices
    out = []
    for layer in range(old.shape[0]):
        alive = [old[layer, p] for p in range(old.shape[1]) if p // n not in lost]
        out += [(layer, e) for e in range(E) if e not in alive]
    return out


def check_recovered(logical, out, rec, mesh):
    p2l = np.asarray(rec.phy2log)
    d = mesh.shape["ep"]
    assert p2l.shape == (L, N_LOCAL * d)
    lay = np.arange(L)[:, None]
    for k, v in logical.items():
        assert out[k].shape == (L, N_LOCAL * d, *v.shape[2:]) and out[k].dtype == v.dtype
        assert out[k].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "ep")), out[k].ndim)
        got = as_bytes(out[k])
        want = as_bytes(v[lay, np.maximum(p2l, 0)])
        filled = p2l >= 0
        assert np.array_equal(got[filled], want[filled]), f"leaf {k}: an expert is not bit-exact"
    for layer in range(L):
        assert set(p2l[layer][p2l[layer] >= 0].tolist()) == set(range(E)), "an expert has no slot"


@pytest.fixture(scope="module")
def devices(cpu_devices):
    return cpu_devices


def old_placement(rng, lost):
    """A random placement on 8 devices; with ``lost == (0, 1)``, experts 0..5 live only there."""
    old = np.stack([placement(rng, E, N_LOCAL * 8) for _ in range(L)])
    if lost == (0, 1):
        old[:, : 2 * N_LOCAL] = np.arange(2 * N_LOCAL)
        old[:, 2 * N_LOCAL :] = np.where(
            old[:, 2 * N_LOCAL :] < 2 * N_LOCAL, 7, old[:, 2 * N_LOCAL :]
        )
        for layer in range(L):
            missing = sorted(set(range(E)) - set(old[layer].tolist()))
            old[layer, 2 * N_LOCAL : 2 * N_LOCAL + len(missing)] = missing
    return old


def signalling_nans(x: np.ndarray, rng) -> np.ndarray:
    """``x`` with every element of a 2- or 4-byte float dtype replaced by a signalling NaN with a
    random payload (exponent all ones, quiet bit clear, payload nonzero)."""
    width = {2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize)
    if width is None or x.dtype.kind not in "fV":
        return x
    mant = 7 if x.dtype.name == "bfloat16" else (10 if x.dtype.itemsize == 2 else 23)
    exp = (1 << (8 * x.dtype.itemsize - 1)) - (1 << mant)  # sign clear, exponent all ones
    payload = rng.integers(1, 1 << (mant - 1), x.shape).astype(width)
    sign = rng.integers(0, 2, x.shape).astype(width) << (8 * x.dtype.itemsize - 1)
    return (sign | width(exp) | payload).view(x.dtype)


@pytest.mark.parametrize("lost", [(3,), (2, 5), (0, 1)])
def test_lose_devices(devices, lost):
    rng = np.random.default_rng(sum(lost))
    old_mesh = mesh_of(devices=devices)
    old = old_placement(rng, lost)
    logical = logical_weights(10 + len(lost))
    weights = physical(logical, old, old_mesh, lost=lost)
    before = {k: as_bytes(v) for k, v in weights.items()}
    new_mesh = mesh_of(devices=[d for i, d in enumerate(devices) if i not in lost])
    load = rng.integers(1, 100, (L, E)).astype(np.int32)
    loader = Loader(logical)
    out, rec = jeplb.recover_experts(old, weights, loader, mesh=new_mesh, num_experts=E, load=load)
    check_recovered(logical, out, rec, new_mesh)
    want = expected_lost(old, 8, lost)
    assert sorted(loader.calls) == sorted(want), "the loader was called for other experts"
    assert len(set(loader.calls)) == len(loader.calls), "an expert was loaded twice"
    assert list(rec.loaded) == want and rec.lost_devices == tuple(lost)
    if lost == (0, 1):
        assert want, "the scenario should lose some expert entirely"
    # The old weights are not changed (the surviving shards were copied, not donated).
    for k, v in weights.items():
        assert np.array_equal(as_bytes(v), before[k])
    # The new placement follows the load: the policy's placement on the remaining devices.
    p2l, _, _ = jeplb.rebalance_experts(load, N_LOCAL * new_mesh.size, 1, 1, new_mesh.size)
    assert np.array_equal(np.asarray(rec.phy2log), np.asarray(p2l))


def test_loaded_rows_keep_signalling_nan_payloads(devices):
    # Rows read through the loader are written as bits: a float path (XLA:CPU computes some bf16
    # ops in float32) would quiet a signalling NaN and change its payload.
    rng = np.random.default_rng(7)
    lost = (0, 1)
    old = old_placement(rng, lost)
    logical = {k: signalling_nans(v, rng) for k, v in logical_weights(3).items()}
    assert any(v.dtype.kind == "f" or v.dtype.name == "bfloat16" for v in logical.values())
    weights = physical(logical, old, mesh_of(devices=devices), lost=lost)
    new_mesh = mesh_of(devices=devices[2:])
    out, rec = jeplb.recover_experts(old, weights, Loader(logical), mesh=new_mesh, num_experts=E)
    assert rec.loaded, "the scenario should load some expert"
    check_recovered(logical, out, rec, new_mesh)


def test_scale_up_4_to_8(devices):
    rng = np.random.default_rng(4)
    old_mesh = mesh_of(devices=devices[:4])
    old = np.stack([placement(rng, E, N_LOCAL * 4) for _ in range(L)])
    logical = logical_weights(20)
    weights = physical(logical, old, old_mesh)
    loader = Loader(logical)
    new_mesh = mesh_of(devices=devices)
    out, rec = jeplb.recover_experts(old, weights, loader, mesh=new_mesh, num_experts=E)
    check_recovered(logical, out, rec, new_mesh)
    assert loader.calls == [] and rec.loaded == ()
    assert int(np.asarray(rec.moved_rows).sum()) > 0


def test_given_target_and_state_round_trip(devices):
    rng = np.random.default_rng(5)
    old = np.stack([placement(rng, E, N_LOCAL * 8) for _ in range(L)])
    logical = logical_weights(30)
    weights = physical(logical, old, mesh_of(devices=devices), lost=(3,))
    new_mesh = mesh_of(devices=devices[:3] + devices[4:])
    target = np.stack([placement(rng, E, N_LOCAL * 7) for _ in range(L)])
    loader = Loader(logical)
    out, rec = jeplb.recover_experts(
        old, weights, loader, mesh=new_mesh, num_experts=E, new_phy2log=target
    )
    assert np.array_equal(np.asarray(rec.phy2log), target)
    check_recovered(logical, out, rec, new_mesh)
    assert sorted(loader.calls) == expected_lost(old, 8, (3,))
    state = jeplb.EplbState.from_placement(
        rec.phy2log, num_experts=E, num_devices=7, window_size=2, step_interval=4
    )
    assert np.array_equal(np.asarray(state.logcnt), np.asarray(rec.logcnt))
    assert np.array_equal(np.asarray(state.log2phy), np.asarray(rec.log2phy))


def test_loader_of_wrong_shape_is_refused(devices):
    rng = np.random.default_rng(6)
    # Device 3 alone holds experts 0, 1, 2; the other devices hold experts 3.. E-1.
    rest = np.stack([3 + placement(rng, E - 3, N_LOCAL * 7) for _ in range(L)])
    old = np.insert(rest, [3 * N_LOCAL] * 3, [0, 1, 2], axis=1)
    logical = logical_weights(40)
    weights = physical(logical, old, mesh_of(devices=devices), lost=(3,))

    def bad_loader(layer, expert):
        return {k: np.zeros((*v.shape[2:], 1), v.dtype) for k, v in logical.items()}

    with pytest.raises(ValueError, match=r"loader\(0, \d+\): leaf \d is .* expected one expert's"):
        jeplb.recover_experts(
            old, weights, bad_loader, mesh=mesh_of(devices=devices[:3] + devices[4:]), num_experts=E
        )


def test_per_layer_weights_recover_as_stacked_ones(devices):
    lost = (0, 1)  # experts 0..5 live only there: the loader reads them
    rng = np.random.default_rng(3)
    old_mesh = mesh_of(devices=devices)
    old = old_placement(rng, lost)
    logical = logical_weights(13)
    stacked = physical(logical, old, old_mesh, lost=lost)
    new_mesh = mesh_of(devices=[d for i, d in enumerate(devices) if i not in lost])
    load = rng.integers(1, 100, (L, E)).astype(np.int32)
    # The same weights as a sequence of per-layer pytrees [P, ...] (lost shards: garbage).
    layers = [
        {k: jax.device_put(np.asarray(v)[layer], NamedSharding(old_mesh, P("ep")))
         for k, v in stacked.items()}
        for layer in range(L)
    ]  # fmt: skip
    per_loader, stacked_loader = Loader(logical), Loader(logical)
    out, rec = jeplb.recover_experts(
        old, layers, per_loader, mesh=new_mesh, num_experts=E, load=load
    )
    want, want_rec = jeplb.recover_experts(
        old, stacked, stacked_loader, mesh=new_mesh, num_experts=E, load=load
    )
    assert isinstance(out, list) and len(out) == L
    np.testing.assert_array_equal(np.asarray(rec.phy2log), np.asarray(want_rec.phy2log))
    np.testing.assert_array_equal(np.asarray(rec.moved_rows), np.asarray(want_rec.moved_rows))
    assert rec.loaded and rec.loaded == want_rec.loaded
    assert sorted(per_loader.calls) == sorted(stacked_loader.calls)
    for layer in range(L):
        for k in logical:
            assert out[layer][k].sharding.spec == P("ep")
            assert np.array_equal(as_bytes(out[layer][k]), as_bytes(want[k])[layer]), (layer, k)
    with pytest.raises(ValueError, match=r"expert_weights: .*one entry per layer, L = 2; got 1"):
        jeplb.recover_experts(old, layers[:1], per_loader, mesh=new_mesh, num_experts=E)


def test_tuple_expert_axes_recover_like_one_axis(devices):
    # The expert axis as two mesh axes ("a", "b") = (2, 4): ranks in PartitionSpec order, the
    # same recovery as over one axis of the same 8 devices in that order.
    from jax.sharding import Mesh

    lost = (5,)
    rng = np.random.default_rng(7)
    old = old_placement(rng, lost)
    logical = logical_weights(21)
    axes = ("a", "b")
    old_mesh = Mesh(np.asarray(devices).reshape(2, 4), axes)
    flat = physical(logical, old, mesh_of(devices=devices), lost=lost)
    weights = {
        k: jax.device_put(v, NamedSharding(old_mesh, P(None, axes))) for k, v in flat.items()
    }
    kept = [d for i, d in enumerate(devices) if i not in lost][:6]
    new_mesh = Mesh(np.asarray(kept).reshape(2, 3), axes)
    load = rng.integers(1, 100, (L, E)).astype(np.int32)
    out, rec = jeplb.recover_experts(
        old, weights, Loader(logical), mesh=new_mesh, axis_name=axes, num_experts=E, load=load
    )
    one_axis = mesh_of(devices=kept)
    want_out, want = jeplb.recover_experts(
        old, flat, Loader(logical), mesh=one_axis, num_experts=E, load=load
    )
    np.testing.assert_array_equal(rec.phy2log, want.phy2log)
    assert rec.lost_devices == want.lost_devices and rec.loaded == want.loaded
    for k in logical:
        assert out[k].sharding.spec == P(None, axes)
        assert np.array_equal(as_bytes(out[k]), as_bytes(want_out[k])), k

"""Counting once per step: `dispatch(..., record=False)` on every layer, then
`EplbState.record_ids` over the stacked ids, against per-layer `dispatch` and numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jeplb._src.dispatch import dispatch
from jeplb._src.state import EplbState
from tests.helpers import mesh_of
from tests.state.test_state import D, E, L, random_placement

BIG = 2**31 - 1


@pytest.fixture(scope="module")
def placed():
    p2l = random_placement(np.random.default_rng(11))
    s = EplbState.from_placement(p2l, num_experts=E, num_devices=D, window_size=2, step_interval=5)
    start = np.random.default_rng(12).integers(0, 1000, (L, E)).astype(np.int32)
    return s.replace(pass_load=jnp.asarray(start))


def routed_layers(seed, t=48, k=3):
    """[L, T, K] ids (valid tokens in range; masked ones may hold anything) and [L, T] masks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E, (L, t, k)).astype(np.int32)
    valid = rng.random((L, t)) < 0.8
    junk = rng.integers(-3, 2 * E, (L, t, k)).astype(np.int32)
    ids = np.where(valid[..., None], ids, junk)
    return ids, valid


def numpy_counts(ids, valid):
    """[L, E]: per layer, the in-range ids of valid tokens."""
    out = np.zeros((ids.shape[0], E), np.int64)
    for lay in range(ids.shape[0]):
        kept = ids[lay][valid[lay]].ravel()
        kept = kept[(kept >= 0) & (kept < E)]
        out[lay] = np.bincount(kept, minlength=E)
    return out


@pytest.mark.parametrize("choice", ["hash", "balanced"])
def test_counted_once_equals_dispatch_per_layer(placed, choice):
    """Same physical ids and the same pass_load, bit for bit, under jit (out-of-range ids of
    masked tokens included), and both equal to numpy's counts."""
    ids, valid = routed_layers(3)

    def per_layer(s, ids, valid):
        phys = []
        for lay in range(L):
            s, p = dispatch(s, lay, ids[lay], valid=valid[lay], replica_choice=choice)
            phys.append(p)
        return s, jnp.stack(phys)

    def once(s, ids, valid):
        phys = []
        for lay in range(L):
            same, p = dispatch(
                s, lay, ids[lay], valid=valid[lay], replica_choice=choice, record=False
            )
            assert same is s  # nothing recorded
            phys.append(p)
        return s.record_ids(ids, valid=valid), jnp.stack(phys)

    args = (placed, jnp.asarray(ids), jnp.asarray(valid))
    s1, phys1 = jax.jit(per_layer)(*args)
    s2, phys2 = jax.jit(once)(*args)
    np.testing.assert_array_equal(phys2, phys1)
    np.testing.assert_array_equal(s2.pass_load, s1.pass_load)
    want = np.asarray(placed.pass_load, np.int64) + numpy_counts(ids, valid)
    np.testing.assert_array_equal(s2.pass_load, want)


def test_one_layer_eagerly_and_a_scan_s_outputs(placed):
    """``layer=`` counts one layer's ids; a scan that outputs each layer's ids counts them after."""
    ids, valid = routed_layers(4)
    s = placed.record_ids(jnp.asarray(ids[2]), valid=jnp.asarray(valid[2]), layer=2)
    want = np.asarray(placed.pass_load, np.int64)
    want[2] += numpy_counts(ids, valid)[2]
    np.testing.assert_array_equal(s.pass_load, want)

    def scanned(s, ids):
        def layer(_, xs):
            return None, xs  # a model's layer would map and run its experts here

        _, kept = jax.lax.scan(layer, None, ids)
        return s.record_ids(kept)

    got = jax.jit(scanned)(placed, jnp.asarray(ids))
    everything = np.ones(valid.shape, bool)
    want = np.asarray(placed.pass_load, np.int64) + numpy_counts(np.clip(ids, -1, E), everything)
    np.testing.assert_array_equal(got.pass_load, want)


def test_sums_saturate_under_jit_and_raise_eagerly(placed):
    near = placed.pass_load.at[1, 3].set(BIG - 2)
    s = placed.replace(pass_load=near)
    ids = jnp.full((L, 4, 2), 3, jnp.int32)  # 8 more of expert 3 on every layer
    got = jax.jit(lambda s, i: s.record_ids(i))(s, ids)
    assert int(got.pass_load[1, 3]) == BIG
    assert int(got.pass_load[0, 3]) == int(near[0, 3]) + 8
    with pytest.raises(
        ValueError, match=r"topk_ids' counts\[1, 3\] = 8: adding it to state.pass_load\[1, 3\]"
    ):
        s.record_ids(ids)


@pytest.mark.devices(8)
def test_load_axes_sums_the_devices_counts(placed):
    """Inside shard_map with the tokens split over 'ep': the psum of each device's counts."""
    mesh = mesh_of(D)
    ids, valid = routed_layers(5, t=8 * 6)

    def body(s, ids, valid):
        return s.record_ids(ids, valid=valid, load_axes="ep")

    specs = (P(), P(None, "ep"), P(None, "ep"))
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P()))
    got = f(placed, jnp.asarray(ids), jnp.asarray(valid))
    want = np.asarray(placed.pass_load, np.int64) + numpy_counts(ids, valid)
    np.testing.assert_array_equal(got.pass_load, want)


def test_bad_arguments_are_named(placed):
    ids = jnp.zeros((L, 4, 2), jnp.int32)
    with pytest.raises(
        ValueError, match=r"topk_ids: expected shape \[L = 3, \.\.\., K\], got \(2, 4, 2\)"
    ):
        placed.record_ids(ids[:2])
    with pytest.raises(
        ValueError, match=r"valid: expected a bool mask of the tokens' shape \(3, 4\)"
    ):
        placed.record_ids(ids, valid=jnp.ones((4,), bool))
    with pytest.raises(TypeError, match="topk_ids"):
        placed.record_ids(ids.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"topk_ids\[1, 2, 0\] = 8: expected logical expert ids"):
        placed.record_ids(ids.at[1, 2, 0].set(E))
    with pytest.raises(ValueError, match=r"layer"):
        placed.record_ids(ids[0], layer=L)
    with pytest.raises(TypeError, match=r"record: expected a bool, got str 'no'. False maps"):
        dispatch(placed, 0, ids[0], record="no")
    # numpy's bool is a bool, as for every other flag.
    assert int(dispatch(placed, 0, ids[0], record=np.bool_(False))[0].pass_load.sum()) == int(
        placed.pass_load.sum()
    )

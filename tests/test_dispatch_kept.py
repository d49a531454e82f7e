"""`dispatch_kept` and `EplbState.record_slots`: every layer's slots written into one array and
counted once, equal to `dispatch` on every layer; one operation a layer in a scanned step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jeplb import EplbState, dispatch, dispatch_kept
from jeplb.tools import bench_decode as bd
from tests.state.test_state import random_placement

L, E, D, T, K = 3, 8, 4, 48, 2  # P = 16 slots, 4 a device


@pytest.fixture(scope="module")
def placed() -> EplbState:
    p2l = random_placement(np.random.default_rng(7), num_layers=L, num_experts=E, p_total=16)
    return EplbState.from_placement(
        p2l, num_experts=E, num_devices=D, window_size=2, step_interval=5
    )


def _ids(seed: int, bad: bool = False) -> np.ndarray:
    """[L, T, K] router ids; with ``bad``, some outside [0, E) (traced callers only)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E, (L, T, K)).astype(np.int32)
    if bad:
        ids[rng.random((L, T, K)) < 0.1] = E + 3
        ids[0, 0, 0] = -2
    return ids


CHOICES = [
    dict(replica_choice="hash"),
    dict(replica_choice="local", device_index=jnp.arange(T, dtype=jnp.int32) % D),
    dict(replica_choice="balanced"),
]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: c["replica_choice"])
def test_scanned_kept_slots_equal_dispatch_and_count_the_same(placed, choice):
    """In a scan (traced layer), the kept slots are `dispatch`'s, layer by layer, and
    `record_slots` adds what `dispatch` on every layer adds (out-of-range ids and masked tokens
    included)."""
    ids = jnp.asarray(_ids(1, bad=True))
    valid = jnp.asarray(np.random.default_rng(2).random(T) < 0.8)

    def scanned(state, ids):
        def layer(kept, xs):
            index, ids_l = xs
            kept, slots = dispatch_kept(state, index, ids_l, kept, valid=valid, **choice)
            return kept, slots

        kept = jnp.full((L, T, K), -1, jnp.int32)
        kept, slots = lax.scan(layer, kept, (jnp.arange(L), ids))
        return kept, slots, state.record_slots(kept, valid=valid).pass_load

    def per_layer(state, ids):
        phys = []
        for index in range(L):
            state, p = dispatch(state, index, ids[index], valid=valid, **choice)
            phys.append(p)
        return jnp.stack(phys), state.pass_load

    kept, slots, load = jax.jit(scanned)(placed, ids)
    want_phys, want_load = jax.jit(per_layer)(placed, ids)
    np.testing.assert_array_equal(kept, want_phys)
    np.testing.assert_array_equal(slots, want_phys)
    np.testing.assert_array_equal(load, want_load)
    assert (np.asarray(kept)[np.asarray(ids) >= E] == -1).all() and int(load.sum()) > 0


def test_eager_layers_fill_their_rows_only(placed):
    ids = _ids(3)
    kept = jnp.full((L, T, K), -1, jnp.int32)
    kept, phys = dispatch_kept(placed, 2, jnp.asarray(ids[2]), kept)
    assert (np.asarray(kept[:2]) == -1).all()
    _, want = dispatch(placed, 2, jnp.asarray(ids[2]), record=False)
    np.testing.assert_array_equal(kept[2], want)
    np.testing.assert_array_equal(phys, want)
    load = placed.record_slots(kept).pass_load
    np.testing.assert_array_equal(load[2], np.bincount(ids[2].ravel(), minlength=E))
    assert int(load[:2].sum()) == 0


def test_slot_counts_follow_phy2log(placed):
    """Every slot counts for the expert it holds; -1 and slots past P count for none."""
    rng = np.random.default_rng(4)
    slots = rng.integers(-1, placed.num_slots + 2, (L, T, K)).astype(np.int32)
    p2l = np.asarray(placed.phy2log)
    want = np.zeros((L, E), np.int64)
    for lay in range(L):
        held = slots[lay][(slots[lay] >= 0) & (slots[lay] < placed.num_slots)]
        want[lay] = np.bincount(p2l[lay][held], minlength=E)
    np.testing.assert_array_equal(placed.record_slots(jnp.asarray(slots)).pass_load, want)


def test_int64_slots_are_range_checked_before_any_cast(placed):
    """A numpy int64 slot past 2**32 is out of range, not the slot its low bits name."""
    slots = np.full((L, 1, 1), 2**32 + 1, np.int64)
    assert int(placed.record_slots(slots).pass_load.sum()) == 0


def test_traced_layer_out_of_range_maps_to_minus_one(placed):
    ids = jnp.asarray(_ids(5)[0])
    kept = jnp.zeros((L, T, K), jnp.int32)
    kept, phys = jax.jit(lambda i, k: dispatch_kept(placed, i, ids, k))(jnp.int32(L + 2), kept)
    assert (np.asarray(phys) == -1).all()
    assert (np.asarray(kept[L - 1]) == -1).all() and (np.asarray(kept[: L - 1]) == 0).all()


def test_bad_arguments_name_themselves(placed):
    ids = jnp.asarray(_ids(6)[0])
    with pytest.raises(TypeError, match=r"kept: expected an int32 array .* got float32"):
        dispatch_kept(placed, 0, ids, np.zeros((L, T, K), np.float32))
    with pytest.raises(TypeError, match=r"kept: expected an int32 array"):  # kept named first
        dispatch_kept(placed, 0, ids, np.zeros((L, T, K), np.float32), valid=jnp.ones(T + 1))
    with pytest.raises(TypeError, match=r"state: expected an EplbState"):  # as before record
        dispatch(object(), 0, ids, record="x")
    with pytest.raises(ValueError, match=r"kept: expected shape \[L, \*topk_ids.shape\] = "):
        dispatch_kept(placed, 0, ids, jnp.zeros((L, T, K + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"layer"):
        dispatch_kept(placed, L, ids, jnp.zeros((L, T, K), jnp.int32))
    with pytest.raises(ValueError, match=r"kept_slots: expected shape \[L = 3, \.\.\., K\]"):
        placed.record_slots(jnp.zeros((L + 1, T, K), jnp.int32))
    with pytest.raises(TypeError, match=r"kept_slots: expected an integer dtype"):
        placed.record_slots(jnp.zeros((L, T, K), jnp.float32))
    with pytest.raises(ValueError, match=r"valid: expected a bool mask of the tokens' shape"):
        placed.record_slots(jnp.zeros((L, T, K), jnp.int32), valid=jnp.ones(T + 1, bool))


def test_scanned_step_keeps_slots_in_one_operation_a_layer():
    """The decode step's scanned trip with `dispatch_kept` launches one operation more than the
    plain trip: the map written into the kept slots (compiled for this backend)."""
    case = dataclasses.replace(bd.TINY, router="topk")
    trips = {}
    for variant in (bd.PLAIN, bd.KEPT):
        fn, args = bd.build(case, variant, "scanned")
        trips[variant] = bd.loop_body_ops(fn.lower(*args).compile().as_text())
    assert len(trips[bd.KEPT]) == len(trips[bd.PLAIN]) + 1, trips[bd.KEPT]
    assert any("dynamic-update-slice" in op for op in trips[bd.KEPT])

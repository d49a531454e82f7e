"""Slot-expanded gating: a top-k over the [T, P] form picks the logical top-k's experts with the
same scores, in the slots `dispatch_layer` chooses; softmax over slots equals softmax over
experts; jit-able; bad input named."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jeplb

T, E, K = 96, 8, 3
# P = 16 over one layer: experts 0 and 5 with three replicas, 2, 3 and 6 with two, slot 9 empty.
PHY2LOG = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 0, -1, 5, 2, 0, 5, 3, 6]], np.int32)
STATE = jeplb.EplbState.from_placement(
    PHY2LOG, num_experts=E, num_devices=4, window_size=1, step_interval=1
)
LOG2PHY, LOGCNT = STATE.log2phy[0], STATE.logcnt[0]
P = PHY2LOG.shape[1]


@functools.cache
def _logits():
    return jax.random.normal(jax.random.key(0), (T, E), jnp.float32)


def test_topk_over_slots_is_the_logical_topk_in_dispatch_slots():
    logits = _logits()
    expanded, phys, counts = jeplb.expand_gating(logits, LOG2PHY, LOGCNT, top_k=K)
    assert expanded.shape == (T, P) and expanded.dtype == logits.dtype
    values, slots = jax.lax.top_k(expanded, K)
    want_values, ids = jax.lax.top_k(logits, K)
    np.testing.assert_array_equal(PHY2LOG[0][np.asarray(slots)], np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    want_phys, want_counts = jeplb.dispatch_layer(LOG2PHY, LOGCNT, ids)
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(want_phys))
    np.testing.assert_array_equal(np.asarray(phys), np.asarray(want_phys))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    # The replicas of an expert share its tokens (not all on one slot).
    for expert in (0, 5):
        used = set(np.asarray(phys)[np.asarray(ids) == expert].tolist())
        assert used == set(np.flatnonzero(PHY2LOG[0] == expert).tolist()), expert


def test_every_expert_once_per_token_and_softmax_unchanged():
    logits = _logits()
    expanded, _, _ = jeplb.expand_gating(logits, LOG2PHY, LOGCNT, top_k=K)
    x = np.asarray(expanded)
    assert np.isneginf(x[:, 9]).all()  # the empty slot
    for e in range(E):
        finite = np.isfinite(x[:, PHY2LOG[0] == e])
        np.testing.assert_array_equal(finite.sum(1), 1)
        np.testing.assert_array_equal(x[:, PHY2LOG[0] == e][finite], np.asarray(logits)[:, e])
    per_expert = np.zeros((T, E), np.float32)
    np.add.at(
        per_expert.T,
        PHY2LOG[0][PHY2LOG[0] >= 0],
        np.asarray(jax.nn.softmax(x))[:, PHY2LOG[0] >= 0].T,
    )
    np.testing.assert_allclose(per_expert, np.asarray(jax.nn.softmax(logits)), rtol=1e-6)


def test_weights_with_zero_fill_under_jit_with_token_index():
    probs = jax.nn.softmax(_logits())
    index = jnp.arange(T, dtype=jnp.int32) + 1000  # global token indices of a shard
    fn = jax.jit(functools.partial(jeplb.expand_gating, top_k=K, fill=0.0))
    expanded, phys, _ = fn(probs, LOG2PHY, LOGCNT, token_index=index)
    eager, eager_phys, _ = jeplb.expand_gating(
        probs, LOG2PHY, LOGCNT, top_k=K, fill=0.0, token_index=index
    )
    np.testing.assert_array_equal(np.asarray(expanded), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(phys), np.asarray(eager_phys))
    np.testing.assert_allclose(np.asarray(expanded).sum(1), 1.0, rtol=1e-6)
    _, ids = jax.lax.top_k(probs, K)
    want, _ = jeplb.dispatch_layer(LOG2PHY, LOGCNT, ids, token_index=index)
    np.testing.assert_array_equal(np.asarray(jax.lax.top_k(expanded, K)[1]), np.asarray(want))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((np.zeros((4, E), np.int32), LOG2PHY, LOGCNT), dict(top_k=2), TypeError, "floating"),
        (
            (jnp.zeros((4, E + 1)), LOG2PHY, LOGCNT),
            dict(top_k=2),
            ValueError,
            r"\[T, E\] with E = 8",
        ),
        ((jnp.zeros((4, E)), STATE.log2phy, LOGCNT), dict(top_k=2), ValueError, "one layer's map"),
        (
            (jnp.zeros((4, E)), LOG2PHY, LOGCNT),
            dict(top_k=E + 1),
            ValueError,
            "top_k: expected at most",
        ),
        (
            (jnp.zeros((4, E)), LOG2PHY, LOGCNT),
            dict(top_k=0),
            ValueError,
            "top_k: expected an int >= 1",
        ),
        ((jnp.zeros((4, E)), LOG2PHY, LOGCNT), dict(top_k=2, num_slots=4), ValueError, "num_slots"),
        ((jnp.zeros((4, E)), LOG2PHY, LOGCNT[:4]), dict(top_k=2), ValueError, "logcnt: expected"),
    ],
)
def test_bad_input_is_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        jeplb.expand_gating(*args, **kwargs)

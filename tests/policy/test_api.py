"""The placement policy: DeepSeek's reference vector, vLLM's cases as facts, validity, agreement
with the numpy implementation, the migration-aware targets, determinism, one trace, bad input.

Shapes stay small and few so that every compiled program is reused across cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jeplb._src.metrics import balancedness, device_loads, remote_copies
from jeplb._src.policy.api import _rebalance_jit, rebalance_experts
from jeplb._src.policy.migration import preserve_slots
from jeplb.tools.reference_policy import rebalance_experts_numpy

README_W = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
README_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
README_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]

# (E, P, groups, nodes, D): hierarchical and global configurations of the property tests.
CONFIGS = [(12, 16, 4, 2, 8), (16, 24, 8, 4, 8), (12, 16, 3, 2, 4)]
L = 2  # layers of every property test, so that the compiled programs are shared


def check_valid(load, num_slots, num_groups, num_nodes, num_devices, out):
    """Every structural property a placement must have."""
    phy2log, log2phy, logcnt = (np.asarray(x) for x in out)
    num_layers, num_log = np.asarray(load).shape
    assert phy2log.shape == (num_layers, num_slots)
    assert logcnt.shape == (num_layers, num_log)
    assert log2phy.shape == (num_layers, num_log, num_slots - num_log + 1)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == np.int32
    # Every slot holds an expert (so every device holds exactly P / D of them).
    assert ((phy2log >= 0) & (phy2log < num_log)).all()
    assert (logcnt >= 1).all()
    assert (logcnt.sum(1) == num_slots).all()
    for layer in range(num_layers):
        assert (np.bincount(phy2log[layer], minlength=num_log) == logcnt[layer]).all()
        for e in range(num_log):
            c = logcnt[layer, e]
            slots = log2phy[layer, e, :c]
            assert (phy2log[layer, slots] == e).all()
            assert len(set(slots.tolist())) == c
            assert (log2phy[layer, e, c:] == -1).all()
    if num_groups % num_nodes == 0 and num_nodes > 1:
        # Hierarchical: each group on one node, the same number of groups on every node.
        group_size = num_log // num_groups
        node = np.arange(num_slots) // (num_slots // num_nodes)
        for layer in range(num_layers):
            g_node = np.full(num_groups, -1)
            for p, e in enumerate(phy2log[layer]):
                g = e // group_size
                assert g_node[g] in (-1, node[p]), "a group spans two nodes"
                g_node[g] = node[p]
            assert (np.bincount(g_node, minlength=num_nodes) == num_groups // num_nodes).all()


def drifted(seed, shape, drift=None):
    """(earlier load, drifted load): each expert's load times a factor in [1 - d, 1 + d], d drawn
    from [0.2, 0.5] unless given."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.2, 0.5) if drift is None else drift
    w0 = (rng.lognormal(0.0, 1.0, size=shape) * 1000).astype(np.float32)
    w1 = (w0 * rng.uniform(1 - d, 1 + d, size=shape)).astype(np.float32)
    return w0, w1


# ------------------------------------------------------------------------------ the reference


def test_readme_vector():
    out = rebalance_experts(jnp.array(README_W), 16, 4, 2, 8)
    assert np.asarray(out[0]).tolist() == README_PHY2LOG
    assert np.asarray(out[2]).tolist() == README_LOGCNT
    check_valid(README_W, 16, 4, 2, 8, out)
    ref = rebalance_experts_numpy(np.array(README_W), 16, 4, 2, 8)
    assert ref[0].tolist() == README_PHY2LOG
    assert (np.asarray(out[1]) == ref[1]).all()


@pytest.mark.parametrize(
    "load, args, fact",
    [
        # vLLM test_eplb_algo, as facts: inputs and the properties it expects.
        ([[10, 20, 30, 40]], (4, 1, 1, 1), "all_experts_once"),
        ([[50] * 8], (8, 2, 2, 4), "all_counts_one"),
        ([[1000, 1, 1, 1, 1, 1, 1, 1]], (12, 2, 2, 4), "heaviest_more"),
        ([[10, 20, 30, 40, 50, 60], [60, 50, 40, 30, 20, 10], [25] * 6], (8, 2, 2, 4), "valid"),
        ([[10, 20, 30, 40]], (8, 3, 2, 4), "valid"),  # groups % nodes != 0: global policy
        ([[100, 50, 200, 75, 150, 25, 300, 80]], (12, 4, 2, 4), "heaviest_two"),
        ([[10, 20, 30, 40, 50, 60]], (8, 3, 2, 4), "valid"),
        ([[10, 20, 30, 40]], (6, 2, 1, 2), "valid"),
        (
            [[50, 100, 75, 120, 90, 60, 80, 110, 40, 70, 95, 85, 65, 55, 45, 35]],
            (24, 8, 4, 8),
            "valid",
        ),
        ([[200, 150, 100, 50, 25, 12], [12, 25, 50, 100, 150, 200]], (10, 3, 1, 2), "heaviest_two"),
    ],
)
def test_vllm_cases(load, args, fact):
    out = rebalance_experts(jnp.array(load), *args)
    check_valid(load, *args, out)
    phy2log, _, logcnt = (np.asarray(x) for x in out)
    w = np.array(load)
    if fact == "all_experts_once":
        assert set(phy2log[0].tolist()) == set(range(w.shape[1]))
    if fact == "all_counts_one":
        assert (logcnt == 1).all()
    if fact == "heaviest_more":
        assert logcnt[0, 0] > logcnt[0, 1]
    if fact == "heaviest_two":
        for layer in range(w.shape[0]):
            assert logcnt[layer, np.argmax(w[layer])] >= 2


def test_groups_not_divisible_by_nodes_is_the_global_policy():
    w = jnp.array([[10, 20, 30, 40, 50, 60]])
    a = rebalance_experts(w, 8, 3, 2, 4)
    b = rebalance_experts(w, 8, 1, 1, 4)
    for x, y in zip(a, b, strict=True):
        assert (np.asarray(x) == np.asarray(y)).all()


@pytest.mark.parametrize("config", CONFIGS)
def test_agrees_with_numpy_without_ties(config):
    num_log, num_slots, groups, nodes, devices = config
    rng = np.random.default_rng(sum(config))
    w = rng.uniform(1.0, 1000.0, size=(L, num_log)).astype(np.float32)
    ours = [
        np.asarray(x) for x in rebalance_experts(jnp.asarray(w), num_slots, groups, nodes, devices)
    ]
    ref = rebalance_experts_numpy(w, num_slots, groups, nodes, devices)
    assert (ours[2] == ref[2]).all()
    slots = num_slots // devices
    for layer in range(L):
        for g in range(devices):
            mine = sorted(ours[0][layer, g * slots : (g + 1) * slots].tolist())
            theirs = sorted(ref[0][layer, g * slots : (g + 1) * slots].tolist())
            assert mine == theirs
    assert (ours[0] == ref[0]).all()


# ------------------------------------------------------------------------------- properties


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**31 - 1),
    migrate=st.booleans(),
    zeros=st.booleans(),
)
def test_valid_placement(config, seed, migrate, zeros):
    num_log, num_slots, groups, nodes, devices = config
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 1000, size=(L, num_log)).astype(np.float32)
    if zeros:
        w[:, rng.random(num_log) < 0.5] = 0
    old = None
    if migrate:
        # The placement of other loads, with some duplicate replicas emptied.
        w_old = rng.integers(0, 1000, size=(L, num_log)).astype(np.float32)
        old = np.array(rebalance_experts(w_old, num_slots, groups, nodes, devices)[0])
        for layer in range(2):
            for p in rng.permutation(num_slots):
                if (old[layer] == old[layer, p]).sum() > 1 and rng.random() < 0.5:
                    old[layer, p] = -1
    out = rebalance_experts(jnp.asarray(w), num_slots, groups, nodes, devices, old_phy2log=old)
    check_valid(w, num_slots, groups, nodes, devices, out)
    if migrate:
        # Within 1% of the from-scratch maximum on every layer; kept experts keep their slots.
        scratch = rebalance_experts(jnp.asarray(w), num_slots, groups, nodes, devices)[0]
        top = np.asarray(balancedness(out[0], w, devices).max)
        assert (top <= np.asarray(balancedness(scratch, w, devices).max) * 1.01 + 1e-3).all()
        kept_slots_ok(old, np.asarray(out[0]), devices)


@pytest.mark.parametrize("config", CONFIGS)
def test_zero_load_is_valid(config):
    num_log, num_slots, groups, nodes, devices = config
    w = jnp.zeros((2, num_log), jnp.float32)
    check_valid(
        w,
        num_slots,
        groups,
        nodes,
        devices,
        rebalance_experts(w, num_slots, groups, nodes, devices),
    )
    old = np.array(rebalance_experts(w + jnp.arange(num_log, dtype=w.dtype), *config[1:])[0])
    out = rebalance_experts(w, num_slots, groups, nodes, devices, old_phy2log=old)
    check_valid(w, num_slots, groups, nodes, devices, out)
    # Nothing to balance: at most the redundant replicas move.
    assert int(remote_copies(old, out[0], devices).sum()) <= 2 * (num_slots - num_log)


@pytest.mark.parametrize("config", CONFIGS)
def test_refine_never_worse_per_layer(config):
    num_log, num_slots, groups, nodes, devices = config
    rng = np.random.default_rng(7)
    w = (rng.lognormal(0.0, 1.5, size=(L, num_log)) * 100).astype(np.float32)
    plain = rebalance_experts(w, num_slots, groups, nodes, devices)[0]
    refined = rebalance_experts(w, num_slots, groups, nodes, devices, refine=True)
    check_valid(w, num_slots, groups, nodes, devices, refined)
    a = np.asarray(balancedness(plain, w, devices).max)
    b = np.asarray(balancedness(refined[0], w, devices).max)
    assert (b <= a * (1 + 1e-6)).all()
    assert (np.asarray(refined[2]) == np.asarray(rebalance_experts(w, *config[1:])[2])).all()


# ------------------------------------------------------------------------ migration-aware mode

MIGRATION_SHAPES = [
    # (L, E, P, groups, nodes, D)
    (8, 64, 80, 1, 1, 8),
    (8, 128, 160, 8, 2, 16),
]


@pytest.mark.parametrize("shape", MIGRATION_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_migration_target(shape, seed):
    num_layers, num_log, num_slots, groups, nodes, devices = shape
    w0, w1 = drifted(seed, (num_layers, num_log))
    old = rebalance_experts(w0, num_slots, groups, nodes, devices)[0]
    scratch = rebalance_experts(w1, num_slots, groups, nodes, devices)[0]
    out = rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old)
    check_valid(w1, num_slots, groups, nodes, devices, out)
    moved_scratch = int(remote_copies(old, scratch, devices).sum())
    moved = int(remote_copies(old, out[0], devices).sum())
    assert moved <= 0.25 * moved_scratch, (moved, moved_scratch)
    # Per layer: max / mean within 1% of the from-scratch placement (the means are equal).
    ratio = np.asarray(
        balancedness(out[0], w1, devices).max / balancedness(scratch, w1, devices).max
    )
    assert (ratio <= 1.01 + 1e-6).all(), ratio.max()


def test_migration_target_with_refine():
    num_layers, num_log, num_slots, groups, nodes, devices = MIGRATION_SHAPES[0]
    w0, w1 = drifted(5, (num_layers, num_log), drift=0.3)
    old = rebalance_experts(w0, num_slots, groups, nodes, devices, refine=True)[0]
    scratch = rebalance_experts(w1, num_slots, groups, nodes, devices, refine=True)[0]
    full = rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old, refine=True)
    check_valid(w1, num_slots, groups, nodes, devices, full)
    out = full[0]
    assert int(remote_copies(old, out, devices).sum()) <= 0.25 * int(
        remote_copies(old, scratch, devices).sum()
    )
    ratio = np.asarray(balancedness(out, w1, devices).max / balancedness(scratch, w1, devices).max)
    assert (ratio <= 1.01 + 1e-6).all()


@pytest.mark.parametrize("config", CONFIGS)
def test_same_load_moves_nothing(config):
    num_log, num_slots, groups, nodes, devices = config
    w = np.random.default_rng(3).uniform(1, 100, size=(2, num_log)).astype(np.float32)
    old = np.asarray(rebalance_experts(w, num_slots, groups, nodes, devices)[0])
    new = rebalance_experts(w, num_slots, groups, nodes, devices, old_phy2log=old)[0]
    assert (np.asarray(new) == old).all()


def kept_slots_ok(old, new, devices):
    """Per device: an expert held before and after keeps min(before, after) of its old slots."""
    num_layers, num_slots = old.shape
    slots = num_slots // devices
    for layer in range(num_layers):
        for g in range(devices):
            o = old[layer, g * slots : (g + 1) * slots]
            n = new[layer, g * slots : (g + 1) * slots]
            for e in set(o.tolist()) & set(n.tolist()):
                if e < 0:
                    continue
                keep = min((o == e).sum(), (n == e).sum())
                assert (n[o == e] == e).sum() >= keep, (layer, g, e, o, n)


@pytest.mark.parametrize("shape", MIGRATION_SHAPES)
def test_migration_keeps_slot_indices(shape):
    num_layers, num_log, num_slots, groups, nodes, devices = shape
    w0, w1 = drifted(11, (num_layers, num_log), drift=0.4)
    old = np.asarray(rebalance_experts(w0, num_slots, groups, nodes, devices)[0])
    new = np.asarray(rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old)[0])
    kept_slots_ok(old, new, devices)
    # Most rows stay where they are, so few slots change at all.
    assert (new != old).mean() < 0.25


def test_migration_with_empty_slots_and_duplicates():
    num_log, num_slots, groups, nodes, devices = 12, 16, 4, 2, 8
    w0, w1 = drifted(4, (2, num_log), drift=0.3)
    old = np.array(rebalance_experts(w0, num_slots, groups, nodes, devices)[0])
    dup = [p for p in range(num_slots) if (old[0] == old[0, p]).sum() > 1]
    old[0, dup[0]] = -1  # an empty slot
    old[1, 0], old[1, 1] = old[1, 1], old[1, 1]  # a duplicate on one device
    if not set(range(num_log)) <= set(old[1].tolist()):
        old[1] = np.array(rebalance_experts(w0, num_slots, groups, nodes, devices)[0])[1]
    out = rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old)
    check_valid(w1, num_slots, groups, nodes, devices, out)
    kept_slots_ok(old, np.asarray(out[0]), devices)


@pytest.mark.parametrize(
    "devices, slots, old, new",
    [
        # vLLM's intra-GPU rearrangement cases (facts: a device's new set, old slots kept).
        (2, 4, [0, 1, 2, 3, 4, 5, 6, 7], [1, 5, 0, 4, 6, 2, 7, 3]),
        (2, 5, [0, 1, 0, 2, 3, 4, 5, 6, 1, 2], [0, 5, 4, 0, 1, 6, 2, 3, 2, 1]),
        (3, 4, [0, 1, 2, 3] * 3, [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 0]),
    ],
)
def test_preserve_slots(devices, slots, old, new):
    o = jnp.array([old], jnp.int32).reshape(1, devices, slots)
    n = jnp.array([new], jnp.int32).reshape(1, devices, slots)
    post = np.asarray(jax.jit(preserve_slots)(n, o)).reshape(1, -1)  # as the policy runs it
    assert post.shape == (1, devices * slots)
    kept_slots_ok(np.array([old]), post, devices)
    for g in range(devices):
        sl = slice(g * slots, (g + 1) * slots)
        assert sorted(post[0, sl].tolist()) == sorted(new[sl])


# ----------------------------------------------------------------- determinism and tracing


def test_deterministic_repeated_and_traced_old():
    num_log, num_slots, groups, nodes, devices = CONFIGS[0]
    w0, w1 = drifted(9, (L, num_log), drift=0.5)
    old = rebalance_experts(w0, num_slots, groups, nodes, devices)[0]

    def run(w, o):
        return rebalance_experts(w, num_slots, groups, nodes, devices, old_phy2log=o)

    first = [np.asarray(x) for x in run(w1, old)]
    again = [np.asarray(x) for x in run(w1, old)]
    outer = jax.jit(run)  # the old map is a tracer inside
    traced = [np.asarray(x) for x in outer(jnp.asarray(w1), old)]
    outer(jnp.asarray(w0), old)
    assert outer._cache_size() == 1
    for outs in (again, traced):
        for a, b in zip(first, outs, strict=True):
            assert (a == b).all()


def test_jit_equals_eager():
    w = jnp.asarray(drifted(12, (1, 8))[1])
    jitted = [np.asarray(x) for x in rebalance_experts(w, 12, 2, 2, 4)]
    with jax.disable_jit():
        eager = [np.asarray(x) for x in rebalance_experts(w, 12, 2, 2, 4)]
    for a, b in zip(jitted, eager, strict=True):
        assert (a == b).all()


def test_one_trace_per_shape():
    num_log, num_slots, groups, nodes, devices = CONFIGS[2]
    rng = np.random.default_rng(0)
    # A shape no other test uses, so this test sees its first compilation.
    before = _rebalance_jit._cache_size()
    for _ in range(3):
        load = jnp.asarray(rng.random((3, num_log)), jnp.float32)
        rebalance_experts(load, num_slots, groups, nodes, devices)
    assert _rebalance_jit._cache_size() - before == 1


def test_one_trace_inside_an_outer_jit():
    traces = []

    def policy(load):
        traces.append(load.shape)  # runs once per trace, not per call
        return rebalance_experts(load, 12, 2, 2, 4)

    outer = jax.jit(policy)
    rng = np.random.default_rng(1)
    for _ in range(3):
        outer(jnp.asarray(rng.random((1, 8)), jnp.float32))
    assert traces == [(1, 8)]


# ------------------------------------------------------------- loads past int32 and float32

# (E, P, groups, nodes, D) of the wide-load tests: 4 redundant slots for one hot expert.
WIDE = (8, 12, 1, 1, 4)
# One expert at 3 units, the others at 1: the hot expert gets 4 replicas, the next one 2.
UNITS = np.array([[3, 1, 1, 1, 1, 1, 1, 1], [1, 1, 2, 1, 1, 1, 1, 1]], np.float32)


def maps(out):
    return [np.asarray(x) for x in out]


@pytest.fixture(scope="module")
def units_placement():
    out = maps(rebalance_experts(UNITS, *WIDE[1:]))
    assert out[2][0].tolist() == [4, 2, 1, 1, 1, 1, 1, 1]
    return out


@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.uint64])
def test_wide_integers_keep_proportions(dtype, units_placement):
    # 3e9 and 1e9 are exact in float32 and keep the 3 : 1 ratio; an int32 would wrap 3e9.
    load = (UNITS.astype(np.int64) * 10**9).astype(dtype)
    for a, b in zip(maps(rebalance_experts(load, *WIDE[1:])), units_placement, strict=True):
        assert (a == b).all()


@pytest.mark.parametrize("scale", [2.0**130, 2.0**1000])
def test_float64_past_float32_range_keeps_proportions(scale, units_placement):
    # A power-of-two multiple of UNITS: the scaled placement must be the same, bit for bit.
    out = maps(rebalance_experts(UNITS.astype(np.float64) * scale, *WIDE[1:]))
    for a, b in zip(out, units_placement, strict=True):
        assert (a == b).all()


def test_float64_1e39_is_the_hot_expert():
    load = np.ones((2, 8))
    load[0, 0] = 1e39  # float32 would make it inf, then 0
    _, _, logcnt = maps(rebalance_experts(load, *WIDE[1:]))
    assert logcnt[0].tolist() == [5, 1, 1, 1, 1, 1, 1, 1]
    # A layer is scaled on its own: the ordinary layer is placed as if alone.
    alone = maps(rebalance_experts(load[1:], *WIDE[1:]))
    assert (logcnt[1] == alone[2][0]).all()


def test_float32_near_its_max_under_jit(units_placement):
    # Traced loads are scaled inside the program; sums of 3 * 2**126 would overflow unscaled.
    run = jax.jit(lambda w: rebalance_experts(w, *WIDE[1:]))
    for a, b in zip(maps(run(jnp.asarray(UNITS * 2.0**126))), units_placement, strict=True):
        assert (a == b).all()


def test_wide_integers_migration_aware(units_placement):
    load = UNITS.astype(np.int64) * 2**33  # past int32 and 2**24, the proportions exact
    out = rebalance_experts(load, *WIDE[1:], old_phy2log=units_placement[0])
    assert (np.asarray(out[0]) == units_placement[0]).all()  # same proportions: nothing moves


def test_metrics_wide_loads():
    phy2log = np.array([[0, 1, 0, 2]])
    wide = device_loads(phy2log, np.array([[4, 1, 3]], np.int64) * 10**9, 2)
    assert np.asarray(wide).tolist() == [[3e9, 5e9]]
    with pytest.raises(ValueError, match=r"load\[0, 0\] = 1e\+39: expected loads within float32"):
        balancedness(phy2log, np.array([[1e39, 1.0, 1.0]]), 2)
    with pytest.raises(ValueError, match=r"phy2log\[0, 3\] = 4294967298: expected an expert id"):
        device_loads(np.array([[0, 1, 0, 2**32 + 2]]), np.ones((1, 3)), 2)


# -------------------------------------------------------------------------------- bad input

GOOD = np.ones((2, 8), np.float32)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones((2, 12)), 16, 5, 1, 8), {}, r"num_groups: expected a divisor of the E = 12"),
        ((GOOD, 9, 2, 2, 3), {}, r"num_devices: expected a multiple of num_nodes = 2"),
        ((GOOD, 14, 2, 2, 4), {}, r"num_slots: expected a multiple of num_devices = 4"),
        ((GOOD, 4, 2, 2, 4), {}, r"num_slots: expected at least one slot .*>= E = 8"),
        ((-GOOD, 8, 2, 2, 4), {}, r"load\[0, 0\] = -1.0: expected finite loads >= 0"),
        ((GOOD * np.nan, 8, 2, 2, 4), {}, r"load\[0, 0\] = nan: expected finite loads"),
        (
            (GOOD, 8, 2, 2, 4),
            {"old_phy2log": np.zeros((1, 8), np.int32)},
            r"old_phy2log: expected shape \[L, P\] = \(2, 8\)",
        ),
        (
            (GOOD, 8, 2, 2, 4),
            {"old_phy2log": np.zeros((2, 8), np.int32)},
            r"old_phy2log\[0\]: expert 1 has no slot",
        ),
        (
            (GOOD, 8, 2, 2, 4),
            {"old_phy2log": np.full((2, 8), 8, np.int32)},
            r"old_phy2log\[0, 0\] = 8: expected an expert id in \[0, num_experts = 8\)",
        ),
        ((np.ones(8), 8, 2, 2, 4), {}, r"load: expected a 2-D array \[L, E\]"),
    ],
)
def test_bad_input_value_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((GOOD, 8.0, 2, 2, 4), {}, r"num_slots: expected an int, got float"),
        ((GOOD, 8, 2, 2, True), {}, r"num_devices: expected an int, got bool"),
        (("load", 8, 2, 2, 4), {}, r"load: expected an array \[L, E\], got str"),
        ((GOOD.astype(bool), 8, 2, 2, 4), {}, r"load: expected a real .* dtype, got bool"),
        (
            (GOOD, 8, 2, 2, 4),
            {"old_phy2log": np.zeros((2, 8), np.float32)},
            r"old_phy2log: expected an integer dtype",
        ),
    ],
)
def test_bad_input_type_errors(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        rebalance_experts(*args, **kwargs)


# ------------------------------------------------------------------------------ swap refinement


def test_first_argmin_is_argmin_with_ties():
    from jeplb._src.policy.ops import first_argmin

    x = np.random.default_rng(0).integers(0, 4, size=(64, 37)).astype(np.float32)
    x[3] = np.inf
    idx, low = first_argmin(jnp.asarray(x))
    assert (np.asarray(idx) == np.argmin(x, axis=1)).all()
    assert (np.asarray(low) == x.min(axis=1)).all()


def test_first_argmax_is_argmax_with_ties():
    from jeplb._src.policy.ops import first_argmax

    x = np.random.default_rng(1).integers(0, 4, size=(64, 37)).astype(np.float32)
    x[3] = np.inf
    idx, high = first_argmax(jnp.asarray(x))
    assert (np.asarray(idx) == np.argmax(x, axis=1)).all()
    assert (np.asarray(high) == x.max(axis=1)).all()


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("axis", [0, -1])
def test_pair_reduction_matches_two_reductions(axis, largest):
    """The one-reduction form of `lexicographic_first` (used off CPUs) picks the same entry."""
    from jeplb._src.policy import ops

    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(64, 37)).astype(np.float32)
    x[3], x[5], x[7, ::3], x[:, 4] = np.inf, -np.inf, -0.0, 0.0
    tie = rng.permutation(x.size).reshape(x.shape).astype(np.int32)
    pair = jax.jit(ops._pair_reduction, static_argnums=(2, 3))(x, tie, axis, largest)
    two = ops._two_reductions(jnp.asarray(x), jnp.asarray(tie), axis, largest)
    assert (np.asarray(pair[0]) == np.asarray(two[0])).all()
    assert (np.asarray(pair[1]) == np.asarray(two[1])).all()
    extreme = x.max(axis) if largest else x.min(axis)
    assert (np.asarray(pair[1]) == extreme).all()


@pytest.mark.parametrize("width", [8, 40])  # one uint32 word, and two
def test_held_bits_read_back(width):
    """Swap refinement's held-before rows as bits give back every flag, one or all at a time."""
    from jeplb._src.policy import refine

    rng = np.random.default_rng(width)
    flags = rng.random((3, 5, width)) < 0.5
    g = rng.integers(0, width, (3, 5)).astype(np.int32)

    @jax.jit  # as the policy runs them: one program, not an eager program per op
    def read(flags, g):
        words = refine._bit_words(flags)
        every = refine._bit(words[:, :, None, :], jnp.arange(width, dtype=jnp.int32))
        return words, refine._bit(words, g), every

    words, got, every = read(jnp.asarray(flags), jnp.asarray(g))
    assert words.shape == (3, 5, -(-width // 32))
    one = np.take_along_axis(flags, g[..., None], 2)[..., 0]
    assert (np.asarray(got) == one).all()
    assert (np.asarray(every) == flags).all()


@pytest.mark.parametrize("n", [37, 600])  # counted, and sorted past _COUNT_ORDER_MAX
def test_descending_order_is_a_stable_sort_with_ties(n):
    from jeplb._src.policy.ops import descending_order

    x = np.random.default_rng(n).integers(0, 4, size=(8, n)).astype(np.float32)
    x[1] = np.inf
    x[2, ::2] = -0.0  # equal to +0: increasing index
    order = np.asarray(jax.jit(descending_order)(jnp.asarray(x)))  # as the policy runs it
    assert (order == np.argsort(-x, axis=1, kind="stable")).all()


def test_sort_by_key_is_a_stable_sort():
    from jeplb._src.policy.ops import sort_by_key

    key = np.random.default_rng(2).integers(-1, 5, size=(3, 4, 41)).astype(np.int32)
    sorted_key, pos = (np.asarray(v) for v in sort_by_key(jnp.asarray(key)))
    assert (pos == np.argsort(key, axis=-1, kind="stable")).all()
    assert (sorted_key == np.sort(key, axis=-1)).all()


def test_swap_refine_batches_the_active_rows_without_changing_a_swap(monkeypatch):
    from jeplb._src.policy import refine

    rng = np.random.default_rng(4)
    x_rows, devices, slots, n = 64, 4, 3, 9
    load = jnp.asarray(rng.lognormal(0.0, 1.0, size=(x_rows, devices * slots)).astype(np.float32))
    expert = jnp.asarray(rng.integers(0, n, size=(x_rows, devices * slots)).astype(np.int32))
    held = jnp.asarray(rng.random((x_rows, devices, n)) < 0.3)
    stop = jnp.asarray(rng.uniform(0.5, 1.0, size=x_rows).astype(np.float32)) * load.sum(1) / 4

    def run():
        return jax.jit(lambda a, b, c, d: refine.swap_refine(a, (b,), slots, stop=c, held=d))(
            load, expert, stop, held
        )

    batched = run()
    monkeypatch.setattr(refine, "_COMPACT", ())
    monkeypatch.setattr(refine, "_UNROLL", 1)
    plain = run()
    assert (np.asarray(batched[0]) == np.asarray(plain[0])).all()
    assert (np.asarray(batched[1][0]) == np.asarray(plain[1][0])).all()
    assert not (np.asarray(plain[1][0]) == np.asarray(expert)).all()  # some rows swapped

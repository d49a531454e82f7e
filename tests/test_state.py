"""EplbState (building, checks, pytree, save/load) and the dispatch hook (replicas, counts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jeplb._src.dispatch import dispatch, dispatch_layer
from jeplb._src.maps import maps_from_phy2log
from jeplb._src.state import EplbState

L, E, R, D = 3, 8, 8, 8  # P = 16 slots, N_local = 2


def mesh8() -> Mesh:
    return jax.make_mesh((D,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))


def random_placement(rng, num_layers=L, num_experts=E, p_total=E + R) -> np.ndarray:
    rows = []
    for _ in range(num_layers):
        extra = rng.integers(0, num_experts, p_total - num_experts)
        rows.append(rng.permutation(np.concatenate([np.arange(num_experts), extra])))
    return np.stack(rows).astype(np.int32)


def check_maps(state: EplbState) -> None:
    """log2phy / logcnt describe exactly the slots of phy2log."""
    p2l = np.asarray(state.phy2log)
    l2p = np.asarray(state.log2phy)
    cnt = np.asarray(state.logcnt)
    for lay in range(p2l.shape[0]):
        for e in range(cnt.shape[1]):
            slots = sorted(np.flatnonzero(p2l[lay] == e).tolist())
            listed = l2p[lay, e]
            assert cnt[lay, e] == len(slots)
            assert sorted(listed[listed >= 0].tolist()) == slots
            assert (listed[cnt[lay, e] :] == -1).all()


@pytest.fixture(scope="module")
def state() -> EplbState:
    return EplbState.create(
        num_layers=L,
        num_experts=E,
        num_devices=D,
        num_redundant_experts=R,
        window_size=4,
        step_interval=10,
    )


# ------------------------------------------------------------------------------------ create


def test_create_initial_placement(state):
    p_total = E + R
    assert state.phy2log.dtype == jnp.int32 and state.phy2log.shape == (L, p_total)
    np.testing.assert_array_equal(state.phy2log, np.tile(np.arange(p_total) % E, (L, 1)))
    assert state.log2phy.shape == (L, E, R + 1) and state.logcnt.shape == (L, E)
    check_maps(state)
    assert state.pass_load.shape == (L, E) and state.pass_load.dtype == jnp.int32
    assert state.window.shape == (4, L, E) and int(state.window.sum()) == 0
    assert int(state.step) == 0 and int(state.window_pos) == 0
    assert int(state.cursor) == L and not bool(state.in_progress)
    np.testing.assert_array_equal(state.pending_phy2log, state.phy2log)
    assert (state.num_slots, state.slots_per_device, state.max_replicas) == (16, 2, 9)
    assert not hasattr(state, "num_gpus") and state.effective_layers_per_step == L


def test_state_is_a_pytree_with_static_config(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 11
    out = jax.jit(lambda s: s.replace(step=s.step + 1))(state)
    assert int(out.step) == 1 and out.config() == state.config()
    other = EplbState.create(
        num_layers=L,
        num_experts=E,
        num_devices=D,
        num_redundant_experts=R,
        window_size=4,
        step_interval=11,
    )
    assert jax.tree_util.tree_structure(other) != treedef  # config is part of the structure


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_redundant_experts=-1), ValueError, r"num_redundant_experts: expected an int >= 0, got -1"),
        (dict(num_redundant_experts=3), ValueError, r"P = 11 slots per layer .* not divisible by num_devices = 8"),
        (dict(window_size=0), ValueError, r"window_size: expected an int >= 1, got 0"),
        (dict(step_interval=0), ValueError, r"step_interval: expected an int >= 1, got 0"),
        (dict(layers_per_step=4), ValueError, r"layers_per_step: expected at most num_layers = 3, got 4"),
        (dict(layers_per_step=1, step_interval=2), ValueError, r"takes 3 steps, so step_interval must be >= 3; got 2"),
        (dict(num_layers=2.0), TypeError, r"num_layers: expected an int, got float 2.0"),
        (dict(num_experts=0), ValueError, r"num_experts: expected an int >= 1, got 0"),
        (dict(num_groups=3), ValueError, r"num_groups: expected a divisor of num_experts = 8"),
        (dict(num_gpus=8), TypeError, r"unexpected keyword argument 'num_gpus'"),
        (dict(axis_name=1), TypeError, r"axis_name: expected a mesh axis name \(str\) or a tuple"),
        (dict(axis_name=["ep"]), TypeError, r"axis_name: expected a mesh axis name \(str\) or a tuple .* list \['ep'\]"),
        (dict(axis_name=("ep", "ep")), TypeError, r"axis_name: expected .* distinct"),
        (dict(refine=1), TypeError, r"refine: expected a bool, got int 1"),
        (dict(chunk_rows=0), ValueError, r"chunk_rows: expected an int >= 1, got 0"),
    ],
)  # fmt: skip
def test_create_rejects_bad_arguments(kwargs, error, match):
    args = dict(
        num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=4,
        step_interval=10,
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=match):
        EplbState.create(**args)


def test_from_placement_derives_maps():
    p2l = random_placement(np.random.default_rng(0))
    s = EplbState.from_placement(p2l, num_experts=E, num_devices=D, window_size=2, step_interval=5)
    np.testing.assert_array_equal(s.phy2log, p2l)
    check_maps(s)
    # The jnp derivation also works traced, and agrees.
    l2p, cnt = jax.jit(maps_from_phy2log, static_argnums=(1, 2))(p2l, E, R + 1)
    np.testing.assert_array_equal(l2p, s.log2phy)
    np.testing.assert_array_equal(cnt, s.logcnt)


@pytest.mark.parametrize(
    "p2l, error, match",
    [
        (np.zeros((16,), np.int32), ValueError, r"phy2log: expected a 2-D map \[L, P\], got shape \(16,\)"),
        (np.zeros((1, 16), np.float32), TypeError, r"phy2log: expected an integer dtype"),
        (np.array([[0, 1, 2, 3, 4, 5, 6, 9] * 2]), ValueError, r"phy2log\[0, 7\] = 9: expected an expert id in \[0, num_experts = 8\)"),
        (np.array([[0, 1, 2, 3, 4, 5, 6, 6] * 2]), ValueError, r"phy2log\[0\]: expert 7 has no slot"),
        (np.arange(12)[None] % 8, ValueError, r"P = 12 slots .* not divisible by num_devices = 8"),
    ],
)  # fmt: skip
def test_from_placement_rejects_bad_maps(p2l, error, match):
    with pytest.raises(error, match=match):
        EplbState.from_placement(p2l, num_experts=E, num_devices=D, window_size=2, step_interval=5)


# ----------------------------------------------------------------------------------- dispatch


@pytest.fixture(scope="module")
def placed():
    """A state whose placement has uneven replica counts (1 to several replicas per expert)."""
    p2l = random_placement(np.random.default_rng(1))
    return EplbState.from_placement(
        p2l, num_experts=E, num_devices=D, window_size=2, step_interval=5
    )


def routed(seed, t=64, k=2):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(E)[:k] for _ in range(t)]).astype(np.int32)
    valid = rng.random(t) < 0.8
    return ids, valid


def test_dispatch_counts_exactly_what_was_routed(placed):
    ids, valid = routed(2)
    phys, s = dispatch(placed, 1, jnp.asarray(ids), valid=jnp.asarray(valid))
    want = np.bincount(ids[valid].ravel(), minlength=E)
    np.testing.assert_array_equal(s.pass_load[1], want)
    assert int(s.pass_load[0].sum()) == 0 and int(s.pass_load[2].sum()) == 0
    # Every token, masked or not, goes to a slot holding its logical expert.
    np.testing.assert_array_equal(np.asarray(placed.phy2log[1])[np.asarray(phys)], ids)
    # Recording accumulates.
    _, s2 = dispatch(s, 1, jnp.asarray(ids), valid=jnp.asarray(valid))
    np.testing.assert_array_equal(s2.pass_load[1], 2 * want)


def test_dispatch_spreads_over_replicas_deterministically(placed):
    cnt = np.asarray(placed.logcnt[0])
    e = int(np.argmax(cnt))
    assert cnt[e] >= 2
    ids = np.full((3000, 2), e, np.int32)
    ids[:, 1] = (e + 1) % E  # expert e always first: a plain modulo of t*K+k would pin a replica
    phys, _ = dispatch(placed, 0, jnp.asarray(ids))
    used = np.bincount(np.asarray(phys)[:, 0], minlength=E + R)
    slots = np.flatnonzero(np.asarray(placed.phy2log[0]) == e)
    share = used[slots] / used.sum()
    assert used.sum() == 3000 and np.all(np.abs(share - 1 / cnt[e]) < 0.05), share
    again, _ = dispatch(placed, 0, jnp.asarray(ids))
    np.testing.assert_array_equal(phys, again)
    shifted, _ = dispatch(placed, 0, jnp.asarray(ids), token_index=jnp.arange(3000) + 7)
    assert not np.array_equal(shifted, phys)


def test_dispatch_prefers_a_local_replica(placed):
    ids, _ = routed(3, t=200)
    dev = np.arange(200) % D
    phys, _ = dispatch(
        placed, 2, jnp.asarray(ids), prefer_local=True, device_index=jnp.asarray(dev)
    )
    phys = np.asarray(phys)
    p2l = np.asarray(placed.phy2log[2])
    n = placed.slots_per_device
    np.testing.assert_array_equal(p2l[phys], ids)
    for t in range(200):
        for k in range(2):
            local = [p for p in range(dev[t] * n, (dev[t] + 1) * n) if p2l[p] == ids[t, k]]
            if local:
                assert phys[t, k] in local
    # A scalar device index works too.
    phys0, _ = dispatch(placed, 2, jnp.asarray(ids), prefer_local=True, device_index=0)
    local0 = np.isin(np.asarray(phys0), np.arange(n))
    holds0 = np.isin(ids, p2l[:n])
    np.testing.assert_array_equal(local0, holds0)


@pytest.mark.devices(8)
def test_dispatch_prefer_local_inside_shard_map_uses_the_axis_index(placed):
    mesh = mesh8()
    ids, _ = routed(4, t=8 * 4)

    def body(s, ids):
        phys, after = dispatch(s, 0, ids, prefer_local=True)
        mine = after.pass_load - s.pass_load  # this device's counts
        return phys, s.record(mine, load_axes="ep")  # summed over the devices: replicated

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep")), out_specs=(P("ep"), P())))
    phys, s = f(placed, jnp.asarray(ids))
    want, _ = dispatch(
        placed,
        0,
        jnp.asarray(ids),
        prefer_local=True,
        device_index=jnp.repeat(jnp.arange(8), 4),
        token_index=jnp.tile(jnp.arange(4), 8),
    )
    np.testing.assert_array_equal(phys, want)
    np.testing.assert_array_equal(s.pass_load[0], np.bincount(ids.ravel(), minlength=E))


def test_dispatch_out_of_range_ids(placed):
    ids = np.array([[0, 1], [9, 2], [3, -1]], np.int32)
    with pytest.raises(
        ValueError,
        match=r"topk_ids\[1, 0\] = 9: expected logical expert ids in \[0, num_experts = 8\)",
    ):
        dispatch(placed, 0, jnp.asarray(ids))
    # Masked tokens may carry anything: mapped to -1 where out of range, never counted.
    phys, s = dispatch(placed, 0, jnp.asarray(ids), valid=jnp.array([True, False, False]))
    assert np.asarray(phys)[1, 0] == -1 and np.asarray(phys)[2, 1] == -1
    np.testing.assert_array_equal(s.pass_load[0], np.bincount([0, 1], minlength=E))
    # Under jit the values cannot be checked: -1, not counted.
    phys, s = jax.jit(lambda s, i: dispatch(s, 0, i))(placed, jnp.asarray(ids))
    np.testing.assert_array_equal(
        np.asarray(phys) == -1, [[False, False], [True, False], [False, True]]
    )
    np.testing.assert_array_equal(s.pass_load[0], np.bincount([0, 1, 2, 3], minlength=E))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layer=3), ValueError, r"layer: expected an index in \[0, num_layers = 3\), got 3"),
        (dict(valid=jnp.ones((4,), bool)), ValueError, r"valid: expected a bool mask of the tokens' shape \(3,\)"),
        (dict(token_index=jnp.arange(4)), ValueError, r"token_index: expected shape \(3,\)"),
        (dict(topk_ids=jnp.zeros((3, 2))), TypeError, r"topk_ids: expected an integer dtype"),
        (dict(prefer_local=True), ValueError, r"device_index: prefer_local needs the token's device"),
    ],
)  # fmt: skip
def test_dispatch_rejects_bad_arguments(placed, kwargs, error, match):
    args = dict(layer=0, topk_ids=jnp.zeros((3, 2), jnp.int32))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        dispatch(placed, args.pop("layer"), args.pop("topk_ids"), **args)
    with pytest.raises(TypeError, match=r"state: expected an EplbState"):
        dispatch((placed.log2phy, placed.logcnt), 0, jnp.zeros((3, 2), jnp.int32))


def test_dispatch_layer_in_a_scan_then_record(placed):
    ids = np.stack([routed(10 + i)[0] for i in range(L)])  # [L, T, K]

    @jax.jit
    def scanned(s, ids):
        def body(_, xs):
            log2phy, logcnt, layer_ids = xs
            return None, dispatch_layer(log2phy, logcnt, layer_ids)

        _, (phys, counts) = jax.lax.scan(body, None, (s.log2phy, s.logcnt, ids))
        return phys, s.record(counts)

    phys, s = scanned(placed, jnp.asarray(ids))
    looped = placed
    for lay in range(L):
        want, looped = dispatch(looped, lay, jnp.asarray(ids[lay]))
        np.testing.assert_array_equal(phys[lay], want)
    np.testing.assert_array_equal(s.pass_load, looped.pass_load)
    with pytest.raises(ValueError, match=r"load: expected shape \[L, E\] = \(3, 8\), got \(8,\)"):
        placed.record(jnp.zeros((E,), jnp.int32))
    with pytest.raises(TypeError, match=r"load: expected integer token counts"):
        placed.record(jnp.zeros((L, E)))


# ---------------------------------------------------------------------------------- save/load


@pytest.fixture(scope="module")
def busy(placed):
    """A state with loads, a window, a step count and a pending placement."""
    rng = np.random.default_rng(5)
    pending = random_placement(rng)
    l2p, cnt = maps_from_phy2log(pending, E, R + 1)
    return placed.replace(
        pass_load=jnp.asarray(rng.integers(0, 50, (L, E)), jnp.int32),
        window=jnp.asarray(rng.integers(0, 50, (2, L, E)), jnp.int32),
        window_pos=jnp.int32(1),
        step=jnp.int32(7),
        pending_phy2log=jnp.asarray(pending),
        pending_log2phy=l2p,
        pending_logcnt=cnt,
        cursor=jnp.int32(1),
    )


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip(busy, tmp_path, suffix):
    path = tmp_path / f"eplb{suffix}"
    busy.save(path)
    back = EplbState.load(path)
    assert back.config() == busy.config()
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(busy), strict=True):
        np.testing.assert_array_equal(a, b)
    # With like=, the caller's configuration wins (here a new step interval).
    like = EplbState.from_placement(
        np.asarray(busy.phy2log), num_experts=E, num_devices=D, window_size=2, step_interval=9
    )
    assert EplbState.load(path, like=like).step_interval == 9


def test_load_says_what_does_not_match(busy, tmp_path):
    path = tmp_path / "eplb.npz"
    busy.save(path)
    other = EplbState.create(
        num_layers=L, num_experts=16, num_devices=D, window_size=2, step_interval=5
    )
    with pytest.raises(
        ValueError, match=r"num_experts: expected 16, found 8 in .*eplb.npz.* \(from like=\)"
    ):
        EplbState.load(path, like=other)
    with pytest.raises(ValueError, match=r"num_devices: expected 4, found 8"):
        EplbState.load(path, num_devices=4)
    with pytest.raises(ValueError, match=r"window_size: expected 3, found 2"):
        EplbState.load(path, window_size=3)
    with pytest.raises(ValueError, match=r"path: expected a file name ending in .json or .npz"):
        busy.save(tmp_path / "eplb.txt")
    # A hand-edited JSON whose maps contradict each other.
    import json

    jpath = tmp_path / "eplb.json"
    busy.save(jpath)
    doc = json.loads(jpath.read_text())
    doc["arrays"]["logcnt"][0][0] += 1
    jpath.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError,
        match=r"logcnt\[0, 0\]: expected \d+ \(replicas of expert 0 in phy2log\), found \d+",
    ):
        EplbState.load(jpath)
    doc["arrays"]["logcnt"][0][0] -= 1
    doc["arrays"]["window"] = doc["arrays"]["window"][:1]
    jpath.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"window: expected shape \[W, L, E\] = \(2, 3, 8\) .*found \(1, 3, 8\)"
    ):
        EplbState.load(jpath)

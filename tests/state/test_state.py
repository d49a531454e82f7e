"""EplbState (building, checks, pytree, save/load) and the dispatch hook (replicas, counts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jeplb._src.dispatch import dispatch, dispatch_layer
from jeplb._src.maps import maps_from_phy2log
from jeplb._src.state import EplbState
from tests.helpers import mesh_of

L, E, R, D = 3, 8, 8, 8  # P = 16 slots, N_local = 2


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
    assert not hasattr(state, "num_gpus") and state.config.schedule.layers_moved(L) == L


def test_state_is_a_pytree_with_static_config(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    assert len(leaves) == 13
    out = jax.jit(lambda s: s.replace(step=s.step + 1))(state)
    assert int(out.step) == 1 and out.config == state.config
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
        (dict(num_groups=3), ValueError, r"num_groups: expected a divisor of the E = 8 logical experts"),
        (dict(policy="greedy"), ValueError, r"policy: expected one of \('deepseek', 'snake'\), got 'greedy'"),
        (dict(config=3), TypeError, r"config: expected an EplbConfig, got int"),
        (dict(num_gpus=8), TypeError, r"unexpected keyword argument 'num_gpus'"),
        (dict(axis_name=1), TypeError, r"axis_name: expected a mesh axis name \(str\) or a tuple"),
        (dict(axis_name=["ep", 2]), TypeError, r"axis_name: expected a mesh axis name \(str\) or a tuple .* list \['ep', 2\]"),
        (dict(axis_name=("ep", "ep")), ValueError, r"axis_name: names an axis twice"),
        (dict(chunk_rows=True), TypeError, r"chunk_rows: expected an int, got bool True"),
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
        (np.arange(12)[None] % 8, ValueError, r"phy2log: P = 12 slots is not divisible by D = 8 devices"),
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
    s, phys = dispatch(placed, 1, jnp.asarray(ids), valid=jnp.asarray(valid))
    want = np.bincount(ids[valid].ravel(), minlength=E)
    np.testing.assert_array_equal(s.pass_load[1], want)
    assert int(s.pass_load[0].sum()) == 0 and int(s.pass_load[2].sum()) == 0
    # Every token, masked or not, goes to a slot holding its logical expert.
    np.testing.assert_array_equal(np.asarray(placed.phy2log[1])[np.asarray(phys)], ids)
    # Recording accumulates.
    s2, _ = dispatch(s, 1, jnp.asarray(ids), valid=jnp.asarray(valid))
    np.testing.assert_array_equal(s2.pass_load[1], 2 * want)


@pytest.mark.parametrize("rows, n", [(1, 1), (1, 7), (1, 1000), (1, 4096 * 8), (3, 1000), (58, 64)])
def test_both_counting_kernels_match_bincount(rows, n):
    """The accelerators' blocked count and the CPU's flat one, per row of ids, against numpy's
    bincount (ids E are the dropped ones)."""
    from jeplb._src import counts as counts_lib

    e = 256
    ids = np.random.default_rng(n + rows).integers(0, e + 1, (rows, n)).astype(np.int32)
    want = np.stack([np.bincount(r, minlength=e + 1)[:e] for r in ids])
    for count in (counts_lib._count_flat, counts_lib._count_blocked):
        np.testing.assert_array_equal(np.asarray(count(jnp.asarray(ids), num_experts=e)), want)


def test_dispatch_spreads_over_replicas_deterministically(placed):
    cnt = np.asarray(placed.logcnt[0])
    e = int(np.argmax(cnt))
    assert cnt[e] >= 2
    ids = np.full((3000, 2), e, np.int32)
    ids[:, 1] = (e + 1) % E  # expert e always first: a plain modulo of t*K+k would pin a replica
    _, phys = dispatch(placed, 0, jnp.asarray(ids))
    used = np.bincount(np.asarray(phys)[:, 0], minlength=E + R)
    slots = np.flatnonzero(np.asarray(placed.phy2log[0]) == e)
    share = used[slots] / used.sum()
    assert used.sum() == 3000 and np.all(np.abs(share - 1 / cnt[e]) < 0.05), share
    _, again = dispatch(placed, 0, jnp.asarray(ids))
    np.testing.assert_array_equal(phys, again)
    _, shifted = dispatch(placed, 0, jnp.asarray(ids), token_index=jnp.arange(3000) + 7)
    assert not np.array_equal(shifted, phys)


def test_dispatch_prefers_a_local_replica(placed):
    ids, _ = routed(3, t=200)
    dev = np.arange(200) % D
    _, phys = dispatch(
        placed, 2, jnp.asarray(ids), replica_choice="local", device_index=jnp.asarray(dev)
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
    _, phys0 = dispatch(placed, 2, jnp.asarray(ids), replica_choice="local", device_index=0)
    local0 = np.isin(np.asarray(phys0), np.arange(n))
    holds0 = np.isin(ids, p2l[:n])
    np.testing.assert_array_equal(local0, holds0)


@pytest.mark.devices(8)
def test_dispatch_prefer_local_inside_shard_map_uses_the_axis_index(placed):
    mesh = mesh_of(D)
    ids, _ = routed(4, t=8 * 4)

    def body(s, ids):
        after, phys = dispatch(s, 0, ids, replica_choice="local")
        mine = after.pass_load - s.pass_load  # this device's counts
        return phys, s.record(mine, load_axes="ep")  # summed over the devices: replicated

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep")), out_specs=(P("ep"), P())))
    phys, s = f(placed, jnp.asarray(ids))
    _, want = dispatch(
        placed,
        0,
        jnp.asarray(ids),
        replica_choice="local",
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
    s, phys = dispatch(placed, 0, jnp.asarray(ids), valid=jnp.array([True, False, False]))
    assert np.asarray(phys)[1, 0] == -1 and np.asarray(phys)[2, 1] == -1
    np.testing.assert_array_equal(s.pass_load[0], np.bincount([0, 1], minlength=E))
    # Under jit the values cannot be checked: -1, not counted.
    s, phys = jax.jit(lambda s, i: dispatch(s, 0, i))(placed, jnp.asarray(ids))
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
        (dict(replica_choice="local"), ValueError, r"device_index: replica_choice=.local. needs the token.s device"),
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
        looped, want = dispatch(looped, lay, jnp.asarray(ids[lay]))
        np.testing.assert_array_equal(phys[lay], want)
    np.testing.assert_array_equal(s.pass_load, looped.pass_load)
    with pytest.raises(ValueError, match=r"load: expected shape \[L, E\] = \(3, 8\), got \(8,\)"):
        placed.record(jnp.zeros((E,), jnp.int32))
    with pytest.raises(TypeError, match=r"load: expected an integer dtype \(int32\), got float32"):
        placed.record(jnp.zeros((L, E)))


# ---------------------------------------------------------------------------------- save/load


@pytest.fixture(scope="module")
def busy(placed):
    """A state with loads, a window, a step count and a pending placement."""
    rng = np.random.default_rng(5)
    pending = random_placement(rng)
    l2p, cnt = maps_from_phy2log(pending, E, R + 1)
    window = rng.integers(0, 50, (2, L, E)).astype(np.int32)
    return placed.replace(
        pass_load=jnp.asarray(rng.integers(0, 50, (L, E)), jnp.int32),
        window=jnp.asarray(window),
        window_total=jnp.asarray(window.sum(0, dtype=np.int32)),
        window_leaving=jnp.asarray(window[1]),
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
    back = EplbState.restore(path)
    assert back.config == busy.config
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(busy), strict=True):
        np.testing.assert_array_equal(a, b)
    # With like=, the caller's configuration wins (here a new step interval).
    like = EplbState.from_placement(
        np.asarray(busy.phy2log), num_experts=E, num_devices=D, window_size=2, step_interval=9
    )
    assert EplbState.restore(path, like=like).config.schedule.step_interval == 9


def test_load_says_what_does_not_match(busy, tmp_path):
    path = tmp_path / "eplb.npz"
    busy.save(path)
    other = EplbState.create(
        num_layers=L, num_experts=16, num_devices=D, window_size=2, step_interval=5
    )
    with pytest.raises(
        ValueError, match=r"num_experts: expected 16, found 8 in .*eplb.npz.* \(from like=\)"
    ):
        EplbState.restore(path, like=other)
    with pytest.raises(ValueError, match=r"num_devices: expected 4, found 8"):
        EplbState.restore(path, num_devices=4)
    with pytest.raises(ValueError, match=r"window_size: expected 3, found 2"):
        EplbState.restore(path, window_size=3)
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
        EplbState.restore(jpath)
    doc["arrays"]["logcnt"][0][0] -= 1
    doc["arrays"]["window"] = doc["arrays"]["window"][:1]
    jpath.write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"window: expected shape \[W, L, E\] = \(2, 3, 8\) .*found \(1, 3, 8\)"
    ):
        EplbState.restore(jpath)


def test_maps_and_checkpoint_fields_agree_with_the_state():
    import dataclasses

    from jeplb._src import checkpoint

    fields = dataclasses.fields(EplbState)
    arrays = tuple(f.name for f in fields if not f.metadata.get("static"))
    assert tuple(checkpoint.SHAPES) == arrays
    assert [f.name for f in fields if f.metadata.get("static")] == ["num_devices", "config"]
    with pytest.raises(ValueError, match=r"phy2log: expected a map \[L, P\] with L >= 1"):
        maps_from_phy2log(jnp.zeros((0, 4), jnp.int32), 2, 3)
    with pytest.raises(ValueError, match=r"num_experts: expected an int >= 1, got 0"):
        maps_from_phy2log(jnp.zeros((1, 4), jnp.int32), 0, 3)


# ------------------------------------------------------------------------- counts never wrap

BIG = 2**31 - 1


def test_record_refuses_counts_that_do_not_fit_int32(placed):
    row = np.zeros(E, np.uint32)
    row[3] = 2**31 + 10
    with pytest.raises(
        ValueError, match=r"load\[3\] = 2147483658: expected token counts below 2\^31"
    ):
        placed.record(row, layer=0)
    full = np.zeros((L, E), np.int64)
    full[1, 2] = 2**33
    with pytest.raises(ValueError, match=r"load\[1, 2\] = 8589934592: expected token counts below"):
        placed.record(full)
    with pytest.raises(ValueError, match=r"load\[1, 2\] = -1: expected token counts >= 0"):
        placed.record(-(full > 0).astype(np.int32))
    # A sum past 2^31 - 1 (a long window of busy steps) is refused, not wrapped to -2^31.
    busy_pass = placed.replace(pass_load=placed.pass_load.at[2, 5].set(BIG))
    one = np.zeros(E, np.int32)
    one[5] = 1
    with pytest.raises(
        ValueError,
        match=r"load\[5\] = 1: adding it to state.pass_load\[2, 5\] = 2147483647 gives 2147483648",
    ):
        busy_pass.record(one, layer=2)
    with pytest.raises(ValueError, match=r"state.pass_load\[2, 5\] = 2147483647"):
        busy_pass.record(np.stack([one] * L))
    # Exactly at the limit is fine.
    s = placed.replace(pass_load=placed.pass_load.at[2, 5].set(BIG - 1)).record(one, layer=2)
    assert int(s.pass_load[2, 5]) == BIG


@pytest.fixture(scope="module")
def jit_record():
    return jax.jit(lambda s, c, lay: s.record(c, layer=lay))


def test_record_saturates_under_jit(placed, jit_record):
    big = np.zeros(E, np.uint32)
    big[3] = 2**31 + 10
    s = jit_record(placed, jnp.asarray(big), 0)
    assert int(s.pass_load[0, 3]) == BIG and int(s.pass_load.sum()) == BIG
    ones = np.ones(E, np.uint32)
    s = jit_record(s, jnp.asarray(ones), 0)
    assert int(s.pass_load[0, 3]) == BIG and int(s.pass_load[0, 4]) == 1  # saturated, not wrapped
    with jax.enable_x64(True):
        wide = np.zeros((L, E), np.int64)
        wide[1, 1], wide[1, 2] = 2**33, -7
        s = jax.jit(lambda s, c: s.record(c))(placed, jnp.asarray(wide))
        assert int(s.pass_load[1, 1]) == BIG and int(s.pass_load[1, 2]) == 0


def test_dispatch_refuses_or_saturates_an_overflowing_sum(placed):
    full = placed.replace(pass_load=placed.pass_load.at[1, 4].set(BIG))
    ids = jnp.full((3, 1), 4, jnp.int32)
    with pytest.raises(ValueError, match=r"state.pass_load\[1, 4\] = 2147483647 gives 2147483650"):
        dispatch(full, 1, ids)
    s, _ = jax.jit(lambda s, i: dispatch(s, 1, i))(full, ids)
    assert int(s.pass_load[1, 4]) == BIG


@pytest.mark.devices(8)
def test_record_load_axes_sums_without_wrapping(placed):
    mesh = mesh_of(D)
    rng = np.random.default_rng(7)
    part = rng.integers(0, 2**27, (D, E)).astype(np.int32)  # per device; sum < 2^30: exact
    part[:, 6] = 2**28 + 5  # sum 2^31 + 40: saturates

    def body(s, c):
        return s.record(c[0], layer=1, load_axes="ep")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("ep")), out_specs=P()))
    s = f(placed, jnp.asarray(part))
    want = part.astype(np.int64).sum(0)
    want[6] = BIG
    np.testing.assert_array_equal(s.pass_load[1], want)
    assert int(s.pass_load[0].sum()) == 0


# ------------------------------------------------------------------------------ layer indices


@pytest.mark.parametrize(
    "layer, error, match",
    [
        (jnp.int32(7), ValueError, r"layer: expected an index in \[0, num_layers = 3\), got 7"),
        (np.array(5), ValueError, r"layer: expected an index in \[0, num_layers = 3\), got 5"),
        (np.int64(-1), ValueError, r"layer: expected an index in \[0, num_layers = 3\), got -1"),
        (np.array([1]), TypeError, r"layer: expected an int or an integer scalar array"),
        (1.0, TypeError, r"layer: expected an int index, got float"),
        (True, TypeError, r"layer: expected an int index, got bool"),
        (jnp.float32(1), TypeError, r"layer: expected an int or an integer scalar array"),
    ],
)  # fmt: skip
def test_concrete_layer_indices_are_checked(placed, layer, error, match):
    ids = jnp.zeros((2, 1), jnp.int32)
    with pytest.raises(error, match=match):
        dispatch(placed, layer, ids)
    with pytest.raises(error, match=match):
        placed.record(np.ones(E, np.int32), layer=layer)


def test_traced_layer_outside_the_range_counts_nothing(placed):
    ids = jnp.asarray(routed(20, t=8)[0])

    @jax.jit
    def both(s, lay):
        s, phys = dispatch(s, lay, ids)
        return phys, s.record(jnp.ones(E, jnp.int32), layer=lay)

    for lay in (-1, L, 50):  # not wrapped, not clamped: dropped
        phys, s = both(placed, jnp.int32(lay))
        assert (np.asarray(phys) == -1).all() and int(s.pass_load.sum()) == 0
    phys, s = both(placed, jnp.int32(1))
    _, want = dispatch(placed, 1, ids)
    np.testing.assert_array_equal(phys, want)
    assert int(s.pass_load[1].sum()) == ids.size + E and int(s.pass_load.sum()) == ids.size + E


def test_a_state_without_layers_and_load_axes_outside_shard_map(placed):
    empty = placed.replace(
        phy2log=placed.phy2log[:0],
        log2phy=placed.log2phy[:0],
        logcnt=placed.logcnt[:0],
        pass_load=placed.pass_load[:0],
    )
    ids = jnp.zeros((2, 1), jnp.int32)
    for fn in (
        lambda: dispatch(empty, 0, ids),
        lambda: empty.record(np.zeros((0, E), np.int32)),
        lambda: empty.record(np.zeros(E, np.int32), layer=0),
    ):
        with pytest.raises(ValueError, match=r"state: expected a state with at least one layer"):
            fn()
    with pytest.raises(ValueError, match=r"log2phy: expected a map \[E, R_max\] with E >= 1"):
        dispatch_layer(jnp.zeros((0, 2), jnp.int32), jnp.zeros((0,), jnp.int32), ids)
    counts = np.ones((L, E), np.int32)
    with pytest.raises(ValueError, match=r"load_axes: no mesh axis among \('ep',\) is bound here"):
        placed.record(counts, load_axes="ep")
    with pytest.raises(ValueError, match=r"load_axes: .* call record there"):
        jax.jit(lambda s: s.record(counts, load_axes=("data", "ep")))(placed)
    with pytest.raises(TypeError, match=r"load_axes: expected a mesh axis name \(str\)"):
        placed.record(counts, load_axes=3)


# ----------------------------------------------------------------------------- damaged files


def _set(doc, key, value):
    """Sets ``doc[key]``; ``key`` is "config.part.name", "arrays.name[i, j]" or a header field."""
    path, _, index = key.partition("[")
    *parents, name = path.split(".")
    node = doc
    for p in parents:
        node = node[p]
    if not index:
        node[name] = value
        return doc
    *outer, last = (int(i) for i in index.rstrip("]").split(","))
    target = node[name]
    for i in outer:
        target = target[i]
    target[last] = value
    return doc


DAMAGE = [
    ("arrays.cursor", -1, r"cursor: expected a layer in \[0, num_layers\] .*found -1"),
    ("arrays.cursor", L + 1, r"cursor: expected a layer in \[0, num_layers\] .*found 4"),
    ("arrays.window_pos", 2, r"window_pos: expected a row of the window, in \[0, window_size\), found 2"),
    ("arrays.window_pos", -1, r"window_pos: expected a row of the window"),
    ("arrays.step", -5, r"step: expected a step count >= 0, found -5"),
    ("arrays.pass_load[1, 3]", -2, r"pass_load\[1, 3\] = -2: expected token counts >= 0"),
    ("arrays.window[1, 0, 2]", -9, r"window\[1, 0, 2\] = -9: expected token counts >= 0"),
    ("arrays.window_total[2, 1]", 10**6, r"window_total\[2, 1\] = 1000000: expected the sum of the window's rows"),
    ("arrays.window_leaving[0, 3]", 10**6, r"window_leaving\[0, 3\] = 1000000: expected window\[window_pos\]"),
    ("arrays.phy2log[0, 4]", 2**32 + 3, r"phy2log\[0, 4\] = 4294967299: expected a value that fits int32"),
    ("arrays.log2phy[2, 1, 0]", 2**32 + 3, r"log2phy\[2, 1, 0\] = 4294967299: expected a value that fits"),
    ("arrays.step", 2**31, r"step\[\] = 2147483648: expected a value that fits int32"),
    ("arrays.pending_log2phy[0, 0, 8]", -4, r"pending_log2phy\[0, 0, 8\] = -4: expected a slot in \[0, P = 16\) or -1"),
    ("config.schedule.step_interval", 0, r"step_interval: expected an int >= 1, got 0"),
    ("num_devices", 3, r"num_devices: P = 16 slots per layer .* not divisible by num_devices = 3"),
    ("num_devices", 0, r"num_devices: expected an int >= 1, got 0"),
    ("config.transfer.chunk_rows", 0, r"chunk_rows: expected an int >= 1, got 0"),
    ("config.schedule.layers_per_step", L + 1, r"layers_per_step: expected at most num_layers = 3, got 4"),
    ("config.schedule.window_size", 2.5, r"window_size: expected an int, got float 2.5"),
    ("config.schedule.window_size", 2.0, r"window_size: expected an int, got float 2.0"),
    ("config.schedule.window_size", True, r"window_size: expected an int, got bool"),
    ("config.transfer.axis_name", ["ep", 1], r"axis_name: expected a mesh axis name \(str\) or a tuple .*list \['ep', 1\]"),
    ("config.transfer.axis_name", "", r"axis_name: expected a mesh axis name"),
    ("config.policy.refine", "yes", r"refine: expected a bool, got str 'yes'"),
    ("config.policy.name", "nope", r"policy: expected one of \('deepseek', 'snake'\), got 'nope'"),
    ("config.policy.extra", 1, r"policy.extra: not an option of policy 'deepseek'"),
    ("config.schedule.log_interval", -1, r"log_interval: expected an int >= 0, got -1"),
    ("config.policy.num_groups", 3, r"num_groups: expected a divisor of the E = 8 logical experts"),
    ("config.extra", 1, r"config.extra: not a part of the configuration"),
    ("config.schedule.extra", 1, r"config.schedule.extra: not an option of ScheduleConfig"),
    ("num_layers", 0, r"num_layers: expected an int >= 1, got 0"),
    ("num_experts", "8", r"num_experts: expected an int, got str '8'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved_doc(busy, tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("doc") / "eplb.json"
    busy.save(path)
    return json.loads(path.read_text())


FORMER_SCHEDULE = ("window_size", "step_interval", "layers_per_step", "log_interval")


def _as_version(doc, version):
    """A version 3 document rewritten as version 1 or 2 files held it: one flat config object
    of the state's former static fields (version 1 also lacks the window's running sums)."""
    import copy

    doc = copy.deepcopy(doc)
    config = doc.pop("config")
    axis = config["transfer"]["axis_name"]
    # Version 1 and 2 files predate the move budget.
    policy = {k: v for k, v in config["policy"].items() if k not in ("name", "move_budget")}
    doc["config"] = dict(
        num_devices=doc.pop("num_devices"),
        num_redundant_experts=doc["num_slots"] - doc["num_experts"],
        **{k: config["schedule"][k] for k in FORMER_SCHEDULE},
        **policy,
        axis_name={"tuple": axis} if isinstance(axis, list) else axis,
        chunk_rows=config["transfer"]["chunk_rows"],
    )
    doc["version"] = version
    if version == 1 and "arrays" in doc:
        del doc["arrays"]["window_total"], doc["arrays"]["window_leaving"]
    return doc


# Damage that only a version 1 or 2 file (the flat configuration) can carry.
DAMAGE_FLAT = [
    ("config.num_gpus", 0, r"num_gpus: expected null or an int >= 1, got 0"),
    ("config.num_gpus", 4, r"num_gpus: found 4, but num_devices = 8"),
    ("config.axis_name", ["ep"], r"axis_name: expected a str or \{'tuple': \[names\]\}, got \['ep'\]"),
    ("config.axis_name", {"tuple": ["ep", 3]}, r"axis_name: expected a mesh axis name"),
    ("config.extra", 1, r"extra: not a field of jeplb.EplbState"),
    ("config.num_redundant_experts", 0, r"num_slots: expected num_experts \+ num_redundant_experts"),
    ("config.num_devices", 3, r"num_devices: P = 16 slots per layer .* not divisible by num_devices = 3"),
    ("config.step_interval", 0, r"step_interval: expected an int >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    "key, value, match", DAMAGE_FLAT, ids=[f"{k}={v!r}" for k, v, _ in DAMAGE_FLAT]
)
def test_load_refuses_damaged_version_2_fields(saved_doc, tmp_path, key, value, match):
    import json

    doc = _set(_as_version(saved_doc, 2), key, value)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"path: .*damaged.json.* is a damaged saved") as err:
        EplbState.restore(path)
    assert err.match(match)


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_load_into_the_same_state(busy, saved_doc, tmp_path, version):
    import json

    path = tmp_path / f"v{version}.json"
    path.write_text(json.dumps(_as_version(saved_doc, version)))
    back = EplbState.restore(path)
    assert back.config == busy.config and back.num_devices == busy.num_devices
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(busy), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_is_the_deprecated_name_of_restore(busy, tmp_path):
    path = tmp_path / "eplb.json"
    busy.save(path)
    with pytest.warns(DeprecationWarning, match=r"EplbState.load is renamed EplbState.restore"):
        back = EplbState.load(path)
    np.testing.assert_array_equal(back.phy2log, busy.phy2log)


@pytest.mark.parametrize("key, value, match", DAMAGE, ids=[f"{k}={v!r}" for k, v, _ in DAMAGE])
def test_load_refuses_damaged_fields(saved_doc, tmp_path, key, value, match):
    import copy
    import json

    doc = _set(copy.deepcopy(saved_doc), key, value)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"path: .*damaged.json.* is a damaged saved") as err:
        EplbState.restore(path)
    assert err.match(match)


def test_load_refuses_wide_npz_arrays(busy, tmp_path):
    path = tmp_path / "eplb.npz"
    busy.save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["phy2log"] = arrays["phy2log"].astype(np.int64)
    arrays["phy2log"][1, 2] = 2**32 + 3  # read as 3 by a cast
    np.savez(path, **arrays)
    with pytest.raises(
        ValueError, match=r"phy2log\[1, 2\] = 4294967299: expected a value that fits"
    ):
        EplbState.restore(path)


@pytest.mark.parametrize("gpus", [None, D])
def test_load_accepts_old_files_with_num_gpus(busy, saved_doc, tmp_path, gpus):
    import json

    doc = _as_version(saved_doc, 2)
    doc["config"]["num_gpus"] = gpus
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    back = EplbState.restore(path)
    assert back.config == busy.config


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_version_1_files_load_with_the_window_total_derived(busy, tmp_path, suffix):
    import json

    # A file as version 1 wrote it: no window_total, no window_leaving.
    path = tmp_path / f"v1{suffix}"
    busy.save(path)
    if suffix == ".json":
        path.write_text(json.dumps(_as_version(json.loads(path.read_text()), 1)))
    else:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k not in ("window_total", "window_leaving")}
        header = json.loads(str(arrays.pop("__header__")))
        np.savez(path, __header__=np.array(json.dumps(_as_version(header, 1))), **arrays)
    back = EplbState.restore(path)
    back.check_window()
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(busy), strict=True):
        np.testing.assert_array_equal(a, b)


def test_slide_window_keeps_the_total_exact_or_saturated():
    # Many passes through a window of 3 (wrap-around), with counts near 2^31 - 1 so that totals
    # saturate and come back down as the big passes leave; after every pass the running total is
    # the window's saturated sum, and the window and the leaving row are what numpy says.
    from jeplb._src.window import slide_window, window_sum

    w, shape = 3, (2, 4)
    slide = jax.jit(slide_window, donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(3)
    window = np.zeros((w, *shape), np.int64)
    state = (*(jnp.zeros(s, jnp.int32) for s in ((w, *shape), shape, shape)), jnp.int32(0))
    saturated = 0
    for i in range(40):
        big = rng.random(shape) < (0.5 if (i // 8) % 2 else 0.05)  # busy and quiet stretches
        row = np.where(big, rng.integers(2**29, 2**31 - 1, shape), rng.integers(0, 9, shape))
        state = slide(*state, jnp.asarray(row, jnp.int32))
        window[i % w] = row
        want = np.minimum(window.sum(0), BIG)
        saturated += int((want == BIG).sum())
        np.testing.assert_array_equal(state[0], window, err_msg=f"pass {i}")
        np.testing.assert_array_equal(state[1], want, err_msg=f"pass {i}")
        np.testing.assert_array_equal(state[2], window[(i + 1) % w], err_msg=f"pass {i}")
        assert int(state[3]) == (i + 1) % w
    assert saturated > 0  # the saturated path ran
    np.testing.assert_array_equal(window_sum(state[0]), np.minimum(window.sum(0), BIG))


def test_end_pass_keeps_a_saturated_total_saturated_until_the_plan_sums_again():
    # end_pass slides the total without re-summing. A saturated entry must stay saturated (its
    # true sum is unknown) rather than drop by the leaving row to a wrong count; the plan step
    # then sums the window again. Checked against numpy's int64 sums after every pass.
    import jeplb

    w, shape = 3, (1, 4)
    s = EplbState.create(num_layers=1, num_experts=4, num_devices=1, window_size=w,
                         step_interval=10**6)  # fmt: skip
    end = jax.jit(jeplb.end_pass, donate_argnums=0)
    rng = np.random.default_rng(5)
    window = np.zeros((w, *shape), np.int64)
    stuck = np.zeros(shape, bool)
    for i in range(27):  # ends with a quiet stretch longer than the window
        big = rng.random(shape) < (0.5 if (i // 6) % 2 else 0.0)  # busy and quiet stretches
        row = np.where(big, rng.integers(2**29, 2**31 - 1, shape), rng.integers(0, 9, shape))
        s = end(s.record(jnp.asarray(row, jnp.int32)))
        window[i % w] = row
        exact = np.minimum(window.sum(0), BIG)
        stuck |= exact == BIG
        got = np.asarray(s.window_total)
        np.testing.assert_array_equal(got, np.where(stuck, BIG, exact), err_msg=f"pass {i}")
    assert stuck.any() and (window.sum(0) < BIG).any()  # an entry saturated and came back down
    s.check_window()  # a total stuck at saturation is a valid state (saved, loaded)
    # The plan's re-sum (due at this step; the placement is whatever the policy makes).
    s = s.replace(step=jnp.int32(10**6))
    s, _ = jeplb.plan_rebalance(s)
    np.testing.assert_array_equal(s.window_total, np.minimum(window.sum(0), BIG))


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_tuple_axis_name_round_trip(tmp_path, suffix):
    s = EplbState.create(
        num_layers=2, num_experts=4, num_devices=2, window_size=2, step_interval=4,
        axis_name=("data", "ep"),
    )  # fmt: skip
    path = tmp_path / f"eplb{suffix}"
    s.save(path)
    back = EplbState.restore(path)
    assert back.config.transfer.axis_name == ("data", "ep") and back.config == s.config


# ----------------------------------------------------------------------------- atomic saving


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_a_failed_save_leaves_the_old_file(busy, placed, tmp_path, monkeypatch, suffix):
    from jeplb._src import checkpoint

    path = tmp_path / f"eplb{suffix}"
    placed.save(path)
    name = "_write_json" if suffix == ".json" else "_write_npz"
    real = getattr(checkpoint, name)

    def fails_midway(f, header, arrays):
        real(f, header, arrays)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, name, fails_midway)
    with pytest.raises(OSError, match="disk full"):
        busy.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left
    back = EplbState.restore(path)
    for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(placed), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(checkpoint, name, real)
    busy.save(path)
    np.testing.assert_array_equal(EplbState.restore(path).pending_phy2log, busy.pending_phy2log)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_readers_racing_saves_never_fail(busy, placed, tmp_path, suffix):
    import threading

    path = tmp_path / f"eplb{suffix}"
    placed.save(path)
    steps = {int(placed.step), int(busy.step)}
    done = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(40):
                (busy if i % 2 else placed).save(path)
        except BaseException as err:  # reported below
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 5:
            assert int(EplbState.restore(path).step) in steps
            reads += 1
    finally:
        done.wait()
        thread.join()
    assert not errors and reads >= 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

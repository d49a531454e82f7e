"""The balanced replica choice of `jeplb.dispatch` / `jeplb.dispatch_layer` and its place in the
configuration (`jeplb.DispatchConfig`): floor / ceil shares per expert, the maps inverted, counts
as the hash choice's, jit = eager, global ranks inside `jax.shard_map`, bad ids as today."""

from __future__ import annotations

import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb import dispatch, dispatch_layer

E, D, N = 8, 4, 3  # experts, devices, slots per device: P = 12, 4 redundant slots
PT = D * N
T, K = 48, 2


def placement() -> np.ndarray:
    """phy2log [P]: expert 0 on 3 devices, experts 1 and 2 on 2, the rest once (hot ones first)."""
    p2l = np.array([0, 3, 4, 0, 1, 5, 0, 2, 6, 1, 2, 7], np.int32)
    assert sorted(np.bincount(p2l, minlength=E).tolist()) == [1] * 5 + [2, 2, 3]
    return p2l


@pytest.fixture(scope="module")
def state():
    return jeplb.EplbState.from_placement(
        placement()[None], num_experts=E, num_devices=D, window_size=1, step_interval=1
    )


def skewed(seed: int, t: int = T, k: int = K) -> np.ndarray:
    """[t, k] distinct ids per token, Zipf-like: expert 0 hottest."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, E + 1) ** 1.2
    return np.stack([rng.choice(E, k, replace=False, p=w / w.sum()) for _ in range(t)]).astype(
        np.int32
    )


def balanced(state, ids, **kw):
    return dispatch_layer(
        state.log2phy[0], state.logcnt[0], ids, replica_choice="balanced",
        slots_per_device=N, num_devices=D, **kw,
    )  # fmt: skip


def test_each_expert_split_floor_ceil_and_ids_map_back(state):
    ids = skewed(0)
    phys, counts = balanced(state, jnp.asarray(ids))
    phys = np.asarray(phys)
    p2l = placement()
    np.testing.assert_array_equal(p2l[phys], ids)
    per_slot = np.bincount(phys.ravel(), minlength=PT)
    for e in range(E):
        n, slots = int((ids == e).sum()), np.flatnonzero(p2l == e)
        got = per_slot[slots]
        assert got.sum() == n
        assert set(got.tolist()) <= {n // len(slots), -(-n // len(slots))}, (e, got)
    _, hashed = dispatch_layer(state.log2phy[0], state.logcnt[0], jnp.asarray(ids))
    np.testing.assert_array_equal(counts, hashed)
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=E))


def _numpy_balanced(log2phy, logcnt, ids, counted):
    """The balanced choice in plain numpy, pair by pair in flat order: a pair's rank counts the
    earlier pairs of its expert (counted and uncounted apart); expert e's pair of rank r goes to
    replica (r + e) % logcnt[e]. Ids outside [0, E) give -1."""
    log2phy, logcnt = np.asarray(log2phy), np.asarray(logcnt)
    flat, ok = np.asarray(ids).ravel(), np.asarray(counted).ravel()
    seen, out = {}, np.full(flat.shape, -1, np.int64)
    for i, (e, c) in enumerate(zip(flat.tolist(), ok.tolist(), strict=True)):
        if 0 <= e < len(logcnt):
            r = seen.get((e, c), 0)
            seen[(e, c)] = r + 1
            out[i] = log2phy[e, (r + e) % logcnt[e]]
    return out.reshape(np.shape(ids))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slots_equal_the_numpy_model(state, seed):
    # Random skewed ids, with and without a mask; eager, and jitted with some ids out of range
    # (concrete ones raise).
    rng = np.random.default_rng(seed)
    ids = skewed(seed, t=300)
    wild = np.where(rng.random(ids.shape) < 0.02, E + 3, ids)
    valid = rng.random(300) < 0.7
    for mask in (None, valid):
        kw = {} if mask is None else {"valid": jnp.asarray(mask)}
        jitted = jax.jit(lambda i, kw=kw: balanced(state, i, **kw))
        for x, run in ((ids, lambda i, kw=kw: balanced(state, i, **kw)), (wild, jitted)):
            counted = (x < E) if mask is None else (x < E) & mask[:, None]
            want = _numpy_balanced(state.log2phy[0], state.logcnt[0], x, counted)
            got, _ = run(jnp.asarray(x))
            np.testing.assert_array_equal(np.asarray(got), want)


def test_busiest_device_within_a_pair_per_slot_of_the_even_split(state):
    # The placement's even split (each expert's pairs spread exactly evenly, fractional) bounds
    # every device to within one pair per slot (each slot gets floor or ceil of its share); the
    # rotation spreads the remainders, so in practice much closer.
    ids = skewed(1, t=400)
    n = np.bincount(ids.ravel(), minlength=E)
    p2l = placement()
    even = np.bincount(np.arange(PT) // N, weights=n[p2l] / np.bincount(p2l)[p2l], minlength=D)
    b, _ = balanced(state, jnp.asarray(ids))
    dev = np.bincount(np.asarray(b).ravel() // N, minlength=D)
    assert np.all(np.abs(dev - even) < N), (dev, even)
    h, _ = dispatch_layer(state.log2phy[0], state.logcnt[0], jnp.asarray(ids))
    hashed = np.bincount(np.asarray(h).ravel() // N, minlength=D)
    assert np.abs(dev - even).max() < np.abs(hashed - even).max(), (dev, hashed, even)


def test_jit_equals_eager_and_the_state_default(state):
    ids = jnp.asarray(skewed(2))
    valid = jnp.asarray(np.arange(T) % 5 != 0)
    eager = balanced(state, ids, valid=valid)
    f = jax.jit(lambda s, i, v: dispatch(s, 0, i, valid=v))
    configured = state.replace(config=state.config.replace(replica_choice="balanced"))
    s2, phys = f(configured, ids, valid)
    np.testing.assert_array_equal(phys, eager[0])
    np.testing.assert_array_equal(s2.pass_load[0], eager[1])
    # the default is still the hash choice, bit for bit
    _, plain = dispatch(state, 0, ids, valid=valid)
    np.testing.assert_array_equal(plain, dispatch_layer(state.log2phy[0], state.logcnt[0], ids)[0])
    assert not np.array_equal(plain, phys)


def test_masked_pairs_ranked_apart_and_not_counted(state):
    ids = np.zeros((7, 1), np.int32)  # expert 0: 3 replicas
    valid = np.array([True, False, True, False, True, False, True])
    phys, counts = balanced(state, jnp.asarray(ids), valid=jnp.asarray(valid))
    phys = np.asarray(phys)[:, 0]
    assert counts.tolist() == [4] + [0] * (E - 1)
    assert sorted(np.bincount(phys[valid], minlength=PT)[[0, 3, 6]].tolist()) == [1, 1, 2]
    assert sorted(np.bincount(phys[~valid], minlength=PT)[[0, 3, 6]].tolist()) == [1, 1, 1]


def test_out_of_range_ids_as_today(state):
    ids = np.array([[0, 1], [E, 2], [3, -1]], np.int32)
    with pytest.raises(ValueError, match=r"topk_ids\[1, 0\] = 8: expected logical expert ids"):
        balanced(state, jnp.asarray(ids))
    f = jax.jit(lambda i: balanced(state, i))
    phys, counts = f(jnp.asarray(ids))
    assert phys[1, 0] == -1 and phys[2, 1] == -1
    assert counts.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(
        placement()[np.asarray(phys)[[0, 0, 1, 2], [0, 1, 1, 0]]], [0, 1, 2, 3]
    )


def test_x64_ids(state):
    ids = skewed(3)
    want = balanced(state, jnp.asarray(ids))
    with jax.enable_x64(True):
        big = jnp.asarray(ids, jnp.int64).at[0, 0].set(2**32)  # expert 0 when cast first
        phys, counts = jax.jit(lambda i: balanced(state, i))(big)
        same = jax.jit(lambda i: balanced(state, i))(jnp.asarray(ids, jnp.int64))
    assert phys[0, 0] == -1 and int(counts.sum()) == ids.size - 1
    np.testing.assert_array_equal(same[0], want[0])
    np.testing.assert_array_equal(same[1], want[1])


@pytest.mark.devices(8)
@pytest.mark.parametrize("axes", ["ep", ("a", "b")])
def test_global_ranks_inside_shard_map(state, axes):
    shape, names = ((8,), ("ep",)) if axes == "ep" else ((2, 4), ("a", "b"))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), names)
    ids = jnp.asarray(skewed(4, t=64))

    def body(s, ids):
        after, phys = dispatch(s, 0, ids, replica_choice="balanced", token_axes=axes)
        return phys, s.record(after.pass_load - s.pass_load, load_axes=axes)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(axes), P())))
    phys, s = f(state, ids)
    want, counts = balanced(state, ids)
    np.testing.assert_array_equal(phys, want)
    np.testing.assert_array_equal(s.pass_load[0], counts)


def test_configuration_part():
    cfg = jeplb.EplbConfig.create(replica_choice="balanced", window_size=3)
    assert cfg.dispatch == jeplb.DispatchConfig(replica_choice="balanced")
    assert jeplb.EplbConfig.from_json(cfg.to_json()) == cfg
    old = cfg.to_json()
    del old["dispatch"]
    assert jeplb.EplbConfig.from_json(old).dispatch.replica_choice == "hash"
    with pytest.raises(ValueError, match="replica_choice: expected one of"):
        jeplb.DispatchConfig(replica_choice="lp")
    with pytest.raises(TypeError, match="dispatch: expected a DispatchConfig"):
        jeplb.EplbConfig(dispatch="balanced")
    with pytest.raises(
        ValueError, match=r"config\.dispatch\.mode: not an option of DispatchConfig"
    ):
        jeplb.EplbConfig.from_json({**cfg.to_json(), "dispatch": {"mode": "x"}})


def test_a_version_3_file_without_the_dispatch_part_loads(state, tmp_path):
    s = state.replace(config=state.config.replace(replica_choice="balanced"))
    path = tmp_path / "s.json"
    s.save(path)
    assert jeplb.EplbState.restore(path).config == s.config
    data = json.loads(path.read_text())
    assert data["version"] == 3
    del data["config"]["dispatch"]
    path.write_text(json.dumps(data))
    loaded = jeplb.EplbState.restore(path)
    assert loaded.config == state.config and loaded.config.dispatch.replica_choice == "hash"


def test_prefer_local_is_the_deprecated_spelling_of_local(state):
    ids = jnp.asarray(skewed(5))
    kw = dict(device_index=jnp.arange(T) % D)
    with pytest.warns(DeprecationWarning, match="replica_choice='local'"):
        _, old = dispatch(state, 0, ids, prefer_local=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, new = dispatch(state, 0, ids, replica_choice="local", **kw)
    np.testing.assert_array_equal(old, new)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="prefer_local: True"):
        dispatch(state, 0, ids, prefer_local=True, replica_choice="balanced")
    with pytest.raises(ValueError, match="replica_choice: expected one of"):
        dispatch(state, 0, ids, replica_choice="lp")
    with pytest.raises(TypeError, match="replica_choice: expected one of"):
        dispatch_layer(state.log2phy[0], state.logcnt[0], ids, replica_choice=1)
    with pytest.raises(ValueError, match="slots_per_device: expected a positive int, got 0"):
        dispatch_layer(
            state.log2phy[0], state.logcnt[0], ids, replica_choice="balanced", slots_per_device=0
        )
    with pytest.raises(TypeError, match="token_axes: expected a mesh axis name"):
        dispatch(state, 0, ids, replica_choice="balanced", token_axes=3)


@pytest.mark.parametrize("n, groups", [(1, 3), (127, 2), (300, 17), (2048, 513)])
def test_blocked_ranks_equal_the_sorted_ones(n, groups):
    """Off the CPU the ranks come from per-block counts and an in-block compare instead of a
    sort (`_ranks_blocked`); run here directly, they equal the sort's (`_ranks_sorted`) on skewed
    and uniform keys, for a count that is not a multiple of the block and one that is."""
    from jeplb._src import dispatch as dispatch_lib

    rng = np.random.default_rng(n)
    for key in (
        rng.integers(0, groups, n),
        np.minimum(rng.zipf(1.3, n) - 1, groups - 1),  # most entries in a few groups
    ):
        key = jnp.asarray(key, jnp.int32)
        want = jax.jit(lambda k: dispatch_lib._ranks_sorted(k, groups=groups))(key)
        got = jax.jit(lambda k: dispatch_lib._ranks_blocked(k, groups=groups))(key)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    "n, num_experts, masked, blocks",
    [(300, 5, True, (64, 32)), (512, 16, False, (128, 64)), (1000, 3, False, (256, 256))],
)
def test_kernels_equal_the_xla_choice(n, num_experts, masked, blocks):
    """The GPU's Pallas kernels (`balanced_kernel`, in Pallas's interpreter here, with small
    blocks so that a pair's counting block and the blocks before it both matter) give the XLA
    formulation's slots and counts: skewed and uniform keys, masked pairs, ids out of range, a
    count that is not a multiple of the blocks. (The interpreter refuses operands that vary
    inside shard_map: the global ranks' device offset runs on a GPU only.)"""
    from jeplb._src import dispatch as dispatch_lib
    from jeplb._src.maps import maps_from_phy2log

    count_block, map_block = blocks
    rng = np.random.default_rng(n)
    num_devices = 4
    n_local = (num_experts + 3) // num_devices + 1  # 4 to 7 replicas beyond one per expert
    extra = rng.integers(0, 2, num_devices * n_local - num_experts)  # experts 0 and 1 hot
    p2l = rng.permutation(np.concatenate([np.arange(num_experts), extra]))[None].astype(np.int32)
    log2phy, logcnt = (a[0] for a in maps_from_phy2log(jnp.asarray(p2l), num_experts, 8))
    groups = 2 * num_experts + 1 if masked else num_experts + 1
    for key in (rng.integers(0, groups, n), np.minimum(rng.zipf(1.3, n) - 1, groups - 1)):
        key = jnp.asarray(key, jnp.int32)
        ids = jnp.where(key < groups - 1, key % num_experts, num_experts)
        in_range = key < groups - 1
        counted = key < num_experts

        def xla(k, ids=ids, in_range=in_range, counted=counted):
            return dispatch_lib._balanced_choice(
                log2phy, logcnt, ids, counted, in_range, None, masked, "xla"
            )

        def kernel(k):
            return dispatch_lib._balanced_by_kernel(
                log2phy, logcnt, groups, k.shape, None, k, interpret=True,
                count_block=count_block, map_block=map_block,
            )  # fmt: skip

        # The kernels also take raw ids: keys outside [0, groups) are the out-of-range group.
        wild = jnp.where(key == groups - 1, jnp.asarray(rng.choice([-3, groups, 2**30], n)), key)
        want = jax.jit(xla)(key)
        for k in (key, wild):
            got = jax.jit(kernel)(k)
            for g, w, name in zip(got, want, ("slots", "counts"), strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
        assert (np.asarray(want[0]) == -1).any() and np.asarray(want[1]).sum() > 0
        assert (np.asarray(wild) < 0).any() and (np.asarray(wild) >= groups).any()


def test_kernels_read_every_layers_maps_at_the_layer():
    """With every layer's maps and a layer index (static or traced), the choice kernel reads the
    maps at that layer: the slots of that layer's own maps, in the interpreter, and the state's
    `dispatch` gives the XLA form's slots and counts at each layer."""
    from jeplb._src import dispatch as dispatch_lib
    from jeplb._src.maps import maps_from_phy2log

    num_experts, num_layers, n = 6, 3, 512
    rng = np.random.default_rng(7)
    p2l = np.stack([
        rng.permutation(np.concatenate([np.arange(num_experts), rng.integers(0, 3, 4)]))
        for _ in range(num_layers)
    ]).astype(np.int32)  # fmt: skip
    log2phy, logcnt = maps_from_phy2log(jnp.asarray(p2l), num_experts, 8)[:2]
    groups = num_experts + 1
    key = jnp.asarray(np.minimum(rng.zipf(1.3, n) - 1, groups - 1), jnp.int32)

    def kernel(k, layer, whole):
        maps = (log2phy, logcnt) if whole else (log2phy[layer], logcnt[layer])
        return dispatch_lib._balanced_by_kernel(
            *maps, groups, k.shape, None, k, layer=layer if whole else None, interpret=True,
            count_block=128, map_block=64,
        )  # fmt: skip

    traced = jax.jit(lambda k, layer: kernel(k, layer, True))
    outs = []
    for layer in range(num_layers):
        want = jax.jit(lambda k, layer=layer: kernel(k, layer, False))(key)
        for got in (jax.jit(lambda k, layer=layer: kernel(k, layer, True))(key),
                    traced(key, jnp.int32(layer))):  # fmt: skip
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        outs.append(np.asarray(want[0]))
    assert not all((o == outs[0]).all() for o in outs[1:])  # the layers' maps differ


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts, tokens, n_local", [(256, 4096, 36), (60, 1000, 9)])
def test_kernels_compiled_on_a_gpu_equal_the_xla_choice(num_experts, tokens, n_local):
    """On a GPU the balanced choice runs the compiled kernels (the default there): the XLA
    form's slots and counts at the decode shape and at shapes that are no power of two, with
    and without a mask, some ids out of range."""
    from jeplb._src import dispatch as dispatch_lib
    from jeplb._src.maps import maps_from_phy2log

    num_devices = 8
    rng = np.random.default_rng(4)
    extra = rng.integers(0, 16, num_devices * n_local - num_experts)
    p2l = np.stack([rng.permutation(np.concatenate([np.arange(num_experts), extra]))
                    for _ in range(2)]).astype(np.int32)  # fmt: skip
    log2phy, logcnt = maps_from_phy2log(jnp.asarray(p2l), num_experts, 16)[:2]
    ids = np.minimum(rng.zipf(1.2, (tokens, 8)) - 1, num_experts + 2)
    ids = jnp.asarray(ids, jnp.int32)

    def choice(impl, valid, layer):  # every layer's maps, read at ``layer`` (traced)
        return dispatch_lib._dispatch_checked(
            log2phy, logcnt, ids, valid, None, "balanced", None, n_local, num_devices, None,
            "scatter", impl, layer,
        )  # fmt: skip

    for valid in (None, jnp.asarray(rng.random(tokens) < 0.8)):
        for layer in (0, 1):
            want = jax.jit(functools.partial(choice, "xla"))(valid, jnp.int32(layer))
            got = jax.jit(functools.partial(choice, "kernel"))(valid, jnp.int32(layer))
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_kernel_ranks_continue_from_a_device_offset():
    """Inside shard_map each device's ranks start after the pairs of the devices before it
    (``offset``, from the gathered sizes): the second half of a batch, ranked by the kernels
    from the first half's counts, gets the slots the whole batch gives it (in the interpreter,
    which refuses shard_map's varying operands, so the offset is passed directly)."""
    from jeplb._src import balanced_kernel as bk
    from jeplb._src import dispatch as dispatch_lib
    from jeplb._src.maps import maps_from_phy2log

    num_experts, half = 6, 200
    groups = num_experts + 1
    rng = np.random.default_rng(11)
    p2l = rng.permutation(np.concatenate([np.arange(num_experts), [0, 0, 1, 1, 2, 3]]))
    log2phy, logcnt = (
        a[0] for a in maps_from_phy2log(jnp.asarray(p2l[None], jnp.int32), num_experts, 4)
    )
    key = np.minimum(rng.zipf(1.4, 2 * half) - 1, num_experts).astype(np.int32)
    want = jax.jit(
        lambda k: dispatch_lib._balanced_by_ranks(log2phy, logcnt, groups, k.shape, None, k)
    )(jnp.asarray(key))[0]
    padded = bk.padded_groups(groups)
    offset = jnp.asarray(np.bincount(key[:half], minlength=padded), jnp.int32)
    second = bk.pad_keys(jnp.asarray(key[half:]), groups, 64)
    rows = bk.block_counts(second, groups, count_block=64, interpret=True)
    got = bk.choose(
        second, bk.prefix_rows(rows) + offset, logcnt, log2phy, groups=groups,
        count_block=64, map_block=16, interpret=True,
    )[:half]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[half:])
    assert int(offset.sum()) > 0 and (np.asarray(want) == -1).any()

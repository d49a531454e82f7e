"""Dispatch's formulations against a numpy model, bit for bit: `dispatch_layer` (the XLA map and
counts), the compare-sum counts and the Pallas kernel (opt-in on a GPU; on the CPU it runs in
Pallas's interpreter, on a GPU compiled).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeplb._src import counts as counts_lib
from jeplb._src import dispatch as dispatch_lib
from jeplb._src.dispatch import dispatch_layer
from tests.helpers import mesh_of


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def numpy_dispatch(log2phy, logcnt, ids, valid=None, token_index=None):
    """The module docstring's rule: replica h(t * K + k) % logcnt[e]; ids outside [0, E) give -1
    and are not counted; tokens with valid False are mapped, not counted."""
    e = log2phy.shape[0]
    t, k = ids.shape
    tok = np.arange(t, dtype=np.uint32) if token_index is None else token_index.astype(np.uint32)
    with np.errstate(over="ignore"):
        h = _mix32(tok[:, None] * np.uint32(k) + np.arange(k, dtype=np.uint32))
    ok = (ids >= 0) & (ids < e)
    safe = np.where(ok, ids, 0)
    replica = (h % np.maximum(logcnt[safe], 1).astype(np.uint32)).astype(np.int64)
    phys = np.where(ok, log2phy[safe, replica], -1)
    counted = ok if valid is None else ok & valid[:, None]
    counts = np.bincount(ids[counted], minlength=e).astype(np.int32)
    return phys.astype(np.int32), counts


def _maps(rng, e, r):
    logcnt = rng.integers(1, r + 1, e).astype(np.int32)
    log2phy = np.full((e, r), -1, np.int32)
    slots = rng.permutation(e * r)
    for i in range(e):
        log2phy[i, : logcnt[i]] = slots[i * r : i * r + logcnt[i]]
    return log2phy, logcnt


# (E, R_max, T, K, valid, token_index): E a power of two and not; one program and several (each
# counting its own experts; some with none left to count); masks and global token indices.
CASES = [
    (16, 3, 128, 4, False, False),
    (5, 2, 256, 2, True, False),
    (256, 2, 64, 8, True, True),
    (3, 4, 512, 1, False, True),
    (16, 3, 512, 4, True, False),
    (256, 2, 256, 8, False, True),
    (5, 2, 1536, 1, True, True),
]


def _fused(k):
    interpret = jax.default_backend() == "cpu"
    return jax.jit(functools.partial(dispatch_lib._map_and_count_fused, k=k, interpret=interpret))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_dispatch_matches_xla_and_numpy(case):
    e, r, t, k, use_valid, use_tok = case
    rng = np.random.default_rng(sum(case[:4]))
    log2phy, logcnt = _maps(rng, e, r)
    ids = rng.integers(-2, e + 2, (t, k)).astype(np.int32)  # some out of range
    valid = rng.random(t) < 0.7 if use_valid else None
    tok = rng.integers(0, 2**31 - 1, t).astype(np.uint32) if use_tok else None
    want = numpy_dispatch(log2phy, logcnt, ids, valid, tok)
    args = (
        jnp.asarray(log2phy),
        jnp.asarray(logcnt),
        jnp.asarray(ids),
        None if valid is None else jnp.asarray(valid),
        None if tok is None else jnp.asarray(tok),
    )
    xla = jax.jit(lambda a, b, c, v, i: dispatch_layer(a, b, c, valid=v, token_index=i))(*args)
    assert dispatch_lib._fused_fits(t * k, e)
    got = _fused(k)(*args)
    for name, g in (("xla", xla), ("fused", got)):
        np.testing.assert_array_equal(np.asarray(g[0]), want[0], err_msg=f"{name} phys")
        np.testing.assert_array_equal(np.asarray(g[1]), want[1], err_msg=f"{name} counts")
    assert want[1].sum() > 0 and (want[0] == -1).any()  # the case exercises both rules


def test_dispatch_layer_at_decode_shape_matches_numpy():
    """What a model gets at 4096 x top-8 of 256 experts (on a GPU: the blocked scatter)."""
    rng = np.random.default_rng(7)
    log2phy, logcnt = _maps(rng, 256, 2)
    ids = np.argsort(rng.random((4096, 256)), axis=-1)[:, :8].astype(np.int32)
    ids[:64, 0] = 3  # a hot expert
    phys, counts = jax.jit(dispatch_layer)(jnp.asarray(log2phy), jnp.asarray(logcnt), ids)
    want = numpy_dispatch(log2phy, logcnt, ids)
    np.testing.assert_array_equal(np.asarray(phys), want[0])
    np.testing.assert_array_equal(np.asarray(counts), want[1])


@pytest.mark.parametrize("choice", ["hash", "local", "balanced"])
def test_slots_are_made_once_not_fused_into_their_reader(choice):
    """The slots leave `dispatch_layer` through an optimization barrier: XLA cannot fuse the map
    into a consumer that gathers rows at them (and redo it for every element read)."""
    log2phy, logcnt = _maps(np.random.default_rng(2), 6, 2)
    layer = functools.partial(
        dispatch_layer, jnp.asarray(log2phy), jnp.asarray(logcnt), replica_choice=choice,
        device_index=0, slots_per_device=3, num_devices=4,
    )  # fmt: skip
    eqns = jax.make_jaxpr(layer)(jnp.zeros((8, 2), jnp.int32)).eqns
    (core,) = [e for e in eqns if "jaxpr" in e.params]
    inner = core.params["jaxpr"].jaxpr
    last = inner.eqns[-1]
    assert last.primitive.name == "optimization_barrier", last.primitive.name
    assert inner.outvars[0] is last.outvars[0]  # the slots are the barrier's output


@pytest.mark.parametrize("batch,k", [((96,), 3), ((2, 3, 4), 2), ((5,), 1), ((0,), 3)], ids=str)
def test_position_hash_constant_equals_the_program_hash(batch, k, monkeypatch):
    """Batches up to `_HASH_CONSTANT_MAX` pairs take their position hash as a host constant,
    larger ones mix the positions in the program: the same bits, the numpy model's, for any
    batch shape and K; the constant form puts no mix in the program."""
    n = int(np.prod(batch))
    with np.errstate(over="ignore"):
        pos = np.arange(n, dtype=np.uint32)[:, None] * np.uint32(k) + np.arange(k, dtype=np.uint32)
        want = _mix32(pos).reshape(*batch, k)
    forms = {}
    for limit in (0, dispatch_lib._HASH_CONSTANT_MAX):
        monkeypatch.setattr(dispatch_lib, "_HASH_CONSTANT_MAX", limit)
        forms[limit] = jax.make_jaxpr(lambda: dispatch_lib._pair_hash(batch, k, None))()
        got = jax.jit(lambda: dispatch_lib._pair_hash(batch, k, None))()
        assert got.dtype == jnp.uint32
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"limit {limit}")
    mixes = {limit: sum(e.primitive.name == "xor" for e in j.eqns) for limit, j in forms.items()}
    assert mixes[dispatch_lib._HASH_CONSTANT_MAX] == 0, mixes
    assert mixes[0] > 0 or n == 0, mixes  # jnp folds the mix of an empty batch away


def test_dispatch_past_the_constant_limit_matches_numpy(monkeypatch):
    """The whole layer with the hash mixed in the program (a batch past the limit)."""
    monkeypatch.setattr(dispatch_lib, "_HASH_CONSTANT_MAX", 0)
    rng = np.random.default_rng(5)
    log2phy, logcnt = _maps(rng, 7, 3)
    ids = rng.integers(-1, 8, (96, 3)).astype(np.int32)
    layer = functools.partial(dispatch_layer, jnp.asarray(log2phy), jnp.asarray(logcnt))
    assert "xor" in str(jax.make_jaxpr(layer)(ids))  # traced with the limit at 0
    phys, counts = jax.jit(layer)(ids)
    want = numpy_dispatch(log2phy, logcnt, ids)
    np.testing.assert_array_equal(np.asarray(phys), want[0])
    np.testing.assert_array_equal(np.asarray(counts), want[1])


@pytest.mark.gpu
def test_fused_dispatch_inside_shard_map():
    """Ids split over an axis (varying), maps replicated: the compiled kernel takes both. (Pallas's
    interpreter refuses a kernel whose operands vary inside shard_map, so this runs on a GPU.)"""
    from jax.sharding import PartitionSpec as P

    mesh = mesh_of(devices=jax.devices("gpu")[:1])
    rng = np.random.default_rng(3)
    log2phy, logcnt = _maps(rng, 16, 2)
    ids = rng.integers(0, 16, (128, 4)).astype(np.int32)
    tok = np.arange(128, dtype=np.uint32)
    kernel = functools.partial(dispatch_lib._map_and_count_fused, k=4)  # 512 ids: one program

    def body(l2p, cnt, ids, tok):
        phys, counts = kernel(l2p, cnt, ids, None, tok)
        return phys, counts[None]

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), P("ep"), P("ep")),
            out_specs=(P("ep"), P("ep")),
        )
    )
    phys, counts = f(jnp.asarray(log2phy), jnp.asarray(logcnt), jnp.asarray(ids), tok)
    want = numpy_dispatch(log2phy, logcnt, ids, token_index=tok)
    np.testing.assert_array_equal(np.asarray(phys), want[0])
    np.testing.assert_array_equal(np.asarray(counts).sum(0), want[1])


def test_compare_count_matches_numpy():
    """The XLA compare-sum of the counts (accelerators' alternative to the scatter)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 17, 1000).astype(np.int32)  # 16 = E: not counted
    got = jax.jit(functools.partial(counts_lib._count_compare, num_experts=16))(ids[None])
    np.testing.assert_array_equal(np.asarray(got)[0], np.bincount(ids, minlength=17)[:16])

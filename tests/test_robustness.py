"""Robustness of the transfer at its edges: traced infeasible or disagreeing maps under jit with the
weights donated, eager calls that must neither compile nor leak, and the meaning of
`TransferMetadata` (vLLM's first six fields) against an independent numpy model.

Disagreeing maps are made the way a multi-process run makes them: an array that claims to be
replicated (``PartitionSpec()``) whose copy on one device differs from the others.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of, put
from tests.transfer_model import compilations, make_leaves

L, N, D, E = 2, 2, 8, 8  # layers, slots per device, devices, experts
PT = N * D  # physical slots
ODD = 3  # the device whose copy of a "replicated" map differs
LEAVES = ("w13", "w2", "q")  # bf16, f32, int8


def split_replicated(value: np.ndarray, odd: np.ndarray, mesh) -> jax.Array:
    """A "replicated" array whose copy on device ODD is ``odd`` and elsewhere ``value``."""
    copies = [
        jax.device_put(odd if i == ODD else value, dev) for i, dev in enumerate(mesh.devices.flat)
    ]
    return jax.make_array_from_single_device_arrays(value.shape, NamedSharding(mesh, P()), copies)


def rep(value: np.ndarray, mesh) -> jax.Array:
    """``value`` replicated on ``mesh`` (the sharding `split_replicated` gives, so one compile)."""
    return jax.device_put(value, NamedSharding(mesh, P()))


def as_bytes(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def assert_bits_equal(out: dict, host: dict) -> None:
    for k, v in host.items():
        np.testing.assert_array_equal(as_bytes(out[k]), as_bytes(v), err_msg=k)


def placements(seed: int, num_layers: int = L) -> np.ndarray:
    """int32[L, P]: every expert twice, in a random order per layer."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(PT) % E) for _ in range(num_layers)]).astype(
        np.int32
    )


def lacking(old: np.ndarray, expert: int = E - 1) -> np.ndarray:
    """``old`` with every slot of ``expert`` given to expert 0: a map the expert is missing from."""
    return np.where(old == expert, 0, old).astype(np.int32)


def maps_case(case: str, seed: int, mesh):
    """(old, new, host copy of old, expected ok per layer) for case 'infeasible' or 'disagree'."""
    old, new = placements(seed), placements(seed + 100)
    if case == "infeasible":
        # Only layer 1 lacks the expert: all-or-nothing leaves layer 0 unmoved too.
        old[1] = lacking(old[1])
        return rep(old, mesh), rep(new, mesh), old, [True, False]
    return rep(old, mesh), split_replicated(new, np.roll(new, 1, axis=1), mesh), old, [False] * L


@contextlib.contextmanager
def warnings_of_jeplb(caplog):
    with caplog.at_level(logging.WARNING, logger="jeplb"):
        caplog.clear()
        yield
        jax.effects_barrier()


# -------------------------------------------------- 1. traced infeasible / disagreeing, donated


@pytest.fixture(scope="module")
def rearrange_jit(mesh):
    return jax.jit(
        lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh),
        donate_argnums=(2,),
    )


@pytest.fixture(scope="module")
def layer_jit(mesh):
    return jax.jit(
        lambda o, n, w: jeplb.transfer_layer(o, n, w, mesh=mesh),
        donate_argnums=(2,),
    )


@pytest.mark.parametrize("case", ["infeasible", "disagree"])
def test_traced_rearrange_refused_weights_kept(mesh, rearrange_jit, case, caplog):
    old, new, _, want_ok = maps_case(case, 1, mesh)
    host = make_leaves(np.random.default_rng(2), L, PT, names=LEAVES)
    w = put(host, mesh, P(None, "ep"))
    with warnings_of_jeplb(caplog):
        out, report = rearrange_jit(old, new, w)
        assert_bits_equal(out, host)  # readable: no callback error poisoned the outputs
    assert all(x.is_deleted() for x in w.values())  # the weights were donated
    assert np.asarray(report.ok).tolist() == want_ok
    assert "rearrange_expert_weights: layers" in caplog.text and "infeasible" in caplog.text


@pytest.mark.parametrize("case", ["infeasible", "disagree"])
def test_traced_transfer_layer_refused_weights_kept(mesh, layer_jit, case, caplog):
    old, new, _, _ = maps_case(case, 3, mesh)
    # Layer 1 of the case: infeasible (lacks an expert), or differing on device ODD.
    host = {k: v[0] for k, v in make_leaves(np.random.default_rng(4), 1, PT, names=LEAVES).items()}
    w = put(host, mesh, P("ep"))
    with warnings_of_jeplb(caplog):
        out, report = layer_jit(old[1], new[1], w)
        assert_bits_equal(out, host)
    assert all(x.is_deleted() for x in w.values())
    assert not bool(report.ok)
    assert "transfer_layer: layers [0]" in caplog.text


def step_state(case: str, mesh, *, seed: int = 5):
    """A state in the middle of a rebalance (cursor 0) whose move is refused, and its host maps.

    'infeasible': the current maps lack an expert the pending maps name (every layer).
    'disagree': the pending maps on device ODD differ from the others'.
    """
    cur, pend = placements(seed), placements(seed + 1)
    if case == "infeasible":
        cur = lacking(cur)
    state = jeplb.EplbState.create(
        num_layers=L,
        num_experts=E,
        num_devices=D,
        num_redundant_experts=PT - E,
        window_size=2,
        step_interval=100,
    )
    state = put(state, mesh, P()).replace(
        phy2log=jax.device_put(cur, NamedSharding(mesh, P())),
        pending_phy2log=(
            split_replicated(pend, np.roll(pend, 1, axis=1), mesh)
            if case == "disagree"
            else jax.device_put(pend, NamedSharding(mesh, P()))
        ),
        cursor=jax.device_put(np.int32(0), NamedSharding(mesh, P())),
    )
    return state, cur


@pytest.fixture(scope="module")
def step_jits(mesh):
    spec = P(None, "ep")

    def local(s, w):
        return jax.shard_map(
            jeplb.eplb_step_local,
            mesh=mesh,
            in_specs=(P(), spec),
            out_specs=(P(), spec, P()),
        )(s, w)

    return {
        "global": jax.jit(functools.partial(jeplb.eplb_step, mesh=mesh), donate_argnums=(0, 1)),
        "local": jax.jit(local, donate_argnums=(0, 1)),
    }


@pytest.mark.parametrize("view", ["global", "local"])
@pytest.mark.parametrize("case", ["infeasible", "disagree"])
def test_traced_step_refused_weights_kept(mesh, step_jits, view, case):
    state, cur = step_state(case, mesh)
    host = make_leaves(np.random.default_rng(6), L, PT, names=LEAVES)
    w = put(host, mesh, P(None, "ep"))
    state, out, info = step_jits[view](state, w)
    assert_bits_equal(out, host)
    assert all(x.is_deleted() for x in w.values())
    assert np.asarray(info.layer_ok).tolist() == [False] * L
    assert np.asarray(info.moved).tolist() == [False] * L
    assert not bool(info.fired)
    np.testing.assert_array_equal(np.asarray(state.phy2log), cur)  # maps still match weights
    if case == "disagree":
        assert int(state.cursor) == 0  # nothing was agreed: the rebalance is still due


@pytest.fixture(scope="module")
def stages_jit(mesh):
    """move_to_buffer + move_from_buffer in one shard_map, the weights donated. With ``roll``,
    device ODD rolls its new map by one slot inside the body (a map that varies over the axis)."""

    def body(o, n, w, roll):
        if roll:
            n = jnp.where(lax.axis_index("ep") == ODD, jnp.roll(n, 1), n)
        buf, meta = jeplb.move_to_buffer(o, n, w, axis_name="ep")
        return jeplb.move_from_buffer(w, buf, meta), meta.ok[None]

    def make(roll):
        f = jax.shard_map(
            functools.partial(body, roll=roll),
            mesh=mesh,
            in_specs=(P(), P(), P("ep")),
            out_specs=(P("ep"), P("ep")),
        )
        return jax.jit(f, donate_argnums=(2,))

    return {False: make(False), True: make(True)}


@pytest.mark.parametrize("case", ["infeasible", "disagree", "disagree_in_body"])
def test_traced_stages_refused_weights_kept(mesh, stages_jit, case):
    old, new, _, _ = maps_case("disagree" if case == "disagree_in_body" else case, 7, mesh)
    if case == "disagree_in_body":
        new = rep(placements(107), mesh)
    host = {k: v[0] for k, v in make_leaves(np.random.default_rng(8), 1, PT, names=LEAVES).items()}
    w = put(host, mesh, P("ep"))
    out, ok = stages_jit[case == "disagree_in_body"](old[1], new[1], w)
    assert_bits_equal(out, host)
    assert all(x.is_deleted() for x in w.values())
    assert np.asarray(ok).tolist() == [False] * D


def test_traced_stages_agreeing_maps_move(mesh, stages_jit):
    """The same compiled stages move the rows when every device holds the same feasible maps
    (so the refusals above come from the maps, not from a program that never moves)."""
    old, new = placements(9)[0], placements(10)[0]
    host = make_leaves(np.random.default_rng(8), 1, PT, names=LEAVES)
    host = {k: v[0] for k, v in host.items()}
    host["w2"] = np.arange(PT * 4, dtype=np.float32).reshape(PT, 4)
    rep = NamedSharding(mesh, P())
    out, ok = stages_jit[False](
        jax.device_put(old, rep), jax.device_put(new, rep), put(host, mesh, P("ep"))
    )
    assert np.asarray(ok).tolist() == [True] * D
    out = np.asarray(out["w2"])
    source = out[:, 0].astype(int) // 4  # row p held [4p, 4p + 4) before
    np.testing.assert_array_equal(old[source], new)
    assert (source != np.arange(PT)).any()


# ------------------------------------------------------------- 2. eager calls: compile, leak


def test_compilation_counter_sees_a_compilation():
    """The counter the tests below rely on does count: a new jitted function compiles once."""
    x = jax.block_until_ready(jnp.arange(7.0))
    with compilations() as seen:
        jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(x))
    assert len(seen) == 1


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


RSS_BOUND_MIB = 20


def eager_rearrange(mesh, i, w):
    return jeplb.rearrange_expert_weights(placements(i), placements(i + 1), w, mesh=mesh)[0]


def eager_layer(mesh, i, w):
    return jeplb.transfer_layer(placements(i)[0], placements(i + 1)[0], w, mesh=mesh)[0]


@pytest.mark.parametrize(
    ("call", "spec", "layered"),
    [(eager_rearrange, P(None, "ep"), True), (eager_layer, P("ep"), False)],
    ids=["rearrange_expert_weights", "transfer_layer"],
)
def test_eager_transfer_compiles_once_and_does_not_leak(mesh, call, spec, layered):
    host = make_leaves(np.random.default_rng(11), L, PT, names=LEAVES)
    if not layered:
        host = {k: v[0] for k, v in host.items()}
    w = call(mesh, 0, put(host, mesh, spec))  # first call: may compile
    with compilations() as seen:
        w = call(mesh, 1, w)  # new maps, same shapes
        jax.block_until_ready(w)
    assert seen == [], f"{len(seen)} compilations on the second call"
    for i in range(2, 12):  # warm-up: allocator pools, caches
        w = call(mesh, i, w)
    jax.block_until_ready(w)
    before = rss_mib()
    with compilations() as seen:
        for i in range(12, 112):
            w = call(mesh, i, w)
            jax.block_until_ready(w)
    grown = rss_mib() - before
    assert seen == []
    assert grown < RSS_BOUND_MIB, f"RSS grew {grown:.1f} MiB over 100 calls"


def test_eager_recover_experts_compiles_once_and_does_not_leak(mesh):
    """Device 7 lost; every expert has a survivor (no loader call). Each call a new target."""
    old = np.stack([np.arange(PT) % E] * L).astype(np.int32)  # expert e at slots e and e + 8
    new_mesh = mesh_of(devices=list(mesh.devices.flat)[:7])
    logical = make_leaves(np.random.default_rng(12), L, E, names=LEAVES)  # [L, E, ...]
    lay = np.arange(L)[:, None]
    host = {k: v[lay, old] for k, v in logical.items()}  # both replicas of an expert alike
    w = put(host, mesh, P(None, "ep"))

    def loader(layer, expert):
        raise AssertionError(f"loader called for {(layer, expert)}: every expert survived")

    def target(i):
        rng = np.random.default_rng(1000 + i)
        return np.stack([rng.permutation(np.arange(7 * N) % E) for _ in range(L)]).astype(np.int32)

    def call(i):
        out, rec = jeplb.recover_experts(
            old, w, loader, mesh=new_mesh, num_experts=E, new_phy2log=target(i)
        )
        jax.block_until_ready((out, rec.phy2log))
        return out, rec

    out, rec = call(0)
    np.testing.assert_array_equal(np.asarray(rec.phy2log), target(0))
    assert rec.loaded == ()
    for k, v in logical.items():  # every new slot holds the expert its target names
        np.testing.assert_array_equal(as_bytes(out[k]), as_bytes(v[lay, target(0)]))
    with compilations() as seen:
        call(1)
    assert seen == [], f"{len(seen)} compilations on the second call"
    for i in range(2, 7):
        call(i)
    before = rss_mib()
    with compilations() as seen:
        for i in range(7, 57):
            call(i)
    grown = rss_mib() - before
    assert seen == []
    assert grown < RSS_BOUND_MIB, f"RSS grew {grown:.1f} MiB over 50 calls"
    assert_bits_equal(w, host)  # the old arrays are not changed


# ------------------------------------------------------------- 3. TransferMetadata's meaning

META_FIELDS = (
    "is_unchanged",
    "is_received_locally",
    "recv_primary_mask",
    "recv_count",
    "recv_expert_ids",
    "recv_dst_rows",
)


@functools.cache
def metadata_fn(d: int):
    """Every device's TransferMetadata of move_to_buffer, stacked [D, ...], for maps int32[P]."""
    mesh = mesh_of(d)

    def body(o, n, w):
        _, meta = jeplb.move_to_buffer(o, n, w, axis_name="ep")
        return jax.tree_util.tree_map(lambda x: x[None], meta)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P("ep")), out_specs=P("ep")))


def metadata(old, new, d: int) -> dict[str, np.ndarray]:
    """Every device's metadata fields as numpy, [D, ...]."""
    old, new = np.asarray(old, np.int32), np.asarray(new, np.int32)
    w = np.zeros((old.shape[0], 2), np.float32)
    meta = metadata_fn(d)(jnp.asarray(old), jnp.asarray(new), jnp.asarray(w))
    return {f: np.asarray(getattr(meta, f)) for f in META_FIELDS}


def device0(old_mine, new_mine, old_other, new_other) -> dict:
    """Device 0's metadata on a 2-device mesh (device 1 holds ``old_other``)."""
    meta = metadata(old_mine + old_other, new_mine + new_other, 2)
    return {k: v[0].tolist() for k, v in meta.items()}


def test_metadata_remote_receive_next_to_emptied_slot():
    m = device0([0, -1, 1], [-1, 2, 1], [2, 3, 4], [2, 3, 4])
    assert m["is_unchanged"] == [False, False, True]
    assert m["is_received_locally"] == [False, False, True]
    assert m["recv_primary_mask"] == [False, True, False]
    assert m["recv_count"] == 1
    assert m["recv_expert_ids"] == [2, -1, -1]
    assert m["recv_dst_rows"] == [1, -1, -1]


def test_metadata_one_remote_one_kept():
    m = device0([0, 1], [2, 1], [2, 3], [2, 3])
    assert m["is_unchanged"] == [False, True]
    assert m["is_received_locally"] == [False, True]
    assert m["recv_count"] == 1


def test_metadata_received_experts_by_ascending_id():
    m = device0([0, 1, 2, 3], [7, 3, 7, 4], [4, 5, 6, 7], [4, 5, 6, 7])
    assert m["is_unchanged"] == [False, False, False, False]
    assert m["is_received_locally"] == [False, True, False, False]
    assert m["recv_count"] == 2
    assert m["recv_expert_ids"] == [4, 7, -1, -1]
    assert m["recv_dst_rows"] == [3, 0, -1, -1]
    assert m["recv_primary_mask"] == [True, False, False, True]


def test_metadata_one_device_emptied_slot():
    m = {k: v[0].tolist() for k, v in metadata([0, -1], [-1, -1], 1).items()}
    assert m["is_unchanged"] == [False, True]
    assert m["is_received_locally"] == [False, True]
    assert m["recv_count"] == 0
    assert m["recv_primary_mask"] == [False, False]
    assert m["recv_expert_ids"] == [-1, -1] and m["recv_dst_rows"] == [-1, -1]


def test_metadata_one_device_everything_local():
    m = {k: v[0].tolist() for k, v in metadata([0, 1, 2], [2, 2, 0], 1).items()}
    assert m["is_unchanged"] == [False, False, False]
    assert m["is_received_locally"] == [True, True, True]
    assert m["recv_count"] == 0 and m["recv_primary_mask"] == [False] * 3


def vllm_model(old_local: np.ndarray, new_local: np.ndarray) -> dict:
    """vLLM's formulas for one device's slots, written independently of jeplb."""
    n = old_local.shape[0]
    is_unchanged = old_local == new_local
    is_received_locally = is_unchanged | ((new_local != -1) & np.isin(new_local, old_local))
    remote = ~is_received_locally & (new_local != -1)
    experts, rows = [], []
    for e in sorted(set(new_local[remote].tolist())):
        experts.append(e)
        rows.append(int(np.nonzero(remote & (new_local == e))[0][0]))
    mask = np.zeros(n, bool)
    mask[rows] = True
    pad = [-1] * (n - len(experts))
    return {
        "is_unchanged": is_unchanged.tolist(),
        "is_received_locally": is_received_locally.tolist(),
        "recv_primary_mask": mask.tolist(),
        "recv_count": len(experts),
        "recv_expert_ids": experts + pad,
        "recv_dst_rows": rows + pad,
    }


def random_feasible(rng, p_total: int, num_experts: int):
    """old with empty slots; new names only experts old holds (or -1)."""
    old = rng.integers(-1, num_experts, p_total).astype(np.int32)
    held = np.unique(old[old >= 0])
    if held.size == 0:
        old[0], held = 0, np.array([0])
    new = rng.choice(np.concatenate([held, [-1]]), p_total).astype(np.int32)
    keep = rng.random(p_total) < 0.3
    return old, np.where(keep, old, new).astype(np.int32)


@pytest.mark.parametrize(("d", "n"), [(1, 5), (2, 4), (4, 3)])
def test_metadata_matches_vllm_formulas_random(d, n):
    rng = np.random.default_rng(20 + d)
    p_total = d * n
    compared = 0
    for _ in range(25):
        old, new = random_feasible(rng, p_total, num_experts=p_total // 2 + 1)
        meta = metadata(old, new, d)
        for dev in range(d):
            want = vllm_model(old[dev * n : (dev + 1) * n], new[dev * n : (dev + 1) * n])
            got = {k: v[dev].tolist() for k, v in meta.items()}
            assert got == want, (dev, old.tolist(), new.tolist())
            compared += 1
    assert compared == 25 * d

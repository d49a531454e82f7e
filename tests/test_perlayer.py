"""Per-layer expert weights (a sequence of L pytrees, leaves [P, ...]) in every entry point that
moves them, with tpu-inference's leaf shapes sharded over a "model" axis, checked bit-exactly
against the numpy model of the transfer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transfer_model as tm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import checks, perlayer, serving
from jeplb._src import step as step_lib

pytestmark = pytest.mark.devices(8)

L, E, SLOTS, D = 3, 12, 16, 8
# Rows large enough that the programs' tables do not count in their temporary memory.
HIDDEN, FF = 64, 64
# tpu-inference's expert leaves: w13 (P, D, 2F) or (P, 2, D, F), w2 (P, F, D).
SHAPES = {
    "w13": ((HIDDEN, 2 * FF), np.float32),
    "w13_split": ((2, HIDDEN, FF), ml_dtypes.bfloat16),
    "w2": ((FF, HIDDEN), ml_dtypes.bfloat16),
}


@functools.cache
def _mesh():
    return jax.make_mesh((D,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))


def _state(**options):
    return jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=SLOTS - E,
        window_size=2, axis_name="model", **options,
    )  # fmt: skip


def _layers(seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {k: tm.random_bytes(rng, (SLOTS, *shape), dt) for k, (shape, dt) in SHAPES.items()}
        for _ in range(L)
    ]


def _put(layers):
    sharding = NamedSharding(_mesh(), P("model"))
    return [{k: jax.device_put(v, sharding) for k, v in layer.items()} for layer in layers]


def _check(before, after, old, new):
    """Every leaf's rows against the numpy model (bytes, so NaN payloads count)."""
    for k in SHAPES:
        b = np.stack([layer[k] for layer in before]).view(np.uint8).reshape(L, SLOTS, -1)
        a = np.stack([np.asarray(layer[k]) for layer in after]).view(np.uint8)
        tm.check_rows(b, a.reshape(L, SLOTS, -1), np.asarray(old), np.asarray(new), D)


def _load(seed: int):
    return jnp.asarray(np.random.default_rng(seed).zipf(1.5, (L, E)).clip(0, 1000), jnp.int32)


def test_eplb_step_moves_per_layer_weights_in_place_below_one_layer_of_temp():
    state = _state(step_interval=2).replicated(_mesh())
    host = _layers(0)
    weights = _put(host)
    step = jax.jit(functools.partial(jeplb.eplb_step, mesh=_mesh()), donate_argnums=(0, 1))
    old = np.asarray(state.phy2log)
    for i in range(2):
        args = (state.record(_load(1)), weights)
        if i == 0:  # the program the call below runs (one compilation for both)
            stats = step.lower(*args).compile().memory_analysis()
            local = _local_layer_bytes(weights[0])
            assert stats.temp_size_in_bytes <= local, (stats.temp_size_in_bytes, local)
            assert stats.alias_size_in_bytes >= L * local  # donated: updated in place
        state, weights, info = step(*args)
    assert bool(info.fired) and bool(info.moved.all())
    assert not np.array_equal(np.asarray(state.phy2log), old)
    assert isinstance(weights, list) and len(weights) == L
    assert weights[0]["w2"].sharding.spec == P("model")
    _check(host, weights, old, state.phy2log)


def test_eplb_step_local_per_layer_progressive():
    mesh = _mesh()
    state = _state(step_interval=3, layers_per_step=2).replicated(mesh)  # one compilation
    host = _layers(2)
    weights = _put(host)
    specs = [{k: P("model") for k in SHAPES}] * L

    def body(s, w):
        return jeplb.eplb_step_local(s, w)

    step = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(), specs), out_specs=(P(), specs, P())),
        donate_argnums=(1,),
    )
    old = np.asarray(state.phy2log)
    moved = []
    for _ in range(4):
        state, weights, info = step(state.record(_load(3)), weights)
        moved.append(np.asarray(info.moved).tolist())
    assert moved[2] == [True, True, False] and moved[3] == [False, False, True]
    _check(host, weights, old, state.phy2log)


def _local_layer_bytes(layer) -> int:
    return sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in layer.values()) // D


def test_move_layer_one_program_for_all_layers_bit_exact_small_temp():
    state = _state(step_interval=1)
    state, info = jeplb.plan_rebalance(jeplb.end_pass(state.record(_load(4))))
    assert bool(info.fired) and int(state.cursor) == 0
    old, new = np.asarray(state.phy2log), np.asarray(state.pending_phy2log)
    host = _layers(5)
    weights = _put(host)
    mesh, local = _mesh(), _local_layer_bytes(weights[0])
    leaves = jax.tree_util.tree_leaves(weights[0])
    setup = perlayer.unit_engine(step_lib._setup(state, "cpu", None, None))
    program = serving._move_program(mesh, setup, (("model",),) * len(leaves))
    layer0 = checks.place_map(jnp.int32(0), mesh)
    with tm.compilations() as seen:
        # The program move_layer runs, on the arguments it gives it: its temporary memory.
        compiled = program.lower(state.replicated(mesh), layer0, leaves).compile()
        stats = compiled.memory_analysis()
        assert stats.temp_size_in_bytes <= local, (stats.temp_size_in_bytes, local)
        assert stats.alias_size_in_bytes >= local  # donated: the layer is updated in place
        for layer in range(L):
            state, weights[layer], report = jeplb.move_layer(
                state, layer, weights[layer], mesh=mesh
            )
            assert bool(report.ok)
            if layer == 0:
                first = len(seen)
    assert first >= 1 and len(seen) == first  # layers 1 and 2 compiled nothing
    assert int(state.cursor) == L and np.array_equal(np.asarray(state.phy2log), new)
    _check(host, weights, old, new)


def test_place_experts_per_layer_matches_stacked():
    rng = np.random.default_rng(6)
    logical = [
        {"w13": rng.standard_normal((E, HIDDEN, 2 * FF)).astype(np.float32)} for _ in range(L)
    ]
    phy2log = np.asarray(_state().phy2log)
    placed = jeplb.place_experts(logical, phy2log, mesh=_mesh(), axis_name="model")
    stacked = jeplb.place_experts(
        {"w13": np.stack([x["w13"] for x in logical])}, phy2log, mesh=_mesh(), axis_name="model"
    )
    assert len(placed) == L and placed[1]["w13"].sharding.spec == P("model")
    for layer in range(L):
        np.testing.assert_array_equal(
            np.asarray(placed[layer]["w13"]), np.asarray(stacked["w13"][layer])
        )


# ------------------------------------------------------------------------------- bad input


def test_bad_per_layer_sequences_are_named():
    state, mesh = _state(step_interval=2), _mesh()
    weights = _put(_layers(7))
    with pytest.raises(ValueError, match=r"expert_weights: .*one entry per layer, L = 3; got 2"):
        jeplb.eplb_step(state, weights[:2], mesh=mesh)
    odd = [*weights[:2], {"w13": weights[2]["w13"]}]
    with pytest.raises(ValueError, match=r"expert_weights\[2\] has the tree structure"):
        jeplb.eplb_step(state, odd, mesh=mesh)
    other = dict(weights[2], w2=jax.device_put(
        np.zeros((SLOTS, FF + 1, HIDDEN), ml_dtypes.bfloat16), NamedSharding(mesh, P("model"))
    ))  # fmt: skip
    with pytest.raises(
        ValueError, match=rf"expert_weights\[2\]\['w2'\] has shape \(16, {FF + 1}, {HIDDEN}\)"
    ):
        jeplb.eplb_step(state, [*weights[:2], other], mesh=mesh)
    short = dict(weights[1], w13=weights[1]["w13"][:8])
    with pytest.raises(
        ValueError, match=rf"expert_weights\[1\]\['w13'\] has shape \(8, {HIDDEN}, {2 * FF}\)"
    ):
        jeplb.eplb_step(state, [weights[0], short, weights[2]], mesh=mesh)
    with pytest.raises(ValueError, match=r"layer: expected an index in \[0, num_layers = 3\)"):
        jeplb.move_layer(state, 3, weights[0], mesh=mesh)
    with pytest.raises(ValueError, match=r"layer_weights\['w2'\] has shape"):
        jeplb.move_layer(state, 0, dict(weights[0], w2=weights[0]["w2"][:8]), mesh=mesh)
    logical = [{"w": np.zeros((E, 2), np.float32)}] * 2
    with pytest.raises(ValueError, match=r"logical_weights: .*L = 3 \(phy2log's rows\); got 2"):
        jeplb.place_experts(logical, np.asarray(state.phy2log), mesh=mesh, axis_name="model")


def test_host_schedule_mirrors_the_device():
    state = _state(step_interval=3, layers_per_step=2)
    sched = jeplb.HostSchedule.from_state(state)
    due = []
    for _ in range(6):
        state = jeplb.end_pass(state.record(_load(8)))
        plan = sched.tick()
        if plan:
            state, info = jeplb.plan_rebalance(state)
            sched.planned(info.fired)
        due.append((plan, sched.take_layers()))
        state = state.replace(cursor=jnp.int32(sched.cursor))  # as move_layer would leave it
        assert sched.step == int(state.step)
    assert due == [
        (False, []), (False, []), (True, [0, 1]), (False, [2]), (False, []), (True, [0, 1]),
    ]  # fmt: skip


def test_sync_replica_grads_per_layer_matches_stacked():
    mesh, rng = _mesh(), np.random.default_rng(9)
    phy2log = np.asarray(_state().phy2log)
    sharding = NamedSharding(mesh, P("model"))
    host = [{"w2": rng.standard_normal((SLOTS, FF, HIDDEN)).astype(np.float32)} for _ in range(L)]
    grads = [{"w2": jax.device_put(layer["w2"], sharding)} for layer in host]
    out = jeplb.sync_replica_grads(grads, phy2log, mesh=mesh, axis_name="model")
    stacked = jax.device_put(
        np.stack([layer["w2"] for layer in host]), NamedSharding(mesh, P(None, "model"))
    )
    want = np.asarray(jeplb.sync_replica_grads(stacked, phy2log, mesh=mesh, axis_name="model"))
    assert len(out) == L and out[0]["w2"].sharding.spec == P("model")
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(out[layer]["w2"]), want[layer])
    assert not np.array_equal(want[0], host[0]["w2"])  # replicas were summed
    with pytest.raises(ValueError, match=r"grads: .*one entry per layer, L = 3; got 2"):
        jeplb.sync_replica_grads(grads[:2], phy2log, mesh=mesh, axis_name="model")


def test_sync_replica_grads_local_per_layer_matches_stacked():
    mesh, rng = _mesh(), np.random.default_rng(10)
    phy2log = np.asarray(_state().phy2log)
    host = [{"w2": rng.standard_normal((SLOTS, FF, HIDDEN)).astype(np.float32)} for _ in range(L)]
    specs = [{"w2": P("model")}] * L

    def body(g, m):
        return jeplb.sync_replica_grads_local(g, m, axis_name="model")

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P()), out_specs=specs))
    out = f([{"w2": jnp.asarray(layer["w2"])} for layer in host], jnp.asarray(phy2log))
    stacked = jax.device_put(
        np.stack([layer["w2"] for layer in host]), NamedSharding(mesh, P(None, "model"))
    )
    want = np.asarray(jeplb.sync_replica_grads(stacked, phy2log, mesh=mesh, axis_name="model"))
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(out[layer]["w2"]), want[layer])

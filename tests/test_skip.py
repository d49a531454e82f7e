"""Skipping a rebalance that does not pay (`ScheduleConfig.skip_above` / `min_gain`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb

L, E, R, D = 2, 8, 8, 8
SKEWED = np.tile((2.0 ** -np.arange(E) * 1000).astype(np.int32) + 1, (L, 1))


def _start(mesh, **schedule):
    config = jeplb.EplbConfig.create(window_size=2, step_interval=2, **schedule)
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=R, config=config
    ).replicated(mesh)
    w = jnp.arange(L * E, dtype=jnp.float32).reshape(L, E, 1)
    experts = jax.device_put(
        w[jnp.arange(L)[:, None], state.phy2log], NamedSharding(mesh, P(None, "ep"))
    )
    return state, experts, w


@functools.lru_cache
def _stepper(mesh):
    return jax.jit(lambda s, x: jeplb.eplb_step(s, x, mesh=mesh))


def _run(mesh, state, experts, loads):
    """One step per load; returns the state, the weights and each step's info."""
    infos = []
    for load in loads:
        state, experts, info = _stepper(mesh)(state.record(jnp.asarray(load)), experts)
        infos.append(jax.device_get(info))
    return state, experts, infos


def test_min_gain_stops_a_steady_load_and_lets_a_drift_through(mesh):
    state, experts, w = _start(mesh, min_gain=0.01)
    state, experts, infos = _run(mesh, state, experts, [SKEWED] * 2)
    assert infos[1].fired and not infos[1].skipped  # the first rebalance pays
    settled = (np.asarray(state.phy2log), np.asarray(experts))
    state, experts, infos = _run(mesh, state, experts, [SKEWED] * 6)
    due = [i for i in infos if i.step % 2 == 0]
    assert all(i.skipped and not i.fired and not i.moved.any() for i in due)
    assert all(i.planned_balancedness - i.balancedness < 0.01 for i in due)
    np.testing.assert_array_equal(state.phy2log, settled[0])
    np.testing.assert_array_equal(experts, settled[1])  # not a row moved
    drift = SKEWED[:, ::-1].copy()
    state, experts, infos = _run(mesh, state, experts, [drift] * 2)
    assert infos[1].fired and not infos[1].skipped and infos[1].moved.all()
    assert infos[1].balancedness > infos[0].balancedness + 0.05
    np.testing.assert_array_equal(experts, w[jnp.arange(L)[:, None], state.phy2log])


def test_skip_above_skips_before_the_policy_runs(mesh):
    state, experts, _ = _start(mesh, skip_above=0.0)  # every placement is balanced enough
    state, experts, infos = _run(mesh, state, experts, [SKEWED] * 2)
    assert infos[1].skipped and not infos[1].fired
    assert np.isnan(infos[1].planned_balancedness)  # the policy did not run
    np.testing.assert_array_equal(state.phy2log, np.tile(np.arange(E + R) % E, (L, 1)))


def test_progressive_mode_skips_the_whole_rebalance(mesh):
    state, experts, _ = _start(mesh, min_gain=1.0, layers_per_step=1)  # nothing gains that much
    state, experts, infos = _run(mesh, state, experts, [SKEWED] * 4)
    assert [bool(i.skipped) for i in infos] == [False, True, False, True]
    assert not any(i.moved.any() or i.in_progress for i in infos)
    assert int(state.cursor) == L


@pytest.mark.parametrize(
    "option, value, error, match",
    [
        ("skip_above", 1.5, ValueError, r"skip_above: expected a number in \[0, 1\], got 1.5"),
        ("min_gain", True, TypeError, r"min_gain: expected a number in \[0, 1\] or None, got bool"),
        ("min_gain", "0.1", TypeError, r"min_gain: expected a number .* got str '0.1'"),
    ],
)
def test_bad_thresholds_are_named(option, value, error, match):
    with pytest.raises(error, match=match):
        jeplb.ScheduleConfig(**{option: value})

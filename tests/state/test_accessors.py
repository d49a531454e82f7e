"""`EplbState.last_load` and `EplbState.window_load`: the recorded logical loads, checked against a
numpy model of the window over several steps (the ring wraps, and rebalances fire in between)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of

L, E, W = 2, 4, 3


def test_last_and_window_load_follow_the_steps():
    mesh = mesh_of(1)
    s = jeplb.EplbState.create(
        num_layers=L,
        num_experts=E,
        num_devices=1,
        num_redundant_experts=2,
        window_size=W,
        step_interval=2,
    )
    np.testing.assert_array_equal(s.last_load(), np.zeros((L, E)))
    np.testing.assert_array_equal(s.window_load(), np.zeros((L, E)))
    w = jax.device_put(jnp.zeros((L, E + 2)), NamedSharding(mesh, P(None, "ep")))
    step = jax.jit(functools.partial(jeplb.eplb_step, mesh=mesh))
    read = jax.jit(lambda s: (s.last_load(), s.window_load()))
    rng = np.random.default_rng(0)
    loads, fired = [], 0
    for _ in range(7):  # wraps the W = 3 ring twice
        loads.append(rng.integers(0, 100, (L, E)).astype(np.int32))
        s, w, info = step(s.record(jnp.asarray(loads[-1])), w)
        fired += int(info.fired)
        last, total = read(s)
        assert last.dtype == jnp.int32 and last.shape == (L, E)
        np.testing.assert_array_equal(last, loads[-1])
        np.testing.assert_array_equal(total, np.sum(loads[-W:], axis=0))
        np.testing.assert_array_equal(s.last_load(), last)  # eager and jitted agree
    assert fired >= 2  # the placement changed in between: the loads are logical

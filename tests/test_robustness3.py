"""Robustness, round 3: each test pins one class of fault that gave a silent wrong result or an
error naming nothing, and fails without its fix.

x64 cases run inside ``jax.enable_x64(True)`` so the rest of the suite keeps 32-bit defaults.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src.transfer import layout
from tests.transfer_model import check_rows, make_plan

L, N, D = 2, 2, 8  # layers, slots per device, devices
PT = N * D


def mesh_of(d: int, names=("ep",), shape=None) -> Mesh:
    shape = shape or (d,)
    if len(jax.devices()) < d:
        pytest.skip(f"needs {d} devices, the backend has {len(jax.devices())}")
    devices = np.array(jax.devices()[:d]).reshape(shape)
    return Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def mesh():
    return mesh_of(D)


# ------------------------------------------------------------------ 1. x64 ids in dispatch


def test_x64_dispatch_range_checks_ids_before_the_int32_cast():
    # An int64 id of 2**32 + 1 cast to int32 first reads as expert 1: it must map to -1, uncounted.
    log2phy = jnp.array([[0, 2], [1, -1], [3, -1]], jnp.int32)
    logcnt = jnp.array([2, 1, 1], jnp.int32)
    with jax.enable_x64(True):
        ids = jnp.array([[2**32 + 1, 0], [1, -(2**32) + 2]], jnp.int64)
        phys, counts = jax.jit(jeplb.dispatch_layer)(log2phy, logcnt, ids)
        assert phys[0, 0] == -1 and phys[1, 1] == -1
        assert phys[1, 0] == 1
        assert counts.tolist() == [1, 1, 0]


def test_x64_dispatch_range_checks_the_device_index_before_the_int32_cast():
    # Expert 0 has a replica on device 1 (slot 2); a device index 2**32 + 1 is no device at all,
    # so the choice is the plain hash one, not device 1's replica.
    log2phy = jnp.array([[0, 2], [1, -1]], jnp.int32)
    logcnt = jnp.array([2, 1], jnp.int32)
    ids = jnp.zeros((16, 1), jnp.int32)
    kw = dict(prefer_local=True, slots_per_device=2, num_devices=2)
    with jax.enable_x64(True):
        f = jax.jit(lambda dev: jeplb.dispatch_layer(log2phy, logcnt, ids, device_index=dev, **kw))
        far = f(jnp.int64(2**32 + 1))[0]
        on_one = f(jnp.int64(1))[0]
    plain = jeplb.dispatch_layer(log2phy, logcnt, ids)[0]
    assert set(on_one.ravel().tolist()) == {2}
    np.testing.assert_array_equal(far, plain)
    assert set(plain.ravel().tolist()) == {0, 2}

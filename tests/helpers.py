"""Helpers shared by the test files: meshes, placing host trees on them, bit views.

The fixtures built on them (``mesh``, ``mesh8``, ``mesh1``, ``mesh_ep_tp``) live in
tests/conftest.py; a test that needs another mesh calls `mesh_of`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

AUTO = jax.sharding.AxisType.Auto


def mesh_of(
    d: int = 8,
    names: Sequence[str] = ("ep",),
    *,
    shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh with Auto axes ``names`` over the first ``d`` devices of the default backend (or
    over ``devices``), shaped ``shape`` (default: one axis of all of them).

    Skips the calling test when the backend has fewer than ``d`` devices.
    """
    if devices is None:
        have = jax.devices()
        if len(have) < d:
            pytest.skip(f"needs {d} devices, the backend has {len(have)}")
        devices = have[:d]
    devices = np.array(devices)
    shape = tuple(shape) if shape is not None else (devices.size,)
    return Mesh(devices.reshape(shape), tuple(names), axis_types=(AUTO,) * len(names))


def put(tree, mesh: Mesh, spec):
    """Each leaf of ``tree`` on ``mesh``, sharded by the PartitionSpec ``spec``."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree)

"""Shared parts of the bad-input tests (tests/*/test_bad_input.py and a few single-module files):
one small placement, the meshes, and `expect`, which calls a public function with a bad input and
checks the error and that nothing changed.

Every bad-input test drives each public function with hypothesis-drawn mistakes and pins the
message: a clear ValueError/TypeError, raised before anything changes (inputs byte-for-byte the
same, donated weights still alive), no crash, no hang.
Set JEPLB_BAD_INPUT_COUNTS=path to write how many bad inputs each function was given (one pytest
process: run the bad-input files without ``-n``; tests/conftest.py writes the file at the end).
"""

from __future__ import annotations

import collections
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of

L, E, D, N = 2, 8, 8, 2  # P = 16
PT = D * N
TRIED: collections.Counter = collections.Counter()
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def int_error(name, bad, *, allow_none=False):
    """The one int option check's error for ``bad`` (`jeplb._src.validate.check_int`)."""
    if isinstance(bad, bool) or not isinstance(bad, int):
        want = "an int or None" if allow_none else "an int"
        return (
            TypeError,
            rf"{name}: expected {want}, got {type(bad).__name__} {re.escape(repr(bad))}",
        )
    return ValueError, rf"{name}: expected an int >= 1, got {bad}"


def write_counts(path) -> None:
    """Writes how many bad inputs each public function was given (`expect` counts them)."""
    with open(path, "w") as f:
        json.dump({"total": sum(TRIED.values()), **dict(sorted(TRIED.items()))}, f, indent=1)


# The cases that build meshes or place weights need D devices (with fewer, e.g. one GPU, they
# skip: mark a module ``pytestmark = needs_devices``); the others run anywhere.
ENOUGH = jax.device_count() >= D
needs_devices = pytest.mark.skipif(
    not ENOUGH, reason=f"needs {D} devices, the default backend has {jax.device_count()}"
)
if ENOUGH:
    MESH = mesh_of(D)
    OTHER = mesh_of(D, ("data",))
    # MESH's devices in reverse order: same axes and sizes, another placement of the slots.
    REVERSED = mesh_of(devices=np.asarray(MESH.devices)[::-1])
    # Four devices on the expert axis, two on a tensor axis that may shard the other dims.
    TENSOR = mesh_of(D, ("ep", "tensor"), shape=(D // 2, 2))
    MESH1 = mesh_of(1)
    SPEC = NamedSharding(MESH, P(None, "ep"))
else:  # importable anyway: the modules that use them skip
    MESH = OTHER = REVERSED = TENSOR = MESH1 = SPEC = None
OLD = np.tile(np.arange(PT, dtype=np.int32) % E, (L, 1))
NEW = np.roll(OLD, 3, axis=1)
LOAD = np.arange(1, L * E + 1, dtype=np.float32).reshape(L, E)
CREATE = dict(num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=PT - E,
              window_size=2, step_interval=4)  # fmt: skip


def make_state():
    """The small state most cases start from (`CREATE`)."""
    return jeplb.EplbState.create(**CREATE)


def weights():
    return {
        "w": jax.device_put(jnp.arange(L * PT * 3, dtype=jnp.float32).reshape(L, PT, 3), SPEC),
        "q": jax.device_put(jnp.ones((L, PT, 4), jnp.int8), SPEC),
    }


def by_expert(old, cols=3):
    """float32[L, P, cols] whose row (l, p) says which expert slot p holds: every copy of an
    expert has the same row, so the result of a transfer is known whichever copy it reads."""
    old = np.asarray(old)
    layer = np.arange(old.shape[0])[:, None, None]
    return (1000 * layer + 10 * old[..., None] + np.arange(cols)).astype(np.float32)


def snapshot(tree):
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            out.append(("jax", x, np.asarray(x).tobytes()))
        elif isinstance(x, np.ndarray):
            out.append(("np", x, x.tobytes()))
    return out


def expect(fn, error, match, *inputs):
    """Calls ``fn()``; it must raise ``error`` matching ``match`` and leave ``inputs`` as they were."""
    before = snapshot(inputs)
    with pytest.raises(error, match=match):
        fn()
    for kind, x, raw in before:
        if kind == "jax":
            assert not x.is_deleted(), "an input array was donated although the call failed"
        assert np.asarray(x).tobytes() == raw, "an input changed although the call failed"
    TRIED[fn.__qualname__.rsplit(".", 1)[-1]] += 1  # the public function's name


# ------------------------------------------------------ rows that row_impl="pallas" cannot move

# The row kernel (interpreted on CPU) moves rows in blocks of 1024 elements (on one device, rows
# of 512 32-bit words). Each case gives 'b' and 'w13' rows it cannot move and 'w2' rows it can:
# one ValueError names both bad leaves by path, not the good one, before anything is traced.
BAD_WIDTH = st.integers(1, 1535).filter(lambda w: w % 512)
KERNEL = settings(SETTINGS, max_examples=8)


def names_both(name):
    """The message names ``name['b']`` then ``name['w13']``, and never ``['w2']``."""
    return (
        rf"(?s)\A(?!.*\['w2'\])2 leaves cannot be moved:\n  {name}\['b'\]: .*\n  {name}\['w13'\]: "
    )


def kernel_leaves(data, lead, sharding=None, good=1024):
    """{'b', 'w13'}: f32 rows of drawn widths the kernel cannot move; 'w2': rows it can."""
    widths = {"b": data.draw(BAD_WIDTH), "w13": data.draw(BAD_WIDTH), "w2": good}
    host = {k: np.zeros((*lead, w), np.float32) for k, w in widths.items()}
    if sharding is None:
        return host
    return {k: jax.device_put(x, sharding) for k, x in host.items()}

"""Bad input to the gradient sync (`sync_replica_grads`): leaves the row kernel cannot move are
named by path before anything is traced (see tests/bad_input.py)."""

from __future__ import annotations

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jeplb
from tests.bad_input import (
    KERNEL,
    MESH,
    OLD,
    PT,
    SPEC,
    L,
    expect,
    kernel_leaves,
    names_both,
    needs_devices,
)

pytestmark = needs_devices


@pytest.fixture
def pallas_everywhere(monkeypatch):
    """sync_replica_grads takes no row_impl (it resolves ``auto``, which picks the kernel only
    for rows it moves): force ``row_impl="pallas"`` to reach its check."""
    from jeplb._src import training
    from jeplb._src.transfer.config import TransferConfig

    def forced(**options):
        return TransferConfig(**{**options, "row_impl": "pallas"})

    monkeypatch.setattr(training, "TransferConfig", forced)


@KERNEL
@given(local=st.booleans(), data=st.data())
def test_sync_rows_the_kernel_cannot_move(pallas_everywhere, local, data):
    if local:
        g = kernel_leaves(data, (L, PT))
        f = jax.shard_map(
            jeplb.sync_replica_grads_local,
            mesh=MESH,
            in_specs=(P(None, "ep"), P()),
            out_specs=P(None, "ep"),
        )
        fn = lambda: jax.jit(f).lower(g, OLD)  # noqa: E731
    else:
        g = kernel_leaves(data, (L, PT), SPEC)
        fn = lambda: jeplb.sync_replica_grads(g, OLD, mesh=MESH)  # noqa: E731
    fn.__qualname__ = "sync_replica_grads"
    expect(fn, ValueError, names_both("grads"), g, OLD)

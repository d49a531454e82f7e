"""The decode-step benchmark's pieces: its routers and its listing of what a loop trip launches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeplb.tools import bench_decode as bd


@pytest.mark.parametrize("router", bd.ROUTERS)
def test_routers_pick_the_draws_experts(router):
    """Both routers keep the layer's draw: ``topk`` its experts exactly (in some order),
    ``shift`` each moved by the activations' sign bit."""
    case = dataclasses.replace(bd.TINY, router=router)
    rng = np.random.default_rng(3)
    draw = np.argsort(rng.random((case.tokens, case.experts)), axis=-1)[:, : case.top_k]
    acc = rng.uniform(-1, 1, (case.tokens, case.hidden)).astype(np.float32)
    ids = np.asarray(jax.jit(lambda a, d: bd.route(case, a, d))(acc, draw.astype(np.int32)))
    assert ids.shape == (case.tokens, case.top_k) and ids.dtype == np.int32
    if router == "topk":
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(draw, axis=1))
    else:
        expected = (draw + (acc[:, :1] > 0)) % case.experts
        np.testing.assert_array_equal(ids, expected)


def test_loop_body_ops_lists_the_scanned_trip():
    """A scanned step's trip: the counted-once variant launches what the plain one does and at
    least the write that keeps the layer's ids; the unrolled step has no loop."""
    case = dataclasses.replace(bd.TINY, router="topk")
    trips = {}
    for variant in (bd.PLAIN, bd.ONCE):
        fn, args = bd.build(case, variant, "scanned")
        trips[variant] = bd.loop_body_ops(fn.lower(*args).compile().as_text())
    assert any("TopK" in op for op in trips[bd.PLAIN])
    assert not any("dynamic-update-slice" in op for op in trips[bd.PLAIN])
    assert any("dynamic-update-slice" in op for op in trips[bd.ONCE])
    assert len(trips[bd.ONCE]) > len(trips[bd.PLAIN])
    fn, args = bd.build(case, bd.ONCE, "unrolled")
    text = fn.lower(*args).compile().as_text()
    assert bd.loop_body_ops(text) == [] and bd.entry_ops(text)


def test_computations_splits_a_module_by_name():
    text = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(4)).compile().as_text()
    comps = bd._computations(text)
    assert "ENTRY" in comps and all(isinstance(v, list) for v in comps.values())
    assert not any(
        op.split(": ")[1].startswith(("parameter", "tuple")) for op in bd.entry_ops(text)
    )

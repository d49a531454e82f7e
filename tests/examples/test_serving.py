"""The serving example: one rebalance program for every batch bucket, no EPLB program on idle
steps, outputs bitwise the same across rebalances, padded tokens left out of the load."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transfer_model as tm

import jeplb
from jeplb.examples import serving

pytestmark = pytest.mark.devices(8)

INTERVAL = 6


@pytest.fixture(scope="module")
def run():
    cfg = serving.ServingConfig(split_w13=True)
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    state = jeplb.EplbState.create(
        num_layers=cfg.num_layers, num_experts=cfg.num_experts, num_devices=8,
        num_redundant_experts=cfg.num_redundant_experts, window_size=4,
        step_interval=INTERVAL, layers_per_step=2, axis_name="model",
    )  # fmt: skip
    loop = serving.ServingLoop(cfg, state, mesh)
    rng = np.random.default_rng(0)
    probe = rng.standard_normal((3, cfg.d_model)).astype(np.float32)  # bucket 4
    probes, maps = [], []

    def look():
        probes.append(np.asarray(loop.step(probe)))
        maps.append(np.asarray(loop.state.phy2log))

    look()  # step 1, before any rebalance
    prompts = [rng.standard_normal((n, cfg.d_model)).astype(np.float32) for n in (5, 3, 4)]
    loop.serve(prompts, decode_steps=3)  # steps 2-5: prefill in bucket 16, decode in bucket 4
    loop.step(rng.standard_normal((7, cfg.d_model)).astype(np.float32))  # 6: bucket 8, plans
    look()  # step 7: layers 2 and 3 move after it (0 and 1 moved in step 6)
    with tm.compilations() as seen:  # a second rebalance, every bucket warm
        for n in (9, 2, 7, 3, 12, 1, 5, 16, 4, 6):  # steps 8-17
            loop.step(rng.standard_normal((n, cfg.d_model)).astype(np.float32))
        look()  # step 18: plans again
    look()  # step 19
    return loop, probes, maps, seen


def test_idle_steps_run_no_eplb_program(run):
    loop, *_ = run
    for i, entry in enumerate(loop.log, start=1):
        due = i % INTERVAL == 0 or ((i - 1) % INTERVAL == 0 and i > 1)
        assert bool(entry["ran"]) == due, (i, entry)
    assert loop.runs == {"plan": 3, "move": 3 * 4}  # steps 6, 12, 18 plan; 2 layers a step
    assert loop.log[5]["ran"] == ["plan", ("move", 0), ("move", 1)]
    assert loop.log[6]["ran"] == [("move", 2), ("move", 3)]


def test_one_rebalance_program_for_every_bucket(run):
    loop, _, _, seen = run
    assert {e["bucket"] for e in loop.log} == {4, 8, 16}
    assert loop.plan._cache_size() == 1
    assert loop.forward._cache_size() == 3  # one forward per bucket
    assert seen == []  # a second rebalance over every bucket compiled nothing


def test_outputs_bitwise_identical_across_rebalances(run):
    _, probes, maps, _ = run
    assert not np.array_equal(maps[0], maps[1])  # mid-rebalance: layers 0, 1 moved
    assert len({m.tobytes() for m in maps}) >= 3
    for p in probes[1:]:
        np.testing.assert_array_equal(p, probes[0])


def test_padded_tokens_are_not_counted(run):
    loop, *_ = run
    cfg = loop.cfg
    pos = int(loop.state.window_pos)
    last = np.asarray(loop.state.window)[(pos - 1) % loop.state.window_size]
    assert last.sum() == cfg.num_layers * cfg.top_k * 3  # 3 valid tokens of a bucket of 4

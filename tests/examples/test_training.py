"""Training with EPLB (jeplb.examples.training) on 8 CPU devices: the replicas of every expert stay
bitwise identical at every step (weights and Adam moments), the loss curve matches the same model
trained without redundant experts from the same initialisation and data, and rebalancing raises the
balancedness. Progressive (one layer per step) and whole (all layers in one step) modes.

The example model is written with flax and trained with optax (the ``demo`` and ``test`` extras);
without them the module is skipped. `jeplb demo --train` runs the same at 200 steps.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from jeplb.examples import DriftingZipf, MoEConfig, training
from tests.helpers import mesh_of

L, E, R, H, F, B, S = 2, 8, 8, 16, 32, 2, 16  # P = 16 slots, 2 per device
STEPS, INTERVAL, WINDOW, CLIP = 24, 6, 5, 1.0  # rebalances planned at steps 5, 11, 17, 23
MODES = {"progressive": 1, "whole": None}


@pytest.fixture(scope="module")
def runs(cpu_devices):
    mesh = mesh_of(devices=cpu_devices)
    cfg = MoEConfig(
        num_layers=L, num_experts=E, num_redundant_experts=R, top_k=2, d_model=H, d_ff=F
    )
    workload = DriftingZipf(
        num_layers=L, num_experts=E, batch=B, seq_len=S, d_model=H, zipf_exponent=1.5
    )
    common = dict(
        mesh=mesh,
        workload=workload,
        steps=STEPS,
        window_size=WINDOW,
        step_interval=INTERVAL,
        clip_norm=CLIP,
    )
    out = {"reference": training.train(cfg, eplb=False, **common)}
    for name, layers_per_step in MODES.items():
        out[name] = training.train(
            cfg, layers_per_step=layers_per_step, check_replicas=True, **common
        )
    return out


@pytest.mark.parametrize("mode", sorted(MODES))
def test_replicas_stay_bitwise_identical(runs, mode):
    run = runs[mode]
    assert run.num_slots == E + R
    assert run.replicas_identical is not None and len(run.replicas_identical) == STEPS
    assert run.replicas_identical.all(), np.flatnonzero(~run.replicas_identical)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rebalances_at_least_three_times(runs, mode):
    run = runs[mode]
    assert np.flatnonzero(run.fired).tolist() == [5, 11, 17, 23]
    if MODES[mode] is None:  # every layer moves in the step that plans
        assert run.layers_moved.tolist() == [L if f else 0 for f in run.fired]
    else:  # one layer per step, over L steps
        moved = np.flatnonzero(run.layers_moved).tolist()
        assert moved == [5, 6, 11, 12, 17, 18, 23] and run.layers_moved.max() == 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_loss_matches_the_model_without_redundant_experts(runs, mode):
    ref, run = runs["reference"], runs[mode]
    assert ref.num_slots == E and not ref.fired.any()
    assert ref.loss[-1] < 0.8 * ref.loss[0]  # it trains: the curves are not flat
    assert ref.grad_norm[0] > CLIP  # clipping is active, with the reference's norm
    np.testing.assert_allclose(run.grad_norm, ref.grad_norm, rtol=1e-5)
    np.testing.assert_allclose(run.loss, ref.loss, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_rebalancing_raises_balancedness(runs, mode):
    ref, run = runs["reference"], runs[mode]
    before = run.balancedness[:INTERVAL].mean()
    after = run.balancedness[INTERVAL + L :].mean()
    print(
        f"{mode}: balancedness {before:.3f} before the first rebalance, {after:.3f} after "
        f"(reference without replicas {ref.balancedness.mean():.3f}); max device load "
        f"{run.max_device_load[:INTERVAL].mean():.0f} -> {run.max_device_load[INTERVAL + L :].mean():.0f}"
    )
    assert after > before + 0.1
    assert run.max_device_load[INTERVAL + L :].mean() < run.max_device_load[:INTERVAL].mean()


def test_replicas_identical_sees_one_flipped_bit():
    phy2log = np.array([[0, 1, 0, -1]])
    w = np.arange(4 * 3, dtype=np.float32).reshape(1, 4, 3)
    w[0, 2] = w[0, 0]
    assert training.replicas_identical({"w": w}, phy2log)  # slot 3 is empty: not compared
    w[0, 2, 1] = np.nextafter(w[0, 2, 1], np.float32(np.inf))
    assert not training.replicas_identical({"w": w}, phy2log)

"""A short soak (benchmarks/soak.py): 30 consecutive rebalances on 8 simulated devices, every slot's
checksum verified after each, faults refused, memory flat, one compilation."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.devices(8)]  # 8-device meshes, default backend

SOAK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("jeplb_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(soak, cpu_devices):
    # Raises AssertionError at the first lost or mixed-up expert or unrefused fault.
    return soak.run(30, seed=3, fused_policy=False)


def test_every_rebalance_survived(result):
    assert result["rebalances"] == 30
    assert result["checksum_checks"] == 30 and result["full_byte_checks"] == 1
    assert result["by_kind"] == {**result["by_kind"], "random": 18, "policy": 9, "fault": 3}
    assert result["remote_rows_moved"] > 0
    assert result["data_lost"] == 0


def test_faults_refused_and_logged(result):
    assert result["faults_injected"] == 3
    assert result["faults_logged"] == 3


def test_one_compilation(result):
    assert result["traces"]["move"] == 1
    assert result["traces"]["policy_eager"] <= 1  # 0 when another test compiled the same shape
    if result["cache_size"]["move"] is not None:
        assert result["cache_size"]["move"] == 1


def test_memory_flat(result):
    live, nbytes = result["live_arrays"], result["live_bytes"]
    assert live["after_warmup_min"] == live["after_warmup_max"] == live["last"]
    assert nbytes["after_warmup_min"] == nbytes["after_warmup_max"] == nbytes["last"]
    mem = result["device_memory_bytes_in_use"]
    if mem is not None:
        assert mem["min"] == mem["max"]


def test_checksum_detects_a_mixed_up_expert(soak):
    # The check itself must be able to fail: two experts' rows swapped give other checksums.
    import jax.numpy as jnp
    import numpy as np

    logical = soak.logical_weights(0)
    sums = np.asarray(soak.checksums({k: jnp.asarray(v) for k, v in logical.items()}))
    swapped = {k: v.copy() for k, v in logical.items()}
    swapped["q"][0, [1, 2]] = swapped["q"][0, [2, 1]]
    other = np.asarray(soak.checksums({k: jnp.asarray(v) for k, v in swapped.items()}))
    assert (other[0, [1, 2]] != sums[0, [1, 2]]).all()
    assert (other[0, 3:] == sums[0, 3:]).all()

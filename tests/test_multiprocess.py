"""Multi-process: 2 processes x 4 simulated CPU devices on loopback, through `jax.distributed`.

The test starts both processes itself (tests/multiprocess_worker.py), waits at most TIMEOUT_S for
them, kills both if either hangs, and prints each worker's stderr (its traceback) if one fails. The
workers check every shard they can address against the numpy model; the assertions here read what
they report.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 240  # a hang is caught; a loaded 2-core machine needs the margin
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The parent's 8-device flag (conftest) must not reach the workers: they have 4 devices each.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", str(i), str(port), str(out)],
            cwd=ROOT,
            env=_child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = [None, None]
    timed_out = False
    try:
        for i, p in enumerate(procs):
            logs[i] = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            if logs[i] is None:
                logs[i] = p.communicate()

    def tail(text: str) -> str:
        lines = [ln for ln in text.splitlines() if "[Gloo]" not in ln]
        return "\n".join(lines[-60:])

    report = "\n".join(
        f"--- worker {i} (exit {p.returncode}) stderr:\n{tail(logs[i][1])}"
        for i, p in enumerate(procs)
    )
    if timed_out:
        pytest.fail(f"the workers did not finish within {TIMEOUT_S} s; killed both\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a worker failed\n{report}")
    results = []
    for i in range(2):
        with open(out / f"process_{i}.json") as f:
            results.append(json.load(f))
    return results


def test_cpu_collectives_across_processes(workers):
    assert [r["process"] for r in workers] == [0, 1]
    assert all(r["collectives"] in ("gloo", "mpi") for r in workers)


def test_rearrange_exact_on_every_shard(workers):
    for r in workers:
        # 6 plans x 3 leaves x 4 local devices per process.
        assert r["rearrange"]["plans"] == 6
        assert r["rearrange"]["shards_checked"] == 6 * 3 * 4


def test_policy_identical_in_both_processes(workers):
    assert all(r["policy"]["identical"] for r in workers)
    assert workers[0]["policy"]["fingerprints"] == workers[1]["policy"]["fingerprints"]


def test_rebalance_step_exact_on_every_shard(workers):
    for r in workers:
        assert r["step"]["fired"]
        assert r["step"]["shards_checked"] == 3 * 4
        assert r["step"]["maps_identical"]
        first, last = r["step"]["balancedness"]
        assert last > first
    assert workers[0]["step"]["phy2log_fingerprint"] == workers[1]["step"]["phy2log_fingerprint"]


def test_different_loads_in_the_step_move_nothing(workers):
    for r in workers:
        m = r["step_mismatch"]
        assert m["fired"] and m["maps_unchanged"]
        assert m["layer_ok"] == [False, False] and m["moved"] == [False, False]
        assert m["unchanged_shards"] == 3 * 4


def test_different_maps_clear_error_nothing_moved(workers):
    for r in workers:
        m = r["mismatch"]
        assert "processes passed different values to rearrange_expert_weights" in m["host_error"]
        assert "Nothing was moved" in m["host_error"]
        assert m["device_ok_flags"] == [False, False]
        # 3 leaves x 4 local shards, checked after the host error and after the device check.
        assert m["unchanged_shards"] == 2 * 3 * 4
        assert m["after_agreement_exact_shards"] == 3 * 4
    # The warning is logged once, by the process that holds the mesh's first device.
    assert workers[0]["mismatch"]["logged"]


def test_elastic_recovery_across_processes(workers):
    loaded = {tuple(x) for x in workers[0]["elastic"]["loaded"]}
    assert loaded == {tuple(x) for x in workers[1]["elastic"]["loaded"]}
    # Experts 0..5 of both layers lived only on the two lost devices.
    assert loaded == {(layer, e) for layer in range(2) for e in range(6)}
    calls = [{tuple(x) for x in r["elastic"]["calls"]} for r in workers]
    # Each process loaded only what its devices needed; together, every lost expert.
    assert calls[0] | calls[1] == loaded
    for r in workers:
        assert r["elastic"]["new_devices"] == 6
        assert r["elastic"]["shards_checked"] == 3 * 3  # 3 leaves x 3 remaining local devices

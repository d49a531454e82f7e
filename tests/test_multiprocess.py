"""Multi-process: 2 processes x 4 simulated CPU devices on loopback, through `jax.distributed`.

The test starts both processes itself (tests/multiprocess_worker.py) and waits on their progress,
not on a clock: each worker prints a line per scenario step, and a worker is given up on only when
it has printed nothing for NO_PROGRESS_S seconds, scaled by the machine's load (a loaded 2-core
machine runs everything several times slower). Then both workers are asked for their Python stacks
(SIGUSR1), killed, and each worker's last progress line and stderr are printed. When one worker
fails, the other (likely waiting for it in a collective) gets GRACE_S seconds to exit on its own.
The workers check every shard they can address against the numpy model; the assertions here read
what they report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.multiprocess_worker import load_factor

pytestmark = pytest.mark.slow

NO_PROGRESS_S = 150  # the longest quiet stretch (a compilation) takes under 30 s on 2 quiet cores
GRACE_S = 20  # after one worker failed, for the other to fail or finish by itself
STACKS_S = 2  # for the workers asked for their Python stacks to write them
TERMINATE_FLAG = "xla_cpu_collective_call_terminate_timeout_seconds"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The parent's 8-device flag (conftest) must not reach the workers: they have 4 devices each.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
    if not any(TERMINATE_FLAG in f for f in flags):
        # XLA:CPU aborts a collective whose local participants have not all arrived in 40 s; a
        # loaded machine can starve a device thread that long. Scaled like the progress limit.
        flags.append(f"--{TERMINATE_FLAG}={round(40 * load_factor())}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Workers:
    """The worker processes, their stdout (progress lines) and stderr in files under ``out``."""

    WORKER = (sys.executable, "-m", "tests.multiprocess_worker")

    def __init__(self, out, count: int = 2, worker: tuple[str, ...] = WORKER):
        self.out = out
        port = _free_port()
        self.procs = []
        for i in range(count):
            with open(out / f"worker_{i}.out", "w") as so, open(out / f"worker_{i}.err", "w") as se:
                argv = [*worker, str(i), str(port), out]
                self.procs.append(
                    subprocess.Popen(
                        [str(a) for a in argv], cwd=ROOT, env=_child_env(), stdout=so, stderr=se
                    )
                )

    def _text(self, i: int, stream: str) -> str:
        return (self.out / f"worker_{i}.{stream}").read_text(errors="replace")

    def last_progress(self, i: int) -> str:
        lines = [ln for ln in self._text(i, "out").splitlines() if ln.startswith("progress ")]
        return lines[-1] if lines else "(no progress line: still importing or joining the job)"

    def wait(self) -> str | None:
        """Waits while every running worker makes progress; None when all ended, else why not."""
        sizes = [-1] * len(self.procs)
        heard = [time.monotonic()] * len(self.procs)
        failed_at = None
        while True:
            now = time.monotonic()
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return None
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_S:
                return f"a worker failed; the other was still running {GRACE_S} s later"
            limit = NO_PROGRESS_S * load_factor()
            for i in range(len(self.procs)):
                size = os.path.getsize(self.out / f"worker_{i}.out")
                if size != sizes[i]:
                    sizes[i], heard[i] = size, now
                elif codes[i] is None and now - heard[i] > limit:
                    return (
                        f"worker {i} made no progress for {now - heard[i]:.0f} s (limit "
                        f"{NO_PROGRESS_S} s x load factor {limit / NO_PROGRESS_S:.1f})"
                    )
            time.sleep(0.5)

    def stop(self) -> None:
        """Asks running workers for their stacks, then kills them: once every asked worker's
        stderr holds a stack and has stopped growing, or after STACKS_S seconds."""
        running = [i for i, p in enumerate(self.procs) if p.poll() is None]
        for i in running:
            self.procs[i].send_signal(signal.SIGUSR1)
        deadline, texts = time.monotonic() + STACKS_S, None
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            now = [self._text(i, "err") for i in running]
            if now == texts and all("most recent call first" in t for t in now):
                break
            texts = now
        for p in (self.procs[i] for i in running):
            p.kill()
        for p in self.procs:
            p.wait()

    def report(self) -> str:
        def tail(text: str) -> str:
            lines = [ln for ln in text.splitlines() if "[Gloo]" not in ln]
            return "\n".join(lines[-80:])

        return "\n".join(
            f"--- worker {i} (exit {p.returncode}), last: {self.last_progress(i)}; stderr:\n"
            f"{tail(self._text(i, 'err'))}"
            for i, p in enumerate(self.procs)
        )


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    pool = Workers(tmp_path_factory.mktemp("mp"))
    try:
        stalled = pool.wait()
    finally:
        pool.stop()
    if stalled is not None:
        pytest.fail(f"{stalled}; killed the workers\n{pool.report()}")
    if any(p.returncode != 0 for p in pool.procs):
        pytest.fail(f"a worker failed\n{pool.report()}")
    results = []
    for i in range(len(pool.procs)):
        with open(pool.out / f"process_{i}.json") as f:
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


def test_different_options_same_error_on_every_process(workers):
    # num_experts 8 vs 4, then chunk_rows 1 vs 2: caught by the host agreement check, which
    # fingerprints each option and names the one that differs.
    texts = []
    for r in workers:
        m = r["option_mismatch"]
        for name in ("num_experts", "chunk_rows"):
            msg = m["errors"][name]
            assert msg.startswith(f"{name}: the processes passed different values to "), msg
            assert "rearrange_expert_weights" in msg and "Nothing was moved" in msg, msg
        assert m["unchanged_shards"] == 2 * 3 * 4  # two attempts x 3 leaves x 4 local shards
        texts.append(
            {
                k: v.replace(f"process {r['process']} of", "process ? of")
                for k, v in m["errors"].items()
            }
        )
    assert texts[0] == texts[1]  # the same error on both processes


def test_different_layers_per_step_in_the_step_move_nothing(workers):
    # layers_per_step 1 vs 2 under jit: each process compiles its own program; the step's
    # on-device agreement check sees different layer ranges, so neither moves (no hang, no abort).
    for r in workers:
        m = r["step_layers_mismatch"]
        assert m["fired"] == [False, True, False], m
        assert m["layer_ok"] == [[True, True], [False, False], [False, False]], m
        assert m["moved"] == [[False, False]] * 3, m
        assert m["in_progress"] == [False, True, True], m
        assert m["cursor"] == 0 and m["maps_unchanged"], m
        assert m["unchanged_shards"] == 3 * 4


# ------------------------------------------------------- the waiting itself (no jax, a few seconds)

FAKE_WORKER = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR1, all_threads=True)
print("progress 0.0 started", flush=True)
if sys.argv[1] == "0":
    sys.exit(FIRST_EXIT)
print("progress 0.1 about to wait forever", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("first_exit", [0, 3])
def test_a_stalled_worker_is_caught_and_reported(first_exit, tmp_path, monkeypatch):
    """Worker 0 ends (cleanly, or failing); worker 1 stops making progress. The wait gives up on
    it (the no-progress limit, or the grace after a failure), and the report names its last step
    and shows where it waited."""
    monkeypatch.setattr(sys.modules[__name__], "NO_PROGRESS_S", 1)
    monkeypatch.setattr(sys.modules[__name__], "GRACE_S", 1)
    code = FAKE_WORKER.replace("FIRST_EXIT", str(first_exit))
    pool = Workers(tmp_path, worker=(sys.executable, "-c", code))
    try:
        why = pool.wait()
    finally:
        pool.stop()
    if first_exit:
        assert why == "a worker failed; the other was still running 1 s later"
    else:
        assert why.startswith("worker 1 made no progress for "), why
    report = pool.report()
    assert f"--- worker 0 (exit {first_exit}), last: progress 0.0 started" in report
    assert "--- worker 1 (exit -9), last: progress 0.1 about to wait forever" in report
    assert 'File "<string>", line 8 in <module>' in report  # the stack of the stalled worker

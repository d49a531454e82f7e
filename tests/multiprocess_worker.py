"""One process of the multi-process tests: 2 processes x 4 simulated CPU devices on loopback.

Run by tests/test_multiprocess.py as ``python -m tests.multiprocess_worker PROCESS_ID PORT OUT_DIR``
from the repository root. It joins the job through `jax.distributed.initialize`, runs every
scenario on one 8-device mesh spanning both processes, checks every shard it can address against
the numpy model, and writes its findings to ``OUT_DIR/process_<id>.json``. A failed check raises
(the traceback goes to stderr and the exit status is non-zero).

Progress: every scenario step (a plan moved, a step run, a check done) prints one line
``progress <seconds> <what>`` on stdout. The parent waits as long as such lines keep arriving, and
names the last one when it gives up on a worker that stopped making progress.

Every program is waited on (``jax.block_until_ready``) before the next one is dispatched, as a
model's training loop does: XLA:CPU aborts a collective whose participants do not all arrive within
40 s, which a long queue of dispatched collective programs on a loaded machine can exceed.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import time
import traceback

START = time.perf_counter()

NUM_PROCESSES = 2
LOCAL_DEVICES = 4
INIT_TIMEOUT_S = 60  # joining the job on a quiet machine; scaled by `load_factor`


def load_factor() -> float:
    """How much slower than a quiet machine this one is likely to be: the 1-minute load average per
    core, at least 1."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def progress(what: str) -> None:
    """Tells the parent this worker is still getting somewhere (one line on stdout)."""
    print(f"progress {time.perf_counter() - START:.1f} {what}", flush=True)


def main(process_id: int, port: int, out_dir: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=int(INIT_TIMEOUT_S * load_factor()),
    )
    progress("initialized")
    results = {"process": process_id, "collectives": jax.config.jax_cpu_collectives_implementation}
    results["seconds"] = {"initialize": round(time.perf_counter() - START, 1)}
    try:
        run_scenarios(results)
    finally:
        with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
            json.dump(results, f, indent=1)
    progress("results written")
    jax.distributed.shutdown()
    progress("shut down")


# ------------------------------------------------------------------------------------- helpers


def _global(host, mesh, spec):
    import jax
    from jax.sharding import NamedSharding

    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda i: host[i])


def _bytes(x):
    import numpy as np

    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def _slots(shard, p_total: int) -> range:
    """The slot range of a shard of a leaf [L, P, ...] (its index on axis 1)."""
    sl = shard.index[1]
    return range(*sl.indices(p_total))


def check_shards(before, out, old, new, num_devices: int) -> int:
    """Checks every addressable shard of ``out`` against the model; returns the shards checked."""
    import numpy as np

    from tests.transfer_model import allowed_sources

    num_layers, p_total = old.shape
    n = p_total // num_devices
    allowed = allowed_sources(old, new, num_devices)
    b = _bytes(before).reshape(num_layers, p_total, -1)
    checked = 0
    for shard in out.addressable_shards:
        a = _bytes(shard.data).reshape(num_layers, n, -1)
        slots = _slots(shard, p_total)
        assert len(slots) == n, (shard.index, n)
        for layer in range(num_layers):
            for r, p in enumerate(slots):
                ok = any(np.array_equal(a[layer, r], b[layer, q]) for q in allowed[layer][p])
                assert ok, (
                    f"process shard {shard.device}: layer {layer} slot {p}: row is none of the "
                    f"allowed old slots {allowed[layer][p]} (old {old[layer].tolist()}, new "
                    f"{new[layer].tolist()})"
                )
            for r, p in enumerate(slots):
                for q_r, q in enumerate(slots):
                    same = new[layer, p] == new[layer, q] != -1
                    both = new[layer, p] != old[layer, p] and new[layer, q] != old[layer, q]
                    if q > p and same and both:
                        assert np.array_equal(a[layer, r], a[layer, q_r]), (layer, p, q)
        checked += 1
    return checked


def check_unchanged(before, out, p_total: int) -> int:
    """Every addressable shard of ``out`` equals ``before`` bit for bit."""
    import numpy as np

    checked = 0
    for shard in out.addressable_shards:
        want = _bytes(before[:, _slots(shard, p_total).start : _slots(shard, p_total).stop])
        assert np.array_equal(_bytes(shard.data), want), f"shard on {shard.device} changed"
        checked += 1
    return checked


def leaves_for(rng, num_layers, p_total):
    from tests.transfer_model import make_leaves

    return make_leaves(rng, num_layers, p_total, names=("w13", "w2", "q"))


def everyone(values):
    """The same small int array from every process, stacked [processes, ...]."""
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


# ----------------------------------------------------------------------------------- scenarios


def run_scenarios(results: dict) -> None:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jeplb
    from jeplb._src.transfer.agree import _host_fingerprint
    from tests.transfer_model import make_plan

    d = jax.device_count()
    assert d == NUM_PROCESSES * LOCAL_DEVICES, jax.devices()
    assert len(jax.local_devices()) == LOCAL_DEVICES
    mesh = jax.make_mesh((d,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    num_layers, n_local, num_experts = 2, 3, 16
    p_total = d * n_local

    # 1. The rearrangement, concrete maps, several plan kinds: exact on every shard.
    shards = 0
    plans = 0
    for seed, kind in enumerate(("random", "reversal", "hotspot", "empties")):
        old, new = make_plan(kind, seed, num_layers, p_total, num_experts, d)
        host = leaves_for(np.random.default_rng(100 + seed), num_layers, p_total)
        w = {k: _global(v, mesh, P(None, "ep")) for k, v in host.items()}
        out, report = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)
        jax.block_until_ready((out, report))
        assert bool(np.asarray(report.ok).all()), kind
        for k, v in host.items():
            assert out[k].sharding.spec == P(None, "ep")
            shards += check_shards(v, out[k], old, new, d)
        plans += 1
        progress(f"rearrange: concrete {kind} plan checked")
    # 1b. The same under an outer jit with traced maps (global replicated arrays).
    step = jax.jit(lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh))
    for seed, kind in enumerate(("random", "hotspot")):
        old, new = make_plan(kind, 50 + seed, num_layers, p_total, num_experts, d)
        host = leaves_for(np.random.default_rng(200 + seed), num_layers, p_total)
        w = {k: _global(v, mesh, P(None, "ep")) for k, v in host.items()}
        out, report = step(_global(old, mesh, P()), _global(new, mesh, P()), w)
        jax.block_until_ready((out, report))
        assert bool(np.asarray(report.ok).all()), kind
        for k, v in host.items():
            shards += check_shards(v, out[k], old, new, d)
        plans += 1
        progress(f"rearrange: traced {kind} plan checked")
    results["seconds"]["rearrange"] = round(time.perf_counter() - START, 1)
    results["rearrange"] = {"plans": plans, "shards_checked": shards}

    # 2. The policy is deterministic across processes: identical maps from identical loads.
    rng = np.random.default_rng(7)
    load = rng.integers(0, 1000, (4, 16)).astype(np.int32)
    fps = []
    for groups, nodes in ((4, 2), (1, 1), (3, 2)):
        e = 12 if groups == 3 else 16
        maps = jeplb.rebalance_experts(load[:, :e], 24, groups, nodes, 8)
        fps.append(_host_fingerprint({"phy2log": np.asarray(maps[0])}).tolist())
        progress(f"policy: {groups} groups, {nodes} nodes")
    all_fps = everyone(np.asarray(fps, np.int64))
    results["seconds"]["policy"] = round(time.perf_counter() - START, 1)
    results["policy"] = {"fingerprints": fps, "identical": bool((all_fps == all_fps[0]).all())}
    assert results["policy"]["identical"], all_fps

    # 3. The rebalance step with a recorded skewed load: a rebalance fires, every shard exact.
    def fresh_state():
        """The step's initial state, the same global array on every process."""
        state = jeplb.EplbState.create(
            num_layers=num_layers,
            num_experts=num_experts,
            num_devices=d,
            num_redundant_experts=p_total - num_experts,
            window_size=2,
            step_interval=2,
        )
        return jax.tree_util.tree_map(lambda x: _global(np.asarray(x), mesh, P()), state)

    state = fresh_state()
    logical = leaves_for(np.random.default_rng(300), num_layers, num_experts)
    lay = np.arange(num_layers)[:, None]
    p2l = np.asarray(state.phy2log)
    w = {k: _global(v[lay, p2l], mesh, P(None, "ep")) for k, v in logical.items()}
    skew = (1000.0 / np.arange(1, num_experts + 1) ** 2).astype(np.int32)
    counts = np.stack([np.roll(skew, 3 * layer) for layer in range(num_layers)]).astype(np.int32)
    counts_g = _global(counts, mesh, P())
    step_fn = jax.jit(
        lambda s, w, c: jeplb.eplb_step(s.record(c), w, mesh=mesh), donate_argnums=(0, 1)
    )
    fired = False
    balance = []
    for i in range(2):
        state, w, info = step_fn(state, w, counts_g)
        jax.block_until_ready((state, w, info))
        fired |= bool(np.asarray(info.fired))
        balance.append(float(np.asarray(info.balancedness)))
        progress(f"step: step {i} run")
    assert fired, "the rebalance did not fire"
    initial = p2l
    p2l = np.asarray(state.phy2log)
    assert not np.array_equal(p2l, initial), "the placement did not change"
    step_shards = 0
    for k, v in logical.items():
        want = v[lay, p2l]
        for shard in w[k].addressable_shards:
            sl = _slots(shard, p_total)
            assert np.array_equal(_bytes(shard.data), _bytes(want[:, sl.start : sl.stop])), (
                f"step: leaf {k} shard on {shard.device} does not hold phy2log's experts"
            )
            step_shards += 1
    fp = everyone(_host_fingerprint({"phy2log": p2l}))
    progress("step: checked")
    results["seconds"]["step"] = round(time.perf_counter() - START, 1)
    results["step"] = {
        "fired": fired,
        "balancedness": balance,
        "shards_checked": step_shards,
        "maps_identical": bool((fp == fp[0]).all()),
        "phy2log_fingerprint": _host_fingerprint({"phy2log": p2l}).tolist(),
    }
    assert results["step"]["maps_identical"]

    # 3b. Processes that recorded different loads plan different maps: the step's agreement
    # check keeps every device from moving (no hang), the maps and weights stay as they were.
    state = fresh_state()
    p2l0 = np.asarray(state.phy2log)
    w = {k: _global(v[lay, p2l0], mesh, P(None, "ep")) for k, v in logical.items()}
    mine = counts if jax.process_index() == 0 else counts[:, ::-1].copy()
    split_counts = _global(mine, mesh, P())  # "replicated", but each process filled its own
    infos = []
    for i in range(2):
        state, w, info = step_fn(state, w, split_counts)
        jax.block_until_ready((state, w, info))
        infos.append(info)
        progress(f"step with different loads: step {i} run")
    last = infos[-1]
    split_unchanged = 0
    for k, v in logical.items():
        split_unchanged += check_unchanged(v[lay, p2l0], w[k], p_total)
    assert bool(np.asarray(last.fired))
    assert not np.asarray(last.layer_ok).any() and not np.asarray(last.moved).any()
    assert np.array_equal(np.asarray(state.phy2log), p2l0)
    results["seconds"]["step_mismatch"] = round(time.perf_counter() - START, 1)
    results["step_mismatch"] = {
        "fired": bool(np.asarray(last.fired)),
        "layer_ok": np.asarray(last.layer_ok).tolist(),
        "moved": np.asarray(last.moved).tolist(),
        "maps_unchanged": True,
        "unchanged_shards": split_unchanged,
    }

    # 4a. A process with a different (concrete) map: a ValueError on every process, nothing moved.
    old, new = make_plan("random", 77, num_layers, p_total, num_experts, d)
    # Process 1 passes the new map rotated by one slot (a valid plan, but not the others' plan).
    mine = np.roll(new, 1, axis=1) if jax.process_index() == 1 else new.copy()
    host = leaves_for(np.random.default_rng(400), num_layers, p_total)
    w = {k: _global(v, mesh, P(None, "ep")) for k, v in host.items()}
    message = None
    try:
        jeplb.rearrange_expert_weights(old, mine, w, mesh=mesh)
    except ValueError as err:
        message = str(err)
    assert message is not None and "different values" in message, message
    unchanged = sum(check_unchanged(v, w[k], p_total) for k, v in host.items())
    progress("mismatch: concrete maps refused")
    # 4b. Traced maps that differ between processes: the on-device check, no hang, nothing moved.
    mine_g = _global(mine, mesh, P())  # each process fills its own devices with its own map
    logger = logging.getLogger("jeplb")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    w = {k: _global(v, mesh, P(None, "ep")) for k, v in host.items()}
    out, report = step(_global(old, mesh, P()), mine_g, w)
    jax.block_until_ready(out)
    jax.effects_barrier()
    logger.removeHandler(handler)
    ok = np.asarray(report.ok)
    assert not ok.any(), ok
    unchanged += sum(check_unchanged(v, out[k], p_total) for k, v in host.items())
    progress("mismatch: traced maps refused on device")
    # 4c. The same maps again on every process: the program (same compilation) moves them.
    out, report = step(_global(old, mesh, P()), _global(new, mesh, P()), out)
    jax.block_until_ready((out, report))
    assert bool(np.asarray(report.ok).all())
    exact = sum(check_shards(v, out[k], old, new, d) for k, v in host.items())
    progress("mismatch: agreed maps moved")
    results["seconds"]["mismatch"] = round(time.perf_counter() - START, 1)
    results["mismatch"] = {
        "host_error": message,
        "device_ok_flags": ok.tolist(),
        "unchanged_shards": unchanged,
        "logged": any("differ between devices" in m for m in seen),
        "after_agreement_exact_shards": exact,
    }

    # 5. Elastic recovery across processes (one device lost in each).
    run_elastic(results, mesh, logical, num_layers, num_experts)
    results["seconds"]["elastic"] = round(time.perf_counter() - START, 1)

    # 6. Processes that pass different options: concrete calls, and the step under jit.
    run_option_mismatch(results, mesh, num_layers)
    results["seconds"]["option_mismatch"] = round(time.perf_counter() - START, 1)
    run_step_layers_mismatch(results, mesh, logical, num_layers, num_experts)
    results["seconds"]["step_layers_mismatch"] = round(time.perf_counter() - START, 1)


def run_elastic(results: dict, mesh, logical, num_layers: int, num_experts: int) -> None:
    """Lose device 3 (process 0) and device 6 (process 1), which hold the only copies of experts
    0..5; recover onto the 6 that remain (both processes). Every shard is checked; each process
    loads only lost experts that land on its own devices."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jeplb

    d, n_local = 8, 3
    p_total = d * n_local
    rng = np.random.default_rng(500)
    old = rng.integers(6, num_experts, (num_layers, p_total)).astype(np.int32)
    old[:, 9:12] = [0, 1, 2]
    old[:, 18:21] = [3, 4, 5]
    free = [p for p in range(p_total) if not (9 <= p < 12 or 18 <= p < 21)]
    old[:, free[: num_experts - 6]] = np.arange(6, num_experts)
    lay = np.arange(num_layers)[:, None]
    w = {k: _global(v[lay, old], mesh, P(None, "ep")) for k, v in logical.items()}
    lost = (3, 6)
    devices = list(mesh.devices.flat)
    new_mesh = jax.sharding.Mesh(
        np.array([x for i, x in enumerate(devices) if i not in lost]),
        ("ep",),
        axis_types=(jax.sharding.AxisType.Auto,),
    )
    calls = []

    def loader(layer, expert):
        calls.append((layer, expert))
        return {k: np.array(v[layer, expert]) for k, v in logical.items()}

    progress("elastic: weights placed")
    out, rec = jeplb.recover_experts(
        old, w, loader, mesh=new_mesh, num_experts=num_experts, lost_devices=lost
    )
    jax.block_until_ready(out)
    progress("elastic: recovered")
    p2l = np.asarray(rec.phy2log)
    shards = 0
    for k, v in logical.items():
        want = v[lay, p2l]
        for shard in out[k].addressable_shards:
            sl = _slots(shard, p2l.shape[1])
            assert np.array_equal(_bytes(shard.data), _bytes(want[:, sl.start : sl.stop])), (
                f"elastic: leaf {k} shard on {shard.device} does not hold its experts"
            )
            shards += 1
    assert len(set(calls)) == len(calls), "an expert was loaded twice by one process"
    assert set(calls) <= set(rec.loaded)
    results["elastic"] = {
        "loaded": [list(x) for x in rec.loaded],
        "calls": [list(x) for x in calls],
        "shards_checked": shards,
        "new_devices": new_mesh.size,
    }


def run_option_mismatch(results: dict, mesh, num_layers: int) -> None:
    """rearrange_expert_weights with num_experts 8 vs 4, then chunk_rows 1 vs 2, on the two
    processes (maps and weights identical, ids below 4 so both num_experts are valid alone): the
    same ValueError on every process, nothing moved, no hang."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jeplb
    from tests.transfer_model import make_plan

    first = jax.process_index() == 0
    d = mesh.size
    p_total = d * 3
    old, new = make_plan("random", 88, num_layers, p_total, 4, d)
    host = leaves_for(np.random.default_rng(600), num_layers, p_total)
    errors, unchanged = {}, 0
    for name, value in (("num_experts", 8 if first else 4), ("chunk_rows", 1 if first else 2)):
        w = {k: _global(v, mesh, P(None, "ep")) for k, v in host.items()}
        message = None
        try:
            jeplb.rearrange_expert_weights(old, new, w, mesh=mesh, **{name: value})
        except ValueError as err:
            message = str(err)
        assert message is not None, f"{name}: different values on the processes were accepted"
        unchanged += sum(check_unchanged(v, w[k], p_total) for k, v in host.items())
        errors[name] = message
        progress(f"option mismatch: different {name} refused")
    results["option_mismatch"] = {"errors": errors, "unchanged_shards": unchanged}


def run_step_layers_mismatch(results: dict, mesh, logical, num_layers: int, num_experts: int):
    """eplb_step under jit with layers_per_step 1 on process 0 and 2 (= L) on process 1: each
    process compiles its own program; the step's on-device agreement (the moved layer range is
    fingerprinted) must keep both from moving, without a hang."""
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jeplb

    d = mesh.size
    p_total = d * 3
    state = jeplb.EplbState.create(
        num_layers=num_layers,
        num_experts=num_experts,
        num_devices=d,
        num_redundant_experts=p_total - num_experts,
        window_size=2,
        step_interval=2,
        layers_per_step=1 if jax.process_index() == 0 else num_layers,
    )
    state = jax.tree_util.tree_map(lambda x: _global(np.asarray(x), mesh, P()), state)
    lay = np.arange(num_layers)[:, None]
    p2l0 = np.asarray(state.phy2log)
    w = {k: _global(v[lay, p2l0], mesh, P(None, "ep")) for k, v in logical.items()}
    skew = (1000.0 / np.arange(1, num_experts + 1) ** 2).astype(np.int32)
    counts = np.stack([np.roll(skew, 3 * layer) for layer in range(num_layers)]).astype(np.int32)
    counts_g = _global(counts, mesh, P())
    step_fn = jax.jit(
        lambda s, w, c: jeplb.eplb_step(s.record(c), w, mesh=mesh), donate_argnums=(0, 1)
    )
    infos = []
    for i in range(3):
        state, w, info = step_fn(state, w, counts_g)
        jax.block_until_ready((state, w, info))
        infos.append(jax.tree_util.tree_map(np.asarray, info))
        progress(f"step with different layers_per_step: step {i} run")
    unchanged = sum(check_unchanged(v[lay, p2l0], w[k], p_total) for k, v in logical.items())
    results["step_layers_mismatch"] = {
        "fired": [bool(x.fired) for x in infos],
        "layer_ok": [x.layer_ok.tolist() for x in infos],
        "moved": [x.moved.tolist() for x in infos],
        "in_progress": [bool(x.in_progress) for x in infos],
        "maps_unchanged": bool(np.array_equal(np.asarray(state.phy2log), p2l0)),
        "cursor": int(np.asarray(state.cursor)),
        "unchanged_shards": unchanged,
    }


if __name__ == "__main__":
    # The parent sends SIGUSR1 before it kills a worker that stopped making progress: every
    # thread's Python stack goes to stderr, to show where it waited.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    try:
        main(pid, port, out)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)

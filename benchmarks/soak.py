"""Soak: many consecutive rebalances on one mesh, every expert verified after every one.

Usage (from the repository root):
    python benchmarks/soak.py [--rebalances N] [--seed S] [--json PATH] [--out PATH]

Without an accelerator it simulates 8 CPU devices. Each rebalance is one of:

* random: a random plan (a new random placement, a 10% drift, a reversal, a rotation by one
  device, a placement with empty slots, or no change) through one compiled
  `jeplb.rearrange_expert_weights` (maps traced under an outer jit, weights donated);
* policy: `jeplb.rebalance_experts` on a freshly drawn skewed load, migration-aware against the
  current placement, and the move, in one compiled program;
* fault: an infeasible plan (an expert id that no slot holds, or an id below -1) through the same
  compiled program: nothing may move, ``report.ok`` must be False.

After every rebalance a checksum of every slot's bytes (all leaves) is computed on device and
compared on the host with the checksum of the logical expert the map says the slot holds: nothing
lost (every expert present, every replica intact), nothing mixed up. Every 50 rebalances the full
weights are also compared byte for byte. Memory: the live jax arrays (count and bytes) and, where the
backend reports them, device memory stats, after every rebalance. Compilation: each jitted program's
trace count and cache size. Results (markdown with the command) go to
benchmarks/results/soak_<platform>.md unless --out says otherwise.

Each rebalance is waited on (``jax.block_until_ready``) before the next is dispatched, as a model's
training loop is (it reads the step's loss or metrics). Without a host sync, hundreds of dispatched
collective programs queue up, and XLA:CPU aborts a collective whose participants have not all
arrived within 40 s (plain JAX programs too): that is the runtime's limit, not a transfer fault.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

L, E, D, N_LOCAL = 3, 16, 8, 3
PT = D * N_LOCAL
KINDS = ("random", "drift", "reversal", "rotate", "empties", "noop")


def _placement(rng, p_total: int, empty: float = 0.0) -> np.ndarray:
    extra = rng.integers(0, E, p_total - E)
    extra = np.where(rng.random(p_total - E) < empty, -1, extra)
    return rng.permutation(np.concatenate([np.arange(E), extra])).astype(np.int32)


def random_plan(kind: str, rng, current: np.ndarray) -> np.ndarray:
    """A new map [L, P] whose experts are all held somewhere in ``current``."""
    if kind == "random":
        return np.stack([_placement(rng, PT) for _ in range(L)])
    if kind == "empties":
        return np.stack([_placement(rng, PT, 0.4) for _ in range(L)])
    if kind == "drift":
        new = current.copy()
        for layer in range(L):
            held = current[layer][current[layer] >= 0]
            slots = rng.choice(PT, max(1, PT // 10), replace=False)
            new[layer, slots] = rng.choice(held, len(slots))
            missing = sorted(set(range(E)) - set(new[layer].tolist()))
            if missing:  # the drift must not drop an expert's last copy
                return random_plan("random", rng, current)
        return new
    if kind == "reversal":
        return current[:, ::-1].copy()
    if kind == "rotate":
        return np.roll(current, N_LOCAL, axis=1)
    return current.copy()


def logical_weights(seed: int) -> dict[str, np.ndarray]:
    """Random bytes per (layer, logical expert) in several dtypes (NaN payloads included)."""
    rng = np.random.default_rng(seed)

    def rand(shape, dtype):
        raw = rng.integers(0, 256, (*shape, np.dtype(dtype).itemsize), dtype=np.uint8)
        return raw.view(dtype).reshape(shape)

    return {
        "w13": rand((L, E, 2, 8), jnp.bfloat16),
        "w2": rand((L, E, 8), np.float32),
        "q": rand((L, E, 16), np.int8),
        "fp8": rand((L, E, 8), jnp.float8_e4m3fn),
        "scale": rand((L, E, 1), np.float32),
    }


def _row_hash(x: jax.Array) -> jax.Array:
    """uint32[L, X]: a position-weighted hash of each row's bytes (x is [L, X, ...])."""
    b = x if x.dtype.itemsize == 1 else lax.bitcast_convert_type(x, jnp.uint8)
    b = lax.bitcast_convert_type(b, jnp.uint8) if b.dtype != jnp.uint8 else b
    b = b.reshape(x.shape[0], x.shape[1], -1).astype(jnp.uint32)
    pos = jnp.arange(b.shape[-1], dtype=jnp.uint32)
    w = pos * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)
    h = jnp.sum((b + jnp.uint32(1)) * w, axis=-1, dtype=jnp.uint32)
    h = h ^ (h >> 15)
    return h * jnp.uint32(0x2C1B3C6D)


@jax.jit
def checksums(leaves: dict[str, jax.Array]) -> jax.Array:
    """uint32[L, X]: one checksum per row over every leaf."""
    acc = None
    for k in sorted(leaves):
        h = _row_hash(leaves[k])
        acc = h if acc is None else (acc * jnp.uint32(0x01000193)) ^ h
    return acc


def _live() -> tuple[int, int]:
    # Arrays freed by the cycle collector at some random later point would blur the count. `run`
    # freezes the heap that existed before it, so this collection scans only the soak's own objects
    # (a full collection of a large process, a test suite's, takes seconds).
    gc.collect()
    arrays = jax.live_arrays()
    return len(arrays), int(sum(a.nbytes for a in arrays))


def _device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("bytes_in_use", 0))


def run(
    num_rebalances: int = 1000, seed: int = 0, *, fused_policy: bool = True, verbose: bool = False
) -> dict:
    """Runs the soak; raises AssertionError at the first lost or mixed-up expert.

    Args:
      num_rebalances: rebalances to run.
      seed: seeds plans, loads and weights.
      fused_policy: policy-driven rebalances run the migration-aware policy and the move in one
        compiled program (as a model's step does); False runs the from-scratch policy on its own
        and feeds its map to the compiled move (cheaper to compile, for the test suite).
      verbose: progress on stderr.

    Returns:
      The figures (see `render_md`).
    """
    gc.collect()
    gc.freeze()  # see `_live`
    try:
        return _run(num_rebalances, seed, fused_policy=fused_policy, verbose=verbose)
    finally:
        gc.unfreeze()


def _run(num_rebalances: int, seed: int, *, fused_policy: bool, verbose: bool) -> dict:
    import jeplb
    from jeplb._src.policy import api as _policy

    devices = jax.devices()[:D]
    assert len(devices) == D, f"needs {D} devices, found {len(jax.devices())}"
    mesh = jax.sharding.Mesh(np.array(devices), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P(None, "ep"))
    rng = np.random.default_rng(seed)
    logical = logical_weights(seed + 1)
    logical_sum = np.asarray(checksums({k: jnp.asarray(v) for k, v in logical.items()}))
    for layer in range(L):
        assert len(set(logical_sum[layer].tolist())) == E, "logical checksums must be distinct"
    current = np.stack([_placement(rng, PT) for _ in range(L)])
    lay = np.arange(L)[:, None]
    weights = {k: jax.device_put(v[lay, current], sharding) for k, v in logical.items()}

    traces = {"move": 0, "policy": 0}

    def move(old, new, w):
        traces["move"] += 1
        return jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)

    def policy_move(load, old, w):
        traces["policy"] += 1
        new, _, _ = jeplb.rebalance_experts(load, PT, 4, 2, D, old_phy2log=old)
        w, report = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)
        return new, w, report

    move_jit = jax.jit(move, donate_argnums=(2,))
    policy_jit = jax.jit(policy_move, donate_argnums=(2,))
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("jeplb").addHandler(handler)
    logging.getLogger("jeplb").propagate = False

    policy_traces_before = _policy._rebalance_jit._cache_size()
    counts = {"random": 0, "policy": 0, "fault": 0}
    kinds: dict[str, int] = {}
    live_count, live_bytes, dev_mem = [], [], []
    remote_rows = 0
    full_checks = 0
    start = time.perf_counter()
    for i in range(num_rebalances):
        if i % 10 == 9:
            kind = "fault"
            bad = current.copy()
            layer, p = int(rng.integers(L)), int(rng.integers(PT))
            bad[layer, p] = E + int(rng.integers(0, 1000)) if rng.random() < 0.5 else -2
            weights, report = move_jit(current, bad, weights)
            jax.block_until_ready((weights, report))  # one rebalance at a time, as in a model loop
            assert not bool(np.asarray(report.ok).all()), f"rebalance {i}: fault not detected"
        elif i % 3 == 2:
            kind = "policy"
            skew = rng.zipf(1.5, (L, E)).clip(0, 10_000).astype(np.int32)
            if fused_policy:
                new, weights, report = policy_jit(skew, current, weights)
            else:
                new = np.array(jeplb.rebalance_experts(skew, PT, 4, 2, D)[0])  # a copy
                weights, report = move_jit(current, new, weights)
            jax.block_until_ready((weights, report))
            assert bool(np.asarray(report.ok).all()), f"rebalance {i}: policy plan refused"
            current = np.array(new)  # a copy: a view would keep the device array alive
            del new  # the device copy of the map goes now, not at the next random plan
        else:
            kind = KINDS[int(rng.integers(len(KINDS)))]
            new = random_plan(kind, rng, current)
            weights, report = move_jit(current, new, weights)
            jax.block_until_ready((weights, report))
            assert bool(np.asarray(report.ok).all()), f"rebalance {i} ({kind}): plan refused"
            current = new
            kinds[kind] = kinds.get(kind, 0) + 1
        counts["random" if kind in KINDS else kind] += 1
        remote_rows += int(np.asarray(report.remote_rows).sum())
        del report

        # Nothing lost, nothing mixed up: every slot holds its expert's bytes, every expert is held.
        got = np.asarray(checksums(weights))
        filled = current >= 0
        want = logical_sum[lay, np.maximum(current, 0)]
        bad_slots = np.argwhere(filled & (got != want))
        assert bad_slots.size == 0, (
            f"rebalance {i} ({kind}): slots {bad_slots[:5].tolist()} do not hold their expert"
        )
        for layer in range(L):
            held = set(current[layer][current[layer] >= 0].tolist())
            assert held == set(range(E)), f"rebalance {i}: layer {layer} lost an expert"
        # Memory before the full check below (which makes host copies of every shard).
        n, b = _live()
        live_count.append(n)
        live_bytes.append(b)
        mem = _device_memory()
        if mem is not None:
            dev_mem.append(mem)
        if i % 50 == 49 or i == num_rebalances - 1:
            for k, v in logical.items():
                have = np.asarray(weights[k]).view(np.uint8).reshape(L, PT, -1)
                want_rows = v[lay, np.maximum(current, 0)].view(np.uint8).reshape(L, PT, -1)
                assert np.array_equal(have[filled], want_rows[filled]), (
                    f"rebalance {i}: leaf {k} differs"
                )
            full_checks += 1
        if verbose and (i + 1) % 100 == 0:
            print(f"{i + 1} rebalances, live arrays {n} ({b} bytes)", file=sys.stderr)
    elapsed = time.perf_counter() - start
    logging.getLogger("jeplb").removeHandler(handler)
    logging.getLogger("jeplb").propagate = True

    traces["policy_eager"] = _policy._rebalance_jit._cache_size() - policy_traces_before
    warm = min(10, len(live_count) - 1)
    cache = {
        "move": getattr(move_jit, "_cache_size", lambda: None)(),
        "policy": getattr(policy_jit, "_cache_size", lambda: None)(),
    }
    return {
        "platform": jax.default_backend(),
        "devices": D,
        "jax": jax.__version__,
        "shape": {"L": L, "E": E, "P": PT, "D": D, "N_local": N_LOCAL},
        "leaves": {k: f"{v.dtype}{list(v.shape[2:])}" for k, v in logical.items()},
        "rebalances": num_rebalances,
        "policy": "migration-aware, fused with the move" if fused_policy else "from scratch",
        "by_kind": {**counts, "random_kinds": dict(sorted(kinds.items()))},
        "faults_injected": counts["fault"],
        "faults_logged": sum("infeasible" in w for w in warnings),
        "remote_rows_moved": remote_rows,
        "checksum_checks": num_rebalances,
        "full_byte_checks": full_checks,
        "slots_verified": num_rebalances * L * PT,
        "data_lost": 0,
        "traces": traces,
        "cache_size": cache,
        "live_arrays": {
            "first": live_count[0],
            "after_warmup_min": min(live_count[warm:]),
            "after_warmup_max": max(live_count[warm:]),
            "last": live_count[-1],
        },
        "live_bytes": {
            "first": live_bytes[0],
            "after_warmup_min": min(live_bytes[warm:]),
            "after_warmup_max": max(live_bytes[warm:]),
            "last": live_bytes[-1],
        },
        "device_memory_bytes_in_use": (
            {"min": min(dev_mem[warm:]), "max": max(dev_mem[warm:])} if dev_mem else None
        ),
        "seconds": round(elapsed, 1),
    }


def render_md(result: dict, command: str) -> str:
    r = result
    live, live_b = r["live_arrays"], r["live_bytes"]
    mem = r["device_memory_bytes_in_use"]
    mem_line = (
        f"device memory in use {mem['min']} .. {mem['max']} bytes after warm-up"
        if mem
        else "device memory stats: not reported by this backend (live arrays used instead)"
    )
    lines = [
        f"# Soak: {r['rebalances']} consecutive rebalances ({r['platform']}, {r['devices']} "
        f"devices, jax {r['jax']})",
        "",
        f"Command: `{command}`",
        "",
        f"Shape: L = {r['shape']['L']}, E = {r['shape']['E']}, P = {r['shape']['P']}, "
        f"D = {r['shape']['D']} (N_local = {r['shape']['N_local']}); leaves "
        + ", ".join(f"{k} {v}" for k, v in r["leaves"].items())
        + " (random bytes, NaN payloads included).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| rebalances survived | {r['rebalances']} |",
        f"| random plans | {r['by_kind']['random']} "
        f"({', '.join(f'{k} {v}' for k, v in r['by_kind']['random_kinds'].items())}) |",
        f"| policy-driven ({r['policy']}) | {r['by_kind']['policy']} |",
        f"| faults injected (infeasible plans) | {r['faults_injected']}, all refused with "
        f"weights untouched, {r['faults_logged']} logged |",
        f"| rows received from other devices | {r['remote_rows_moved']} |",
        f"| per-slot checksum checks | {r['checksum_checks']} ({r['slots_verified']} slots) |",
        f"| full byte-for-byte checks | {r['full_byte_checks']} |",
        f"| data lost or mixed up | {r['data_lost']} |",
        f"| traces (move program, fused policy program, policy function) | {r['traces']['move']}, "
        f"{r['traces']['policy']}, {r['traces']['policy_eager']} |",
        f"| jit cache size (move, policy) | {r['cache_size']['move']}, "
        f"{r['cache_size']['policy']} |",
        f"| live jax arrays: first, after warm-up min..max, last | {live['first']}, "
        f"{live['after_warmup_min']}..{live['after_warmup_max']}, {live['last']} |",
        f"| live bytes: first, after warm-up min..max, last | {live_b['first']}, "
        f"{live_b['after_warmup_min']}..{live_b['after_warmup_max']}, {live_b['last']} |",
        f"| memory | {mem_line} |",
        f"| wall time (information only) | {r['seconds']} s |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/soak.py", description=__doc__)
    parser.add_argument("--rebalances", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument(
        "--out", help="markdown results (default benchmarks/results/soak_<platform>.md)"
    )
    args = parser.parse_args(argv)
    if args.rebalances < 1:
        parser.error("--rebalances: expected a positive int")
    result = run(args.rebalances, args.seed, verbose=True)
    command = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    from jeplb.tools.benchio import results_path

    out = args.out or results_path(f"soak_{result['platform']}.md")
    with open(out, "w") as f:
        f.write(render_md(result, command.strip()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", D)  # before any backend starts; CPU only
    raise SystemExit(main())

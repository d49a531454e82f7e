"""The serving loop's EPLB cost on 8 CPU devices: idle steps and compile time across buckets.

Cases, all on the serving example (jeplb/examples/serving.py: per-layer weights, batch buckets):

* decode step without EPLB: the same forward with a fixed slot per expert (no dispatch, no
  recording, no end_pass);
* serving loop, idle step: the forward with `jeplb.dispatch` + `jeplb.end_pass`, then the host
  schedule's check (`HostSchedule.tick` / `take_layers`): no EPLB program runs;
* separate idle eplb_step: the forward with recording, then `jeplb.eplb_step` on the per-layer
  weights as its own jitted call (a program that runs every step, doing nothing when nothing is due).

Each step pads the batch to its bucket, runs the forward and reads the outputs back (what
sampling does), so every case syncs once per step. Medians over interleaved steps. Compile
times: the forward per bucket with the split EPLB and with `eplb_step` inside it, and the
rebalance programs (`plan_rebalance`, `move_layer`), compiled once for every bucket.

Run: ``python benchmarks/bench_serving.py [--steps 60] [--out benchmarks/results/serving_cpu.md]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

import jeplb
from jeplb.examples import serving
from jeplb.tools import benchio


@dataclasses.dataclass
class Row:
    case: str
    bucket: int
    median_us: float
    min_us: float
    vs_plain: str


@dataclasses.dataclass
class CompileRow:
    program: str
    buckets: str
    compiles: int
    seconds: float


def _plain_forward(cfg, first_slot):
    """The forward with a fixed slot per expert (no EPLB): first_slot int32[L, E] constant."""

    def run(routers, weights, x):
        for layer, (router, w) in enumerate(zip(routers, weights, strict=True)):
            probs = jax.nn.softmax(x @ router, axis=-1)
            gate, ids = jax.lax.top_k(probs, cfg.top_k)
            slots = jnp.asarray(first_slot[layer])[ids]
            y = serving._expert(x, w["w13"][slots], w["w2"][slots], cfg.split_w13)
            x = x + jeplb.combine_topk(y, gate)
        return x

    return jax.jit(run)


def _pad(cfg, x):
    bucket = cfg.bucket(x.shape[0])
    padded = np.zeros((bucket, cfg.d_model), np.float32)
    padded[: x.shape[0]] = x
    return padded, np.arange(bucket) < x.shape[0]


def _compile_seconds(fn, *args) -> float:
    t = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=benchio.results_path("serving_cpu.md"))
    args = ap.parse_args(argv)
    cfg = serving.ServingConfig(
        num_layers=8, num_experts=16, num_redundant_experts=8, d_model=32, d_ff=64,
        buckets=(8, 16, 32),
    )  # fmt: skip
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    sizes = dict(
        num_layers=cfg.num_layers, num_experts=cfg.num_experts, num_devices=8,
        num_redundant_experts=cfg.num_redundant_experts, window_size=1000, axis_name="model",
    )  # fmt: skip
    idle = jeplb.EplbState.create(step_interval=10**9, **sizes)
    loop = serving.ServingLoop(cfg, idle, mesh)
    plain = _plain_forward(cfg, np.asarray(idle.log2phy[:, :, 0]))
    # A state of its own (a replicated copy of ``idle`` may share its device-0 buffer with the
    # loop's, which the loop's forward donates).
    old_state = jeplb.EplbState.create(step_interval=10**9, **sizes).replicated(mesh)
    old_weights = [jax.tree_util.tree_map(jnp.copy, w) for w in loop.weights]
    separate = jax.jit(functools.partial(jeplb.eplb_step, mesh=mesh), donate_argnums=(0, 1))
    rng = np.random.default_rng(0)

    def run_plain(x):
        xp, _ = _pad(cfg, x)
        return np.asarray(plain(loop.routers, loop.weights, xp))

    def run_loop(x):
        return loop.step(x)

    alone = {b: [] for b in cfg.buckets}  # the separate eplb_step call by itself

    def run_separate(x):
        nonlocal old_state, old_weights
        xp, valid = _pad(cfg, x)
        old_state, y = loop.forward(old_state, loop.routers, old_weights, xp, valid)
        y = np.asarray(y)
        t = time.perf_counter()
        old_state, old_weights, _ = separate(old_state, old_weights)
        jax.block_until_ready(old_state)
        alone[xp.shape[0]].append(time.perf_counter() - t)
        return y

    cases = {
        "decode step without EPLB": run_plain,
        "serving loop, idle step (record + host check)": run_loop,
        "record + separate idle eplb_step call": run_separate,
    }
    rows = []
    for bucket in cfg.buckets:
        tokens = bucket - 1  # one padded token
        times = {name: [] for name in cases}
        for i in range(args.steps + 3):
            x = rng.standard_normal((tokens, cfg.d_model)).astype(np.float32)
            for name, fn in cases.items():
                t = time.perf_counter()
                fn(x)
                if i >= 3:
                    times[name].append(time.perf_counter() - t)
        base = float(np.median(times["decode step without EPLB"]))
        for name, ts in times.items():
            med = float(np.median(ts))
            rows.append(Row(name, bucket, med * 1e6, float(np.min(ts)) * 1e6, f"{med / base:.2f}x"))
        sep = alone[bucket][3:]
        rows.append(
            Row("of which the separate eplb_step call alone", bucket, float(np.median(sep)) * 1e6,
                float(np.min(sep)) * 1e6, f"{np.median(sep) / base:.2f}x")
        )  # fmt: skip
    assert all(not e["ran"] for e in loop.log), "an EPLB program ran on an idle step"
    mirror = jeplb.HostSchedule.from_state(loop.state)
    t = time.perf_counter()
    for _ in range(100_000):
        mirror.tick()
        mirror.take_layers()
    host_us = (time.perf_counter() - t) / 100_000 * 1e6

    # Compile times across buckets.
    state = jeplb.EplbState.create(step_interval=4, layers_per_step=2, **sizes).replicated(mesh)
    weights = loop.weights
    routers = loop.routers
    split_forward = jax.jit(
        lambda s, r, w, x, v: serving.forward(s, r, w, x, v, top_k=cfg.top_k, split_w13=False)
    )

    def inside(s, r, w, x, v):
        s, y = serving.forward(s, r, w, x, v, top_k=cfg.top_k, split_w13=False)
        s, w, _ = jeplb.eplb_step(s, w, mesh=mesh)
        return s, w, y

    inside_forward = jax.jit(inside)
    compile_rows = []
    for name, fn in (("forward + end_pass (split EPLB)", split_forward),
                     ("forward + eplb_step inside", inside_forward)):  # fmt: skip
        secs = []
        for bucket in cfg.buckets:
            xp, valid = _pad(cfg, np.zeros((bucket, cfg.d_model), np.float32))
            secs.append(_compile_seconds(fn, state, routers, weights, xp, valid))
        for bucket, s in zip(cfg.buckets, secs, strict=True):
            compile_rows.append(CompileRow(name, str(bucket), 1, s))
    plan = jax.jit(jeplb.plan_rebalance)
    compile_rows.append(CompileRow("plan_rebalance", "all", 1, _compile_seconds(plan, state)))
    ones = jnp.ones((cfg.num_layers, cfg.num_experts), jnp.int32)
    with_load = jeplb.end_pass(state.record(ones)).replace(step=jnp.int32(4))
    planned, info = plan(with_load)
    assert bool(info.fired)
    t = time.perf_counter()
    planned, w0, _ = jeplb.move_layer(planned, 0, weights[0], mesh=mesh)
    jax.block_until_ready(w0)
    first = time.perf_counter() - t
    compile_rows.append(CompileRow("move_layer (first call, compile + run)", "all", 1, first))
    moves = []
    for layer in range(1, cfg.num_layers):
        t = time.perf_counter()
        planned, w, _ = jeplb.move_layer(planned, layer, weights[layer], mesh=mesh)
        jax.block_until_ready(w)
        moves.append(time.perf_counter() - t)
    plans = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(plan(with_load))
        plans.append(time.perf_counter() - t)

    load = os.getloadavg()
    head = (
        f"# The serving loop's EPLB on 8 CPU devices (jax {jax.__version__})\n\n"
        f"Command: `PYTHONPATH=$PWD python benchmarks/bench_serving.py --steps {args.steps}`\n\n"
        f"The serving example (jeplb/examples/serving.py) at L = {cfg.num_layers}, "
        f"E = {cfg.num_experts}, P = {cfg.num_experts + cfg.num_redundant_experts}, "
        f"H = {cfg.d_model}, F = {cfg.d_ff}, top-{cfg.top_k}, float32, per-layer weights "
        f"w13 (P, H, 2F) and w2 (P, F, H) sharded over 'model' (8 devices), W = 1000. Each step "
        f"pads a batch of bucket - 1 tokens to its bucket, runs the forward and reads its "
        f"outputs back. Medians of {args.steps} interleaved steps after 3 warm-up steps. "
        f"No EPLB program ran on any idle step of the serving loop (checked). Load average at "
        f"the end: {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on {os.cpu_count()} CPUs.\n\n"
    )
    text = head + benchio.table(rows, "Per decode step", float_format="{:.0f}")
    text += "\n" + benchio.table(compile_rows, "Compile time (seconds)", float_format="{:.2f}")
    text += (
        f"\nThe serving loop's host check on an idle step (`HostSchedule.tick` + `take_layers`): "
        f"{host_us:.2f} us (mean of 10^5). The forward's recording (`dispatch` per layer + "
        f"`end_pass`) is the difference between the first two rows of a bucket.\n"
    )
    text += (
        f"\nA due rebalance, run between decode steps: `plan_rebalance` "
        f"{np.median(plans) * 1e3:.1f} ms (median of 5), `move_layer` "
        f"{np.median(moves) * 1e3:.1f} ms per layer (median of {len(moves)}).\n"
    )
    benchio.write_results(text, args.out)
    print(text)


if __name__ == "__main__":
    sys.exit(main())

"""`jeplb demo`: the example MoE model on a skewed, drifting router, rebalanced progressively.

It builds `jeplb.examples.MoETransformer` over every device of the chosen platform (8 simulated
CPU devices when there is no accelerator), runs it on a `jeplb.examples.DriftingZipf` workload
with `jeplb.eplb_step` in the same jitted step, and reports what the rebalances did: balancedness
and the device loads before and after (per layer, summed, as the table says; the plot's bars are
each device's load over all layers), experts and bytes moved, the cost of the steps
that moved weights, and whether the model's outputs stayed bitwise identical (a fixed probe batch
is run after every step and compared with the first run of it).

``jeplb demo --train`` trains the same model with optax Adam instead (`jeplb.examples.training`):
with EPLB (replica gradients summed by `jeplb.sync_replica_grads`, weights and Adam moments moved
together) and without redundant experts, from the same initialisation and data, and reports both
loss curves, whether the replicas stayed bitwise identical, and each layer's max device load,
summed over layers.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = ["add_arguments", "run", "run_train"]

_DTYPES = ("float32", "bfloat16")


def positive_int(text: str) -> int:
    """argparse type: a positive integer, with a message naming what arrived."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_device_flags(parser) -> None:
    """--platform and --cpu-devices, read by `setup_devices` (the demo and the step benchmark)."""
    parser.add_argument(
        "--platform",
        choices=("auto", "cpu", "gpu", "tpu"),
        default="auto",
        help="where to run; auto takes the accelerator when it has at least 2 devices, else "
        "simulated CPU devices (default: %(default)s)",
    )
    parser.add_argument(
        "--cpu-devices",
        type=positive_int,
        default=8,
        help="simulated CPU devices when running on the CPU (default: %(default)s)",
    )


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _exponent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 10.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 10], got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the demo's flags to ``p`` (every flag has a help text and a default)."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--layers", type=positive_int, default=4, help="MoE layers L (default: %(default)s)"
    )
    g.add_argument(
        "--experts",
        type=positive_int,
        default=16,
        help="logical experts per layer E (default: %(default)s)",
    )
    g.add_argument(
        "--redundant",
        type=_non_negative,
        default=8,
        help="redundant replica slots per layer; P = E + this must be divisible by the device "
        "count (default: %(default)s)",
    )
    g.add_argument(
        "--top-k", type=positive_int, default=2, help="experts per token K (default: %(default)s)"
    )
    g.add_argument(
        "--d-model", type=positive_int, default=64, help="model width H (default: %(default)s)"
    )
    g.add_argument(
        "--d-ff",
        type=positive_int,
        default=128,
        help="hidden width F of one expert (default: %(default)s)",
    )
    g.add_argument(
        "--dtype",
        choices=_DTYPES,
        default="float32",
        help="weights and activations (default: %(default)s)",
    )
    g = p.add_argument_group("workload")
    g.add_argument(
        "--batch", type=positive_int, default=8, help="sequences per step B (default: %(default)s)"
    )
    g.add_argument(
        "--seq-len",
        type=positive_int,
        default=32,
        help="tokens per sequence S (default: %(default)s)",
    )
    g.add_argument(
        "--zipf",
        type=_exponent,
        default=1.2,
        help="Zipf exponent of expert popularity, 0 = uniform (default: %(default)s)",
    )
    g.add_argument(
        "--drift-every",
        type=_non_negative,
        default=25,
        help="steps between changes of the hot experts, 0 = never (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=_non_negative,
        default=0,
        help="seed of model and workload (default: %(default)s)",
    )
    g = p.add_argument_group("rebalancing")
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="model steps to run (default: 40; 200 with --train)",
    )
    g.add_argument(
        "--interval",
        type=positive_int,
        default=10,
        help="steps between rebalances (default: %(default)s)",
    )
    g.add_argument(
        "--window",
        type=positive_int,
        default=5,
        help="steps of load the policy looks at (default: %(default)s)",
    )
    g.add_argument(
        "--layers-per-step",
        type=_non_negative,
        default=1,
        help="layers whose weights move per step (progressive mode); 0 moves all layers in one "
        "step (default: %(default)s)",
    )
    g = p.add_argument_group("devices and output")
    add_device_flags(g)
    g.add_argument(
        "--plot",
        default="jeplb_demo.png",
        metavar="PATH",
        help="PNG to write (per-device load before/after, balancedness over steps; with --train: "
        "loss with and without EPLB, max device load over steps); '' for none "
        "(default: %(default)s)",
    )
    g.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    g = p.add_argument_group("training")
    g.add_argument(
        "--train",
        action="store_true",
        help="train the model with Adam, with EPLB and without redundant experts, and compare "
        "the two loss curves (needs optax)",
    )
    g.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="with --train: Adam's learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--clip",
        type=float,
        default=1.0,
        help="with --train: global-norm clipping, each logical expert counted once; 0 for none "
        "(default: %(default)s)",
    )


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks that argparse cannot express; errors go through ``p.error`` (exit 2)."""
    if args.steps is None:
        args.steps = 200 if args.train else 40
    if not (args.lr > 0 and np.isfinite(args.lr)):
        p.error(f"--lr: expected a positive number, got {args.lr}")
    if not (args.clip >= 0 and np.isfinite(args.clip)):
        p.error(f"--clip: expected a number >= 0, got {args.clip}")
    if args.top_k > args.experts:
        p.error(f"--top-k: expected at most --experts = {args.experts}, got {args.top_k}")
    if args.layers_per_step > args.layers:
        p.error(
            f"--layers-per-step: expected at most --layers = {args.layers}, got "
            f"{args.layers_per_step}"
        )
    if args.layers_per_step:
        need = -(-args.layers // args.layers_per_step)
        if args.interval < need:
            p.error(
                f"--interval: a progressive rebalance of {args.layers} layers at "
                f"--layers-per-step {args.layers_per_step} takes {need} steps, so --interval must "
                f"be >= {need}; got {args.interval}"
            )
    if args.plot and not args.plot.lower().endswith(".png"):
        p.error(f"--plot: expected a file name ending in .png (or '' for none), got {args.plot!r}")


def setup_devices(platform: str, cpu_devices: int) -> list:
    """Picks the devices to run on; asks for ``cpu_devices`` CPU devices if jax is not started."""
    import jax

    # Raises once the backends are initialised (in-process use): then take what exists.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if platform == "auto":
        accel = [d for d in jax.devices() if d.platform != "cpu"]
        if len(accel) >= 2:
            return accel
        devices = jax.devices("cpu")
    else:
        try:
            devices = jax.devices(platform)
        except RuntimeError as err:
            raise SystemExit(
                f"jeplb demo: --platform {platform}: no such devices ({err})"
            ) from None
    if platform in ("auto", "cpu"):
        devices = devices[:cpu_devices]
    return devices


class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, **postfix):
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _model_and_workload(args, devices):
    """The example model's config, its mesh over ``devices`` and the workload, from the flags:
    ``(mesh, MoEConfig, DriftingZipf, P)``; exits with a message when P does not split over D."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from jeplb.examples import DriftingZipf, MoEConfig

    slots = args.experts + args.redundant
    if slots % len(devices):
        raise SystemExit(
            f"jeplb demo: --experts {args.experts} + --redundant {args.redundant} = {slots} slots "
            f"is not divisible by the {len(devices)} devices; choose --redundant so that it is"
        )
    mesh = Mesh(np.array(devices), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    cfg = MoEConfig(
        num_layers=args.layers,
        num_experts=args.experts,
        num_redundant_experts=args.redundant,
        top_k=args.top_k,
        d_model=args.d_model,
        d_ff=args.d_ff,
        dtype=jnp.dtype(args.dtype),
    )
    workload = DriftingZipf(
        num_layers=args.layers,
        num_experts=args.experts,
        batch=args.batch,
        seq_len=args.seq_len,
        d_model=args.d_model,
        zipf_exponent=args.zipf,
        drift_every=args.drift_every,
        seed=args.seed,
    )
    return mesh, cfg, workload, slots


def run(args: argparse.Namespace, out=None) -> dict[str, Any]:
    """Runs the demo with parsed flags; prints the table to ``out`` and returns the figures.

    Args:
      args: the namespace of `add_arguments`' flags.
      out: a text stream for the table (default sys.stdout).

    Returns:
      A dict of the figures printed (and written with ``--json``).
    """
    out = sys.stdout if out is None else out
    devices = setup_devices(args.platform, args.cpu_devices)

    import jax
    from flax import nnx

    import jeplb
    from jeplb.examples import MoETransformer, make_step

    num_devices = len(devices)
    mesh, cfg, workload, _ = _model_and_workload(args, devices)
    progressive = args.layers_per_step or None
    # The shape is printed once, at the head of the table.
    _say(args, f"jeplb demo: building the model on {num_devices} {devices[0].platform} devices ...")
    t0 = time.perf_counter()
    model = MoETransformer(cfg, mesh=mesh, rngs=nnx.Rngs(args.seed))
    state = jeplb.EplbState.create(
        num_layers=args.layers,
        num_experts=args.experts,
        num_devices=num_devices,
        num_redundant_experts=args.redundant,
        window_size=args.window,
        step_interval=args.interval,
        layers_per_step=progressive,
    ).replicated(mesh)
    step, params = make_step(model)
    graphdef = nnx.graphdef(model)

    @jax.jit
    def probe_fn(params, state, x, bias):
        y, _, _ = nnx.merge(graphdef, params)(x, bias, state, record=False)
        return y

    probe = workload.batch_at(10**6)  # a batch no step sees
    _say(args, "compiling the model step (forward + eplb_step) ...")
    lowered_step = step.lower(params, state, *workload.batch_at(0))
    step_c = lowered_step.compile()
    probe_c = probe_fn.lower(params, state, *probe).compile()
    compile_s = time.perf_counter() - t0
    reference = np.asarray(probe_c(params, state, *probe))

    records = []
    identical = True
    bar = _Progress(args.steps, "steps", not args.quiet and sys.stderr.isatty())
    for i in range(args.steps):
        x, bias = workload.batch_at(i)
        maps_used = np.asarray(state.phy2log)
        t = time.perf_counter()
        params, state, y, info, aux = step_c(params, state, x, bias)
        jax.block_until_ready((params, state, y))
        dt = time.perf_counter() - t
        info = jax.device_get(info)
        load = np.asarray(aux["slot_load"]).reshape(args.layers, num_devices, -1).sum(-1)  # [L, D]
        same = bool(np.array_equal(np.asarray(probe_c(params, state, *probe)), reference))
        identical &= same
        records.append(
            dict(
                step=i,
                seconds=dt,
                fired=bool(info.fired),
                layers_moved=int(np.sum(info.moved)),
                remote_rows=int(np.sum(info.remote_rows)),
                slots_changed=int(np.sum(maps_used != np.asarray(state.phy2log))),
                device_load=load.sum(0).tolist(),
                balancedness=float(load.mean(1).sum() / max(load.max(1).sum(), 1)),
                max_device_load=int(load.max(1).sum()),  # sum over layers of the maxima
                busiest_device_load=int(load.sum(0).max()),  # the plot's tallest bar
                mean_device_load=float(load.mean(1).sum()),
                phase=workload.phase(i),
                identical=same,
            )
        )
        bar.update(bal=f"{records[-1]['balancedness']:.2f}")
    bar.close()
    result = _summarise(args, records, cfg, num_devices, devices[0].platform, compile_s, identical)
    _print_table(result, out)
    if args.plot:
        _plot(result, records, args.plot)
        print(f"plot written to {os.path.abspath(args.plot)}", file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result, steps=records), f, indent=1)
            f.write("\n")
        print(f"figures written to {os.path.abspath(args.json)}", file=out)
    return result


def _summarise(args, records, cfg, num_devices, platform, compile_s, identical) -> dict[str, Any]:
    fires = [r["step"] for r in records if r["fired"]]
    moving = [r for r in records if r["layers_moved"]]
    still = [r["seconds"] for r in records[1:] if not r["layers_moved"]]  # first step: warm-up
    first = fires[0] if fires else None
    before = after = None
    if first is not None:
        # Before: the steps of the same workload phase up to the rebalance. After: the steps after
        # its last layer moved, up to the next rebalance or workload change.
        phase = records[first]["phase"]
        pre = [r for r in records[:first] if r["phase"] == phase] or records[:first] or [records[0]]
        done = first
        while (
            done + 1 < len(records)
            and records[done + 1]["layers_moved"]
            and not records[done + 1]["fired"]
        ):
            done += 1
        nxt = [s for s in fires if s > done] + [len(records)]
        post = (
            [r for r in records[done + 1 : nxt[0]] if r["phase"] == phase]
            or records[done + 1 : done + 2]
            or [records[-1]]
        )

        def mean(rows, key):
            return float(np.mean([r[key] for r in rows]))

        def busiest(side):  # the plot's tallest bar: of the mean per-device loads
            return dict(side, busiest_device_load=float(max(side["device_load"])))

        before = dict(
            balancedness=mean(pre, "balancedness"),
            max_device_load=mean(pre, "max_device_load"),
            mean_device_load=mean(pre, "mean_device_load"),
            device_load=np.mean([r["device_load"] for r in pre], 0).tolist(),
            steps=[r["step"] for r in pre],
        )
        after = dict(
            balancedness=mean(post, "balancedness"),
            max_device_load=mean(post, "max_device_load"),
            mean_device_load=mean(post, "mean_device_load"),
            device_load=np.mean([r["device_load"] for r in post], 0).tolist(),
            steps=[r["step"] for r in post],
        )
        before, after = busiest(before), busiest(after)
    remote = sum(r["remote_rows"] for r in records)
    return dict(
        platform=platform,
        devices=num_devices,
        shape=_shape(cfg, args),
        steps=len(records),
        compile_seconds=compile_s,
        rebalances=len(fires),
        rebalance_steps=fires,
        layers_per_step=args.layers_per_step or cfg.num_layers,
        before=before,
        after=after,
        slots_changed=sum(r["slots_changed"] for r in records),
        experts_received=remote,
        bytes_moved=remote * cfg.expert_bytes(),
        expert_bytes=cfg.expert_bytes(),
        step_ms_plain=1e3 * float(np.median(still)) if still else None,
        step_ms_moving=1e3 * float(np.median([r["seconds"] for r in moving])) if moving else None,
        moving_steps=len(moving),
        outputs_identical=identical,
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def _print_table(r: dict[str, Any], out) -> None:
    s = r["shape"]
    print(
        f"\njeplb demo: {r['devices']} {r['platform']} devices, L={s['L']} E={s['E']} P={s['P']} "
        f"K={s['K']} H={s['H']} F={s['F']} {s['dtype']}, T={s['T']} tokens/step, "
        f"{r['steps']} steps (compiled in {r['compile_seconds']:.1f} s)",
        file=out,
    )
    rows = []
    b, a = r["before"], r["after"]
    if b is not None:
        rows.append(("", "before", "after"))
        # Loads in tokens x k per step. Balancedness is per layer (vLLM's): the sum over layers
        # of the mean device load over the sum of the max device loads. The plot's bars are
        # each device's load summed over layers: their tallest is the busiest device.
        for name, key, spec in (
            ("balancedness (mean / max device load)", "balancedness", ".3f"),
            ("max device load (per layer, summed)", "max_device_load", ".0f"),
            ("mean device load (per layer, summed)", "mean_device_load", ".0f"),
            ("busiest device, all layers (plot)", "busiest_device_load", ".0f"),
        ):
            rows.append((name, format(b[key], spec), format(a[key], spec)))
    else:
        rows.append(("", "", ""))
        rows.append(("no rebalance fired: raise --steps or lower --interval", "", ""))
    width = max(len(x[0]) for x in rows)
    for name, x, y in rows:
        print(f"  {name:<{width}}  {x:>8}  {y:>8}", file=out)
    plain = "n/a" if r["step_ms_plain"] is None else f"{r['step_ms_plain']:.1f} ms"
    moving = "n/a" if r["step_ms_moving"] is None else f"{r['step_ms_moving']:.1f} ms"
    lines = [
        (
            "rebalances",
            f"{r['rebalances']} (at steps {', '.join(map(str, r['rebalance_steps'])) or '-'}), "
            f"{r['layers_per_step']} layer(s) per step",
        ),
        (
            "experts moved",
            f"{r['experts_received']} received from other devices, "
            f"{r['slots_changed']} slots changed",
        ),
        (
            "bytes moved",
            f"{_fmt_bytes(r['bytes_moved'])} ({_fmt_bytes(r['expert_bytes'])} per expert)",
        ),
        (
            "rebalance time",
            f"median step {moving} while moving weights ({r['moving_steps']} steps) "
            f"vs {plain} without",
        ),
        ("outputs identical", "yes, bitwise, on every step" if r["outputs_identical"] else "NO"),
    ]
    for name, text in lines:
        print(f"  {name + ':':<{width}}  {text}", file=out)


def _plot(r: dict[str, Any], records, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if r["before"] is not None:
        d = np.arange(r["devices"])
        left.bar(d - 0.2, r["before"]["device_load"], 0.4, label="before")
        left.bar(d + 0.2, r["after"]["device_load"], 0.4, label="after")
        left.axhline(
            r["before"]["mean_device_load"], color="gray", ls="--", lw=1, label="mean device load"
        )
        left.legend()
    left.set_xlabel("device")
    left.set_ylabel("tokens x k per step, summed over layers")
    left.set_title("per-device load around the first rebalance\n(tallest bar: busiest device)")
    steps = [x["step"] for x in records]
    right.plot(steps, [x["balancedness"] for x in records], marker=".", label="balancedness")
    for x in records:
        if x["layers_moved"]:
            right.axvspan(x["step"] - 0.5, x["step"] + 0.5, color="tab:green", alpha=0.15, lw=0)
        if x["fired"]:
            right.axvline(x["step"], color="tab:green", lw=1)
    changes = [b["step"] for a, b in itertools.pairwise(records) if a["phase"] != b["phase"]]
    for s in changes:
        right.axvline(s - 0.5, color="tab:red", ls=":", lw=1)
    right.set_ylim(0, 1.05)
    right.set_xlabel("step (green: weights moving; red dotted: hot experts change)")
    right.set_ylabel("mean / max device load")
    right.set_title("balancedness over steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ --train


def run_train(args: argparse.Namespace, out=None) -> dict[str, Any]:
    """``jeplb demo --train``: trains with and without EPLB, prints the comparison, returns it.

    Args:
      args: the namespace of `add_arguments`' flags (after `check_arguments`).
      out: a text stream for the table (default sys.stdout).

    Returns:
      A dict of the figures printed (and written with ``--json``, with the per-step curves).
    """
    out = sys.stdout if out is None else out
    devices = setup_devices(args.platform, args.cpu_devices)

    from jeplb.examples import training

    mesh, cfg, workload, _ = _model_and_workload(args, devices)
    # The shape is printed once, at the head of the comparison.
    _say(args, f"jeplb demo --train: {len(devices)} {devices[0].platform} devices ...")
    runs = {}
    for name, eplb in (("reference", False), ("eplb", True)):
        _say(args, f"training {'with EPLB' if eplb else 'without redundant experts'} ...")
        bar = _Progress(args.steps, name, not args.quiet and sys.stderr.isatty())
        runs[name] = training.train(
            cfg,
            mesh=mesh,
            workload=workload,
            steps=args.steps,
            eplb=eplb,
            learning_rate=args.lr,
            window_size=args.window,
            step_interval=args.interval,
            layers_per_step=args.layers_per_step or None,
            seed=args.seed,
            clip_norm=args.clip or None,
            check_replicas=eplb,
            on_step=lambda i, loss, bar=bar: bar.update(loss=f"{loss:.4f}"),
        )
        bar.close()
    result = _train_summary(args, runs, cfg, len(devices), devices[0].platform)
    _print_train(result, out)
    if args.plot:
        _plot_train(result, args.plot)
        print(f"plot written to {os.path.abspath(args.plot)}", file=out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"figures written to {os.path.abspath(args.json)}", file=out)
    return result


def _shape(cfg, args) -> dict[str, Any]:
    """The model's and the batch's sizes, as both summaries report them."""
    return dict(
        L=cfg.num_layers,
        E=cfg.num_experts,
        P=cfg.num_slots,
        K=cfg.top_k,
        H=cfg.d_model,
        F=cfg.d_ff,
        T=args.batch * args.seq_len,
        dtype=args.dtype,
    )


def _train_summary(args, runs, cfg, num_devices, platform) -> dict[str, Any]:
    ref, run = runs["reference"], runs["eplb"]
    fires = np.flatnonzero(run.fired).tolist()
    rel = np.abs(run.loss - ref.loss) / np.maximum(np.abs(ref.loss), np.finfo(np.float32).tiny)
    # Before: the steps up to the first rebalance; after: from the step after its last layer moved.
    lps = args.layers_per_step or cfg.num_layers
    first = fires[0] if fires else len(run.loss)
    done = min(first + -(-cfg.num_layers // lps), len(run.loss))

    def span(x, lo, hi):
        return float(np.mean(x[lo:hi])) if hi > lo else None

    return dict(
        platform=platform,
        devices=num_devices,
        shape=_shape(cfg, args),
        steps=len(run.loss),
        learning_rate=args.lr,
        clip_norm=args.clip or None,
        layers_per_step=lps,
        rebalances=len(fires),
        rebalance_steps=fires,
        replicas_identical=bool(run.replicas_identical.all()),
        max_relative_loss_difference=float(rel.max()),
        loss=dict(eplb=run.loss.tolist(), reference=ref.loss.tolist()),
        max_device_load=dict(
            eplb=run.max_device_load.tolist(), reference=ref.max_device_load.tolist()
        ),
        balancedness=dict(eplb=run.balancedness.tolist(), reference=ref.balancedness.tolist()),
        before=dict(
            balancedness=span(run.balancedness, 0, first),
            max_device_load=span(run.max_device_load, 0, first),
        ),
        after=dict(
            balancedness=span(run.balancedness, done, len(run.loss)),
            max_device_load=span(run.max_device_load, done, len(run.loss)),
        ),
        reference_mean=dict(
            balancedness=float(ref.balancedness.mean()),
            max_device_load=float(ref.max_device_load.mean()),
        ),
        mean_device_load=float(run.mean_device_load.mean()),
        compile_seconds=dict(eplb=run.compile_seconds, reference=ref.compile_seconds),
    )


def _print_train(r: dict[str, Any], out) -> None:
    s = r["shape"]
    print(
        f"\njeplb demo --train: {r['devices']} {r['platform']} devices, L={s['L']} E={s['E']} "
        f"P={s['P']} K={s['K']} H={s['H']} F={s['F']} {s['dtype']}, T={s['T']} tokens/step, "
        f"{r['steps']} Adam steps (lr {r['learning_rate']:g}, clip {r['clip_norm'] or 'none'})",
        file=out,
    )
    n = r["steps"]
    print(f"  {'step':>6}  {'loss with EPLB':>15}  {'without (P = E)':>15}", file=out)
    for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}):
        eplb, ref = r["loss"]["eplb"][i], r["loss"]["reference"][i]
        print(f"  {i:>6}  {eplb:>15.7f}  {ref:>15.7f}", file=out)

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    b, a, ref = r["before"], r["after"], r["reference_mean"]
    lines = [
        ("max relative loss difference", f"{r['max_relative_loss_difference']:.2e}"),
        (
            "replicas identical",
            "yes, bitwise, weights and Adam moments, on every step"
            if r["replicas_identical"]
            else "NO",
        ),
        (
            "rebalances",
            f"{r['rebalances']} (at steps {', '.join(map(str, r['rebalance_steps'])) or '-'}), "
            f"{r['layers_per_step']} layer(s) per step",
        ),
        (
            "max device load (layers summed)",
            f"{fmt(b['max_device_load'], '.1f')} before the first rebalance, "
            f"{fmt(a['max_device_load'], '.1f')} after; {ref['max_device_load']:.1f} without "
            f"redundant experts (mean device {r['mean_device_load']:.1f})",
        ),
        (
            "balancedness (mean/max)",
            f"{fmt(b['balancedness'], '.3f')} before, {fmt(a['balancedness'], '.3f')} after; "
            f"{ref['balancedness']:.3f} without redundant experts",
        ),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for name, text in lines:
        print(f"  {name + ':':<{width}}  {text}", file=out)


def _plot_train(r: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(r["steps"])
    left.plot(steps, r["loss"]["reference"], lw=3, alpha=0.5, label="without EPLB (P = E)")
    left.plot(steps, r["loss"]["eplb"], lw=1, label=f"with EPLB (P = {r['shape']['P']})")
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title(f"loss (max relative difference {r['max_relative_loss_difference']:.1e})")
    left.legend()
    right.plot(steps, r["max_device_load"]["reference"], lw=1, label="without EPLB (P = E)")
    right.plot(steps, r["max_device_load"]["eplb"], lw=1, label="with EPLB")
    right.axhline(r["mean_device_load"], color="gray", ls="--", lw=1, label="mean device")
    for s in r["rebalance_steps"]:
        right.axvline(s, color="tab:green", lw=0.8, alpha=0.5)
    right.set_xlabel("step (green: rebalance planned)")
    right.set_ylabel("tokens x k: each layer's busiest device, summed")
    right.set_title("max device load (per layer, summed)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""The ``jeplb`` command: ``jeplb demo [--train]``, ``jeplb bench {transfer,policy,step}`` and
``jeplb plan`` (a placement file from a recorded load)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import sys

__all__ = ["build_parser", "main"]

_BENCHES = {
    "transfer": (
        "jeplb.tools.bench_transfer",
        "the weight transfer against an all-gather baseline",
    ),
    "policy": ("jeplb.tools.bench_policy", "the placement policy against the numpy baseline"),
    "step": (
        "jeplb.tools.bench_step",
        "the model step with a fired rebalance against the plain step",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jeplb`` command."""
    from jeplb.tools import demo as _demo
    from jeplb.tools import plan as _plan

    p = argparse.ArgumentParser(
        prog="jeplb",
        description="Expert-parallel load balancing (EPLB) for Mixture-of-Experts models in JAX.",
    )
    from jeplb import __version__

    p.add_argument("--version", action="version", version=f"jeplb {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{demo,bench,plan}", required=True)
    demo = sub.add_parser(
        "demo",
        help="run an example MoE model on a skewed router and rebalance it",
        description="Runs the example MoE transformer (jeplb.examples) on a skewed, drifting "
        "router workload, rebalances its experts progressively, prints balancedness, load, bytes "
        "moved and rebalance time, checks that outputs stay identical, and writes a plot. With "
        "--train, trains it with Adam with and without EPLB and compares the loss curves.",
    )
    _demo.add_arguments(demo)
    bench = sub.add_parser(
        "bench",
        help="benchmarks: transfer, policy, step",
        description="Runs a benchmark. Flags after the benchmark's name go to it; "
        "`jeplb bench NAME --help` lists them.",
    )
    bench.add_argument(
        "name",
        choices=sorted(_BENCHES),
        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(_BENCHES.items())),
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    plan = sub.add_parser(
        "plan",
        help="write a placement file planned from a recorded load",
        description="Reads a recorded load (a state saved by EplbState.save, or an [L, E] array "
        "of token counts in .npy, .npz or .json), runs a placement policy and writes a "
        "placement file (jeplb.write_placement's format) that a deployment starts from.",
    )
    _plan.add_arguments(plan)
    return p


def _run_bench(name: str, rest: list[str]) -> int:
    module_name = _BENCHES[name][0]
    import jax

    # Simulated CPU devices for the benchmarks that run on them; raises (ignored) once jax's
    # backends are initialised.
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_num_cpu_devices", 8)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if getattr(err, "name", None) != module_name:
            raise
        print(
            f"jeplb bench {name}: this installation has no {module_name} module ({err}); "
            f"the other benchmarks are {', '.join(k for k in sorted(_BENCHES) if k != name)}",
            file=sys.stderr,
        )
        return 2
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"jeplb bench {name}: {module_name} has no main(argv) entry point", file=sys.stderr)
        return 2
    kwargs = (
        {"prog": f"jeplb bench {name}"} if "prog" in inspect.signature(entry).parameters else {}
    )
    rc = entry(list(rest), **kwargs)
    return 0 if rc is None else int(rc)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jeplb`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from jeplb.tools import demo as _demo

        demo_parser = parser._subparsers._group_actions[0].choices["demo"]
        _demo.check_arguments(demo_parser, args)
        if args.train:
            _demo.run_train(args)
        else:
            _demo.run(args)
        return 0
    if args.command == "plan":
        from jeplb.tools import plan as _plan

        plan_parser = parser._subparsers._group_actions[0].choices["plan"]
        return _plan.run(plan_parser, args)
    return _run_bench(args.name, args.rest)


if __name__ == "__main__":
    sys.exit(main())

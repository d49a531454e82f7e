"""Multi-device transfer benchmark: rearrange_expert_weights at EP = 2, 4, 8 against the devices'
point-to-point bandwidth, measured in the same run with a plain ppermute of large buffers.

Usage (from the repository root):
    python benchmarks/bench_multigpu.py [--row-scale S] [--json PATH] [--out PATH]

On GPUs the rows are expert-sized (88.1 MB: DeepSeek-V3 bf16 w13 + w2; 37.7 MB: Qwen3-235B).
``--row-scale`` divides the row sizes (``--row-scale 4096`` for a smoke run on 8 simulated CPU
devices). EP sizes above the number of devices are skipped and reported as such. NVLink multicast
stays off (NCCL_NVLS_ENABLE=0 unless set otherwise). Every figure is a median after warm-up.

Per case: the rows the busiest device sends or receives through the rounds (the transfer's
report, padding included), the same in bytes, the time of one rearrangement, the bandwidth that
busiest device reached (its bytes over the time) and its fraction of the ppermute ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax

jax.config.update("jax_num_cpu_devices", 8)  # CPU only; before any backend starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jeplb._src import programs as _programs  # noqa: E402
from jeplb._src.transfer import api as _transfer  # noqa: E402
from jeplb.tools import bench_transfer as _bench_transfer  # noqa: E402
from jeplb.tools.benchio import median_seconds, results_path, table, write_results  # noqa: E402

ROWS = {"deepseek-v3 88.1 MB": 7168 * 2048 * 3 * 2, "qwen3-235b 37.7 MB": 4096 * 1536 * 3 * 2}


def mesh_of(ep: int):
    return jax.make_mesh(
        (ep,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:ep]
    )


def ppermute_ceiling(mesh, nbytes: int) -> float:
    """Bytes per second one device sends (and receives) in a shift-by-one ppermute."""
    ep = mesh.shape["ep"]
    perm = [(i, (i + 1) % ep) for i in range(ep)]
    x = jax.device_put(jnp.zeros((ep * nbytes // 2,), jnp.uint16), NamedSharding(mesh, P("ep")))
    f = jax.jit(
        jax.shard_map(
            lambda b: jax.lax.ppermute(b, "ep", perm),
            mesh=mesh,
            in_specs=P("ep"),
            out_specs=P("ep"),
        )
    )
    return nbytes / median_seconds(lambda: f(x), repeats=7, warmup=2)


@dataclasses.dataclass
class Row:
    ep: int
    row: str
    plan: str
    slots_per_device: int
    busiest_rows: float
    floor_rows: float
    busiest_gb: float
    ms: float
    gb_s: float
    of_ppermute: float


def run_case(mesh, row_name, row_bytes, kind, *, slots_per_device, layers, ceiling):
    ep = mesh.shape["ep"]
    p_total = ep * slots_per_device
    num_experts = p_total - p_total // 8
    old, new = _bench_transfer.make_plan(kind, 0, layers, p_total, num_experts)
    width = row_bytes // 2
    spec = NamedSharding(mesh, P(None, "ep"))
    w = jax.jit(
        lambda k: jax.lax.bitcast_convert_type(
            jax.random.bits(k, (layers, p_total, width), jnp.uint16), jnp.bfloat16
        ),
        out_shardings=spec,
    )(jax.random.key(0))
    prog = _transfer.program_for(mesh)
    old_d, new_d = (jax.device_put(m, NamedSharding(mesh, P())) for m in (old, new))
    state = {"w": [w], "fwd": True, "report": None}

    def run():
        a, b = (old_d, new_d) if state["fwd"] else (new_d, old_d)
        state["w"], rep = prog(a, b, state["w"])
        if state["fwd"]:
            state["report"] = rep
        state["fwd"] = not state["fwd"]
        return state["w"]

    t = median_seconds(run, repeats=7, warmup=2) / layers
    rep = state["report"]
    busiest = float(np.mean(np.asarray(rep.wire_rows)))
    floor = float(np.mean(np.asarray(rep.min_rows)))
    nbytes = busiest * row_bytes
    return Row(
        ep,
        row_name,
        kind,
        slots_per_device,
        busiest,
        floor,
        nbytes / 1e9,
        t * 1e3,
        nbytes / t / 1e9,
        nbytes / t / ceiling,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row-scale", type=int, default=1, help="divide the row sizes by this")
    ap.add_argument("--slots-per-device", type=int, default=8, help="N_local")
    ap.add_argument("--layers", type=int, default=2, help="layers per rearrangement")
    ap.add_argument("--json", metavar="PATH", help="also write machine-readable results")
    ap.add_argument("--out", metavar="PATH", help="markdown results file")
    args = ap.parse_args(argv)
    dev = jax.devices()
    platform = dev[0].platform
    rows, ceilings, skipped = [], {}, []
    for ep in (2, 4, 8):
        if ep > len(dev):
            skipped.append(ep)
            continue
        mesh = mesh_of(ep)
        ceiling = ppermute_ceiling(mesh, max(1 << 20, (1 << 30) // args.row_scale))
        ceilings[ep] = ceiling
        print(f"EP={ep}: ppermute ceiling {ceiling / 1e9:.1f} GB/s per device", flush=True)
        for row_name, row_bytes in ROWS.items():
            rb = max(2048, row_bytes // args.row_scale // 2048 * 2048)
            for kind in ("reshuffle", "drift"):
                r = run_case(
                    mesh,
                    row_name if args.row_scale == 1 else f"{row_name} / {args.row_scale}",
                    rb,
                    kind,
                    slots_per_device=args.slots_per_device,
                    layers=args.layers,
                    ceiling=ceiling,
                )
                rows.append(r)
                print(r, flush=True)
    compiles = _programs.build.cache_info().currsize  # only transfer programs run here
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join(["python benchmarks/bench_multigpu.py", *given])
    text = (
        f"# Multi-device transfer: {len(dev)} x {dev[0].device_kind}, jax {jax.__version__}\n\n"
        f"Command: `{cmd}`\n\n"
        + "".join(
            f"- EP = {ep}: ppermute ceiling {c / 1e9:.1f} GB/s per device (same run)\n"
            for ep, c in ceilings.items()
        )
        + "".join(f"- EP = {ep}: not run, only {len(dev)} devices\n" for ep in skipped)
        + f"- transfer programs built: {compiles} (one per mesh; plans are traced values)\n"
        + "- ragged_all_to_all collective stage: not built yet (one module behind collective.Collective), not run\n\n"
        + table(rows, "rearrange_expert_weights, ppermute rounds, per layer")
    )
    print(text)
    write_results(
        text,
        args.out or results_path(f"multigpu_{platform}.md"),
        json_path=args.json,
        payload={
            "command": cmd,
            "ceilings": ceilings,
            "rows": [dataclasses.asdict(r) for r in rows],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Gradient-sync benchmark (`jeplb.sync_replica_grads`).

* Default (8 simulated CPU devices): per placement, the rows the busiest device moves through the
  rounds (gather + broadcast, padding included) against the floor, and the compiled temporary
  memory against one layer of a device's local gradients (f32 + bf16 leaves, and one f32 leaf
  alone: ``f32_temp_of_layer``).
* ``--gpu`` (one device, the default backend: the H200): a local sum; its time against the
  device's copy bandwidth measured in the same run (bytes: every replica row read once and
  written once). ``--tiny`` shrinks the sizes so that either mode runs on a CPU in seconds.

Usage (from the repository root):
    python benchmarks/bench_grad_sync.py [--tiny] [--json PATH] [--out PATH]
    python benchmarks/bench_grad_sync.py --gpu [--tiny] [--kib K] [--json PATH] [--out PATH]

The floor of a layer: each device must send (and receive) at least the rows of its non-owner
replicas whose owner (the expert's lowest slot) is on another device (the gather) plus one copy of
each sum it owns for every other device holding a replica of that expert (the broadcast), and the
receiving counterparts; the floor is the largest of these per-device totals. "2 x replica rows"
is the naive bound of the issue: twice the remote non-owner replica rows of the busiest device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

# The default pool is 75% of the GPU's memory; the 16 MiB-row case wants a little more headroom.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; CPU only

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jeplb  # noqa: E402
from jeplb._src import training  # noqa: E402
from jeplb.tools.benchio import median_seconds, results_path, table, write_results  # noqa: E402


def _placement(rng, layers, experts, slots, devices, skew=1.2):
    """A placement from the policy for a Zipf-skewed load (int32[L, P])."""
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    load = np.stack([rng.permutation(1e6 / ranks**skew) for _ in range(layers)]).astype(np.int64)
    phy2log, _, _ = jeplb.rebalance_experts(load, slots, 1, 1, devices)
    return np.asarray(phy2log, np.int32)


def floor_rows(m: np.ndarray, devices: int) -> tuple[int, int]:
    """(floor, naive 2 x replica rows) of one layer's map int32[P] (see the module docstring)."""
    n = m.shape[0] // devices
    dev = np.arange(m.shape[0]) // n
    send = np.zeros(devices, np.int64)
    recv = np.zeros(devices, np.int64)
    remote_replicas = np.zeros(devices, np.int64)
    for e in np.unique(m[m >= 0]):
        slots = np.nonzero(m == e)[0]
        owner = dev[slots[0]]
        for p in slots[1:]:
            if dev[p] != owner:  # gather: replica -> owner
                send[dev[p]] += 1
                recv[owner] += 1
                remote_replicas[dev[p]] += 1
        for d in set(dev[slots[1:]].tolist()) - {owner}:  # broadcast: once per device
            send[owner] += 1
            recv[d] += 1
    return int(max(send.max(), recv.max())), int(2 * remote_replicas.max())


@dataclasses.dataclass
class WireRow:
    case: str
    L: int
    E: int
    P: int
    wire_rows: int
    floor_rows: int
    of_floor: float
    naive_2x_rows: int
    of_naive: float
    temp_bytes: int
    layer_bytes: int
    temp_of_layer: float
    f32_temp_of_layer: float
    ms: float


def _f32_temp_of_layer(mesh, layers, slots, width) -> float:
    """Compiled temporaries of the sync of one f32 leaf, over one layer of it (no run)."""
    sharding = NamedSharding(mesh, P(None, "ep"))
    leaf = jax.ShapeDtypeStruct((layers, slots, width), jnp.float32, sharding=sharding)
    maps = jax.ShapeDtypeStruct((layers, slots), jnp.int32, sharding=NamedSharding(mesh, P()))
    program = training.sync_program(mesh, [(None, "ep")])
    temp = program.lower(maps, [leaf]).compile().memory_analysis().temp_size_in_bytes
    return temp / ((slots // mesh.shape["ep"]) * width * 4)


def _grads(mesh, layers, slots, width, spec):
    sharding = NamedSharding(mesh, spec)
    shape = (layers, slots, width)
    return [
        jax.device_put(jax.random.normal(jax.random.key(0), shape, jnp.float32), sharding),
        jax.device_put(jax.random.normal(jax.random.key(1), shape, jnp.bfloat16), sharding),
    ]


def cpu_wire(*, tiny: bool) -> list[WireRow]:
    devices = 8
    mesh = Mesh(np.array(jax.devices("cpu")[:devices]), ("ep",))
    width = 256 if tiny else 4096
    cases = [("policy, 1.25x slots", 4, 32, 40), ("policy, 1.5x slots", 4, 32, 48)]
    if not tiny:
        cases += [("policy, 2x slots", 4, 32, 64), ("policy, 3x slots", 4, 32, 96)]
    rng = np.random.default_rng(0)
    out = []
    for name, layers, experts, slots in cases:
        m = _placement(rng, layers, experts, slots, devices)
        leaves = _grads(mesh, layers, slots, width, P(None, "ep"))
        program = training.sync_program(mesh, [(None, "ep")] * len(leaves))
        maps = jax.device_put(m, NamedSharding(mesh, P()))
        memory = program.lower(maps, leaves).compile().memory_analysis()
        _, stats = program(maps, leaves)
        jax.block_until_ready(stats)
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            res, stats = program(maps, leaves)
            jax.block_until_ready(res)
        ms = (time.perf_counter() - t0) / reps * 1e3
        wire = int(
            np.asarray(stats.gather_wire_rows).sum() + np.asarray(stats.broadcast_wire_rows).sum()
        )
        floors = [floor_rows(m[i], devices) for i in range(layers)]
        floor = sum(f for f, _ in floors)
        naive = sum(n for _, n in floors)
        layer_bytes = (slots // devices) * width * (4 + 2)
        temp = int(memory.temp_size_in_bytes)
        out.append(
            WireRow(
                name,
                layers,
                experts,
                slots,
                wire,
                floor,
                wire / max(floor, 1),
                naive,
                wire / max(naive, 1),
                temp,
                layer_bytes,
                temp / layer_bytes,
                _f32_temp_of_layer(mesh, layers, slots, width),
                ms,
            )
        )
        print(out[-1], flush=True)
    return out


@dataclasses.dataclass
class LocalRow:
    case: str
    impl: str
    dtype: str
    row_kib: int
    replica_rows: int
    ms: float
    tb_s: float
    of_copy: float
    temp_bytes: int
    temp_of_layer: float


def copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by the device's own copy of a buffer of ``nbytes``."""
    x = jax.random.bits(jax.random.key(0), (nbytes // 4,), jnp.uint32)
    xor = jax.jit(lambda x: x ^ jnp.uint32(1))
    return 2 * x.nbytes / median_seconds(lambda: xor(x), repeats=5)


def _local_row(mesh, m, maps, layers, experts, slots, kib, dtype, impl) -> LocalRow:
    """Times one (row size, dtype, row_impl) case of the one-device sync (bandwidth filled in by
    the caller)."""
    program = training.sync_program(mesh, [(None, "ep")], row_impl=impl)
    jitted = jax.jit(lambda g, m: program(m, [g])[0][0], donate_argnums=0)
    width = kib * 1024 // np.dtype(dtype).itemsize
    g = jax.device_put(
        jax.random.normal(jax.random.key(0), (layers, slots, width), dtype),
        NamedSharding(mesh, P(None, "ep")),
    )
    temp = jitted.lower(g, maps).compile().memory_analysis().temp_size_in_bytes
    state = {"g": g}

    def run():
        state["g"] = jitted(state["g"], maps)
        return state["g"]

    t = median_seconds(run, repeats=10)
    layer = slots * kib * 1024
    name = f"L={layers} E={experts} P={slots}"
    return LocalRow(
        name, impl, np.dtype(dtype).name, kib, 0, t * 1e3, 0.0, 0.0, int(temp), temp / layer
    )


def one_device(
    *, tiny: bool, kib: int | None = None, tuning: str | None = None
) -> tuple[list[LocalRow], float]:
    device = jax.devices()[0]
    mesh = Mesh(np.array([device]), ("ep",))
    layers, experts, slots = (2, 8, 12) if tiny else (4, 32, 40)
    rows_kib = [kib] if kib else [4] if tiny else [1024, 16 * 1024]
    rng = np.random.default_rng(0)
    m = _placement(rng, layers, experts, slots, 1)
    _, count = training.replica_ranks(m)
    replica_rows = int((np.asarray(count) > 1).sum())  # rows read once and written once
    copy = copy_bandwidth((16 << 20) if tiny else (1 << 30))
    maps = jax.device_put(m, NamedSharding(mesh, P()))
    out = []
    for kib in rows_kib:
        for dtype in (jnp.bfloat16, jnp.float32):
            # auto: the Pallas kernel on a GPU; loop: the XLA loop of gathers and scatters.
            for impl in ("auto", "loop") if not tuning else _tunings(tuning):
                with _tuned(impl):
                    row = _local_row(
                        mesh, m, maps, layers, experts, slots, kib, dtype, impl.split(" ")[0]
                    )
                row.impl = impl
                out.append(row)
                out[-1].replica_rows = replica_rows
                moved = 2 * replica_rows * kib * 1024
                out[-1].tb_s = moved / (out[-1].ms / 1e3) / 1e12
                out[-1].of_copy = out[-1].tb_s * 1e12 / copy
                print(out[-1], flush=True)
    return out, copy


def _tunings(spec: str) -> list[str]:
    """``--tuning "1x4,2x8"`` -> the kernel's (narrow block scale x warps) settings, as names."""
    return [f"auto {t}" for t in spec.split(",")]


@contextlib.contextmanager
def _tuned(impl: str):
    """The replica-sum kernel set to the name's tuning (``auto SxW``) while a case compiles."""
    from jeplb._src.transfer import replica_sum

    saved = replica_sum._NARROW_BLOCK_SCALE, replica_sum._NUM_WARPS
    if " " in impl:
        scale, warps = impl.split(" ")[1].split("x")
        replica_sum._NARROW_BLOCK_SCALE, replica_sum._NUM_WARPS = int(scale), int(warps)
    try:
        yield
    finally:
        replica_sum._NARROW_BLOCK_SCALE, replica_sum._NUM_WARPS = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_grad_sync.py")
    parser.add_argument("--gpu", action="store_true", help="one device: the local sum")
    parser.add_argument("--tiny", action="store_true", help="small sizes (a CPU smoke test)")
    parser.add_argument("--kib", type=int, default=None, help="--gpu: one row size (KiB)")
    parser.add_argument(
        "--tuning",
        default=None,
        help='--gpu: kernel settings to compare instead of auto/loop, "SCALExWARPS,..." (block '
        "scale of 2-byte rows x warps per program)",
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_grad_sync.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    platform = jax.devices()[0].platform
    head = f"# Gradient sync ({'one device' if args.gpu else '8 CPU devices'}, {platform})\n\n"
    head += (
        f"Command: `{command.strip()}`\n\njax {jax.__version__}, {jax.devices()[0].device_kind}\n\n"
    )
    if args.gpu:
        rows, copy = one_device(tiny=args.tiny, kib=args.kib, tuning=args.tuning)
        text = head + f"Copy bandwidth (read + write): {copy / 1e12:.3g} TB/s\n\n"
        text += table(rows, "Local sum: bytes = every replica row read once and written once")
        name = f"grad_sync_{platform}{'_tiny' if args.tiny else ''}.md"
    else:
        rows = cpu_wire(tiny=args.tiny)
        text = head + table(
            rows,
            "Wire rows of the busiest device (gather + broadcast) and temporary memory "
            "(f32 + bf16 leaves)",
        )
        name = f"grad_sync_cpu{'_tiny' if args.tiny else ''}.md"
    payload = {"rows": [dataclasses.asdict(r) for r in rows]}
    write_results(text, args.out or results_path(name), json_path=args.json, payload=payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Temporary memory of the row-moving programs with tensor-parallel experts (TP x EP), on CPU.

Mesh ("ep", "tp") = (4, 2) of 8 simulated CPU devices (a tuple expert axis: ("ctx", "ep", "tp") =
(2, 2, 2)), leaves f32 [L, P, H, F] = [3, 8, 64, 128] sharded ``PartitionSpec(None, "ep", None,
"tp")`` (slot-major: [P, L, H, F]; one layer: [P, H, F]). Every entry point is traced under an
outer `jax.jit` on a mesh of Auto axes, where a traced leaf does not say how it is sharded:

* guessed: ``expert_specs=`` the leaf's spec without "tp" (what jeplb assumed of an undeclared
  leaf before it refused to guess): the program takes the leaf whole over "tp" and XLA
  all-gathers it first;
* declared: ``expert_specs=`` the leaf's PartitionSpec: the program runs manual over both axes.

Per case: ``memory_analysis().temp_size_in_bytes`` of the compiled program, against one layer of
one device's local shard (N_local x H x F / TP x 4 bytes = 32 KiB), and the largest all-gather /
all-reduce / all-to-all result in its HLO.

Usage (from the repository root):
    python benchmarks/tp_memory.py [--out benchmarks/results/tp_memory_cpu.md]
"""

from __future__ import annotations

import argparse
import re

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jeplb  # noqa: E402

L, PT, H, F, EP, TP = 3, 8, 64, 128, 4, 2
LOCAL_LAYER = (PT // EP) * H * (F // TP) * 4
_OP = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all)(-start)?\(")
_SHAPE = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")


def _bytes(dtype: str, dims: str) -> int:
    size = 1 if dtype == "pred" else 2 if dtype == "bf16" else int(dtype[1:]) // 8
    return size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))


def largest_collective(text: str) -> tuple[int, str]:
    """The largest all-gather / all-reduce / all-to-all result of an HLO text: (bytes, op)."""
    best = (0, "-")
    for line in text.splitlines():
        m = _OP.search(line)
        if m:
            size = max((_bytes(*s) for s in _SHAPE.findall(m.group(1))), default=0)
            best = max(best, (size, m.group(2)))
    return best


def _mesh(shape=(EP, TP), names=("ep", "tp")) -> Mesh:
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def cases():
    """(name, build(expert_specs) -> (jitted function, args))."""
    mesh, spec = _mesh(), P(None, "ep", None, "tp")
    old = np.tile(np.arange(PT, dtype=np.int32) % 6, (L, 1))
    new = np.roll(old, 3, axis=1)

    def put(shape, s, m=mesh):
        return jax.device_put(jnp.ones(shape, jnp.float32), NamedSharding(m, s))

    def rearrange(specs, **kw):
        def f(o, n, w):
            return jeplb.rearrange_expert_weights(o, n, w, mesh=kw.get("mesh", mesh), **specs)

        return f

    w = put((L, PT, H, F), spec)
    yield "rearrange_expert_weights", spec, lambda s: (rearrange(s), (old, new, w))
    major = P("ep", None, None, "tp")
    ws = put((PT, L, H, F), major)
    yield (
        "rearrange, slot-major [P, L, ...]",
        major,
        lambda s: (
            lambda o, n, w: jeplb.rearrange_expert_weights(
                o, n, w, mesh=mesh, layer_axis=1, slot_axis=0, **s
            ),
            (old, new, ws),
        ),
    )
    tmesh, tspec = _mesh((2, 2, 2), ("ctx", "ep", "tp")), P(None, ("ctx", "ep"), None, "tp")
    wt = put((L, PT, H, F), tspec, tmesh)
    yield (
        "rearrange, expert axis ('ctx', 'ep')",
        tspec,
        lambda s: (
            lambda o, n, w: jeplb.rearrange_expert_weights(
                o, n, w, mesh=tmesh, axis_name=("ctx", "ep"), **s
            ),
            (old, new, wt),
        ),
    )
    one = P("ep", None, "tp")
    w1 = put((PT, H, F), one)
    yield (
        "transfer_layer",
        one,
        lambda s: (
            lambda o, n, w: jeplb.transfer_layer(o, n, w, mesh=mesh, **s),
            (old[0], new[0], w1),
        ),
    )
    state = jeplb.EplbState.create(
        num_layers=L,
        num_experts=6,
        num_devices=EP,
        num_redundant_experts=PT - 6,
        window_size=1,
        step_interval=1,
    ).replicated(mesh)
    load = jnp.asarray(np.tile(np.arange(1, 7) ** 3, (L, 1)), jnp.int32)
    yield (
        "eplb_step (rebalancing)",
        spec,
        lambda s: (
            lambda st, w: jeplb.eplb_step(st.record(load), w, mesh=mesh, **s),
            (state, w),
        ),
    )
    yield (
        "sync_replica_grads",
        spec,
        lambda s: (lambda g, m: jeplb.sync_replica_grads(g, m, mesh=mesh, **s), (w, new)),
    )


def measure() -> list[dict]:
    rows = []
    for name, spec, build in cases():
        row = {"case": name}
        whole = P(*(None if e == "tp" else e for e in spec))  # the former guess
        for label, declared in (("guessed", whole), ("declared", spec)):
            f, args = build({"expert_specs": declared})
            compiled = jax.jit(f).lower(*args).compile()
            row[label] = compiled.memory_analysis().temp_size_in_bytes
            row[label + "_collective"] = largest_collective(compiled.as_text())
        rows.append(row)
        print(row, flush=True)
    return rows


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def table(rows: list[dict]) -> str:
    lines = [
        f"Temporary memory per device, leaves f32 [{L}, {PT}, {H}, {F}] over ('ep', 'tp') = "
        f"({EP}, {TP}); one layer of a device's local shard = {_kib(LOCAL_LAYER)}. Under an "
        f"outer jit on a mesh of Auto axes; guessed = the leaf declared whole over 'tp' (what "
        f"an undeclared leaf was assumed to be before jeplb refused to guess), "
        f"declared = expert_specs= the leaf's spec. The 16-byte all-reduce of the declared "
        f"programs is the devices' check that they hold the same maps.",
        "",
        "| entry point | guessed temp | x local layer | largest collective | declared temp "
        "| x local layer | largest collective |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, d = r["guessed_collective"], r["declared_collective"]
        lines.append(
            f"| {r['case']} | {_kib(r['guessed'])} | {r['guessed'] / LOCAL_LAYER:.2f} "
            f"| {g[1]} {_kib(g[0])} | {_kib(r['declared'])} | "
            f"{r['declared'] / LOCAL_LAYER:.2f} | {d[1]} {_kib(d[0]) if d[0] else ''} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    text = table(measure())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                f"# TP x EP temporary memory on CPU\n\n`python benchmarks/tp_memory.py`\n\n{text}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What EPLB costs a decode step, measured as a model calls it.

A decode-like step of L MoE layers (DeepSeek-V3's routing by default: 4096 tokens, top-8 of
E = 256 experts on P = 288 slots, 58 layers), one jitted call per step with the state and the
weights donated, in four variants that share everything else:

* ``plain``: the step without EPLB (each token's k-th expert read from slot ``id``, its first
  replica);
* ``dispatch``: `jeplb.dispatch` on every layer (ids mapped to slots, counts recorded);
* ``dispatch + idle step W=1000`` / ``W=1``: and `jeplb.eplb_step` at the end of the step, no
  rebalance due, with vLLM's window of 1000 passes and with a window of 1 (its `StepInfo` is
  returned, as a model that logs the balancedness keeps it);
* ``dispatch counted once``: `jeplb.dispatch` with ``record=False`` on every layer (ids mapped
  only), every layer's ids counted at once after the forward by `jeplb.EplbState.record_ids`;
  ``dispatch counted once + idle step W=1000``: and the idle step (EPLB's whole cost, done the
  cheaper way);
* ``dispatch kept`` (not in the default set): `jeplb.dispatch_kept` on every layer (the map
  written into one [L, T, K] array of every layer's slots, carried through the scan), counted
  once after the forward by `jeplb.EplbState.record_slots`;
* ``dispatch balanced`` (not in the default set): `jeplb.dispatch` with the state's
  ``replica_choice="balanced"`` (each batch's pairs of an expert split floor / ceil over its
  replicas).

Each variant is built with its layers unrolled (a Python loop, `jeplb.dispatch`) and scanned
(`lax.scan`, `jeplb.dispatch_layer` with the counts stacked into [L, E] and recorded once).

A layer: the router's ids are a fixed top-k draw of the layer shifted by one bit of the previous
layer's output (so every layer waits for the last, as in a model; ``router="topk"``: the top-K
of logits of the activations, the draw's experts lifted, see `route`), the token's K expert rows
(f32[H], H = 16) are read from the weights [L, P, H] at the mapped slots and summed into the
carried activations. Light on purpose: the plain step costs about what a layer's launches cost, so
that EPLB's share stands out; the expert compute of a real model adds to both sides alike.

Timing: each program is compiled and warmed up, then the programs take turns, one call each per
round (interleaved, so a change of machine load hits all alike), each call synchronised
(``call``: wall time of one step, the host's dispatch of its arguments included); and, per
program, samples of ``burst`` back-to-back calls synchronised once (``pipelined``: what a serving
loop that does not wait for each step pays). Medians.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

import numpy as np

__all__ = [
    "DEFAULT",
    "TINY",
    "DecodeCase",
    "build",
    "device_summary",
    "entry_ops",
    "measure",
    "time_steps",
]


ROUTERS = ("shift", "topk")


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """Shapes of the decode step: L layers, T tokens, top-K of E experts on P slots, rows of H."""

    layers: int
    tokens: int
    top_k: int
    experts: int
    slots: int
    hidden: int = 16
    router: str = "shift"  # "shift" or "topk", see `route`

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router: expected one of {ROUTERS}, got {self.router!r}")

    @property
    def name(self) -> str:
        text = f"L={self.layers} T={self.tokens} K={self.top_k} E={self.experts} P={self.slots}"
        return text + ("" if self.router == "shift" else f", router {self.router}")


DEFAULT = DecodeCase(layers=58, tokens=4096, top_k=8, experts=256, slots=288)
TINY = DecodeCase(layers=4, tokens=256, top_k=4, experts=16, slots=24, hidden=8)

PLAIN, DISPATCH = "plain", "dispatch"
BALANCED = "dispatch balanced"
ONCE = "dispatch counted once"
ONCE_IDLE = "dispatch counted once + idle step W=1000"
IDLE_BIG, IDLE_ONE = "dispatch + idle step W=1000", "dispatch + idle step W=1"
# The idle step traced with ``idle=True`` ("host-scheduled": `jeplb.HostSchedule.step_due` said
# nothing is due): no conditional, whose predicate a GPU copies to the host and waits for. Its
# StepInfo is not used (XLA drops what computes it), or its balancedness is returned ("+
# balancedness": what logging it every step costs).
IDLE_HOST = "dispatch + host-scheduled idle step W=1000"
ONCE_IDLE_HOST = "dispatch counted once + host-scheduled idle step W=1000"
ONCE_IDLE_HOST_LOGGED = "dispatch counted once + host-scheduled idle step W=1000 + balancedness"
# `jeplb.dispatch_kept` on every layer (the map written into every layer's slots, [L, T, K]),
# counted once after the forward by `jeplb.EplbState.record_slots`.
KEPT = "dispatch kept"
KEPT_IDLE_HOST = "dispatch kept + host-scheduled idle step W=1000"
_HOST_IDLE = (IDLE_HOST, ONCE_IDLE_HOST, ONCE_IDLE_HOST_LOGGED, KEPT_IDLE_HOST)
# The serving loop's recording half (`jeplb.end_pass`, no conditional; `jeplb.HostSchedule`
# decides on the host when to plan and move), in place of the idle step.
END_PASS = "dispatch + end_pass"
ONCE_END_PASS = "dispatch counted once + end_pass"
VARIANTS = (
    PLAIN, DISPATCH, ONCE, IDLE_BIG, IDLE_ONE, ONCE_IDLE, ONCE_IDLE_HOST, ONCE_IDLE_HOST_LOGGED,
)  # fmt: skip
_IDLE = (IDLE_BIG, IDLE_ONE, ONCE_IDLE, *_HOST_IDLE)
_ONCE = (ONCE, ONCE_IDLE, ONCE_IDLE_HOST, ONCE_IDLE_HOST_LOGGED, ONCE_END_PASS)
_KEPT = (KEPT, KEPT_IDLE_HOST)
LAYOUTS = ("unrolled", "scanned")


def device_summary() -> str:
    """The device the benchmark runs on, for the results file (kind, memory, jax version)."""
    import jax

    dev = jax.devices()[0]
    stats = {}
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices have none in some versions
        stats = {}
    mem = stats.get("bytes_limit")
    mem = f", {mem / 2**30:.1f} GiB for buffers" if mem else ""
    return f"{dev.device_kind} ({dev.platform}{mem}), jax {jax.__version__}"


def route(case: DecodeCase, acc, ids0):
    """The layer's ids [T, K] from the activations ``acc`` [T, H] and the layer's draw ``ids0``.

    ``shift``: the draw shifted by one bit of ``acc`` (elementwise: XLA fuses it into every
    consumer of the ids, the expert read and, with EPLB, the write that keeps the ids);
    ``topk``: the top-K of logits against E gates, the draw's experts lifted far above the rest
    (a router as a model has one: its ids are a top-k's output, made once in memory)."""
    import jax
    import jax.numpy as jnp

    if case.router == "shift":
        return _route(acc, ids0, case.experts)
    gates = jnp.cos(jnp.arange(case.hidden * case.experts, dtype=jnp.float32))
    logits = acc @ gates.reshape(case.hidden, case.experts) * 1e-3
    lifted = (ids0[..., None] == jnp.arange(case.experts)).any(axis=-2)
    return jax.lax.top_k(logits + lifted.astype(jnp.float32), case.top_k)[1]


def _route(acc, ids0, num_experts):
    """The layer's ids: the fixed draw shifted by one bit of the previous layer's output."""
    import jax.numpy as jnp

    shift = (acc[:, 0] > 0).astype(jnp.int32)
    return (ids0 + shift[:, None]) % num_experts


def _experts(acc, w_layer, slots):
    """The token's K rows of the layer's weights [P, H], summed into the activations."""
    return 0.5 * acc + w_layer[slots].sum(axis=1) * 0.125


def _unrolled(case: DecodeCase, variant: str, mesh):
    import jax.numpy as jnp

    import jeplb

    def step(state, w, acc, ids0):
        kept = []
        if variant in _KEPT:
            kept = jnp.full((case.layers, case.tokens, case.top_k), -1, jnp.int32)
        for layer in range(case.layers):
            ids = route(case, acc, ids0[layer])
            if variant == PLAIN:
                slots = ids
            elif variant in _KEPT:
                kept, slots = jeplb.dispatch_kept(state, layer, ids, kept)
            else:
                state, slots = jeplb.dispatch(state, layer, ids, record=variant not in _ONCE)
                kept.append(ids)
            acc = _experts(acc, w[layer], slots)
        if variant in _ONCE:
            state = state.record_ids(jnp.stack(kept))
        if variant in _KEPT:
            state = state.record_slots(kept)
        state, w, info = _maybe_idle_step(variant, state, w, mesh)
        return state, w, acc, info

    return step


def _maybe_idle_step(variant, state, w, mesh):
    """The variant's idle `jeplb.eplb_step` (its StepInfo's balancedness and fired returned,
    except by the host-scheduled variants without "+ balancedness", which read nothing)."""
    import jeplb

    if variant in (END_PASS, ONCE_END_PASS):
        return jeplb.end_pass(state), w, None
    if variant not in _IDLE:
        return state, w, None
    state, w, info = jeplb.eplb_step(state, w, mesh=mesh, idle=variant in _HOST_IDLE)
    if variant in (IDLE_HOST, ONCE_IDLE_HOST, KEPT_IDLE_HOST):
        return state, w, None  # nothing is due: fired is False, nothing to read
    return state, w, (info.balancedness, info.layer_balancedness, info.fired)


def _scanned(case: DecodeCase, variant: str, mesh):
    from jax import lax

    import jeplb

    def step(state, w, acc, ids0):
        if variant == PLAIN:

            def layer(acc, xs):
                ids0_l, w_l = xs
                return _experts(acc, w_l, route(case, acc, ids0_l)), None

            acc, _ = lax.scan(layer, acc, (ids0, w))
            return state, w, acc, None

        if variant in _KEPT:
            return _scanned_kept(case, variant, mesh, state, w, acc, ids0)
        choice = {}
        if variant == BALANCED:
            choice = dict(
                replica_choice="balanced",
                slots_per_device=state.slots_per_device,
                num_devices=state.num_devices,
            )

        def layer(acc, xs):
            ids0_l, w_l, log2phy, logcnt = xs
            ids = route(case, acc, ids0_l)
            slots, counts = jeplb.dispatch_layer(log2phy, logcnt, ids, **choice)
            return _experts(acc, w_l, slots), ids if variant in _ONCE else counts

        acc, out = lax.scan(layer, acc, (ids0, w, state.log2phy, state.logcnt))
        state = state.record_ids(out) if variant in _ONCE else state.record(out)
        state, w, info = _maybe_idle_step(variant, state, w, mesh)
        return state, w, acc, info

    return step


def _scanned_kept(case: DecodeCase, variant: str, mesh, state, w, acc, ids0):
    """The scanned step with `jeplb.dispatch_kept`: every layer's slots written into one
    [L, T, K] array carried through the scan, counted once after it."""
    import jax.numpy as jnp
    from jax import lax

    import jeplb

    def layer(carry, xs):
        acc, kept = carry
        index, ids0_l, w_l = xs
        kept, slots = jeplb.dispatch_kept(state, index, route(case, acc, ids0_l), kept)
        return (_experts(acc, w_l, slots), kept), None

    kept = jnp.full((case.layers, case.tokens, case.top_k), -1, jnp.int32)
    (acc, kept), _ = lax.scan(layer, (acc, kept), (jnp.arange(case.layers), ids0, w))
    state, w, info = _maybe_idle_step(variant, state.record_slots(kept), w, mesh)
    return state, w, acc, info


def build(case: DecodeCase, variant: str, layout: str, *, seed: int = 0):
    """(jitted step, its first arguments) for one variant and layout on the first device."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jeplb

    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    window = 1 if variant == IDLE_ONE or variant not in _IDLE else 1000
    state = jeplb.EplbState.create(
        num_layers=case.layers,
        num_experts=case.experts,
        num_devices=1,
        num_redundant_experts=case.slots - case.experts,
        window_size=window,
        step_interval=10**9,
        replica_choice="balanced" if variant == BALANCED else "hash",
    ).replicated(mesh)
    rng = np.random.default_rng(seed)
    draw = np.argsort(rng.random((case.layers, case.tokens, case.experts)), axis=-1)
    ids0 = jax.device_put(draw[..., : case.top_k].astype(np.int32), dev)
    w = jax.device_put(
        rng.uniform(-1, 1, (case.layers, case.slots, case.hidden)).astype(np.float32),
        NamedSharding(mesh, P(None, "ep")),
    )
    acc = jax.device_put(rng.uniform(-1, 1, (case.tokens, case.hidden)).astype(np.float32), dev)
    body = (_unrolled if layout == "unrolled" else _scanned)(case, variant, mesh)
    fn = jax.jit(body, donate_argnums=(0, 1, 2))
    del jnp
    return fn, (state, w, acc, ids0)


@dataclasses.dataclass
class Timing:
    layout: str
    variant: str
    call_us: float
    pipelined_us: float
    over_plain_us: float = float("nan")
    over_dispatch_us: float = float("nan")


def time_steps(
    programs: dict, *, repeats: int, warmup: int = 5, burst: int = 10, samples: int = 20
) -> dict:
    """Per program ``(call_us, pipelined_us)``: medians of ``repeats`` synchronised calls and of
    ``samples`` bursts of ``burst`` back-to-back calls, the programs taking turns (a change of
    machine load hits all alike), after ``warmup`` calls each.

    ``programs`` maps a name to ``(fn, args)``: ``fn(*args)`` returns at least three outputs,
    the next call's first three arguments (donated state, weights and activations)."""
    import jax

    progs = {}
    for name, (fn, args) in programs.items():
        carry = list(args)
        for _ in range(warmup):
            carry[:3] = fn(*carry)[:3]
        jax.block_until_ready(carry)
        progs[name] = dict(fn=fn, carry=carry, call=[], burst=[])

    def once(p):
        out = p["fn"](*p["carry"])
        p["carry"][:3] = out[:3]
        return out

    for _ in range(repeats):
        for p in progs.values():
            t = time.perf_counter()
            jax.block_until_ready(once(p))
            p["call"].append(time.perf_counter() - t)
    for _ in range(samples):
        for p in progs.values():
            t = time.perf_counter()
            for _ in range(burst - 1):
                once(p)
            jax.block_until_ready(once(p))
            p["burst"].append((time.perf_counter() - t) / burst)
    return {
        name: (1e6 * float(np.median(p["call"])), 1e6 * float(np.median(p["burst"])))
        for name, p in progs.items()
    }


def measure(
    case: DecodeCase,
    *,
    variants=VARIANTS,
    layouts=LAYOUTS,
    repeats: int = 100,
    warmup: int = 5,
    burst: int = 10,
    samples: int = 20,
    progress=None,
) -> list[Timing]:
    """Medians per step of every (layout, variant), interleaved; see the module docstring."""
    built = {}
    for layout in layouts:
        for variant in variants:
            t0 = time.perf_counter()
            built[(layout, variant)] = build(case, variant, layout)
            if progress:
                progress(f"{layout} {variant}: built in {time.perf_counter() - t0:.1f} s")
    medians = time_steps(built, repeats=repeats, warmup=warmup, burst=burst, samples=samples)
    rows = []
    for layout in layouts:
        base = {}
        for variant in variants:
            row = Timing(layout, variant, *medians[(layout, variant)])
            base[variant] = row
            if PLAIN in base:
                row.over_plain_us = row.call_us - base[PLAIN].call_us
            if DISPATCH in base and variant != DISPATCH:
                row.over_dispatch_us = row.call_us - base[DISPATCH].call_us
            rows.append(row)
    return rows


def per_layer_table(med: dict, ops: dict, *, layers: int, first: str = "form", base_of=None,
                    extra=None) -> list[str]:  # fmt: skip
    """Markdown lines, a row per program of ``ops`` (its launches, in its order): its times per
    step from ``med`` (`time_steps`' medians) and per layer over its base step (``base_of(name)``,
    by default ``"plain"``); ``extra``: an optional ``(title, cell(name))`` last column."""
    head = [first, "operations per step", "call_us", "pipelined_us", "per layer, call"]
    head += ["per layer, pipelined"] + ([extra[0]] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ops:
        (c, b), base = med[name], med[base_of(name) if base_of else "plain"]
        cells = [name, ops[name], f"{c:.0f}", f"{b:.0f}"]
        cells += [f"{(c - base[0]) / layers:.2f}", f"{(b - base[1]) / layers:.2f}"]
        lines.append(
            "| " + " | ".join(map(str, cells + ([extra[1](name)] if extra else []))) + " |"
        )
    return lines


def entry_ops(compiled_text: str) -> list[str]:
    """The operations of a compiled HLO module's entry computation that do work (what one call
    launches: fusions, custom calls, copies, conditionals, loops ...), one line each, shortened."""
    return _work(_computations(compiled_text).get("ENTRY", []))


def loop_body_ops(compiled_text: str) -> list[str]:
    """What one trip of each while loop of a compiled HLO module launches (`entry_ops`' lines),
    loops in the module's order."""
    comps = _computations(compiled_text)
    bodies = re.findall(r"\swhile\(.*?body=%?([\w.\-]+)", compiled_text)
    return [op for body in bodies for op in _work(comps.get(body, []))]


def _computations(compiled_text: str) -> dict[str, list[str]]:
    """A compiled HLO module's computations by name (the entry's as ``ENTRY``): their lines."""
    comps, lines = {}, None
    for line in compiled_text.splitlines():
        head = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            lines = comps.setdefault("ENTRY" if head.group(1) else head.group(2), [])
        elif line.startswith("}"):
            lines = None
        elif lines is not None:
            lines.append(line.strip())
    return comps


def _work(lines: list[str]) -> list[str]:
    """The lines of one computation that do work, shortened to ``name: op kind``."""
    skip = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")
    out = []
    for text in lines:
        if "=" not in text:
            continue
        name, rest = text.split("=", 1)
        found = re.search(r"\s([a-z][\w-]*)\(", rest)
        op = found.group(1) if found else rest.strip()[:40]
        if op in skip:
            continue
        kind = ""
        for key in ("kind=", "custom_call_target=", "calls="):
            if key in rest:
                kind += " " + rest.split(key, 1)[1].split(",")[0].split("}")[0]
        out.append(f"{name.strip()}: {op}{kind}"[:160])
    return out


def cpu_quiet() -> str:
    """The load average, for a results file."""
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def first_layer_ops(case: DecodeCase, *, replica_choice: str = "hash") -> list[str]:
    """What one layer's `jeplb.dispatch_layer` launches, compiled alone at the case's shapes."""
    import jax
    import jax.numpy as jnp

    import jeplb

    state = jeplb.EplbState.create(
        num_layers=1,
        num_experts=case.experts,
        num_devices=1,
        num_redundant_experts=case.slots - case.experts,
        window_size=1,
        step_interval=1,
    )
    ids = jnp.zeros((case.tokens, case.top_k), jnp.int32)
    choice = {}
    if replica_choice != "hash":
        choice = dict(replica_choice=replica_choice, slots_per_device=case.slots, num_devices=1)
    f = jax.jit(functools.partial(jeplb.dispatch_layer, **choice))
    text = f.lower(state.log2phy[0], state.logcnt[0], ids).compile().as_text()
    return entry_ops(text)


def idle_step_text(case: DecodeCase, *, window: int = 1000) -> str:
    """The compiled HLO of `jeplb.eplb_step` alone at the case's shapes, no rebalance due."""
    import jax
    from jax.sharding import Mesh

    import jeplb

    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    _, (state, w, _, _) = build(case, IDLE_BIG if window > 1 else IDLE_ONE, "unrolled")
    step = jax.jit(functools.partial(jeplb.eplb_step, mesh=mesh), donate_argnums=(0, 1))
    return step.lower(state, w).compile().as_text()

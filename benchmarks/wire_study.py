"""Design study (numpy, nothing built): wire rounds of static-permutation schedules at large D.

Usage (from the repository root):
    python benchmarks/wire_study.py [--layers L] [--out PATH]

Model. The transfer moves each primary row (a slot that receives its expert from another device)
in *unit rounds*: in a unit round every device sends at most one row along the same static
permutation (one ppermute; a round of chunk c is c unit rounds of one permutation), so the rows
the busiest device moves, padding included, equal the number T of unit rounds. The floor is the
plan's (`jeplb._src.transfer.plan`): the most rows any device must send or receive with the plan's
senders. The plans are the transfer benchmark's (`make_plan`, seed 0, 256 experts, D = 8..256,
reshuffle and drift, P as there); every figure is a median over layers of T / floor:

* (a) ``bound``: a lower bound on T for every schedule whose rounds are cyclic shifts (any shift,
  chosen per round from the plan, any number of hops per row, any device relaying, unbounded
  buffers), from load and reachability (`lower_bound`; the argument is in wire_study.md), and a
  heuristic for other families of K permutations (`family_log10_k`).
* (b) ``rotation``: today's schedule. Greedy forwarding schedules (`route`) over a family of
  static permutations (`family`): ``cube`` (shifts 2^k), ``signed`` (+-2^k), ``twohop``
  ({1..q-1} u {q, 2q, ...}), ``all+xor`` (the D - 1 shifts and the D - 1 XOR maps, direct), each
  with the senders chosen three ways (`senders`), and ``cube`` with seeded restarts and with at
  most N rows in transit per device.

The results file keeps the hand-written reading that follows its tables (from ``## Reading``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jeplb.tools.bench_transfer import _slots_for, make_plan
from jeplb.tools.benchio import table, write_results

DEVICES = (8, 16, 32, 64, 128, 256)
READING = "## Reading"
TARGET = {8: 2.0, 16: 2.0, 32: 2.0, 64: 2.5, 128: 2.5, 256: 2.5}


@dataclasses.dataclass
class Layer:
    """One layer's remote rows: m primaries, their receiver and the devices holding their expert."""

    d: int
    n: int
    dst: np.ndarray  # int[m]
    expert: np.ndarray  # int[m]
    holders: list  # m arrays of device ids
    plan_src: np.ndarray  # int[m], the plan's sender
    rotation: int  # unit rounds of the rotation schedule (chunk 1)
    floor: int  # the plan's floor


def primaries(old: np.ndarray, new: np.ndarray, d: int):
    """(dst int[m], expert int[m], hold bool[E, D]) of one layer, as plan.py classifies slots."""
    p_total = old.shape[0]
    n = p_total // d
    dev = np.arange(p_total) // n
    num_e = int(max(old.max(), new.max())) + 1
    hold = np.zeros((num_e, d), bool)
    hold[old[old >= 0], dev[old >= 0]] = True
    changed = (new >= 0) & (new != old)
    remote = changed & ~hold[np.maximum(new, 0), dev]
    seen, dst, exp = set(), [], []
    for p in np.nonzero(remote)[0]:
        key = (int(dev[p]), int(new[p]))
        if key not in seen:  # the lowest slot of a device wanting an expert is the primary
            seen.add(key)
            dst.append(key[0])
            exp.append(key[1])
    return np.array(dst, np.int64), np.array(exp, np.int64), hold


def plan_senders(dst, holders, d: int):
    """plan.py's sender choice (flat network) and its rotation rounds: fewest holders first, each
    to the holder whose round grows least, then the least loaded, then the lowest index."""
    pair = np.zeros((d, d), np.int64)
    send = np.zeros(d, np.int64)
    rmax = np.zeros(d, np.int64)
    src = np.zeros(len(dst), np.int64)
    order = sorted(range(len(dst)), key=lambda i: len(holders[i]))  # stable: slot order
    for i in order:
        h = holders[i]
        s = (dst[i] - h) % d
        grows = pair[h, s] + 1 > rmax[s]
        k = int(np.lexsort((h, send[h], grows))[0])
        a, sh = int(h[k]), int(s[k])
        pair[a, sh] += 1
        send[a] += 1
        rmax[sh] = max(rmax[sh], pair[a, sh])
        src[i] = a
    recv = np.bincount(dst, minlength=d)
    return src, int(rmax[1:].sum()), int(max(send.max(initial=0), recv.max(initial=0)))


def layers_for(kind: str, d: int, num_layers: int) -> list[Layer]:
    """The benchmark's plans (seed 0, 256 experts, P as the transfer benchmark)."""
    p_total = _slots_for(d)
    old, new = make_plan(kind, 0, num_layers, p_total, 256)
    out = []
    for o, w in zip(old, new, strict=True):
        dst, exp, hold = primaries(o, w, d)
        holders = [np.nonzero(hold[e])[0] for e in exp]
        src, rot, floor = plan_senders(dst, holders, d)
        out.append(Layer(d, p_total // d, dst, exp, holders, src, rot, floor))
    return out


# --- (a) the lower bound -------------------------------------------------------------------------


def disjoint_packing(sets: list[np.ndarray]) -> int:
    """Size of a family of pairwise disjoint sets among ``sets``, greedily (smallest first): any
    set of shifts whose subset sums meet every set holds at least this many distinct values."""
    used: set[int] = set()
    count = 0
    for s in sorted(sets, key=len):
        vals = {int(v) for v in s}
        if not vals & used:
            used |= vals
            count += 1
    return count


def lower_bound(layer: Layer) -> tuple[int, int, int]:
    """(T lower bound, its load part, its reachability part) for shift schedules (see the
    results file for the argument). Load: a device receives one row per unit round; a device
    sends one row per unit round, and an expert that only it holds must leave it at least once;
    the holders of an expert wanted by k devices at most double each round (receivers may relay).
    Reachability: a row goes from a holder h to v only if v - h is a subset sum of the rounds'
    shifts, and T shifts have at most 2^T - 1 nonzero subset sums."""
    d = layer.d
    recv = int(np.bincount(layer.dst, minlength=d).max(initial=0))
    sole = np.zeros(d, np.int64)
    wanted: dict[int, int] = {}
    holders: dict[int, int] = {}
    for h, e in zip(layer.holders, layer.expert, strict=True):
        wanted[int(e)] = wanted.get(int(e), 0) + 1
        holders[int(e)] = len(h)
    sole_pairs = {
        (int(h[0]), int(e)) for h, e in zip(layer.holders, layer.expert, strict=True) if len(h) == 1
    }
    for h, _ in sole_pairs:
        sole[h] += 1
    spread = max(
        (math.ceil(math.log2((k + holders[e]) / holders[e])) for e, k in wanted.items()), default=0
    )
    load = max(recv, int(sole.max(initial=0)), spread)
    offsets = [(v - h) % d for v, h in zip(layer.dst, layer.holders, strict=True)]
    nu = disjoint_packing(offsets)
    reach = math.ceil(math.log2(nu + 1)) if nu else 0
    return max(load, reach), load, reach


def best_floor(layer: Layer) -> int:
    """The smallest floor any choice of senders gives (no relaying): max(rows a device receives,
    least possible max rows a device sends), by bisection over b-matchings."""
    d, m = layer.d, len(layer.dst)
    recv = int(np.bincount(layer.dst, minlength=d).max(initial=0))

    def fits(cap: int) -> bool:
        owner = {}  # (device, copy) -> row
        for i in range(m):
            seen: set[int] = set()
            if not _augment(i, cap, layer.holders, owner, seen):
                return False
        return True

    lo, hi = 1, max(layer.floor, 1)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return max(recv, lo) if m else 0


def _augment(i, cap, holders, owner, seen) -> bool:
    """Kuhn's augmenting path: gives row i a copy slot of one of its holders."""
    for h in holders[i]:
        h = int(h)
        if h in seen:
            continue
        seen.add(h)
        for c in range(cap):
            j = owner.get((h, c))
            if j is None or _augment(j, cap, holders, owner, seen):
                owner[(h, c)] = i
                return True
    return False


def family_log10_k(layer: Layer, t: int) -> float:
    """Heuristic for general families: log10 of the family size K below which T = t rounds serve
    the layer with probability < 1 when receivers are uniform and independent (union bound over
    K^t sequences; from each holder at most 2^t - 1 devices are reachable)."""
    d = layer.d
    reach = 2**t - 1
    logp = sum(math.log10(min(1.0, len(h) * reach / (d - 1))) for h in layer.holders)
    return -logp / t if t else float("inf")


# --- (b) greedy forwarding schedules over a family of static permutations ------------------------


def family(name: str, d: int) -> np.ndarray:
    """int[K, D]: the family's permutations (``perms[k, x]``: where device x sends in round k).

    ``cube`` the shifts 2^k, ``signed`` +-2^k, ``twohop`` {1..q-1} u {q, 2q, ...} with
    q = ceil(sqrt(D)) (every offset within two hops), ``all`` the D - 1 shifts (today's set),
    ``all+xor`` those and the D - 1 maps x -> x XOR c (D a power of two).
    """
    pow2 = [1 << k for k in range(d.bit_length() - 1) if 1 << k < d]
    if name == "cube":
        shifts = pow2
    elif name == "signed":
        shifts = pow2 + [-x for x in pow2]
    elif name == "twohop":
        q = math.ceil(math.sqrt(d))
        shifts = list(range(1, q)) + list(range(q, d, q))
    elif name in ("all", "all+xor"):
        shifts = list(range(1, d))
    else:
        raise ValueError(f"name: unknown family {name!r}")
    x = np.arange(d)
    perms = [(x + s) % d for s in sorted({s % d for s in shifts} - {0})]
    if name == "all+xor":
        perms += [x ^ c for c in range(1, d)]
    return np.array(perms, np.int64)


def hop_table(perms: np.ndarray) -> np.ndarray:
    """int[D, D]: fewest rounds of the family taking a row from device x to device v."""
    d = perms.shape[1]
    adj = np.zeros((d, d), bool)
    adj[np.tile(np.arange(d), len(perms)), perms.ravel()] = True
    dist = np.where(np.eye(d, dtype=bool), 0, -1)
    reach, k = np.eye(d, dtype=bool), 0
    while (dist < 0).any():
        k += 1
        reach = (reach.astype(np.int32) @ adj.astype(np.int32)) > 0
        dist[reach & (dist < 0)] = k
    return dist


def senders(layer: Layer, dist: np.ndarray, how: str) -> np.ndarray:
    """Each row's sender among its expert's holders (rows with fewest holders chosen first):
    ``plan`` plan.py's choice; ``near`` fewest hops, then least loaded; ``spread`` least loaded,
    then fewest hops."""
    if how == "plan":
        return layer.plan_src
    send = np.zeros(layer.d, np.int64)
    src = np.zeros(len(layer.dst), np.int64)
    for i in sorted(range(len(layer.dst)), key=lambda i: len(layer.holders[i])):
        h = layer.holders[i]
        keys = (h, send[h], dist[h, layer.dst[i]])
        k = int(np.lexsort(keys if how == "near" else (h, keys[2], keys[1]))[0])
        src[i] = h[k]
        send[h[k]] += 1
    return src


@dataclasses.dataclass
class Routed:
    rounds: int  # unit rounds T
    collectives: int  # runs of one permutation (c unit rounds in a row: one chunk-c collective)
    perms_used: int
    peak_transit: int  # most rows one device holds for others at once


def route(
    layer: Layer,
    perms: np.ndarray,
    dist: np.ndarray,
    src: np.ndarray,
    *,
    beta: float = 1.0,
    rng: np.random.Generator | None = None,
    cap: int | None = None,
) -> Routed:
    """Greedy forwarding: each unit round takes the permutation of ``perms`` that moves the most
    urgent rows one hop closer (see `_pick`), every device sending at most one row. With ``rng``,
    each row's worth is multiplied by a random factor e^(N(0, 1/4)) (a seeded restart). With
    ``cap``, no row is forwarded into a device already holding ``cap`` rows for others (unless no
    row could move at all)."""
    d, dst = layer.d, layer.dst
    pos = src.copy()
    live = pos != dst
    seq, peak = [], 0
    while live.any():
        idx = np.nonzero(live)[0]
        left = dist[pos[idx], dst[idx]]
        # can[r, k]: row r gets one hop closer in a round of permutation k.
        can = dist[perms[:, pos[idx]].T, dst[idx][:, None]] == (left - 1)[:, None]
        if cap is not None:
            held = np.bincount(pos[live & (pos != src)], minlength=d)
            to = perms[:, pos[idx]].T  # [m, K]
            room = (to == dst[idx][:, None]) | (held[to] < cap) | (to == src[idx][:, None])
            if (can & room).any():
                can = can & room
        k, go = _pick(d, dst[idx], pos[idx], can, left, beta, rng)
        pos[idx[go]] = perms[k, pos[idx[go]]]
        live = pos != dst
        seq.append(k)
        transit = live & (pos != src)
        if transit.any():
            peak = max(peak, int(np.bincount(pos[transit], minlength=d).max()))
    runs = 1 + int(np.count_nonzero(np.diff(seq))) if seq else 0
    return Routed(len(seq), runs, len(set(seq)), peak)


def _pick(d: int, dst, pos, can, left, beta: float, rng):
    """One unit round: (permutation index, positions in ``pos`` of the rows it moves). Each row
    is worth e^(beta (u - U)) for its sender's and its receiver's urgency u (hops the sender
    holds, rows the receiver still waits for; U the largest): the busiest devices must work
    every round for T to stay near the floor. The permutation moving the most worth wins; each
    device sends its worthiest row that it can move."""
    work = np.bincount(pos, weights=left, minlength=d)
    due = np.bincount(dst, minlength=d).astype(float)
    top = max(work.max(), due.max())
    val = np.exp(beta * (work[pos] - top)) + np.exp(beta * (due[dst] - top))
    if rng is not None:
        val = val * np.exp(0.5 * rng.standard_normal(len(val)))
    best = np.zeros((d, can.shape[1]))
    r, k = np.nonzero(can)
    np.maximum.at(best, (pos[r], k), val[r])
    k = int(np.argmax(best.sum(0)))
    cand = np.nonzero(can[:, k])[0]
    order = np.lexsort((cand, -val[cand], pos[cand]))
    cand = cand[order]
    return k, cand[np.unique(pos[cand], return_index=True)[1]]


# --- tables --------------------------------------------------------------------------------------


@dataclasses.dataclass
class BoundRow:
    devices: int
    plan: str
    slots_per_device: int
    floor: float
    best_floor: float
    rows: float
    packing: float
    bound_load: float
    bound_reach: float
    bound_ratio: float
    rotation_ratio: float
    target: float
    beyond_target: float
    log10_k: float


@dataclasses.dataclass
class ScheduleRow:
    devices: int
    plan: str
    bound: float
    rotation: float
    cube: float
    signed: float
    twohop: float
    cube_restarts: float
    cube_cap: float
    all_xor: float
    best: float
    best_max: float
    best_capped: float
    target: float


@dataclasses.dataclass
class CapacityRow:
    devices: int
    plan: str
    cube_hops: float
    cube_bound: float
    signed_hops: float
    signed_bound: float
    twohop_hops: float
    twohop_bound: float


@dataclasses.dataclass
class SenderRow:
    devices: int
    plan: str
    cube_plan: float
    cube_near: float
    cube_spread: float
    twohop_plan: float
    twohop_near: float
    twohop_spread: float


@dataclasses.dataclass
class CostRow:
    devices: int
    plan: str
    schedule: str
    compiled: int
    perms_used: float
    collectives: float
    unit_rounds: float
    transit_over_n: float


FAMILIES = ("cube", "signed", "twohop")
RESTARTS = 8


def _restarts(layer_index: int):
    """The seeded restarts of one layer: (beta, generator) pairs, deterministic."""
    for j in range(RESTARTS):
        yield (0.5, 1.0, 2.0, 4.0)[j % 4], np.random.default_rng(1000 * layer_index + j)


HOW = ("plan", "near", "spread")


def study(d: int, kind: str, num_layers: int):
    """Every table's rows for one D and plan kind."""
    layers = layers_for(kind, d, num_layers)
    floor = np.array([max(x.floor, 1) for x in layers], np.float64)
    med = lambda a: float(np.median(np.asarray(a, np.float64)))  # noqa: E731
    bounds = np.array([lower_bound(x) for x in layers], np.float64)
    target = TARGET[d]
    t_target = [math.floor(target * f) for f in floor]
    offsets = [[(v - h) % d for v, h in zip(x.dst, x.holders, strict=True)] for x in layers]
    brow = BoundRow(
        d, kind, layers[0].n, med(floor), med([best_floor(x) for x in layers]),
        med([len(x.dst) for x in layers]), med([disjoint_packing(o) for o in offsets]),
        med(bounds[:, 1] / floor), med(bounds[:, 2] / floor), med(bounds[:, 0] / floor),
        med([x.rotation for x in layers] / floor), target,
        float(np.mean(bounds[:, 0] / floor > target)),
        med([family_log10_k(x, t) for x, t in zip(layers, t_target, strict=True)]),
    )  # fmt: skip
    runs = {}  # (family, senders) -> list of Routed per layer
    cap = [d, kind]
    for name in (*FAMILIES, "all+xor"):
        perms = family(name, d)
        dist = hop_table(perms)
        if name in FAMILIES:
            # Each unit round moves at most D rows one hop: T >= (sum of the rows' fewest hops) / D.
            need = np.array([sum(dist[h, v].min() for v, h in zip(x.dst, x.holders, strict=True))
                             for x in layers], np.float64)  # fmt: skip
            rows = np.maximum([len(x.dst) for x in layers], 1)
            cap += [med(need / rows), med(np.maximum(np.ceil(need / d), floor) / floor)]
        for how in HOW if name != "all+xor" else ("plan",):
            runs[name, how] = [route(x, perms, dist, senders(x, dist, how)) for x in layers]
    perms = family("cube", d)
    dist = hop_table(perms)
    runs["cube+restarts", "near"] = [
        min(
            [runs["cube", "near"][i]]
            + [
                route(x, perms, dist, senders(x, dist, "near"), beta=b, rng=rng)
                for b, rng in _restarts(i)
            ],
            key=lambda r: r.rounds,
        )
        for i, x in enumerate(layers)
    ]
    runs["cube+cap", "near"] = [
        route(x, perms, dist, senders(x, dist, "near"), cap=x.n) for x in layers
    ]
    ratio = {key: np.array([r.rounds for r in v]) / floor for key, v in runs.items()}
    rotation = np.array([x.rotation for x in layers]) / floor
    best = np.min([rotation] + [ratio[k] for k in runs if k[0] in (*FAMILIES, "cube+restarts")], 0)
    best_cap = np.min([rotation, ratio["cube+cap", "near"]], axis=0)
    srow = ScheduleRow(
        d, kind, brow.bound_ratio, brow.rotation_ratio,
        *(med(np.min([ratio[f, h] for h in HOW], axis=0)) for f in FAMILIES),
        med(ratio["cube+restarts", "near"]), med(ratio["cube+cap", "near"]),
        med(ratio["all+xor", "plan"]), med(best), float(best.max()), med(best_cap), target,
    )  # fmt: skip
    sender = SenderRow(d, kind, *(med(ratio[f, h]) for f in ("cube", "twohop") for h in HOW))
    costs = []
    for name in (*FAMILIES, "cube+restarts", "cube+cap"):
        hows = HOW if name in FAMILIES else ("near",)
        pick = np.argmin([ratio[name, h] for h in hows], axis=0)
        chosen = [runs[name, hows[j]][i] for i, j in enumerate(pick)]
        costs.append(
            CostRow(
                d, kind, name, len(family(name.split("+")[0], d)), med([r.perms_used for r in chosen]),
                med([r.collectives for r in chosen]), med([r.rounds for r in chosen]),
                max(r.peak_transit for r in chosen) / layers[0].n,
            )
        )  # fmt: skip
    return brow, srow, CapacityRow(*cap), sender, costs


def main(argv: list[str] | None = None) -> int:
    """Runs the study and writes benchmarks/results/wire_study.md (or --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="layers per plan (default 32)")
    ap.add_argument("--out", default=None, help="markdown results file")
    args = ap.parse_args(argv)
    cmd = " ".join(["python benchmarks/wire_study.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.perf_counter()
    bounds, scheds, caps, sends, costs = [], [], [], [], []
    for d in DEVICES:
        for kind in ("reshuffle", "drift"):
            b, s, h, r, c = study(d, kind, args.layers)
            bounds.append(b)
            scheds.append(s)
            caps.append(h)
            sends.append(r)
            costs += c
            print(s, flush=True)
    fmt = "{:.2f}"
    text = (
        "# Wire rounds of static-permutation schedules at large D (design study, numpy)\n\n"
        f"Command: `{cmd}`\n\n"
        + table(
            bounds, "(a) Lower bound for shift schedules (medians over layers)", float_format=fmt
        )
        + "\n"
        + table(scheds, "(b) Unit rounds / floor, medians over layers", float_format=fmt)
        + "\n"
        + table(
            caps,
            "Hop capacity of each family: mean fewest hops per row, and the bound "
            "max(floor, ceil(sum of hops / D)) / floor (no relaying)",
            float_format=fmt,
        )
        + "\n"
        + table(sends, "Which copy sends: unit rounds / floor by sender choice", float_format=fmt)
        + "\n"
        + table(costs, "What the greedy schedules would cost to build and run", float_format=fmt)
    )
    print(text)
    print(f"{time.perf_counter() - t0:.1f} s")
    here = os.path.dirname(os.path.abspath(__file__))
    out = args.out or os.path.join(here, "results", "wire_study.md")
    if os.path.exists(out):  # the hand-written reading after the tables is kept
        with open(out) as f:
            old = f.read()
        if READING in old:
            text += "\n" + old[old.index(READING) :]
    write_results(text, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""An independent numpy model of the transfer's semantics, and generators of test plans.

The model does not pick senders (any holder is allowed); it returns, for every slot, the set of old
slots whose row the slot may hold afterwards, so a check accepts exactly the rows the semantics allow:

* unchanged slot (same expert, or -1 in the new map): its own old row, bit for bit;
* changed slot whose new expert some slot of its own device held: the first such slot's old row;
* otherwise: the old row of some slot (on another device) that held the expert, and every slot of
  one device that wants the same remote expert holds the same row (received once per device).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np


def allowed_sources(old: np.ndarray, new: np.ndarray, num_devices: int) -> list[list[list[int]]]:
    """For maps [L, P]: ``allowed[l][p]`` = old slots whose row slot p may hold after the move."""
    num_layers, p_total = old.shape
    n = p_total // num_devices
    out = []
    for layer in range(num_layers):
        o, w = old[layer], new[layer]
        row = []
        for p in range(p_total):
            e = w[p]
            dev = p // n
            if e == -1 or e == o[p]:
                row.append([p])
                continue
            mine = [q for q in range(dev * n, (dev + 1) * n) if o[q] == e]
            row.append(mine[:1] if mine else [q for q in range(p_total) if o[q] == e])
        out.append(row)
    return out


def check_rows(before: np.ndarray, after: np.ndarray, old, new, num_devices: int) -> None:
    """Asserts ``after`` (a leaf [L, P, ...] as raw bytes) obeys the semantics given ``before``."""
    num_layers, p_total = old.shape
    n = p_total // num_devices
    b = before.reshape(num_layers, p_total, -1)
    a = after.reshape(num_layers, p_total, -1)
    allowed = allowed_sources(old, new, num_devices)
    for layer in range(num_layers):
        for p in range(p_total):
            ok = any(np.array_equal(a[layer, p], b[layer, q]) for q in allowed[layer][p])
            assert ok, (
                f"layer {layer} slot {p}: old {old[layer].tolist()} new {new[layer].tolist()}: "
                f"row is none of the allowed old slots {allowed[layer][p]}"
            )
        # Received once per device: slots of one device wanting the same remote expert agree.
        for dev in range(num_devices):
            slots = range(dev * n, (dev + 1) * n)
            for p in slots:
                for q in slots:
                    both_change = new[layer, p] != old[layer, p] and new[layer, q] != old[layer, q]
                    if q > p and new[layer, p] == new[layer, q] != -1 and both_change:
                        assert np.array_equal(a[layer, p], a[layer, q]), (layer, p, q)


# ------------------------------------------------------------------------------------ plans

KINDS = ("random", "drift", "noop", "reversal", "hotspot", "empties", "rotate")


def placement(rng: np.random.Generator, num_experts: int, p_total: int, empty: float = 0.0):
    """A random map [P]: every expert at least once, the rest replicas or (with ``empty``) -1."""
    extra = rng.integers(0, num_experts, p_total - num_experts)
    extra = np.where(rng.random(p_total - num_experts) < empty, -1, extra)
    return rng.permutation(np.concatenate([np.arange(num_experts), extra])).astype(np.int32)


def make_plan(kind: str, seed: int, num_layers: int, p_total: int, num_experts: int, d: int):
    """Maps (old, new) int32[L, P] of the given kind; every expert of ``new`` is in ``old``."""
    rng = np.random.default_rng(seed)
    n = p_total // d
    old = np.stack([placement(rng, num_experts, p_total) for _ in range(num_layers)])
    if kind == "random":
        new = np.stack([placement(rng, num_experts, p_total) for _ in range(num_layers)])
    elif kind == "drift":
        new = old.copy()
        for layer in range(num_layers):
            k = max(1, p_total // 10)
            slots = rng.choice(p_total, k, replace=False)
            new[layer, slots] = rng.choice(old[layer], k)
    elif kind == "noop":
        new = old.copy()
    elif kind == "reversal":
        new = old[:, ::-1].copy()
    elif kind == "rotate":
        new = np.roll(old, n, axis=1)
    elif kind == "hotspot":
        # Everyone wants an expert that only device 0 holds.
        old[:, 0] = num_experts  # a private expert on device 0
        num = num_experts + 1
        new = np.stack([placement(rng, num, p_total) for _ in range(num_layers)])
        new[rng.random((num_layers, p_total)) < 0.6] = num_experts
        for layer in range(num_layers):
            keep = np.isin(new[layer], old[layer])
            new[layer] = np.where(keep, new[layer], num_experts)
    elif kind == "empties":
        old = np.stack([placement(rng, num_experts, p_total, 0.5) for _ in range(num_layers)])
        new = np.stack([placement(rng, num_experts, p_total, 0.5) for _ in range(num_layers)])
    else:
        raise ValueError(kind)
    return old.astype(np.int32), np.ascontiguousarray(new, dtype=np.int32)


# Trailing shapes of the test leaves: several shapes and dtypes in one weights tree.
LEAF_SPECS = {
    "w13": ((2, 3), "bfloat16"),
    "w2": ((4,), "float32"),
    "q": ((5,), "int8"),
    "fp8": ((8,), "float8_e4m3fn"),
    "scale": ((1,), "float32"),
}


def random_bytes(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array of ``dtype`` filled with random bytes (NaN payloads, infinities and subnormals
    included)."""
    dtype = np.dtype(dtype)
    raw = rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def make_leaves(
    rng: np.random.Generator, num_layers: int, rows: int, names=tuple(LEAF_SPECS)
) -> dict[str, np.ndarray]:
    """Leaves [L, rows, ...] named ``names`` (see LEAF_SPECS), filled with random bytes."""
    import ml_dtypes  # bfloat16 and fp8 numpy dtypes, installed with jax

    out = {}
    for name in names:
        trailing, dtype = LEAF_SPECS[name]
        dt = getattr(ml_dtypes, dtype) if dtype in ("bfloat16", "float8_e4m3fn") else dtype
        out[name] = random_bytes(rng, (num_layers, rows, *trailing), dt)
    return out


def program(mesh, *, num_leaves: int = 1, donate: bool = True, **options):
    """The cached jitted program `rearrange_expert_weights` runs for ``num_leaves`` leaves sharded
    ``PartitionSpec(None, "ep")`` on ``mesh`` with the given `TransferConfig` options."""
    from jeplb._src.transfer import api

    return api.program_for(mesh, num_leaves=num_leaves, donate=donate, **options)


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compilations():
    """Counts XLA backend compilations (jax's own monitoring event) inside the block."""
    seen = []

    def listener(event, duration_secs, **kwargs):
        if event == COMPILE_EVENT:
            seen.append(duration_secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

"""`refine.swap_refine` as one Pallas kernel (GPUs): one program per row, its swaps in a loop.

In XLA each swap step is several kernels and each trip of the loop a device-to-host sync of its
condition, so the refinement is bound by launches (about 420 a call at the DeepSeek-V3 shape).
Here a row's replicas stay in registers and its program swaps until the row is done: one launch.

The arithmetic is `refine`'s, operation for operation: device loads summed in slot order, the
same differences, maxima and comparisons, the tolerance a power-of-two scale of the maximum and
the held-before term an integer times twice the maximum (exact products, so no fused
multiply-add can round differently). Gathers are one-hot selects and max reductions (exact).
The rows equal the XLA form's, bit for bit (tested in Pallas's interpreter on the CPU and
compiled on a GPU).

Letters: X rows, P_x replicas of a row, D_x devices of S slots; PP, DP and SP those padded to
powers of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.transfer import rows as rows_lib

__all__ = ["fits", "swap_refine_kernel"]

# The largest padded row and the largest [SP, PP] / [DP, PP] tile a program holds in registers.
_MAX_ROW = 512
_MAX_TILE = 16384
_INT_MIN = jnp.iinfo(jnp.int32).min
_BIG = jnp.iinfo(jnp.int32).max


def _pow2(n: int) -> int:
    return max(2, 1 << max(0, (n - 1).bit_length()))


def fits(p_x: int, slots: int, devices: int) -> bool:
    """Whether the kernel takes rows of ``p_x`` replicas on ``devices`` devices of ``slots``
    (the held-before bits of a row in one 32-bit word: at most 32 devices)."""
    pp, sp, dp = _pow2(p_x), _pow2(slots), _pow2(devices)
    return devices <= 32 and pp <= _MAX_ROW and max(sp, dp) * pp <= _MAX_TILE


def _pick(v: jax.Array, hit: jax.Array) -> jax.Array:
    """Along the last axis, the entry of ``v`` [.., PP] where ``hit`` is set (one per row):
    a select and a max, exact (`refine._pick`)."""
    if jnp.issubdtype(v.dtype, jnp.floating):
        return jnp.max(jnp.where(hit, v, -jnp.inf), axis=-1)
    return jnp.max(jnp.where(hit, v, jnp.iinfo(v.dtype).min), axis=-1)


def _device_loads(load, dev_of, slot_of, slots: int, dp: int):
    """float32[DP]: each device's slots summed in slot order (`ops.fold_sum`); -inf past D_x."""
    d = lax.broadcasted_iota(jnp.int32, (dp, 1), 0)
    acc = None
    for s in range(slots):
        hit = (dev_of[None, :] == d) & (slot_of[None, :] == s)
        col = _pick(load[None, :], hit)
        acc = col if acc is None else acc + col
    return acc


def _row_refine(load, pay, bits, stop, *, p_x, slots, devices, max_iters, scale):
    """One row's swaps (`refine._swap_step` until the row stops).

    Args:
      load: float32[PP]; pay: tuple of int32[PP]; bits: uint32[PP] or None; stop: float32[].
      p_x, slots, devices: P_x, S, D_x; max_iters: the swap cap; scale: the tolerance's factor.

    Returns:
      (load, pay) after the swaps.
    """
    pp = load.shape[0]
    sp, dp = _pow2(slots), _pow2(devices)
    j = lax.broadcasted_iota(jnp.int32, (pp,), 0)
    real = j < p_x
    dev_of = jnp.where(real, j // slots, dp)  # dp: no device
    slot_of = j % slots
    i_col = lax.broadcasted_iota(jnp.int32, (sp, 1), 0)  # slot i of the heaviest device
    j_row = lax.broadcasted_iota(jnp.int32, (1, pp), 1)
    d_ids = lax.broadcasted_iota(jnp.int32, (1, dp), 1)

    def step(carry):
        load, pay, bits, _, it = carry
        device_load = _device_loads(load, dev_of, slot_of, slots, dp)
        top = jnp.max(device_load)
        h = jnp.min(jnp.where(device_load == top, lax.iota(jnp.int32, dp), _BIG))
        on_h = (j_row == h * slots + i_col) & (i_col < slots)  # [SP, PP]: slot i of h
        a = _pick(load[None, :], on_h)  # [SP]
        delta = a[:, None] - load[None, :]
        g_load = _pick(device_load[None, :], dev_of[:, None] == d_ids)  # [PP]
        pair = jnp.maximum(top - delta, g_load[None, :] + delta)
        ok = (
            (dev_of[None, :] != h)
            & real[None, :]
            & (i_col < slots)
            & (delta > 0)
            & (pair < top - top * scale)
        )
        if bits is not None:
            pair = pair + _held_change(bits, on_h, dev_of, h, slots).astype(jnp.float32) * (
                2.0 * top
            )
        score = jnp.where(ok, pair, jnp.inf)
        low = jnp.min(score)
        flat = i_col * pp + j_row
        best = jnp.min(jnp.where(score == low, flat, _BIG))
        found = (low < jnp.inf) & (it < max_iters) & (top > stop)
        src = h * slots + best // pp
        dst = best % pp
        hit_s, hit_d = (j == src) & found, (j == dst) & found

        def swap(v):
            vs, vd = _pick(v, hit_s), _pick(v, hit_d)
            return jnp.where(hit_s, vd, jnp.where(hit_d, vs, v))

        new_bits = None if bits is None else swap(bits)
        return swap(load), tuple(swap(v) for v in pay), new_bits, found, it + 1

    # Active from the start only above ``stop`` (`swap_refine`'s first test).
    first = jnp.max(_device_loads(load, dev_of, slot_of, slots, dp)) > stop
    carry = (load, pay, bits, first, jnp.int32(0))
    load, pay, *_ = lax.while_loop(lambda c: c[3], step, carry)
    return load, pay


def _held_change(bits, on_h, dev_of, h, slots: int):
    """`refine._held_change` for one row: int32[SP, PP] (``bits`` uint32[PP], bit g: device g
    held the slot's expert before)."""
    shift_j = jnp.where(dev_of < 32, dev_of, 0).astype(jnp.uint32)  # padding: any bit
    i_bits = _pick(bits[None, :], on_h)  # [SP]
    hu = h.astype(jnp.uint32)

    def bit(word, g):
        return ((word >> g) & 1) == 1

    i_to = bit(i_bits[:, None], shift_j[None, :])  # [SP, PP]: j's device held i's expert
    h_had_j = bit(bits, hu)  # [PP]
    h_had_i = bit(i_bits, hu)  # [SP]
    here = bit(bits, shift_j)  # [PP]
    after = (~i_to).astype(jnp.int32) + (~h_had_j).astype(jnp.int32)[None, :]
    before = (~h_had_i).astype(jnp.int32)[:, None] + (~here).astype(jnp.int32)[None, :]
    return after - before


def swap_refine_kernel(
    slot_load: jax.Array,
    payload: tuple[jax.Array, ...],
    slots: int,
    *,
    stop: jax.Array,
    held_bits: jax.Array | None,
    max_iters: int,
    scale: float,
    interpret: bool | None = None,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`refine.swap_refine`'s rows, one Pallas program per row.

    Args:
      slot_load: float32[X, P_x]; payload: int32[X, P_x] arrays; slots: S.
      stop: float32[X] (-inf: no stop); held_bits: uint32[X, P_x] or None (`refine`'s bits).
      max_iters: swaps per row at most; scale: the tolerance's factor (a power of two).
      interpret: run in Pallas's interpreter; None: only on the CPU backend.

    Returns:
      (slot_load, payload) after the swaps.
    """
    from jax.experimental import pallas as pl

    x_rows, p_x = slot_load.shape
    devices = p_x // slots
    pp = _pow2(p_x)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    n_pay = len(payload)
    has_bits = held_bits is not None

    def kernel(*refs):
        ins, outs = refs[: 2 + n_pay + has_bits], refs[2 + n_pay + has_bits :]
        load_ref, stop_ref, *rest = ins
        pay = tuple(r[...] for r in rest[:n_pay])
        bits = rest[n_pay][...] if has_bits else None
        stop = stop_ref[pl.program_id(0)]
        load, pay = _row_refine(
            load_ref[...], pay, bits, stop, p_x=p_x, slots=slots, devices=devices,
            max_iters=max_iters, scale=scale,
        )  # fmt: skip
        outs[0][...] = load
        for ref, v in zip(outs[1:], pay, strict=True):
            ref[...] = v

    pad = ((0, 0), (0, pp - p_x))
    arrays = [
        jnp.pad(slot_load, pad),
        stop.astype(jnp.float32),
        *(jnp.pad(v.astype(jnp.int32), pad) for v in payload),
    ]
    if has_bits:
        arrays.append(jnp.pad(held_bits, pad))
    arrays = rows_lib.vary_alike(*arrays)
    row = pl.BlockSpec((None, pp), lambda r: (r, 0))

    def whole(a):
        return pl.BlockSpec(a.shape, lambda r: (0,) * a.ndim)

    in_specs = [row, whole(arrays[1])] + [row] * (n_pay + has_bits)
    outs = pl.pallas_call(
        kernel,
        out_shape=[rows_lib._like(a) for a in [arrays[0], *arrays[2 : 2 + n_pay]]],
        grid=(x_rows,),
        in_specs=in_specs,
        out_specs=[row] * (1 + n_pay),
        interpret=interpret,
        name="eplb_swap_refine",
    )(*arrays)
    return outs[0][:, :p_x], tuple(o[:, :p_x] for o in outs[1:])

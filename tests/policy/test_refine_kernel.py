"""The swap refinement as one Pallas kernel: the XLA loops' rows, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeplb._src.policy import refine, refine_kernel


def _rows(rng, x_rows: int, devices: int, slots: int, *, held: bool, stop: bool):
    """Random rows: gamma loads (half of them rounded, for ties), two payloads, the held-before
    bits of a random table, stops under the rows' maxima."""
    p_x = devices * slots
    load = rng.gamma(0.6, 100.0, (x_rows, p_x)).astype(np.float32)
    load[::2] = np.round(load[::2])
    experts = np.stack([rng.permutation(p_x) for _ in range(x_rows)]).astype(np.int32)
    ranks = rng.integers(0, 5, (x_rows, p_x)).astype(np.int32)
    bits = None
    if held:
        table = jnp.asarray(rng.random((x_rows, devices, p_x)) < 0.3)
        words = refine._bit_words(jnp.swapaxes(table, 1, 2))
        bits = jnp.take_along_axis(words, jnp.asarray(experts)[:, :, None], 1)
    limit = None
    if stop:
        top = load.reshape(x_rows, devices, slots).sum(-1).max(-1)
        limit = jnp.asarray(top * rng.uniform(0.8, 1.0, x_rows), jnp.float32)
    return jnp.asarray(load), (jnp.asarray(experts), jnp.asarray(ranks)), bits, limit


@pytest.mark.parametrize(
    "devices, slots, held, stop",
    [(4, 9, False, False), (4, 9, True, True), (3, 5, True, False), (32, 9, True, True)],
)
def test_kernel_rows_equal_the_xla_loops(devices, slots, held, stop):
    """Pallas's interpreter here; every row swaps (equal loads included), with and without the
    held-before term and the stop, at shapes that are no power of two."""
    rng = np.random.default_rng(devices * slots)
    x_rows = 12
    load, pay, bits, limit = _rows(rng, x_rows, devices, slots, held=held, stop=stop)
    active = jnp.ones((x_rows,), bool)
    if limit is not None:
        active = refine.fold_sum(load.reshape(x_rows, devices, slots)).max(1) > limit
    want = jax.jit(
        lambda v, p: refine._refine_rows(v, p, slots, limit, active, bits)
    )(load, pay)  # fmt: skip
    got = refine_kernel.swap_refine_kernel(
        load, pay, slots,
        stop=jnp.full((x_rows,), -jnp.inf) if limit is None else limit,
        held_bits=None if bits is None else bits[..., 0],
        max_iters=refine._MAX_SWAPS_PER_DEVICE * devices * slots,
        scale=refine.TOL_SCALE,
    )  # fmt: skip
    assert (np.asarray(want[1][0]) != np.asarray(pay[0])).any(1).all()  # every row swapped
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g).view(np.int32), np.asarray(w).view(np.int32))


def test_fits_and_the_gpu_choice(triton_lowering):
    """The kernel takes rows of up to 512 padded replicas on at most 32 devices; the policy's
    program holds it (for CUDA) exactly where it fits."""
    assert refine_kernel.fits(36, 9, 4) and refine_kernel.fits(288, 9, 32)
    assert not refine_kernel.fits(36 * 33, 36, 33) and not refine_kernel.fits(1024, 8, 128)
    from jeplb import rebalance_experts

    w = jnp.asarray(np.random.default_rng(0).gamma(0.6, 100.0, (2, 16)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda w: rebalance_experts(w, 20, 4, 2, 4, refine=True))(w))
    assert "eplb_swap_refine" in jaxpr


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["refine", "migration-aware"])
def test_policy_with_the_compiled_kernel_equals_the_xla_loops(mode, monkeypatch):
    """On a GPU the placements of the DeepSeek-V3 shape (hierarchical and global) are the same
    with the compiled kernel and with XLA's loops."""
    from jeplb import rebalance_experts

    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.lognormal(0.0, 1.0, (58, 256)) * 1000, jnp.float32)
    w1 = jnp.asarray(np.asarray(w) * rng.uniform(0.8, 1.2, w.shape), jnp.float32)
    for args in ((288, 8, 4, 32), (288, 1, 1, 32)):
        old = rebalance_experts(w, *args)[0]
        out = {}
        for impl in ("xla", "kernel"):
            monkeypatch.setattr(refine, "REFINE_IMPL", impl)
            kw = {"refine": True} if mode == "refine" else {"old_phy2log": old}
            f = jax.jit(lambda w, kw=kw, args=args: rebalance_experts(w, *args, **kw))
            out[impl] = [np.asarray(a) for a in f(w1)]
        for a, b in zip(out["xla"], out["kernel"], strict=True):
            np.testing.assert_array_equal(a, b)

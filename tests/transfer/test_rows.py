"""Row moves: every implementation writes exactly the rows asked for, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeplb._src.transfer import layout
from jeplb._src.transfer import rows as _rows
from tests.helpers import mesh_of

DTYPES = [jnp.bfloat16, jnp.float32, jnp.int8, jnp.float8_e4m3fn, jnp.int4, jnp.float4_e2m1fn]


def random_rows(rng, rows: int, width: int, dtype) -> np.ndarray:
    """Rows of random bits (NaN payloads and subnormals included) as host bit patterns."""
    if np.dtype(dtype).name in layout.SUB_BYTE:
        return rng.integers(0, 16, (rows, width), dtype=np.uint8)
    raw = rng.integers(0, 256, (rows, width * np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(layout.bits_dtype(dtype))


def as_device(bits: np.ndarray, dtype) -> jax.Array:
    return layout.convert_rows(jnp.asarray(bits), dtype)


def as_bits(x: jax.Array) -> np.ndarray:
    return np.asarray(layout.convert_rows(x, layout.bits_dtype(x.dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["loop", "pallas", "scatter"])
@pytest.mark.parametrize("direction", ["same", "to_moving", "from_moving"])
def test_copy_rows_matches_numpy(impl, dtype, direction):
    # What the transfer does: rows between two arrays of a leaf's dtype, or between a leaf and a
    # buffer of its moving dtype, with the mover the library resolves for the written array.
    platform = jax.default_backend()
    rng = np.random.default_rng(0)
    width = 2048
    moving = layout.moving_dtype(dtype, platform)
    src_t, dst_t = {
        "same": (dtype, dtype),
        "to_moving": (dtype, moving),
        "from_moving": (moving, dtype),
    }[direction]
    src, dst = random_rows(rng, 12, width, dtype), random_rows(rng, 10, width, dtype)
    dst_idx = np.array([4, 0, 2, 7, 9], np.int32)
    src_idx = np.array([1, 5, 3, 0, 11], np.int32)
    count, d_off, s_off = 3, 1, 2
    expect = dst.copy()
    for k in range(count):
        expect[d_off + dst_idx[k]] = src[s_off + src_idx[k]]
    dst_x = as_device(dst, dst_t)
    out = _rows.copy_rows(
        dst_x,
        as_device(src, src_t),
        jnp.asarray(dst_idx),
        jnp.asarray(src_idx),
        jnp.int32(count),
        dst_offset=d_off,
        src_offset=s_off,
        impl=_rows.resolve_impl(impl, dst_x, platform),
        interpret=platform == "cpu",
    )
    np.testing.assert_array_equal(as_bits(out), expect)


def test_column_block_select_keeps_other_columns():
    # A select writing a block of columns leaves the rest of the row alone, bit for bit.
    rng = np.random.default_rng(1)
    dst, src = random_rows(rng, 4, 8, jnp.bfloat16), random_rows(rng, 2, 3, jnp.bfloat16)
    out = _rows.write_row_select(
        as_device(dst, jnp.bfloat16), as_device(src[1:], jnp.bfloat16), jnp.int32(2), 5
    )
    expect = dst.copy()
    expect[2, 5:8] = src[1]
    np.testing.assert_array_equal(as_bits(out), expect)


def test_auto_resolution_and_errors(triton_lowering):
    big = jax.ShapeDtypeStruct((4, 1 << 16), jnp.bfloat16)
    small = jax.ShapeDtypeStruct((4, 100), jnp.bfloat16)
    big32 = jax.ShapeDtypeStruct((4, 1 << 16), jnp.float32)
    assert _rows.resolve_impl("auto", big, "gpu") == "pallas"
    assert _rows.resolve_impl("auto", small, "gpu") == "loop"
    assert _rows.resolve_impl("auto", big32, "cpu") == "loop"
    # bf16 rows on XLA:CPU are written through their bits, whatever was asked.
    assert _rows.resolve_impl("pallas", big, "cpu") == "select"
    assert _rows.resolve_impl("auto", jax.ShapeDtypeStruct((4, 64), jnp.int4), "gpu") == "select"
    with pytest.raises(ValueError, match=r"row_impl: expected one of .*got 'fast'"):
        _rows.resolve_impl("fast", big, "gpu")
    with pytest.raises(ValueError, match=r"needs rows of a multiple of 1024 elements, got 100"):
        _rows.copy_rows(
            jnp.zeros((2, 100)),
            jnp.zeros((2, 100)),
            jnp.zeros(1, jnp.int32),
            jnp.zeros(1, jnp.int32),
            jnp.int32(1),
            impl="pallas",
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_compiled_pallas_rearrange_on_gpu(dtype):
    # The compiled (not interpreted) kernel through the public path, on a one-GPU mesh.
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jeplb

    gpu = jax.devices("gpu")[:1]
    mesh = mesh_of(devices=gpu)
    rng = np.random.default_rng(1)
    n, width = 6, 1 << 16  # rows of 64 K elements (>= 64 KiB): Pallas under row_impl="auto"
    host = rng.integers(0, 256, (2, n, width * np.dtype(dtype).itemsize), np.uint8).view(dtype)
    old = np.tile(np.arange(n, dtype=np.int32), (2, 1))
    new = np.array([[5, 5, 0, 1, 2, 3], [1, 0, 3, 2, 5, 4]], np.int32)
    w = jax.device_put(host, NamedSharding(mesh, P(None, "ep")))
    rows = jax.ShapeDtypeStruct((2 * n, width), dtype)
    assert _rows.resolve_impl("auto", rows, "gpu") == "pallas"
    out = np.asarray(jeplb.rearrange_expert_weights(old, new, w, mesh=mesh)[0])
    for layer in range(2):
        for p in range(n):
            np.testing.assert_array_equal(
                out[layer, p].view(np.uint8), host[layer, new[layer, p]].view(np.uint8)
            )


def test_movers_own_the_rules(triton_lowering):
    # Every rule about which mover runs where lives in rows.Movers / rows.Mover.
    big = jax.ShapeDtypeStruct((4, 1 << 16), jnp.float32)
    odd = jax.ShapeDtypeStruct((4, 100), jnp.float32)
    gpu_auto, cpu_pallas = _rows.Movers("auto", "gpu"), _rows.Movers("pallas", "cpu")
    assert gpu_auto.for_rows(big) is _rows.Mover.PALLAS and gpu_auto.for_rows(big).kernel
    assert gpu_auto.for_rows(odd) is _rows.Mover.LOOP and not gpu_auto.for_rows(odd).kernel
    assert gpu_auto.kernel_preferred and not gpu_auto.interpreted and gpu_auto.granule == 1
    assert cpu_pallas.interpreted and cpu_pallas.kernel_preferred and cpu_pallas.granule == 1024
    assert not _rows.Movers("loop", "gpu").kernel_preferred
    assert _rows.Movers("scatter", "gpu").direct(big) is None  # no ordered form: it stages
    assert cpu_pallas.rows_problems(odd) == (
        "row_impl='pallas' needs rows of a multiple of 1024 elements, got 100 elements; "
        "pass row_impl='loop'"
    )
    assert cpu_pallas.rows_problems(big) is None and gpu_auto.rows_problems(odd) is None
    assert "512 32-bit words" in cpu_pallas.direct_problems(4, 100, np.float32)
    assert _rows.Mover.PALLAS.block_problems(2048, 512, passes=4, fit=2) == (
        "row_impl='pallas' needs blocks of a multiple of 1024 elements, but staging_passes=4 "
        "cuts its rows of 2048 elements into blocks of 512; pass staging_passes=2 or "
        "row_impl='loop'"
    )
    assert _rows.Mover.LOOP.block_problems(2048, 512, passes=4, fit=2) is None
    with pytest.raises(TypeError, match=r"row_impl: expected one of .*got int 3"):
        _rows.Movers(3, "gpu")


def test_auto_takes_xla_where_pallas_lowers_to_mosaic():
    """The library's GPU kernels are written for Pallas's Triton lowering; where jax lowers
    Pallas GPU kernels to Mosaic GPU (``jax_pallas_use_mosaic_gpu``) the ``auto`` choices take
    XLA's forms, and a balanced dispatch (or the opt-in fused hash dispatch) lowered for CUDA
    holds no kernel; asked for by name, the kernel is still the user's choice. Lowered for the
    CPU, neither dispatch holds a kernel."""
    from jeplb._src import dispatch as dispatch_lib

    def choice(ids, replica_choice="balanced", impl="scatter"):
        log2phy, logcnt = jnp.zeros((16, 2), jnp.int32), jnp.ones((16,), jnp.int32)
        args = (None, None, replica_choice, None, 2, 4, None, impl, "kernel")
        return dispatch_lib._dispatch_checked(log2phy, logcnt, ids, *args)[0]

    def fused(ids):
        return choice(ids, "hash", "fused")

    big = jax.ShapeDtypeStruct((4, 1 << 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((256, 2), jnp.int32)  # 512 pairs: a block of the fused kernel
    before = getattr(jax.config, "jax_pallas_use_mosaic_gpu", None)
    if before is None:
        pytest.skip("this jax has no jax_pallas_use_mosaic_gpu switch (Triton only)")
    try:
        for triton, mover in ((True, "pallas"), (False, "loop")):
            jax.config.update("jax_pallas_use_mosaic_gpu", not triton)
            assert _rows.triton_lowering() is triton
            assert _rows.resolve_impl("auto", big, "gpu") == mover
            assert _rows.Movers("auto", "gpu").kernel_preferred is triton
            assert _rows.resolve_impl("pallas", big, "gpu") == "pallas"
            for program in (choice, fused):
                lowered = jax.jit(program).trace(ids).lower(lowering_platforms=("cuda",))
                assert ("triton" in lowered.as_text()) is triton, program.__name__
                lowered = jax.jit(program).trace(ids).lower(lowering_platforms=("cpu",))
                assert "triton" not in lowered.as_text(), program.__name__
    finally:
        jax.config.update("jax_pallas_use_mosaic_gpu", before)

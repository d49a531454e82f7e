"""Row moves: every implementation writes exactly the rows asked for, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jeplb._src.transfer import rows as _rows


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("impl", ["loop", "pallas", "scatter"])
def test_copy_rows_matches_numpy(impl, dtype):
    rng = np.random.default_rng(0)
    width = 2048
    nbytes = np.dtype(dtype).itemsize

    def rand(rows):
        raw = rng.integers(0, 256, (rows, width * nbytes), dtype=np.uint8)
        return raw.view(dtype)

    src, dst = rand(12), rand(10)
    dst_idx = np.array([4, 0, 2, 7, 9], np.int32)
    src_idx = np.array([1, 5, 3, 0, 11], np.int32)
    count, d_off, s_off = 3, 1, 2
    expect = dst.copy()
    for k in range(count):
        expect[d_off + dst_idx[k]] = src[s_off + src_idx[k]]
    platform = jax.default_backend()
    out = _rows.copy_rows(
        _rows.to_rows(jnp.asarray(dst), 1, platform),
        _rows.to_rows(jnp.asarray(src), 1, platform),
        jnp.asarray(dst_idx),
        jnp.asarray(src_idx),
        jnp.int32(count),
        dst_offset=d_off,
        src_offset=s_off,
        impl=impl,
        interpret=platform == "cpu",
    )
    out = _rows.from_rows(out, dst.shape, dtype)
    np.testing.assert_array_equal(np.asarray(out).view(np.uint8), expect.view(np.uint8))


def test_auto_resolution_and_errors():
    big = jax.ShapeDtypeStruct((4, 1 << 16), jnp.bfloat16)
    small = jax.ShapeDtypeStruct((4, 100), jnp.bfloat16)
    assert _rows.resolve_impl("auto", big, "gpu") == "pallas"
    assert _rows.resolve_impl("auto", small, "gpu") == "loop"
    assert _rows.resolve_impl("auto", big, "cpu") == "loop"
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
    mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,), devices=gpu)
    rng = np.random.default_rng(1)
    n, width = 6, 1 << 16  # rows of 64 K elements (>= 64 KiB): Pallas under row_impl="auto"
    host = rng.integers(0, 256, (2, n, width * np.dtype(dtype).itemsize), np.uint8).view(dtype)
    old = np.tile(np.arange(n, dtype=np.int32), (2, 1))
    new = np.array([[5, 5, 0, 1, 2, 3], [1, 0, 3, 2, 5, 4]], np.int32)
    w = jax.device_put(host, NamedSharding(mesh, P(None, "ep")))
    assert _rows.resolve_impl("auto", _rows.to_rows(w, 2, "gpu"), "gpu") == "pallas"
    out = np.asarray(jeplb.rearrange_expert_weights(old, new, w, mesh=mesh))
    for layer in range(2):
        for p in range(n):
            np.testing.assert_array_equal(
                out[layer, p].view(np.uint8), host[layer, new[layer, p]].view(np.uint8)
            )

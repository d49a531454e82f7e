"""The expert-weight transfer: bit-exact against the numpy model, in place, one compilation."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src.transfer.engine import resolve_passes
from tests.helpers import mesh_of, put
from tests.transfer_model import KINDS, check_rows, compilations, make_leaves, make_plan, program

L, N, E_PER_DEV = 2, 3, 2  # small shapes: one compilation per device count


def sharded(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(None, "ep"))


def as_bytes(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint8)


def run_and_check(d, old, new, *, chunk_rows=1, passes=None, seed=0):
    mesh = mesh_of(d)
    host = make_leaves(np.random.default_rng(seed), *old.shape)
    weights = put(host, mesh, P(None, "ep"))
    out, report = jeplb.rearrange_expert_weights(
        old, new, weights, mesh=mesh, chunk_rows=chunk_rows, staging_passes=passes
    )
    for name, before in host.items():
        after = out[name]
        assert after.shape == before.shape and after.dtype == before.dtype
        assert after.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "ep")), after.ndim)
        check_rows(as_bytes(before), as_bytes(after), old, new, d)
    assert bool(report.ok.all())
    return report


@pytest.mark.parametrize("d", [1, 2, 4, 8])
@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
def test_random_plans_bit_exact(d, kind, seed):
    p_total = d * N
    num_experts = max(1, min(p_total - 1, d * E_PER_DEV))
    old, new = make_plan(kind, seed, L, p_total, num_experts, d)
    report = run_and_check(d, old, new, seed=seed)
    assert (report.wire_rows >= report.min_rows).all()
    if kind == "noop":
        assert int(report.remote_rows.sum()) == 0 and int(report.local_rows.sum()) == 0


# (C, passes): 2-row chunks in 4 explicit column passes, 3-row chunks in the default passes (also
# 4 for these leaves). Explicit passes with C = 1: `test_column_passes_bit_exact`.
@pytest.mark.parametrize(("chunk_rows", "passes"), [(2, 4), (3, None)])
def test_chunked_rounds_bit_exact(chunk_rows, passes):
    for seed, kind in enumerate(("random", "reversal", "hotspot", "empties")):
        old, new = make_plan(kind, seed, L, 8 * N, 16, 8)
        report = run_and_check(8, old, new, chunk_rows=chunk_rows, passes=passes, seed=seed)
        assert (report.wire_rows % chunk_rows == 0).all()


def test_sender_choice_packs_rounds():
    # Device d holds experts d+1 and d+2 (mod 8) and a private one; it then wants expert d, which
    # devices d-1 and d-2 hold. Choosing the same shift for everyone makes one round of one row.
    # Layer 1 stays as it is: two layers, the shapes of the tests above (one compilation).
    d = 8
    old = np.array([[(k + 1) % d, (k + 2) % d, 10 + k] for k in range(d)], np.int32).reshape(1, -1)
    old = np.concatenate([old, old])
    new = old.copy()
    new[0, 2::3] = np.arange(d)
    report = run_and_check(d, old, new)
    assert int(report.min_rows[0]) == 1
    assert int(report.wire_rows[0]) == 1
    assert int(report.wire_rows[1]) == 0


# ------------------------------------------------------------------------------ compilation


# Traces of `outer_step`, one entry per trace.
OUTER_TRACES = []


@functools.cache
def outer_step(mesh):
    """The transfer under an outer jit, maps traced (one program for the tests below)."""

    @jax.jit
    def step(old, new, w):
        OUTER_TRACES.append(1)
        return jeplb.rearrange_expert_weights(old, new, w, mesh=mesh, donate=False)

    return step


def test_one_compilation_under_outer_jit(mesh8):
    step = outer_step(mesh8)
    traced = len(OUTER_TRACES)
    host = make_leaves(np.random.default_rng(1), L, 8 * N)
    for seed, kind in enumerate(("random", "reversal", "drift", "hotspot")):
        old, new = make_plan(kind, seed, L, 8 * N, 16, 8)
        out, _ = step(jnp.asarray(old), jnp.asarray(new), put(host, mesh8, P(None, "ep")))
        for name, before in host.items():
            check_rows(as_bytes(before), as_bytes(out[name]), old, new, 8)
    assert len(OUTER_TRACES) - traced <= 1  # traced here at most once (maybe by an earlier test)
    assert step._cache_size() == 1


def test_eager_calls_reuse_one_program(mesh8):
    compiled = program(mesh8)
    host = {"w": np.arange(L * 8 * N * 2, dtype=np.float32).reshape(L, 8 * N, 2)}
    sizes, compiled_now = [], []
    for seed in range(3):
        old, new = make_plan("random", seed, L, 8 * N, 16, 8)
        weights = put(host, mesh8, P(None, "ep"))
        with compilations() as seen:
            out, _ = jeplb.rearrange_expert_weights(old, new, weights, mesh=mesh8)
            jax.block_until_ready(out)
        sizes.append(compiled._cache_size())
        compiled_now.append(len(seen))
    # The program cache holds the compiled program after the first call (it may have been
    # compiled by an earlier test), and new plans of the same shapes compile nothing more.
    assert sizes[0] >= 1, "the program cache is empty after an eager call"
    assert sizes == [sizes[0]] * 3, sizes
    assert compiled_now[1:] == [0, 0], compiled_now


def test_donated_weights_are_updated_in_place(mesh8):
    old, new = make_plan("random", 3, L, 8 * N, 16, 8)
    w = put(
        {"w": np.random.default_rng(0).random((L, 8 * N, 64), np.float32)}, mesh8, P(None, "ep")
    )
    ptrs = [s.data.unsafe_buffer_pointer() for s in w["w"].addressable_shards]
    out, _ = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8)
    assert w["w"].is_deleted()
    assert [s.data.unsafe_buffer_pointer() for s in out["w"].addressable_shards] == ptrs


@pytest.mark.parametrize(("passes", "chunk_rows"), [(None, 1), (None, 4), (1, 1), (4, 1)])
def test_temporary_memory_within_a_layer(mesh8, passes, chunk_rows):
    # Rows large enough that the plan's integer tables are noise. The buffer and the two chunks
    # hold (N + 2C) rows of 1 / passes of the columns; the default passes keep that within a layer.
    n, r, num_layers = 8, 4096, 4
    p_total = 8 * n
    w = jax.ShapeDtypeStruct((num_layers, p_total, r), jnp.float32, sharding=sharded(mesh8))
    maps = jax.ShapeDtypeStruct((num_layers, p_total), jnp.int32)
    compiled = program(mesh8, chunk_rows=chunk_rows, staging_passes=passes)
    stats = compiled.lower(maps, maps, [w]).compile().memory_analysis()
    row = r * 4
    layer_local = n * row
    p = passes or resolve_passes(None, [(r, row, 1, False)], n=n, chunk_rows=chunk_rows)
    assert passes or p == {1: 2, 4: 4}[chunk_rows]  # with C = 4, 3 does not divide the rows
    assert stats.temp_size_in_bytes <= (n + 2 * chunk_rows) * row / p + 64 * 1024
    if passes is None:
        assert stats.temp_size_in_bytes <= layer_local
    assert stats.alias_size_in_bytes == num_layers * layer_local  # donated: updated in place


@pytest.mark.parametrize("d", [1, 8])
def test_temporary_memory_within_a_layer_every_dtype(d):
    # bf16 and fp8 rows move through their bits on XLA:CPU; no leaf is converted or copied
    # whole, on one device or many: the bound is one layer of the device's local weights. Rows
    # are large enough (20 KiB) that the plan's integer tables are noise.
    mesh = mesh_of(d)
    n, num_layers = 16, 4
    leaves = [
        jax.ShapeDtypeStruct((num_layers, n * d, 2, 64, 64), jnp.bfloat16, sharding=sharded(mesh)),
        jax.ShapeDtypeStruct(
            (num_layers, n * d, 64, 64), jnp.float8_e4m3fn, sharding=sharded(mesh)
        ),
        jax.ShapeDtypeStruct((num_layers, n * d, 16), jnp.float32, sharding=sharded(mesh)),
    ]
    maps = jax.ShapeDtypeStruct((num_layers, n * d), jnp.int32)
    stats = program(mesh, num_leaves=3).lower(maps, maps, leaves).compile().memory_analysis()
    layer_local = sum(np.prod(x.shape[2:]) * x.dtype.itemsize for x in leaves) * n
    assert stats.temp_size_in_bytes <= layer_local
    assert stats.alias_size_in_bytes == num_layers * layer_local


# -------------------------------------------------------------------- infeasible, traced maps


def test_traced_infeasible_plan_leaves_weights_untouched(mesh8, caplog):
    old, new = make_plan("random", 5, L, 8 * N, 16, 8)
    new = new.copy()
    new[1, 4] = 99  # an expert no slot holds
    host = make_leaves(np.random.default_rng(2), L, 8 * N)
    step = outer_step(mesh8)  # the program of test_one_compilation_under_outer_jit
    with caplog.at_level(logging.WARNING, logger="jeplb"):
        out, report = step(jnp.asarray(old), jnp.asarray(new), put(host, mesh8, P(None, "ep")))
        jax.effects_barrier()
    assert report.ok.tolist() == [True, False]
    for name, before in host.items():
        np.testing.assert_array_equal(as_bytes(out[name]), as_bytes(before))
    assert "infeasible" in caplog.text


# ------------------------------------------------------------------------------- one layer


def test_transfer_layer_and_stages(mesh8):
    old, new = make_plan("random", 7, 1, 8 * N, 16, 8)
    host = make_leaves(np.random.default_rng(3), 1, 8 * N)
    layer = {k: v[0] for k, v in host.items()}
    out, _ = jeplb.transfer_layer(old[0], new[0], put(layer, mesh8, P("ep")), mesh=mesh8)
    for name, before in host.items():
        check_rows(as_bytes(before), as_bytes(out[name])[None], old, new, 8)

    # The two stages inside a user's shard_map, with the commit in a separate program.
    def stage(o, n_, w):
        return jeplb.move_to_buffer(o, n_, w, axis_name="ep")

    def commit(w, buf, meta):
        return jeplb.move_from_buffer(w, buf, meta)

    spec = {k: P("ep") for k in layer}
    meta_spec = P("ep")  # every field is per device: stack them over the axis
    staged, meta = jax.jit(
        jax.shard_map(
            lambda o, n_, w: jax.tree_util.tree_map(
                lambda x: x[None] if x.ndim == 0 else x, stage(o, n_, w)
            ),
            mesh=mesh8,
            in_specs=(P(), P(), spec),
            out_specs=(spec, meta_spec),
        )
    )(old[0], new[0], put(layer, mesh8, P("ep")))
    assert meta.recv_count.shape == (8,)
    assert int(meta.recv_count.sum()) == int((meta.recv_primary_mask).sum())
    meta = jax.tree_util.tree_map(lambda x: x, meta)
    out2 = jax.jit(
        jax.shard_map(
            lambda w, b, m: commit(
                w, b, jax.tree_util.tree_map(lambda x: x[0] if x.shape == (1,) else x, m)
            ),
            mesh=mesh8,
            in_specs=(spec, spec, meta_spec),
            out_specs=spec,
        )
    )(put(layer, mesh8, P("ep")), staged, meta)
    for name in host:
        np.testing.assert_array_equal(as_bytes(out2[name]), as_bytes(out[name]))


def test_explicit_axis_mesh():
    mesh_of(8)  # skips where the backend has fewer devices
    mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))
    old, new = make_plan("reversal", 0, L, 8 * N, 16, 8)
    host = {"w": np.random.default_rng(0).random((L, 8 * N, 3), np.float32)}
    out, _ = jeplb.rearrange_expert_weights(old, new, put(host, mesh, P(None, "ep")), mesh=mesh)
    check_rows(as_bytes(host["w"]), as_bytes(out["w"]), old, new, 8)


# ---------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good(mesh8):
    old, new = make_plan("random", 0, L, 8 * N, 16, 8)
    return old, new


def _w(mesh, shape=(L, 8 * N, 2), spec=None):
    spec = P(None, "ep") if spec is None else spec
    return {"w": jax.device_put(np.zeros(shape, np.float32), NamedSharding(mesh, spec))}


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (
            lambda o, n: (o[0], n),
            ValueError,
            r"old_phy2log: expected a 2-D map \[L, P\], got shape \(24,\)",
        ),
        (
            lambda o, n: (o, n[:, :16]),
            ValueError,
            r"new_phy2log: expected shape \[L, P\] = \(2, 24\) \(old_phy2log's\), got \(2, 16\)",
        ),
        (
            lambda o, n: (o.astype(np.float32), n),
            TypeError,
            r"old_phy2log: expected an integer dtype \(int32\), got float32",
        ),
        (
            lambda o, n: (o, np.where(np.arange(24) == 5, -3, n)),
            ValueError,
            r"new_phy2log\[0, 5\] = -3: expected an expert id in \[0, 2\^31 - 1\) or -1",
        ),
        (
            lambda o, n: (o, np.where(np.arange(24) == 2, 40, n)),
            ValueError,
            r"new_phy2log\[0, 2\] = 40, but no slot of old_phy2log\[0\] holds expert 40",
        ),
    ],
)
def test_bad_maps(mesh8, good, mutate, exc, match):
    old, new = mutate(*good)
    w = _w(mesh8)
    with pytest.raises(exc, match=match):
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8)
    assert not w["w"].is_deleted()  # nothing ran, nothing was donated


def test_bad_ids_against_num_experts(mesh8, good):
    with pytest.raises(ValueError, match=r"expected an expert id in \[0, num_experts = 8\) or -1"):
        jeplb.rearrange_expert_weights(*good, _w(mesh8), mesh=mesh8, num_experts=8)


def test_bad_weights_and_mesh(mesh8, good):
    with pytest.raises(
        ValueError,
        match=r"expert_weights\['w'\] has shape \(2, 16, 2\), expected leading dims L = 2 x P = 24",
    ):
        jeplb.rearrange_expert_weights(*good, _w(mesh8, (L, 16, 2)), mesh=mesh8)
    with pytest.raises(
        ValueError,
        match=r"expert_weights\['w'\] is sharded PartitionSpec\(\); its slot dim 1 must be sharded over exactly 'ep'",
    ):
        jeplb.rearrange_expert_weights(*good, _w(mesh8, spec=P()), mesh=mesh8)
    with pytest.raises(
        TypeError, match=r"expert_weights\['w'\] is a ndarray; expected a jax.Array sharded"
    ):
        jeplb.rearrange_expert_weights(*good, {"w": np.zeros((L, 24, 2))}, mesh=mesh8)
    with pytest.raises(
        ValueError, match=r"mesh: has no axis named 'experts' \(axis_name\); its axes are \('ep',\)"
    ):
        jeplb.rearrange_expert_weights(*good, _w(mesh8), mesh=mesh8, axis_name="experts")
    with pytest.raises(TypeError, match=r"mesh: expected a jax.sharding.Mesh"):
        jeplb.rearrange_expert_weights(*good, _w(mesh8), mesh="ep")
    with pytest.raises(ValueError, match=r"chunk_rows: expected an int >= 1, got 0"):
        jeplb.rearrange_expert_weights(*good, _w(mesh8), mesh=mesh8, chunk_rows=0)
    with pytest.raises(ValueError, match=r"staging_passes: expected an int >= 1, got 0"):
        jeplb.rearrange_expert_weights(*good, _w(mesh8), mesh=mesh8, staging_passes=0)
    odd = np.zeros((L, 20), np.int32)
    with pytest.raises(
        ValueError, match=r"old_phy2log: P = 20 slots is not divisible by D = 8 devices"
    ):
        jeplb.rearrange_expert_weights(odd, odd, _w(mesh8, (L, 24, 2)), mesh=mesh8)


def test_scatter_row_impl_bit_exact():
    old, new = make_plan("random", 11, L, 8 * N, 16, 8)
    mesh = mesh_of(8)
    host = make_leaves(np.random.default_rng(4), L, 8 * N)
    out, _ = jeplb.rearrange_expert_weights(
        old, new, put(host, mesh, P(None, "ep")), mesh=mesh, row_impl="scatter"
    )
    for name, before in host.items():
        check_rows(as_bytes(before), as_bytes(out[name]), old, new, 8)
    with pytest.raises(ValueError, match=r"row_impl: expected one of .*got 'dma'"):
        jeplb.rearrange_expert_weights(old, new, out, mesh=mesh, row_impl="dma")


def test_pallas_row_impl_bit_exact_in_interpret_mode():
    # On CPU the Pallas kernel runs in interpret mode: same plan, same bytes as the loop.
    old, new = make_plan("hotspot", 12, L, 4 * N, 10, 4)
    mesh = mesh_of(4)
    rng = np.random.default_rng(5)
    host = {
        "w_bf16": rng.integers(0, 1 << 16, (L, 4 * N, 2, 1024), dtype=np.uint16).view(jnp.bfloat16),
        "w_f32": rng.standard_normal((L, 4 * N, 2048)).astype(np.float32),
    }
    out, _ = jeplb.rearrange_expert_weights(
        old, new, put(host, mesh, P(None, "ep")), mesh=mesh, row_impl="pallas"
    )
    for name, before in host.items():
        check_rows(as_bytes(before), as_bytes(out[name]), old, new, 4)
    # The default passes never cut a row below the kernel's block: a 1024-element row goes whole.
    short = {"w": rng.standard_normal((L, 4 * N, 1024)).astype(np.float32)}
    got, _ = jeplb.rearrange_expert_weights(
        old, new, put(short, mesh, P(None, "ep")), mesh=mesh, row_impl="pallas"
    )
    check_rows(as_bytes(short["w"]), as_bytes(got["w"]), old, new, 4)
    # Column passes that cut rows below the kernel's block are refused, naming the way out.
    with pytest.raises(ValueError, match=r"staging_passes=4 cuts its rows of 2048 elements"):
        jeplb.rearrange_expert_weights(
            old, new, out, mesh=mesh, row_impl="pallas", staging_passes=4, donate=False
        )


# 4 passes with 2-row chunks: `test_chunked_rounds_bit_exact`.
@pytest.mark.parametrize(("passes", "chunk_rows"), [(1, 1), (3, 1)])
def test_column_passes_bit_exact(passes, chunk_rows):
    # Rows of 6, 4, 5, 8 and 1 elements: some split into the passes, the others go whole.
    for seed, kind in enumerate(("random", "hotspot", "empties")):
        old, new = make_plan(kind, seed, L, 8 * N, 16, 8)
        mesh = mesh_of(8)
        host = make_leaves(np.random.default_rng(seed), L, 8 * N)
        out, _ = jeplb.rearrange_expert_weights(
            old,
            new,
            put(host, mesh, P(None, "ep")),
            mesh=mesh,
            staging_passes=passes,
            chunk_rows=chunk_rows,
        )
        for name, before in host.items():
            check_rows(as_bytes(before), as_bytes(out[name]), old, new, 8)


# ------------------------------------------------------- packed collectives, topology, seams


@pytest.mark.parametrize(
    "dtypes",
    [
        ("bfloat16", "float32", "int8"),
        ("float8_e4m3fn", "uint16", "float16", "int32"),
        ("uint8", "float32"),
    ],
)
def test_pack_bytes_round_trip_bit_exact(dtypes):
    from jeplb._src.transfer import rotation

    rng = np.random.default_rng(0)
    parts = tuple(
        jnp.asarray(rng.integers(0, 256, (3, 5 * np.dtype(jnp.dtype(d)).itemsize), np.uint8)).view(
            jnp.dtype(d)
        )
        for d in dtypes
    )
    packed = rotation.pack_bytes(parts)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, sum(5 * x.itemsize for x in parts))
    back = rotation.unpack_bytes(packed, parts)
    for a, b in zip(parts, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(as_bytes(a), as_bytes(b))


def _collective_permutes(mesh, leaves, **options):
    maps = jax.ShapeDtypeStruct(leaves[0].shape[:2], jnp.int32)
    text = program(mesh, num_leaves=len(leaves), **options).lower(maps, maps, leaves).as_text()
    return text.count("collective_permute")


def test_one_collective_per_round_for_every_leaf_and_pass(mesh8):
    # Three leaves of three dtypes in two column passes: one ppermute per shift, not one per
    # shift, leaf and pass (the leaves travel as one byte buffer, the passes are one loop).
    leaves = [
        jax.ShapeDtypeStruct((L, 8 * N, 8), dt, sharding=sharded(mesh8))
        for dt in (jnp.bfloat16, jnp.float32, jnp.int8)
    ]
    assert _collective_permutes(mesh8, leaves, staging_passes=2) == 7
    assert _collective_permutes(mesh8, leaves[:1], staging_passes=4) == 7


def test_leaves_of_every_dtype_packed_bit_exact(mesh8):
    # Leaves of several dtypes (bf16, fp8, f32, int8 ... from LEAF_SPECS) staged in passes: the
    # default count for them is 2 (the program the default-option tests above compiled).
    from jeplb._src.transfer import engine

    setup = engine.Engine(
        config=jeplb.TransferConfig(), num_devices=8, platform=jax.default_backend()
    )
    host = make_leaves(np.random.default_rng(0), L, 8 * N)
    assert engine._geometry(list(host.values()), N, setup)[0] == 2
    for seed, kind in enumerate(("random", "reversal")):
        old, new = make_plan(kind, seed, L, 8 * N, 16, 8)
        host = make_leaves(np.random.default_rng(seed), L, 8 * N)
        out, _ = jeplb.rearrange_expert_weights(
            old, new, put(host, mesh8, P(None, "ep")), mesh=mesh8
        )
        for name, before in host.items():
            check_rows(as_bytes(before), as_bytes(out[name]), old, new, 8)


def test_devices_per_node_prefers_senders_on_the_receivers_node(mesh8):
    # Expert k is held by device k and by device (k + 4) % 8; each device wants the expert of
    # device k ^ 1 (same node of two devices): with the topology, no row crosses a node.
    # Layer 1 stays as it is; the leaf has the shape of test_eager_calls_reuse_one_program's.
    d = 8
    old = np.array([[k, 10 + k, (k + 4) % d] for k in range(d)], np.int32).reshape(1, -1)
    old = np.concatenate([old, old])
    new = old.copy()
    new[0, 1::3] = [k ^ 1 for k in range(d)]
    host = {"w": np.random.default_rng(0).random((2, 3 * d, 2), np.float32)}
    for per_node, crossing in ((None, 0), (2, 0), (1, 8)):
        out, report = jeplb.rearrange_expert_weights(
            old,
            new,
            put(host, mesh8, P(None, "ep")),
            mesh=mesh8,
            devices_per_node=per_node,
        )
        check_rows(as_bytes(host["w"]), as_bytes(out["w"]), old, new, d)
        assert int(report.remote_rows[0]) == d
        assert int(report.inter_node_rows[0]) == crossing
        assert int(report.remote_rows[1]) == 0


def test_plan_counts_inter_node_rows():
    from jeplb._src.transfer import plan as plan_lib

    # Expert 0 lives on device 0 only; devices 1 (same node of 2) and 2 (another node) want it.
    old = jnp.array([0, 1, 2, 3, 4, 5, 6, 7], jnp.int32)
    new = jnp.array([0, 1, 2, 0, 0, 5, 6, 7], jnp.int32)
    plan_layer = jax.jit(plan_lib.plan_layer, static_argnames=("num_devices", "devices_per_node"))
    plan = plan_layer(old, new, num_devices=4, devices_per_node=2)
    assert int(plan.primary.sum()) == 2 and int(plan.inter_node_rows) == 1
    assert plan.sender.tolist() == [-1, -1, -1, 0, 0, -1, -1, -1]
    flat = plan_layer(old, new, num_devices=4)
    assert int(flat.inter_node_rows) == 0


def test_options_are_checked_before_anything_runs(mesh8):
    old, new = make_plan("random", 0, L, 8 * N, 16, 8)
    w = put({"w": np.zeros((L, 8 * N, 2), np.float32)}, mesh8, P(None, "ep"))
    with pytest.raises(ValueError, match=r"devices_per_node: expected a divisor of the 8 devices"):
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8, devices_per_node=3)
    with pytest.raises(ValueError, match=r"devices_per_node: expected an int >= 1, got 0"):
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8, devices_per_node=0)
    # The removed option is an unknown keyword, named, with the valid ones listed.
    unknown = (
        r"unexpected keyword argument\(s\) 'collective'; the transfer's options are axis_name, "
    )
    with pytest.raises(TypeError, match=unknown):
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8, collective="ppermute")
    with pytest.raises(TypeError, match=r"transfer_layer now always returns \(weights, report\)"):
        jeplb.transfer_layer(old[0], new[0], w["w"][0], mesh=mesh8, return_report=True)
    with pytest.raises(
        TypeError, match=r"config: expected a jeplb.TransferConfig or None, got dict"
    ):
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8, config={"chunk_rows": 2})
    with pytest.raises(ValueError, match=r"devices_per_node: expected a divisor of the 8 devices"):
        config = jeplb.TransferConfig(chunk_rows=2, devices_per_node=3)
        jeplb.rearrange_expert_weights(old, new, w, mesh=mesh8, config=config)
    assert not w["w"].is_deleted()  # refused before anything ran


def test_keywords_override_the_config():
    base = jeplb.TransferConfig(chunk_rows=4, row_impl="loop", axis_name=("a", "b"))
    merged = jeplb.TransferConfig.merged(base, chunk_rows=2)
    assert merged == base.replace(chunk_rows=2) and merged.row_impl == "loop"
    assert jeplb.TransferConfig.merged(None) == jeplb.TransferConfig()
    assert jeplb.TransferConfig.merged(base) is base
    with pytest.raises(ValueError, match=r"row_impl: expected one of .*got 'dma'"):
        jeplb.TransferConfig.merged(base, row_impl="dma")
    with pytest.raises(TypeError, match=r"f\(\) got unexpected keyword argument\(s\) 'chunk'"):
        jeplb.TransferConfig.merged(base, "f", chunk=2)
    with pytest.raises(TypeError, match=r"merged\(\) got unexpected keyword argument\(s\) 'where'"):
        jeplb.TransferConfig.merged(base, where="f")
    # The one-layer stages take the same config and keywords, checked before anything is traced.
    with pytest.raises(TypeError, match=r"move_to_buffer\(\) got unexpected keyword argument"):
        jeplb.move_to_buffer(np.zeros(2), np.zeros(2), {}, config=base, chunk=2)
    with pytest.raises(
        TypeError, match=r"config: expected a jeplb.TransferConfig or None, got str"
    ):
        jeplb.move_to_buffer(np.zeros(2), np.zeros(2), {}, config="loop")


@functools.cache
def _ragged_tables_program(d: int, capacity: int):
    """One jitted program per (D, capacity): a layer's plan and every device's ragged tables, the
    device index traced (as `lax.axis_index` is inside the transfer)."""
    from jeplb._src.transfer import plan as plan_lib

    def tables(old, new, devices):
        plan = plan_lib.plan_layer(old, new, num_devices=d)
        per_device = [
            plan_lib.ragged_tables(plan, devices[a], num_devices=d, capacity=capacity)
            for a in range(d)
        ]
        return plan, per_device

    return jax.jit(tables)


@pytest.mark.parametrize(("d", "n", "capacity"), [(4, 3, 2), (4, 3, 3), (8, 2, 1)])
def test_ragged_tables_deliver_every_primary(d, n, capacity):
    # The seam's tables, checked on the host against the collective's documented semantics:
    # per wave, device a's operand rows [input_offsets[b], + send_sizes[b]) land in device b's
    # output at output_offsets[b], and b expects recv_sizes[a] of them.
    program = _ragged_tables_program(d, capacity)
    for seed, kind in enumerate(KINDS):
        old, new = make_plan(kind, seed, 1, d * n, max(1, d * n - 2), d)
        plan, tabs = jax.tree_util.tree_map(
            np.asarray, program(old[0], new[0], jnp.arange(d, dtype=jnp.int32))
        )
        out = np.full((d, n), -1)
        for w in range(tabs[0].send_rows.shape[0]):
            if w >= int(tabs[0].num_waves):
                assert all(int(t.send_sizes[w].sum()) == 0 for t in tabs)
            for a in range(d):
                operand = np.where(tabs[a].send_rows[w] >= 0, a * n + tabs[a].send_rows[w], -1)
                for b in range(d):
                    size = int(tabs[a].send_sizes[w, b])
                    assert size == int(tabs[b].recv_sizes[w, a])
                    lo, at = int(tabs[a].input_offsets[w, b]), int(tabs[a].output_offsets[w, b])
                    if size:
                        assert (out[b, at : at + size] == -1).all()  # nothing overwritten
                        out[b, at : at + size] = operand[lo : lo + size]
        primary = np.asarray(plan.primary).reshape(d, n)
        for b in range(d):
            staged = tabs[b].recv_rows
            assert ((out[b] >= 0) == (staged >= 0)).all()
            assert sorted(staged[staged >= 0].tolist()) == np.nonzero(primary[b])[0].tolist()
            for q in np.nonzero(staged >= 0)[0]:
                assert old[0, out[b, q]] == new[0, b * n + staged[q]]


def test_a_registered_collective_is_picked_once_and_moves_the_rows(mesh8, monkeypatch):
    # A second collective is one class plus one registry line: the engine picks the first that
    # supports the platform when its setup is built, and every stage of the program uses it.
    import dataclasses

    from jeplb._src.transfer import collective, engine, rotation

    @dataclasses.dataclass(frozen=True)
    class Counting:
        name: str = "counting"

        def supports(self, platform):
            return platform == jax.default_backend()

        def exchange(self, *args, **kwargs):
            calls.append(kwargs["num_devices"])
            return rotation.ROTATION.exchange(*args, **kwargs)

    calls = []
    monkeypatch.setattr(collective, "REGISTRY", (Counting(), *collective.REGISTRY))
    setup = engine.Engine(
        config=jeplb.TransferConfig(chunk_rows=3), num_devices=8, platform=jax.default_backend()
    )
    assert setup.collective == Counting() and "counting" in repr(setup)
    old, new = make_plan("random", 9, L, 8 * N, 16, 8)
    host = make_leaves(np.random.default_rng(9), L, 8 * N)
    out, report = jeplb.rearrange_expert_weights(
        old, new, put(host, mesh8, P(None, "ep")), mesh=mesh8, chunk_rows=3
    )
    assert calls and set(calls) == {8} and bool(report.ok.all())
    for name, before in host.items():
        check_rows(as_bytes(before), as_bytes(out[name]), old, new, 8)
    unregistered = engine.Engine(config=setup.config, num_devices=8, platform="tpu")
    assert unregistered.collective is rotation.ROTATION and unregistered != setup

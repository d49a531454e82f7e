"""Ordered in-place local moves (one device): the order is hazard-free, the executors bit-exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src.state import EplbState
from jeplb._src.step import eplb_step
from jeplb._src.transfer import inplace as _local
from tests.test_step import E, Model, R, run
from tests.transfer_model import check_rows, make_leaves, make_plan, program, random_bytes

N = 10  # slots of the test layers: one compilation of the order per width


def simulate(old: np.ndarray, src, dst, count) -> list:
    """Runs the moves one after the other on labels (the temporary is index N)."""
    rows = [("old", i, int(e)) for i, e in enumerate(old)] + [None]
    for k in range(int(count)):
        rows[int(dst[k])] = rows[int(src[k])]
    return rows[:-1]


_order = jax.jit(_local.order_moves)


@st.composite
def layer_maps(draw):
    num_experts = draw(st.integers(1, N + 2))
    old = np.array(draw(st.lists(st.integers(-1, num_experts - 1), min_size=N, max_size=N)))
    held = [*sorted(set(old[old >= 0].tolist())), -1]
    if draw(st.booleans()):
        new = old[np.array(draw(st.permutations(range(N))))]
    else:
        new = np.array(draw(st.lists(st.sampled_from(held), min_size=N, max_size=N)))
    return old.astype(np.int32), new.astype(np.int32)


@settings(max_examples=300, deadline=None)
@given(maps=layer_maps())
def test_order_is_hazard_free_and_complete(maps):
    old, new = maps
    src, dst, count = (np.asarray(a) for a in _order(old, new, jnp.bool_(True)))
    after = simulate(old, src, dst, count)
    changed = (new >= 0) & (new != old)
    for p in range(N):
        if changed[p]:
            # Read before anything overwrote it: the first old holder's original row.
            first = int(np.argmax(old == new[p]))
            assert after[p] == ("old", first, int(new[p])), (old, new, p, after)
        else:
            assert after[p] == ("old", p, int(old[p])) and p not in dst[:count].tolist()
    # Every written slot once, plus at most one save per cycle of >= 2 slots.
    written = [d for d in dst[:count].tolist() if d != N]
    assert sorted(written) == np.flatnonzero(changed).tolist()
    assert count <= changed.sum() + changed.sum() // 2
    assert (src[count:] == N).all() and (dst[count:] == N).all()


def test_cycles_need_one_save_each():
    old = np.arange(N, dtype=np.int32)
    new = np.array([1, 2, 0, 4, 3, 5, 6, 9, 8, 7], np.int32)  # a 3-cycle, two swaps (8 stays)
    _src, dst, count = (np.asarray(a) for a in _order(old, new, jnp.bool_(True)))
    assert int(count) == 7 + 3  # seven slots written, three saves
    assert (dst[:count] == N).sum() == 3


def test_long_cycles_and_chains_are_ordered():
    """Layers of 100 slots holding distinct experts: one cycle through every slot (the pointer
    jumping needs all its rounds to find the cycle's least row) and one chain through every slot
    (the deepest tree): each written once, from its source's old row; one save for the cycle."""
    n = 100
    rng = np.random.default_rng(5)
    order = jax.jit(jax.vmap(_local.order_moves))
    old = np.stack([rng.permutation(n) for _ in range(4)]).astype(np.int32)
    new = old.copy()
    for layer in range(4):
        sel = rng.permutation(n)
        new[layer, sel] = old[layer, np.roll(sel, 1)]
        if layer % 2:  # the chain: one end's row is left empty
            new[layer, sel[0]] = -1
    src, dst, count = (np.asarray(a) for a in order(old, new, np.ones(4, bool)))
    for layer in range(4):
        rows = [("old", i, int(e)) for i, e in enumerate(old[layer])] + [None]
        for k in range(int(count[layer])):
            rows[int(dst[layer, k])] = rows[int(src[layer, k])]
        for p in range(n):
            if new[layer, p] >= 0:
                holder = int(np.flatnonzero(old[layer] == new[layer, p])[0])
                assert rows[p] == ("old", holder, int(new[layer, p])), (layer, p)
        saves = int((dst[layer, : count[layer]] == n).sum())
        assert saves == (0 if layer % 2 else 1)


def test_infeasible_layer_moves_nothing():
    old = np.arange(N, dtype=np.int32)
    new = old[::-1].copy()
    assert int(_order(old, new, jnp.bool_(False))[2]) == 0


@pytest.mark.parametrize("impl", ["loop", "pallas"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8", "float8_e4m3fn"])
@pytest.mark.parametrize("slot_major", [False, True])
def test_apply_moves_bit_exact(impl, dtype, slot_major):
    import ml_dtypes

    dt = getattr(ml_dtypes, dtype) if dtype in ("bfloat16", "float8_e4m3fn") else np.dtype(dtype)
    rng = np.random.default_rng(0)
    num_layers, width = 3, 2048
    old, new = make_plan("random", 1, num_layers, N, 6, 1)
    new[1] = old[1]  # a layer with nothing to move
    orders = jax.jit(_local.order_moves_layers)(old, new, jnp.ones(num_layers, bool))
    host = random_bytes(rng, (num_layers, N, width), dt)
    stacked = host.transpose(1, 0, 2) if slot_major else host
    rows = jnp.asarray(stacked.reshape(num_layers * N, width))
    # The executor the library resolves. On the CPU bf16 and fp8 have none: XLA:CPU slices them
    # through f32 (NaN payloads lost), so the engine stages them (see `test_one_device_bf16_nan_payloads_kept`).
    impl = _local.resolve_impl(impl, rows, jax.default_backend())
    if impl is None:
        assert jax.default_backend() == "cpu" and dtype in ("bfloat16", "float8_e4m3fn")
        pytest.skip(f"{dtype} on one CPU device is staged, not moved in place")
    out = np.asarray(_local.apply_moves(rows, *orders, impl=impl, slot_major=slot_major))
    out = out.reshape(stacked.shape)
    out = out.transpose(1, 0, 2) if slot_major else out
    expect = host.copy()
    for layer in range(num_layers):
        src, dst, count = (np.asarray(a[layer]) for a in orders)
        labels = simulate(old[layer], src, dst, count)
        expect[layer] = np.stack([host[layer, lab[1]] for lab in labels])
    np.testing.assert_array_equal(out.view(np.uint8), expect.view(np.uint8))


def test_apply_moves_errors():
    rows = jnp.zeros((N, 100), jnp.float32)
    z = jnp.zeros((1, 15), jnp.int32)
    with pytest.raises(
        ValueError, match=r"needs rows of a multiple of 512 32-bit words, got 100 elements"
    ):
        _local.apply_moves(rows, z, z, jnp.zeros(1, jnp.int32), impl="pallas")
    with pytest.raises(ValueError, match=r"impl: expected 'pallas' or 'loop', got 'sc"):
        _local.apply_moves(rows, z, z, jnp.zeros(1, jnp.int32), impl="scatter")


# ------------------------------------------------------------------ through the public path


def test_one_device_rearrange_is_direct_and_needs_no_staging(mesh1):
    # Rows large enough that the order's integer tables are noise: the temporary is about a row.
    n, r, num_layers = 8, 4096, 4
    w = jax.ShapeDtypeStruct(
        (num_layers, n, r), jnp.float32, sharding=NamedSharding(mesh1, P(None, "ep"))
    )
    maps = jax.ShapeDtypeStruct((num_layers, n), jnp.int32)
    compiled = program(mesh1).lower(maps, maps, [w]).compile()
    stats = compiled.memory_analysis()
    row = r * 4
    assert stats.temp_size_in_bytes <= 2 * row + 64 * 1024  # vs n * row for a staging buffer
    assert stats.alias_size_in_bytes == num_layers * n * row


def test_one_device_one_compilation_and_report(mesh1):
    traces = []

    @jax.jit
    def step(old, new, w):
        traces.append(1)
        return jeplb.rearrange_expert_weights(old, new, w, mesh=mesh1, donate=False)

    host = make_leaves(np.random.default_rng(2), 2, N)
    for seed, kind in enumerate(("random", "reversal", "empties", "rotate")):
        old, new = make_plan(kind, seed, 2, N, 7, 1)
        w = jax.tree_util.tree_map(
            lambda x: jax.device_put(x, NamedSharding(mesh1, P(None, "ep"))), host
        )
        out, report = step(jnp.asarray(old), jnp.asarray(new), w)
        for name, before in host.items():
            check_rows(before.view(np.uint8), np.asarray(out[name]).view(np.uint8), old, new, 1)
        changed = ((new >= 0) & (new != old)).sum(1)
        np.testing.assert_array_equal(report.local_rows, changed)
        assert int(report.wire_rows.sum()) == 0 and bool(report.ok.all())
    assert len(traces) == 1


def test_one_device_bf16_nan_payloads_kept(mesh1):
    """bf16 and fp8 rows with NaN payloads (quiet and signalling) and subnormals, on one device,
    keep every bit: XLA:CPU slices those dtypes through f32, so they are staged, not looped.
    (The plan is one a random test found: a row copied onto another slot of its device.)"""
    import ml_dtypes

    old = np.array([[0, 0, 1], [0, 1, 1]], np.int32)
    new = np.array([[1, 0, 1], [1, 0, 0]], np.int32)
    patterns = np.array([0xFFD8, 0x7FA1, 0xFF81, 0x7FC5, 0x0001, 0x8003], np.uint16)
    bits = np.resize(patterns, (2, 3, 6)) ^ np.arange(3, dtype=np.uint16)[None, :, None]
    host = {
        "bf16": bits.view(ml_dtypes.bfloat16),
        "fp8": np.resize(np.array([0x7F, 0xFF, 0x01, 0x81, 0x7E, 0x3C], np.uint8), (2, 3, 6))
        .__xor__(np.array([0, 0x80, 0x01], np.uint8)[None, :, None])
        .view(ml_dtypes.float8_e4m3fn),  # NaNs (0x7f, 0xff), subnormals
    }
    w = {k: jax.device_put(v, NamedSharding(mesh1, P(None, "ep"))) for k, v in host.items()}
    out, report = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh1)
    for name, before in host.items():
        check_rows(before.view(np.uint8), np.asarray(out[name]).view(np.uint8), old, new, 1)
    assert bool(report.ok.all())


# ------------------------------------------------------------------- eplb_step on one device


def test_one_device_step_moves_in_place_and_stays_exact(mesh1):
    # Every step checks the outputs and each slot's weights (f32 and bf16 bits) against numpy.
    model = Model(num_layers=3, seed=2)
    state = EplbState.create(
        num_layers=3,
        num_experts=E,
        num_devices=1,
        num_redundant_experts=R,
        window_size=2,
        step_interval=2,
    ).replicated(mesh1)
    _, _, log, traces, _ = run(model, state, 6, mesh1)
    assert traces == 1
    fired = [entry for entry in log if entry["info"].fired]
    assert fired and all(entry["info"].moved.all() for entry in fired)
    assert any((entry["before"] != entry["after"]).any() for entry in fired)


def test_one_device_step_moves_large_rows_in_place(mesh1):
    # Rows of 64 KiB (the Pallas kernel on a GPU, the loop on CPU), moved in the whole leaf: about
    # two rows of temporary, where a staging buffer or a copy of the layer takes N_local rows.
    num_layers, n, width = 2, E + R, 16384
    rng = np.random.default_rng(3)
    logical = random_bytes(rng, (num_layers, E, width), np.float32)
    state = EplbState.create(
        num_layers=num_layers,
        num_experts=E,
        num_devices=1,
        num_redundant_experts=R,
        step_interval=1,
    ).replicated(mesh1)
    skew = np.stack([rng.permutation(np.arange(1, E + 1) ** 3) for _ in range(num_layers)])
    state = state.replace(pass_load=jnp.asarray(skew, state.pass_load.dtype))
    lay = np.arange(num_layers)[:, None]
    before = np.asarray(state.phy2log)
    w = jax.device_put(logical[lay, before], NamedSharding(mesh1, P(None, "ep")))
    step = jax.jit(lambda s, w: eplb_step(s, w, mesh=mesh1), donate_argnums=(0, 1))
    compiled = step.lower(state, {"w": w}).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = width * 4
    assert temp <= 2 * row + 64 * 1024, (temp, n * row)
    state, out, info = compiled(state, {"w": w})
    after = np.asarray(state.phy2log)
    assert bool(info.fired) and np.asarray(info.moved).all() and (after != before).any()
    np.testing.assert_array_equal(
        np.asarray(out["w"]).view(np.uint32), logical[lay, after].view(np.uint32)
    )

"""Bad input to the weight transfer (`rearrange_expert_weights`, `transfer_layer`, the stages):
a clear error naming the argument, raised before anything changes (see tests/bad_input.py).

Inputs once refused and now accepted (maps as lists, other mesh axes on the dims after the slot
dim) are checked to work, next to what is still refused.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.bad_input import (
    KERNEL,
    MESH,
    MESH1,
    NEW,
    OLD,
    OTHER,
    PT,
    REVERSED,
    SETTINGS,
    SPEC,
    TENSOR,
    D,
    E,
    L,
    N,
    by_expert,
    expect,
    int_error,
    kernel_leaves,
    names_both,
    needs_devices,
    weights,
)
from tests.helpers import mesh_of

pytestmark = needs_devices


# ------------------------------------------------------------------------ the weight transfer

MAP_CASES = (
    "float",
    "one_dim",
    "shape",
    "below_minus_one",
    "not_in_old",
    "int32_max",
    "above_num_experts",
    "p_not_divisible",
    "not_array",
    "no_layers",
    "no_slots",
)


def bad_maps(case, data):
    old, new = OLD.copy(), NEW.copy()
    lay = data.draw(st.integers(0, L - 1))
    p = data.draw(st.integers(0, PT - 1))
    if case == "float":
        return old.astype(np.float32), new, TypeError, r"old_phy2log: expected an integer dtype"
    if case == "one_dim":
        return old[0], new[0], ValueError, r"old_phy2log: expected a 2-D map \[L, P\]"
    if case == "shape":
        return (
            old,
            new[:1],
            ValueError,
            r"new_phy2log: expected shape \[L, P\] = \(2, 16\) \(old_phy2log's\), got \(1, 16\)",
        )
    if case == "below_minus_one":
        new[lay, p] = data.draw(st.integers(-(2**31), -2))
        return old, new, ValueError, rf"new_phy2log\[{lay}, {p}\] = -\d+: expected an expert id"
    if case == "not_in_old":
        # 2^31 - 1 is refused for another reason (ids must stay below it, see "int32_max").
        new[lay, p] = data.draw(st.integers(E, 2**31 - 2))
        return old, new, ValueError, rf"new_phy2log\[{lay}, {p}\] = \d+, but no slot of old_phy2log"
    if case == "int32_max":  # reserved: ids must stay below it
        new[lay, p] = 2**31 - 1
        return (
            old,
            new,
            ValueError,
            rf"new_phy2log\[{lay}, {p}\] = 2147483647: expected an expert id in \[0, 2\^31 - 1\)",
        )
    if case == "above_num_experts":
        old[lay, p] = E + 5
        return (
            old,
            new,
            ValueError,
            r"old_phy2log\[\d, \d+\] = 13: expected an expert id in \[0, num_experts = 8\)",
        )
    if case == "p_not_divisible":
        cut = data.draw(st.sampled_from([PT - 1, PT - 3, PT + 1]))
        o = np.resize(old, (L, cut)).astype(np.int32)
        return o, o, ValueError, r"P = \d+ slots is not divisible by D = 8 devices"
    if case in ("no_layers", "no_slots"):
        o = old[:0] if case == "no_layers" else old[:, :0]
        shape = r"\(0, 16\)" if case == "no_layers" else r"\(2, 0\)"
        want = rf"old_phy2log: expected at least one layer and one slot, got shape {shape}"
        return o, o.copy(), ValueError, want
    return "maps", new, TypeError, r"old_phy2log: expected an integer array \[L, P\], got str"


@SETTINGS
@given(case=st.sampled_from(MAP_CASES), data=st.data())
def test_rearrange_bad_maps(case, data):
    old, new, error, match = bad_maps(case, data)
    w = weights()
    kwargs = {"num_experts": E} if case == "above_num_experts" else {}

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(old, new, w, mesh=MESH, **kwargs)

    expect(rearrange_expert_weights, error, match, old, new, w)


WEIGHT_CASES = (
    "numpy",
    "shape",
    "replicated",
    "other_mesh",
    "complex",
    "bool",
    "empty",
    "not_array",
    "mesh_axis",
    "chunk",
    "row_impl",
    "staging",
    "layer_axis",
    "same_axes",
    "aliased",
    "two_bad",
    "reversed_mesh",
)


@SETTINGS
@given(case=st.sampled_from(WEIGHT_CASES), data=st.data())
def test_rearrange_bad_weights_and_options(case, data):
    w = weights()
    kwargs = {"mesh": MESH}
    if case == "numpy":
        w["w"] = np.zeros((L, PT, 3), np.float32)
        error, match = TypeError, r"expert_weights\['w'\] is a ndarray; expected a jax.Array"
    elif case == "shape":
        p = data.draw(st.sampled_from([PT // 2, PT * 2]))
        w["w"] = jax.device_put(jnp.zeros((L, p, 3)), SPEC)
        error = ValueError
        match = (
            rf"expert_weights\['w'\] has shape \(2, {p}, 3\), expected leading dims L = 2 x P = 16"
        )
    elif case == "replicated":
        w["w"] = jax.device_put(jnp.zeros((L, PT, 3)), NamedSharding(MESH, P()))
        error = ValueError
        match = (
            r"expert_weights\['w'\] is sharded PartitionSpec\(\); its slot dim 1 "
            r"must be sharded over exactly 'ep'.*e.g. PartitionSpec\(None, 'ep', None\)"
        )
    elif case == "other_mesh":
        w["w"] = jax.device_put(jnp.zeros((L, PT, 3)), NamedSharding(mesh_of(d=4), P(None, "ep")))
        error = ValueError
        match = r"expert_weights\['w'\] lives on a mesh \{'ep': 4\} .*mesh argument's \{'ep': 8\}"
    elif case in ("complex", "bool"):
        dtype = jnp.complex64 if case == "complex" else jnp.bool_
        w["w"] = jax.device_put(jnp.zeros((L, PT, 3), dtype), SPEC)
        error = TypeError
        match = rf"expert_weights\['w'\] has dtype {np.dtype(dtype)}, which is not moved; expected"
    elif case == "empty":
        w = {}
        error, match = ValueError, r"expert_weights: expected a pytree with at least one array"
    elif case == "not_array":
        w["w"] = "weights"
        error, match = TypeError, r"expert_weights\['w'\] is a str, expected a jax.Array"
    elif case == "mesh_axis":
        kwargs["mesh"] = OTHER
        error, match = ValueError, r"mesh: has no axis named 'ep' \(axis_name\); its axes are"
    elif case == "chunk":
        kwargs["chunk_rows"] = bad = data.draw(st.sampled_from([0, -1, 1.5, True, "2"]))
        error, match = int_error("chunk_rows", bad)
    elif case == "row_impl":
        valid = ("auto", "loop", "pallas", "scatter")
        kwargs["row_impl"] = bad = data.draw(st.text(max_size=7).filter(lambda s: s not in valid))
        error = ValueError
        match = rf"row_impl: expected one of \('auto', .*\), got {re.escape(repr(bad))}"
    elif case == "staging":
        kwargs["staging_passes"] = bad = data.draw(st.sampled_from([0, -2, 1.5, "1"]))
        error, match = int_error("staging_passes", bad, allow_none=True)
    elif case == "layer_axis":
        kwargs["layer_axis"] = bad = data.draw(st.sampled_from([2, -1, True, "0"]))
        error, match = ValueError, rf"layer_axis: expected 0 or 1 .*, got {re.escape(repr(bad))}"
    elif case == "same_axes":
        kwargs["slot_axis"] = 0
        error, match = ValueError, r"layer_axis and slot_axis: expected two different dims"
    elif case == "aliased":
        w["b"] = w["w"]
        error = ValueError
        match = (
            r"(expert_weights\['w'\] is the same array as expert_weights\['b'\]"
            r"|expert_weights\['b'\] is the same array as expert_weights\['w'\]); "
            r"a donated pytree must hold each array once"
        )
    elif case == "two_bad":
        w["w"] = jax.device_put(jnp.zeros((L, PT, 3), jnp.complex64), SPEC)
        w["q"] = jax.device_put(jnp.ones((L + 1, PT, 4), jnp.int8), SPEC)
        error = ValueError  # a TypeError and a ValueError together
        match = (
            r"^2 leaves cannot be moved:\n"
            r"  expert_weights\['q'\] has shape \(3, 16, 4\), expected leading dims L = 2 x P = 16\n"
            r"  expert_weights\['w'\] has dtype complex64, which is not moved"
        )
    else:
        w["q"] = jax.device_put(
            jnp.ones((L, PT, 4), jnp.int8), NamedSharding(REVERSED, P(None, "ep"))
        )
        error = ValueError
        match = r"expert_weights\['q'\] lives on a mesh \{'ep': 8\} of other devices"

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(OLD, NEW, w, **kwargs)

    expect(rearrange_expert_weights, error, match, OLD, NEW, w)


@pytest.mark.parametrize("mesh", [None, "ep", 8])
def test_rearrange_mesh_not_a_mesh(mesh):
    w = weights()

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(OLD, NEW, w, mesh=mesh)

    expect(rearrange_expert_weights, TypeError, r"mesh: expected a jax.sharding.Mesh", w)


@pytest.mark.parametrize("axis_name", [3, None, (), ("ep", 3)])
def test_rearrange_axis_name_not_a_name(axis_name):
    w = weights()

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(OLD, NEW, w, mesh=MESH, axis_name=axis_name)

    got = re.escape(repr(axis_name))
    error = ValueError if axis_name == () else TypeError
    match = rf"axis_name: expected (a mesh axis name \(str\) or a tuple of them|at least one mesh axis), got .*{got}"
    expect(rearrange_expert_weights, error, match, w)


def test_rearrange_maps_as_lists():
    """Python lists are maps like any other (no longer refused); the result is the new placement."""
    sharded = {"w": jax.device_put(jnp.asarray(by_expert(OLD)), SPEC)}
    out, _ = jeplb.rearrange_expert_weights(OLD.tolist(), NEW.tolist(), sharded, mesh=MESH)
    np.testing.assert_array_equal(np.asarray(out["w"]), by_expert(NEW))
    assert out["w"].sharding.spec == SPEC.spec


OLD4 = np.tile(np.arange(E, dtype=np.int32), (L, 1))  # P = 8 slots over TENSOR's 4 'ep' devices
NEW4 = np.roll(OLD4, 3, axis=1)


@pytest.mark.parametrize(
    "spec, cols", [(P(None, "ep", "tensor"), (4,)), (P(None, "ep", None, "tensor"), (3, 2))]
)
def test_rearrange_other_axes_on_other_dims(spec, cols):
    """Other mesh axes may shard the dims after the slot dim; the weights come back moved and with
    the sharding they came in with."""
    host = by_expert(OLD4, int(np.prod(cols))).reshape(L, E, *cols)
    want = by_expert(NEW4, int(np.prod(cols))).reshape(L, E, *cols)
    w = {"x": jax.device_put(jnp.asarray(host), NamedSharding(TENSOR, spec))}
    out, _ = jeplb.rearrange_expert_weights(OLD4, NEW4, w, mesh=TENSOR)
    np.testing.assert_array_equal(np.asarray(out["x"]), want)
    assert out["x"].sharding.spec == spec


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            P("tensor", "ep"),
            r"expert_weights\['x'\] is sharded PartitionSpec\('tensor', 'ep'\); "
            r"its layer dim 0 must not be sharded",
        ),
        (
            P(None, ("ep", "tensor")),
            r"expert_weights\['x'\] is sharded PartitionSpec\(None, "
            r"\('ep', 'tensor'\)\); its slot dim 1 must be sharded over exactly 'ep'",
        ),
        (
            P(None, "tensor", "ep"),
            r"expert_weights\['x'\] is sharded PartitionSpec\(None, 'tensor', "
            r"'ep'\); its slot dim 1 must be sharded over exactly 'ep'",
        ),
    ],
)
def test_rearrange_expert_axis_misplaced(spec, match):
    """Still refused on a mesh with a tensor axis: the layer dim sharded, the slot dim over more
    than the expert axis, the expert axis on another dim."""
    w = {"x": jax.device_put(jnp.zeros((L, E, 4)), NamedSharding(TENSOR, spec))}

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(OLD4, NEW4, w, mesh=TENSOR)

    expect(rearrange_expert_weights, ValueError, match, w)


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from(("two_dim", "bad_id", "leaf_shape")))
def test_transfer_layer_bad_input(case):
    w = {"w": jax.device_put(jnp.zeros((PT, 3)), NamedSharding(MESH, P("ep")))}
    old, new = OLD[0].copy(), NEW[0].copy()
    if case == "two_dim":
        old, new = OLD, NEW
        error, match = ValueError, r"old_phy2log: expected a 1-D map \[P\]"
    elif case == "bad_id":
        new[4] = 99
        error, match = ValueError, r"new_phy2log\[4\] = 99, but no slot"
    else:
        w = {"w": jax.device_put(jnp.zeros((L, PT, 3)), SPEC)}
        error = ValueError
        match = r"expert_weights\['w'\] has shape \(2, 16, 3\), expected leading dims P = 16"

    def transfer_layer():
        return jeplb.transfer_layer(old, new, w, mesh=MESH)

    expect(transfer_layer, error, match, old, new, w)


LOCAL_SHAPE = r"expert_weights has local shape \(3, 3\), expected \[N_local = 2, \.\.\.\]"


def test_stages_bad_input():
    w = jnp.zeros((N, 3))

    def move_to_buffer():
        return jeplb.move_to_buffer(OLD[0], NEW[0], w)

    expect(move_to_buffer, ValueError, r"axis_name: no mesh axis 'ep' is bound here", w)

    def traced(shape, buffer_shape, meta):
        def body(x):
            buf = None if buffer_shape is None else jnp.zeros(buffer_shape, x.dtype)
            if meta is not None:
                return jeplb.move_from_buffer(x, x, meta)
            out, _ = jeplb.move_to_buffer(OLD[0], NEW[0], x, buffer=buf)
            return out

        f = jax.shard_map(body, mesh=MESH, in_specs=P("ep"), out_specs=P("ep"))
        return lambda: jax.jit(f).lower(jnp.zeros((D * shape[0], *shape[1:])))

    for shape, buf, meta, error, match in (
        ((N + 1, 3), None, None, ValueError, LOCAL_SHAPE),
        (
            (N, 3),
            (N, 4),
            None,
            ValueError,
            r"buffer is float32\[2, 4\], expected .* float32\[2, 3\]",
        ),
        ((N, 3), None, "meta", TypeError, r"metadata: expected the TransferMetadata"),
    ):
        fn = traced(shape, buf, meta)
        fn.__qualname__ = "move_to_buffer" if meta is None else "move_from_buffer"
        expect(fn, error, match)


# ------------------------------------------------------ rows that row_impl="pallas" cannot move


@KERNEL
@given(d=st.sampled_from([1, D]), data=st.data())
def test_rearrange_rows_the_kernel_cannot_move(d, data):
    mesh = MESH if d == D else MESH1
    w = kernel_leaves(data, (L, PT), NamedSharding(mesh, P(None, "ep")))

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(OLD, NEW, w, mesh=mesh, row_impl="pallas")

    expect(rearrange_expert_weights, ValueError, names_both("expert_weights"), OLD, NEW, w)


def test_rearrange_blocks_the_passes_cut_too_fine():
    host = {"b": np.zeros((L, PT, 3), np.float32), "w13": np.zeros((L, PT, 2048), np.float32)}
    host["w2"] = np.zeros((L, PT, 4096), np.float32)  # blocks of 1024: fine
    w = {k: jax.device_put(x, SPEC) for k, x in host.items()}
    match = (
        names_both("expert_weights") + r"row_impl='pallas' needs blocks of a multiple of 1024 "
        r"elements, but staging_passes=4 cuts its rows of 2048 elements into blocks of 512; "
        r"pass staging_passes=2 or row_impl='loop'"
    )

    def rearrange_expert_weights():
        return jeplb.rearrange_expert_weights(
            OLD, NEW, w, mesh=MESH, row_impl="pallas", staging_passes=4
        )

    expect(rearrange_expert_weights, ValueError, match, OLD, NEW, w)


@KERNEL
@given(data=st.data())
def test_transfer_layer_rows_the_kernel_cannot_move(data):
    w = kernel_leaves(data, (PT,), NamedSharding(MESH, P("ep")))

    def transfer_layer():
        return jeplb.transfer_layer(OLD[0], NEW[0], w, mesh=MESH, row_impl="pallas")

    expect(transfer_layer, ValueError, names_both("expert_weights"), w)


@KERNEL
@given(commit=st.booleans(), data=st.data())
def test_stages_rows_the_kernel_cannot_move(commit, data):
    w = kernel_leaves(data, (PT,))

    def body(x):
        # Staged with the loop, the commit alone asks for the kernel.
        buf, meta = jeplb.move_to_buffer(OLD[0], NEW[0], x, row_impl="loop" if commit else "pallas")
        return jeplb.move_from_buffer(x, buf, meta, row_impl="pallas")

    f = jax.shard_map(body, mesh=MESH, in_specs=P("ep"), out_specs=P("ep"))
    fn = lambda: jax.jit(f).lower(w)  # noqa: E731
    fn.__qualname__ = "move_from_buffer" if commit else "move_to_buffer"
    expect(fn, ValueError, names_both("expert_weights"), w)


def test_auto_takes_the_loop_where_the_kernel_cannot_move_rows(triton_lowering):
    # One GPU, rows of 64 KiB and more: ``auto`` picks the in-place kernel only for rows it moves
    # (int8 rows of 1024 x 65 elements are not whole blocks of 512 32-bit words).
    from jeplb._src.transfer import inplace

    odd = jax.ShapeDtypeStruct((4, 1024 * 65), jnp.int8)
    even = jax.ShapeDtypeStruct((4, 1024 * 66), jnp.int8)
    assert inplace.pallas_refusal(4, odd.shape[1], odd.dtype)
    assert inplace.resolve_impl("auto", odd, "gpu") == "loop"
    assert inplace.resolve_impl("pallas", odd, "gpu") == "pallas"  # asked for: refused by path
    assert inplace.resolve_impl("auto", even, "gpu") == "pallas"

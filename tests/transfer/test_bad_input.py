"""Bad input through every public function: a clear ValueError/TypeError, raised before anything
changes (inputs byte-for-byte the same, donated weights still alive), no crash, no hang.

Each test draws one kind of mistake (and where to make it) with hypothesis and pins the message.
Inputs once refused and now accepted (maps as lists, other mesh axes on the dims after the slot
dim) are checked to work, next to what is still refused.
Set JEPLB_BAD_INPUT_COUNTS=path to write how many bad inputs each function was given.
"""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb

L, E, D, N = 2, 8, 8, 2  # P = 16
PT = D * N
TRIED: collections.Counter = collections.Counter()
SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _int_error(name, bad, *, allow_none=False):
    """The one int option check's error for ``bad`` (`jeplb._src.validate.check_int`)."""
    if isinstance(bad, bool) or not isinstance(bad, int):
        want = "an int or None" if allow_none else "an int"
        return (
            TypeError,
            rf"{name}: expected {want}, got {type(bad).__name__} {re.escape(repr(bad))}",
        )
    return ValueError, rf"{name}: expected an int >= 1, got {bad}"


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    path = os.environ.get("JEPLB_BAD_INPUT_COUNTS")
    if path:
        with open(path, "w") as f:
            json.dump({"total": sum(TRIED.values()), **dict(sorted(TRIED.items()))}, f, indent=1)


def mesh_of(name="ep", d=D):
    return jax.make_mesh((d,), (name,), axis_types=(jax.sharding.AxisType.Auto,))


if jax.device_count() < D:  # e.g. one GPU: these cases build D-device meshes
    pytest.skip(
        f"needs {D} devices, the default backend has {jax.device_count()}",
        allow_module_level=True,
    )
MESH = mesh_of()
OTHER = mesh_of("data")
# MESH's devices in reverse order: same axes and sizes, another placement of the slots.
REVERSED = jax.sharding.Mesh(
    np.asarray(MESH.devices)[::-1], ("ep",), axis_types=(jax.sharding.AxisType.Auto,)
)
# Four devices on the expert axis, two on a tensor axis that may shard the other dims.
TENSOR = jax.make_mesh((D // 2, 2), ("ep", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
SPEC = NamedSharding(MESH, P(None, "ep"))
OLD = np.tile(np.arange(PT, dtype=np.int32) % E, (L, 1))
NEW = np.roll(OLD, 3, axis=1)


def weights():
    return {
        "w": jax.device_put(jnp.arange(L * PT * 3, dtype=jnp.float32).reshape(L, PT, 3), SPEC),
        "q": jax.device_put(jnp.ones((L, PT, 4), jnp.int8), SPEC),
    }


def by_expert(old, cols=3):
    """float32[L, P, cols] whose row (l, p) says which expert slot p holds: every copy of an
    expert has the same row, so the result of a transfer is known whichever copy it reads."""
    old = np.asarray(old)
    layer = np.arange(old.shape[0])[:, None, None]
    return (1000 * layer + 10 * old[..., None] + np.arange(cols)).astype(np.float32)


def snapshot(tree):
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array):
            out.append(("jax", x, np.asarray(x).tobytes()))
        elif isinstance(x, np.ndarray):
            out.append(("np", x, x.tobytes()))
    return out


def expect(fn, error, match, *inputs):
    """Calls ``fn()``; it must raise ``error`` matching ``match`` and leave ``inputs`` as they were."""
    before = snapshot(inputs)
    with pytest.raises(error, match=match):
        fn()
    for kind, x, raw in before:
        if kind == "jax":
            assert not x.is_deleted(), "an input array was donated although the call failed"
        assert np.asarray(x).tobytes() == raw, "an input changed although the call failed"
    TRIED[fn.__qualname__.rsplit(".", 1)[-1]] += 1  # the public function's name


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
        error, match = _int_error("chunk_rows", bad)
    elif case == "row_impl":
        valid = ("auto", "loop", "pallas", "scatter")
        kwargs["row_impl"] = bad = data.draw(st.text(max_size=7).filter(lambda s: s not in valid))
        error = ValueError
        match = rf"row_impl: expected one of \('auto', .*\), got {re.escape(repr(bad))}"
    elif case == "staging":
        kwargs["staging_passes"] = bad = data.draw(st.sampled_from([0, -2, 1.5, "1"]))
        error, match = _int_error("staging_passes", bad, allow_none=True)
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


# --------------------------------------------------------------------------------- the policy

LOAD = np.arange(1, L * E + 1, dtype=np.float32).reshape(L, E)


@SETTINGS
@given(
    case=st.sampled_from(
        (
            "nan",
            "inf",
            "negative",
            "one_dim",
            "bool",
            "complex",
            "not_array",
            "empty",
            "replicas",
            "divisible",
            "groups",
            "count_type",
            "old_shape",
            "old_ids",
            "old_incomplete",
        )
    ),
    data=st.data(),
)
def test_rebalance_experts_bad_input(case, data):
    load = LOAD.copy()
    args = [load, PT, 1, 1, D]
    kwargs = {}
    lay, e = data.draw(st.integers(0, L - 1)), data.draw(st.integers(0, E - 1))
    if case in ("nan", "inf", "negative"):
        load[lay, e] = {"nan": np.nan, "inf": np.inf, "negative": -3.0}[case]
        want = r"expected finite loads >= 0 \(token counts\)"
        error, match = ValueError, rf"load\[{lay}, {e}\] = -?\w+(\.\d+)?: {want}"
    elif case == "one_dim":
        args[0] = load[0]
        error, match = ValueError, r"load: expected a 2-D array \[L, E\]"
    elif case in ("bool", "complex"):
        args[0] = load > 3 if case == "bool" else load.astype(np.complex64)
        error, match = TypeError, r"load: expected a real \(integer or floating\) dtype"
    elif case == "not_array":
        args[0] = "load"
        error, match = TypeError, r"load: expected an array \[L, E\], got str"
    elif case == "empty":
        args[0] = np.zeros((0, E), np.float32)
        error, match = ValueError, r"load: expected at least one layer and one expert"
    elif case == "replicas":
        args[1], args[4] = E // 2, 2
        error, match = ValueError, r"num_slots: expected at least one slot per logical expert"
    elif case == "divisible":
        args[1] = PT + data.draw(st.integers(1, D - 1))
        error, match = ValueError, r"num_slots: expected a multiple of num_devices = 8"
    elif case == "groups":
        args[2] = data.draw(st.sampled_from([3, 5, 7]))
        error, match = ValueError, r"num_groups: expected a divisor of the E = 8"
    elif case == "count_type":
        i = data.draw(st.integers(1, 4))
        args[i] = data.draw(st.sampled_from([2.0, "2", None, True]))
        error, match = TypeError, r"num_\w+: expected an int, got "
    elif case == "old_shape":
        kwargs["old_phy2log"] = OLD[:1]
        error, match = (
            ValueError,
            r"old_phy2log: expected shape \[L, P\] = \(2, 16\) \(load's layers x num_slots\), "
            r"got \(1, 16\)",
        )
    elif case == "old_ids":
        old = OLD.copy()
        old[lay, 2 * e] = E + data.draw(st.integers(0, 100))
        kwargs["old_phy2log"] = old
        error, match = ValueError, r"old_phy2log\[\d, \d+\] = \d+: expected an expert"
    else:
        old = OLD.copy()
        old[lay] = np.where(old[lay] == e, (e + 1) % E, old[lay])
        kwargs["old_phy2log"] = old
        error, match = ValueError, rf"old_phy2log\[{lay}\]: expert {e} has no slot"

    def rebalance_experts():
        return jeplb.rebalance_experts(*args, **kwargs)

    expect(rebalance_experts, error, match, *[a for a in args if isinstance(a, np.ndarray)])


# -------------------------------------------------------------------------------- the metrics


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from(("load_shape", "gpus", "map_dim", "rc_shape", "rc_gpus")))
def test_metrics_bad_shapes(case):
    load = LOAD.copy()
    if case == "load_shape":
        fn = lambda: jeplb.balancedness(OLD, load[:1], D)  # noqa: E731
        error, match = ValueError, r"load: expected \[L, E\] with L = 2"
    elif case == "gpus":
        fn = lambda: jeplb.device_loads(OLD, load, 5)  # noqa: E731
        error, match = ValueError, r"phy2log: P = 16 slots is not divisible by D = 5 devices"
    elif case == "map_dim":
        fn = lambda: jeplb.balancedness(OLD[0], load, D)  # noqa: E731
        error, match = ValueError, r"phy2log: expected a 2-D map \[L, P\]"
    elif case == "rc_shape":
        fn = lambda: jeplb.remote_copies(OLD, OLD[:1], D)  # noqa: E731
        error, match = (
            ValueError,
            r"new_phy2log: expected shape \[L, P\] = \(2, 16\) \(old_phy2log's\), got \(1, 16\)",
        )
    else:
        fn = lambda: jeplb.remote_copies(OLD, OLD, 3)  # noqa: E731
        error, match = ValueError, r"old_phy2log: P = 16 slots is not divisible by D = 3 devices"
    fn.__qualname__ = "metrics"
    expect(fn, error, match, load)


@pytest.mark.parametrize("case", ["nan_load", "negative_load", "id_too_large", "float_map"])
def test_metrics_bad_values(case):
    load, phy2log = LOAD.copy(), OLD.copy()
    if case == "nan_load":
        load[0, 0] = np.nan
    elif case == "negative_load":
        load[0, 0] = -1
    elif case == "id_too_large":
        phy2log[0, 0] = E + 3
    else:
        phy2log = phy2log.astype(np.float32)
    try:
        jeplb.balancedness(phy2log, load, D)
    except (ValueError, TypeError) as err:
        assert re.search(r"(load|phy2log)", str(err)), err
        return
    raise AssertionError(f"balancedness accepted {case}")


# ---------------------------------------------------------------------------------- the state

CREATE = dict(num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=PT - E,
              window_size=2, step_interval=4)  # fmt: skip


@SETTINGS
@given(
    case=st.sampled_from(
        (
            "num_layers",
            "num_experts",
            "num_devices",
            "redundant",
            "window",
            "interval",
            "layers_per_step",
            "axis_name",
            "chunk_rows",
            "groups",
            "divisible",
        )
    ),
    data=st.data(),
)
def test_state_create_bad_config(case, data):
    kw = dict(CREATE)
    if case in ("num_layers", "num_experts", "num_devices", "window"):
        name = {"window": "window_size"}.get(case, case)
        kw[name] = data.draw(st.sampled_from([0, -1, 2.0, "3", None]))
        bad = kw[name]
        error = ValueError if isinstance(bad, int) else TypeError
        match = rf"{name}: expected an int"
    elif case == "redundant":
        kw["num_redundant_experts"] = -1
        error, match = ValueError, r"num_redundant_experts: expected an int >= 0, got -1"
    elif case == "interval":
        kw["step_interval"] = 0
        error, match = ValueError, r"step_interval: expected an int >= 1, got 0"
    elif case == "layers_per_step":
        kw["layers_per_step"] = L + data.draw(st.integers(1, 5))
        error, match = ValueError, r"layers_per_step: expected at most num_layers = 2"
    elif case == "axis_name":
        kw["axis_name"] = data.draw(st.sampled_from(["", 3, None]))
        error, match = TypeError, r"axis_name: expected a mesh axis name \(str\)"
    elif case == "chunk_rows":
        kw["chunk_rows"] = 0
        error, match = ValueError, r"chunk_rows: expected an int >= 1, got 0"
    elif case == "groups":
        kw["num_groups"] = 3
        error, match = ValueError, r"num_groups: expected a divisor of the E = 8 logical experts"
    else:
        kw["num_redundant_experts"] = PT - E + data.draw(st.integers(1, D - 1))
        error, match = ValueError, r"num_devices: P = \d+ slots per layer .* not divisible by"

    def create():
        return jeplb.EplbState.create(**kw)

    expect(create, error, match)


@settings(max_examples=20, deadline=None)
@given(case=st.sampled_from(("float", "three_dim", "missing", "id", "p_divisible")), data=st.data())
def test_state_from_placement_bad_map(case, data):
    m = OLD.copy()
    lay = data.draw(st.integers(0, L - 1))
    if case == "float":
        m = m.astype(np.float64)
        error, match = TypeError, r"phy2log: expected an integer dtype"
    elif case == "three_dim":
        m = m[None]
        error, match = ValueError, r"phy2log: expected a 2-D map \[L, P\]"
    elif case == "missing":
        e = data.draw(st.integers(0, E - 1))
        m[lay] = np.where(m[lay] == e, (e + 1) % E, m[lay])
        error, match = ValueError, rf"phy2log\[{lay}\]: expert {e} has no slot"
    elif case == "id":
        m[lay, 3] = data.draw(st.sampled_from([-7, E, 1000]))
        error, match = ValueError, rf"phy2log\[{lay}, 3\] = -?\d+: expected an expert id"
    else:
        m = m[:, :-1]
        error, match = ValueError, r"phy2log: P = 15 slots is not divisible by D = 8 devices"

    def from_placement():
        return jeplb.EplbState.from_placement(
            m, num_experts=E, num_devices=D, window_size=2, step_interval=4
        )

    expect(from_placement, error, match, m)


@pytest.fixture(scope="module")
def state():
    return jeplb.EplbState.create(**CREATE)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=st.sampled_from(("float", "shape", "layer", "negative", "mesh")), data=st.data())
def test_state_record_and_replicated(state, case, data):
    counts = np.ones((L, E), np.int32)
    kwargs = {}
    if case == "float":
        counts = counts.astype(np.float32)
        error, match = TypeError, r"load: expected an integer dtype \(int32\), got float32"
    elif case == "shape":
        counts = counts[:, :3]
        error, match = ValueError, r"load: expected shape \[L, E\] = \(2, 8\), got \(2, 3\)"
    elif case == "layer":
        counts = counts[0]
        kwargs["layer"] = data.draw(st.sampled_from([-1, L, 99]))
        error, match = ValueError, r"layer: expected an index in \[0, num_layers = 2\)"
    elif case == "negative":
        lay, e = data.draw(st.integers(0, L - 1)), data.draw(st.integers(0, E - 1))
        counts[lay, e] = -data.draw(st.integers(1, 2**31 - 1))
        error, match = ValueError, rf"load\[{lay}, {e}\] = -\d+: expected token counts >= 0"
    else:

        def replicated():
            return state.replicated(data.draw(st.sampled_from(["mesh", None, 8])))

        expect(replicated, TypeError, r"mesh: expected a jax.sharding.Mesh", state.phy2log)
        return

    def record():
        return state.record(counts, **kwargs)

    expect(record, error, match, counts, state.pass_load)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, state):
    d = tmp_path_factory.mktemp("saved")
    state.save(d / "s.json")
    state.save(d / "s.npz")
    return d


def _damage(doc, case, rng):
    if case == "bad_id":
        doc["arrays"]["phy2log"][0][int(rng.integers(0, PT))] = 99
    elif case == "no_config":
        del doc["config"]
    elif case == "config_value":
        doc["config"]["schedule"]["window_size"] = "two"
    elif case == "float_ids":
        doc["arrays"]["phy2log"][0][0] = 1.5
    elif case == "array_shape":
        doc["arrays"]["window"] = doc["arrays"]["window"][:1]
    elif case == "missing_array":
        del doc["arrays"]["logcnt"]
    elif case == "version":
        doc["version"] = 99
    elif case == "format":
        doc["format"] = "something else"
    elif case == "logcnt":
        doc["arrays"]["logcnt"][1][2] += 1
    elif case == "string_array":
        doc["arrays"]["step"] = "zero"
    return doc


LOAD_MESSAGES = {
    "bad_id": r"phy2log\[0, \d+\] = 99: expected an expert id",
    "no_config": r"is a damaged saved jeplb.EplbState: config: missing from the header",
    "config_value": r"is a damaged saved jeplb.EplbState: window_size: expected an int, got str",
    "float_ids": r"is a damaged saved jeplb.EplbState.*expected integer arrays",
    "array_shape": r"window: expected shape \[W, L, E\] = \(2, 2, 8\)",
    "missing_array": r"logcnt: missing from",
    "version": r"version: expected 1 or 2 or 3, found 99",
    "format": r"is not a saved jeplb.EplbState \(JSON\)",
    "logcnt": r"logcnt\[1, 2\]: expected 2 \(replicas of expert 2 in phy2log\), found 3",
    "string_array": r"is a damaged saved jeplb.EplbState",
}


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    case=st.sampled_from(
        (
            *LOAD_MESSAGES,
            "garbage_json",
            "garbage_npz",
            "not_a_dict",
            "like",
            "sizes",
            "suffix",
            "path_type",
            "missing_file",
        )
    ),
    seed=st.integers(0, 2**16),
)
def test_state_load_files_that_do_not_match(saved, state, case, seed):
    rng = np.random.default_rng(seed)
    kwargs = {}
    path = saved / f"case_{case}_{seed}.json"
    error = ValueError
    if case in LOAD_MESSAGES:
        doc = _damage(json.loads((saved / "s.json").read_text()), case, rng)
        path.write_text(json.dumps(doc))
        match = LOAD_MESSAGES[case]
    elif case == "garbage_json":
        path.write_text("{ not json" + "x" * int(rng.integers(0, 50)))
        match = r"is not a saved jeplb.EplbState \(JSON; it does not parse"
    elif case == "garbage_npz":
        path = saved / f"case_{seed}.npz"
        path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        match = r"is not a saved jeplb.EplbState \(npz"
    elif case == "not_a_dict":
        path.write_text("[1, 2, 3]")
        match = r"is not a saved jeplb.EplbState \(JSON\)"
    elif case == "like":
        path = saved / "s.npz"
        kwargs["like"] = jeplb.EplbState.create(**{**CREATE, "num_layers": L + 1})
        match = r"num_layers: expected 3, found 2 in .* \(from like=\)"
    elif case == "sizes":
        path = saved / "s.npz"
        name = str(rng.choice(["num_experts", "num_devices", "window_size", "num_layers"]))
        kwargs[name] = 1000
        match = rf"{name}: expected 1000, found \d+"
    elif case == "suffix":
        path = saved / "s.txt"
        match = r"path: expected a file name ending in .json or .npz"
    elif case == "path_type":
        path, error = 3.5, TypeError
        match = r"path: expected a file name \(str or os.PathLike\)"
    else:
        path, error = saved / "absent.npz", FileNotFoundError
        match = r"No such file"

    def load():
        return jeplb.EplbState.restore(path, **kwargs)

    expect(load, error, match)


# -------------------------------------------------------------------------- dispatch and step


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    case=st.sampled_from(("state", "layer", "ids", "ids_float", "valid", "scalar", "slices")),
    data=st.data(),
)
def test_dispatch_bad_input(state, case, data):
    ids = np.zeros((6, 2), np.int32)
    if case == "state":
        fn = lambda: jeplb.dispatch("state", 0, ids)  # noqa: E731
        error, match = TypeError, r"state: expected an EplbState"
    elif case == "layer":
        layer = data.draw(st.sampled_from([-1, L, 50]))
        fn = lambda: jeplb.dispatch(state, layer, ids)  # noqa: E731
        error, match = ValueError, r"layer: expected an index in \[0, num_layers = 2\)"
    elif case == "ids":
        t, k = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 1))
        ids[t, k] = data.draw(st.sampled_from([-1, E, 2**31 - 1]))
        fn = lambda: jeplb.dispatch(state, 0, ids)  # noqa: E731
        error, match = ValueError, rf"topk_ids\[{t}, {k}\] = -?\d+: expected logical expert ids"
    elif case == "ids_float":
        fn = lambda: jeplb.dispatch(state, 0, ids.astype(np.float32))  # noqa: E731
        error, match = TypeError, r"topk_ids: expected an integer dtype"
    elif case == "valid":
        fn = lambda: jeplb.dispatch(state, 0, ids, valid=np.ones(5, bool))  # noqa: E731
        error, match = ValueError, r"valid: expected a bool mask of the tokens' shape \(6,\)"
    elif case == "scalar":
        fn = lambda: jeplb.dispatch(state, 0, np.int32(3))  # noqa: E731
        error, match = ValueError, r"topk_ids: expected shape \[..., K\]"
    else:
        fn = lambda: jeplb.dispatch_layer(state.log2phy, state.logcnt[0], ids)  # noqa: E731
        error, match = ValueError, r"log2phy: expected one layer's map \[E, R_max\]"
    fn.__qualname__ = "dispatch"
    expect(fn, error, match, ids, state.pass_load)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=st.sampled_from(("state", "mesh", "devices", "shape", "numpy", "local")))
def test_step_bad_input(state, case):
    w = weights()
    if case == "state":
        fn = lambda: jeplb.eplb_step({"phy2log": OLD}, w, mesh=MESH)  # noqa: E731
        error, match = TypeError, r"state: expected an EplbState, got dict"
    elif case == "mesh":
        fn = lambda: jeplb.eplb_step(state, w, mesh=OTHER)  # noqa: E731
        error, match = ValueError, r"mesh: has no axis named 'ep'"
    elif case == "devices":
        s4 = jeplb.EplbState.create(**{**CREATE, "num_devices": 4})
        fn = lambda: jeplb.eplb_step(s4, w, mesh=MESH)  # noqa: E731
        error, match = (
            ValueError,
            r"mesh: axis 'ep' has 8 devices, but the state was built for num_devices = 4",
        )
    elif case == "shape":
        w["w"] = jax.device_put(jnp.zeros((L + 1, PT, 3)), SPEC)
        fn = lambda: jeplb.eplb_step(state, w, mesh=MESH)  # noqa: E731
        error = ValueError
        match = r"expert_weights\['w'\] has shape \(3, 16, 3\), expected leading dims L = 2 x P"
    elif case == "numpy":
        w["q"] = np.zeros((L, PT, 4), np.int8)
        fn = lambda: jeplb.eplb_step(state, w, mesh=MESH)  # noqa: E731
        error, match = TypeError, r"expert_weights\['q'\] is a ndarray; expected a jax.Array"
    else:
        fn = lambda: jeplb.eplb_step_local(state, w)  # noqa: E731
        error, match = (
            ValueError,
            r"state.config.transfer.axis_name: no mesh axis 'ep' is bound here",
        )
    fn.__qualname__ = "eplb_step"
    expect(fn, error, match, w, state.phy2log, state.window)


# ----------------------------------------------------------------------------- elastic recovery


@settings(max_examples=25, deadline=None)
@given(
    case=st.sampled_from(
        (
            "loader",
            "mesh_axis",
            "mesh_small",
            "target_shape",
            "target_missing",
            "load_nan",
            "load_shape",
            "lost",
            "old_ids",
            "old_float",
        )
    ),
    data=st.data(),
)
def test_recover_experts_bad_input(case, data):
    w = weights()
    old = OLD.copy()
    kwargs = {"mesh": mesh_of(d=6), "num_experts": E}
    loader = lambda layer, expert: None  # noqa: E731
    if case == "loader":
        loader = data.draw(st.sampled_from([None, 3, "file.ckpt"]))
        error, match = TypeError, r"loader: expected a callable"
    elif case == "mesh_axis":
        kwargs["mesh"] = OTHER
        error, match = ValueError, r"mesh: has no axis named 'ep'"
    elif case == "mesh_small":
        kwargs["mesh"] = mesh_of(d=3)
        error, match = ValueError, r"mesh: 3 devices x N_local = 2 slots = 6 slots per layer, fewer"
    elif case == "target_shape":
        kwargs["new_phy2log"] = np.zeros((L, 18), np.int32)
        error, match = (
            ValueError,
            r"new_phy2log: expected shape \[L, P\] = \(2, 12\) \(N_local = 2 slots on each of "
            r"the 6 new devices\), got \(2, 18\)",
        )
    elif case == "target_missing":
        kwargs["new_phy2log"] = np.zeros((L, 12), np.int32)
        error, match = ValueError, r"new_phy2log\[0\]: expert 1 has no slot"
    elif case == "load_nan":
        load = LOAD.copy()
        load[data.draw(st.integers(0, L - 1)), data.draw(st.integers(0, E - 1))] = np.nan
        kwargs["load"] = load
        error, match = ValueError, r"load\[\d, \d\] = nan: expected finite loads"
    elif case == "load_shape":
        kwargs["load"] = LOAD[:, :3]
        error, match = (
            ValueError,
            r"load: expected shape \[L, E\] = \(2, 8\) \(old_phy2log's layers x num_experts\), "
            r"got \(2, 3\)",
        )
    elif case == "lost":
        kwargs["lost_devices"] = [data.draw(st.sampled_from([-1, D, 100]))]
        error, match = ValueError, r"lost_devices: expected indices in \[0, 8\)"
    elif case == "old_ids":
        old[1, data.draw(st.integers(0, PT - 1))] = -5
        error, match = ValueError, r"old_phy2log\[1, \d+\] = -5: expected an expert id"
    else:
        old = old.astype(np.float32)
        error, match = TypeError, r"old_phy2log: expected an integer dtype"

    def recover_experts():
        return jeplb.recover_experts(old, w, loader, **kwargs)

    expect(recover_experts, error, match, old, w)


def test_recover_experts_names_bad_leaf_by_path():
    w = weights()
    w["w"] = np.zeros((L, PT, 3), np.float32)

    def recover_experts():
        loader = lambda layer, expert: None  # noqa: E731
        return jeplb.recover_experts(OLD, w, loader, mesh=mesh_of(d=6), num_experts=E)

    expect(
        recover_experts, TypeError, r"expert_weights\['w'\] is a ndarray.*expected a jax.Array", w
    )


# ------------------------------------------------------ rows that row_impl="pallas" cannot move

# The row kernel (interpreted on CPU) moves rows in blocks of 1024 elements (on one device, rows
# of 512 32-bit words). Each case gives 'b' and 'w13' rows it cannot move and 'w2' rows it can:
# one ValueError names both bad leaves by path, not the good one, before anything is traced.
BAD_WIDTH = st.integers(1, 1535).filter(lambda w: w % 512)
KERNEL = settings(SETTINGS, max_examples=8)
MESH1 = mesh_of(d=1)


def names_both(name):
    """The message names ``name['b']`` then ``name['w13']``, and never ``['w2']``."""
    return (
        rf"(?s)\A(?!.*\['w2'\])2 leaves cannot be moved:\n  {name}\['b'\]: .*\n  {name}\['w13'\]: "
    )


def kernel_leaves(data, lead, sharding=None, good=1024):
    """{'b', 'w13'}: f32 rows of drawn widths the kernel cannot move; 'w2': rows it can."""
    widths = {"b": data.draw(BAD_WIDTH), "w13": data.draw(BAD_WIDTH), "w2": good}
    host = {k: np.zeros((*lead, w), np.float32) for k, w in widths.items()}
    if sharding is None:
        return host
    return {k: jax.device_put(x, sharding) for k, x in host.items()}


@pytest.fixture
def pallas_everywhere(monkeypatch):
    """sync_replica_grads takes no row_impl (it resolves ``auto``, which picks the kernel only
    for rows it moves): force ``row_impl="pallas"`` to reach its check."""
    from jeplb._src import training
    from jeplb._src.transfer.config import TransferConfig

    def forced(**options):
        return TransferConfig(**{**options, "row_impl": "pallas"})

    monkeypatch.setattr(training, "TransferConfig", forced)


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
@given(local=st.booleans(), data=st.data())
def test_step_rows_the_kernel_cannot_move(state, local, data):
    state = state.replace(config=state.config.replace(row_impl="pallas"))  # the state's option
    if local:
        w = kernel_leaves(data, (L, PT))
        f = jax.shard_map(
            jeplb.eplb_step_local,
            mesh=MESH,
            in_specs=(P(), P(None, "ep")),
            out_specs=(P(), P(None, "ep"), P()),
        )
        fn = lambda: jax.jit(f).lower(state, w)  # noqa: E731
    else:
        w = kernel_leaves(data, (L, PT), SPEC)
        fn = lambda: jeplb.eplb_step(state, w, mesh=MESH)  # noqa: E731
    fn.__qualname__ = "eplb_step"
    expect(fn, ValueError, names_both("expert_weights"), w, state.phy2log)


@KERNEL
@given(local=st.booleans(), data=st.data())
def test_sync_rows_the_kernel_cannot_move(pallas_everywhere, local, data):
    if local:
        g = kernel_leaves(data, (L, PT))
        f = jax.shard_map(
            jeplb.sync_replica_grads_local,
            mesh=MESH,
            in_specs=(P(None, "ep"), P()),
            out_specs=P(None, "ep"),
        )
        fn = lambda: jax.jit(f).lower(g, OLD)  # noqa: E731
    else:
        g = kernel_leaves(data, (L, PT), SPEC)
        fn = lambda: jeplb.sync_replica_grads(g, OLD, mesh=MESH)  # noqa: E731
    fn.__qualname__ = "sync_replica_grads"
    expect(fn, ValueError, names_both("grads"), g, OLD)


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


def test_auto_takes_the_loop_where_the_kernel_cannot_move_rows():
    # One GPU, rows of 64 KiB and more: ``auto`` picks the in-place kernel only for rows it moves
    # (int8 rows of 1024 x 65 elements are not whole blocks of 512 32-bit words).
    from jeplb._src.transfer import inplace

    odd = jax.ShapeDtypeStruct((4, 1024 * 65), jnp.int8)
    even = jax.ShapeDtypeStruct((4, 1024 * 66), jnp.int8)
    assert inplace.pallas_refusal(4, odd.shape[1], odd.dtype)
    assert inplace.resolve_impl("auto", odd, "gpu") == "loop"
    assert inplace.resolve_impl("pallas", odd, "gpu") == "pallas"  # asked for: refused by path
    assert inplace.resolve_impl("auto", even, "gpu") == "pallas"

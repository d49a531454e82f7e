"""Bad input to dispatch, the step and elastic recovery: a clear error naming the argument, raised
before anything changes (see tests/bad_input.py; the other modules' cases are in
tests/<package>/test_bad_input.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jeplb
from tests.bad_input import (
    CREATE,
    KERNEL,
    LOAD,
    MESH,
    OLD,
    OTHER,
    PT,
    SPEC,
    D,
    E,
    L,
    expect,
    kernel_leaves,
    make_state,
    names_both,
    needs_devices,
    weights,
)
from tests.helpers import mesh_of

pytestmark = needs_devices


@pytest.fixture(scope="module")
def state():
    return make_state()


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

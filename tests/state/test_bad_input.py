"""Bad input to the state (`EplbState.create`, `from_placement`, `record`, `replicated`): a clear
error naming the argument, raised before anything changes (see tests/bad_input.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jeplb
from tests.bad_input import (
    CREATE,
    OLD,
    PT,
    SETTINGS,
    D,
    E,
    L,
    expect,
    make_state,
)


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
    return make_state()


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

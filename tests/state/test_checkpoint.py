"""The saved-state file (`EplbState.save` / `restore`): files that do not match are refused with
an error naming the file and what is wrong (see tests/bad_input.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jeplb
from tests.bad_input import (
    CREATE,
    PT,
    L,
    expect,
    make_state,
)


@pytest.fixture(scope="module")
def state():
    return make_state()


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

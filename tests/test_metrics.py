"""The metrics (`balancedness`, `device_loads`, `remote_copies`): bad input is refused, naming the
argument (see tests/bad_input.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jeplb
from tests.bad_input import (
    LOAD,
    OLD,
    D,
    E,
    expect,
)


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

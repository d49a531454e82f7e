"""Bad input to `rebalance_experts`: a clear error naming the argument (see tests/bad_input.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jeplb
from tests.bad_input import (
    LOAD,
    OLD,
    PT,
    SETTINGS,
    D,
    E,
    L,
    expect,
)


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

"""``jeplb plan``: a placement file from a recorded load (array files and saved states), the
policy and its options by name, and flag / file errors that exit 2 naming what is wrong."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jeplb
from jeplb.tools import cli as _cli

# DeepSeek's README example: 12 experts, 16 slots over 8 devices, 4 groups on 2 nodes.
README_LOAD = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]])
README_PLACEMENT = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]]


def _plan(argv, capsys):
    rc = _cli.main(["plan", *map(str, argv)])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("form", ["npy", "npz", "npz-named", "json", "json-object"])
def test_array_files_give_deepseeks_placement(tmp_path, capsys, form):
    path = tmp_path / f"load.{form.split('-')[0]}"
    if form == "npy":
        np.save(path, README_LOAD)
    elif form == "npz":
        np.savez(path, README_LOAD)
    elif form == "npz-named":
        np.savez(path, load=README_LOAD, other=np.zeros(3))
    else:
        doc = README_LOAD.tolist()
        path.write_text(json.dumps({"load": doc} if form == "json-object" else doc))
    out = tmp_path / "placement.json"
    argv = [path, "-o", out, "--devices", 8, "--redundant", 4]
    rc, text = _plan([*argv, "--option", "num_groups=4", "--option", "num_nodes=2"], capsys)
    assert rc == 0
    p = jeplb.read_placement(out, num_experts=12, num_devices=8)
    assert p.phy2log.tolist() == README_PLACEMENT
    assert "planned 1 layers x 12 experts onto 16 slots over 8 devices" in text
    assert f"placement written to {out}" in text


def _saved_state(tmp_path, suffix):
    state = jeplb.EplbState.create(
        num_layers=2, num_experts=8, num_devices=4, num_redundant_experts=4, window_size=2,
        step_interval=10, policy="snake",
    )  # fmt: skip
    window = np.zeros((2, 2, 8), np.int32)
    window[0] = [[80, 1, 1, 1, 1, 1, 1, 40], [5, 5, 5, 5, 5, 5, 5, 90]]
    window[1] = [[20, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 10]]
    state = state.replace(
        window=jnp.asarray(window), window_total=jnp.asarray(window.sum(0)),
        window_leaving=jnp.asarray(window[0]),
    )  # fmt: skip
    path = tmp_path / f"state{suffix}"
    state.save(path)
    return state, path


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_a_saved_state_gives_its_window_sizes_and_policy(tmp_path, capsys, suffix):
    state, path = _saved_state(tmp_path, suffix)
    out = tmp_path / "p.npz"
    rc, text = _plan([path, "-o", out], capsys)
    assert rc == 0
    p = jeplb.read_placement(out, num_layers=2, num_experts=8, num_devices=4)
    want = state.config.policy.place(
        jnp.asarray(state.window_load(), jnp.float32), num_slots=12, num_devices=4,
        old_phy2log=None,
    )  # fmt: skip
    np.testing.assert_array_equal(p.phy2log, np.asarray(want))
    assert "SnakePolicy()" in text
    line = next(t for t in text.splitlines() if t.startswith("balancedness"))
    before, after = (float(x) for x in line.split(": ")[1].split(" (saved placement) -> "))
    assert after > before


def test_policy_devices_and_slots_override_the_saved_state(tmp_path, capsys):
    state, path = _saved_state(tmp_path, ".json")
    out = tmp_path / "p.json"
    argv = [path, "-o", out, "--devices", 2, "--slots", 10, "--policy", "deepseek"]
    rc, text = _plan([*argv, "--option", "refine=true", "--quiet"], capsys)
    assert rc == 0 and text == ""
    p = jeplb.read_placement(out)
    assert (p.num_devices, p.num_slots) == (2, 10)
    want, _, _ = jeplb.rebalance_experts(state.window_load(), 10, 1, 1, 2, refine=True)
    np.testing.assert_array_equal(p.phy2log, np.asarray(want))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["LOAD", "-o", "p.json"], "--devices: required when the load is an array"),
        (["LOAD", "-o", "p.json", "--devices", "0"], "argument --devices: expected a positive"),
        (["LOAD", "-o", "p.json", "--devices", "5", "--slots", "12"], "not divisible by"),
        (["LOAD", "-o", "p.json", "--devices", "2", "--slots", "6"], "--slots: expected at least E = 8, got 6"),
        (["LOAD", "-o", "p.json", "--devices", "1", "--slots", "12", "--redundant", "1"], "not allowed with"),
        (["LOAD", "-o", "p.json", "--devices", "4", "--option", "groups=2"], "'groups' is not an option of policy 'deepseek'; its options are num_groups, num_nodes, refine"),
        (["LOAD", "-o", "p.json", "--devices", "4", "--option", "refine=1"], "refine: expected a bool, got int 1"),
        (["LOAD", "-o", "p.json", "--devices", "4", "--option", "refine"], "--option: expected NAME=VALUE"),
        (["LOAD", "-o", "p.json", "--devices", "4", "--policy", "best"], "policy: expected one of ('deepseek', 'snake'), got 'best'"),
        (["LOAD", "-o", "p.txt", "--devices", "4"], "path: expected a file name ending in .json or .npz"),
        (["missing.npy", "-o", "p.json", "--devices", "4"], "load: no such file: 'missing.npy'"),
        (["BAD", "-o", "p.json", "--devices", "4"], "load[0, 1] = -3 in"),
        (["FLAT", "-o", "p.json", "--devices", "4"], "load: expected an [L, E] array"),
        (["load.csv", "-o", "p.json", "--devices", "4"], "load: expected a .npy, .npz or .json file"),
    ],
)  # fmt: skip
def test_errors_exit_2_with_a_clear_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    np.save("LOAD.npy", np.ones((2, 8), np.int32))
    np.save("BAD.npy", np.array([[1, -3], [0, 0]]))
    np.save("FLAT.npy", np.ones(8))
    names = {"LOAD": "LOAD.npy", "BAD": "BAD.npy", "FLAT": "FLAT.npy"}
    with pytest.raises(SystemExit) as exc:
        _cli.main(["plan", *(names.get(a, a) for a in argv)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "p.json").exists()


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["plan", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--devices", "--slots", "--redundant", "--policy", "--option"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    assert "plan" in capsys.readouterr().out

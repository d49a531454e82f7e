"""Placement files: write/read round trips, a running state's placement, starting a state from a
file, the checks on read (each naming the file and the field) and the device-count conversion."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jeplb
from jeplb._src import placement_file
from tests.helpers import mesh_of

MAP = np.array([[0, 1, 2, 3, 0, 1], [3, 3, 2, 1, 0, -1]], np.int32)  # L = 2, E = 4, P = 6


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    written = jeplb.write_placement(path, MAP, num_experts=4, num_devices=3)
    read = jeplb.read_placement(path, num_layers=2, num_experts=4, num_devices=3)
    assert read.phy2log.dtype == np.int32
    np.testing.assert_array_equal(read.phy2log, MAP)
    np.testing.assert_array_equal(written.phy2log, MAP)
    assert (read.num_experts, read.num_devices, read.num_slots) == (4, 3, 6)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_json_is_the_documented_format(tmp_path):
    path = tmp_path / "p.json"
    jeplb.write_placement(path, jnp.asarray(MAP), num_experts=4, num_devices=3)
    doc = json.loads(path.read_text())
    assert doc == {
        "format": "jeplb.Placement",
        "version": 1,
        "num_layers": 2,
        "num_experts": 4,
        "num_slots": 6,
        "num_devices": 3,
        "arrays": {"phy2log": MAP.tolist()},
    }


def test_state_export_and_start_from_a_file(tmp_path, cpu_devices):
    state = jeplb.EplbState.from_placement(
        MAP, num_experts=4, num_devices=3, window_size=2, step_interval=5
    )
    path = tmp_path / "p.npz"
    jeplb.write_placement(path, state)
    p = jeplb.read_placement(path)
    started = jeplb.EplbState.from_placement(
        p.phy2log, num_experts=p.num_experts, num_devices=p.num_devices, window_size=2,
        step_interval=5,
    )  # fmt: skip
    for name in ("phy2log", "log2phy", "logcnt"):
        np.testing.assert_array_equal(getattr(started, name), getattr(state, name))
    np.testing.assert_array_equal(jeplb.Placement.of_state(state).logcnt(), state.logcnt)
    # The model's logical weights laid out for it: slot p holds expert phy2log[l, p]'s row.
    mesh = mesh_of(1)
    logical = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4) * 10
    placed = np.asarray(jeplb.place_experts(logical, p.phy2log, mesh=mesh))
    want = np.where(MAP >= 0, np.take_along_axis(np.asarray(logical), np.maximum(MAP, 0), 1), 0)
    np.testing.assert_array_equal(placed, want)


def test_sizes_given_with_a_state_must_agree(tmp_path):
    state = jeplb.EplbState.create(
        num_layers=1, num_experts=2, num_devices=2, window_size=1, step_interval=1
    )
    with pytest.raises(ValueError, match=r"num_devices: expected 2 \(the placement's\), got 1"):
        jeplb.write_placement(tmp_path / "p.json", state, num_devices=1)
    with pytest.raises(TypeError, match="needs num_experts= and num_devices="):
        jeplb.write_placement(tmp_path / "p.json", MAP, num_experts=4)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("phy2log", "kwargs", "error", "message"),
    [
        (MAP, dict(num_experts=4, num_devices=4), ValueError, "P = 6 slots is not divisible by D"),
        (MAP, dict(num_experts=3, num_devices=3), ValueError, r"phy2log\[0, 3\] = 3: expected an"),
        (MAP, dict(num_experts=5, num_devices=3), ValueError, r"phy2log\[0\]: expert 4 has no"),
        (MAP[0], dict(num_experts=4, num_devices=3), ValueError, r"expected a map \[L, P\]"),
        (MAP * 1.0, dict(num_experts=4, num_devices=3), TypeError, "expected an integer dtype"),
        (MAP, dict(num_experts=4, num_devices=0), ValueError, "num_devices: expected an int >= 1"),
        (MAP, dict(num_experts=4.0, num_devices=3), TypeError, "num_experts: expected an int"),
    ],
)
def test_bad_maps_are_refused_before_writing(tmp_path, phy2log, kwargs, error, message):
    with pytest.raises(error, match=message):
        jeplb.write_placement(tmp_path / "p.json", phy2log, **kwargs)
    assert not list(tmp_path.iterdir())


def _damaged(tmp_path, **changes):
    path = tmp_path / "p.json"
    jeplb.write_placement(path, MAP, num_experts=4, num_devices=3)
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "phy2log":
            doc["arrays"]["phy2log"] = value
        elif value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_slots=5), r"phy2log: expected shape \[L, P\] = \(2, 5\)"),
        (dict(num_layers=None), "num_layers: missing from the header"),
        (dict(num_experts=True), "num_experts: expected an int"),
        (dict(phy2log=[[0, 1, 2, 3, 0, 9], [3, 3, 2, 1, 0, -1]]), r"phy2log\[0, 5\] = 9"),
        (dict(phy2log=[[0, 1, 2, 0, 0, 1], [3, 3, 2, 1, 0, -1]]), "expert 3 has no slot"),
        (dict(phy2log=[[0, 1, 2, 3, 0, 2**32 + 1]] * 2), "fits int32"),
        (dict(phy2log=[[0.5] * 6] * 2), "expected integer arrays"),
        (dict(num_devices=4), "phy2log: P = 6 slots is not divisible by D = 4 devices"),
    ],
)
def test_damaged_files_name_the_file_and_the_field(tmp_path, changes, message):
    path = _damaged(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as err:
        jeplb.read_placement(path)
    assert f"path: {str(path)!r} is a damaged jeplb.Placement file" in str(err.value)


def test_other_files_and_versions_are_refused(tmp_path):
    state = jeplb.EplbState.create(
        num_layers=1, num_experts=2, num_devices=1, window_size=1, step_interval=1
    )
    saved = tmp_path / "state.json"
    state.save(saved)
    with pytest.raises(ValueError, match=r"is not a saved jeplb\.Placement"):
        jeplb.read_placement(saved)
    with pytest.raises(ValueError, match=r"version: expected 1, found 2 in '.*p\.json'"):
        jeplb.read_placement(_damaged(tmp_path, version=2))
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="it does not parse"):
        jeplb.read_placement(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"path: expected a file name ending in \.json or \.npz"):
        jeplb.read_placement(tmp_path / "p.txt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_layers=3), r"num_layers: expected 3, found 2 in '.*p\.json'$"),
        (dict(num_experts=8), r"num_experts: expected 8, found 4 in '.*p\.json'$"),
        (
            dict(num_devices=2),
            r"num_devices: expected 2, found 3 in '.*p\.json': the placement was planned over 3 "
            r"devices; convert it with Placement\.for_devices\(2\)",
        ),
        (dict(num_devices=0), "num_devices: expected an int >= 1, got 0"),
    ],
)
def test_expected_sizes(tmp_path, kwargs, message):
    path = tmp_path / "p.json"
    jeplb.write_placement(path, MAP, num_experts=4, num_devices=3)
    with pytest.raises(ValueError, match=message):
        jeplb.read_placement(path, **kwargs)


def test_for_devices_keeps_replica_counts_and_spreads_them():
    p = jeplb.Placement(MAP, num_experts=4, num_devices=3)
    q = p.for_devices(2)
    assert q.num_devices == 2 and q.num_slots == 6
    # Layer 0 has no empty slot: every expert keeps its replica count; layer 1's empty slot is
    # filled by one more replica.
    np.testing.assert_array_equal(q.logcnt()[0], p.logcnt()[0])
    assert (q.logcnt()[1] >= p.logcnt()[1]).all() and q.logcnt()[1].sum() == 6
    # The counts being the load, every device of layer 0 gets the same share (6 / 2).
    loads = jeplb.device_loads(q.phy2log, p.logcnt().astype(np.float32), 2)
    np.testing.assert_allclose(np.asarray(loads)[0], [3.0, 3.0])
    wider = p.for_devices(4, num_slots=8)
    assert wider.num_slots == 8 and (wider.logcnt() >= 1).all()
    with pytest.raises(ValueError, match="num_devices: P = 6 slots per layer is not divisible by"):
        p.for_devices(4)
    with pytest.raises(ValueError, match="num_slots: expected an int >= 4, got 3"):
        p.for_devices(1, num_slots=3)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    jeplb.write_placement(path, MAP, num_experts=4, num_devices=3)
    before = path.read_bytes()

    def fail(f, header, arrays):
        f.write(b"{partial")
        raise OSError("disk full")

    monkeypatch.setattr(placement_file.checkpoint, "_write_json", fail)
    with pytest.raises(OSError, match="disk full"):
        jeplb.write_placement(path, MAP[::-1].copy(), num_experts=4, num_devices=3)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]

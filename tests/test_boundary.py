"""Check once, at the boundary: the same bad map gets the same exception type and the same words
(but for the argument's name) from every public function that takes a map.

One table: the bad maps (rows) x the public entry points and their map arguments (columns); a
second one for the [L, E] load. Every error is raised before anything is traced or compiled, so
the tables are cheap.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of

L, E, D = 2, 4, 2  # P = 8, N_local = 4
GOOD = np.array([[0, 1, 2, 3, 0, 1, 2, 3], [3, 2, 1, 0, 3, 2, 1, 0]], np.int32)
NO_3 = GOOD.copy()
NO_3[0, [3, 7]] = 0  # layer 0 holds no expert 3: a valid source map, not a complete placement


def _bad(case: str) -> np.ndarray | list:
    """The bad [L, P] map of each case (the one-layer entry points take its layer 0)."""
    m = GOOD.copy()
    if case == "float":
        return m.astype(np.float32)
    if case == "strings":
        return [["a"] * 8, ["b"] * 8]
    if case == "extra_dim":
        return m[None]
    if case == "id_too_big":
        m[0, 5] = E
    elif case == "id_below_minus_one":
        m[0, 5] = -2
    elif case == "p_not_divisible":
        return m[:, :7]
    elif case == "expert_missing":
        m[0, [3, 7]] = 0
    return m


CASES = (
    "float",
    "strings",
    "extra_dim",
    "id_too_big",
    "id_below_minus_one",
    "p_not_divisible",
    "expert_missing",
    "not_in_old",
)


def _layer(x):
    """A bad map's one-layer form: layer 0 (the extra dim: one layer [1, P])."""
    if isinstance(x, list):
        return x[0]
    return x[:1, 0] if x.ndim == 3 else x[0]


def expected(case: str, name: str, *, ndim: int, num_experts: int | None):
    """The one (type, message) of each bad map, given the argument's name."""
    letters, at = ("[L, P]", "[0, 5]") if ndim == 2 else ("[P]", "[5]")
    bound = "2^31 - 1" if num_experts is None else f"num_experts = {num_experts}"
    id_words = f"expected an expert id in [0, {bound}) or -1 (empty slot)"
    return {
        "float": (TypeError, f"{name}: expected an integer dtype (int32), got float32"),
        "strings": (TypeError, f"{name}: expected an integer dtype (int32), got <U1"),
        "extra_dim": (
            ValueError,
            f"{name}: expected a {ndim}-D map {letters}, got shape "
            f"{(1, L, 8) if ndim == 2 else (1, 8)}",
        ),
        "id_too_big": (ValueError, f"{name}{at} = {E}: {id_words}"),
        "id_below_minus_one": (ValueError, f"{name}{at} = -2: {id_words}"),
        "p_not_divisible": (
            ValueError,
            f"{name}: P = 7 slots is not divisible by D = {D} devices; every device must hold "
            f"the same number of slots (P // D)",
        ),
        "expert_missing": (
            ValueError,
            f"{name}{'[0]' if ndim == 2 else ''}: expert 3 has no slot; every logical expert "
            f"needs at least one slot in every layer",
        ),
        "not_in_old": (
            ValueError,
            f"{name}{'[0, 3]' if ndim == 2 else '[3]'} = 3, but no slot of "
            f"old_phy2log{'[0]' if ndim == 2 else ''} holds expert 3: every expert of the new "
            f"placement must have a copy in the old one (restore lost experts from their source "
            f"first)",
        ),
    }[case]


MESH = mesh_of(D)
SHARDED = NamedSharding(MESH, P(None, "ep"))
W = jax.device_put(np.zeros((L, 8, 3), np.float32), SHARDED)
W1 = jax.device_put(np.zeros((8, 3), np.float32), NamedSharding(MESH, P("ep")))
LOGICAL = np.zeros((L, E, 3), np.float32)
LOAD = np.ones((L, E), np.float32)


def _move_to_buffer(old, new):
    """`move_to_buffer` inside `jax.shard_map`, with concrete maps (traced ones carry no values to
    check); tracing raises before anything compiles."""

    def body(w):
        return jeplb.move_to_buffer(old, new, w, axis_name="ep")[0]

    jax.eval_shape(jax.shard_map(body, mesh=MESH, in_specs=P("ep"), out_specs=P("ep")), W1)


def _recover(old, new):
    jeplb.recover_experts(old, W, lambda layer, e: None, mesh=MESH, num_experts=E, new_phy2log=new)


# name -> (call(map) for the argument under test, argument name, ndim, E known, complete,
# takes an old map). Complete: the map must hold every expert (a placement that serves the model).
ENTRIES = {
    "rearrange_expert_weights.old": (
        lambda m: jeplb.rearrange_expert_weights(m, GOOD, W, mesh=MESH, num_experts=E),
        "old_phy2log", 2, True, False, False,
    ),
    "rearrange_expert_weights.new": (
        lambda m: jeplb.rearrange_expert_weights(GOOD, m, W, mesh=MESH, num_experts=E),
        "new_phy2log", 2, True, False, True,
    ),
    "transfer_layer.old": (
        lambda m: jeplb.transfer_layer(m, GOOD[0], W1, mesh=MESH, num_experts=E),
        "old_phy2log", 1, True, False, False,
    ),
    "transfer_layer.new": (
        lambda m: jeplb.transfer_layer(GOOD[0], m, W1, mesh=MESH, num_experts=E),
        "new_phy2log", 1, True, False, True,
    ),
    "move_to_buffer.old": (
        lambda m: _move_to_buffer(m, GOOD[0]), "old_phy2log", 1, False, False, False,
    ),
    "move_to_buffer.new": (
        lambda m: _move_to_buffer(GOOD[0], m), "new_phy2log", 1, False, False, True,
    ),
    "EplbState.from_placement": (
        lambda m: jeplb.EplbState.from_placement(
            m, num_experts=E, num_devices=D, window_size=1, step_interval=1
        ),
        "phy2log", 2, True, True, False,
    ),
    "rebalance_experts.old_phy2log": (
        lambda m: jeplb.rebalance_experts(LOAD, 8, 1, 1, D, old_phy2log=m),
        "old_phy2log", 2, True, True, False,
    ),
    "balancedness": (lambda m: jeplb.balancedness(m, LOAD, D), "phy2log", 2, True, False, False),
    "device_loads": (lambda m: jeplb.device_loads(m, LOAD, D), "phy2log", 2, True, False, False),
    "remote_copies.old": (
        lambda m: jeplb.remote_copies(m, GOOD, D), "old_phy2log", 2, False, False, False,
    ),
    "remote_copies.new": (
        lambda m: jeplb.remote_copies(GOOD, m, D), "new_phy2log", 2, False, False, False,
    ),
    "place_experts": (
        lambda m: jeplb.place_experts(LOGICAL, m, mesh=MESH), "phy2log", 2, True, False, False,
    ),
    "sync_replica_grads": (
        lambda m: jeplb.sync_replica_grads(W, m, mesh=MESH), "phy2log", 2, False, False, False,
    ),
    "global_norm": (lambda m: jeplb.global_norm(W, m), "phy2log", 2, False, False, False),
    "recover_experts.old": (lambda m: _recover(m, None), "old_phy2log", 2, True, True, False),
    "recover_experts.new": (lambda m: _recover(GOOD, m), "new_phy2log", 2, True, True, False),
}  # fmt: skip


NO_D = {"global_norm"}  # takes no D: any P is fine


def _applies(case, entry, ndim, knows_e, complete, has_old) -> bool:
    if case == "p_not_divisible":
        return entry not in NO_D
    if case == "id_too_big":
        return knows_e
    if case == "expert_missing":
        return complete
    if case == "not_in_old":
        return has_old
    return True


def _bad_for(case: str, ndim: int):
    if case == "not_in_old":
        return GOOD if ndim == 2 else GOOD[0]
    m = _bad(case)
    return m if ndim == 2 else _layer(m)


TABLE = [
    (case, entry)
    for case in CASES
    for entry, (_, _, ndim, knows_e, complete, has_old) in ENTRIES.items()
    if _applies(case, entry, ndim, knows_e, complete, has_old)
]


@pytest.mark.parametrize(("case", "entry"), TABLE)
def test_same_error_on_every_path(case, entry):
    call, name, ndim, knows_e, _, _ = ENTRIES[entry]
    kind, words = expected(case, name, ndim=ndim, num_experts=E if knows_e else None)
    m = _bad_for(case, ndim)
    if case == "not_in_old":  # the new map names expert 3, which the old one lacks in layer 0
        call = {
            "rearrange_expert_weights.new": lambda m: jeplb.rearrange_expert_weights(
                NO_3, m, W, mesh=MESH, num_experts=E
            ),
            "transfer_layer.new": lambda m: jeplb.transfer_layer(
                NO_3[0], m, W1, mesh=MESH, num_experts=E
            ),
            "move_to_buffer.new": lambda m: _move_to_buffer(NO_3[0], m),
        }[entry]
    with pytest.raises(kind) as err:
        call(m)
    assert str(err.value) == words


def test_table_covers_every_entry_and_case():
    """Every entry point meets the four bad maps every map argument refuses (five where it takes
    D), and every case reaches at least three entry points (a table that lost a column or a row
    fails here)."""
    for entry in ENTRIES:
        assert sum(1 for _, e in TABLE if e == entry) >= (4 if entry in NO_D else 5), entry
    for case in CASES:
        assert sum(1 for c, _ in TABLE if c == case) >= 3, case


# ------------------------------------------------------------------------------------ loads

LOAD_CASES = {
    "nan": (ValueError, "load[0, 1] = nan: expected finite loads >= 0 (token counts)"),
    "negative": (ValueError, "load[0, 1] = -3.0: expected finite loads >= 0 (token counts)"),
    "one_dim": (
        ValueError,
        "load: expected a 2-D array [L, E] (layers x logical experts), got shape (4,)",
    ),
    "empty": (ValueError, "load: expected at least one layer and one expert, got shape (0, 4)"),
    "strings": (TypeError, "load: expected a real (integer or floating) dtype, got <U1"),
    "complex": (TypeError, "load: expected a real (integer or floating) dtype, got complex64"),
    "not_array": (TypeError, "load: expected an array [L, E], got str"),
}


def _bad_load(case: str):
    w = LOAD.copy()
    if case in ("nan", "negative"):
        w[0, 1] = np.nan if case == "nan" else -3.0
        return w
    return {
        "one_dim": w[0],
        "empty": w[:0],
        "strings": [["a"] * E] * L,
        "complex": w.astype(np.complex64),
        "not_array": "load",
    }[case]


LOAD_ENTRIES = {
    "rebalance_experts": lambda w: jeplb.rebalance_experts(w, 8, 1, 1, D),
    "balancedness": lambda w: jeplb.balancedness(GOOD, w, D),
    "device_loads": lambda w: jeplb.device_loads(GOOD, w, D),
    "recover_experts": lambda w: jeplb.recover_experts(
        GOOD, W, lambda layer, e: None, mesh=MESH, num_experts=E, load=w
    ),
}


@pytest.mark.parametrize("entry", LOAD_ENTRIES)
@pytest.mark.parametrize("case", LOAD_CASES)
def test_same_load_error_on_every_path(case, entry):
    kind, words = LOAD_CASES[case]
    with pytest.raises(kind) as err:
        LOAD_ENTRIES[entry](_bad_load(case))
    assert str(err.value) == words

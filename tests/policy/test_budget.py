"""The move budget of the migration-aware policy: at most B remote copies per layer, every expert
present, deterministic, one compilation for every budget, balance monotone in the budget.

Shapes stay small; every budget of a shape shares one compiled program (the budget is traced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transfer_model import allowed_sources

import jeplb
from jeplb._src.metrics import remote_copies
from jeplb._src.policy import registry
from jeplb._src.policy.api import DeepSeekPolicy, _rebalance_jit, rebalance_experts
from tests.policy.test_api import check_valid, drifted

# (E, P, groups, nodes, D): hierarchical, global (3 % 2 != 0) and a larger hierarchical drift case.
CONFIGS = [(12, 16, 4, 2, 8), (12, 16, 3, 2, 4), (32, 40, 4, 2, 8)]
L = 4


def case(config, seed, drift=0.5):
    """(old placement, drifted load, migration-aware placement) of a drift case."""
    num_log, num_slots, groups, nodes, devices = config
    w0, w1 = drifted(seed, (L, num_log), drift=drift)
    old = np.asarray(rebalance_experts(w0, num_slots, groups, nodes, devices)[0])
    new = rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old)
    return old, w1, [np.asarray(x) for x in new]


def budgeted(config, w, old, budget):
    _, num_slots, groups, nodes, devices = config
    out = rebalance_experts(
        w, num_slots, groups, nodes, devices, old_phy2log=old, move_budget=budget
    )
    check_valid(w, num_slots, groups, nodes, devices, out)  # every expert present, groups whole
    return [np.asarray(x) for x in out]


def moved_rows(old, new, devices):
    """int[L]: rows the transfer brings from another device (tests/transfer_model.py's sources)."""
    per_device = old.shape[1] // devices
    allowed = allowed_sources(old, new, devices)
    return np.array(
        [
            sum(src[0] // per_device != p // per_device for p, src in enumerate(layer))
            for layer in allowed
        ]
    )


def heaviest(phy2log, w, devices):
    """float32[L]: the heaviest device's load, summed left to right in slot order (the policy's
    own float32 rounding)."""
    w = np.asarray(w, np.float32)
    num_layers, num_slots = phy2log.shape
    per_device = num_slots // devices
    out = np.zeros(num_layers, np.float32)
    for layer in range(num_layers):
        count = np.bincount(phy2log[layer], minlength=w.shape[1]).astype(np.float32)
        slot = w[layer, phy2log[layer]] / count[phy2log[layer]]
        loads = [np.float32(0)] * devices
        for p in range(num_slots):
            loads[p // per_device] = np.float32(loads[p // per_device] + slot[p])
        out[layer] = max(loads)
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_budget_respected_every_expert_present_monotone(config):
    devices = config[4]
    old, w1, new = case(config, seed=5)
    full = moved_rows(old, new[0], devices)
    assert full.max() >= 3, "the drift case must move rows for the budget to bind"
    previous = heaviest(old, w1, devices)
    for budget in range(int(full.max()) + 2):
        phy2log = budgeted(config, w1, old, budget)[0]
        rows = moved_rows(old, phy2log, devices)
        assert (rows <= budget).all(), (budget, rows)
        assert (rows == np.asarray(remote_copies(old, phy2log, devices))).all()
        now = heaviest(phy2log, w1, devices)
        assert (now <= previous).all(), (budget, now, previous)  # balance never falls
        previous = now
    # A budget covering the migration-aware moves: as balanced, no more rows.
    assert (now <= heaviest(new[0], w1, devices)).all()
    assert (rows <= full).all()


@pytest.mark.parametrize(
    "config, seed, same", [(CONFIGS[0], 5, True), (CONFIGS[1], 3, False), (CONFIGS[1], 6, False)]
)
def test_budget_zero_moves_no_row_across_devices(config, seed, same):
    """Budget 0: no row crosses devices. Local copies (an expert its device already holds) are
    free, and are made only where they lower the heaviest device; where none helps (the first
    case), the old placement comes back unchanged."""
    devices = config[4]
    old, w1, new = case(config, seed)
    assert (new[0] != old).any()
    phy2log, _, logcnt = budgeted(config, w1, old, 0)
    assert (moved_rows(old, phy2log, devices) == 0).all()
    shape = (L, devices, -1)
    held = (phy2log.reshape(shape)[..., :, None] == old.reshape(shape)[..., None, :]).any(-1)
    assert held.all()  # every slot's expert was already on its device
    differs = (phy2log != old).any(axis=1)
    before, after = heaviest(old, w1, devices), heaviest(phy2log, w1, devices)
    assert (after[differs] < before[differs]).all()
    assert (after[~differs] == before[~differs]).all()
    assert bool(differs.any()) != same
    if same:
        assert (logcnt == np.apply_along_axis(np.bincount, 1, old, minlength=config[0])).all()


def test_unbounded_is_todays_output_bit_for_bit():
    _, num_slots, groups, nodes, devices = config = CONFIGS[2]
    old, w1, new = case(config, seed=7)
    none = rebalance_experts(
        w1, num_slots, groups, nodes, devices, old_phy2log=old, move_budget=None
    )
    for a, b in zip(new, none, strict=True):
        assert (a == np.asarray(b)).all()
    policy = DeepSeekPolicy(num_groups=groups, num_nodes=nodes)
    placed = policy.place(
        jnp.asarray(w1), num_slots=num_slots, num_devices=devices, old_phy2log=old
    )
    assert (np.asarray(placed) == new[0]).all()


def test_budget_binds_and_helps():
    """On the larger case a small budget moves fewer rows than the migration-aware placement and
    balances better than the old placement on some layer."""
    config = CONFIGS[2]
    devices = config[4]
    old, w1, new = case(config, seed=3)
    phy2log = budgeted(config, w1, old, 4)[0]
    assert moved_rows(old, phy2log, devices).sum() < moved_rows(old, new[0], devices).sum()
    assert (heaviest(phy2log, w1, devices) < heaviest(old, w1, devices)).any()


def test_eager_repeat_and_one_compilation():
    """Repeated eager calls give the same placement, and another budget reuses the compiled
    program. (The policy under an outer jit, its load and old map tracers, gives the eager
    placement: `test_eplb_step_moves_within_the_budget`, on this configuration. Op by op, under
    disable_jit, the budget's walk takes tens of seconds: left out of the suite.)"""
    config = CONFIGS[0]
    old, w1, _ = case(config, seed=9)
    eager = budgeted(config, w1, old, 1)[0]
    again = budgeted(config, w1, old, 1)[0]
    assert (eager == again).all()
    # The budget is traced: another budget reuses the compiled program.
    size = _rebalance_jit._cache_size()
    budgeted(config, w1, old, 2)
    assert _rebalance_jit._cache_size() == size


def test_config_routes_and_saves_the_budget():
    cfg = jeplb.EplbConfig.create(move_budget=3, num_groups=2)
    assert cfg.policy == DeepSeekPolicy(num_groups=2, move_budget=3)
    assert registry.decode(registry.encode(cfg.policy)) == cfg.policy
    assert jeplb.EplbConfig.from_json(cfg.to_json()) == cfg
    state = jeplb.EplbState.create(num_layers=2, num_experts=8, num_devices=4, move_budget=5)
    assert state.config.policy.move_budget == 5
    assert jeplb.EplbConfig().policy.move_budget is None


@pytest.mark.parametrize(
    "value, error, match",
    [
        (-1, ValueError, r"move_budget: expected an int >= 0, got -1"),
        (1.5, TypeError, r"move_budget: expected an int or None, got float 1.5"),
        (True, TypeError, r"move_budget: expected an int or None, got bool True"),
    ],
)
def test_bad_budget(value, error, match):
    with pytest.raises(error, match=match):
        DeepSeekPolicy(move_budget=value)
    with pytest.raises(error, match=match):
        jeplb.EplbConfig.create(move_budget=value)
    old = np.arange(16, dtype=np.int32)[None] % 12
    with pytest.raises(error, match=match):
        rebalance_experts(np.ones((1, 12)), 16, 4, 2, 8, old_phy2log=old, move_budget=value)


def test_budget_needs_an_old_placement():
    with pytest.raises(ValueError, match=r"move_budget: .* without old_phy2log"):
        rebalance_experts(np.ones((1, 12)), 16, 4, 2, 8, move_budget=2)


def test_budget_with_an_empty_old_slot():
    """Filling an empty old slot is a remote copy like any other: under the budget the slot may
    stay empty (-1), every expert present, the maps consistent."""
    num_log, num_slots, groups, nodes, devices = config = CONFIGS[0]
    old, w1, _ = case(config, seed=5)
    old = old.copy()
    dup = [p for p in range(num_slots) if (old[0] == old[0, p]).sum() > 1]
    old[0, dup[0]] = -1
    new = np.asarray(rebalance_experts(w1, num_slots, groups, nodes, devices, old_phy2log=old)[0])
    assert new[0, dup[0]] >= 0
    for budget in (0, 1, int(moved_rows(old, new, devices).max())):
        out = rebalance_experts(
            w1, num_slots, groups, nodes, devices, old_phy2log=old, move_budget=budget
        )
        phy2log, log2phy, logcnt = (np.asarray(x) for x in out)
        assert (moved_rows(old, phy2log, devices) <= budget).all()
        assert ((phy2log >= 0) | (old == -1)).all()
        for layer in range(L):
            kept = phy2log[layer][phy2log[layer] >= 0]
            assert (np.bincount(kept, minlength=num_log) == logcnt[layer]).all()
            assert (logcnt[layer] >= 1).all()
            for e in range(num_log):
                slots = log2phy[layer, e, : logcnt[layer, e]]
                assert (phy2log[layer, slots] == e).all()
                assert (log2phy[layer, e, logcnt[layer, e] :] == -1).all()


def test_eplb_step_moves_within_the_budget():
    """The budget reaches the rebalance step through the configuration: the step's placement is
    the policy's (traced there: the window's load and the old map are tracers of the jitted step)
    and equals the eager placement bit for bit, at most B rows cross devices per layer, and the
    weights follow the map. CONFIGS[0]'s shapes, so the eager placement reuses its program."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    num_log, num_slots, groups, nodes, devices = CONFIGS[0]
    mesh = jax.make_mesh((devices,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
    old, w1, _ = case(CONFIGS[0], seed=0)  # the budget binds: 2 rows where 4 or 9 would move
    state = jeplb.EplbState.from_placement(
        old,
        num_experts=num_log,
        num_devices=devices,
        num_groups=groups,
        num_nodes=nodes,
        window_size=1,
        step_interval=1,
        move_budget=2,
    ).replicated(mesh)
    before = np.asarray(state.phy2log)
    w = jnp.arange(L * num_log, dtype=jnp.float32).reshape(L, num_log, 1)
    rows = jnp.arange(L)[:, None]
    experts = jax.device_put(w[rows, state.phy2log], NamedSharding(mesh, P(None, "ep")))
    load = w1.astype(np.int32)
    step = jax.jit(lambda s, x: jeplb.eplb_step(s, x, mesh=mesh))
    state, experts, info = step(state.record(jnp.asarray(load)), experts)
    assert bool(info.fired)
    after = np.asarray(state.phy2log)
    # Host arrays, as in the other tests of CONFIGS[0]: the same compiled program.
    expected = DeepSeekPolicy(num_groups=groups, num_nodes=nodes, move_budget=2).place(
        jnp.asarray(np.asarray(state.window_load(), np.float32)),
        num_slots=num_slots,
        num_devices=devices,
        old_phy2log=jnp.asarray(before),
    )
    np.testing.assert_array_equal(after, expected)
    rows_moved = moved_rows(before, after, devices)
    assert (rows_moved <= 2).all() and (rows_moved > 0).any()
    np.testing.assert_array_equal(experts, w[rows, state.phy2log])

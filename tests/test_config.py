"""The one configuration (`EplbConfig`) and the policy seam: a second policy runs end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src.policy import registry

L, E, R, D = 2, 8, 8, 8


def test_options_route_to_their_part():
    cfg = jeplb.EplbConfig.create(
        window_size=7, step_interval=21, num_groups=2, refine=True, chunk_rows=3, row_impl="loop"
    )
    assert cfg.schedule == jeplb.ScheduleConfig(window_size=7, step_interval=21)
    assert cfg.policy == jeplb.DeepSeekPolicy(num_groups=2, refine=True)
    assert cfg.transfer == jeplb.TransferConfig(chunk_rows=3, row_impl="loop")
    assert hash(cfg) == hash(cfg.replace()) and cfg == cfg.replace()
    assert cfg.replace(policy="snake").policy == jeplb.SnakePolicy()
    # A policy's options are only reachable while that policy is configured.
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'num_groups'; the options"):
        cfg.replace(policy="snake", num_groups=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(policy=3), TypeError, r"policy: expected a policy name .* got int 3"),
        (dict(transfer={"chunk_rows": 2}), TypeError, r"transfer: expected a TransferConfig"),
        (dict(schedule=None), TypeError, r"schedule: expected a ScheduleConfig, got NoneType"),
        (dict(window_size=0), ValueError, r"window_size: expected an int >= 1, got 0"),
        (dict(windowsize=4), TypeError, r"unexpected keyword argument 'windowsize'"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        jeplb.EplbConfig.create(**kwargs)


def test_json_round_trip_and_sizes():
    cfg = jeplb.EplbConfig.create(axis_name=("data", "ep"), policy="snake", layers_per_step=2)
    assert jeplb.EplbConfig.from_json(cfg.to_json()) == cfg
    cfg.check_sizes(num_layers=4, num_experts=8, num_slots=16, num_devices=8)
    with pytest.raises(ValueError, match=r"layers_per_step: expected at most num_layers = 1"):
        cfg.check_sizes(num_layers=1, num_experts=8, num_slots=16, num_devices=8)
    with pytest.raises(ValueError, match=r"devices_per_node: expected a divisor of the 8 devices"):
        cfg.replace(devices_per_node=3).check_sizes(
            num_layers=4, num_experts=8, num_slots=16, num_devices=8
        )


def test_former_state_fields_warn_and_read_the_config():
    s = jeplb.EplbState.create(
        num_layers=1, num_experts=2, num_devices=1, step_interval=5, chunk_rows=2
    )
    with pytest.warns(DeprecationWarning, match=r"EplbState.step_interval is now .*schedule"):
        assert s.step_interval == 5
    with pytest.warns(DeprecationWarning, match=r"config.transfer.chunk_rows"):
        assert s.chunk_rows == 2
    with pytest.raises(AttributeError, match=r"no attribute 'nope'"):
        _ = s.nope


def test_registry_holds_every_policy_class():
    for name, cls in registry.POLICIES.items():
        policy = cls()
        assert policy.name == name and isinstance(policy, jeplb.Policy)
        assert registry.decode(registry.encode(policy)) == policy
        assert dataclasses.is_dataclass(policy) and hash(policy) == hash(cls())


def test_snake_policy_places_every_expert_and_balances():
    load = jnp.asarray(np.random.default_rng(0).zipf(1.5, (3, E)).clip(1, 500), jnp.float32)
    phy2log = np.asarray(
        jeplb.SnakePolicy().place(load, num_slots=E + R, num_devices=D, old_phy2log=None)
    )
    assert phy2log.shape == (3, E + R) and phy2log.dtype == np.int32
    for row in phy2log:
        assert set(row.tolist()) == set(range(E))
    before = jeplb.balancedness(np.tile(np.arange(E + R) % E, (3, 1)), load, D)
    after = jeplb.balancedness(phy2log, load, D)
    assert float(after.balancedness) > float(before.balancedness)


def _step_with(mesh, config):
    """Two steps of a skewed load through eplb_step under ``config``: (state, weights, info)."""
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=R, config=config
    ).replicated(mesh)
    w = jnp.arange(L * E, dtype=jnp.float32).reshape(L, E, 1)
    experts = jax.device_put(
        w[jnp.arange(L)[:, None], state.phy2log], NamedSharding(mesh, P(None, "ep"))
    )
    step = jax.jit(lambda s, x: jeplb.eplb_step(s, x, mesh=mesh))
    load = jnp.asarray(np.tile((2.0 ** -np.arange(E) * 1000).astype(np.int32) + 1, (L, 1)))
    info = None
    for _ in range(2):
        state, experts, info = step(state.record(load), experts)
    return state, experts, w, info


def test_a_second_policy_runs_through_eplb_step(mesh):
    config = jeplb.EplbConfig.create(window_size=2, step_interval=2, policy="snake")
    state, experts, w, info = _step_with(mesh, config)
    assert bool(info.fired) and bool(info.moved.all())
    expected = jeplb.SnakePolicy().place(
        state.window_load().astype(jnp.float32),
        num_slots=E + R,
        num_devices=D,
        old_phy2log=None,
    )
    np.testing.assert_array_equal(state.phy2log, expected)
    np.testing.assert_array_equal(experts, w[jnp.arange(L)[:, None], state.phy2log])


def test_every_transfer_option_reaches_eplb_step(mesh, monkeypatch):
    from jeplb._src import step as step_lib

    seen = []
    move_layers = step_lib.engine_lib.move_layers

    def spy(*args, engine, **kwargs):
        seen.append(engine.config)
        return move_layers(*args, engine=engine, **kwargs)

    monkeypatch.setattr(step_lib.engine_lib, "move_layers", spy)
    config = jeplb.EplbConfig.create(
        window_size=2,
        step_interval=2,
        chunk_rows=2,
        row_impl="scatter",
        staging_passes=1,
        devices_per_node=4,
    )
    state, experts, w, info = _step_with(mesh, config)
    assert seen == [config.transfer] and bool(info.fired)
    np.testing.assert_array_equal(experts, w[jnp.arange(L)[:, None], state.phy2log])


@pytest.mark.parametrize("experts, devices, slots", [(6, 4, 8), (8, 4, 8), (16, 8, 16), (5, 8, 8)])
def test_auto_redundant_experts_is_the_smallest_valid_count(experts, devices, slots):
    s = jeplb.EplbState.create(
        num_layers=1, num_experts=experts, num_devices=devices, num_redundant_experts="auto"
    )
    assert s.num_slots == slots and s.num_slots % devices == 0

"""StepInfo.scalars (device scalars without a host sync, Python numbers once fetched) and the
Prometheus gauges of jeplb.integrations.prometheus, read back from prometheus_client's registry."""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import step_scalars

L, E, D = 2, 4, 2


@pytest.fixture(scope="module")
def steps(cpu_devices):
    """Two steps on a skewed load: the first plans and moves (step_interval 1), the second
    too; returns the StepInfos (device arrays)."""
    mesh = jax.make_mesh(
        (D,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,), devices=cpu_devices[:D]
    )
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=D, num_redundant_experts=2, window_size=2,
        step_interval=1,
    ).replicated(mesh)  # fmt: skip
    weights = jax.device_put(
        jnp.arange(L * 6, dtype=jnp.float32).reshape(L, 6), NamedSharding(mesh, P(None, "ep"))
    )
    step = jax.jit(lambda s, w: jeplb.eplb_step(s, w, mesh=mesh))
    infos = []
    for load in ([[90, 1, 1, 1], [1, 1, 1, 60]], [[1, 1, 1, 1], [1, 1, 1, 1]]):
        state, weights, info = step(state.record(jnp.array(load)), weights)
        jax.block_until_ready(weights)
        infos.append(info)
    return infos


def test_device_scalars_without_a_host_sync(steps):
    info = steps[0]
    with jax.transfer_guard_device_to_host("disallow"):
        d = info.scalars()
    assert all(isinstance(v, jax.Array) and v.shape == () for v in d.values())
    host = jax.device_get(info)
    assert list(d) == [
        "balancedness", "balancedness/layer_0", "balancedness/layer_1", "moved_layers",
        "remote_rows", "infeasible_layers", "fired", "skipped", "planned_balancedness",
        "in_progress", "step",
    ]  # fmt: skip
    assert float(d["balancedness"]) == float(host.balancedness)
    for layer in range(L):
        assert float(d[f"balancedness/layer_{layer}"]) == float(host.layer_balancedness[layer])
    assert int(d["moved_layers"]) == int(host.moved.sum()) == L
    assert int(d["remote_rows"]) == int(host.remote_rows.sum()) > 0
    assert int(d["fired"]) == 1 and int(d["step"]) == 1 and int(d["in_progress"]) == 0
    assert int(d["infeasible_layers"]) == 0 and int(d["skipped"]) == 0
    assert float(d["planned_balancedness"]) == float(host.planned_balancedness)


def test_fetched_info_gives_python_numbers_equal_to_the_device_ones(steps):
    for info in steps:
        host = jax.device_get(info).scalars()
        dev = info.scalars()
        assert host.keys() == dev.keys()
        for key, value in host.items():
            floats = key.startswith("balancedness") or key == "planned_balancedness"
            assert type(value) is (float if floats else int), key
            want = np.asarray(dev[key]).item()
            assert value == want or (np.isnan(value) and np.isnan(want)), key


def test_scalars_under_jit(steps):
    d = jax.jit(lambda i: i.scalars())(steps[1])
    assert d.keys() == steps[1].scalars().keys()
    assert int(d["step"]) == 2


def test_example_runs():
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(step_scalars.scalars, "scalars", globs={}):
        runner.run(test)
    assert runner.summarize(verbose=False) == (0, 5)


# ------------------------------------------------------------------------------ Prometheus


def test_prometheus_gauges(steps):
    prometheus_client = pytest.importorskip("prometheus_client")
    from jeplb.integrations.prometheus import Gauges

    registry = prometheus_client.CollectorRegistry()
    gauges = Gauges(registry=registry)
    value = registry.get_sample_value
    assert value("jeplb_rebalances_total") == 0.0
    for n, info in enumerate(steps, 1):
        gauges.update(info)
        host = jax.device_get(info)
        assert value("jeplb_balancedness") == pytest.approx(float(host.balancedness), abs=0)
        for layer in range(L):
            got = value("jeplb_layer_balancedness", {"layer": str(layer)})
            assert got == float(host.layer_balancedness[layer])
        assert value("jeplb_moved_layers") == host.moved.sum()
        assert value("jeplb_remote_rows") == host.remote_rows.sum()
        assert value("jeplb_step") == n
        assert value("jeplb_in_progress") == 0 and value("jeplb_infeasible_layers") == 0
    assert value("jeplb_rebalances_total") == 2.0  # both steps planned
    # A second set with another prefix in the same registry; a name clash is prometheus's error.
    Gauges(registry=registry, prefix="other")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Gauges(registry=registry)
    with pytest.raises(TypeError, match=r"info: expected a jeplb\.StepInfo, got dict"):
        gauges.update({"balancedness": 1.0})
    with pytest.raises(TypeError, match="prefix: expected a non-empty str"):
        Gauges(registry=registry, prefix="")


def test_prometheus_module_example_runs():
    pytest.importorskip("prometheus_client")
    import jeplb.integrations.prometheus as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted == 7

"""The example MoE model (jeplb.examples): outputs identical across a rebalance, load that follows
the placement, a sharded forward that agrees with a one-device one, and the workload generator; and
the python examples of README.md and docs/integration.md.

The example model is written with flax, an optional dependency (the ``demo`` and ``test`` extras):
without it the model tests and the examples that import flax are skipped, the others still run.
"""

from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import pytest

import jeplb
from tests.helpers import mesh_of

try:
    from flax import nnx

    from jeplb.examples import DriftingZipf, MoEConfig, MoETransformer, make_step
except ImportError as err:  # flax is in the demo extra; jeplb itself does not need it
    if getattr(err, "name", None) is None or not err.name.startswith("flax"):
        raise
    nnx = None

needs_flax = pytest.mark.skipif(nnx is None, reason="needs flax (pip install 'jeplb[demo]')")

L, E, R, H, F, B, S = 2, 8, 8, 16, 32, 2, 16  # P = 16 slots, N_local = 2 on 8 devices


def _config(**kw):
    return MoEConfig(
        num_layers=L, num_experts=E, num_redundant_experts=R, top_k=2, d_model=H, d_ff=F, **kw
    )


def _forward(model):
    graphdef = nnx.graphdef(model)

    @jax.jit
    def f(params, state, x, bias):
        y, _, aux = nnx.merge(graphdef, params)(x, bias, state, record=False)
        return y, aux

    return f


@pytest.fixture(scope="module")
def rebalanced(cpu_devices):
    """Runs the model with a whole rebalance at step 3; the probe output after every step."""
    mesh = mesh_of(devices=cpu_devices)
    model = MoETransformer(_config(), mesh=mesh, rngs=nnx.Rngs(0))
    state = jeplb.EplbState.create(
        num_layers=L,
        num_experts=E,
        num_devices=8,
        num_redundant_experts=R,
        window_size=3,
        step_interval=3,
    ).replicated(mesh)
    workload = DriftingZipf(L, E, B, S, H, zipf_exponent=1.5, seed=1)
    step, params = make_step(model)
    fwd = _forward(model)
    probe = workload.batch_at(999)
    maps, outs, loads, infos = [], [], [], []
    for i in range(5):
        maps.append(np.asarray(state.phy2log))
        y, aux = fwd(params, state, *probe)
        outs.append(np.asarray(y))
        params, state, _, info, aux = step(params, state, *workload.batch_at(i))
        loads.append(np.asarray(aux["slot_load"]))
        infos.append(jax.device_get(info))
    maps.append(np.asarray(state.phy2log))
    outs.append(np.asarray(fwd(params, state, *probe)[0]))
    assert step._cache_size() == 1, "the step compiled again after its first call"
    return dict(maps=maps, outs=outs, loads=loads, infos=infos, probe=probe, model=model)


@needs_flax
def test_outputs_bitwise_identical_across_a_rebalance(rebalanced):
    maps, outs, infos = rebalanced["maps"], rebalanced["outs"], rebalanced["infos"]
    assert [bool(i.fired) for i in infos] == [False, False, True, False, False]
    assert not np.array_equal(maps[0], maps[-1]), "the rebalance moved no expert"
    assert int(np.sum(infos[2].remote_rows)) > 0
    for i, y in enumerate(outs):
        assert np.isfinite(y).all()
        np.testing.assert_array_equal(y, outs[0], err_msg=f"probe output after step {i}")


@needs_flax
def test_per_device_work_follows_the_placement(rebalanced):
    loads = rebalanced["loads"]
    for load in loads:  # every (token, k) pair is computed by exactly one slot
        np.testing.assert_array_equal(load.sum(1), B * S * 2)
    dev_before = loads[1].reshape(L, 8, -1).sum(-1).max(1).sum()
    dev_after = loads[4].reshape(L, 8, -1).sum(-1).max(1).sum()
    assert dev_after < dev_before, (dev_before, dev_after)


@needs_flax
def test_sharded_forward_matches_one_device(rebalanced, cpu_devices):
    """The same logical model on one device (no dispatch across devices) gives the same output."""
    one = MoETransformer(_config(), mesh=mesh_of(devices=cpu_devices[:1]), rngs=nnx.Rngs(0))
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=1, num_redundant_experts=R
    )
    y, _ = _forward(one)(nnx.state(one), state, *rebalanced["probe"])
    np.testing.assert_allclose(np.asarray(y), rebalanced["outs"][0], rtol=1e-5, atol=1e-5)


@needs_flax
def test_capacity_drops_are_counted(cpu_devices):
    mesh = mesh_of(devices=cpu_devices)
    model = MoETransformer(_config(capacity=1), mesh=mesh, rngs=nnx.Rngs(0))
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=8, num_redundant_experts=R
    )
    x, bias = DriftingZipf(L, E, B, S, H, zipf_exponent=1.5).batch_at(0)
    graphdef = nnx.graphdef(model)

    @jax.jit
    def forward(params, state, x, bias):
        return nnx.merge(graphdef, params)(x, bias, state)[2]

    aux = forward(nnx.state(model), state, x, bias)
    kept = np.minimum(np.asarray(aux["slot_load"]), 1).sum()
    assert int(aux["dropped"]) == L * B * S * 2 - kept > 0


@needs_flax
def test_model_rejects_bad_input(cpu_devices):
    mesh = mesh_of(devices=cpu_devices)
    with pytest.raises(ValueError, match=r"top_k: expected at most num_experts = 8, got 9"):
        MoEConfig(num_experts=8, top_k=9)
    with pytest.raises(TypeError, match=r"d_model: expected an int, got float"):
        MoEConfig(d_model=1.5)
    with pytest.raises(ValueError, match=r"mesh: P = 17 slots are not divisible by the 8 devices"):
        MoETransformer(
            MoEConfig(num_experts=9, num_redundant_experts=8), mesh=mesh, rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match=r"mesh: expected a jax.sharding.Mesh with an axis 'ep'"):
        MoETransformer(
            _config(), mesh=jax.make_mesh((8,), ("x",), devices=cpu_devices), rngs=nnx.Rngs(0)
        )
    with pytest.raises(ValueError, match=r"phy2log: expected shape \[L, P\] = \(2, 16\)"):
        MoETransformer(_config(), mesh=mesh, rngs=nnx.Rngs(0), phy2log=np.zeros((2, 8), int))


@needs_flax
def test_workload_is_deterministic_skewed_and_drifts():
    w = DriftingZipf(3, 16, 2, 4, 8, zipf_exponent=1.2, drift_every=5, seed=7)
    x0, b0 = w.batch_at(0)
    x0b, b0b = DriftingZipf(3, 16, 2, 4, 8, zipf_exponent=1.2, drift_every=5, seed=7).batch_at(0)
    np.testing.assert_array_equal(x0, x0b)
    np.testing.assert_array_equal(b0, b0b)
    p = w.popularity(0)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(np.sort(p[0])[::-1][0] / np.sort(p[0])[::-1][1], 2**1.2)
    np.testing.assert_array_equal(w.popularity(4), p)  # same phase
    assert not np.array_equal(w.popularity(5), p)  # the hot set changed
    assert not np.array_equal(w.tokens(1), x0)
    np.testing.assert_allclose(DriftingZipf(1, 4, 1, 1, 1, zipf_exponent=0).popularity(0), 0.25)
    with pytest.raises(ValueError, match=r"zipf_exponent: expected a float in \[0, 10\], got -1"):
        DriftingZipf(1, 4, 1, 1, 1, zipf_exponent=-1)
    with pytest.raises(ValueError, match=r"num_experts: expected an int >= 1, got 0"):
        DriftingZipf(1, 0, 1, 1, 1)


# ------------------------------------------------------------- the examples in README and docs

_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _python_blocks(name: str) -> list[str]:
    text = (_ROOT / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
@pytest.mark.devices(8)  # the documented examples build 8-device meshes on the default backend
@pytest.mark.parametrize(
    ("doc", "index"), [("README.md", 0), ("docs/integration.md", 0), ("docs/integration.md", 1)]
)
def test_documented_examples_run_and_rebalance(doc, index, cpu_devices, capsys):
    blocks = _python_blocks(doc)
    assert len(blocks) > index, f"{doc} lost its python example"
    if re.search(r"^\s*(from|import) flax\b", blocks[index], flags=re.M):
        pytest.importorskip("flax")
    namespace: dict = {"__name__": "doc_example"}
    exec(compile(blocks[index], f"{doc}[{index}]", "exec"), namespace)
    # The example's jitted step compiled once: its inputs come back as they went in.
    jitted = [v for v in namespace.values() if hasattr(v, "_cache_size")]
    assert jitted and all(f._cache_size() == 1 for f in jitted), [f._cache_size() for f in jitted]
    printed = capsys.readouterr().out.splitlines()
    assert any(" True " in line for line in printed), printed  # a rebalance fired
    state = namespace["state"]
    initial = np.tile(np.arange(state.num_slots) % state.num_experts, (state.num_layers, 1))
    assert not np.array_equal(np.asarray(state.phy2log), initial)
    balance = [float(line.split()[-1]) for line in printed]
    assert balance[-1] > balance[0] + 0.1, printed


@pytest.mark.slow
@needs_flax
def test_docstring_examples_run(cpu_devices):
    import doctest

    from jeplb.examples import moe, workload

    for module in (moe, workload):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, (module.__name__, result)

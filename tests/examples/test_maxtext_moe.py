"""The MaxText-style example (jeplb.examples.maxtext_moe) on 8 CPU devices, mesh ("data", "expert",
"tensor"): Linen `nn.scan` stacks with ``param_scan_axis`` 0 ([L, P, ...], mesh 2 x 2 x 2) and 1
([P, L, ...], mesh 1 x 4 x 2), the dense and the ragged_dot expert paths. Every case runs one
jitted step seven times on two alternating skewed batches (two rebalances, each to the last batch's
load) and checks: every slot holds its expert's weights exactly, outputs are bitwise identical
across the rebalances and match a numpy model of the logical experts, balancedness rises, one
compilation, and every parameter keeps its sharding.

Widths: on XLA:CPU `lax.ragged_dot` is a masked dense dot over all groups, whose sum order can
depend on a row's group when the widths are not multiples of 32; H = 32 and F / tensor = 32 keep
every group aligned (the dense path is bitwise stable at any width).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from tests.helpers import mesh_of
from tests.transfer_model import compilations

pytest.importorskip("flax")
from jeplb.examples import maxtext_moe as mt

L, E, SLOTS, K, H, F, T = 2, 8, 12, 2, 32, 64, 32
MESHES = {0: (2, 2, 2), 1: (1, 4, 2)}  # param_scan_axis -> (data, expert, tensor)
STEPS = 7  # rebalances planned in steps 2 (batch a's load) and 5 (batch b's)
CASES = [(0, "dense"), (0, "ragged"), (1, "dense"), (1, "ragged")]
IDS = [f"scan{s}-{p}" for s, p in CASES]

pytestmark = pytest.mark.devices(8)


def _batches(mesh):
    tokens = NamedSharding(mesh, P("data"))
    a = jax.random.normal(jax.random.key(1), (T, H)) + 1.0  # two opposite skews of the router
    b = jax.random.normal(jax.random.key(2), (T, H)) - 1.0
    return [jax.device_put(x, tokens) for x in (a, b)]


@functools.cache
def _run(scan: int, path: str) -> dict:
    """Runs one case (compiled once per case, shared by every test of it)."""
    shape = MESHES[scan]
    names = ("data", "expert", "tensor")
    mesh = mesh_of(names=names, shape=shape, devices=jax.devices("cpu")[:8])
    cfg = mt.MaxTextConfig(
        num_layers=L, num_experts=E, num_slots=SLOTS, top_k=K, d_model=H, d_ff=F, path=path,
        param_scan_axis=scan,
    )  # fmt: skip
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=shape[1], num_redundant_experts=SLOTS - E,
        window_size=1, step_interval=3, axis_name="expert",
    ).replicated(mesh)  # fmt: skip
    params, logical = mt.init_params(cfg, mesh, jax.random.key(0), state.phy2log)
    step = mt.make_step(cfg, mesh)
    batches = _batches(mesh)
    run = dict(
        cfg=cfg,
        logical={k: np.array(v) for k, v in logical.items()},
        params0=jax.tree.map(np.array, params),
        batches=[np.asarray(x) for x in batches],
        specs=[jax.tree.map(lambda x: x.sharding.spec, params)],
        maps=[np.array(state.phy2log)],
        weights=[{k: np.array(params["layers"][k]) for k in mt.EXPERT_LEAVES}],
        ys=[],
        infos=[],
        compiles=[],
    )
    for i in range(STEPS):
        with compilations() as seen:
            params, state, y, info = step(params, state, batches[i % 2])
            run["ys"].append(np.array(y))  # a host sync every step
        run["compiles"].append(len(seen))
        run["infos"].append(jax.device_get(info))
        run["specs"].append(jax.tree.map(lambda x: x.sharding.spec, params))
        run["maps"].append(np.array(state.phy2log))
        run["weights"].append({k: np.array(params["layers"][k]) for k in mt.EXPERT_LEAVES})
    return run


def _layer_major(w: np.ndarray, scan: int) -> np.ndarray:
    """[L, X, ...] from a leaf stacked at ``scan`` ([X, L, ...] when scan is 1)."""
    return np.moveaxis(w, 1, 0) if scan == 1 else w


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_slot_exact_after_each_rebalance(case):
    run = _run(*case)
    scan = case[0]
    assert [bool(i.fired) for i in run["infos"]] == [False, False, True, False, False, True, False]
    placements = {m.tobytes() for m in run["maps"]}
    assert len(placements) == 3, "expected the initial placement and two different rebalances"
    rows = np.arange(L)[:, None]
    for i, (maps, weights) in enumerate(zip(run["maps"], run["weights"], strict=True)):
        for name, got in weights.items():
            want = _layer_major(run["logical"][name], scan)[rows, maps]  # [L, P, ...]
            np.testing.assert_array_equal(
                _layer_major(got, scan), want, err_msg=f"{name} after step {i}"
            )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_bitwise_identical_across_rebalances(case):
    ys = _run(*case)["ys"]
    for i in range(2, STEPS):  # batch a in steps 0, 2, 4, 6; batch b in 1, 3, 5
        np.testing.assert_array_equal(ys[i], ys[i % 2], err_msg=f"output of step {i}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_match_the_logical_model(case):
    """A float64 numpy model of the logical experts (no slots) gives the same outputs."""
    run = _run(*case)
    scan = case[0]
    gate = _layer_major(run["params0"]["layers"]["gate"], scan).astype(np.float64)
    experts = {k: _layer_major(v, scan).astype(np.float64) for k, v in run["logical"].items()}
    for x, y in zip(run["batches"], run["ys"][:2], strict=True):
        x = x.astype(np.float64)
        for layer in range(L):
            tok = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            logits = tok @ gate[layer]
            ids = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
            top = np.take_along_axis(logits, ids, axis=-1)
            w = np.exp(top - top.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            wi_0, wi_1, wo = (experts[k][layer][ids] for k in mt.EXPERT_LEAVES)  # [T, K, ...]
            gate_h = np.einsum("th,tkhf->tkf", tok, wi_0)
            h = gate_h / (1 + np.exp(-gate_h)) * np.einsum("th,tkhf->tkf", tok, wi_1)
            x = x + np.einsum("tk,tkh->th", w, np.einsum("tkf,tkfh->tkh", h, wo))
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_balancedness_rises_under_a_skewed_router(case):
    infos = _run(*case)["infos"]
    # Each batch's load under the initial maps (steps 0, 1), then under its own rebalance.
    for before, after in ((0, 2), (1, 5)):
        b0, b1 = float(infos[before].balancedness), float(infos[after].balancedness)
        assert b1 > b0 + 0.05, (before, b0, after, b1)
    assert min(int(np.sum(infos[i].remote_rows)) for i in (2, 5)) > 0


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_compilation(case):
    compiles = _run(*case)["compiles"]
    assert compiles[0] == 1, compiles
    assert sum(compiles[1:]) == 0, compiles


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_parameter_keeps_its_sharding(case):
    run = _run(*case)
    lead = (None, "expert") if case[0] == 0 else ("expert", None)
    want = {"wi_0": P(*lead, None, "tensor"), "wi_1": P(*lead, None, "tensor")}
    want["wo"] = P(*lead, "tensor")
    assert {k: run["specs"][0]["layers"][k] for k in mt.EXPERT_LEAVES} == want
    for i, specs in enumerate(run["specs"][1:]):
        assert specs == run["specs"][0], f"after step {i}"


def test_combine_topk_adds_in_top_k_order():
    # Values whose float32 sum depends on the order: (1e8 + 1) - 1e8 = 0, (1e8 - 1e8) + 1 = 1.
    y = jnp.array([[[1e8], [1.0], [-1e8]], [[1e8], [-1e8], [1.0]]], jnp.float32)  # [T, K, H]
    w = jnp.ones((2, 3), jnp.float32)
    assert mt.combine_topk(y, w).tolist() == [[0.0], [1.0]]
    with pytest.raises(ValueError, match=r"weights: expected shape \(2, 3\) .* got \(2, 2\)"):
        mt.combine_topk(y, w[:, :2])


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match=r"path: expected 'dense' or 'ragged', got 'sparse'"):
        mt.MaxTextConfig(path="sparse")
    with pytest.raises(ValueError, match=r"param_scan_axis: expected 0 or 1, got 2"):
        mt.MaxTextConfig(param_scan_axis=2)
    with pytest.raises(ValueError, match=r"num_slots: expected an int >= 8, got 4"):
        mt.MaxTextConfig(num_experts=8, num_slots=4)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(mt, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result

"""jeplb.integrations.maxtext training against the real MaxText 0.2.5 package on 8 CPU devices.

optax Adam, the dense path, seven steps with three rebalances: replicas and their Adam moments
bitwise identical after every step, and the loss within 1e-5 relative of MaxText's plain RoutedMoE
with the E logical experts (no redundant slots). Skipped without MaxText (Python >= 3.12).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("maxtext.layers.moe", reason="MaxText 0.2.x (Python >= 3.12) not installed")

import optax
from flax import nnx

import jeplb
from jeplb.integrations import maxtext as jm
from tests.maxtext.maxtext_model import STEPS, E, L, R, build, setup

pytestmark = pytest.mark.devices(8)


# -- training -------------------------------------------------------------------------------------


def _train_step(graphdef, mesh, tx, eplb: bool):
    def loss_fn(params, rest, state, x):
        # Fresh variables for this trace: the maps are written inside the differentiated function.
        model = nnx.merge(graphdef, *params, jax.tree.map(jnp.asarray, rest))
        if eplb:
            jm.set_maps(model, state)
        y, aux = model(x)
        loss = jnp.mean((y - jnp.sin(x)) ** 2) + aux
        return loss, jm.take_counts(model) if eplb else None

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, state, rest, x):
        (loss, counts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, state, x)
        if eplb:
            experts = jeplb.sync_replica_grads(
                grads[0], state.phy2log, mesh=mesh, axis_name="expert", layer_axis=1, slot_axis=0
            )
            grads = (experts, grads[1])
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if eplb:
            state = state.record(counts)
            parts, put_back = jeplb.expert_state((params, opt_state), params[0])
            state, parts, _ = jeplb.eplb_step(state, parts, mesh=mesh, layer_axis=1, slot_axis=0)
            params, opt_state = put_back(parts)
        return params, opt_state, state, loss

    return step


@functools.cache
def _train():
    cfg, mesh, _, _, _, logical, xs = setup()
    tx = optax.adam(1e-2)
    curves, replicas, router = {}, [], None
    for eplb in (True, False):
        model, _ = build(cfg, mesh, R if eplb else None)
        state = jeplb.EplbState.create(
            num_layers=L, num_experts=E, num_devices=8, num_redundant_experts=R if eplb else 0,
            window_size=2, step_interval=2, axis_name="expert",
        ).replicated(mesh)  # fmt: skip
        if eplb:
            jm.place_experts(model, logical, state, mesh=mesh, config=cfg)
            router = jax.tree.map(jnp.copy, nnx.state(model.layers.gate))
        else:  # MaxText's own layer with the E logical experts and the same router
            for name, w in logical.items():
                param = getattr(model.layers, name.split(".")[-1])
                param[...] = jax.device_put(w, param[...].sharding)
            nnx.update(model.layers.gate, router)
        graphdef, experts, dense, rest = nnx.split(model, _slot_params, nnx.Param, ...)
        params = (experts, dense)
        opt_state = tx.init(params)
        step = _train_step(graphdef, mesh, tx, eplb)
        losses = []
        for i in range(STEPS):
            params, opt_state, state, loss = step(params, opt_state, state, rest, xs[(i // 2) % 2])
            losses.append(float(loss))
            if eplb:
                trees = (params[0], opt_state[0].mu[0], opt_state[0].nu[0])
                replicas.append((np.asarray(state.phy2log), *map(_numpy, trees)))
        curves[eplb] = np.array(losses)
    return curves, replicas


def _numpy(tree):
    return [np.asarray(w) for w in jax.tree.leaves(tree)]


def _slot_params(path, value):
    return isinstance(value, nnx.Param) and path[-1] in jm.SLOT_PARAMS


def test_training_replicas_and_moments_bitwise_identical():
    _, replicas = _train()
    moved = 0
    for phy2log, *trees in replicas:
        for tree in trees:
            for w in tree:  # [P, L, ...]
                for layer in range(L):
                    for e in range(E):
                        slots = np.flatnonzero(phy2log[layer] == e)
                        moved += len(slots) - 1
                        for s in slots[1:]:
                            np.testing.assert_array_equal(w[s, layer], w[slots[0], layer])
    assert moved > 0


def test_training_loss_matches_model_without_redundant_experts():
    curves, _ = _train()
    assert curves[True][-1] < curves[True][0]  # it learns
    np.testing.assert_allclose(curves[True], curves[False], rtol=1e-5)

"""A MoE layer inside its own shard_map (all-to-all token exchange): dispatch with global token
indices, counts summed once, outputs bitwise stable across a rebalance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb.examples.shard_map_moe import moe_layer_local

D, E, R, T_LOCAL, K, H = 8, 8, 8, 6, 2, 4
PT = E + R


@functools.lru_cache
def _program(mesh):
    spec = (P(), P("ep"), P("ep"), P("ep"), P("ep"))

    def body(state, w, x, ids, gates):
        state, y = moe_layer_local(state, 0, w, x, ids, gates)
        state, w, info = jeplb.eplb_step_local(state, w[None])  # counts already summed
        return state, w[0], y, info

    f = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(P(), P("ep"), P("ep"), P()))
    return jax.jit(f)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    t = D * T_LOCAL
    popularity = 2.0 ** -np.arange(E)
    ids = np.stack(
        [rng.choice(E, K, replace=False, p=popularity / popularity.sum()) for _ in range(t)]
    ).astype(np.int32)
    gates = rng.random((t, K)).astype(np.float32)
    x = rng.standard_normal((t, H)).astype(np.float32)
    logical = rng.standard_normal((E, H, H)).astype(np.float32)
    return ids, gates, x, logical


def test_counts_ids_and_outputs_match_the_global_view_and_survive_a_rebalance(mesh8, inputs):
    ids, gates, x, logical = inputs
    state = jeplb.EplbState.create(
        num_layers=1, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=1,
        step_interval=2,
    ).replicated(mesh8)  # fmt: skip
    put = functools.partial(jax.device_put, device=NamedSharding(mesh8, P("ep")))
    w = put(jnp.asarray(logical)[state.phy2log[0]])
    args = [put(jnp.asarray(a)) for a in (x, ids, gates)]
    # The reference: the same expert math at global view, combined in top-k order.
    _, want_counts = jeplb.dispatch_layer(state.log2phy[0], state.logcnt[0], ids)
    pair_out = jnp.einsum("tkh,tkhg->tkg", jnp.repeat(x[:, None], K, 1), logical[ids])
    want = jeplb.combine_topk(pair_out, jnp.asarray(gates))
    outputs, fired = [], []
    for _ in range(4):  # rebalances fire at steps 2 and 4
        state, w, y, info = _program(mesh8)(state, w, *args)
        outputs.append(np.asarray(y))
        fired.append(bool(info.fired))
        if len(outputs) == 1:  # the first pass's counts: one psum, global, as at global view
            np.testing.assert_array_equal(state.window_load()[0], want_counts)
    assert fired == [False, True, False, True]
    initial = np.arange(PT)[None] % E  # vLLM's initial placement, before the rebalance
    before = jeplb.balancedness(initial, want_counts[None], D).balancedness
    assert float(info.balancedness) > float(before) + 0.05
    np.testing.assert_array_equal(w, logical[np.asarray(state.phy2log[0])])  # slots exact
    np.testing.assert_allclose(outputs[0], want, rtol=1e-6, atol=1e-6)
    for y in outputs[1:]:  # bitwise the same before and after each rebalance
        np.testing.assert_array_equal(y, outputs[0])

    # The replica choice of the global-view dispatch (global token indices in the shard_map).
    def local_ids(log2phy, logcnt, ids):
        token = jax.lax.axis_index("ep") * T_LOCAL + jnp.arange(T_LOCAL)
        return jeplb.dispatch_layer(log2phy, logcnt, ids, token_index=token)[0]

    maps = (state.log2phy[0], state.logcnt[0])
    f = jax.shard_map(local_ids, mesh=mesh8, in_specs=(P(), P(), P("ep")), out_specs=P("ep"))
    global_phys, _ = jeplb.dispatch_layer(*maps, ids)
    np.testing.assert_array_equal(jax.jit(f)(*maps, args[1]), global_phys)

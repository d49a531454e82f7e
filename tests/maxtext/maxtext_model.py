"""A small MaxText model for the adapter's tests: MaxText 0.2.5's own config (base.yml through
pyconfig), mesh (get_mesh_from_config: expert axis 8 on 8 CPU devices), logical sharding rules and
NNX layer scan (param_scan_axis=1: expert parameters [P, L, ...]) around its RoutedMoE or the
adapter's EplbRoutedMoE (P = 24 slots behind a 16-wide router). Forwards run in `rules`, the
context MaxText's own loops run its models in.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("maxtext.layers.moe", reason="MaxText 0.2.x (Python >= 3.12) not installed")

import maxtext
from flax import linen as nn
from flax import nnx
from maxtext.configs import pyconfig
from maxtext.layers import initializers, moe, nnx_scan
from maxtext.utils import maxtext_utils
from maxtext.utils import sharding as mt_sharding

import jeplb
from jeplb.integrations import maxtext as jm

L, E, R, K, H = 2, 16, 8, 4, 32  # P = 24 slots, 3 per device on the expert axis of 8; top-4
# (K >= 3: with two terms any combine order gives the same bits, so K = 2 would test nothing)
STEPS = 7  # rebalances at the end of steps 1, 3, 5 (step_interval 2)


@functools.cache
def maxtext_config(**overrides):
    base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    options = dict(
        run_name="jeplb", enable_checkpointing=False, skip_jax_distributed_system=True,
        hardware="cpu", num_experts=E, num_experts_per_tok=K, base_emb_dim=H,
        base_moe_mlp_dim=H, base_mlp_dim=H, base_num_decoder_layers=L, ici_expert_parallelism=8,
        sparse_matmul=False, capacity_factor=-1, per_device_batch_size=1, max_target_length=8,
        dtype="float32", weight_dtype="float32", load_balance_loss_weight=0.01,
    )  # fmt: skip
    options.update(overrides)
    return pyconfig.initialize([None, base], **options)


class Stack(nnx.Module):
    """L MaxText MoE layers in MaxText's NNX layer scan, residual around each."""

    def __init__(self, cfg, mesh, rngs, *, redundant: int | None):
        def factory(r):
            args = (cfg, E, K, mesh, initializers.nd_dense_init(1.0, "fan_in", "truncated_normal"),
                    ("embed", None), r)  # fmt: skip
            kw = dict(
                intermediate_dim=cfg.moe_mlp_dim, dtype=cfg.dtype, weight_dtype=cfg.weight_dtype
            )
            if redundant is None:
                return moe.RoutedMoE(*args, **kw)
            return jm.EplbRoutedMoE(*args, num_redundant_experts=redundant, **kw)

        self.cfg = cfg
        self.layers = nnx_scan.create_scanned_layers(
            factory, length=L, param_scan_axis=cfg.param_scan_axis, metadata_axis_name="layers",
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        def layer(module, carry):
            h, aux = carry
            y, lb_loss, _ = module(h)
            return h + y, aux + lb_loss

        return nnx_scan.apply_scanned_layers(
            self.layers, (x, jnp.zeros((), jnp.float32)), length=L,
            param_scan_axis=self.cfg.param_scan_axis, apply_fn=layer,
        )  # fmt: skip


def build(cfg, mesh, redundant):
    """The model on MaxText's shardings (its logical rules), and those shardings."""
    with nn.logical_axis_rules(cfg.logical_axis_rules):

        def create():
            return Stack(cfg, mesh, nnx.Rngs(0), redundant=redundant)

        graphdef, abstract = nnx.split(nnx.eval_shape(create))
        shardings = mt_sharding.nnx_construct_named_sharding(abstract, mesh)
        variables = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, variables), shardings


# MaxText's sparse path as XLA:CPU runs it: the ring of experts (its default ragged all-to-all does
# not compile there) with its megablox kernel, interpreted off TPU (jax.lax.ragged_dot,
# megablox=False, cannot take the local experts' kernels). The kernel's K and N tiles at the
# test's H: MaxText's 1024-wide defaults make the interpreted kernel 100x slower here (1.4 s a
# forward of this model against 0.01 s); the M tile at the 256 rows a shard routes (8 x 8 tokens,
# top-4).
_TILES = {f"{w}_tile_fwd_{d}": H for w in ("wi", "wo") for d in ("embed_dim", "mlp_dim")}
_TILES |= {"wi_tile_fwd_batch_seq": 256, "wo_tile_fwd_batch_seq": 256}
PATHS = {
    "dense": {},
    "sparse": dict(sparse_matmul=True, use_ring_of_experts=True, megablox=True, **_TILES),
}


@contextlib.contextmanager
def rules(cfg, mesh):
    """MaxText's mesh and logical axis rules, as its train and decode loops run a model.

    The sparse path needs them: its shard_map takes its specs from the rules (without them
    every expert kernel is replicated and the ring of experts computes with other shards'
    experts; the adapter refuses that).
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.logical_axis_rules):
        yield


@functools.cache
def setup(path: str = "dense"):
    cfg = maxtext_config(**PATHS[path])
    mesh = maxtext_utils.get_mesh_from_config(cfg)
    model, shardings = build(cfg, mesh, R)
    state = jeplb.EplbState.create(
        num_layers=L, num_experts=E, num_devices=8, num_redundant_experts=R, window_size=2,
        step_interval=2, axis_name="expert",
    ).replicated(mesh)  # fmt: skip
    # The model's first E slots as the logical experts, laid onto the state's placement.
    logical = {k: np.asarray(v[:E]) for k, v in jm.expert_params(model).items()}
    jm.place_experts(model, logical, state, mesh=mesh, config=cfg)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    x = [
        jax.device_put(jax.random.normal(jax.random.key(i), (8, 8, H)) + s, batch)
        for i, s in ((1, 1.0), (2, -1.0))
    ]  # fmt: skip  two opposite skews of the router
    return cfg, mesh, model, shardings, state, logical, x

"""A serving loop whose EPLB costs nothing on idle steps: per-layer weights, batch buckets.

The model is a stack of MoE blocks laid out as a serving engine built from tpu-inference's MoE
layer keeps them: one pytree per layer (``w13`` (P, H, 2F), or (P, 2, H, F) with
``split_w13``, and ``w2`` (P, F, H), sharded ``PartitionSpec("model")`` on the slot dim), a
router per layer, a residual stream. Requests go through prefill (every prompt token in one
batch) and decode (one token per live sequence per step); every batch is padded to the smallest
of a few bucket sizes, so the forward is compiled once per bucket and padded tokens are left out
of the load with ``valid=``.

EPLB is split three ways so that nothing but the recording lives in the forward:

* the forward records (`jeplb.dispatch` per layer, `jeplb.end_pass` at its end): O(L x E);
* `jeplb.plan_rebalance`, its own program compiled once for every bucket, runs on the steps
  `jeplb.HostSchedule.tick` says a rebalance is due (the one sync: whether it fired);
* `jeplb.move_layer`, one program for every layer, moves the layers
  `jeplb.HostSchedule.take_layers` hands out, ``layers_per_step`` per step, between decode steps.

On an idle step the host checks two integers and runs no EPLB program. Each (token, k) output
comes from one replica, the K outputs of a token are combined in top-k order
(`jeplb.combine_topk`), so outputs are bitwise the same before, during and after a rebalance.

Letters: L layers, E logical experts, P slots, K experts per token, T tokens of a batch (padded
to a bucket), H model width, F expert hidden width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb

__all__ = ["ServingConfig", "ServingLoop", "forward", "init_model"]


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Sizes of the example.

    Attributes:
      num_layers: L.
      num_experts: E.
      num_redundant_experts: P - E.
      top_k: K.
      d_model: H.
      d_ff: F.
      buckets: the batch sizes the forward is compiled for (ascending); a batch is padded to the
        smallest that holds it.
      split_w13: keep w13 as (P, 2, H, F) instead of (P, H, 2F).
      skew: how strongly the routers prefer a few experts (0: not at all).

    Example:
      >>> ServingConfig().buckets
      (4, 8, 16)
    """

    num_layers: int = 4
    num_experts: int = 8
    num_redundant_experts: int = 8
    top_k: int = 2
    d_model: int = 16
    d_ff: int = 32
    buckets: tuple[int, ...] = (4, 8, 16)
    split_w13: bool = False
    skew: float = 2.0

    def bucket(self, tokens: int) -> int:
        """The smallest bucket holding ``tokens`` tokens."""
        for b in self.buckets:
            if tokens <= b:
                return b
        raise ValueError(
            f"tokens: {tokens} tokens do not fit the largest bucket {self.buckets[-1]}"
        )


def init_model(cfg: ServingConfig, state: jeplb.EplbState, mesh, *, seed: int = 0):
    """Routers (a list of L float32[H, E], replicated) and per-layer expert weights placed on
    ``state``'s placement (`jeplb.place_experts` on a per-layer sequence: a list of L dicts)."""
    rng = np.random.default_rng(seed)
    h, f, e = cfg.d_model, cfg.d_ff, cfg.num_experts
    bias = np.zeros((h, e), np.float32)
    bias[:, : max(1, e // 4)] = cfg.skew / np.sqrt(h)  # a few popular experts
    replicated = NamedSharding(mesh, P())
    routers = [
        jax.device_put(
            (rng.standard_normal((h, e)) / np.sqrt(h) + bias).astype(np.float32), replicated
        )
        for _ in range(cfg.num_layers)
    ]
    w13_shape = (e, 2, h, f) if cfg.split_w13 else (e, h, 2 * f)
    logical = [
        {
            "w13": (rng.standard_normal(w13_shape) / np.sqrt(h)).astype(np.float32),
            "w2": (rng.standard_normal((e, f, h)) / np.sqrt(f)).astype(np.float32),
        }
        for _ in range(cfg.num_layers)
    ]
    axis = state.config.transfer.axis_name
    weights = jeplb.place_experts(logical, state.phy2log, mesh=mesh, axis_name=axis)
    return routers, weights


def _expert(x, w13, w2, split: bool):
    """Each (token, k) pair through its own slot's SwiGLU: x [T, H], w13 [T, K, ...] rows,
    w2 [T, K, F, H] -> [T, K, H]."""
    if split:
        gate = jnp.einsum("th,tkhf->tkf", x, w13[:, :, 0])
        up = jnp.einsum("th,tkhf->tkf", x, w13[:, :, 1])
    else:
        gate, up = jnp.split(jnp.einsum("th,tkhf->tkf", x, w13), 2, axis=-1)
    return jnp.einsum("tkf,tkfh->tkh", jax.nn.silu(gate) * up, w2)


def forward(state, routers, weights, x, valid, *, top_k: int, split_w13: bool):
    """One forward of a padded batch: x float32[T, H], valid bool[T]. Records the load of the
    valid tokens and closes the pass (`jeplb.end_pass`). Returns ``(state, y [T, H])``."""
    for layer, (router, w) in enumerate(zip(routers, weights, strict=True)):
        probs = jax.nn.softmax(x @ router, axis=-1)
        gate, ids = jax.lax.top_k(probs, top_k)  # [T, K]
        state, slots = jeplb.dispatch(state, layer, ids, valid=valid)
        slots = jnp.maximum(slots, 0)
        y = _expert(x, w["w13"][slots], w["w2"][slots], split_w13)  # [T, K, H]
        x = x + jeplb.combine_topk(y, gate)
    return jeplb.end_pass(state), x


class ServingLoop:
    """The serving loop: a forward per bucket, and EPLB work only on the steps it is due.

    ``log`` holds, per step, the bucket and the EPLB programs that ran (``"plan"``, ``("move",
    layer)``); ``runs`` counts them. On an idle step the entry is empty: nothing ran.
    """

    def __init__(self, cfg: ServingConfig, state: jeplb.EplbState, mesh, *, seed: int = 0):
        self.cfg, self.mesh = cfg, mesh
        self.state = state.replicated(mesh)
        self.routers, self.weights = init_model(cfg, self.state, mesh, seed=seed)
        self.forward = jax.jit(
            lambda s, r, w, x, v: forward(s, r, w, x, v, top_k=cfg.top_k, split_w13=cfg.split_w13),
            donate_argnums=(0,),
        )
        self.plan = jax.jit(jeplb.plan_rebalance)  # compiled once: no batch shape in it
        self.schedule = jeplb.HostSchedule.from_state(self.state)
        self.log: list[dict[str, Any]] = []
        self.runs = {"plan": 0, "move": 0}

    def step(self, x: np.ndarray) -> np.ndarray:
        """One forward of ``x`` float32[T, H] (padded to its bucket), then the EPLB work due.
        Returns the outputs of the T tokens, on the host (what sampling reads)."""
        tokens = x.shape[0]
        bucket = self.cfg.bucket(tokens)
        padded = np.zeros((bucket, self.cfg.d_model), np.float32)
        padded[:tokens] = x
        valid = np.arange(bucket) < tokens
        self.state, y = self.forward(self.state, self.routers, self.weights, padded, valid)
        ran: list[Any] = []
        if self.schedule.tick():  # host arithmetic: no program, no sync
            self.state, info = self.plan(self.state)
            self.schedule.planned(info.fired)  # the one sync, on a step that plans
            ran.append("plan")
            self.runs["plan"] += 1
        for layer in self.schedule.take_layers():
            self.state, self.weights[layer], _ = jeplb.move_layer(
                self.state, layer, self.weights[layer], mesh=self.mesh
            )
            ran.append(("move", layer))
            self.runs["move"] += 1
        self.log.append({"bucket": bucket, "ran": ran})
        return np.asarray(y)[:tokens]

    def serve(self, prompts: list[np.ndarray], decode_steps: int) -> list[np.ndarray]:
        """Prefill every prompt (float32[S_i, H]) in one batch, then ``decode_steps`` decode
        steps of one token per sequence (the next input: tanh of the last output). Returns the
        decode outputs, float32[B, H] per step."""
        lengths = [len(p) for p in prompts]
        y = self.step(np.concatenate(prompts))
        last = np.cumsum(lengths) - 1
        nxt = np.tanh(y[last])
        outs = []
        for _ in range(decode_steps):
            out = self.step(nxt)
            outs.append(out)
            nxt = np.tanh(out)
        return outs

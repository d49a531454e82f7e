"""Laying logical expert weights onto physical slots: what initialisation and checkpoint loading
need before the first step (afterwards the transfer keeps the weights where the maps say)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src import checks
from jeplb._src.maps import check_phy2log
from jeplb._src.transfer.config import TransferConfig

__all__ = ["place_experts"]


def _spec(leaf: Any, slot_axis: int, expert: Any) -> tuple:
    """The placed leaf's spec: the logical leaf's own entries, the slot dim over the expert axis,
    without trailing Nones (as a jitted program returns it, so a step's outputs compare equal)."""
    given = checks._given_spec(leaf) if checks.is_concrete(leaf) else None
    entries = list(given or ()) + [None] * (leaf.ndim - len(given or ()))
    entries[slot_axis] = expert
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


@functools.lru_cache(maxsize=64)
def _program(mesh, specs: tuple, layer_axis: int, slot_axis: int):
    def place(phy2log, leaves):
        ids = jnp.maximum(phy2log, 0)  # [L, P]
        out = []
        for x in leaves:
            idx = ids if layer_axis == 0 else ids.T  # as the leaf's (layer, slot) dims stand
            idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
            rows = jnp.take_along_axis(x, idx, axis=slot_axis)
            empty = (phy2log < 0) if layer_axis == 0 else (phy2log < 0).T
            out.append(jnp.where(empty.reshape(idx.shape), jnp.zeros((), x.dtype), rows))
        return out

    shardings = [NamedSharding(mesh, P(*s)) for s in specs]
    return jax.jit(place, out_shardings=shardings)


@functools.lru_cache(maxsize=64)
def _layer_program(mesh, specs: tuple):
    """One program for every layer of a per-layer sequence: ``(phy2log [L, P], layer int32[],
    leaves [E, ...]) -> leaves [P, ...]`` (the layer index traced)."""

    def place(phy2log, layer, leaves):
        row = jax.lax.dynamic_index_in_dim(phy2log, layer, 0, keepdims=False)  # [P]
        ids = jnp.maximum(row, 0)
        out = []
        for x in leaves:
            rows = jnp.take(x, ids, axis=0)
            empty = (row < 0).reshape((-1,) + (1,) * (x.ndim - 1))
            out.append(jnp.where(empty, jnp.zeros((), x.dtype), rows))
        return out

    shardings = [NamedSharding(mesh, P(*s)) for s in specs]
    return jax.jit(place, out_shardings=shardings)


def _place_layers(logical_weights, phy2log, *, mesh, expert) -> list:
    """`place_experts` for a sequence of L per-layer pytrees with leaves [E, ...]."""
    num_layers = phy2log.shape[0]
    if len(logical_weights) != num_layers:
        raise ValueError(
            f"logical_weights: a sequence of per-layer pytrees needs one entry per layer, L = "
            f"{num_layers} (phy2log's rows); got {len(logical_weights)} entries"
        )
    first_def = jax.tree_util.tree_structure(logical_weights[0])
    layers, bad = [], []
    for i, tree in enumerate(logical_weights):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if treedef != first_def:
            raise ValueError(
                f"logical_weights[{i}] has the tree structure {treedef}, expected "
                f"logical_weights[0]'s {first_def}: every layer must hold the same leaves"
            )
        leaves = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for _, x in flat]
        for (path, _), x in zip(flat, leaves, strict=True):
            if getattr(x, "ndim", 0) < 1:
                where = f"logical_weights[{i}]{jax.tree_util.keystr(path)}"
                bad.append(f"{where} is a {type(x).__name__}, expected an array [E, ...]")
        layers.append((treedef, leaves))
    first = [(tuple(x.shape), str(x.dtype)) for x in layers[0][1]] if not bad else []
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(logical_weights[0])[0]
    ]
    for i, (_, leaves) in enumerate(layers[1:], start=1):
        for path, x, want in zip(paths, leaves, first, strict=False):
            got = (tuple(x.shape), str(x.dtype))
            if got != want:
                bad.append(
                    f"logical_weights[{i}]{path} has shape {got[0]}, dtype {got[1]}; expected "
                    f"logical_weights[0]{path}'s shape {want[0]}, dtype {want[1]}"
                )
    if bad or not layers[0][1]:
        raise ValueError("; ".join(bad) or "logical_weights: expected at least one array leaf")
    specs = tuple(_spec(x, 0, expert) for x in layers[0][1])
    program = _layer_program(mesh, specs)
    phy2log = phy2log.astype(jnp.int32)
    return [
        treedef.unflatten(program(phy2log, jnp.int32(i), leaves))
        for i, (treedef, leaves) in enumerate(layers)
    ]


def _is_per_layer(tree: Any, lead: tuple) -> bool:
    """A list or tuple whose leaves are not all [L, ...] (``lead``: (L,) from the map's shape):
    a sequence of per-layer pytrees (when both readings fit, the stacked one wins)."""
    if not isinstance(tree, list | tuple) or not tree or len(lead) != 1:
        return False
    return not all(
        getattr(x, "ndim", 0) >= 2 and x.shape[0] == lead[0]
        for x in jax.tree_util.tree_leaves(tree)
    )


def place_experts(
    logical_weights: Any,
    phy2log: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str | tuple[str, ...] = "ep",
    layer_axis: int = 0,
    slot_axis: int = 1,
) -> Any:
    """Lays logical expert weights onto the slots of a placement, sharded for the transfer.

    Slot p of layer l gets expert ``phy2log[l, p]``'s weights; an empty slot (-1) gets zeros. Use
    it to build the physical weights from a checkpoint of logical experts (or after
    `jeplb.EplbState.load`), for any layout: the result is what `jeplb.rearrange_expert_weights`
    and `jeplb.eplb_step` take, with the same ``layer_axis`` / ``slot_axis``.

    Args:
      logical_weights: pytree of arrays [L, E, ...] (or [E, L, ...] with ``slot_axis=0,
        layer_axis=1``): one row per logical expert. Their other dims keep their sharding. Or a
        sequence of L per-layer pytrees with leaves [E, ...] (serving engines' per-layer
        modules): placed layer by layer with one compiled program, nothing stacked.
      phy2log: int[L, P] the placement (concrete or traced; -1 = empty slot).
      mesh: the mesh to place on.
      axis_name: the expert axis (or a tuple of axes) the slot dim is sharded over.
      layer_axis: the leaves' layer dim (0 or 1).
      slot_axis: the leaves' expert (then slot) dim (1 or 0).

    Returns:
      The physical weights: leaves [L, P, ...] (or [P, L, ...]), the slot dim sharded over
      ``axis_name``; for a per-layer sequence, a list of L pytrees with leaves [P, ...].

    Raises:
      ValueError, TypeError: a map or leaf of the wrong shape or dtype, ids out of range (concrete
        maps), P not divisible by the axis size; leaves named by their pytree path.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jnp.array([[10.0, 11.0, 12.0]])  # [L = 1, E = 3]
      >>> place_experts(w, np.array([[2, 0, 2, -1]]), mesh=mesh).tolist()
      [[12.0, 10.0, 12.0, 0.0]]
    """
    config = TransferConfig(axis_name=axis_name, layer_axis=layer_axis, slot_axis=slot_axis)
    num_devices = checks.axis_size(mesh, config.axis_name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(logical_weights)
    leaves = [jnp.asarray(x) if isinstance(x, np.ndarray) else x for _, x in flat]
    per_layer = layer_axis == 0 and _is_per_layer(logical_weights, np.shape(phy2log)[:1])
    rows = [x.shape[slot_axis] for x in leaves if getattr(x, "ndim", 0) > slot_axis]
    if per_layer:
        rows = [x.shape[0] for x in leaves if getattr(x, "ndim", 0) >= 1]
    phy2log = check_phy2log(
        phy2log, name="phy2log", num_devices=num_devices, num_experts=min(rows, default=0) or None
    )
    num_layers = phy2log.shape[0]
    if per_layer:
        if checks.is_concrete(phy2log):
            phy2log = jnp.asarray(np.asarray(phy2log), jnp.int32)
        expert = checks.expert_spec(config.axes)
        return _place_layers(logical_weights, phy2log, mesh=mesh, expert=expert)
    bad = [
        f"logical_weights{jax.tree_util.keystr(p)} has shape {tuple(x.shape)}, expected "
        f"{'[E, L, ...]' if config.slot_major else '[L, E, ...]'} with L = {num_layers}"
        for (p, _), x in zip(flat, leaves, strict=True)
        if x.ndim < 2 or x.shape[layer_axis] != num_layers
    ]
    if not leaves or bad:
        raise ValueError("; ".join(bad) or "logical_weights: expected at least one array leaf")
    if checks.is_concrete(phy2log):
        phy2log = jnp.asarray(np.asarray(phy2log), jnp.int32)
    expert = checks.expert_spec(config.axes)
    specs = tuple(_spec(x, slot_axis, expert) for x in leaves)
    # A traced id past int32 becomes -2 (an empty slot) rather than wrapping onto an expert.
    out = _program(mesh, specs, layer_axis, slot_axis)(checks.int32_ids(phy2log), leaves)
    return treedef.unflatten(out)

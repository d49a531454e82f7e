"""Per-layer expert weights: a sequence of L pytrees, one per MoE layer, leaves [P, ...].

Serving engines keep one module per layer (tpu-inference: ``w13`` (P, D, 2F) or (P, 2, D, F),
``w2`` (P, F, D), sharded over the expert axis on the slot dim). Such layers are distinct
buffers: stacking them into [L, P, ...] leaves would copy every expert. The functions here
recognise such a sequence, check it (every layer the same structure, shapes, dtypes and
shardings as layer 0, named by path), and move its due layers through the engine one layer at a
time, each layer's leaves given a unit layer dim on the local shards (free: a reshape that
donation still aliases), so the temporary memory is the engine's, below one layer's local shard.

Letters: L layers, P slots, N_local = P // D, K leaves per layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src import checks
from jeplb._src.transfer import engine as engine_lib

__all__ = [
    "Layers",
    "check_layers",
    "is_per_layer",
    "move_groups",
    "move_one",
    "step_leaves",
    "unit_engine",
]


@dataclasses.dataclass(frozen=True)
class Layers:
    """A checked per-layer sequence, flattened.

    Attributes:
      leaves: the L * K leaves, layer 0's K leaves first (the sequence's flattening order).
      treedef: the whole sequence's tree structure (to unflatten the moved leaves).
      per_layer: K, leaves per layer.
      specs: each leaf's PartitionSpec entries as given, None where unknown (L * K entries).
    """

    leaves: list
    treedef: Any
    per_layer: int
    specs: list

    def layer(self, i: int) -> list:
        """Layer ``i``'s K leaves."""
        return self.leaves[i * self.per_layer : (i + 1) * self.per_layer]


def is_per_layer(tree: Any, stacked_lead: tuple[int, int], *, layer_axis: int = 0) -> bool:
    """Whether ``tree`` is a sequence of per-layer pytrees rather than layer-stacked leaves.

    A list or tuple is read as per-layer when it has L entries or a leaf whose first dim is P
    (``stacked_lead`` is (L, P), or (P, L) with ``layer_axis=1``; N_local for P on local shards),
    unless every leaf has the stacked leading dims: when both readings fit, the stacked one wins
    (what callers passed before per-layer sequences existed), and a list that fits neither gets
    the stacked reading's errors.
    """
    if not isinstance(tree, list | tuple) or not tree:
        return False
    leaves = jax.tree_util.tree_leaves(tree)
    lead = tuple(stacked_lead)
    num_layers, slots = lead[layer_axis], lead[1 - layer_axis]
    if all(tuple(getattr(x, "shape", ()))[:2] == lead for x in leaves):
        return False
    return len(tree) == num_layers or any(
        tuple(getattr(x, "shape", ()))[:1] == (slots,) for x in leaves
    )


def _signature(leaf: Any, spec: tuple | None) -> tuple:
    return (tuple(leaf.shape), str(leaf.dtype), spec)


def check_layers(
    tree: Any,
    *,
    num_layers: int,
    slots: int,
    mesh: Any,
    axes: tuple[str, ...],
    local: bool = False,
    name: str = "expert_weights",
) -> Layers:
    """Checks a per-layer sequence: L entries, each leaf [P, ...] (``slots``: P, or N_local with
    ``local``) with its slot dim 0 sharded over exactly ``axes``, and every layer of layer 0's
    structure, leaf shapes, dtypes and shardings (so one compiled program moves any layer).

    Raises:
      ValueError, TypeError: naming the entry or leaf by path (``expert_weights[2]['w13']``),
        what was expected and what arrived; every bad leaf of a layer in one error.
    """
    if len(tree) != num_layers:
        raise ValueError(
            f"{name}: a sequence of per-layer pytrees needs one entry per layer, L = "
            f"{num_layers}; got {len(tree)} entries (layer-stacked leaves [L, P, ...] are taken "
            f"as they are)"
        )
    first_def = jax.tree_util.tree_structure(tree[0])
    checked = []
    for i, layer in enumerate(tree):
        here = jax.tree_util.tree_structure(layer)
        if here != first_def:
            raise ValueError(
                f"{name}[{i}] has the tree structure {here}, expected {name}[0]'s {first_def}: "
                f"every layer must hold the same leaves"
            )
        checked.append(
            checks.weight_leaves(
                layer,
                lead_shape=(slots,),
                slot_axis=0,
                layer_axis=None,
                mesh=mesh,
                axes=axes,
                name=f"{name}[{i}]",
                local=local,
            )
        )
    paths = checks.leaf_paths(first_def)
    first = [_signature(x, s) for x, s in zip(checked[0][0], checked[0][2], strict=True)]
    bad = []
    for i, (leaves, _, specs) in enumerate(checked[1:], start=1):
        for path, x, s, want in zip(paths, leaves, specs, first, strict=True):
            got = _signature(x, s)
            if got != want:
                bad.append(
                    f"{name}[{i}]{path} has shape {got[0]}, dtype {got[1]}, spec {got[2]}; "
                    f"expected {name}[0]{path}'s shape {want[0]}, dtype {want[1]}, spec {want[2]}"
                )
    if bad:
        head = "" if len(bad) == 1 else f"{len(bad)} leaves differ from layer 0's:\n  "
        raise ValueError(head + "\n  ".join(bad))
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    specs = [s for _, _, layer_specs in checked for s in layer_specs]
    return Layers(leaves, treedef, len(first), specs)


def step_leaves(tree, num_layers: int, slots: int, mesh, engine: engine_lib.Engine):
    """The step's checks of a per-layer sequence (`check_layers`, then what the engine cannot
    move, by path); ``mesh`` None for local shards inside `jax.shard_map` (``slots``: N_local).
    Returns ``(leaves, treedef, specs, K)``."""
    from jeplb._src.transfer import api as transfer_api

    layers = check_layers(
        tree, num_layers=num_layers, slots=slots, mesh=mesh, axes=engine.config.axes,
        local=mesh is None,
    )  # fmt: skip
    k, unit = layers.per_layer, unit_engine(engine)
    first = jax.tree_util.tree_structure(tree[0])
    if mesh is None:
        shapes = [jax.ShapeDtypeStruct((1, *x.shape), x.dtype) for x in layers.layer(0)]
        problems = engine_lib.leaf_problems(shapes, unit)
        checks.refuse_leaves("expert_weights[0]", checks.leaf_paths(first), problems)
    else:
        given = tuple(layers.specs[:k])
        transfer_api.check_movable(layers.layer(0), first, given, mesh, unit, single_layer=True)
    return layers.leaves, layers.treedef, tuple(layers.specs), k


def unit_engine(engine: engine_lib.Engine) -> engine_lib.Engine:
    """The engine setup of one layer given a unit layer dim: leaves [1, N_local, ...]."""
    config = engine.config.replace(layer_axis=0, slot_axis=1)
    return engine_lib.Engine(
        config=config, num_devices=engine.num_devices, platform=engine.platform
    )


def move_one(old, new, layer, leaves, *, engine: engine_lib.Engine):
    """Moves one layer's local leaves [N_local, ...] from ``old[layer]`` to ``new[layer]``
    (maps int32[L, P] replicated, ``layer`` int32[] replicated, maybe traced). Returns
    ``(leaves, stats)`` with stats of that layer alone (each field [1]; ``agreed`` []).
    ``engine`` is the unit-layer setup (`unit_engine`)."""
    old_l = lax.dynamic_index_in_dim(old, layer, 0, keepdims=True)
    new_l = lax.dynamic_index_in_dim(new, layer, 0, keepdims=True)
    out, stats = engine_lib.move_layers(
        old_l,
        new_l,
        [x[None] for x in leaves],
        first=0,
        count=1,
        all_or_nothing=False,
        engine=engine,
    )
    return [x[0] for x in out], stats


def move_groups(
    old: jax.Array,
    new: jax.Array,
    leaves: list[jax.Array],
    *,
    first: jax.Array | int,
    count: jax.Array | int,
    all_or_nothing: bool,
    engine: engine_lib.Engine,
    per_layer: int,
) -> tuple[list[jax.Array], engine_lib.LayerStats]:
    """`engine.move_layers` for per-layer leaves: ``leaves`` are L groups of ``per_layer`` local
    leaves [N_local, ...], layer 0's first. Each layer of ``[first, first + count)`` moves under
    its own `lax.cond` (the range is replicated, so every device takes the same branch): compile
    time grows with L, memory does not (one layer's staging at a time).

    ``all_or_nothing`` is not supported (the step does not use it)."""
    if all_or_nothing:
        raise NotImplementedError("move_groups moves each layer on its own")
    num_layers = old.shape[0]
    unit = unit_engine(engine)
    first = jnp.asarray(first, jnp.int32)
    count = jnp.asarray(count, jnp.int32)
    leaves = list(leaves)
    fields = [f.name for f in dataclasses.fields(engine_lib.LayerStats) if f.name != "agreed"]
    per_field = {name: [] for name in fields}
    agreed = jnp.bool_(True)
    for i in range(num_layers):
        group = leaves[i * per_layer : (i + 1) * per_layer]
        due = (i >= first) & (i < first + count)

        def move(group, i=i):
            return move_one(old, new, jnp.int32(i), group, engine=unit)

        def keep(group, i=i):
            _, ok = _feasible(old[i], new[i])
            zero = jnp.zeros((1,), jnp.int32)
            stats = engine_lib.LayerStats(
                ok=ok[None], moved=jnp.zeros((1,), bool), wire_rows=zero, min_rows=zero,
                chunks=zero, remote_rows=zero, local_rows=zero, agreed=jnp.bool_(True),
                inter_node_rows=zero,
            )  # fmt: skip
            return group, stats

        group, stats = lax.cond(due, move, keep, group)
        leaves[i * per_layer : (i + 1) * per_layer] = group
        agreed = agreed & stats.agreed
        for name in fields:
            per_field[name].append(getattr(stats, name))
    stacked = {name: jnp.concatenate(v) for name, v in per_field.items()}
    return leaves, engine_lib.LayerStats(agreed=agreed, **stacked)


def _feasible(old_row: jax.Array, new_row: jax.Array):
    from jeplb._src.transfer import plan as plan_lib

    return plan_lib.classify(old_row.astype(jnp.int32), new_row.astype(jnp.int32))

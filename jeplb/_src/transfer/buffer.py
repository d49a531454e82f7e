"""The transfer's two stages for one layer, public, for models that run inside `jax.shard_map`
and overlap the collectives with their own compute: `move_to_buffer` and `move_from_buffer`,
joined by a `TransferMetadata`. They run the engine's own stages (`stages`) on one layer, with
the engine's collective and row movers (`engine.Engine`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src import checks
from jeplb._src.maps import check_phy2log
from jeplb._src.transfer import agree, engine, layout, stages
from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.config import TransferConfig
from jeplb._src.transfer.plan import TransferMetadata

__all__ = ["move_from_buffer", "move_to_buffer"]


def _one_layer(x: jax.Array) -> layout.RowSpace:
    """A local leaf [N, ...] as a one-layer row space."""
    return layout.open_rows(
        x[None], 0, 0, _width(x), slot_major=False, platform=checks.platform_of()
    )


def _width(x: jax.Array) -> int:
    w = 1
    for d in x.shape[1:]:
        w *= d
    return w


def _moving_rows(buf_leaves: list) -> tuple[jax.Array, ...]:
    """The buffer's rows [N, R] in the engine's moving dtype (`layout.moving_dtype`): bf16 rows
    staged as bf16 on XLA:CPU would be written through float32, which quiets signalling NaNs."""
    platform = checks.platform_of()
    return tuple(
        layout.convert_rows(_one_layer(b).dst.rows, layout.moving_dtype(b.dtype, platform))
        for b in buf_leaves
    )


def _impls(spaces: tuple, bufs: tuple, movers: rows_lib.Movers) -> tuple[stages.Impls, ...]:
    """Row movers for writes into each leaf and into its buffer (of the moving dtype)."""
    return tuple(
        stages.Impls(movers.for_rows(s.dst.rows), movers.for_rows(b))
        for s, b in zip(spaces, bufs, strict=True)
    )


def _check_movable(leaves: list, treedef, movers: rows_lib.Movers) -> None:
    """Refuses, by path and all at once, leaves whose rows the movers cannot move."""
    problems = []
    for i, x in enumerate(leaves):
        why = movers.rows_problems(jax.ShapeDtypeStruct((x.shape[0], _width(x)), x.dtype))
        if why:
            problems.append((i, why))
    checks.refuse_leaves("expert_weights", checks.leaf_paths(treedef), problems)


def _check_buffer(buffer: Any, leaves: list, treedef) -> list:
    """The buffer's leaves, checked against the weights' (every mismatch named at once)."""
    try:
        buf_leaves = treedef.flatten_up_to(buffer)
    except (ValueError, TypeError) as err:
        raise ValueError(f"buffer: expected the weights' structure {treedef}: {err}") from err
    paths = jax.tree_util.tree_flatten_with_path(treedef.unflatten(leaves))[0]
    bad = [
        f"buffer{jax.tree_util.keystr(p)} is {b.dtype}{list(b.shape)}, expected the weights' "
        f"{x.dtype}{list(x.shape)}"
        for (p, x), b in zip(paths, buf_leaves, strict=True)
        if b.shape != x.shape or b.dtype != x.dtype
    ]
    if bad:
        raise ValueError("; ".join(bad))
    return buf_leaves


def move_to_buffer(
    old_phy2log: jax.Array,
    new_phy2log: jax.Array,
    expert_weights: Any,
    *,
    buffer: Any = None,
    config: TransferConfig | None = None,
    **options: Any,
) -> tuple[Any, TransferMetadata]:
    """Stage one layer: local copies into the buffer, then the collectives. Call inside shard_map.

    This is the first half of `transfer_layer`, for models that overlap the collectives with their
    own compute and commit later with `move_from_buffer`. The weights are only read.

    Args:
      old_phy2log: int32[P] the layer's map before (replicated: the same on every device).
      new_phy2log: int32[P] the layer's map after (replicated).
      expert_weights: pytree of this device's slots of the layer, leaves [N_local, ...].
      buffer: optional pytree shaped like ``expert_weights`` to stage into (donate it to reuse
        memory); a new one is made when None.
      config: the transfer's static options (`jeplb.TransferConfig`; None: the defaults). Read
        here: ``axis_name`` (bound by the enclosing shard_map), ``chunk_rows``, ``row_impl``,
        ``devices_per_node``; the leaves' layout options do not apply to one layer's shards.
      **options: any `jeplb.TransferConfig` field as a shorthand, overriding ``config``'s (e.g.
        ``axis_name="expert"``, ``chunk_rows=4``, ``row_impl="loop"``).

    Returns:
      ``(buffer, metadata)``: the staged rows ([N_local, ...] per leaf, row i holds what local
      slot i will receive) and the `TransferMetadata` that `move_from_buffer` needs.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> def step(old, new, w):
      ...     buf, meta = move_to_buffer(old, new, w, axis_name="ep")
      ...     return move_from_buffer(w, buf, meta)
      >>> f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("ep")),
      ...                           out_specs=P("ep")))
      >>> f(jnp.array([0, 1]), jnp.array([1, 0]), jnp.array([10.0, 11.0])).tolist()
      [11.0, 10.0]
    """
    config = TransferConfig.merged(config, "move_to_buffer", **options)
    d = checks.bound_axis_size(
        config.axis_name,
        arg="axis_name",
        hint="move_to_buffer runs inside jax.shard_map over it (use rearrange_expert_weights "
        "or transfer_layer at global view)",
    )
    setup = engine.Engine(config=config, num_devices=d, platform=checks.platform_of())
    old = check_phy2log(old_phy2log, name="old_phy2log", ndim=1, num_devices=d)
    new = check_phy2log(new_phy2log, name="new_phy2log", ndim=1, num_devices=d, old=old)
    n = old.shape[0] // d
    flat, treedef = jax.tree_util.tree_flatten_with_path(expert_weights)
    leaves = [x for _, x in flat]
    bad = [
        f"expert_weights{jax.tree_util.keystr(p)} has local shape {tuple(x.shape)}, expected "
        f"[N_local = {n}, ...] (P = {old.shape[0]} slots over {d} devices)"
        for p, x in flat
        if x.ndim < 1 or x.shape[0] != n
    ]
    if bad:
        raise ValueError("; ".join(bad))
    _check_movable(leaves, treedef, setup.movers)
    if buffer is None:
        buf_leaves = [jnp.zeros_like(x) for x in leaves]
    else:
        buf_leaves = _check_buffer(buffer, leaves, treedef)
    old, new = checks.int32_ids(old), checks.int32_ids(new)  # never wrapped into range
    # Devices holding different maps would plan different collective loops (a hang): they plan a
    # no-op instead, and the layer counts as infeasible.
    agreed = agree.maps_agree((old, new), config.axes)
    target = jnp.where(agreed, new, old)
    plan = plan_lib.plan_layer(
        old,
        target,
        num_devices=d,
        chunk_rows=config.chunk_rows,
        devices_per_node=config.devices_per_node,
    )
    plan = dataclasses.replace(plan, ok=plan.ok & agreed)
    meta, send, recv = plan_lib.local_metadata(
        plan, old, target, lax.axis_index(config.axes), num_devices=d
    )
    spaces = tuple(_one_layer(x) for x in leaves)
    bufs = _moving_rows(buf_leaves)
    bufs = stages.stage(
        spaces,
        bufs,
        meta,
        stages.Rounds(send, recv, plan.num_chunks),
        axes=config.axes,
        num_devices=d,
        chunk_rows=config.chunk_rows,
        impls=_impls(spaces, bufs, setup.movers),
        collective=setup.collective,
    )
    out = [
        layout.convert_rows(r, b.dtype).reshape(b.shape)
        for b, r in zip(buf_leaves, bufs, strict=True)
    ]
    return treedef.unflatten(out), meta


def move_from_buffer(
    expert_weights: Any,
    buffer: Any,
    metadata: TransferMetadata,
    *,
    config: TransferConfig | None = None,
    **options: Any,
) -> Any:
    """Commit one staged layer into the weights, then its duplicates. Call inside shard_map.

    No collective runs here, so a model may call it whenever the layer is not being read (e.g. at
    the start of its next step); slots whose expert does not change are not written.

    Args:
      expert_weights: pytree of this device's slots of the layer, leaves [N_local, ...].
      buffer: the staged rows from `move_to_buffer`, same structure, shapes and dtypes.
      metadata: the `TransferMetadata` from `move_to_buffer`.
      config: the transfer's static options (`jeplb.TransferConfig`); only ``row_impl`` is
        read here (no collective runs).
      **options: any `jeplb.TransferConfig` field as a shorthand (e.g. ``row_impl="loop"``).

    Returns:
      The layer's weights, rearranged (same structure, shapes and dtypes).

    Example:
      Stage, let the model compute, then commit (one device: every move is a local copy):

      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> def step(old, new, w, x):
      ...     buf, meta = move_to_buffer(old, new, w, axis_name="ep")
      ...     y = x * 2.0  # the model's own work, free to overlap the collectives
      ...     return move_from_buffer(w, buf, meta), y
      >>> f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("ep"), P()),
      ...                           out_specs=(P("ep"), P())))
      >>> w, y = f(jnp.array([0, 1, 2]), jnp.array([2, 2, 0]), jnp.array([10., 11., 12.]), 1.0)
      >>> w.tolist()
      [12.0, 12.0, 10.0]
    """
    if not isinstance(metadata, TransferMetadata):
        raise TypeError(
            f"metadata: expected the TransferMetadata returned by move_to_buffer, "
            f"got {type(metadata).__name__}"
        )
    config = TransferConfig.merged(config, "move_from_buffer", **options)
    movers = rows_lib.Movers(config.row_impl, checks.platform_of())
    leaves, treedef = jax.tree_util.tree_flatten(expert_weights)
    buf_leaves = _check_buffer(buffer, leaves, treedef)
    _check_movable(leaves, treedef, movers)
    spaces = tuple(_one_layer(x) for x in leaves)
    bufs = _moving_rows(buf_leaves)
    spaces = stages.commit(spaces, bufs, metadata, _impls(spaces, bufs, movers))
    out = [layout.close_rows(x[None], s)[0] for x, s in zip(leaves, spaces, strict=True)]
    return treedef.unflatten(out)

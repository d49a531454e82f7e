"""Training with redundant experts: replica gradients summed so that replicas stay identical.

A redundant replica of an expert sees other tokens than its siblings, so it gets another gradient;
left alone, the replicas drift apart. `sync_replica_grads` gives every slot of an expert the sum
of the gradients of all its slots, summed in ascending slot order, so the replicas receive the
same update bit for bit and every process computes the same bits.

It runs on the transfer engine and moves only what must move, in two phases per layer:

* gather: for each replica rank r = 1, 2, ... (slots of an expert ranked by slot index; rank 0,
  the lowest slot, is the expert's *owner*), the r-th replica's rows are staged onto the owner's
  slot exactly as a transfer stages them (`stages.stage`: local copies, rotation rounds of C-row
  chunks), the owner's row is added to the staged row, and the commit writes the sum back into
  the owner's slot. After rank r the owner holds ``((g_0 + g_1) + ...) + g_r``.
* broadcast: a plain transfer (the engine's stage and commit) from the map in which only owners
  hold their expert to the full map copies each sum to the other replicas.

Both phases of every layer run in one loop over (layer, step) pairs with one set of the engine's
staging buffers (`engine.staging`: N_local rows of a block of columns, the row count below one
layer), so a replica row crosses the wire at most twice (to its owner and back), -1 slots and
experts with one slot are never written, and the temporary memory is that one staging buffer plus
one layer's plan tables (int32[P] and bool[P, P] arrays): below one layer of the device's local
weights (benchmarks/results/grad_sync_cpu.md).

On one device there is no plan and no collective. On a GPU a Pallas kernel
(`transfer.replica_sum`) reads each replica row once and writes it once. Elsewhere
(`_sum_one_device`) one loop runs over chunks of at most P / 2 row jobs (the rank-1 adds of every
layer, then rank 2, ..., then the copies to the replicas), each chunk one gather, add and scatter
of replica rows, so a few loop trips in all instead of a planned transfer per (layer, rank).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src import checks, perlayer, programs
from jeplb._src.maps import check_phy2log
from jeplb._src.transfer import agree, engine, layout, replica_sum, stages
from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.config import TransferConfig

__all__ = [
    "SyncStats",
    "expert_state",
    "global_norm",
    "replica_ranks",
    "replica_scale",
    "sync_replica_grads",
    "sync_replica_grads_local",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SyncStats:
    """What one gradient sync moved, per layer (replicated). Every field is int32[L].

    Attributes:
      gather_wire_rows: rows the busiest device sent in the gather rounds (over all ranks),
        padding included.
      broadcast_wire_rows: the same for the broadcast.
      gather_chunks: collective chunks run in the gather.
    """

    gather_wire_rows: jax.Array
    broadcast_wire_rows: jax.Array
    gather_chunks: jax.Array


def replica_ranks(phy2log: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rank and replica count of every slot.

    Computed by a stable sort of each map (no [P, P] comparison table), so its memory is a few
    int32[..., P] arrays.

    Args:
      phy2log: int32[..., P] maps, -1 for empty slots.

    Returns:
      ``(rank, count)``, int32[..., P] each: ``rank`` is the number of lower slots holding the
      same expert (0: the expert's owner, and -1 slots), ``count`` the number of slots holding
      it (0 for -1).

    Example:
      >>> rank, count = replica_ranks(jnp.array([[0, 1, 0, -1, 0]]))
      >>> rank.tolist(), count.tolist()
      ([[0, 0, 1, 0, 2]], [[3, 1, 3, 0, 3]])
    """
    m = jnp.asarray(phy2log).astype(jnp.int32)
    p_total = m.shape[-1]
    axis = m.ndim - 1
    slot = jnp.broadcast_to(jnp.arange(p_total, dtype=jnp.int32), m.shape)
    order = jnp.argsort(m, axis=-1, stable=True).astype(jnp.int32)  # ties: ascending slot
    ids = jnp.take_along_axis(m, order, axis=-1)
    edge = ids[..., 1:] != ids[..., :-1]
    true = jnp.ones((*m.shape[:-1], 1), bool)
    first = lax.cummax(jnp.where(jnp.concatenate([true, edge], -1), slot, 0), axis=axis)
    last = lax.cummin(
        jnp.where(jnp.concatenate([edge, true], -1), slot, p_total), axis=axis, reverse=True
    )
    back = jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation
    rank = jnp.take_along_axis(slot - first, back, axis=-1)
    count = jnp.take_along_axis(last - first + 1, back, axis=-1)
    held = m >= 0
    return jnp.where(held, rank, 0).astype(jnp.int32), jnp.where(held, count, 0).astype(jnp.int32)


# ----------------------------------------------------------------------------- local core


def _sync_local(
    phy2log: jax.Array, leaves: list[jax.Array], *, setup: engine.Engine
) -> tuple[list[jax.Array], SyncStats]:
    """The sync on a device's local leaves, inside `jax.shard_map` over the expert axes."""
    d = setup.num_devices
    phy2log = checks.int32_ids(phy2log)  # an id past int32 is -2: invalid, nothing summed
    valid = jnp.all(phy2log >= -1)
    # A map that differs per device (typed varying, e.g. built from lax.axis_index) makes every
    # loop's results vary too: the carries start varying over its axes.
    vary = rows_lib.varying_axes(phy2log)
    leaves = [rows_lib.make_varying(x, vary) for x in leaves]
    if d == 1:
        return _sync_one_device(phy2log, leaves, valid, setup)
    return _sync_engine(phy2log, leaves, valid, setup)


def _sync_one_device(phy2log, leaves, valid, setup: engine.Engine):
    """One device, each leaf by the fastest route it takes (`_route`): the Pallas kernel
    (`replica_sum`, GPUs), the XLA loop `_sum_one_device` (dtypes that move natively), or the
    engine (bf16, f16 and fp8 on XLA:CPU, which move as bits: the engine's per-layer slabs keep
    the temporary memory below one layer where a whole-leaf bits view would copy the leaf)."""
    routes = [_route(x, setup) for x in leaves]
    out = list(leaves)
    zeros = jnp.zeros((phy2log.shape[0],), jnp.int32)
    stats = SyncStats(zeros, zeros, zeros)

    def pick(route):
        return [i for i, r in enumerate(routes) if r == route]

    if pick("kernel"):
        with jax.named_scope("one_device_kernel"):
            _, copies = replica_ranks(phy2log)
            groups = replica_sum.replica_groups(phy2log, copies, valid)
            for i in pick("kernel"):
                rows = leaves[i].reshape(leaves[i].shape[0] * leaves[i].shape[1], -1)
                rows = replica_sum.sum_replicas(rows, groups, slot_major=setup.config.slot_major)
                out[i] = rows.reshape(leaves[i].shape)
    if pick("sum"):
        with jax.named_scope("one_device_sum"):
            summed = _sum_one_device(phy2log, [leaves[i] for i in pick("sum")], valid, setup)
        for i, x in zip(pick("sum"), summed, strict=True):
            out[i] = x
    if pick("engine"):
        moved, stats = _sync_engine(phy2log, [leaves[i] for i in pick("engine")], valid, setup)
        for i, x in zip(pick("engine"), moved, strict=True):
            out[i] = x
    return out, stats


def _route(x: jax.Array, setup: engine.Engine) -> str:
    """How the one-device sync sums a local leaf: ``kernel`` (`replica_sum`'s Pallas kernel, for
    ``row_impl`` auto on a GPU or ``pallas`` anywhere, interpreted on the CPU, when the dtype and
    row width fit it), ``sum`` (`_sum_one_device`, dtypes that move natively) or ``engine``."""
    num_layers, n, width = layout.dims(x, setup.config.slot_major)
    rows = jax.ShapeDtypeStruct((num_layers * n, width), x.dtype)
    if setup.movers.kernel_preferred and replica_sum.kernel_fits(rows, num_layers):
        return "kernel"
    return "sum" if layout.leaf_mode(x.dtype, setup.platform) == "native" else "engine"


def _sync_engine(phy2log, leaves, valid, setup: engine.Engine):
    """The sync through the transfer engine (several devices, or bits-moving leaves on one)."""
    if setup.num_devices > 1:
        with jax.named_scope("agree"):
            # Trip counts of collective loops come from the map: every device must hold the same
            # one (else nothing moves and no collective loop runs).
            signature = agree.static_signature(
                "sync_replica_grads", setup, [(x.shape, str(x.dtype)) for x in leaves]
            )
            valid = valid & agree.maps_agree((phy2log, jnp.asarray(signature)), setup.config.axes)
    return _gather_broadcast(phy2log, leaves, valid, setup)


def _one_device_jobs(phy2log, valid, *, slot_major: bool, chunk: int):
    """The row jobs of the one-device sum, sorted into groups, and the chunk schedule.

    A job writes row ``dst := a + b`` (an add: group r = the replica's rank, ``a`` the owner's
    row, ``b`` the rank-r replica's) or ``dst := a`` (a copy: group P, ``a`` the owner's row, to
    every non-owner replica). Rows index the leaf's [L * P, R] rows. The jobs of one group write
    distinct rows; groups run in ascending order in chunks of ``chunk`` jobs, so owner rows get
    ``((g_0 + g_1) + ...) + g_r`` before the copies. Returns ``(jobs, group_of, start_of,
    num_chunks)``: jobs int32[4, 2 * L * P + chunk] (dst, a, b, group; sorted by group, padded with
    group P + 1) and, per chunk c < num_chunks, its group and first job (functions of c).
    """
    num_layers, p_total = phy2log.shape
    rank, _ = jax.vmap(replica_ranks)(phy2log)
    same = (phy2log[:, :, None] == phy2log[:, None, :]) & (rank == 0)[:, None, :]
    owner = jnp.argmax(same, axis=-1).astype(jnp.int32)  # the rank-0 slot of each slot's expert
    layer = jnp.arange(num_layers, dtype=jnp.int32)[:, None]
    slot = jnp.arange(p_total, dtype=jnp.int32)[None, :]

    def row(p):
        return p * num_layers + layer if slot_major else layer * p_total + p

    here, own = row(slot), row(owner)
    replica = (rank >= 1) & (phy2log >= 0) & valid
    none = jnp.int32(num_layers * p_total)  # out of range: gathers read 0, scatters drop
    add = (own, own, here, jnp.where(replica, rank, p_total + 1))
    copy = (here, own, jnp.broadcast_to(none, here.shape), jnp.where(replica, p_total, p_total + 1))
    jobs = jnp.stack(
        [jnp.concatenate([a.ravel(), c.ravel()]) for a, c in zip(add, copy, strict=True)]
    )
    jobs = jnp.take(jobs, jnp.argsort(jobs[3], stable=True), axis=1)
    pad = jnp.broadcast_to(
        jnp.array([[none], [none], [none], [p_total + 1]], jnp.int32), (4, chunk)
    )
    jobs = jnp.concatenate([jobs, pad], axis=1).astype(jnp.int32)
    size = jnp.zeros((p_total + 2,), jnp.int32).at[jobs[3]].add(1)[: p_total + 1]
    first = jnp.cumsum(size) - size
    chunks = (size + chunk - 1) // chunk
    ends = jnp.cumsum(chunks).astype(jnp.int32)

    def group_of(c):
        return jnp.searchsorted(ends, c, side="right").astype(jnp.int32)

    def start_of(c, g):
        return first[g] + (c - (ends[g] - chunks[g])) * chunk

    return jobs, group_of, start_of, ends[-1]


def _sum_one_device(phy2log, leaves, valid, setup: engine.Engine):
    """The sync on one device, without a transfer plan: one loop over chunks of row jobs
    (`_one_device_jobs`), each chunk one gather of the rows it reads, one add and one scatter of
    the rows it writes, for every leaf; only replicated experts' rows are read or written. A chunk
    is at most P / 2 rows, so the temporary memory stays below one layer of the leaf; the loop
    runs (max replica count - 1) + (replica rows / chunk) + a few trips, not one per row."""
    num_layers, p_total = phy2log.shape
    slot_major = setup.config.slot_major
    chunk = max(1, p_total // 2)
    jobs, group_of, start_of, num_chunks = _one_device_jobs(
        phy2log, valid, slot_major=slot_major, chunk=chunk
    )
    moving = [layout.moving_dtype(x.dtype, setup.platform) for x in leaves]
    rows = [
        layout.convert_rows(x.reshape(num_layers * p_total, -1), t)
        for x, t in zip(leaves, moving, strict=True)
    ]
    none = num_layers * p_total

    def step(c, rows):
        g = group_of(c)
        dst, a, b, grp = lax.dynamic_slice(jobs, _i32(0, start_of(c, g)), (4, chunk))
        mine = grp == g
        dst, a, b = (jnp.where(mine, i, none) for i in (dst, a, b))
        out = []
        for x, leaf in zip(rows, leaves, strict=True):
            got_a = x.at[a].get(mode="fill", fill_value=0)
            got_b = x.at[b].get(mode="fill", fill_value=0)
            total = layout.convert_rows(got_a, leaf.dtype) + layout.convert_rows(got_b, leaf.dtype)
            val = jnp.where(g < p_total, layout.convert_rows(total, x.dtype), got_a)
            out.append(x.at[dst].set(val, mode="drop", unique_indices=True))
        return out

    rows = lax.fori_loop(0, num_chunks, step, rows)
    return [
        layout.convert_rows(r, x.dtype).reshape(x.shape) for r, x in zip(rows, leaves, strict=True)
    ]


def _gather_broadcast(phy2log, leaves, valid, setup: engine.Engine):
    """Both phases of every layer in ONE fori_loop over (layer, step) pairs, sharing one set of
    staging buffers (`engine.staging`), so one layer's staging is live at a time.

    Layer l, whose largest replica count is R_l > 1, takes R_l steps: step r < R_l gathers rank r
    (owners' rows := owner + rank-r replica), step R_l broadcasts (a plain transfer from the map
    in which only owners hold their expert to the full map). Layers without replicas take none.
    A flat loop: a loop over steps nested in a loop over layers makes XLA:CPU copy leaves whose
    rows it writes with selects.
    """
    cfg, d = setup.config, setup.num_devices
    num_layers, p_total = phy2log.shape
    passes, geo, bufs = engine.staging(leaves, p_total // d, setup)
    me = lax.axis_index(cfg.axes)
    rank, count = replica_ranks(phy2log)
    top = count.max(-1)
    steps = jnp.where(valid & (top > 1), top, 0).astype(jnp.int32)
    ends = jnp.cumsum(steps).astype(jnp.int32)
    zeros = rows_lib.make_varying(
        jnp.zeros((num_layers,), jnp.int32), rows_lib.varying_axes(phy2log)
    )

    def step(k, carry):
        leaves, bufs, stats = carry
        li = jnp.searchsorted(ends, k, side="right").astype(jnp.int32)
        r = k - (ends[li] - steps[li]) + 1
        gather = r < steps[li]
        row, rank_l, count_l = phy2log[li], rank[li], count[li]
        with jax.named_scope("plan"):
            owners = jnp.where(rank_l == 0, row, -1)
            old = jnp.where(gather, jnp.where(rank_l == r, row, -1), owners)
            new = jnp.where(gather, jnp.where((rank_l == 0) & (count_l > r), row, -1), row)
            plan = plan_lib.plan_layer(
                old,
                new,
                num_devices=d,
                chunk_rows=cfg.chunk_rows,
                devices_per_node=cfg.devices_per_node,
            )
            meta, send, recv = plan_lib.local_metadata(plan, old, new, me, num_devices=d)
        rounds = stages.Rounds(send, recv, plan.num_chunks)
        adds = jnp.where(gather, meta.commit_count, 0)

        def add_owners(spaces, staged):
            with jax.named_scope("add"):
                return tuple(
                    _add_owner_rows(s, b, meta, adds) for s, b in zip(spaces, staged, strict=True)
                )

        leaves, bufs = engine.stage_commit(
            leaves, bufs, li, passes, meta, rounds, geo, setup, edit=add_owners
        )
        wire = plan.wire_rows
        stats = SyncStats(
            stats.gather_wire_rows.at[li].add(jnp.where(gather, wire, 0)),
            stats.broadcast_wire_rows.at[li].add(jnp.where(gather, 0, wire)),
            stats.gather_chunks.at[li].add(jnp.where(gather, wire // cfg.chunk_rows, 0)),
        )
        return leaves, bufs, stats

    carry = (list(leaves), bufs, SyncStats(zeros, zeros, zeros))
    leaves, _, stats = lax.fori_loop(0, ends[-1], step, carry)
    return leaves, stats


def _add_owner_rows(space: layout.RowSpace, buf: jax.Array, meta, count) -> jax.Array:
    """``buf[src_k] = owner_k + buf[src_k]`` for the first ``count`` entries of the commit list
    (owner_k: the row the commit will overwrite), added in the leaf's dtype, one row at a time
    (no extra buffer)."""
    dtype = space.dst.rows.dtype
    src = space.src
    width = buf.shape[1]

    def add(k, buf):
        at = src.base + src.index(meta.commit_dst_rows[k])
        own = lax.dynamic_slice(src.rows, _i32(at, src.col), (1, width))
        s = meta.commit_src_rows[k]
        got = lax.dynamic_slice(buf, _i32(s, 0), (1, width))
        total = layout.convert_rows(own, dtype) + layout.convert_rows(got, dtype)
        return lax.dynamic_update_slice(buf, layout.convert_rows(total, buf.dtype), _i32(s, 0))

    return lax.fori_loop(0, count, add, buf)


def _i32(*xs):
    return tuple(jnp.asarray(x, jnp.int32) for x in xs)


# ------------------------------------------------------------------------------ checks


def _check_grad_leaves(tree, *, lead, config: TransferConfig, mesh, local: bool):
    """The leaves, treedef and specs of ``grads``, every bad leaf named at once."""
    leaves, treedef, specs = checks.weight_leaves(
        tree,
        lead_shape=lead,
        slot_axis=config.slot_axis,
        layer_axis=config.layer_axis,
        mesh=mesh,
        axes=config.axes,
        name="grads",
        local=local,
    )
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    bad = [
        f"grads{jax.tree_util.keystr(p)} has dtype {x.dtype}; expected a floating dtype of 1 to "
        f"8 bytes (gradients are summed)"
        for p, x in zip(paths, leaves, strict=True)
        if not jnp.issubdtype(x.dtype, jnp.floating) or np.dtype(x.dtype).name in layout.SUB_BYTE
    ]
    if bad:
        raise TypeError("; ".join(bad))
    return leaves, treedef, specs


def _check_movable(leaves, treedef, setup: engine.Engine) -> None:
    """Refuses, by path and all at once, the local leaves (arrays or shapes) that the sync routes
    through the transfer engine (all on D > 1 devices, `_route` on one) and it cannot move."""
    checks.refuse_leaves("grads", checks.leaf_paths(treedef), _problems(leaves, setup))


def _problems(leaves, setup: engine.Engine) -> list[tuple[int, str]]:
    """`engine.staging_problems` of the leaves the sync moves through the engine."""
    routed = [
        i for i, x in enumerate(leaves) if setup.num_devices > 1 or _route(x, setup) == "engine"
    ]
    if not routed:
        return []
    n = layout.dims(leaves[routed[0]], setup.config.slot_major)[1]
    found = engine.staging_problems([leaves[i] for i in routed], n, setup)
    return [(routed[k], text) for k, text in found]


def _lead(m, config: TransferConfig, num_devices: int, local: bool) -> tuple[int, int]:
    num_layers, p_total = m.shape
    lead = (num_layers, p_total // num_devices if local else p_total)
    return lead[::-1] if config.slot_major else lead


def _self_adjoint(sync: Callable, phy2log: Any, leaves: list) -> list:
    """``sync(phy2log, leaves)`` with its reverse-mode rule: the sync is linear and symmetric
    (slot p gets the sum over the slots holding p's expert; -1 slots are the identity), so its
    transpose is itself and the cotangent of the gradients is the sync of the output's. jax
    cannot reverse the sync's loops (their trip counts come from the map); forward mode
    (`jax.jvp`) is not defined for it."""

    @jax.custom_vjp
    def run(m, x):
        return sync(m, x)

    def fwd(m, x):
        return sync(m, x), m

    def bwd(m, ct):
        return None, sync(m, ct)

    run.defvjp(fwd, bwd)
    return run(phy2log, leaves)


# ------------------------------------------------------------------------------ public


def _local(phy2log, leaves, *, setup: engine.Engine):
    """shard_map body of `sync_replica_grads`."""
    return _sync_local(checks.int32_ids(phy2log), leaves, setup=setup)


def _program(mesh, setup: engine.Engine, specs: tuple):
    """The cached program (`programs.build`) ``program(phy2log, leaves) -> (leaves, stats)``
    for leaves of the given specs (None where unknown)."""
    return programs.build(
        _local,
        mesh=mesh,
        given=specs,
        slot_axis=setup.config.slot_axis,
        axes=setup.config.axes,
        num_replicated=1,
        options=(("setup", setup),),
        check_vma=not setup.movers.interpreted,
    )


def _local_layer(phy2log, layer, leaves, *, setup: engine.Engine):
    """shard_map body of `sync_replica_grads` for one layer of a per-layer sequence: the map's
    row ``layer`` (traced) and the layer's local leaves [N_local, ...], given a unit layer dim."""
    row = lax.dynamic_index_in_dim(phy2log.astype(jnp.int32), layer, 0, keepdims=True)
    out, stats = _sync_local(row, [x[None] for x in leaves], setup=setup)
    return [x[0] for x in out], stats


def _check_layer_dtypes(grads, layers: perlayer.Layers):
    """Refuses a per-layer sequence of non-floating gradients (layer 0 stands for every layer:
    `perlayer.check_layers` checked they agree); returns layer 0's tree structure."""
    first = jax.tree_util.tree_structure(grads[0])
    bad = [
        f"grads[0]{p} has dtype {x.dtype}; expected a floating dtype of 1 to 8 bytes "
        f"(gradients are summed)"
        for p, x in zip(checks.leaf_paths(first), layers.layer(0), strict=True)
        if not jnp.issubdtype(x.dtype, jnp.floating) or np.dtype(x.dtype).name in layout.SUB_BYTE
    ]
    if bad:
        raise TypeError("; ".join(bad))
    return first


def _sync_layers_local(grads, m, *, config: TransferConfig, d: int):
    """`sync_replica_grads_local` for a sequence of L per-layer pytrees (local leaves
    [N_local, ...]): each layer summed on its own (compile time grows with L)."""
    num_layers, p_total = m.shape
    layers = perlayer.check_layers(
        grads, num_layers=num_layers, slots=p_total // d, mesh=None, axes=config.axes,
        local=True, name="grads",
    )  # fmt: skip
    first = _check_layer_dtypes(grads, layers)
    setup = engine.Engine(
        config=config.replace(layer_axis=0, slot_axis=1), num_devices=d,
        platform=checks.platform_of(),
    )  # fmt: skip
    unit = [jax.ShapeDtypeStruct((1, *x.shape), x.dtype) for x in layers.layer(0)]
    _check_movable(unit, first, setup)
    m = jnp.asarray(m)
    out = []
    for i in range(num_layers):
        out.extend(_local_layer(m, jnp.int32(i), layers.layer(i), setup=setup)[0])
    return layers.treedef.unflatten(out)


def _sync_layers(grads, m, *, config: TransferConfig, mesh, d: int):
    """`sync_replica_grads` for a sequence of L per-layer pytrees (leaves [P, ...]): one compiled
    program for every layer (the layer index traced), one call per layer."""
    num_layers, p_total = m.shape
    layers = perlayer.check_layers(
        grads, num_layers=num_layers, slots=p_total, mesh=mesh, axes=config.axes, name="grads"
    )
    k = layers.per_layer
    first = _check_layer_dtypes(grads, layers)
    specs = checks.default_specs(layers.specs[:k], 0, config.axes)
    setup = engine.Engine(
        config=config.replace(layer_axis=0, slot_axis=1),
        num_devices=d,
        platform=checks.platform_of(mesh),
    )
    local = checks.local_shapes(layers.layer(0), specs, mesh)
    unit = [jax.ShapeDtypeStruct((1, *x.shape), x.dtype) for x in local]
    _check_movable(unit, first, setup)
    program = programs.build(
        _local_layer,
        mesh=mesh,
        given=specs,
        slot_axis=0,
        axes=config.axes,
        num_replicated=2,
        options=(("setup", setup),),
        check_vma=not setup.movers.interpreted,
    )
    placed = checks.place_map(m, mesh)
    out = []
    for i in range(num_layers):
        layer = checks.place_map(np.int32(i), mesh)
        out.extend(program(placed, layer, layers.layer(i))[0])
    return layers.treedef.unflatten(out)


def sync_program(mesh, specs: tuple, **options):
    """The cached program `sync_replica_grads` runs for leaves of the given specs (tuples of
    PartitionSpec entries) and `TransferConfig` options: ``program(phy2log, leaves) -> (leaves,
    SyncStats)``. For benchmarks and tests that inspect the compiled program."""
    config = TransferConfig(**options)
    setup = engine.Engine(
        config=config,
        num_devices=checks.axis_size(mesh, config.axis_name),
        platform=checks.platform_of(mesh),
    )
    return _program(mesh, setup, tuple(tuple(s) for s in specs))


def sync_replica_grads(
    grads: Any,
    phy2log: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str | tuple[str, ...] = "ep",
    layer_axis: int = 0,
    slot_axis: int = 1,
    expert_specs: Any = None,
) -> Any:
    """Sums each expert's gradients over its replica slots, so that replicas stay identical.

    Afterwards every slot p of layer l with ``phy2log[l, p] = e >= 0`` holds the sum of the
    gradients of all slots holding e in that layer, added in ascending slot order
    (``((g_p0 + g_p1) + g_p2) + ...`` with p0 < p1 < p2, in the leaf's dtype), so the replicas are
    bitwise identical and every device and process computes the same bits. Slots with -1 and
    experts with one slot keep their values. Call it between the backward pass and the optimizer
    update; the maps may be traced (under an outer `jax.jit` one compilation serves every
    placement of the same shapes).

    Only replica rows move: each non-owner replica's row travels to the expert's lowest slot (its
    owner) and the sum travels back, through the transfer engine's rotation rounds (``ppermute``
    chunks); no all-reduce or all-gather. Temporary memory: one staging buffer shared by both
    phases, below one layer of the device's local gradients. On one device every move is local. The input is not
    donated: under `jax.jit` XLA reuses its buffer when the caller does not read it afterwards.
    `jax.grad` through it gives the sync of the cotangent (the sync is its own transpose);
    forward mode (`jax.jvp`) is not defined.

    Args:
      grads: pytree of gradient arrays laid out as the expert weights `rearrange_expert_weights`
        takes: leaves [L, P, ...] (or [P, L, ...] with ``slot_axis=0, layer_axis=1``) of a
        floating dtype, the slot dim sharded over exactly ``axis_name``, other dims on other mesh
        axes or replicated. Or a sequence of L per-layer pytrees with leaves [P, ...]: summed
        layer by layer with one compiled program, nothing stacked.
      phy2log: int[L, P] the placement the gradients were computed with, -1 for empty slots.
        Replicated (numpy, a list, a jax.Array or a traced value).
      mesh: the device mesh; must have ``axis_name``.
      axis_name: the expert-parallel mesh axis, or a tuple of axes.
      layer_axis: the leaves' layer dim (0 or 1).
      slot_axis: the leaves' slot dim (1 or 0).
      expert_specs: the leaves' PartitionSpecs (one for all, or a pytree of them mirroring
        ``grads``), for leaves traced on a mesh of Auto axes, whose sharding is unknown: as
        `jeplb.rearrange_expert_weights`'s (needed there when the mesh has other axes of size
        > 1, e.g. ``PartitionSpec(None, "ep", None, "tp")`` for tensor-parallel experts;
        undeclared leaves are refused, not guessed).

    Returns:
      The summed gradients: same structure, shapes, dtypes and shardings.

    Raises:
      ValueError, TypeError: a map of the wrong shape, dtype or ids; leaves of the wrong shape,
        dtype or sharding (every bad leaf named by its path, e.g. ``grads['w13']``); raised
        before anything runs. With a traced map holding ids below -1, or devices holding
        different maps, nothing is summed.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> g = jax.device_put(jnp.array([[[1.0], [2.0], [3.0], [4.0]]]),
      ...                    NamedSharding(mesh, P(None, "ep")))
      >>> sync_replica_grads(g, np.array([[0, 1, 0, -1]]), mesh=mesh)[0, :, 0].tolist()
      [4.0, 2.0, 4.0, 4.0]
    """
    config = TransferConfig(axis_name=axis_name, layer_axis=layer_axis, slot_axis=slot_axis)
    d = checks.axis_size(mesh, config.axis_name)
    agree.check_processes_agree(
        {
            "phy2log": phy2log,
            "options": agree.static_signature(config, dict(mesh.shape), repr(expert_specs)),
        },
        where="sync_replica_grads",
    )
    m = check_phy2log(phy2log, name="phy2log", num_devices=d)
    if perlayer.is_per_layer(grads, _lead(m, config, d, False), layer_axis=config.layer_axis):
        return _sync_layers(grads, m, config=config, mesh=mesh, d=d)
    leaves, treedef, specs = _check_grad_leaves(
        grads, lead=_lead(m, config, d, False), config=config, mesh=mesh, local=False
    )
    specs = checks.resolve_specs(
        expert_specs,
        leaves,
        treedef,
        specs,
        mesh=mesh,
        slot_axis=config.slot_axis,
        layer_axis=config.layer_axis,
        axes=config.axes,
        name="grads",
    )
    full = checks.default_specs(specs, config.slot_axis, config.axes)
    setup = engine.Engine(config=config, num_devices=d, platform=checks.platform_of(mesh))
    _check_movable(checks.local_shapes(leaves, full, mesh), treedef, setup)
    program = _program(mesh, setup, tuple(specs))
    out = _self_adjoint(lambda m, x: program(m, x)[0], checks.place_map(m, mesh), leaves)
    return treedef.unflatten(out)


def sync_replica_grads_local(
    grads: Any,
    phy2log: Any,
    *,
    axis_name: str | tuple[str, ...] = "ep",
    layer_axis: int = 0,
    slot_axis: int = 1,
) -> Any:
    """`sync_replica_grads` for code already inside `jax.shard_map` over ``axis_name``.

    Same sums, order and guarantees (reverse mode included); the leaves are this device's
    shards. The map may be typed as varying over the mesh axes (built from `lax.axis_index`);
    its values must still be the same on every device.

    Args:
      grads: pytree of this device's gradient shards, leaves [L, N_local, ...] (or
        [N_local, L, ...] with ``slot_axis=0, layer_axis=1``), floating dtypes; or a sequence
        of L per-layer pytrees with leaves [N_local, ...] (each layer summed on its own).
      phy2log: int[L, P] the placement, the same on every device (replicated).
      axis_name: the bound expert-parallel mesh axis, or a tuple of axes.
      layer_axis: the leaves' layer dim (0 or 1).
      slot_axis: the leaves' slot dim (1 or 0).

    Returns:
      The summed local gradients (same structure, shapes and dtypes).

    Raises:
      ValueError, TypeError: as `sync_replica_grads`, and when ``axis_name`` is not bound.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> f = jax.jit(jax.shard_map(lambda g, m: sync_replica_grads_local(g, m), mesh=mesh,
      ...                           in_specs=(P(None, "ep"), P()), out_specs=P(None, "ep")))
      >>> f(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1, 1, 1]])).tolist()
      [[6.0, 6.0, 6.0]]
    """
    config = TransferConfig(axis_name=axis_name, layer_axis=layer_axis, slot_axis=slot_axis)
    d = checks.bound_axis_size(
        config.axis_name,
        arg="axis_name",
        hint="sync_replica_grads_local runs inside jax.shard_map over it (use "
        "sync_replica_grads(..., mesh=...) at global view)",
    )
    m = check_phy2log(phy2log, name="phy2log", num_devices=d)
    if perlayer.is_per_layer(grads, _lead(m, config, d, True), layer_axis=config.layer_axis):
        return _sync_layers_local(grads, m, config=config, d=d)
    leaves, treedef, _ = _check_grad_leaves(
        grads, lead=_lead(m, config, d, True), config=config, mesh=None, local=True
    )
    setup = engine.Engine(config=config, num_devices=d, platform=checks.platform_of())
    _check_movable(leaves, treedef, setup)
    out = _self_adjoint(lambda m, x: _sync_local(m, x, setup=setup)[0], jnp.asarray(m), leaves)
    return treedef.unflatten(out)


# ------------------------------------------------------------- optimizer state and norms


def _is_masked(x: Any) -> bool:
    """optax's ``MaskedNode`` (an empty NamedTuple standing where ``optax.masked`` or
    ``optax.multi_transform`` keeps no state for a leaf), recognised without importing optax."""
    return isinstance(x, tuple) and not x and type(x).__name__ == "MaskedNode"


def _factored_fields(state: Any) -> dict[str, str]:
    """Paths (`jax.tree_util.keystr`) of the ``v_row`` / ``v_col`` fields of every Adafactor
    ``FactoredState`` in ``state``, to the field's name."""

    def is_factored(x):
        return type(x).__name__ == "FactoredState" and all(
            hasattr(x, f) for f in ("v_row", "v_col", "v")
        )

    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_factored)[0]:
        if is_factored(x):
            out.update({jax.tree_util.keystr(path) + f".{f}": f for f in ("v_row", "v_col")})
    return out


def _field_of(key: str, fields: dict[str, str]) -> str | None:
    """The ``FactoredState`` field (``v_row`` / ``v_col``) a subtree at path ``key`` sits in."""
    for prefix, name in fields.items():
        if key == prefix or key.startswith((prefix + "[", prefix + ".")):
            return name
    return None


def _leaf_kind(x: Any, lead_of: tuple, field: str | None = None) -> str | None:
    """How a state leaf relates to the expert leaf of shape ``lead_of`` at its position.

    ``moves``: it carries the expert leaf's lead dims (the leaf's first two dims: [L, P] or
    [P, L]), whatever its trailing dims (a moment of the same shape, or a factored statistic
    that reduced a trailing dim). ``reduced``: it is the expert shape without one of its two
    lead dims (a statistic over the layers or the slots, e.g. Adafactor factoring the slot dim):
    it cannot follow the slots. ``ambiguous``: both (a lead dim and the dim next to it of the same
    size, e.g. [2, 16, 8] of [2, 16, 16, 8]): the shape cannot tell whether it is per slot.
    ``fixed``: at most one element (a counter, an unused placeholder, optax's ``MaskedNode``),
    no per-slot data: it stays. ``other``: ``lead_of`` is None (a leaf next to the experts that
    ``select`` left out): it stays. None: unrelated.

    In an Adafactor ``FactoredState`` (``field`` ``v_row`` / ``v_col``) the reduced dim is
    known: optax factors the two largest dims ``d1, d0 = argsort(shape)[-2:]`` and ``v_row``
    averages over d0, ``v_col`` over d1.
    """
    if lead_of is None:  # not an expert leaf (``select``): stays, whatever it is
        return "other"
    shape = tuple(getattr(x, "shape", ()))
    if field is not None and len(lead_of) >= 2 and len(shape) == len(lead_of) - 1:
        d1, d0 = (int(i) for i in np.argsort(lead_of)[-2:])
        dim = d0 if field == "v_row" else d1
        if shape == tuple(np.delete(lead_of, dim)):
            return "reduced" if dim < 2 else "moves"
    lead_reduced = len(lead_of) >= 2 and shape in (lead_of[1:], lead_of[:1] + lead_of[2:])
    if len(lead_of) >= 2 and len(shape) >= 2 and shape[:2] == lead_of[:2]:
        return "ambiguous" if lead_reduced else "moves"
    if lead_reduced:
        return "reduced"
    if int(np.prod(shape, dtype=np.int64)) <= 1:
        return "fixed"
    return None


def _kinds(node: Any, want_def, want_shapes: tuple, field: str | None = None) -> list[str] | None:
    """Per leaf `_leaf_kind` of a subtree with the experts' structure (optax's ``MaskedNode``
    standing for a leaf), or None when it does not mirror them (another structure, an unrelated
    leaf, or no leaf with per-slot data)."""
    try:
        if jax.tree_util.tree_structure(node, is_leaf=_is_masked) != want_def:
            return None
    except Exception:
        return None
    leaves = jax.tree_util.tree_leaves(node, is_leaf=_is_masked)
    kinds = [_leaf_kind(x, w, field) for x, w in zip(leaves, want_shapes, strict=True)]
    if None in kinds or not {"moves", "reduced", "ambiguous"} & set(kinds):
        return None
    return kinds


def expert_state(
    state: Any, experts: Any, *, select: Any = None
) -> tuple[dict[str, Any], Callable[[Any], Any]]:
    """The parts of a train state that move with the expert weights, and how to put them back.

    Finds, by structure and not by name, every subtree of ``state`` that mirrors ``experts``:
    the same pytree structure (treedef), every leaf carrying the lead dims of the expert leaf
    at its position (its first two dims, [L, P] or [P, L]) or holding at most one element. In a
    state holding the parameters and an optax state these are the expert weights, every
    optimizer leaf of their shape (Adam's ``mu`` and ``nu``, momentum traces; dtypes may differ,
    e.g. ``mu_dtype``) and Adafactor's factored statistics ``v_row`` and ``v_col`` (the expert
    shape with one trailing dim reduced). Counters and leaves of other shapes are left out.
    Under ``optax.masked`` and ``optax.multi_transform`` an expert leaf without state there
    (optax's ``MaskedNode``) stands as a placeholder that stays, so a moment of one expert leaf
    moves even when the other leaves have their moments elsewhere (w13 under Adam, w2 under SGD
    momentum); ``inject_hyperparams``, ``chain`` and nestings of these are searched the same way.
    Pass the parts to `rearrange_expert_weights` or `eplb_step` as the expert weights, so that a
    rebalance moves the weights and their optimizer state together, then put them back::

        parts, put_back = jeplb.expert_state((params, opt_state), params["moe"])
        state, parts, info = jeplb.eplb_step(state, parts, mesh=mesh)
        params, opt_state = put_back(parts)

    Subtrees are matched from the root down; a matching subtree is taken whole, but its leaves
    of at most one element (e.g. Adafactor's unused ``v`` of a factored leaf) are None in the
    part and stay as they are. A one-leaf ``experts`` matches every array with the same lead
    dims, so give the expert subtree as a whole (e.g. the dict of w13 and w2), not one array.

    Where the experts sit next to other leaves in one subtree (MaxText keeps the router's
    ``gate`` beside ``wi_0``, ``wi_1`` and ``wo``), pass that subtree as it stands and name the
    expert leaves with ``select``: the other leaves of every matching subtree are None in the
    parts and stay as they are, so nothing needs regrouping.

    A statistic that reduced a lead dim cannot move: Adafactor factors the two largest dims of
    a leaf of at least ``min_dim_size_to_factor``, so an expert leaf whose slot (or layer) dim is
    among them gets a ``v_row`` or ``v_col`` averaged over the slots. Such a leaf raises; keep
    the factored dims trailing (``min_dim_size_to_factor`` above P, or trailing dims of at least
    P elements) or do not factor (``factored=False``). Inside Adafactor's ``FactoredState`` the
    averaged dim is known from optax's rule (the two largest dims, ``argsort(shape)[-2:]``), so
    a ``v_col`` over the slots of a leaf [2, 16, 16, 8] raises although its shape [2, 16, 8]
    starts with [L, P]; elsewhere a leaf whose shape could be either (the expert shape without
    its slot dim, or without a trailing dim of the same size) raises too.

    Args:
      state: any pytree (e.g. ``(params, opt_state)``, a dataclass train state).
      experts: the expert weights as they stand in ``state`` (a pytree of [L, P, ...] or
        [P, L, ...] leaves; arrays or `jax.ShapeDtypeStruct`), used for its structure and shapes.
      select: which leaves of ``experts`` are expert weights (None: all): a callable
        ``select(path, leaf) -> bool`` (``path``: the leaf's `jax.tree_util.keystr` inside
        ``experts``, e.g. ``"['wi_0']"``), or a collection of leaf paths, each a keystr
        (``"['moe']['wo']"``), a tuple of keys (``("moe", "wo")``) or, for a leaf of a flat
        dict, its key (``"wo"``).

    Returns:
      ``(parts, put_back)``: ``parts`` is a dict from each matching subtree's path in ``state``
      (`jax.tree_util.keystr`) to the subtree, in ``state``'s flattening order;
      ``put_back(parts)`` returns ``state`` with those subtrees' moving leaves replaced by the
      given ones (same keys and structures; other leaves are those of ``state``).

    Raises:
      ValueError: when ``select`` names no leaf or a path ``experts`` lacks; when no subtree
        of ``state`` mirrors ``experts`` (the message names a subtree that holds experts'
        leaves next to others, and the ``select`` to pass); when a mirroring subtree
        holds a statistic reduced over an expert leaf's layer or slot dim, or one whose shape
        cannot tell (every such leaf named by path); or (from ``put_back``) when the parts
        given back do not have the keys and structures of those taken out.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"moe": {"w": jnp.ones((2, 4, 8, 6))}, "dense": jnp.ones((3, 3))}
      >>> opt_state = optax.adam(1e-3).init(params)
      >>> parts, put_back = expert_state((params, opt_state), params["moe"])
      >>> list(parts)
      ["[0]['moe']", "[1][0].mu['moe']", "[1][0].nu['moe']"]
      >>> moved = {k: {"w": v["w"] + 1} for k, v in parts.items()}
      >>> params, opt_state = put_back(moved)
      >>> float(params["moe"]["w"][0, 0, 0, 0]), float(opt_state[0].mu["moe"]["w"][0, 0, 0, 0])
      (2.0, 1.0)
      >>> factored = optax.adafactor(1e-3, min_dim_size_to_factor=5).init(params)
      >>> parts, _ = expert_state(factored, params["moe"])
      >>> {k: v["w"].shape for k, v in parts.items()}
      {"[0].v_row['moe']": (2, 4, 6), "[0].v_col['moe']": (2, 4, 8)}

      The router next to the experts (MaxText's layout), only the experts selected:

      >>> moe = {"gate": jnp.ones((2, 8, 3)), "wi_0": jnp.ones((2, 4, 8, 6)),
      ...        "wo": jnp.ones((2, 4, 6, 8))}
      >>> parts, put_back = expert_state(optax.adam(1e-3).init(moe), moe, select=["wi_0", "wo"])
      >>> {k: sorted(n for n, x in v.items() if x is not None) for k, v in parts.items()}
      {'[0].mu': ['wi_0', 'wo'], '[0].nu': ['wi_0', 'wo']}
    """
    want_flat, want_def = jax.tree_util.tree_flatten_with_path(experts)
    if want_def.num_leaves == 0:
        raise ValueError("experts: expected a pytree with at least one array leaf, got none")
    chosen = _selected(want_flat, select)
    want_shapes = tuple(
        tuple(getattr(x, "shape", ())) if keep else None
        for (_, x), keep in zip(want_flat, chosen, strict=True)
    )

    def mirrors(node) -> bool:
        return _kinds(node, want_def, want_shapes) is not None

    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=mirrors)
    fields = _factored_fields(state)
    taken = {}
    for p, x in flat:
        k = jax.tree_util.keystr(p)
        taken[k] = (x, _kinds(x, want_def, want_shapes, _field_of(k, fields)))
    taken = {k: v for k, v in taken.items() if v[1] is not None}
    _check_no_reduced(taken, [p for p, _ in want_flat], want_def, want_shapes)
    if not taken:
        raise ValueError(
            f"state: no subtree mirrors experts (structure {want_def}, leaf shapes "
            f"{list(want_shapes)}); pass the expert weights as they stand in the state"
            f"{_beside_hint(state, experts)}"
        )
    parts = {
        k: want_def.unflatten(
            [
                x if kind == "moves" else None
                for x, kind in zip(want_def.flatten_up_to(node), kinds, strict=True)
            ]
        )
        for k, (node, kinds) in taken.items()
    }
    return parts, _put_back(flat, treedef, taken, parts, want_def)


def _selected(want_flat: list, select: Any) -> list[bool]:
    """Per leaf of ``experts``: whether ``select`` names it as an expert leaf."""
    paths = [jax.tree_util.keystr(p) for p, _ in want_flat]
    if select is None:
        return [True] * len(paths)
    if callable(select):
        chosen = [bool(select(k, x)) for k, (_, x) in zip(paths, want_flat, strict=True)]
    else:
        names = [tuple(_key_name(k) for k in p) for p, _ in want_flat]
        chosen = [False] * len(paths)
        for entry in [select] if isinstance(select, str) else select:
            hits = [
                i
                for i, (k, n) in enumerate(zip(paths, names, strict=True))
                if entry in (k, n) or n == (entry,)
            ]
            if not hits:
                raise ValueError(f"select: experts has no leaf {entry!r}; its leaves are {paths}")
            for i in hits:
                chosen[i] = True
    if not any(chosen):
        raise ValueError(f"select: names none of experts' leaves {paths}")
    return chosen


def _key_name(key: Any) -> Any:
    """A path entry's key: a dict key, an attribute name or a sequence index."""
    for field in ("key", "name", "idx"):
        if hasattr(key, field):
            return getattr(key, field)
    return key


def _beside_hint(state: Any, experts: Any) -> str:
    """Where ``state`` holds a dict with every key of the dict ``experts`` and others beside
    them (the router next to the experts): the call that takes it as it stands."""
    if not isinstance(experts, dict):
        return ""
    want = set(experts)

    def holds(node) -> bool:
        return isinstance(node, dict) and want < set(node)

    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=holds)[0]
    found = [p for p, node in flat if holds(node)]
    if not found:
        return ""
    return (
        f". state{jax.tree_util.keystr(found[0])} holds these leaves next to others: pass that "
        f"subtree as experts, with select={sorted(want)!r}"
    )


def _check_no_reduced(taken: dict, leaf_paths: list, want_def, want_shapes: tuple) -> None:
    """Raises, naming every one, for mirroring leaves that reduced an expert leaf's lead dim or
    whose shape cannot tell (`_leaf_kind`)."""

    def text(k, p, x, w, kind):
        name = f"state{k}{jax.tree_util.keystr(p)} has shape {tuple(x.shape)}"
        if kind == "ambiguous":
            return (
                f"{name}: the shape {w} of experts{jax.tree_util.keystr(p)} without its slot dim "
                f"or without a trailing dim of the same size; it cannot be told whether it is a "
                f"per-slot statistic"
            )
        lead = 0 if tuple(x.shape) == w[1:] else 1
        return (
            f"{name}: the shape {w} of experts{jax.tree_util.keystr(p)} without its dim {lead} "
            f"(a statistic over the layers or the slots) cannot move with the slots"
        )

    bad = [
        text(k, p, x, w, kind)
        for k, (node, kinds) in taken.items()
        for p, x, w, kind in zip(
            leaf_paths, want_def.flatten_up_to(node), want_shapes, kinds, strict=True
        )
        if kind in ("reduced", "ambiguous")
    ]
    if bad:
        raise ValueError(
            "; ".join(bad) + ". Adafactor factors a leaf's two largest dims: keep the slot and "
            "layer dims out of them (min_dim_size_to_factor above P, or factored=False)"
        )


def _put_back(flat, treedef, taken: dict, parts: dict, want_def) -> Callable[[Any], Any]:
    """``put_back`` of `expert_state`: the state with the parts' leaves in the taken subtrees."""
    structures = {k: jax.tree_util.tree_structure(v) for k, v in parts.items()}

    def put_back(new_parts: Any) -> Any:
        if not isinstance(new_parts, dict) or set(new_parts) != set(parts):
            got = sorted(new_parts) if isinstance(new_parts, dict) else type(new_parts).__name__
            raise ValueError(f"parts: expected a dict with keys {list(parts)}, got {got}")
        bad = [
            f"parts[{k!r}] has structure {jax.tree_util.tree_structure(v)}, expected "
            f"{structures[k]}"
            for k, v in new_parts.items()
            if jax.tree_util.tree_structure(v) != structures[k]
        ]
        if bad:
            raise ValueError("; ".join(bad))
        leaves = []
        for p, x in flat:
            k = jax.tree_util.keystr(p)
            if k in taken:
                node, kinds = taken[k]
                new = iter(jax.tree_util.tree_leaves(new_parts[k]))
                olds = want_def.flatten_up_to(node)
                x = want_def.unflatten(
                    [
                        next(new) if kind == "moves" else old
                        for old, kind in zip(olds, kinds, strict=True)
                    ]
                )
            leaves.append(x)
        return treedef.unflatten(leaves)

    return put_back


def replica_scale(phy2log: Any) -> jax.Array:
    """Per slot, 1 / the replica count of its expert (0 for -1 slots): float32[L, P].

    Weighting a per-slot quantity by this scale counts each logical expert once: after
    `sync_replica_grads` every replica holds its expert's whole gradient, so a sum over slots of
    ``scale * |g|^2`` is the sum over logical experts. -1 slots keep whatever they hold (inf or
    NaN included), and ``0 * inf`` is NaN: drop them with a select,
    ``jnp.where(scale > 0, scale * x, 0)``, not by the product alone (`global_norm` does).
    Jit-able; the map may be traced.

    Args:
      phy2log: int[L, P] (or int[P]) the placement, -1 for empty slots.

    Returns:
      float32 of ``phy2log``'s shape.

    Example:
      >>> replica_scale(jnp.array([[0, 1, 0, -1]])).tolist()
      [[0.5, 1.0, 0.5, 0.0]]
    """
    m = check_phy2log(phy2log, name="phy2log", ndim=None)
    return _replica_scale(jnp.asarray(m))


def _replica_scale(m: jax.Array) -> jax.Array:
    """`replica_scale` of a checked map."""
    _, count = replica_ranks(m)
    return jnp.where(count > 0, 1.0 / jnp.maximum(count, 1), 0.0).astype(jnp.float32)


def global_norm(
    grads: Any,
    phy2log: Any,
    *,
    rest: Any = None,
    layer_axis: int = 0,
    slot_axis: int = 1,
) -> jax.Array:
    """The global L2 norm of expert gradients with each logical expert counted once.

    ``sqrt(sum over leaves, layers and slots of replica_scale * sum(g ** 2) + |rest| ** 2)``,
    in float32: after `sync_replica_grads` the replicas of an expert hold the same gradient, and
    the norm is that of the model without redundant experts (-1 slots do not count, whatever
    they hold: inf or NaN there leaves the norm finite). Works at
    global view, on sharded arrays, inside or outside `jax.jit`.

    Which optax transforms see the replicas (optax 0.2.8): ``clip_by_global_norm`` takes the
    norm of every leaf (``optax.tree.norm``), so a replicated expert counts once per copy: clip
    with this norm instead (scale the updates by ``min(1, max_norm / norm)``). Per-leaf norms
    (``scale_by_trust_ratio`` in lamb and lars, ``clip_by_block_rms``) scale a whole leaf by one
    factor: the replicas stay identical, but the factor counts every slot, replicas and empty
    slots included. Element-wise transforms (Adam's and AdamW's moments, ``add_decayed_weights``,
    ``clip``, ``trace``) need nothing, as long as the replicas and their moments are identical
    (`sync_replica_grads`, and `expert_state` at a rebalance).

    Args:
      grads: pytree of expert gradients, leaves [L, P, ...] (or [P, L, ...] with
        ``slot_axis=0, layer_axis=1``).
      phy2log: int[L, P] the placement.
      rest: optional pytree of the other gradients (e.g. the dense layers'), counted as
        ``optax.tree.norm`` counts them.
      layer_axis: the leaves' layer dim (0 or 1).
      slot_axis: the leaves' slot dim (1 or 0).

    Returns:
      float32[].

    Raises:
      ValueError: a leaf whose layer and slot dims do not match ``phy2log`` (named by path).

    Example:
      >>> g = jnp.array([[[3.0], [4.0], [3.0], [9.0]]])  # expert 0 in slots 0 and 2
      >>> float(global_norm(g, jnp.array([[0, 1, 0, -1]])))
      5.0
    """
    config = TransferConfig(layer_axis=layer_axis, slot_axis=slot_axis)
    m = check_phy2log(phy2log, name="phy2log")
    scale = _replica_scale(jnp.asarray(m))
    if config.slot_major:
        scale = scale.T
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    bad = [
        f"grads{jax.tree_util.keystr(p)} has shape {tuple(getattr(x, 'shape', ()))}, expected "
        f"leading dims {tuple(scale.shape)} ({'P, L' if config.slot_major else 'L, P'})"
        for p, x in flat
        if tuple(getattr(x, "shape", ())[:2]) != tuple(scale.shape)
    ]
    if bad:
        raise ValueError("; ".join(bad))
    total = jnp.float32(0)
    for _, x in flat:
        sq = jnp.square(x.astype(jnp.float32)).reshape(*x.shape[:2], -1).sum(-1)
        # Selected, not multiplied: a -1 slot holding inf or NaN must add 0 (0 * inf is NaN).
        total = total + jnp.where(scale > 0, sq * scale, 0.0).sum()
    for x in jax.tree_util.tree_leaves(rest):
        total = total + jnp.square(jnp.asarray(x).astype(jnp.float32)).sum()
    return jnp.sqrt(total)

"""The engine: moves a range of layers of a stacked pytree from the old maps to the new ones.

Every public entry point that moves weights ends here (`jeplb.rearrange_expert_weights`,
`jeplb.transfer_layer`, `jeplb.eplb_step`, `jeplb.eplb_step_local`, `jeplb.recover_experts`), so
memory and speed are won once. `move_layers` runs inside `jax.shard_map` on the device's local
leaves:

* D = 1: every move stays on the device; rows move in place in an order that reads every row
  before overwriting it (`inplace`), with no staging buffer.
* D > 1: per layer (a `fori_loop`, so compile time does not grow with L), the plan (`plan`), then
  in ``passes`` blocks of columns: stage (local copies, then the setup's `collective`: the
  rotation rounds today) and commit (`stages`).
  The staging buffer holds N_local + 2C rows of one block: below one layer of local weights.

Rows travel in a moving dtype and are written back as `layout` says, so no leaf is ever copied
or converted whole. Memory depends on the shapes only, never on the plan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src.transfer import agree, inplace, layout, stages
from jeplb._src.transfer import collective as collective_lib
from jeplb._src.transfer import plan as plan_lib
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.transfer.config import TransferConfig

__all__ = [
    "Engine",
    "LayerStats",
    "leaf_problems",
    "move_layers",
    "stage_commit",
    "staging",
    "staging_problems",
]


@dataclasses.dataclass(frozen=True)
class Engine:
    """What the engine needs besides the arrays (static, hashable), checked when built.

    Attributes:
      config: the transfer's options.
      num_devices: D, devices on the expert axis.
      platform: the platform of the mesh's devices (``cpu``, ``gpu``, ``tpu``).
      collective: the cross-device stage (`collective.pick` for the platform), chosen here once.
      movers: the row movers ``config.row_impl`` stands for on the platform (`rows.Movers`).

    Raises:
      ValueError: ``config.devices_per_node`` does not divide D.
    """

    config: TransferConfig
    num_devices: int
    platform: str
    collective: collective_lib.Collective = dataclasses.field(init=False)
    movers: rows_lib.Movers = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cfg = self.config
        cfg.check_devices(self.num_devices)
        object.__setattr__(self, "collective", collective_lib.pick(self.platform))
        object.__setattr__(self, "movers", rows_lib.Movers(cfg.row_impl, self.platform))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Per layer, what `move_layers` did (replicated). Every field is [L].

    Attributes:
      ok: the layer's plan is feasible and the devices agree on the maps.
      moved: the layer's weights now match the new map (False: it keeps the old placement).
      wire_rows: rows the busiest device moved through the rounds, padding included.
      min_rows: the most rows any device had to send or receive remotely: the floor.
      chunks: collective chunks run.
      remote_rows: rows received from other devices (primaries, all devices).
      local_rows: rows written from a device's own data (local copies, duplicates).
      inter_node_rows: of ``remote_rows``, those sent from another node (0 without
        ``devices_per_node``).
      agreed: bool[] (not [L]): every device held the same maps, range and program; when False
        nothing moved.
    """

    ok: jax.Array
    moved: jax.Array
    wire_rows: jax.Array
    min_rows: jax.Array
    chunks: jax.Array
    remote_rows: jax.Array
    local_rows: jax.Array
    agreed: jax.Array
    inter_node_rows: jax.Array


def move_layers(
    old: jax.Array,
    new: jax.Array,
    leaves: list[jax.Array],
    *,
    first: jax.Array | int,
    count: jax.Array | int,
    all_or_nothing: bool,
    engine: Engine,
) -> tuple[list[jax.Array], LayerStats]:
    """Moves layers ``[first, first + count)`` of local leaves from ``old`` to ``new``.

    Call inside `jax.shard_map` over ``engine.config.axes``.

    Args:
      old: int32[L, P] the maps the weights are in (replicated).
      new: int32[L, P] the maps to move to (replicated).
      leaves: the device's leaves, [L, N_local, ...] (or [N_local, L, ...] slot-major).
      first: int32[] the first layer to move (replicated).
      count: int32[] how many layers to move (replicated).
      all_or_nothing: when a layer of the range is infeasible, move none of them (else each
        infeasible layer keeps its placement and the others move).
      engine: the static setup.

    Returns:
      ``(leaves, stats)``: the leaves moved, and per layer a `LayerStats`.
    """
    old = old.astype(jnp.int32)
    new = new.astype(jnp.int32)
    num_layers = old.shape[0]
    first = jnp.asarray(first, jnp.int32)
    count = jnp.asarray(count, jnp.int32)
    layer_ids = jnp.arange(num_layers, dtype=jnp.int32)
    in_range = (layer_ids >= first) & (layer_ids < first + count)
    with jax.named_scope("plan"):
        _, ok = jax.vmap(plan_lib.classify)(old, new)
        agreed = jnp.bool_(True)
        if engine.num_devices > 1:
            # Every device must plan from the same maps, range and program (options, leaf shapes
            # and dtypes); if not, nothing moves and no further collective runs.
            signature = agree.static_signature(engine, [(x.shape, str(x.dtype)) for x in leaves])
            maps = (old, new, first, count, jnp.asarray(signature))
            agreed = agree.maps_agree(maps, engine.config.axes)
            ok = ok & agreed
        go = ok & in_range
        if all_or_nothing:
            go = go & jnp.all(ok | ~in_range)
    direct = _direct_impls(leaves, engine)
    if engine.num_devices == 1 and direct is not None:
        leaves, local_rows = _move_direct(old, new, leaves, go, direct, engine)
        return leaves, _stats(ok, go, agreed, local_rows=local_rows)
    return _move_staged(old, new, leaves, ok, go, agreed, first, count, engine)


def _stats(ok, go, agreed, **figures) -> LayerStats:
    """Stats of layers that moved nothing yet, with the given [L] figures."""
    zeros = jnp.zeros(ok.shape, jnp.int32)
    counts = dict.fromkeys(_COUNTS, zeros) | figures
    return LayerStats(ok=ok, moved=go, agreed=agreed, **counts)


_COUNTS = ("wire_rows", "min_rows", "chunks", "remote_rows", "local_rows", "inter_node_rows")


# ------------------------------------------------------------------------------ one device


def _direct_impls(leaves, engine: Engine) -> tuple[rows_lib.Mover, ...] | None:
    """The in-place executor of each leaf, or None when one has none (``scatter``, and dtypes
    that do not move natively: the engine stages instead)."""
    impls = tuple(engine.movers.direct(_rows_of(x)) for x in leaves)
    return None if None in impls else impls


def _rows_of(x: jax.Array) -> jax.ShapeDtypeStruct:
    """The rows [L * N, R] of a local leaf, as a shape."""
    num_layers, n, r = layout.dims(x, False)
    return jax.ShapeDtypeStruct((num_layers * n, r), x.dtype)


def _move_direct(old, new, leaves, go, impls, engine: Engine):
    """D = 1: ordered in-place moves of every layer in the range, all layers in one loop or
    kernel per leaf; no staging buffer."""
    with jax.named_scope("plan"):
        src, dst, moves = inplace.order_moves_layers(old, new, go)
        changed = (new >= 0) & (new != old) & go[:, None]
    with jax.named_scope("local_moves"):
        out = inplace.move_leaves(
            leaves, src, dst, moves, impls, slot_major=engine.config.slot_major
        )
    return out, changed.sum(-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- many devices


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Static geometry of one leaf in the staged transfer.

    Attributes:
      width: R, elements of a row.
      block: columns staged per pass (``width`` when the leaf is staged whole, in pass 0).
      impls: the row movers writing into the leaf and into the buffer.
      dtype: the dtype its rows travel in (`layout.moving_dtype`).
    """

    width: int
    block: int
    impls: stages.Impls
    dtype: np.dtype

    @property
    def split(self) -> bool:
        return self.block != self.width


def resolve_passes(requested, rows, *, n: int, chunk_rows: int) -> int:
    """Column passes of the staged transfer.

    Args:
      requested: the caller's ``staging_passes``, or None.
      rows: per leaf, ``(elements, bytes, granule, slab)`` of a row; a pass count splits the row
        when ``elements`` is a multiple of ``passes * granule`` (else the leaf is staged whole);
        ``slab``: the leaf is also read through a slab of its block (N rows more).
      n: N_local.
      chunk_rows: C.

    Returns:
      ``requested``, or the smallest count from ``low = (N + 2C) // N + 1`` to ``4 * low`` whose
      buffer, chunks (2C rows, 4C when several leaves travel packed) and slabs stay below one
      layer; if none does, the one holding the fewest bytes.
    """
    if requested is not None:
        return requested
    low = (n + 2 * chunk_rows) // n + 1
    layer = n * sum(b for _, b, _, _ in rows)
    # Several leaves travel packed in one byte buffer: a packed chunk each way besides the leaves'.
    chunks = 2 * chunk_rows if len(rows) == 1 else 4 * chunk_rows

    def staged(p):
        return sum(
            (n * (2 if slab else 1) + chunks) * (b // p if w % (p * g) == 0 else b)
            for w, b, g, slab in rows
        )

    candidates = range(low, 4 * low + 1)
    fits = [p for p in candidates if staged(p) < layer]
    return fits[0] if fits else min(candidates, key=lambda p: (staged(p), p))


def _geometry(leaves, n: int, engine: Engine) -> tuple[int, list[_Geometry]]:
    """The pass count and each leaf's staged geometry (arrays or `jax.ShapeDtypeStruct`s)."""
    cfg = engine.config
    widths = [_rows_of(x).shape[1] for x in leaves]
    dtypes = [layout.moving_dtype(x.dtype, engine.platform) for x in leaves]
    granule = engine.movers.granule
    rows = [
        (w, w * dt.itemsize, granule, layout.leaf_mode(x.dtype, engine.platform) != "native")
        for x, w, dt in zip(leaves, widths, dtypes, strict=True)
    ]
    passes = resolve_passes(cfg.staging_passes, rows, n=n, chunk_rows=cfg.chunk_rows)
    # The default count splits a row as resolve_passes assumed (whole kernel blocks); an explicit
    # count splits every row it divides, and a block the kernel cannot move is refused
    # (`staging_problems`).
    unit = granule if cfg.staging_passes is None else 1
    out = []
    for x, w, dt in zip(leaves, widths, dtypes, strict=True):
        block = w // passes if w % (passes * unit) == 0 else w
        into_buffer = engine.movers.for_rows(jax.ShapeDtypeStruct((n, block), dt))
        into_leaf = engine.movers.for_rows(jax.ShapeDtypeStruct((n, block), x.dtype))
        out.append(_Geometry(w, block, stages.Impls(into_leaf, into_buffer), dt))
    return passes, out


def _block_problems(passes: int, geo: list[_Geometry]) -> list[tuple[int, str]]:
    """``(index, text)`` per leaf whose staged block one of its row movers cannot move."""
    fit = _fitting_passes(passes, [g.width for g in geo if any(m.kernel for m in g.impls)])
    out = []
    for i, g in enumerate(geo):
        for mover in dict.fromkeys(g.impls):
            why = mover.block_problems(g.width, g.block, passes=passes, fit=fit)
            if why:
                out.append((i, why))
                break
    return out


def _fitting_passes(passes: int, widths: list[int]) -> int:
    """The largest count up to ``passes`` that splits each of ``widths`` the kernel moves whole
    into blocks of a multiple of 1024 elements (1 at worst)."""
    whole = [w for w in widths if rows_lib.pallas_block(w)]
    return next(p for p in range(passes, 0, -1) if all(w % (p * 1024) == 0 for w in whole))


def staging_problems(leaves, n: int, engine: Engine) -> list[tuple[int, str]]:
    """The leaves the staged transfer (`staging`, `stage_commit`) cannot move with the requested
    ``row_impl`` and ``staging_passes``: ``(index in leaves, what is wrong and the fix)``.

    Args:
      leaves: the device's leaves [L, N_local, ...] (or slot-major), arrays or
        `jax.ShapeDtypeStruct`s; only shapes and dtypes are read, nothing is traced.
      n: N_local.
      engine: the static setup.
    """
    return _block_problems(*_geometry(leaves, n, engine))


def leaf_problems(leaves, engine: Engine) -> list[tuple[int, str]]:
    """The leaves `move_layers` cannot move with the requested ``row_impl`` and
    ``staging_passes``, as ``(index in leaves, what is wrong and the fix)``, from shapes and
    dtypes only (arrays or `jax.ShapeDtypeStruct`s): on one device the in-place kernel's limits
    (`rows.Movers.direct_problems`), else the staged blocks' (`staging_problems`). The public functions
    raise them, by path, before anything is traced."""
    direct = _direct_impls(leaves, engine)
    if engine.num_devices == 1 and direct is not None:
        out = []
        for i, x in enumerate(leaves):
            _, n, width = layout.dims(x, engine.config.slot_major)
            why = engine.movers.direct_problems(n, width, x.dtype)
            if why:
                out.append((i, why))
        return out
    return staging_problems(leaves, layout.dims(leaves[0], engine.config.slot_major)[1], engine)


def staging(leaves, n: int, engine: Engine) -> tuple[int, list[_Geometry], list[jax.Array]]:
    """The column passes, each leaf's block geometry and its zeroed staging buffer [N, block].

    The leaves are not checked again: every public function refuses what `leaf_problems` (or
    `staging_problems`) finds, by path, before it traces the engine."""
    passes, geo = _geometry(leaves, n, engine)
    # A buffer varies over the expert axes and every axis its leaf is sharded over.
    bufs = [
        rows_lib.make_varying(
            jnp.zeros((n, g.block), g.dtype), set(engine.config.axes) | rows_lib.varying_axes(x)
        )
        for g, x in zip(geo, leaves, strict=True)
    ]
    return passes, geo, bufs


def _move_staged(old, new, leaves, ok, go, agreed, first, count, engine: Engine):
    """D > 1 (or ``scatter``): per layer, plan, then stage + commit in column passes."""
    cfg, d = engine.config, engine.num_devices
    n = old.shape[1] // d
    passes, geo, bufs = staging(leaves, n, engine)
    me = lax.axis_index(cfg.axes)
    stats = _stats(ok, go, agreed)

    def layer(j, carry):
        leaves, bufs, stats = carry
        li = first + j
        with jax.named_scope("plan"):
            target = jnp.where(go[li], new[li], old[li])
            plan = plan_lib.plan_layer(
                old[li],
                target,
                num_devices=d,
                chunk_rows=cfg.chunk_rows,
                devices_per_node=cfg.devices_per_node,
            )
            meta, send, recv = plan_lib.local_metadata(plan, old[li], target, me, num_devices=d)
        rounds = stages.Rounds(send, recv, plan.num_chunks)
        leaves, bufs = stage_commit(leaves, bufs, li, passes, meta, rounds, geo, engine)
        return leaves, bufs, _record(stats, li, plan, cfg.chunk_rows)

    trips = jnp.where(jnp.any(go), count, 0)
    leaves, _, stats = lax.fori_loop(0, trips, layer, (list(leaves), bufs, stats))
    return leaves, stats


def stage_commit(leaves, bufs, li, passes: int, meta, rounds, geo, engine: Engine, *, edit=None):
    """Every column pass of layer ``li``: stage the rows the plan moves, then commit them. When
    every leaf splits into the passes, they are one `fori_loop` over the pass index (the rounds
    are compiled once, not once per pass); else pass 0 (with the leaves staged whole) and the
    others are unrolled.

    ``edit(spaces, staged) -> staged``, when given, changes the staged rows of a pass before they
    are committed (the gradient sync adds the owners' rows there); ``spaces`` are the pass's
    `layout.RowSpace`s and ``staged`` its staging buffers, in the same order."""
    if passes > 1 and all(g.split for g in geo):

        def one(p, carry):
            return _pass(*carry, li, p.astype(jnp.int32), meta, rounds, geo, engine, edit)

        with jax.named_scope("passes"):
            leaves, bufs = lax.fori_loop(0, passes, one, (list(leaves), list(bufs)))
        return list(leaves), list(bufs)
    for p in range(passes):
        with jax.named_scope(f"pass_{p}" if passes > 1 else "stage_commit"):
            leaves, bufs = _pass(leaves, bufs, li, p, meta, rounds, geo, engine, edit)
    return leaves, bufs


def _pass(leaves, bufs, li, p, meta, rounds, geo, engine: Engine, edit):
    """Column pass ``p`` (an int, or traced when every leaf splits) of layer ``li``: every split
    leaf's p-th block, whole leaves in pass 0."""
    cfg = engine.config
    part = [i for i, g in enumerate(geo) if g.split or (isinstance(p, int) and p == 0)]
    if not part:
        return leaves, bufs
    cols = [p * geo[i].block if geo[i].split else 0 for i in part]
    spaces = tuple(
        layout.open_rows(
            leaves[i], li, c, geo[i].block, slot_major=cfg.slot_major, platform=engine.platform
        )
        for i, c in zip(part, cols, strict=True)
    )
    impls = tuple(geo[i].impls for i in part)
    staged = stages.stage(
        spaces,
        tuple(bufs[i] for i in part),
        meta,
        rounds,
        axes=cfg.axes,
        num_devices=engine.num_devices,
        chunk_rows=cfg.chunk_rows,
        impls=impls,
        collective=engine.collective,
    )
    if edit is not None:
        staged = edit(spaces, staged)
    spaces = stages.commit(spaces, staged, meta, impls)
    leaves, bufs = list(leaves), list(bufs)
    for k, i in enumerate(part):
        leaves[i] = layout.close_rows(leaves[i], spaces[k])
        bufs[i] = staged[k]
    return leaves, bufs


def _record(stats: LayerStats, li, plan, chunk_rows: int) -> LayerStats:
    """``stats`` with layer ``li``'s figures from its plan."""
    remote = plan.primary.sum().astype(jnp.int32)
    changed = plan.changed.sum().astype(jnp.int32)
    return dataclasses.replace(
        stats,
        wire_rows=stats.wire_rows.at[li].set(plan.wire_rows),
        min_rows=stats.min_rows.at[li].set(plan.min_rows),
        chunks=stats.chunks.at[li].set(plan.wire_rows // chunk_rows),
        remote_rows=stats.remote_rows.at[li].set(remote),
        local_rows=stats.local_rows.at[li].set(changed - remote),
        inter_node_rows=stats.inter_node_rows.at[li].set(plan.inter_node_rows),
    )

"""The jit-compiled expert-weight transfer: stage (local copies + collectives), then commit.

Rows cross devices only through `lax.ppermute` inside `jax.shard_map`: one rotation round per static
shift s (device i sends to i + s mod D), each running a data-dependent number of chunks of C rows
that every device computes identically from the replicated maps. Received rows and local copies land
in a staging buffer of N rows per leaf, in ``staging_passes`` blocks of columns (each block a whole
stage + commit of the same plan, so the buffer and chunks stay below one layer); the commit then
writes them into the weights, and duplicates take their primary's staged row. On one device there
is nothing to receive: the moves run in place, ordered (see `_local`). Layers go through a
`fori_loop`, so the program's size and compile time do not grow with L, and its memory depends on
the shapes only, whatever the plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src import checks as _validate
from jeplb._src.transfer import agree as _agree
from jeplb._src.transfer import inplace as _local
from jeplb._src.transfer import plan as _plan
from jeplb._src.transfer import rows as _rows
from jeplb._src.transfer.plan import TransferMetadata

__all__ = [
    "TransferReport",
    "move_from_buffer",
    "move_to_buffer",
    "rearrange_expert_weights",
    "transfer_layer",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransferReport:
    """What a rearrangement did, per layer (replicated on every device).

    Attributes:
      ok: bool[L]. The layer's plan was feasible (False: a new map naming an expert that the old
        map lacks, or an id below -1). If any layer is infeasible, no layer's weights are touched,
        so the weights keep matching the old maps; ``report.ok.all()`` says whether the new maps
        may be committed.
      wire_rows: int32[L]. Rows the busiest device moved through the rounds, padding included.
      min_rows: int32[L]. The most rows any device had to send or receive remotely: the floor.
      chunks: int32[L]. Collective chunks run (sum over rounds).
      remote_rows: int32[L]. Rows received from other devices (primaries, all devices).
      local_rows: int32[L]. Rows written from this device's own data (local copies, duplicates).
    """

    ok: jax.Array
    wire_rows: jax.Array
    min_rows: jax.Array
    chunks: jax.Array
    remote_rows: jax.Array
    local_rows: jax.Array

    def replace(self, **changes) -> TransferReport:
        """Returns a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    @property
    def wire_ratio(self) -> jax.Array:
        """float32[L]: wire_rows / min_rows (1.0 where nothing moves remotely)."""
        return jnp.where(self.min_rows > 0, self.wire_rows / jnp.maximum(self.min_rows, 1), 1.0)


def _report(plans: _plan.GlobalPlan, chunk_rows: int) -> TransferReport:
    changed = plans.changed.sum(-1).astype(jnp.int32)
    remote = plans.primary.sum(-1).astype(jnp.int32)
    return TransferReport(
        ok=plans.ok,
        wire_rows=plans.wire_rows,
        min_rows=plans.min_rows,
        chunks=(plans.wire_rows // chunk_rows).astype(jnp.int32),
        remote_rows=remote,
        local_rows=changed - remote,
    )


# ----------------------------------------------------------------------------- stages on rows


def _varying(x: jax.Array, axis_name: str) -> jax.Array:
    """Marks ``x`` as varying over ``axis_name`` (shard_map's type system), if it is not yet."""
    return _rows.make_varying(x, (axis_name,))


def _stage(
    rows: tuple[jax.Array, ...],
    layer_offset: jax.Array | int,
    meta: TransferMetadata,
    send_rows: jax.Array,
    recv_rows: jax.Array,
    num_chunks: jax.Array,
    buffers: tuple[jax.Array, ...],
    *,
    axis_name: str,
    num_devices: int,
    chunk_rows: int,
    impls: tuple[str, ...],
    cols: tuple[int, ...] | None = None,
) -> tuple[jax.Array, ...]:
    """Fills the staging buffers: local copies, then one rotation round per shift.

    ``cols[i]``: the first column of ``rows[i]`` that buffer i stages (its width is the buffer's).
    """
    cols = cols or (0,) * len(rows)
    n = buffers[0].shape[0]
    idx = jnp.arange(n, dtype=jnp.int32)
    buffers = tuple(_varying(b, axis_name) for b in buffers)
    with jax.named_scope("local_copies"):
        local_dst = _plan._pack(meta.is_received_locally, idx)
        local_src = _plan._pack(meta.is_received_locally, meta.local_src_rows)
        count = meta.is_received_locally.sum()
        buffers = tuple(
            _rows.copy_rows(
                b, r, local_dst, local_src, count, src_offset=layer_offset, src_col=col, impl=i
            )
            for b, r, i, col in zip(buffers, rows, impls, cols, strict=True)
        )
    c = chunk_rows
    lanes = jnp.arange(c, dtype=jnp.int32)
    for shift in range(1, num_devices):
        perm = [(i, (i + shift) % num_devices) for i in range(num_devices)]

        def chunk(k, bufs, shift=shift, perm=perm):
            sidx = lax.dynamic_slice_in_dim(send_rows[shift], k * c, c)
            ridx = lax.dynamic_slice_in_dim(recv_rows[shift], k * c, c)
            payload = tuple(
                _rows.copy_rows(
                    _varying(jnp.zeros((c, b.shape[1]), r.dtype), axis_name),
                    r,
                    lanes,
                    sidx,
                    (sidx >= 0).sum(),
                    src_offset=layer_offset,
                    src_col=col,
                    impl=i,
                )
                for r, b, i, col in zip(rows, bufs, impls, cols, strict=True)
            )
            got = lax.ppermute(payload, axis_name, perm)
            return tuple(
                _rows.copy_rows(b, g, ridx, lanes, (ridx >= 0).sum(), impl=i)
                for b, g, i in zip(bufs, got, impls, strict=True)
            )

        with jax.named_scope(f"round_shift_{shift}"):
            buffers = lax.fori_loop(0, num_chunks[shift], chunk, buffers)
    return buffers


def _commit(
    rows: tuple[jax.Array, ...],
    layer_offset: jax.Array | int,
    meta: TransferMetadata,
    buffers: tuple[jax.Array, ...],
    impls: tuple[str, ...],
    cols: tuple[int, ...] | None = None,
) -> tuple[jax.Array, ...]:
    """Writes staged rows into the weights (from column ``cols[i]`` on); duplicates take their
    primary's staged row."""
    cols = cols or (0,) * len(rows)
    with jax.named_scope("commit"):
        return tuple(
            _rows.copy_rows(
                r,
                b,
                meta.commit_dst_rows,
                meta.commit_src_rows,
                meta.commit_count,
                dst_offset=layer_offset,
                dst_col=col,
                impl=i,
            )
            for r, b, i, col in zip(rows, buffers, impls, cols, strict=True)
        )


# --------------------------------------------------------------- public stages (in shard_map)


def _check_chunk_rows(chunk_rows: Any) -> int:
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive int, got {chunk_rows!r}")
    return chunk_rows


def move_to_buffer(
    old_phy2log: jax.Array,
    new_phy2log: jax.Array,
    expert_weights: Any,
    *,
    axis_name: str = "ep",
    buffer: Any = None,
    chunk_rows: int = 1,
    row_impl: str = "auto",
) -> tuple[Any, TransferMetadata]:
    """Stage one layer: local copies into the buffer, then the collectives. Call inside shard_map.

    This is the first half of `transfer_layer`, for models that overlap the collectives with their
    own compute and commit later with `move_from_buffer`. The weights are only read.

    Args:
      old_phy2log: int32[P] the layer's map before (replicated: the same on every device).
      new_phy2log: int32[P] the layer's map after (replicated).
      expert_weights: pytree of this device's slots of the layer, leaves [N_local, ...].
      axis_name: the expert-parallel mesh axis (bound by the enclosing shard_map).
      buffer: optional pytree shaped like ``expert_weights`` to stage into (donate it to reuse
        memory); a new one is made when None.
      chunk_rows: C, rows per collective chunk (static).
      row_impl: how rows move inside the device: ``auto`` (a Pallas kernel on GPUs for rows of at
        least 64 KiB, else a loop of dynamic_update_slice), ``loop``, ``pallas`` or ``scatter``.

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
    chunk_rows = _check_chunk_rows(chunk_rows)
    try:
        d = lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"axis_name: no mesh axis {axis_name!r} is bound here; move_to_buffer runs inside "
            f"jax.shard_map over it (use rearrange_expert_weights or transfer_layer at global view)"
        ) from err
    _validate.check_maps(old_phy2log, new_phy2log, num_devices=d, ndim=1)
    n = old_phy2log.shape[0] // d
    leaves, treedef = jax.tree_util.tree_flatten(expert_weights)
    for i, x in enumerate(leaves):
        if x.ndim < 1 or x.shape[0] != n:
            raise ValueError(
                f"expert_weights: leaf {i} has local shape {tuple(x.shape)}, expected "
                f"[N_local = {n}, ...] (P = {old_phy2log.shape[0]} slots over {d} devices)"
            )
    if buffer is None:
        buf_leaves = [jnp.zeros_like(x) for x in leaves]
    else:
        buf_leaves = treedef.flatten_up_to(buffer)
        for i, (b, x) in enumerate(zip(buf_leaves, leaves, strict=True)):
            if b.shape != x.shape or b.dtype != x.dtype:
                raise ValueError(
                    f"buffer: leaf {i} is {b.dtype}{list(b.shape)}, expected the weights' "
                    f"{x.dtype}{list(x.shape)}"
                )
    old = jnp.asarray(old_phy2log, jnp.int32)
    new = jnp.asarray(new_phy2log, jnp.int32)
    # Devices holding different maps would plan different collective loops (a hang): they plan a
    # no-op instead, and the layer counts as infeasible.
    agree = _agree.maps_agree((old, new), axis_name)
    plan = _plan.plan_layer(old, jnp.where(agree, new, old), num_devices=d, chunk_rows=chunk_rows)
    plan = dataclasses.replace(plan, ok=plan.ok & agree)
    meta, send_rows, recv_rows = _plan.local_metadata(
        plan, new, lax.axis_index(axis_name), num_devices=d
    )
    platform = jax.default_backend()
    rows = tuple(_rows.to_rows(x, 1, platform) for x in leaves)
    bufs = tuple(_rows.to_rows(b, 1, platform) for b in buf_leaves)
    impls = tuple(_rows.resolve_impl(row_impl, r, platform) for r in rows)
    bufs = _stage(
        rows,
        0,
        meta,
        send_rows,
        recv_rows,
        plan.num_chunks,
        bufs,
        axis_name=axis_name,
        num_devices=d,
        chunk_rows=chunk_rows,
        impls=impls,
    )
    out = [_rows.from_rows(b, x.shape, x.dtype) for b, x in zip(bufs, leaves, strict=True)]
    return treedef.unflatten(out), meta


def move_from_buffer(
    expert_weights: Any, buffer: Any, metadata: TransferMetadata, *, row_impl: str = "auto"
) -> Any:
    """Commit one staged layer into the weights, then its duplicates. Call inside shard_map.

    No collective runs here, so a model may call it whenever the layer is not being read (e.g. at
    the start of its next step); slots whose ``metadata.is_unchanged`` holds are not written.

    Args:
      expert_weights: pytree of this device's slots of the layer, leaves [N_local, ...].
      buffer: the staged rows from `move_to_buffer`, same structure, shapes and dtypes.
      metadata: the `TransferMetadata` from `move_to_buffer`.
      row_impl: how rows move (see `move_to_buffer`).

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
    leaves, treedef = jax.tree_util.tree_flatten(expert_weights)
    buf_leaves = treedef.flatten_up_to(buffer)
    for i, (b, x) in enumerate(zip(buf_leaves, leaves, strict=True)):
        if b.shape != x.shape or b.dtype != x.dtype:
            raise ValueError(
                f"buffer: leaf {i} is {b.dtype}{list(b.shape)}, expected the weights' "
                f"{x.dtype}{list(x.shape)}"
            )
    platform = jax.default_backend()
    rows = tuple(_rows.to_rows(x, 1, platform) for x in leaves)
    bufs = tuple(_rows.to_rows(b, 1, platform) for b in buf_leaves)
    impls = tuple(_rows.resolve_impl(row_impl, r, platform) for r in rows)
    rows = _commit(rows, 0, metadata, bufs, impls)
    out = [_rows.from_rows(r, x.shape, x.dtype) for r, x in zip(rows, leaves, strict=True)]
    return treedef.unflatten(out)


# ------------------------------------------------------------------ whole-model rearrangement


def resolve_passes(requested, rows, *, n: int, chunk_rows: int) -> int:
    """Column passes of the staged transfer.

    Args:
      requested: the caller's ``staging_passes`` (validated and returned), or None.
      rows: per leaf, ``(elements, bytes, granule)`` of a row; a pass count splits the row when
        ``elements`` is a multiple of ``passes * granule`` (else the leaf is staged whole).
      n: N_local.
      chunk_rows: C.

    Returns:
      ``requested``, or the smallest count from ``low = (N + 2C) // N + 1`` (the fewest for which
      split rows stay below one layer) to ``4 * low`` whose buffer and chunks stay below one
      layer; if none does, the one staging the fewest bytes.
    """
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ValueError(f"staging_passes: expected a positive int or None, got {requested!r}")
        return requested
    low = (n + 2 * chunk_rows) // n + 1
    layer = n * sum(b for _, b, _ in rows)

    def staged(p):
        return (n + 2 * chunk_rows) * sum(b // p if w % (p * g) == 0 else b for w, b, g in rows)

    candidates = range(low, 4 * low + 1)
    fits = [p for p in candidates if staged(p) < layer]
    return fits[0] if fits else min(candidates, key=lambda p: (staged(p), p))


def _rearrange_local(
    old, new, leaves, *, axis_name, num_devices, chunk_rows, platform, row_impl, staging_passes
):
    """shard_map body: maps int32[L, P] replicated, leaves [L, N, ...] local."""
    num_layers, p_total = old.shape
    n = p_total // num_devices
    if num_devices == 1:
        direct = _local.leaf_impls(row_impl, leaves, platform)
        if direct is not None:
            return _rearrange_direct(old, new, leaves, direct, platform)
    rows = tuple(_rows.to_rows(x, 2, platform) for x in leaves)
    with jax.named_scope("plan"):
        plans = _plan.plan_layers(old, new, num_devices=num_devices, chunk_rows=chunk_rows)
        # Every device must plan from the same maps; if not, nothing moves (see _agree).
        agree = _agree.maps_agree((old, new), axis_name)
        plans = dataclasses.replace(plans, ok=plans.ok & agree)
    me = lax.axis_index(axis_name)
    # The Pallas kernel moves blocks of a multiple of 1024 elements.
    granule = [1024 if row_impl == "pallas" else 1 for _ in rows]
    passes = resolve_passes(
        staging_passes,
        [
            (r.shape[1], r.shape[1] * r.dtype.itemsize, g)
            for r, g in zip(rows, granule, strict=True)
        ],
        n=n,
        chunk_rows=chunk_rows,
    )
    # A row of R columns is staged in ``passes`` blocks of R / passes columns (rows that do not
    # divide go whole, in the first pass): the buffer is 1 / passes of a layer.
    # The default count splits a row as resolve_passes assumed (whole kernel blocks); an explicit
    # count splits every row it divides, and a block the kernel cannot move is refused below.
    unit = granule if staging_passes is None else [1] * len(rows)
    block = [
        r.shape[1] // passes if r.shape[1] % (passes * u) == 0 else r.shape[1]
        for r, u in zip(rows, unit, strict=True)
    ]
    split = [w != r.shape[1] or passes == 1 for w, r in zip(block, rows, strict=True)]
    impls = tuple(
        _rows.resolve_impl(row_impl, jax.ShapeDtypeStruct((n, w), r.dtype), platform)
        for w, r in zip(block, rows, strict=True)
    )
    for i, (impl, w, r) in enumerate(zip(impls, block, rows, strict=True)):
        if impl == "pallas" and w != r.shape[1] and not _rows._pallas_block(w):
            raise ValueError(
                f"row_impl 'pallas' moves blocks of a multiple of 1024 elements, but "
                f"staging_passes = {passes} cuts leaf {i}'s rows of {r.shape[1]} elements into "
                f"blocks of {w}: pass staging_passes=1 or a divisor that keeps such blocks"
            )
    bufs = tuple(
        _varying(jnp.zeros((n, w), r.dtype), axis_name) for w, r in zip(block, rows, strict=True)
    )

    def layer(li, carry):
        rows, bufs = carry
        plan_l = jax.tree_util.tree_map(lambda a: a[li], plans)
        meta, send_rows, recv_rows = _plan.local_metadata(
            plan_l, new[li], me, num_devices=num_devices
        )
        for j in range(passes):
            # Leaves this pass moves: every split one (its j-th block), whole ones in pass 0.
            part = [i for i in range(len(rows)) if split[i] or j == 0]
            if not part:
                continue
            cols = tuple(j * block[i] if split[i] else 0 for i in part)
            sub_rows = tuple(rows[i] for i in part)
            sub_impls = tuple(impls[i] for i in part)
            with jax.named_scope(f"stage_pass_{j}" if passes > 1 else "stage"):
                sub_bufs = _stage(
                    sub_rows,
                    li * n,
                    meta,
                    send_rows,
                    recv_rows,
                    plan_l.num_chunks,
                    tuple(bufs[i] for i in part),
                    axis_name=axis_name,
                    num_devices=num_devices,
                    chunk_rows=chunk_rows,
                    impls=sub_impls,
                    cols=cols,
                )
            sub_rows = _commit(sub_rows, li * n, meta, sub_bufs, sub_impls, cols)
            rows, bufs = list(rows), list(bufs)
            for k, i in enumerate(part):
                rows[i], bufs[i] = sub_rows[k], sub_bufs[k]
            rows, bufs = tuple(rows), tuple(bufs)
        return rows, bufs

    # All or nothing: one infeasible layer leaves every layer untouched, so the weights keep
    # matching the old maps (the predicate comes from replicated maps: the same on every device).
    trips = jnp.where(jnp.all(plans.ok), num_layers, 0)
    rows, _ = lax.fori_loop(0, trips, layer, (rows, bufs))
    out = [_rows.from_rows(r, x.shape, x.dtype) for r, x in zip(rows, leaves, strict=True)]
    return out, _report(plans, chunk_rows)


def _rearrange_direct(old, new, leaves, impls, platform):
    """One device holds every slot: ordered in-place moves, each moved row read once and written
    once, no staging buffer (see `_local`). Maps int32[L, P]; leaves [L, P, ...]."""
    with jax.named_scope("plan"):
        changed, ok = jax.vmap(_plan.classify)(old, new)
        # All or nothing, as on many devices: one infeasible layer leaves every layer untouched.
        src, dst, count = _local.order_moves_layers(old, new, jnp.broadcast_to(ok.all(), ok.shape))
    with jax.named_scope("local_moves"):
        out = _local.move_leaves(leaves, src, dst, count, impls, platform)
    zeros = jnp.zeros(ok.shape, jnp.int32)
    report = TransferReport(
        ok=ok,
        wire_rows=zeros,
        min_rows=zeros,
        chunks=zeros,
        remote_rows=zeros,
        local_rows=changed.sum(-1).astype(jnp.int32),
    )
    return out, report


def _explicit(mesh) -> bool:
    types = getattr(mesh, "axis_types", None) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


@functools.lru_cache(maxsize=128)
def _program(
    mesh,
    axis_name: str,
    chunk_rows: int,
    donate: bool,
    single_layer: bool,
    row_impl: str = "auto",
    staging_passes: int | None = None,
):
    """One jitted program per (mesh, axis, C, donation, layout); jit caches per shapes and tree.

    With ``single_layer`` the maps are [P] and leaves [P, ...]: a unit layer axis is added and
    removed inside the program, where it costs nothing and donation still aliases.
    """
    num_devices = int(mesh.shape[axis_name])
    leaf_spec = P(None, axis_name)

    def run(old, new, leaves):
        if single_layer:
            old, new = old[None], new[None]
            leaves = [x[None] for x in leaves]
        if _explicit(mesh):
            replicated = NamedSharding(mesh, P())
            old = jax.sharding.reshard(old, replicated)
            new = jax.sharding.reshard(new, replicated)
        body = functools.partial(
            _rearrange_local,
            axis_name=axis_name,
            num_devices=num_devices,
            chunk_rows=chunk_rows,
            platform=mesh.devices.flat[0].platform,
            row_impl=row_impl,
            staging_passes=staging_passes,
        )
        specs = [leaf_spec] * len(leaves)
        # The Pallas interpreter (the kernel on CPU) does not type its grid indices for shard_map,
        # so that one combination runs without the varying-axes check.
        interpreted = row_impl == "pallas" and mesh.devices.flat[0].platform == "cpu"
        f = jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), P(), specs),
            out_specs=(specs, P()),
            check_vma=not interpreted,
        )
        out, report = f(old.astype(jnp.int32), new.astype(jnp.int32), leaves)
        if single_layer:
            out = [x[0] for x in out]
            report = jax.tree_util.tree_map(lambda a: a[0], report)
        return out, report

    return jax.jit(run, donate_argnums=(2,) if donate else ())


def _as_map(x, mesh):
    if isinstance(x, jax.Array) or not _validate.is_concrete(x):
        return x
    return jax.device_put(jnp.asarray(x, jnp.int32), NamedSharding(mesh, P()))


def rearrange_expert_weights(
    old_phy2log: Any,
    new_phy2log: Any,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "ep",
    chunk_rows: int = 1,
    num_experts: int | None = None,
    donate: bool = True,
    return_report: bool = False,
    row_impl: str = "auto",
    staging_passes: int | None = None,
) -> Any:
    """Moves expert weights from the old placement to the new one, on the mesh, in one program.

    After the call every slot p of every layer l with ``new_phy2log[l, p] != -1`` holds, bit for
    bit, the weights that logical expert ``new_phy2log[l, p]`` had in a slot of the old placement.
    Slots whose expert does not change are not written; slots with -1 may hold anything. Rows cross
    devices only through ``lax.ppermute`` in rotation rounds; the plan is computed from the maps on
    every device, so the maps may be traced values: under an outer `jax.jit` one compilation
    serves every plan of the same shapes.

    Memory: besides the (donated, updated in place) weights, a staging buffer and two collective
    chunks whose size depends on the shapes only, never on the plan: on one device none (moves
    run in place, in an order that reads every row before overwriting it); on D > 1 devices
    N_local + 2C rows of 1 / ``staging_passes`` of a row's columns, i.e. at most one layer's local
    weights with the default passes.

    Args:
      old_phy2log: int[L, P] physical-to-logical map before, -1 for empty slots. Replicated (numpy,
        a jax.Array, or a traced value).
      new_phy2log: int[L, P] the map after.
      expert_weights: pytree of arrays with leaves [L, P, ...] (any trailing shape, dtypes with
        1, 2, 4 or 8-byte items: bf16, f32, fp8, int8, ...), sharded ``PartitionSpec(None,
        axis_name)`` over ``mesh``.
      mesh: the device mesh; must have ``axis_name``.
      axis_name: the expert-parallel axis the slot dimension is sharded over.
      chunk_rows: C, rows per ppermute chunk (static). 1 wastes no bandwidth on padding; larger
        chunks amortise per-collective latency for small rows.
      num_experts: E, if given, ids >= E are rejected (concrete maps only).
      donate: donate ``expert_weights`` so the update happens in place (the inputs become invalid).
      return_report: also return a `TransferReport`.
      row_impl: how rows move inside a device: ``auto`` (a Pallas kernel on GPUs for rows of at
        least 64 KiB, else a loop of dynamic_update_slice), ``loop``, ``pallas`` or ``scatter``.
      staging_passes: on D > 1 devices, rows are staged and committed in this many blocks of
        columns, one after the other in the same program (static; every column block is an
        independent transfer of the same plan, so the passes never depend on one another). None:
        the smallest count from floor((N_local + 2C) / N_local) + 1 (2 when 2C < N_local) to
        four times that which keeps the buffer and the chunks below one layer's local weights.
        Leaves whose row length the count does not divide are staged whole in the first pass.
        More passes mean more, smaller collectives.

    Returns:
      The rearranged weights (same structure, shapes, dtypes and shardings), and the
      `TransferReport` when ``return_report`` is set.

    Raises:
      ValueError, TypeError: bad maps (shape, dtype, ids, an expert the old map lacks), leaves not
        ``[L, P, ...]`` or not sharded on the axis, a mesh without the axis. Raised before anything
        runs. With traced maps the value checks cannot raise: if any layer's plan is
        infeasible, every layer's weights are left as they were, and it is reported by ``report.ok``
        (and logged as a warning).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jax.device_put(jnp.arange(4.0).reshape(1, 4, 1), NamedSharding(mesh, P(None, "ep")))
      >>> old = np.array([[0, 1, 2, 3]]); new = np.array([[3, 3, 0, 1]])
      >>> rearrange_expert_weights(old, new, w, mesh=mesh)[0, :, 0].tolist()
      [3.0, 3.0, 0.0, 1.0]
    """
    return _run(
        old_phy2log,
        new_phy2log,
        expert_weights,
        mesh=mesh,
        axis_name=axis_name,
        chunk_rows=chunk_rows,
        num_experts=num_experts,
        donate=donate,
        return_report=return_report,
        single_layer=False,
        row_impl=row_impl,
        staging_passes=staging_passes,
    )


def _run(
    old_phy2log,
    new_phy2log,
    expert_weights,
    *,
    mesh,
    axis_name,
    chunk_rows,
    num_experts,
    donate,
    return_report,
    single_layer,
    row_impl,
    staging_passes,
):
    """Validates everything, then runs the cached program."""
    # First, before any check that could fail on one process only: every process has the same maps.
    _agree.check_processes_agree(
        {"old_phy2log": old_phy2log, "new_phy2log": new_phy2log},
        where="transfer_layer" if single_layer else "rearrange_expert_weights",
    )
    num_devices = _validate.axis_size(mesh, axis_name)
    chunk_rows = _check_chunk_rows(chunk_rows)
    if row_impl not in _rows.ROW_IMPLS:
        raise ValueError(f"row_impl: expected one of {_rows.ROW_IMPLS}, got {row_impl!r}")
    if staging_passes is not None:
        resolve_passes(staging_passes, [], n=1, chunk_rows=chunk_rows)
    ndim = 1 if single_layer else 2
    _validate.check_maps(
        old_phy2log, new_phy2log, num_devices=num_devices, ndim=ndim, num_experts=num_experts
    )
    leaves, treedef = jax.tree_util.tree_flatten(expert_weights)
    _validate.check_weight_leaves(
        leaves,
        lead_shape=tuple(old_phy2log.shape),
        slot_dim=ndim - 1,
        mesh=mesh,
        axis_name=axis_name,
    )
    old = _as_map(old_phy2log, mesh)
    new = _as_map(new_phy2log, mesh)
    program = _program(
        mesh, axis_name, chunk_rows, bool(donate), single_layer, row_impl, staging_passes
    )
    out, report = program(old, new, leaves)
    _log_if_infeasible(report.ok)
    weights = treedef.unflatten(out)
    return (weights, report) if return_report else weights


def _log_if_infeasible(ok: jax.Array) -> None:
    """Reports infeasible layers through the log; works under jit via a debug callback."""

    def warn(ok_host):
        import logging

        bad = [i for i, v in enumerate(list(ok_host)) if not v]
        if bad:
            logging.getLogger("jeplb").warning(
                "rearrange_expert_weights: layers %s had an infeasible plan (a new map naming an "
                "expert the old map lacks, an id below -1, or maps that differ between devices); "
                "the weights of every layer were left unchanged",
                bad,
            )

    jax.lax.cond(
        jnp.all(ok),
        lambda: None,
        lambda: jax.debug.callback(warn, ok),
    )


def transfer_layer(
    old_phy2log: Any,
    new_phy2log: Any,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str = "ep",
    chunk_rows: int = 1,
    num_experts: int | None = None,
    donate: bool = True,
    return_report: bool = False,
    row_impl: str = "auto",
    staging_passes: int | None = None,
) -> Any:
    """`rearrange_expert_weights` for one layer: maps int[P], leaves [P, ...] sharded
    ``PartitionSpec(axis_name)``. Same guarantees, arguments and errors.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jax.device_put(jnp.arange(3.0), NamedSharding(mesh, P("ep")))
      >>> transfer_layer(np.array([0, 1, 2]), np.array([2, 1, 1]), w, mesh=mesh).tolist()
      [2.0, 1.0, 1.0]
    """
    return _run(
        old_phy2log,
        new_phy2log,
        expert_weights,
        mesh=mesh,
        axis_name=axis_name,
        chunk_rows=chunk_rows,
        num_experts=num_experts,
        donate=donate,
        return_report=return_report,
        single_layer=True,
        row_impl=row_impl,
        staging_passes=staging_passes,
    )

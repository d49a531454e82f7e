"""Elastic expert parallelism: carry the experts onto another set of devices after a loss or a scale-up.

`recover_experts` takes the placement and weights of the old mesh, and a new mesh (the devices that
remain, or more devices), and returns the weights placed on the new mesh:

1. The shards of devices that are still there are reused as they are (no copy on the host): a device
   of the new mesh that was on the old one starts with its old rows; a new device starts empty.
   Shards of lost devices are never read.
2. A placement on the new devices comes from `jeplb.rebalance_experts` (with the last recorded load,
   or a uniform one), or is the ``new_phy2log`` the caller passes.
3. Every expert that survives somewhere moves to its new slots through the compiled transfer
   (`jeplb.rearrange_expert_weights` on the new mesh), from a surviving replica.
4. Experts whose every replica was lost are read through the caller's loader, once per (layer,
   expert) and process, and written into their new slots on the devices that need them.

The number of slots per device, N_local, stays as it was (each device keeps the memory it had), so
the new mesh has P' = N_local * D' slots per layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src import checks, perlayer
from jeplb._src.maps import check_phy2log, maps_from_phy2log
from jeplb._src.transfer import agree as _agree
from jeplb._src.transfer import layout
from jeplb._src.transfer.config import axis_tuple
from jeplb._src.validate import check_axis_name, check_int

__all__ = ["Recovery", "recover_experts"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Recovery:
    """What `recover_experts` did.

    Attributes:
      phy2log: int32[L, P'] the placement on the new mesh (-1: empty slot).
      log2phy: int32[L, E, P' - E + 1] its logical-to-physical map, padded with -1.
      logcnt: int32[L, E] replicas per expert.
      lost_devices: indices (on the old mesh's axis) of the devices whose rows were not read (static).
      loaded: the (layer, expert) pairs that had no surviving replica and came from the loader
        (static; every process lists all of them, whichever process loaded them).
      moved_rows: int32[L] rows the transfer received from other devices, per layer.
    """

    phy2log: jax.Array
    log2phy: jax.Array
    logcnt: jax.Array
    moved_rows: jax.Array
    lost_devices: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    loaded: tuple[tuple[int, int], ...] = dataclasses.field(default=(), metadata={"static": True})


# ------------------------------------------------------------------------------------ checks


def _old_mesh(tree: Any, axis_name: str):
    """The mesh every leaf lives on (all the same), checked to be one device per axis position."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        raise ValueError("expert_weights: expected a pytree with at least one array leaf, got none")
    meshes = []
    for path, leaf in flat:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(leaf, jax.Array) or not isinstance(sharding, NamedSharding):
            raise TypeError(
                f"expert_weights{jax.tree_util.keystr(path)} is a {type(leaf).__name__} "
                f"({type(sharding).__name__ if sharding is not None else 'no sharding'}); expected "
                f"a jax.Array sharded NamedSharding(old_mesh, PartitionSpec(None, {axis_name!r}))"
            )
        meshes.append(sharding.mesh)
    mesh = meshes[0]
    for (path, _), m in zip(flat, meshes, strict=True):
        if m.devices.shape != mesh.devices.shape or (m.devices != mesh.devices).any():
            raise ValueError(
                f"expert_weights{jax.tree_util.keystr(path)} lives on another mesh than "
                f"expert_weights{jax.tree_util.keystr(flat[0][0])}; every leaf must be sharded "
                f"over the same (old) mesh"
            )
    checks.axis_size(mesh, axis_name)
    return mesh


def _others(mesh: Any, axis_name: str | tuple[str, ...]) -> dict:
    """A mesh's axes other than the expert axes, with their sizes, in order."""
    axes = axis_tuple(axis_name)
    return {a: int(n) for a, n in mesh.shape.items() if a not in axes}


def _check_new_mesh(mesh: Any, axis_name: str, old_mesh: Any) -> int:
    """D' of the new mesh, whose other axes (tensor parallelism, data) must be the old mesh's."""
    d_new = checks.axis_size(mesh, axis_name)
    devices = list(np.asarray(mesh.devices).flat)
    twice = [d for i, d in enumerate(devices) if d in devices[:i]]
    if twice:
        raise ValueError(
            f"mesh: lists device {twice[0]} more than once ({len(devices)} entries, "
            f"{len(set(devices))} distinct devices); each slot needs a device of its own"
        )
    if _others(mesh, axis_name) != _others(old_mesh, axis_name):
        raise ValueError(
            f"mesh: axes other than {axis_name!r} {_others(mesh, axis_name)} differ from the old "
            f"mesh's {_others(old_mesh, axis_name)}; recover_experts changes the expert-parallel "
            f"axis only (each expert-parallel rank keeps its group of devices on the other axes)"
        )
    return d_new


def _mesh_signature(mesh: Any) -> Any:
    """A mesh's axes and device ids (what every process must agree on), or its repr."""
    devices = getattr(mesh, "devices", None)
    if devices is None:
        return repr(mesh)
    ids = tuple(int(d.id) for d in np.asarray(devices).reshape(-1))
    return (tuple(mesh.axis_names), tuple(np.asarray(devices).shape), ids)


def _device_positions(mesh, axis_name: str | tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The ranks of a mesh along its expert-parallel axes, in order (a tuple of axes in the order
    of a ``PartitionSpec`` entry): each the tuple of devices at that position (one device, or its
    group over the other axes in their order)."""
    axes = axis_tuple(axis_name)
    names = list(mesh.axis_names)
    devices = np.moveaxis(
        np.asarray(mesh.devices), [names.index(a) for a in axes], list(range(len(axes)))
    )
    return [tuple(rank) for rank in devices.reshape(checks.axis_size(mesh, axes), -1)]


# ------------------------------------------------------------------------------------ pieces


def _as_bits(x: Any) -> Any:
    """A host view of ``x`` as integers (for the cross-process fingerprint); None stays None."""
    if x is None or not checks.is_concrete(x) or not hasattr(x, "dtype"):
        return x
    a = np.ascontiguousarray(np.asarray(x))
    return a.view(np.uint8) if a.dtype.kind not in "iub" else a


@functools.lru_cache(maxsize=64)
def _patch_program(num_rows: int, platform: str):
    """A jitted single-device update: shard[l_i, r_i] = rows[i] for i < num_rows (donated).

    Rows move in the transfer's moving dtype for ``platform`` (`layout.moving_dtype`): their bits
    where the type does not move natively, since XLA:CPU updates bf16 through float32, which
    quiets a signalling NaN's payload.
    """

    def patch(shard, layer_idx, row_idx, rows):
        def body(i, s):
            zero = jnp.zeros((), jnp.int32)  # every index int32, also under x64
            start = (layer_idx[i], row_idx[i]) + (zero,) * (s.ndim - 2)
            return jax.lax.dynamic_update_slice(s, rows[i][None, None], start)

        moving = layout.moving_dtype(shard.dtype, platform)
        rows = layout.convert_rows(rows, moving)
        out = jax.lax.fori_loop(0, num_rows, body, layout.convert_rows(shard, moving))
        return layout.convert_rows(out, shard.dtype)

    return jax.jit(patch, donate_argnums=(0,))


def _load_row(loader, layer: int, expert: int, treedef, leaf_shapes, leaf_dtypes):
    """Calls the loader for one expert and checks what it returns against the weights' leaves."""
    got = loader(layer, expert)
    try:
        parts = treedef.flatten_up_to(got)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"loader({layer}, {expert}): returned a {type(got).__name__} whose structure is not "
            f"the weights' {treedef} ({err})"
        ) from err
    out = []
    for i, (x, shape, dtype) in enumerate(zip(parts, leaf_shapes, leaf_dtypes, strict=True)):
        x = np.asarray(x)
        if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
            raise ValueError(
                f"loader({layer}, {expert}): leaf {i} is {x.dtype}{list(x.shape)}, expected one "
                f"expert's row of the weights: {np.dtype(dtype)}{list(shape)}"
            )
        out.append(x)
    return out


def recover_experts(
    old_phy2log: Any,
    expert_weights: Any,
    loader: Callable[[int, int], Any],
    *,
    mesh: jax.sharding.Mesh,
    axis_name: str | tuple[str, ...] = "ep",
    num_experts: int | None = None,
    lost_devices: Sequence[int] | None = None,
    load: Any = None,
    new_phy2log: Any = None,
    num_groups: int = 1,
    num_nodes: int = 1,
    chunk_rows: int = 1,
) -> tuple[Any, Recovery]:
    """Places the experts on a new mesh after devices were lost or added, losing none of them.

    Rows on devices that remain are reused where they are and moved to their new slots from a
    surviving replica; only experts with no surviving replica are read through ``loader``. After
    the call, every slot p' of the new placement holds, bit for bit, the weights of expert
    ``recovery.phy2log[l, p']`` (what the old placement held, or what the loader returned).

    Args:
      old_phy2log: int[L, P] the placement the weights are in (concrete, the same on every process).
      expert_weights: pytree of jax.Arrays with leaves [L, P, ...] sharded over the old mesh,
        the slot dim on ``axis_name``, other dims replicated or on other mesh axes (tensor
        parallelism: ``PartitionSpec(None, axis_name, None, "tp")``). An expert-parallel rank is
        the group of devices at one position of ``axis_name``; only the shards of ranks that are
        on the new mesh (the same devices at the same positions) and not in ``lost_devices`` are
        read; the arrays are not changed. Or a sequence of L per-layer
        pytrees with leaves [P, ...] (the slot dim 0 on ``axis_name``): recovered one layer at a
        time with one transfer program for every layer, nothing stacked, and returned as such a
        sequence (leaves [P', ...]); ``loader`` then returns one layer's pytree.
      loader: ``loader(layer, expert)`` -> one expert's weights as host arrays, a pytree shaped
        like ``expert_weights`` whose leaves are [...] (a leaf's shape without L and P) with the
        leaf's dtype; e.g. read from a checkpoint. Called once per lost (layer, expert), on the
        process(es) whose devices hold one of its new slots.
      mesh: the new mesh: the ranks that remain, or more, along ``axis_name``; its other axes
        are the old mesh's (names and sizes). The new placement has P' = N_local * D' slots per
        layer (N_local = P // D as before).
      axis_name: the expert-parallel axis of both meshes, or a tuple of axes (ranks in the
        order of a ``PartitionSpec`` entry, as in `jeplb.rearrange_expert_weights`).
      num_experts: E (default: the largest id of ``old_phy2log`` + 1).
      lost_devices: indices (ranks) on the old mesh's axis whose rows are gone. Default: the
        old ranks that are not on the new mesh.
      load: [L, E] the last recorded load (e.g. ``state.window.sum(0)``) for the placement policy;
        None spreads the replicas evenly.
      new_phy2log: int[L, P'] a target placement to use instead of the policy (every expert at
        least once per layer).
      num_groups, num_nodes: the policy's groups and nodes (see `jeplb.rebalance_experts`).
      chunk_rows: rows per collective chunk of the transfer.

    Returns:
      ``(weights, recovery)``: the weights on the new mesh (leaves [L, P', ...] sharded with
      their own PartitionSpecs: rows moved inside each shard, nothing gathered) and a
      `Recovery` with the new maps and what was loaded.
      Build the new `jeplb.EplbState` with ``EplbState.from_placement(recovery.phy2log, ...,
      num_devices=D')``.

    Raises:
      ValueError, TypeError: bad maps, weights, meshes, loads, lost devices, or a loader result
        of the wrong structure, shape or dtype; raised before the weights on the new mesh are
        returned (the input weights are never changed).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> devs = jax.devices()[:2]
      >>> old_mesh = Mesh(np.array(devs), ("ep",))
      >>> old = np.array([[0, 0, 1, 1]])  # device 0 holds expert 0 twice, device 1 expert 1
      >>> w = jax.device_put(jnp.array([[0.0, 0.0, 1.0, 1.0]]),
      ...                    NamedSharding(old_mesh, P(None, "ep")))
      >>> new_mesh = Mesh(np.array(devs[:1]), ("ep",))  # device 1 is lost
      >>> w2, rec = recover_experts(old, w, lambda layer, e: np.float32(e), mesh=new_mesh)
      >>> rec.loaded, rec.phy2log.shape  # expert 1 of layer 0 came from the loader
      (((0, 1),), (1, 2))
      >>> bool((w2 == rec.phy2log).all())  # every slot holds its expert
      True
    """
    # First, before any check that could fail on one process only: every process has the same maps
    # and options. The one gather of the call: the transfer below plans from values derived from
    # these, so it gathers nothing again.
    from jeplb._src.transfer.api import _leaf_signature

    axis_name = check_axis_name("axis_name", axis_name)  # a str, or a tuple of axes
    options = (axis_name, num_experts, num_groups, num_nodes, chunk_rows, _mesh_signature(mesh))
    _agree.check_processes_agree(
        {
            "old_phy2log": old_phy2log,
            "new_phy2log": new_phy2log,
            "load": _as_bits(load),
            "lost_devices": None if lost_devices is None else np.asarray(lost_devices),
            "options": _agree.static_signature(*options),
            "expert_weights": _agree.static_signature(_leaf_signature(expert_weights)),
        },
        where="recover_experts",
    )
    if not callable(loader):
        raise TypeError(f"loader: expected a callable (layer, expert) -> arrays, got {loader!r}")
    leaves, treedef = jax.tree_util.tree_flatten(expert_weights)
    lead = tuple(np.shape(old_phy2log)) if np.ndim(old_phy2log) == 2 else (0, 0)
    per_layer = perlayer.is_per_layer(expert_weights, lead)
    plan = _plan_recovery(
        old_phy2log,
        expert_weights,
        mesh=mesh,
        axis_name=axis_name,
        num_experts=num_experts,
        lost_devices=lost_devices,
        load=load,
        new_phy2log=new_phy2log,
        policy=(num_groups, num_nodes),
        per_layer=per_layer,
    )
    if per_layer:
        out, remote = _recover_layers(
            expert_weights, loader, mesh=mesh, axis_name=axis_name, plan=plan,
            chunk_rows=chunk_rows,
        )  # fmt: skip
        return out, _recovery(plan, remote)
    staged = _survivors_on_new_mesh(leaves, plan, mesh, axis_name)

    out, report = _move_survivors(
        plan, slice(None), treedef.unflatten(staged), mesh, axis_name, chunk_rows
    )
    out_leaves = treedef.flatten_up_to(out)
    if plan.lost_pairs:
        out_leaves = _write_loaded(out_leaves, leaves, treedef, plan, loader, mesh, axis_name)
    return treedef.unflatten(out_leaves), _recovery(plan, report.remote_rows)


def _recovery(plan: _RecoveryPlan, remote_rows) -> Recovery:
    """The `Recovery` of a plan whose transfer received ``remote_rows`` [L] rows."""
    target = jnp.asarray(plan.target)
    log2phy, logcnt = maps_from_phy2log(
        target, plan.num_experts, target.shape[1] - plan.num_experts + 1
    )
    return Recovery(
        phy2log=target,
        log2phy=log2phy,
        logcnt=logcnt,
        moved_rows=jnp.asarray(remote_rows),
        lost_devices=plan.lost,
        loaded=tuple((int(a), int(b)) for a, b in plan.lost_pairs),
    )


@dataclasses.dataclass(frozen=True)
class _RecoveryPlan:
    """What recover_experts will do, decided on the host before anything moves.

    Attributes:
      num_experts: E.
      n_local: N_local, slots per device (unchanged).
      target: int32[L, P'] the placement on the new mesh.
      staged: int32[L, P'] what each new slot holds before the transfer (-1: nothing).
      moves: int32[L, P'] the transfer's target: ``target`` with lost experts' slots at -1.
      source_of_new: per new device, its index on the old mesh if its rows survive, else -1.
      lost: old-mesh indices of the lost devices.
      lost_pairs: (layer, expert) pairs with no surviving replica.
      old_devices, new_devices: the meshes' devices along the axis.
    """

    num_experts: int
    n_local: int
    target: np.ndarray
    staged: np.ndarray
    moves: np.ndarray
    source_of_new: tuple[int, ...]
    lost: tuple[int, ...]
    lost_pairs: tuple[tuple[int, int], ...]
    old_devices: tuple[Any, ...]
    new_devices: tuple[Any, ...]


def _plan_recovery(
    old_phy2log,
    tree,
    *,
    mesh,
    axis_name,
    num_experts,
    lost_devices,
    load,
    new_phy2log,
    policy,
    per_layer=False,
) -> _RecoveryPlan:
    """Checks the arguments and decides the placement and the moves (``per_layer``: ``tree`` is
    a sequence of L per-layer pytrees with leaves [P, ...])."""
    old_mesh = _old_mesh(tree, axis_name)
    d_old = checks.axis_size(old_mesh, axis_name)
    check_int("num_experts", num_experts, minimum=1, allow_none=True)
    old = check_phy2log(
        old_phy2log,
        name="old_phy2log",
        num_experts=num_experts,
        num_devices=d_old,
        require_all=True,
        traced=False,
    )
    old = np.asarray(old).astype(np.int32)
    if num_experts is None and old.max() < 0:
        raise ValueError(
            "old_phy2log: holds no expert (every slot -1), so num_experts cannot be inferred from "
            "it; pass num_experts="
        )
    num_experts = int(old.max()) + 1 if num_experts is None else int(num_experts)
    d_new = _check_new_mesh(mesh, axis_name, old_mesh)
    num_layers, p_old = old.shape
    if per_layer:
        perlayer.check_layers(
            tree, num_layers=num_layers, slots=p_old, mesh=old_mesh, axes=axis_tuple(axis_name)
        )
    else:
        checks.weight_leaves(
            tree,
            lead_shape=(num_layers, p_old),
            slot_axis=1,
            layer_axis=0,
            mesh=old_mesh,
            axes=axis_tuple(axis_name),
        )
    n_local = p_old // d_old
    p_new = n_local * d_new
    if p_new < num_experts:
        raise ValueError(
            f"mesh: {d_new} devices x N_local = {n_local} slots = {p_new} slots per layer, fewer "
            f"than num_experts = {num_experts}; every expert needs a slot (use more devices)"
        )
    old_devices = tuple(_device_positions(old_mesh, axis_name))
    new_devices = tuple(_device_positions(mesh, axis_name))
    lost = _lost_devices(lost_devices, old_devices, new_devices, axis_name)
    target = _target(new_phy2log, load, (num_layers, p_new), num_experts, d_new, policy)
    staged, source_of_new = _staged_maps(old, lost, old_devices, new_devices, n_local)
    lost_pairs = _lost_pairs(staged, num_experts)
    # The transfer moves survivors; slots of lost experts are left to the loader (-1: untouched).
    moves = target.copy()
    for layer, e in lost_pairs:
        moves[layer][target[layer] == e] = -1
    return _RecoveryPlan(
        num_experts,
        n_local,
        target,
        staged,
        moves,
        source_of_new,
        lost,
        lost_pairs,
        old_devices,
        new_devices,
    )


def _lost_devices(lost_devices, old_devices, new_devices, axis_name) -> tuple[int, ...]:
    """The old-mesh indices whose rows are gone: the ones named, and those not on the new mesh."""
    gone = {i for i, dev in enumerate(old_devices) if dev not in new_devices}
    if lost_devices is None:
        return tuple(sorted(gone))
    d_old = len(old_devices)
    for i in list(lost_devices):
        if isinstance(i, bool) or not isinstance(i, int | np.integer) or not 0 <= i < d_old:
            raise ValueError(
                f"lost_devices: expected indices in [0, {d_old}) on the old mesh's "
                f"{axis_name!r} axis, got {i!r}"
            )
    return tuple(sorted({int(i) for i in lost_devices} | gone))


def _target(new_phy2log, load, shape, num_experts, d_new, policy) -> np.ndarray:
    """The placement on the new mesh: the caller's, or the policy's for the load."""
    num_layers, p_new = shape
    if new_phy2log is not None:
        target = check_phy2log(
            new_phy2log,
            name="new_phy2log",
            num_experts=num_experts,
            num_devices=d_new,
            require_all=True,
            shape=shape,
            shape_from=f"N_local = {p_new // d_new} slots on each of the {d_new} new devices",
            traced=False,
        )
        return np.asarray(target).astype(np.int32)
    if load is None:
        load = np.ones((num_layers, num_experts), np.float32)
    from jeplb._src.policy.api import rebalance_checked
    from jeplb._src.policy.checks import check_args

    load, _, counts = check_args(
        load,
        p_new,
        *policy,
        d_new,
        None,
        load_shape=(num_layers, num_experts),
        load_shape_from="old_phy2log's layers x num_experts",
    )
    placement = rebalance_checked(np.asarray(load), *counts)[0]
    return np.asarray(placement, np.int32)


def _staged_maps(old, lost, old_devices, new_devices, n_local):
    """What each new slot holds before the transfer: its device's old rows if that device
    survived, else nothing (-1); and each new device's old index (or -1)."""
    num_layers = old.shape[0]
    staged = np.full((num_layers, n_local * len(new_devices)), -1, np.int32)
    source_of_new = []
    for j, dev in enumerate(new_devices):
        i = old_devices.index(dev) if dev in old_devices else -1
        i = i if i >= 0 and i not in lost else -1
        source_of_new.append(i)
        if i >= 0:
            staged[:, j * n_local : (j + 1) * n_local] = old[:, i * n_local : (i + 1) * n_local]
    return staged, tuple(source_of_new)


def _lost_pairs(staged: np.ndarray, num_experts: int) -> tuple[tuple[int, int], ...]:
    """(layer, expert) pairs that no surviving slot holds."""
    pairs = []
    for layer in range(staged.shape[0]):
        held = np.zeros(num_experts, bool)
        held[staged[layer][staged[layer] >= 0]] = True
        pairs += [(layer, e) for e in np.nonzero(~held)[0].tolist()]
    return tuple(pairs)


def _new_sharding(leaf: jax.Array, mesh) -> NamedSharding:
    """The leaf's sharding on the new mesh: its own spec (the slot dim on the expert axis, other
    dims as they were)."""
    return NamedSharding(mesh, leaf.sharding.spec)


def _survivors_on_new_mesh(
    leaves, plan: _RecoveryPlan, mesh, axis_name, *, unit: bool = False
) -> list[jax.Array]:
    """Weights on the new mesh: surviving shards as they are, fresh zeros for the others. A
    rank's device at position k over the other axes takes the shard of the old rank's device at
    the same position. With ``unit`` the leaves are one layer's [P, ...] and come out
    [1, P', ...] (the unit layer dim added on the new devices, so no program runs on a lost
    one)."""
    out = []
    for leaf in leaves:
        shards = {s.device: s.data for s in leaf.addressable_shards}
        if unit:
            shape = (1, plan.n_local * len(plan.new_devices), *leaf.shape[1:])
            sharding = NamedSharding(mesh, P(None, *leaf.sharding.spec))
        else:
            shape = (leaf.shape[0], plan.n_local * len(plan.new_devices), *leaf.shape[2:])
            sharding = _new_sharding(leaf, mesh)
        local = []
        for j, rank in enumerate(plan.new_devices):
            i = plan.source_of_new[j]
            for k, dev in enumerate(rank):
                if dev.process_index != jax.process_index():
                    continue
                if i >= 0:
                    data = shards[plan.old_devices[i][k]]
                    moved = jax.device_put(data, dev, may_alias=False)
                    local.append(moved[None] if unit else moved)
                else:
                    zeros = np.zeros(sharding.shard_shape(shape), leaf.dtype)
                    local.append(jax.device_put(zeros, dev))
        out.append(jax.make_array_from_single_device_arrays(shape, sharding, local))
    return out


@functools.lru_cache(maxsize=64)
def _drop_unit(sharding: NamedSharding):
    """[1, P', ...] -> [P', ...] on the new mesh (donated: the unit dim goes without a copy)."""
    return jax.jit(lambda x: x[0], out_shardings=sharding, donate_argnums=0)


def _move_survivors(plan, layers: slice, tree, mesh, axis_name, chunk_rows):
    """The transfer of the surviving rows staged on the new mesh to the plan's slots, for the
    plan's ``layers`` (the call already checked that every process agrees): (tree, report)."""
    from jeplb._src.transfer.api import rearrange_expert_weights

    with _agree.already_agreed():
        return rearrange_expert_weights(
            plan.staged[layers],
            plan.moves[layers],
            tree,
            mesh=mesh,
            axis_name=axis_name,
            chunk_rows=chunk_rows,
            num_experts=plan.num_experts,
            donate=True,
        )


def _recover_layers(layers, loader, *, mesh, axis_name, plan, chunk_rows):
    """`recover_experts` for a sequence of L per-layer pytrees: one layer at a time, each through
    the same transfer program (one compilation for every layer), nothing stacked. Returns the
    new sequence and the transfer's remote rows per layer."""

    out, remote = [], []
    for layer, tree in enumerate(layers):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        staged = _survivors_on_new_mesh(leaves, plan, mesh, axis_name, unit=True)
        moved, report = _move_survivors(
            plan, slice(layer, layer + 1), treedef.unflatten(staged), mesh, axis_name, chunk_rows
        )
        moved = treedef.flatten_up_to(moved)
        pairs = tuple((0, e) for lay, e in plan.lost_pairs if lay == layer)
        if pairs:
            one = dataclasses.replace(plan, target=plan.target[layer : layer + 1], lost_pairs=pairs)
            moved = _write_loaded(
                moved, moved, treedef, one, lambda _, e, lay=layer: loader(lay, e), mesh, axis_name
            )
        out.append(
            treedef.unflatten(
                [_drop_unit(NamedSharding(mesh, P(*x.sharding.spec[1:])))(x) for x in moved]
            )
        )
        remote.append(np.asarray(report.remote_rows))
    return out, np.concatenate(remote)


def _write_loaded(out_leaves, leaves, treedef, plan: _RecoveryPlan, loader, mesh, axis_name):
    """The lost experts: loaded once per process, written on the devices that hold their slots."""
    lost_set = set(plan.lost_pairs)
    leaf_shapes = [x.shape[2:] for x in leaves]
    leaf_dtypes = [np.dtype(x.dtype) for x in leaves]
    cache: dict[tuple[int, int], list[np.ndarray]] = {}
    new_shards = [{s.device: s.data for s in x.addressable_shards} for x in out_leaves]
    num_layers = plan.target.shape[0]
    shardings = [_new_sharding(x, mesh) for x in out_leaves]
    indices = [
        s.devices_indices_map(tuple(x.shape)) for s, x in zip(shardings, out_leaves, strict=True)
    ]
    for j, rank in enumerate(plan.new_devices):
        if all(dev.process_index != jax.process_index() for dev in rank):
            continue
        block = plan.target[:, j * plan.n_local : (j + 1) * plan.n_local]
        want = [
            (layer, r, int(block[layer, r]))
            for layer in range(num_layers)
            for r in range(plan.n_local)
            if (layer, int(block[layer, r])) in lost_set
        ]
        if not want:
            continue
        for key in sorted({(lay, e) for lay, _, e in want}):
            if key not in cache:
                cache[key] = _load_row(loader, *key, treedef, leaf_shapes, leaf_dtypes)
        for dev in rank:
            if dev.process_index != jax.process_index():
                continue
            layer_idx = jax.device_put(np.array([w[0] for w in want], np.int32), dev)
            row_idx = jax.device_put(np.array([w[1] for w in want], np.int32), dev)
            patch = _patch_program(len(want), dev.platform)
            for k in range(len(out_leaves)):
                part = indices[k][dev][2:]  # this device's share of a row's trailing dims
                rows = np.stack([cache[(lay, e)][k][part] for lay, _, e in want])
                new_shards[k][dev] = patch(
                    new_shards[k][dev], layer_idx, row_idx, jax.device_put(rows, dev)
                )
    return [
        jax.make_array_from_single_device_arrays(x.shape, sharding, list(shards.values()))
        for x, sharding, shards in zip(out_leaves, shardings, new_shards, strict=True)
    ]

"""The public whole-model transfer: `rearrange_expert_weights` and its one-layer form
`transfer_layer`, at global view (outside `jax.shard_map`).

Each call merges its options into one `TransferConfig`, checks everything once (processes agree,
options, maps, every leaf), then runs one cached jitted program (`programs.build`): a
`jax.shard_map` around the engine (`engine.move_layers`) over every layer. The program is cached
per (mesh, engine setup, leaf shardings, donation), and jit caches it per shapes, so a second
call with new maps of the same shapes compiles nothing; under an outer `jax.jit` the maps may be
traced and one compilation serves every plan.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src import checks, programs
from jeplb._src.maps import check_phy2log
from jeplb._src.transfer import agree, engine
from jeplb._src.transfer.config import TransferConfig

__all__ = ["TransferReport", "rearrange_expert_weights", "transfer_layer"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransferReport:
    """What a rearrangement did, per layer (replicated on every device).

    Attributes:
      ok: bool[L]. The layer's plan was feasible (False: a new map naming an expert that the old
        map lacks, an id below -1, or maps that differ between devices). If any layer is
        infeasible, no layer's weights are touched, so the weights keep matching the old maps;
        ``report.ok.all()`` says whether the new maps may be committed.
      wire_rows: int32[L]. Rows the busiest device moved through the rounds, padding included.
      min_rows: int32[L]. The most rows any device had to send or receive remotely: the floor.
      chunks: int32[L]. Collective chunks run (sum over rounds).
      remote_rows: int32[L]. Rows received from other devices (primaries, all devices).
      local_rows: int32[L]. Rows written from this device's own data (local copies, duplicates).
      inter_node_rows: int32[L]. Of ``remote_rows``, those sent from another node (0 without
        ``devices_per_node``); ``remote_rows - inter_node_rows`` stayed inside a node.
    """

    ok: jax.Array
    wire_rows: jax.Array
    min_rows: jax.Array
    chunks: jax.Array
    remote_rows: jax.Array
    local_rows: jax.Array
    inter_node_rows: jax.Array

    def replace(self, **changes) -> TransferReport:
        """Returns a copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)

    @property
    def wire_ratio(self) -> jax.Array:
        """float32[L]: wire_rows / min_rows (1.0 where nothing moves remotely)."""
        return jnp.where(self.min_rows > 0, self.wire_rows / jnp.maximum(self.min_rows, 1), 1.0)

    @classmethod
    def from_stats(cls, stats: engine.LayerStats) -> TransferReport:
        """The report of the engine's per-layer figures (its fields are a subset of theirs)."""
        return cls(**{f.name: getattr(stats, f.name) for f in dataclasses.fields(cls)})


_log = logging.getLogger("jeplb")


def _warn_if_infeasible(ok: Any, *, where: str) -> None:
    """Host side of the program's report: logs infeasible layers. Never raises (an exception in a
    callback would poison every output of the program, the donated weights included)."""
    try:
        bad = np.nonzero(~np.atleast_1d(np.asarray(ok, bool)))[0].tolist()
        if bad:
            _log.warning(
                "%s: layers %s had an infeasible plan (a new map naming an expert the old map "
                "lacks, an id below -1, or maps that differ between devices); the weights of "
                "every layer were left unchanged",
                where,
                bad,
            )
    except Exception:
        pass


def _warn_from_program(report: TransferReport, *, where: str) -> None:
    """Logs, from inside the program, the infeasible layers of traced maps (whose values were not
    checked before it ran); a host call on every call would cost a device-to-host round trip
    (milliseconds on a GPU), so it runs only when a layer is infeasible."""
    log = functools.partial(_warn_if_infeasible, where=where)
    jax.lax.cond(
        jnp.all(report.ok), lambda ok: None, lambda ok: jax.debug.callback(log, ok), report.ok
    )


_WARN = {
    single: functools.partial(_warn_from_program, where=where)
    for single, where in ((False, "rearrange_expert_weights"), (True, "transfer_layer"))
}


def _local(old, new, leaves, *, setup: engine.Engine, single_layer: bool):
    """shard_map body: maps int32[L, P] (one layer: [P]) replicated, leaves local. One-layer
    calls get a unit layer dim here, on the local shards, where it costs nothing and donation
    still aliases."""
    if single_layer:
        old, new, leaves = old[None], new[None], [x[None] for x in leaves]
    out, stats = engine.move_layers(
        checks.int32_ids(old),
        checks.int32_ids(new),
        leaves,
        first=0,
        count=old.shape[0],
        all_or_nothing=True,
        engine=setup,
    )
    report = TransferReport.from_stats(stats)
    if single_layer:
        out = [x[0] for x in out]
        report = jax.tree_util.tree_map(lambda a: a[0], report)
    return out, report


def _program(mesh, setup: engine.Engine, specs: tuple, donate: bool, single_layer: bool, warn):
    """The cached program (`programs.build`) ``program(old, new, leaves) -> (leaves, report)``.

    ``specs``: each leaf's given spec, None where unknown. With ``single_layer`` the maps are
    [P] and leaves [P, ...]. With ``warn`` (traced maps, whose values were not checked) an
    infeasible plan is also logged from the program."""
    return programs.build(
        _local,
        mesh=mesh,
        given=specs,
        slot_axis=0 if single_layer else setup.config.slot_axis,
        axes=setup.config.axes,
        num_replicated=2,
        options=(("setup", setup), ("single_layer", single_layer)),
        donate=bool(donate),
        check_vma=not setup.movers.interpreted,
        after=_WARN[single_layer] if warn else None,
    )


def program_for(
    mesh, *, num_leaves: int = 1, donate: bool = True, single_layer: bool = False, **options
):
    """The cached program `rearrange_expert_weights` (``single_layer``: `transfer_layer`) runs
    for ``num_leaves`` leaves whose slot dim alone is sharded, with the given `TransferConfig`
    options: ``program(old, new, leaves) -> (leaves, report)``. For benchmarks and tests that
    time or inspect the compiled program itself."""
    config = TransferConfig(**options)
    if single_layer:
        config = config.replace(layer_axis=0, slot_axis=1)
    setup = engine.Engine(
        config=config,
        num_devices=checks.axis_size(mesh, config.axis_name),
        platform=checks.platform_of(mesh),
    )
    slot_axis = 0 if single_layer else config.slot_axis
    spec = (None,) * slot_axis + (checks.expert_spec(config.axes),)
    return _program(mesh, setup, (spec,) * num_leaves, bool(donate), single_layer, False)


def _fingerprint(value: Any) -> np.ndarray:
    """A host fingerprint of any static value (its repr), for the cross-process check."""
    return np.frombuffer(hashlib.sha256(repr(value).encode()).digest(), np.uint8)


def _leaf_signature(tree: Any) -> str:
    """Shapes, dtypes and shardings of every leaf, as text."""
    parts = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(x, "sharding", None) if checks.is_concrete(x) else None
        spec = getattr(sharding, "spec", None)
        parts.append(f"{jax.tree_util.keystr(path)}:{getattr(x, 'dtype', type(x).__name__)}")
        parts.append(f"{tuple(getattr(x, 'shape', ()))}:{spec}")
    return ";".join(parts)


def _check_no_aliases(leaves: list, treedef, name: str = "expert_weights") -> None:
    """Refuses one array at two places of a donated pytree (XLA would donate it twice)."""
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(
            jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))
        )[0]
    ]
    seen: dict[int, str] = {}
    for path, x in zip(paths, leaves, strict=True):
        if id(x) in seen:
            raise ValueError(
                f"{name}{path} is the same array as {name}{seen[id(x)]}; a donated pytree must "
                f"hold each array once (pass a copy, or donate=False)"
            )
        seen[id(x)] = path


def check_movable(
    leaves, treedef, specs, mesh, setup: engine.Engine, *, single_layer: bool = False
) -> None:
    """Refuses, by path and all at once, every leaf the engine cannot move with the requested
    ``row_impl`` and ``staging_passes``, before the program is traced (``specs``: each leaf's
    given spec, None where unknown; also `jeplb.eplb_step`'s check)."""
    slot_axis = 0 if single_layer else setup.config.slot_axis
    local = checks.local_shapes(
        leaves, checks.default_specs(specs, slot_axis, setup.config.axes), mesh
    )
    if single_layer:  # the program adds a unit layer dim
        local = [jax.ShapeDtypeStruct((1, *x.shape), x.dtype) for x in local]
    problems = engine.leaf_problems(local, setup)
    checks.refuse_leaves("expert_weights", checks.leaf_paths(treedef), problems)


def run_transfer(
    old_phy2log: Any,
    new_phy2log: Any,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    config: TransferConfig,
    num_experts: int | None,
    donate: bool,
    single_layer: bool,
    expert_specs: Any = None,
) -> tuple[Any, TransferReport]:
    """Checks everything once, then runs the cached program."""
    where = "transfer_layer" if single_layer else "rearrange_expert_weights"
    # First, before any check that could fail on one process only: every process passed the same
    # maps, options and leaf shapes (a process that raised alone would leave the others hanging).
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    options |= {"num_experts": num_experts, "donate": donate, "mesh": getattr(mesh, "shape", mesh)}
    options |= {"expert_specs": expert_specs}
    agree.check_processes_agree(
        {
            "old_phy2log": old_phy2log,
            "new_phy2log": new_phy2log,
            **{name: _fingerprint(value) for name, value in options.items()},
            "expert_weights": _fingerprint(_leaf_signature(expert_weights)),
        },
        where=where,
    )
    num_devices = checks.axis_size(mesh, config.axis_name)
    if single_layer:  # the program adds a unit layer dim: [1, P, ...]
        config = config.replace(layer_axis=0, slot_axis=1)
    setup = engine.Engine(config=config, num_devices=num_devices, platform=checks.platform_of(mesh))
    ndim = 1 if single_layer else 2
    sizes = dict(ndim=ndim, num_experts=num_experts, num_devices=num_devices)
    old = check_phy2log(old_phy2log, name="old_phy2log", **sizes)
    new = check_phy2log(new_phy2log, name="new_phy2log", old=old, **sizes)
    if single_layer:
        lead, slot_axis, layer_axis = (old.shape[0],), 0, None
    else:
        lead = tuple(old.shape) if not config.slot_major else tuple(old.shape)[::-1]
        slot_axis, layer_axis = config.slot_axis, config.layer_axis
    leaves, treedef, specs = checks.weight_leaves(
        expert_weights,
        lead_shape=lead,
        slot_axis=slot_axis,
        layer_axis=layer_axis,
        mesh=mesh,
        axes=config.axes,
    )
    if donate:
        _check_no_aliases(leaves, treedef)
    specs = checks.resolve_specs(  # None where unknown (traced, Auto mesh, not declared)
        expert_specs,
        leaves,
        treedef,
        specs,
        mesh=mesh,
        slot_axis=slot_axis,
        layer_axis=layer_axis,
        axes=config.axes,
    )
    check_movable(leaves, treedef, specs, mesh, setup, single_layer=single_layer)
    traced = not (checks.is_concrete(old) and checks.is_concrete(new))
    program = _program(mesh, setup, specs, bool(donate), single_layer, traced)
    out, report = program(checks.place_map(old, mesh), checks.place_map(new, mesh), leaves)
    return treedef.unflatten(out), report


def _config(where: str, config: TransferConfig | None, options: dict) -> TransferConfig:
    """The entry point's one `TransferConfig`: ``config`` with ``options`` merged in."""
    if "return_report" in options:
        raise TypeError(
            f"{where}() got an unexpected keyword argument 'return_report': {where} now always "
            f"returns (weights, report)"
        )
    return TransferConfig.merged(config, where, **options)


def rearrange_expert_weights(
    old_phy2log: Any,
    new_phy2log: Any,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    config: TransferConfig | None = None,
    num_experts: int | None = None,
    donate: bool = True,
    expert_specs: Any = None,
    **options: Any,
) -> tuple[Any, TransferReport]:
    """Moves expert weights from the old placement to the new one, on the mesh, in one program.

    After the call every slot p of every layer l with ``new_phy2log[l, p] != -1`` holds, bit for
    bit, the weights that logical expert ``new_phy2log[l, p]`` had in a slot of the old placement.
    Slots whose expert does not change are not written; slots with -1 may hold anything. Rows cross
    devices only through ``lax.ppermute`` in rotation rounds; the plan is computed from the maps on
    every device, so the maps may be traced values: under an outer `jax.jit` one compilation
    serves every plan of the same shapes, and a second eager call compiles nothing.

    Memory: besides the (donated, updated in place) weights, a staging buffer and two collective
    chunks whose size depends on the shapes only, never on the plan: on one device none (moves
    run in place, in an order that reads every row before overwriting it); on D > 1 devices
    N_local + 2C rows of 1 / ``staging_passes`` of a row's columns, below one layer's local
    weights with the default passes.

    Args:
      old_phy2log: int[L, P] physical-to-logical map before, -1 for empty slots. Replicated (numpy,
        a list, a jax.Array on any device, or a traced value).
      new_phy2log: int[L, P] the map after.
      expert_weights: pytree of arrays with leaves [L, P, ...] (or [P, L, ...] with
        ``slot_axis=0, layer_axis=1``), any trailing shape and any dtype a MoE stack ships (bf16,
        f16, f32, fp8, int8, int4, uint4, float4_e2m1fn, ...). The slot dim is sharded over
        exactly ``axis_name``; the layer dim is not sharded; the other dims may be sharded over
        other mesh axes. Every leaf comes back with the sharding it came in with.
      mesh: the device mesh; must have ``axis_name``.
      config: the transfer's static options (`jeplb.TransferConfig`; None: the defaults).
      num_experts: E, if given, ids >= E are rejected (concrete maps only).
      donate: donate ``expert_weights`` so the update happens in place (the inputs become invalid).
      expert_specs: how the leaves are sharded, where they cannot say it themselves: a
        `jax.sharding.PartitionSpec` for every leaf, or a pytree of them mirroring
        ``expert_weights`` (None entries: not declared). Under an outer `jax.jit` on a mesh of
        Auto axes a traced leaf's sharding is unknown: where the mesh has other axes of size
        > 1, an undeclared leaf is refused (a ValueError naming it and what to pass, e.g.
        ``PartitionSpec(None, "ep")`` replicated or ``PartitionSpec(None, "ep", None, "tp")``
        for tensor-parallel experts) rather than guessed. Concrete leaves, and traced ones on
        a mesh of Explicit axes, carry their sharding: a declared spec must match it.
      **options: any `jeplb.TransferConfig` field as a shorthand, overriding ``config``'s:
        ``axis_name`` (the expert-parallel mesh axis, or a tuple of axes; D = the product of
        sizes), ``layer_axis`` / ``slot_axis`` (the leaves' layer and slot dims, 0 or 1),
        ``chunk_rows`` (C, rows per ppermute chunk), ``row_impl`` (``auto``, ``loop``,
        ``pallas`` or ``scatter``), ``staging_passes`` (column blocks staged one after the
        other; None: the fewest that keep the staging below one layer's local weights),
        ``devices_per_node`` (senders chosen on the receiver's node; must divide D).

    Returns:
      ``(weights, report)``: the rearranged weights (same structure, shapes, dtypes and
      shardings) and a `TransferReport`.

    Raises:
      ValueError, TypeError: bad maps (shape, dtype, ids, an expert the old map lacks), leaves
        of the wrong shape, dtype or sharding, or rows ``row_impl="pallas"`` cannot move in the
        blocks ``staging_passes`` cuts (every bad leaf named by its path), a mesh without the
        axis, bad options (an unknown keyword is a TypeError listing the valid ones), processes
        that passed different arguments. Raised before anything runs. With traced maps the
        value checks cannot raise: if any layer's plan is infeasible, every layer's weights are
        left as they were, ``report.ok`` says so, and a warning is logged.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jax.device_put(jnp.arange(4.0).reshape(1, 4, 1), NamedSharding(mesh, P(None, "ep")))
      >>> old = np.array([[0, 1, 2, 3]]); new = np.array([[3, 3, 0, 1]])
      >>> w, report = rearrange_expert_weights(old, new, w, mesh=mesh, chunk_rows=2)
      >>> w[0, :, 0].tolist(), bool(report.ok.all())
      ([3.0, 3.0, 0.0, 1.0], True)
    """
    return run_transfer(
        old_phy2log,
        new_phy2log,
        expert_weights,
        mesh=mesh,
        config=_config("rearrange_expert_weights", config, options),
        num_experts=num_experts,
        donate=donate,
        single_layer=False,
        expert_specs=expert_specs,
    )


def transfer_layer(
    old_phy2log: Any,
    new_phy2log: Any,
    expert_weights: Any,
    *,
    mesh: jax.sharding.Mesh,
    config: TransferConfig | None = None,
    num_experts: int | None = None,
    donate: bool = True,
    expert_specs: Any = None,
    **options: Any,
) -> tuple[Any, TransferReport]:
    """`rearrange_expert_weights` for one layer: maps int[P], leaves [P, ...] with the slot dim
    sharded over ``axis_name``. Same guarantees, arguments and errors (``layer_axis`` and
    ``slot_axis`` are ignored; ``expert_specs`` entries have the leaves' [P, ...] rank); the
    report's fields are scalars.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> w = jax.device_put(jnp.arange(3.0), NamedSharding(mesh, P("ep")))
      >>> w, report = transfer_layer(np.array([0, 1, 2]), np.array([2, 1, 1]), w, mesh=mesh)
      >>> w.tolist(), int(report.local_rows)
      ([2.0, 1.0, 1.0], 2)
    """
    return run_transfer(
        old_phy2log,
        new_phy2log,
        expert_weights,
        mesh=mesh,
        config=_config("transfer_layer", config, options),
        num_experts=num_experts,
        donate=donate,
        single_layer=True,
        expert_specs=expert_specs,
    )

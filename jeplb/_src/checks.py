"""Argument checks shared by the public functions: each names the argument, what was expected and
what arrived, and runs before anything is computed or changed."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding

from jeplb._src.transfer.layout import SUB_BYTE

__all__ = [
    "axis_size",
    "bound_axis_size",
    "check_load",
    "default_specs",
    "expert_spec",
    "int_array",
    "is_concrete",
    "is_explicit",
    "leaf_paths",
    "local_shapes",
    "platform_of",
    "refuse_leaves",
    "resolve_specs",
    "state_on_mesh",
    "weight_leaves",
]

SUPPORTED_ITEMSIZES = (1, 2, 4, 8)


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/vmap/shard_map)."""
    return not isinstance(x, jax.core.Tracer)


def axis_size(mesh: Any, axis_name: str | tuple[str, ...]) -> int:
    """D for ``axis_name`` (a mesh axis or a tuple of them: the product of their sizes) of
    ``mesh``, or a ValueError/TypeError saying what is wrong."""
    if not isinstance(axis_name, str):
        return int(np.prod([axis_size(mesh, a) for a in axis_name], dtype=np.int64))
    if not isinstance(mesh, Mesh | jax.sharding.AbstractMesh):
        raise TypeError(
            f"mesh: expected a jax.sharding.Mesh (e.g. jax.make_mesh((8,), ('{axis_name}',))), "
            f"got {type(mesh).__name__}"
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"mesh: has no axis named {axis_name!r} (axis_name); its axes are "
            f"{tuple(mesh.axis_names)}. Pass axis_name= one of them or build the mesh with it."
        )
    return int(mesh.shape[axis_name])


def bound_axis_size(axis: str | tuple[str, ...], *, arg: str, hint: str) -> int:
    """D for ``axis`` (a mesh axis or a tuple of them) bound by the enclosing `jax.shard_map`.

    Args:
      axis: the axis name(s).
      arg: the argument that named the axis, for the message (e.g. ``axis_name``).
      hint: what the caller should do instead, e.g. ``"sync_replica_grads_local runs inside
        jax.shard_map over it (use sync_replica_grads(..., mesh=...) at global view)"``.

    Raises:
      ValueError: the axis is not bound here: ``"{arg}: no mesh axis {axis!r} is bound here;
        {hint}"``.
    """
    try:
        return lax.axis_size(axis)
    except NameError as err:
        raise ValueError(f"{arg}: no mesh axis {axis!r} is bound here; {hint}") from err


def platform_of(mesh: Any = None) -> str:
    """The platform of a mesh's devices (``cpu``, ``gpu``, ``tpu``); inside `jax.shard_map`,
    where no concrete mesh is at hand, the default backend's."""
    devices = getattr(mesh, "devices", None)
    if devices is not None and np.asarray(devices).size:
        return np.asarray(devices).flat[0].platform
    return jax.default_backend()


def is_explicit(mesh: Any) -> bool:
    """The mesh has an Explicit axis (inputs must then be resharded, not just constrained)."""
    types = getattr(mesh, "axis_types", None) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def default_specs(specs: list, slot_axis: int, axes: tuple[str, ...]) -> tuple:
    """Each leaf's spec, or the slot dim over the expert axis where it cannot be known."""
    default = (None,) * slot_axis + (expert_spec(axes),)
    return tuple(default if s is None else s for s in specs)


def out_shardings(mesh: Any, specs: tuple) -> list:
    """A program's output sharding per leaf: its spec where known, else left to `like_inputs`."""
    return [
        None if s is None else NamedSharding(mesh, jax.sharding.PartitionSpec(*s)) for s in specs
    ]


def like_inputs(inputs: list, outputs: list, specs: tuple) -> list:
    """Each output leaf whose input's sharding is unknown, sharded as that input.

    A traced leaf on a mesh of Auto axes does not say how its other dims are sharded, so the
    shard_map sees it with the slot dim over the expert axis and the rest whole (XLA gathers the
    other dims on the way in). Tying each output to its input (``shard_alike``) keeps the
    caller's sharding, so a jitted step neither reshards its state nor recompiles. jax releases
    without ``shard_alike`` (0.11) leave the output as the shard_map gives it; on an Explicit
    mesh, or eagerly, the spec is known and nothing is gathered.
    """
    unknown = [i for i, s in enumerate(specs) if s is None]
    tie = _shard_alike()
    if not unknown or tie is None:
        return list(outputs)
    outputs = list(outputs)
    for i in unknown:
        outputs[i] = tie(inputs[i], outputs[i])[1]
    return outputs


def _shard_alike():
    try:
        from jax.experimental.shard_alike import shard_alike
    except ImportError:  # removed in jax 0.11
        return None
    return shard_alike


def int32_ids(x: Any) -> Any:
    """Integer ids (maps, traced or not) as int32, a value outside int32's range becoming -2 (an
    id below -1, which every plan refuses) instead of wrapping into range (an int64 2**32 + 1
    would read as 1)."""
    x = jnp.asarray(x)
    info = jnp.iinfo(x.dtype)
    low, high = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    if info.min < low or info.max > high:
        x = jnp.where((x >= low) & (x <= high), x, -2)
    return x.astype(np.int32)


def place_map(x: Any, mesh) -> Any:
    """A concrete map as int32 replicated over ``mesh`` (wherever it was); traced ones as they
    are."""
    if not is_concrete(x):
        return x
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    return jax.device_put(x.astype(np.int32), NamedSharding(mesh, jax.sharding.PartitionSpec()))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def int_array(x: Any, name: str, letters: str = "") -> Any:
    """THE check of an integer index or count array that is not a map (`jeplb.dispatch_layer`'s
    log2phy, logcnt, topk_ids and token_index, `jeplb.EplbState.record`'s counts): its type and
    dtype. Shapes and values are the caller's (they depend on the other arguments).

    Returns:
      ``x`` (a list, tuple or Python int as a numpy array), otherwise unchanged.

    Raises:
      TypeError: not an array, or not of an integer dtype, naming ``name`` (``letters``: the
        expected shape, e.g. ``"[L, E]"``).
    """
    if isinstance(x, list | tuple | int | np.integer):
        x = np.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        want = f" {letters}" if letters else ""
        raise TypeError(f"{name}: expected an integer array{want}, got {type(x).__name__}")
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {x.dtype}")
    return x


def check_load(
    load: Any,
    *,
    name: str = "load",
    shape: tuple[int, int] | None = None,
    shape_from: str = "",
    float32: bool = False,
) -> Any:
    """THE check of a load argument: a real [L, E] array of token counts (or weights) per layer
    and logical expert, as `jeplb.rebalance_experts`, the metrics and `jeplb.recover_experts`
    take it. (Counts that `jeplb.EplbState.record` adds are int32 and checked by
    `state.as_counts`.)

    Args:
      load: the load; a list or tuple is converted with numpy.
      name: the argument's name, used in every message.
      shape: the (L, E) the other arguments imply; ``shape_from`` says which.
      float32: concrete floating loads must also fit float32 (the metrics compute in it).

    Returns:
      ``load`` (a list or tuple as a numpy array), otherwise unchanged.

    Raises:
      TypeError: not an array, or not of a real (integer or floating) dtype.
      ValueError: not [L, E] with L, E >= 1, not ``shape``; when concrete, an entry that is not
        finite, negative or (``float32``) past float32's range, naming the first one.
    """
    if isinstance(load, list | tuple):
        load = np.asarray(load)
    if not hasattr(load, "shape") or not hasattr(load, "dtype"):
        raise TypeError(f"{name}: expected an array [L, E], got {type(load).__name__}")
    dtype = np.dtype(load.dtype)
    # jnp.issubdtype: numpy does not count ml_dtypes' floats (bfloat16, fp8) as floating.
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{name}: expected a real (integer or floating) dtype, got {dtype}")
    if len(load.shape) != 2:
        raise ValueError(
            f"{name}: expected a 2-D array [L, E] (layers x logical experts), got shape "
            f"{tuple(load.shape)}"
        )
    if 0 in load.shape:
        raise ValueError(
            f"{name}: expected at least one layer and one expert, got shape {tuple(load.shape)}"
        )
    if shape is not None and tuple(load.shape) != tuple(shape):
        raise ValueError(
            f"{name}: expected shape [L, E] = {tuple(shape)} ({shape_from}), got "
            f"{tuple(load.shape)}"
        )
    if is_concrete(load):
        _check_load_values(np.asarray(load), name, float32)
    return load


def _check_load_values(v: np.ndarray, name: str, float32: bool) -> None:
    floating = jnp.issubdtype(v.dtype, jnp.floating)
    bad = ~np.isfinite(v) | (v < 0) if floating else v < 0
    if bad.any():
        at = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(f"{name}{at} = {v[tuple(at)]}: expected finite loads >= 0 (token counts)")
    if float32 and floating and (v > _FLOAT32_MAX).any():
        at = [int(i) for i in np.argwhere(v > _FLOAT32_MAX)[0]]
        raise ValueError(
            f"{name}{at} = {v[tuple(at)]}: expected loads within float32's range (<= "
            f"{_FLOAT32_MAX:.8g}; the device loads are float32)"
        )


def expert_spec(axes: tuple[str, ...]) -> Any:
    """The PartitionSpec entry of the slot dim: the expert axis, or the tuple of them."""
    return axes[0] if len(axes) == 1 else tuple(axes)


def _spec_of(leaf: Any, ndim: int) -> tuple | None:
    """A leaf's PartitionSpec as a tuple of ``ndim`` entries, or None when it is not known (a
    traced value on a mesh of Auto axes)."""
    sharding = getattr(leaf, "sharding", None)
    if not is_concrete(leaf):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not isinstance(sharding, NamedSharding) and spec is None:
        return None
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    if not is_concrete(leaf) and all(e is None for e in entries):
        return None  # Auto axes: the tracer does not say how the value is sharded
    return tuple(tuple(e) if isinstance(e, list) else e for e in entries)


def _names(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _leaf_problem(
    leaf, *, lead, slot_axis, layer_axis, mesh, axes, local=False
) -> tuple[type, str] | None:
    """What is wrong with one weight leaf, or None."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return TypeError, f"is a {type(leaf).__name__}, expected a jax.Array"
    dt = np.dtype(leaf.dtype)
    sub_byte = dt.name in SUB_BYTE
    if not sub_byte and (
        dt.itemsize not in SUPPORTED_ITEMSIZES or dt.kind in "bcOUS" or _bits(dt) < 8
    ):
        return TypeError, (
            f"has dtype {dt}, which is not moved; expected a real or integer dtype of 1, 2, 4 or "
            f"8 bytes or one of {' / '.join(SUB_BYTE)} (bool and complex: view them as integers)"
        )
    dims = sorted((slot_axis, layer_axis) if layer_axis is not None else (slot_axis,))
    got = tuple(leaf.shape[d] for d in dims) if len(leaf.shape) > dims[-1] else None
    if got != tuple(lead):
        want = " x ".join(
            f"{n} = {v}" for n, v in zip(_lead_letters(slot_axis, layer_axis), lead, strict=False)
        )
        hint = _lead_hint(tuple(leaf.shape), lead, slot_axis, layer_axis, mesh, axes)
        return ValueError, (f"has shape {tuple(leaf.shape)}, expected leading dims {want}{hint}")
    if local:
        return None
    expected = [None] * len(leaf.shape)
    expected[slot_axis] = expert_spec(axes)
    fix = f"PartitionSpec{tuple(expected)}"
    if is_concrete(leaf) and not isinstance(leaf, jax.Array):
        return TypeError, (
            f"is a {type(leaf).__name__}; expected a jax.Array sharded over the mesh, e.g. "
            f"jax.device_put(x, NamedSharding(mesh, {fix}))"
        )
    spec = _spec_of(leaf, len(leaf.shape))
    if spec is None:
        return None if not is_concrete(leaf) else (ValueError, f"is not NamedSharding; use {fix}")
    problem = _spec_problem(
        spec, _given_spec(leaf), slot_axis=slot_axis, layer_axis=layer_axis, axes=axes, fix=fix
    )
    if problem is not None:
        return ValueError, f"is sharded {problem}"
    sharding = getattr(leaf, "sharding", None)
    if is_concrete(leaf) and isinstance(mesh, Mesh) and not _same_mesh(sharding.mesh, mesh):
        return ValueError, (
            f"lives on a mesh {dict(sharding.mesh.shape)} of other devices or axes than the mesh "
            f"argument's {dict(mesh.shape)}; pass the mesh the weights are sharded over"
        )
    return None


def _bits(dt: np.dtype) -> int:
    """Bits per element (numpy says 1 byte for sub-byte types such as float6_e2m3fn or int1)."""
    for info in (jnp.finfo, jnp.iinfo):
        try:
            return int(info(dt).bits)
        except (TypeError, ValueError):
            pass
    return 8 * dt.itemsize


def _spec_problem(
    spec: tuple, given: tuple, *, slot_axis: int, layer_axis: int | None, axes, fix: str
) -> str | None:
    """What is wrong with a weight leaf's PartitionSpec entries ``spec`` (padded to the leaf's
    ndim; ``given``: as written, for the message), or None."""
    shown = _show(given)
    if _names(spec[slot_axis]) != tuple(axes):
        hint = _slot_dim_hint(spec, slot_axis, layer_axis, axes)
        return (
            f"{shown}; its slot dim {slot_axis} must be sharded over exactly "
            f"{expert_spec(axes)!r} (other dims may use other mesh axes), e.g. {fix}{hint}"
        )
    if layer_axis is not None and spec[layer_axis] is not None:
        return f"{shown}; its layer dim {layer_axis} must not be sharded"
    clash = [e for d, e in enumerate(spec) if d != slot_axis and set(_names(e)) & set(axes)]
    if clash:
        return f"{shown}; only the slot dim may use {axes}"
    return None


def _show(entries: tuple) -> str:
    return f"PartitionSpec{tuple(entries)}".replace(",)", ")")


def _slot_dim_hint(spec: tuple, slot_axis: int, layer_axis: int | None, axes) -> str:
    """The layout keywords that would make ``spec`` right, when the expert axis sits on the
    other lead dim (a slot-major stack given as layer-major, or the reverse)."""
    if layer_axis is None or _names(spec[layer_axis]) != tuple(axes):
        return ""
    return f": the expert axis is on dim {layer_axis}; {_layout_keywords(layer_axis)}"


def _layout_keywords(slot_axis: int) -> str:
    """The keywords of the layout whose slot dim is ``slot_axis``."""
    if slot_axis == 0:
        return "for slot-major stacks [P, L, ...] pass layer_axis=1, slot_axis=0"
    return "for layer-major stacks [L, P, ...] pass layer_axis=0, slot_axis=1 (the default)"


def _lead_hint(shape: tuple, lead: tuple, slot_axis, layer_axis, mesh, axes) -> str:
    """The keywords or entry point that would take a leaf whose lead dims do not match."""
    swapped = len(lead) == 2 and lead[0] != lead[1] and shape[:2] == tuple(lead)[::-1]
    if layer_axis is not None and swapped:
        return f"; got them swapped: {_layout_keywords(layer_axis)}"
    if layer_axis is not None and shape[:1] == (lead[slot_axis],):
        return "; a leaf of one layer [P, ...] moves with transfer_layer"
    if layer_axis is None and len(shape) >= 2 and lead[0] in shape[:2]:
        return "; stacked leaves [L, P, ...] move with rearrange_expert_weights"
    d = axis_size(mesh, axes) if isinstance(mesh, Mesh | jax.sharding.AbstractMesh) else 0
    p = lead[slot_axis if layer_axis is not None else 0]
    if d > 1 and p % d == 0 and len(shape) > slot_axis and shape[slot_axis] == p // d:
        return (
            f"; {p // d} = P / {d} is one device's share (N_local): at global view pass the "
            f"global array, sharded over the mesh"
        )
    return ""


def _lead_letters(slot_axis: int, layer_axis: int | None) -> tuple[str, ...]:
    if layer_axis is None:
        return ("P",)
    return ("P", "L") if slot_axis < layer_axis else ("L", "P")


def _same_mesh(a: Any, b: Mesh) -> bool:
    if tuple(a.axis_names) != tuple(b.axis_names) or dict(a.shape) != dict(b.shape):
        return False
    devices = getattr(a, "devices", None)
    return devices is None or bool((np.asarray(devices) == np.asarray(b.devices)).all())


def weight_leaves(
    tree: Any,
    *,
    lead_shape: tuple[int, ...],
    slot_axis: int,
    layer_axis: int | None,
    mesh: Any,
    axes: tuple[str, ...],
    name: str = "expert_weights",
    local: bool = False,
) -> tuple[list[Any], Any, list[tuple | None]]:
    """Checks every weight leaf at once and returns ``(leaves, treedef, specs)``.

    ``lead_shape`` is the sizes of the layer and slot dims in the order they stand in a leaf
    ((L, P) or (P, L); (P,) for one layer). Each spec is the leaf's PartitionSpec as a tuple, or
    None when it cannot be known (traced on Auto axes). With ``local`` the leaves are one
    device's shards inside `jax.shard_map` (N_local instead of P; shardings are not checked).
    Raises one error naming every bad leaf by its pytree path.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ValueError(f"{name}: expected a pytree with at least one array leaf, got none")
    problems = []
    for path, leaf in flat:
        problem = _leaf_problem(
            leaf,
            lead=lead_shape,
            slot_axis=slot_axis,
            layer_axis=layer_axis,
            mesh=mesh,
            axes=axes,
            local=local,
        )
        if problem is not None:
            problems.append((problem[0], f"{name}{jax.tree_util.keystr(path)} {problem[1]}"))
    _raise(problems)
    leaves = [leaf for _, leaf in flat]
    return leaves, treedef, [None if local else _given_spec(x) for x in leaves]


def state_on_mesh(state: Any, mesh: Any, name: str = "state") -> None:
    """Refuses a state whose concrete arrays are committed to other devices than ``mesh``'s (in
    the mesh's order), before jit fails with "incompatible devices" from inside the program.
    Uncommitted arrays (``EplbState.create``'s) and traced ones go anywhere."""
    if not isinstance(mesh, Mesh):
        return
    want = list(np.asarray(mesh.devices).flat)
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(x, jax.Array) or not is_concrete(x) or not x.committed:
            continue
        sharding = x.sharding
        if isinstance(sharding, NamedSharding):
            got = list(np.asarray(sharding.mesh.devices).flat)
        else:
            got = sorted(sharding.device_set, key=lambda d: d.id)
        if got != want:
            raise ValueError(
                f"{name}, mesh: {name}{jax.tree_util.keystr(path)} is on devices "
                f"{[d.id for d in got]}, but mesh has devices {[d.id for d in want]}; put the "
                f"{name} on the mesh (jax.device_put({name}, NamedSharding(mesh, "
                f"PartitionSpec()))) or pass the mesh it is on"
            )


def _raise(problems: list[tuple[type, str]]) -> None:
    """One error listing every ``(kind, text)`` problem (TypeError when all are); none: nothing."""
    if problems:
        kind = TypeError if all(k is TypeError for k, _ in problems) else ValueError
        head = "" if len(problems) == 1 else f"{len(problems)} leaves cannot be moved:\n  "
        raise kind(head + "\n  ".join(text for _, text in problems))


def leaf_paths(treedef: Any) -> list[str]:
    """The `jax.tree_util.keystr` path of each leaf of ``treedef``, in flattening order."""
    tree = jax.tree_util.tree_unflatten(treedef, list(range(treedef.num_leaves)))
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def local_shapes(leaves: list, specs: tuple, mesh: Any) -> list[jax.ShapeDtypeStruct]:
    """Each leaf's shard on one device of ``mesh``, sharded as ``specs`` (PartitionSpec entries
    per leaf, as `default_specs` gives them): what a `jax.shard_map` body sees."""
    return [
        jax.ShapeDtypeStruct(
            NamedSharding(mesh, jax.sharding.PartitionSpec(*s)).shard_shape(tuple(x.shape)),
            x.dtype,
        )
        for x, s in zip(leaves, specs, strict=True)
    ]


def refuse_leaves(name: str, paths: list[str], problems: list[tuple[int, str]]) -> None:
    """Raises one ValueError naming every leaf of ``problems`` (``(index, text)``, as the transfer
    engine's `leaf_problems` gives them) by its path, e.g. ``expert_weights['w13']``; nothing when
    there are none."""
    _raise([(ValueError, f"{name}{paths[i]}: {text}") for i, text in problems])


def _given_spec(leaf: Any) -> tuple | None:
    """The leaf's PartitionSpec entries as given (not padded), or None when unknown."""
    if _spec_of(leaf, len(leaf.shape)) is None:
        return None
    sharding = leaf.sharding if is_concrete(leaf) else jax.typeof(leaf).sharding
    return tuple(tuple(e) if isinstance(e, list) else e for e in sharding.spec)


def resolve_specs(
    expert_specs: Any,
    leaves: list,
    treedef: Any,
    given: list,
    *,
    mesh: Any,
    slot_axis: int,
    layer_axis: int | None,
    axes: tuple[str, ...],
    name: str = "expert_weights",
) -> tuple:
    """Each leaf's PartitionSpec entries for the program: as the leaf says (``given``), else as
    the caller declared (``expert_specs``), else None (the default spec is assumed).

    ``expert_specs`` is None, one PartitionSpec (or NamedSharding) for every leaf, or a pytree
    of them mirroring the leaves (None entries: not declared). Under an outer `jax.jit` on a
    mesh of Auto axes a traced leaf does not say how its other dims are sharded; the declared
    spec says it, so the program runs manual over every axis the leaf uses and gathers nothing.
    Where neither says and the mesh has other axes of size > 1, a ValueError names the leaves.

    Raises:
      TypeError: ``expert_specs`` entries that are not PartitionSpecs or NamedShardings.
      ValueError: a structure that does not mirror the leaves, a declared spec the layout
        refuses (slot dim not exactly on ``axes``, layer dim sharded, an axis the mesh lacks),
        or one that differs from a concrete leaf's own sharding; every bad leaf named.
    """
    declared = _declared(expert_specs, treedef, name)
    paths = leaf_paths(treedef)
    problems = []
    for i, (leaf, spec) in enumerate(zip(leaves, declared, strict=True)):
        if spec is None:
            continue
        where = f"expert_specs{paths[i]}"
        why = _declared_problem(spec, leaf, mesh, slot_axis, layer_axis, axes)
        if why is None and given[i] is not None and _padded(given[i], leaf) != _padded(spec, leaf):
            why = (
                f"is {_show(spec)}, but {name}{paths[i]} is sharded {_show(given[i])}; declare "
                f"the sharding the leaf has"
            )
        if why is not None:
            problems.append((ValueError, f"{where} {why}"))
    _raise(problems)
    out = tuple(g if g is not None else d for g, d in zip(given, declared, strict=True))
    _refuse_unknown([paths[i] for i, s in enumerate(out) if s is None], mesh, axes, name)
    return out


def _declared(expert_specs: Any, treedef: Any, name: str) -> list:
    """``expert_specs`` as one entry tuple (or None) per leaf."""
    n = treedef.num_leaves
    if expert_specs is None:
        return [None] * n
    if isinstance(expert_specs, jax.sharding.PartitionSpec | NamedSharding):
        return [_entries(expert_specs)] * n
    try:
        flat = treedef.flatten_up_to(expert_specs)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"expert_specs: expected a PartitionSpec or a pytree of them with {name}'s "
            f"structure {treedef}: {err}"
        ) from err
    bad = [
        f"expert_specs{p} is a {type(x).__name__}"
        for p, x in zip(leaf_paths(treedef), flat, strict=True)
        if x is not None and not isinstance(x, jax.sharding.PartitionSpec | NamedSharding)
    ]
    if bad:
        raise TypeError("; ".join(bad) + ", expected a jax.sharding.PartitionSpec (or None)")
    return [None if x is None else _entries(x) for x in flat]


def _entries(spec: Any) -> tuple:
    spec = spec.spec if isinstance(spec, NamedSharding) else spec
    return tuple(tuple(e) if isinstance(e, list) else e for e in spec)


def _padded(entries: tuple, leaf: Any) -> tuple:
    return tuple(entries) + (None,) * (len(leaf.shape) - len(entries))


def _declared_problem(spec, leaf, mesh, slot_axis, layer_axis, axes) -> str | None:
    if len(spec) > len(leaf.shape):
        return f"is {_show(spec)}: more entries than the leaf's {len(leaf.shape)} dims"
    names = getattr(mesh, "axis_names", ())
    unknown = [a for e in spec for a in _names(e) if a not in names]
    if unknown:
        return f"is {_show(spec)}: the mesh has no axis {unknown[0]!r} (its axes: {names})"
    padded = _padded(spec, leaf)
    expected = [None] * len(leaf.shape)
    expected[slot_axis] = expert_spec(axes)
    fix = f"PartitionSpec{tuple(expected)}"
    problem = _spec_problem(
        padded, spec, slot_axis=slot_axis, layer_axis=layer_axis, axes=axes, fix=fix
    )
    return None if problem is None else f"is {problem}"


def _refuse_unknown(paths: list[str], mesh: Any, axes: tuple[str, ...], name: str) -> None:
    """Refuses leaves whose sharding is unknown (traced on Auto axes, not declared) where the mesh
    has other axes of size > 1: over those a leaf may be sharded (tensor-parallel or
    fully-sharded experts) or replicated (data-parallel), and a wrong guess makes the program
    all-gather the leaf first (a temporary of the whole leaf)."""
    shape = dict(getattr(mesh, "shape", {}))
    others = sorted(a for a, n in shape.items() if a not in axes and n > 1)
    if not paths or not others:
        return
    shown = ", ".join(f"{name}{p}" for p in paths)
    slot = expert_spec(axes)
    raise ValueError(
        f"{shown}: traced on a mesh of Auto axes, so how their dims are sharded over "
        f"{others} is unknown (sharded, as tensor-parallel experts are, or replicated, as over a "
        f"data-parallel axis). Declare it with expert_specs= (one PartitionSpec for every leaf or "
        f"a pytree of them), e.g. PartitionSpec(None, {slot!r}) for leaves [L, P, ...] replicated "
        f"over {others} or PartitionSpec(None, {slot!r}, None, {others[0]!r}) for a last dim sharded "
        f"over {others[0]!r}; or use a mesh of Explicit axes"
    )

"""Argument checks shared by the public functions: each names the argument, what was expected and
what arrived, and runs before anything is computed or changed."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

__all__ = [
    "axis_size",
    "check_maps",
    "check_weight_leaves",
    "is_concrete",
]

SUPPORTED_ITEMSIZES = (1, 2, 4, 8)


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/vmap/shard_map)."""
    return not isinstance(x, jax.core.Tracer)


def axis_size(mesh: Any, axis_name: str) -> int:
    """D for ``axis_name`` of ``mesh``, or a ValueError/TypeError saying what is wrong."""
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


def _int_map(x: Any, name: str) -> Any:
    if isinstance(x, list | tuple):
        x = np.asarray(x)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an integer array, got {type(x).__name__}")
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{name}: expected an integer dtype (int32), got {x.dtype}")
    return x


def check_maps(
    old: Any,
    new: Any,
    *,
    num_devices: int,
    ndim: int,
    num_experts: int | None = None,
    old_name: str = "old_phy2log",
    new_name: str = "new_phy2log",
) -> None:
    """Checks a pair of physical-to-logical maps.

    Shapes must be ``[L, P]`` (``ndim == 2``) or ``[P]`` (``ndim == 1``), equal, integer, with P
    divisible by ``num_devices``. When the values are concrete: ids >= -1, ids < num_experts (if
    given), and every expert the new map names is held by some slot of the old map in that layer.
    """
    old = _int_map(old, old_name)
    new = _int_map(new, new_name)
    want = "[L, P]" if ndim == 2 else "[P]"
    for name, m in ((old_name, old), (new_name, new)):
        if m.ndim != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D map {want}, got shape {tuple(m.shape)}")
    if tuple(old.shape) != tuple(new.shape):
        raise ValueError(
            f"{new_name}: expected the shape of {old_name} {tuple(old.shape)}, "
            f"got {tuple(new.shape)}"
        )
    p_total = old.shape[-1]
    if p_total % num_devices:
        raise ValueError(
            f"{old_name}: P = {p_total} slots is not divisible by the {num_devices} devices of "
            f"the mesh axis; every device must hold P // D slots"
        )
    if not (is_concrete(old) and is_concrete(new)):
        return
    o = np.asarray(old).reshape(-1, p_total)
    n = np.asarray(new).reshape(-1, p_total)
    for name, m in ((old_name, o), (new_name, n)):
        bad = np.argwhere(m < -1)
        if bad.size:
            idx = _where(bad[0], ndim)
            raise ValueError(
                f"{name}{idx} = {m[tuple(bad[0])]}: expected an expert id >= 0 or -1 (empty slot)"
            )
        if num_experts is not None:
            bad = np.argwhere(m >= num_experts)
            if bad.size:
                idx = _where(bad[0], ndim)
                raise ValueError(
                    f"{name}{idx} = {m[tuple(bad[0])]}: expected an expert id below "
                    f"num_experts = {num_experts}"
                )
    for layer in range(o.shape[0]):
        present = np.isin(n[layer], o[layer]) | (n[layer] == -1)
        if not present.all():
            p = int(np.argmin(present))
            e = int(n[layer, p])
            lay = f"[{layer}]" if ndim == 2 else ""
            raise ValueError(
                f"{new_name}{_where(np.array([layer, p]), ndim)} = {e}, but no slot of "
                f"{old_name}{lay} holds expert {e}: every expert of the new placement must have a "
                f"copy in the old one (restore lost experts from their source first)"
            )


def _where(idx: np.ndarray, ndim: int) -> str:
    idx = [int(i) for i in idx]
    return "[" + ", ".join(map(str, idx[-ndim:])) + "]"


def check_weight_leaves(
    leaves: list[Any],
    *,
    lead_shape: tuple[int, ...],
    slot_dim: int,
    mesh: Any,
    axis_name: str,
    name: str = "expert_weights",
) -> None:
    """Checks that each leaf is an array ``[*lead_shape, ...]`` sharded on ``axis_name`` along
    ``slot_dim`` (only checked for concrete `jax.Array` leaves)."""
    if not leaves:
        raise ValueError(f"{name}: expected a pytree with at least one array leaf, got none")
    want = "[" + ", ".join(("L", "P")[-len(lead_shape) :]) + ", ...]"
    for i, leaf in enumerate(leaves):
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{name}: leaf {i} is a {type(leaf).__name__}, expected a jax.Array")
        kind = np.dtype(leaf.dtype).kind
        if np.dtype(leaf.dtype).itemsize not in SUPPORTED_ITEMSIZES or kind in "bcOUS":
            raise TypeError(
                f"{name}: leaf {i} has unsupported dtype {leaf.dtype}; expected a real or integer "
                f"dtype of 1, 2, 4 or 8 bytes (bf16, f32, fp8, int8, ...; bool and complex are "
                f"not moved: view them as integers)"
            )
        if tuple(leaf.shape[: len(lead_shape)]) != tuple(lead_shape):
            raise ValueError(
                f"{name}: leaf {i} has shape {tuple(leaf.shape)}, expected leading dims {want} = "
                f"{tuple(lead_shape)} (the maps' shape)"
            )
        if not is_concrete(leaf):
            continue
        if isinstance(leaf, np.ndarray) or not isinstance(leaf, jax.Array):
            raise TypeError(
                f"{name}: leaf {i} is a {type(leaf).__name__}; expected a jax.Array sharded "
                f"PartitionSpec({'None, ' * slot_dim}{axis_name!r}) over the mesh, e.g. "
                f"jax.device_put(x, NamedSharding(mesh, PartitionSpec({'None, ' * slot_dim}"
                f"{axis_name!r})))"
            )
        sharding = leaf.sharding
        spec = sharding.spec if isinstance(sharding, NamedSharding) else None
        entry = spec[slot_dim] if spec is not None and len(spec) > slot_dim else None
        names = entry if isinstance(entry, tuple) else (entry,)
        others = [e for j, e in enumerate(spec or ()) if j != slot_dim and e is not None]
        if spec is None or names != (axis_name,) or others:
            got = spec if spec is not None else type(sharding).__name__
            raise ValueError(
                f"{name}: leaf {i} is sharded {got}; expected PartitionSpec("
                f"{'None, ' * slot_dim}{axis_name!r}) on the mesh (slot axis over {axis_name!r}, "
                f"everything else replicated)"
            )
        if sharding.mesh.shape != mesh.shape or sharding.mesh.axis_names != mesh.axis_names:
            raise ValueError(
                f"{name}: leaf {i} lives on a mesh {dict(sharding.mesh.shape)}, expected the "
                f"mesh argument's {dict(mesh.shape)}"
            )

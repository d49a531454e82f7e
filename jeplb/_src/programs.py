"""The one builder of the library's cached programs at global view: a `jax.jit` around a
`jax.shard_map` whose body runs on each device's local shards.

Every such entry point (`jeplb.rearrange_expert_weights`, `jeplb.transfer_layer`,
`jeplb.sync_replica_grads`, ...) takes replicated values (maps) and a list of leaves sharded as
the caller keeps them. `build` makes its program once per (body, static options, mesh, leaf
specs, donation) and jit caches it per shapes, so a second eager call compiles nothing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src import checks

__all__ = ["build"]


@functools.lru_cache(maxsize=256)
def build(
    local: Callable,
    *,
    mesh: jax.sharding.Mesh,
    given: tuple,
    slot_axis: int,
    axes: tuple[str, ...],
    num_replicated: int,
    options: tuple = (),
    donate: bool = False,
    check_vma: bool = True,
    after: Callable | None = None,
    name: str | None = None,
) -> Callable:
    """The program ``program(*replicated, leaves) -> (leaves, extra)``.

    Args:
      local: the shard_map body, ``local(*replicated, leaves, **options) -> (leaves, extra)``
        on each device's local leaves; a module-level function (it is part of the cache key).
      mesh: the mesh.
      given: each leaf's PartitionSpec entries (`checks.resolve_specs`: the leaf's own, else
        the caller's ``expert_specs``), None where unknown (traced leaves on an Auto mesh, not
        declared: the slot dim over ``axes``, the rest whole, and the output tied to the
        input's sharding, `checks.like_inputs`).
      slot_axis: the leaves' slot dim (for the default spec).
      axes: the expert axes the slot dim is sharded over.
      num_replicated: how many replicated arguments come before the leaves (resharded to
        replicated on an Explicit mesh).
      options: ``(name, value)`` pairs passed to ``local`` as keywords (hashable).
      donate: donate the leaves (the update happens in place).
      check_vma: shard_map's type check (off where a Pallas interpreter runs inside).
      after: ``after(extra)`` run at global view after the body (e.g. a host warning), or None.
      name: a `jax.named_scope` around the body and the output ties (profiles), or None.

    Returns:
      The jitted program; every leaf comes back with the sharding it came in with (explicit
      output shardings, also on a one-device mesh), ``extra`` replicated.
    """
    inner = [P(*s) for s in checks.default_specs(given, slot_axis, axes)]
    mapped = jax.shard_map(
        functools.partial(local, **dict(options)),
        mesh=mesh,
        in_specs=(*(P(),) * num_replicated, inner),
        out_specs=(inner, P()),
        check_vma=check_vma,
    )
    replicated = NamedSharding(mesh, P())

    def run(*args: Any):
        *maps, leaves = args
        if checks.is_explicit(mesh):
            maps = jax.tree_util.tree_map(lambda x: jax.sharding.reshard(x, replicated), maps)
        with jax.named_scope(name) if name else contextlib.nullcontext():
            out, extra = mapped(*maps, leaves)
            out = checks.like_inputs(leaves, out, given)
        if after is not None:
            after(extra)
        return out, extra

    donated = (num_replicated,) if donate else ()
    out_shardings = (checks.out_shardings(mesh, given), replicated)
    return jax.jit(run, donate_argnums=donated, out_shardings=out_shardings)

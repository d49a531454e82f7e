"""Router hook: map each token's logical experts to physical slots, and count the load.

Call it once per MoE layer, between the router's top-k and the expert computation. Two forms:

* `dispatch(state, layer, topk_ids)`: slices the layer's maps from an `EplbState` and returns the
  state (first) with the counts added to ``state.pass_load[layer]`` (Python loops over layers,
  Flax NNX modules).
* `dispatch_layer(log2phy, logcnt, topk_ids)`: takes one layer's map slices and returns the counts
  ([E]); inside a `jax.lax.scan` over layers, scan the slices and stack the counts into [L, E], then
  add them with `EplbState.record`.

Counted once per step: ``dispatch(..., record=False)`` only maps; the model keeps each layer's
ids (stacked [L, T, K], or a scan's outputs) and `EplbState.record_ids` counts every layer at once
after the forward. Same ``pass_load``; on a GPU the per-layer counting kernels go (see
docs/performance.md). `dispatch_kept(state, layer, topk_ids, kept)` writes the layer's slots
straight into an int32 [L, T, K] array of every layer's slots (carried through a scan) and reads
them back from it: the map and the keeping are one operation a layer on a GPU;
`EplbState.record_slots` counts the kept slots after the forward.

Replica choice (``replica_choice``, default the state's ``config.dispatch.replica_choice``):

* ``"hash"`` (vLLM's semantics, made hash-based): token t's k-th choice of expert e goes to
  replica ``h(t * K + k) % logcnt[e]`` of e, where h is a 32-bit integer mix of the token's index
  (``token_index``, default its position). Deterministic, even over the replicas in expectation,
  and unlike a plain modulo it does not tie a top-k rank to one replica when K and the replica
  count share a factor.
* ``"local"``: a replica on the token's own device when the expert has one there (several:
  spread by the hash), else the hash choice over all replicas. ``prefer_local=True`` is its
  former spelling (deprecated).
* ``"balanced"``: each batch's pairs of an expert are split floor / ceil over its replicas: the
  pair's rank among the batch's pairs of its expert (positions in flat order; on the CPU one sort
  of the ids packed with their positions, on a GPU two Pallas kernels, `balanced_kernel`; no
  [T K, E] one-hot) picks replica ``(rank + e) % logcnt[e]`` of expert e: the expert's pairs go
  round its replicas, each expert starting at another replica so that the remainders of
  different experts fall on different replicas. Pairs that are not counted (``valid`` False)
  are ranked among themselves. Inside `jax.shard_map` with the tokens split over devices pass
  ``token_axes`` (the mesh axes the tokens are split over, devices holding consecutive blocks in
  axis order): ranks are then global (one all_gather of [2 E + 1] counts), and every pair gets
  the slot it gets at global view, whatever the device count. Without it each device balances
  its own tokens.

Counting: ``counts[e]`` is the number of (token, k) pairs with ``topk_ids == e`` among tokens with
``valid`` set. Ids outside [0, E): when the ids are concrete a ValueError names the first one;
under jit (traced ids) they map to physical id -1 and are not counted. Masked tokens (``valid``
False) are mapped like any other token (so downstream indexing stays in range) but not counted.

Layer index (`dispatch`): a concrete one outside [0, L) raises a ValueError naming ``layer``
(negative indices are not wrapped); a traced one outside [0, L) maps every token to -1 and counts
nothing. The counts are added through `EplbState.record`, so they never wrap: an int32 sum past
2^31 - 1 raises eagerly and saturates at 2^31 - 1 under jit.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jeplb._src import balanced_kernel, checks
from jeplb._src import counts as counts_lib
from jeplb._src.config import REPLICA_CHOICES
from jeplb._src.state import EplbState, check_layer
from jeplb._src.transfer import agree
from jeplb._src.transfer import rows as rows_lib
from jeplb._src.validate import check_bool

__all__ = ["dispatch", "dispatch_kept", "dispatch_layer"]


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xor-shift-multiply): every input bit affects every output bit."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


# Batches of at most this many (token, k) pairs (a decode step's 4096 x 8 and prefills up to 16K
# tokens at top-8) take the hash of their positions as a constant made on the host, once per
# shape (at most 512 KiB each): the map reads it instead of mixing every position again in every
# layer. Measured while the map was fused into the expert read (where XLA recomputed the hash
# per element read): 6.83 us a layer against 8.19 on an H100; the step measured with the slots
# made once (`_dispatch_checked`) holds the constant too.
_HASH_CONSTANT_MAX = 1 << 17


def _pair_hash(batch: tuple[int, ...], k: int, token_index) -> jax.Array:
    """uint32[*batch, k]: ``_mix32(t * k + j)`` of each pair's token index t (its flat position
    without ``token_index``) and rank j."""
    n = int(np.prod(batch))
    if token_index is None and n * k <= _HASH_CONSTANT_MAX:
        return jnp.asarray(_position_hash(n, k).reshape(*batch, k))
    if token_index is None:
        tok = jnp.arange(n, dtype=jnp.uint32).reshape(batch)
    else:
        tok = jnp.asarray(token_index).astype(jnp.uint32)
    return _mix32(tok[..., None] * jnp.uint32(k) + jnp.arange(k, dtype=jnp.uint32))


@functools.lru_cache(maxsize=32)
def _position_hash(n: int, k: int) -> np.ndarray:
    """uint32[n, k] `_mix32` of every position t * k + j, computed on the host (read-only)."""
    pos = np.arange(n * k, dtype=np.uint64).reshape(n, k)
    out = agree._mix32_np(pos).astype(np.uint32)
    out.setflags(write=False)
    return out


def _local_tables(log2phy: jax.Array, logcnt: jax.Array, num_devices: int, n_local: int):
    """Per (expert, device): its replicas on that device, packed ([E, D, Wl], -1 pads), and count."""
    num_experts, r_max = log2phy.shape
    width = min(r_max, n_local)
    live = (jnp.arange(r_max)[None, :] < logcnt[:, None]) & (log2phy >= 0)
    dev = jnp.where(live, log2phy // n_local, num_devices)  # [E, R]; dead: out of range
    same = (dev[:, :, None] == dev[:, None, :]) & live[:, :, None] & live[:, None, :]
    rank = jnp.sum(same & (jnp.arange(r_max)[None, :] < jnp.arange(r_max)[:, None])[None], -1)
    e_idx = jnp.broadcast_to(jnp.arange(num_experts)[:, None], dev.shape)
    table = (
        jnp.full((num_experts, num_devices, width), -1, jnp.int32)
        .at[e_idx, dev, rank]
        .set(log2phy, mode="drop")
    )
    count = jnp.zeros((num_experts, num_devices), jnp.int32).at[e_idx, dev].add(1, mode="drop")
    return table, count


def _check_layer_args(
    log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
    slots_per_device, num_devices,
):  # fmt: skip
    """`dispatch_layer`'s argument checks (types, shapes, sizes, the sizes the replica choice
    needs, the ids); returns ``(log2phy, logcnt, topk_ids, token_index)`` as integer arrays."""
    log2phy = checks.int_array(log2phy, "log2phy", "[E, R_max]")
    logcnt = checks.int_array(logcnt, "logcnt", "[E]")
    if log2phy.ndim != 2:
        raise ValueError(
            f"log2phy: expected one layer's map [E, R_max], got shape {tuple(log2phy.shape)} "
            f"(slice it: state.log2phy[layer])"
        )
    num_experts, r_max = (int(n) for n in log2phy.shape)
    if num_experts < 1 or r_max < 1:
        raise ValueError(
            f"log2phy: expected a map [E, R_max] with E >= 1 and R_max >= 1, got shape "
            f"{tuple(log2phy.shape)}"
        )
    if tuple(logcnt.shape) != (num_experts,):
        raise ValueError(
            f"logcnt: expected shape [E] = ({num_experts},) to match log2phy, got "
            f"{tuple(logcnt.shape)}"
        )
    topk_ids, token_index = _check_tokens(topk_ids, valid, token_index, num_experts)
    if choice == "local" and (
        device_index is None or slots_per_device is None or num_devices is None
    ):
        raise ValueError(
            "prefer_local: needs device_index (the token's device on the expert-parallel "
            "axis), slots_per_device (N_local) and num_devices (D); `jeplb.dispatch` fills "
            "them from the state"
        )
    if choice != "hash":
        for name, v in (("slots_per_device", slots_per_device), ("num_devices", num_devices)):
            if v is None and choice == "balanced":  # (not needed: checked when given)
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
    return log2phy, logcnt, topk_ids, token_index


def _check_tokens(topk_ids, valid, token_index, num_experts: int):
    """The token arguments (``topk_ids``, ``valid``, ``token_index``) of `dispatch_layer` and
    `dispatch`; returns ``(topk_ids, token_index)`` as integer arrays (``token_index`` or None)."""
    topk_ids = checks.int_array(topk_ids, "topk_ids", "[..., K]")
    if topk_ids.ndim < 1:
        raise ValueError("topk_ids: expected shape [..., K] (e.g. [T, K]), got a scalar")
    batch = tuple(topk_ids.shape[:-1])
    counts_lib.check_valid(valid, batch)
    if token_index is not None:
        token_index = checks.int_array(token_index, "token_index")
        if tuple(token_index.shape) != batch:
            raise ValueError(
                f"token_index: expected shape {batch} (topk_ids without its K axis), got "
                f"{tuple(token_index.shape)}"
            )
    counts_lib.check_ids(topk_ids, valid, num_experts)
    return topk_ids, token_index


def _local_choice(log2phy, logcnt, safe, h, device_index, num_devices, slots_per_device):
    """With prefer_local: each (token, k)'s replica on its own device (hash-spread when there are
    several), and whether there is one."""
    d = num_devices
    batch = safe.shape[:-1]
    table, nloc = _local_tables(log2phy, logcnt, d, slots_per_device)
    width = table.shape[-1]
    dev = jnp.broadcast_to(jnp.asarray(device_index), batch)[..., None]
    dev_ok = (dev >= 0) & (dev < d)  # in the index's own dtype, before the int32 cast
    dev = jnp.where(dev_ok, dev, 0).astype(jnp.int32)
    here = nloc.reshape(-1)[safe * d + dev]
    pick = (h % jnp.maximum(here, 1).astype(jnp.uint32)).astype(jnp.int32)
    local = table.reshape(-1)[(safe * d + dev) * width + pick]
    return local, (here > 0) & dev_ok


def _resolve_choice(replica_choice: Any, prefer_local: Any, default: str) -> str:
    """The replica choice from ``replica_choice`` (None: ``default``) and the deprecated
    ``prefer_local`` (True means ``"local"``; it must not contradict ``replica_choice``)."""
    if replica_choice is not None and not isinstance(replica_choice, str):
        raise TypeError(
            f"replica_choice: expected one of {REPLICA_CHOICES} or None, got "
            f"{type(replica_choice).__name__} {replica_choice!r}"
        )
    if replica_choice is not None and replica_choice not in REPLICA_CHOICES:
        raise ValueError(
            f"replica_choice: expected one of {REPLICA_CHOICES} or None, got {replica_choice!r}"
        )
    check_bool("prefer_local", prefer_local)
    if not prefer_local:
        return default if replica_choice is None else replica_choice
    warnings.warn(
        "prefer_local=True is deprecated: pass replica_choice='local' (or set "
        "DispatchConfig(replica_choice='local') in the state's configuration)",
        DeprecationWarning,
        stacklevel=3,
    )
    if replica_choice not in (None, "local"):
        raise ValueError(
            f"prefer_local: True asks for replica_choice 'local', but replica_choice = "
            f"{replica_choice!r}; pass one of them"
        )
    return "local"


def _check_token_axes(token_axes: Any) -> tuple[str, ...] | None:
    """``token_axes`` as a tuple of mesh axis names (None stays None)."""
    if token_axes is None:
        return None
    names = (token_axes,) if isinstance(token_axes, str) else token_axes
    if (
        not isinstance(names, tuple | list)
        or not names
        or not all(isinstance(a, str) for a in names)
    ):
        raise TypeError(
            f"token_axes: expected a mesh axis name or a tuple of them, got {token_axes!r}"
        )
    return tuple(names)


def _ranks(key: jax.Array, groups: int, token_axes):
    """Each entry's rank among the entries of its group (flat order), and the groups' sizes.

    ``key`` int32[n] in [0, groups). On the CPU `_ranks_sorted`, elsewhere `_ranks_blocked` (no
    sort: a GPU's radix sort is many kernels); both give the same ranks. With ``token_axes``
    (inside `jax.shard_map`, tokens split over those axes in blocks) the ranks are global: the
    devices before this one add their sizes (`_offset`).

    Returns: ``(rank int32[n], local int32[groups])``: ``local`` the sizes among this call's
    entries alone.
    """
    rank, local = lax.platform_dependent(
        key,
        cpu=functools.partial(_ranks_sorted, groups=groups),
        default=functools.partial(_ranks_blocked, groups=groups),
    )
    before = _offset(local, token_axes)
    return rank if before is None else rank + before[key], local


def _offset(local: jax.Array, token_axes):
    """int32[G]: with ``token_axes``, the group sizes of the devices before this one on those
    axes (one all_gather of this call's sizes ``local`` int32[G]); without, None."""
    if token_axes is None:
        return None
    every = lax.all_gather(local, token_axes)  # [devices on token_axes, groups]
    me = lax.axis_index(token_axes)
    earlier = jnp.arange(every.shape[0])[:, None] < me
    return jnp.sum(jnp.where(earlier, every, 0), 0, dtype=jnp.int32)


def _ranks_sorted(key: jax.Array, *, groups: int):
    """`_ranks` by a sort by (key, position): an entry's place in the sorted order minus its
    group's start. The pair is packed into one int32 when it fits (a one-operand sort costs a
    fraction of a two-operand one on the CPU)."""
    n = key.shape[0]
    pos = lax.iota(jnp.int32, n)
    if groups * n < 2**31:
        packed = lax.sort(key * n + pos)
        sorted_key, order = packed // n, packed % n
    else:
        sorted_key, order = lax.sort((key, pos), num_keys=1, is_stable=True)
    sizes = jnp.zeros((groups,), jnp.int32).at[key].add(1)
    start = jnp.cumsum(sizes) - sizes
    rank = jnp.zeros((n,), jnp.int32).at[order].set(pos - start[sorted_key], unique_indices=True)
    return rank, sizes


# Entries per block of `_ranks_blocked` (its in-block compare is [n / block, block, block]).
_RANK_BLOCK = 256


def _ranks_blocked(key: jax.Array, *, groups: int):
    """`_ranks` without a sort, in reductions only (each one fused kernel on a GPU; no scatter,
    no cumulative sum): the entries split into blocks of ``_RANK_BLOCK``; an entry's rank is its
    group's count in the blocks before plus the earlier entries of its own block with its key."""
    n = key.shape[0]
    block = min(_RANK_BLOCK, max(n, 1))
    padded = jnp.pad(key, (0, (-n) % block), constant_values=groups)  # pads: a group of their own
    blocks = padded.reshape(-1, block)  # [B, S]
    num_blocks = blocks.shape[0]
    lower = lax.iota(jnp.int32, block)[None, :] < lax.iota(jnp.int32, block)[:, None]  # j < i
    same = blocks[:, :, None] == blocks[:, None, :]
    inside = jnp.sum(same & lower[None], axis=-1, dtype=jnp.int32)  # [B, S]
    group = lax.iota(jnp.int32, groups + 1)
    counts = jnp.sum(blocks[:, :, None] == group, axis=1, dtype=jnp.int32)  # [B, G + 1]
    # before[b] sums the blocks b' < b, for b in [0, B]: its last row is every block's total.
    earlier = (
        lax.iota(jnp.int32, num_blocks)[None, :] < lax.iota(jnp.int32, num_blocks + 1)[:, None]
    )
    before = jnp.sum(jnp.where(earlier[:, :, None], counts[None], 0), axis=1, dtype=jnp.int32)
    rank = inside + jnp.take_along_axis(before[:num_blocks], blocks, axis=1)
    return rank.reshape(-1)[:n], before[num_blocks, :groups]


def _balanced_choice(
    log2phy, logcnt, ids, counted, in_range, token_axes, masked, impl, raw=None, layer=None
):  # fmt: skip
    """``"balanced"``: each pair's slot ([..., K]; in-range ids only): replica ``(rank + e) %
    logcnt[e]`` of its expert e, ``rank`` its rank among e's pairs (counted and uncounted pairs
    ranked apart); and the counts (int32[E], this call's pairs: the counted pairs' group sizes,
    so no count of its own). ``masked``: some in-range pairs may be uncounted (a ``valid`` mask
    was given); without, their E groups are left out. ``impl``: ``"xla"`` (`_ranks`) or
    ``"kernel"`` (on a GPU, `balanced_kernel`'s Pallas kernels). ``raw``: the caller's ids
    before the range check; unmasked int32 ids go to the kernels as they are (the kernels send
    ids outside [0, E) to the out-of-range group themselves: no XLA operation before them).
    ``layer``: the maps are every layer's ([L, E, R_max], [L, E]), read at ``layer`` (the
    kernels read them there; a slice passed to a kernel would be a copy).

    Returns: ``(physical ids int32[..., K], counts int32[E])``."""
    num_experts = log2phy.shape[-2]
    out_of_range = 2 * num_experts if masked else num_experts  # the last group
    key = jnp.where(counted, ids, jnp.where(in_range, ids + num_experts, out_of_range))
    key, groups = key.reshape(-1), out_of_range + 1
    sliced = (log2phy, logcnt) if layer is None else (log2phy[layer], logcnt[layer])
    by_xla = functools.partial(_balanced_by_ranks, *sliced, groups, ids.shape, token_axes)
    # The kernels are written for Pallas's Triton lowering (`rows.triton_lowering`).
    kernel = impl == "kernel" and balanced_kernel.fits(key.size, groups)
    if not (kernel and rows_lib.triton_lowering()):
        return by_xla(key)
    direct = raw is not None and not masked and raw.dtype == jnp.int32
    raw_key = raw.reshape(-1) if direct else key
    # The kernels are CUDA (Pallas Triton): chosen by the platform the program is lowered for.
    return lax.platform_dependent(
        key,
        raw_key,
        cuda=lambda _, r: _balanced_by_kernel(
            log2phy, logcnt, groups, ids.shape, token_axes, r, layer=layer
        ),
        default=lambda k, _: by_xla(k),
    )


def _balanced_by_ranks(log2phy, logcnt, groups, shape, token_axes, key):
    """`_balanced_choice`'s result from `_ranks` (keys ``key`` int32[n] of ``groups`` groups, the
    last one out of range; slots reshaped to ``shape``)."""
    num_experts, r_max = log2phy.shape
    rank, local = _ranks(key, groups, token_axes)
    in_range = key < groups - 1
    safe = jnp.where(in_range, jnp.where(key >= num_experts, key - num_experts, key), 0)
    cnt = jnp.maximum(logcnt, 1)[safe]
    replica = jnp.minimum((rank % cnt + safe % cnt) % cnt, r_max - 1)  # (as the kernel)
    phys = log2phy.reshape(-1)[safe * r_max + replica]
    return jnp.where(in_range, phys, -1).reshape(shape), local[:num_experts]


def _balanced_by_kernel(
    log2phy, logcnt, groups, shape, token_axes, key, *, layer=None, interpret=False,
    count_block=None, map_block=None,
):  # fmt: skip
    """`_balanced_choice`'s result by `balanced_kernel` (keys ``key`` int32[n] of ``groups``
    groups, the last one out of range, as are keys outside [0, groups); slots reshaped to
    ``shape``; every layer's maps read at ``layer`` when given; blocks by default the
    module's)."""
    num_experts = log2phy.shape[-2]
    count_block = count_block or balanced_kernel.COUNT_BLOCK
    map_block = map_block or balanced_kernel.MAP_BLOCK
    n = key.shape[0]
    key = balanced_kernel.pad_keys(key, groups, count_block)
    rows = balanced_kernel.block_counts(
        key, groups, count_block=count_block, interpret=interpret
    )  # [B, G_pad]
    before = balanced_kernel.prefix_rows(rows)  # [B + 1, G_pad]
    local = before[-1]  # the sum of every block's rows: this call's group sizes
    offset = _offset(local, token_axes)
    phys = balanced_kernel.choose(
        key, before if offset is None else before + offset, logcnt, log2phy, groups=groups,
        layer=layer, count_block=count_block, map_block=map_block, interpret=interpret,
    )  # fmt: skip
    return phys[:n].reshape(shape), local[:num_experts]


def dispatch_layer(
    log2phy: jax.Array,
    logcnt: jax.Array,
    topk_ids: jax.Array,
    *,
    valid: jax.Array | None = None,
    token_index: jax.Array | None = None,
    replica_choice: str | None = None,
    prefer_local: bool = False,
    device_index: Any = None,
    slots_per_device: int | None = None,
    num_devices: int | None = None,
    token_axes: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Maps one layer's top-k logical ids to physical slots and counts them per logical expert.

    Args:
      log2phy: int32[E, R_max] the layer's logical-to-physical map (``state.log2phy[layer]``).
      logcnt: int32[E] the layer's replica counts (``state.logcnt[layer]``).
      topk_ids: int[..., K] the router's logical expert ids (any batch shape, usually [T, K]).
      valid: optional bool[...] (the batch shape): tokens to count; others are mapped, not counted.
      token_index: optional int[...]: the index the replica hash uses for each token (default: its
        flat position in the batch). Pass global token indices inside `jax.shard_map` so that
        devices do not repeat one another's choices. The balanced choice does not use it (it
        ranks pairs by position; see ``token_axes``).
      replica_choice: ``"hash"``, ``"local"`` or ``"balanced"`` (see the module docstring);
        None: ``"hash"``.
      prefer_local: deprecated spelling of ``replica_choice="local"`` (a DeprecationWarning).
      device_index: with ``"local"``: the token's device on the expert-parallel axis (int, or
        int[...] per token).
      slots_per_device: with ``"local"``: N_local (slot p lives on device p // N_local). The
        balanced choice does not need it (checked when given).
      num_devices: with ``"local"``: D, devices on the expert-parallel axis (as
        ``slots_per_device`` for the balanced choice).
      token_axes: with ``"balanced"`` inside `jax.shard_map`: the mesh axes the tokens are split
        over (in blocks, axis order); ranks are then global and the choice that of the global
        view. None: the call sees every token (global view), or each device balances its own.

    Returns:
      ``(physical_ids int32[..., K], counts int32[E])``; out-of-range ids give -1 (see the module
      docstring).

    Raises:
      ValueError, TypeError: shapes or dtypes that do not fit, naming the argument; an id outside
        [0, E) of a valid token when the ids are concrete.

    Example:
      >>> import jax.numpy as jnp
      >>> log2phy = jnp.array([[0, 2], [1, -1]]); logcnt = jnp.array([2, 1])
      >>> phys, counts = dispatch_layer(log2phy, logcnt, jnp.array([[0, 1], [0, 1], [1, 0]]),
      ...                               valid=jnp.array([True, True, False]))
      >>> counts.tolist()
      [2, 2]
      >>> phy2log = jnp.array([0, 1, 0])  # the map log2phy inverts
      >>> phy2log[phys].tolist()
      [[0, 1], [0, 1], [1, 0]]
      >>> phys, _ = dispatch_layer(log2phy, logcnt, jnp.zeros((5, 1), int),
      ...                          replica_choice="balanced")
      >>> phys[:, 0].tolist()  # expert 0's five pairs: 3 on one replica, 2 on the other
      [0, 2, 0, 2, 0]
    """
    choice = _resolve_choice(replica_choice, prefer_local, "hash")
    token_axes = _check_token_axes(token_axes)
    log2phy, logcnt, topk_ids, token_index = _check_layer_args(
        log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
        slots_per_device, num_devices,
    )  # fmt: skip
    return _dispatch_core(
        log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
        slots_per_device, num_devices, token_axes, _IMPL, _BALANCED_IMPL,
    )  # fmt: skip


def _dispatch_checked(
    log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
    slots_per_device, num_devices, token_axes, impl, balanced_impl, layer=None,
):  # fmt: skip
    """`dispatch_layer` on checked arguments (`_map_and_count`'s), its slots made once.

    Fused into a consumer that reads expert rows at them (a gather of [T, K, H]), XLA would
    redo the map (range check, hash, two table reads) for every element read: on an H100 in a
    58-layer decode step, 5.89 us a layer fused and 1.85-2.27 us with the slots made here
    (benchmarks/results/map_isolation_h100.md).
    """
    phys, counts = _map_and_count(
        log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
        slots_per_device, num_devices, token_axes, impl, balanced_impl, layer,
    )  # fmt: skip
    return lax.optimization_barrier(phys), counts


def _map_and_count(
    log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
    slots_per_device, num_devices, token_axes, impl, balanced_impl, layer=None,
):  # fmt: skip
    """The slots and counts of checked arguments (integer arrays of fitting shapes); ``impl``
    how the counts are made off the CPU (``_IMPL``), ``balanced_impl`` how the balanced choice
    ranks off the CPU (``_BALANCED_IMPL``); ``layer``: the maps are every layer's, read at
    ``layer`` (by the balanced kernels themselves: a slice passed to a kernel would be a copy;
    sliced here for the other forms)."""
    if layer is not None and choice != "balanced":
        log2phy, logcnt, layer = log2phy[layer], logcnt[layer], None
    num_experts, k = int(log2phy.shape[-2]), int(topk_ids.shape[-1])
    with jax.named_scope("eplb_dispatch"):
        # The range check runs in the ids' own dtype: an int64 id of 2**32 + 1 cast first would
        # read as expert 1.
        in_range = (topk_ids >= 0) & (topk_ids < num_experts)
        ids = jnp.where(in_range, topk_ids, num_experts).astype(jnp.int32)
        log2phy = jnp.asarray(log2phy, jnp.int32)
        logcnt = jnp.asarray(logcnt, jnp.int32)
        counted = in_range if valid is None else in_range & jnp.asarray(valid, bool)[..., None]
        if choice == "balanced":
            return _balanced_choice(
                log2phy, logcnt, ids, counted, in_range, token_axes, valid is not None,
                balanced_impl, raw=topk_ids, layer=layer,
            )  # fmt: skip
        xla = functools.partial(
            _hash_or_local, log2phy, logcnt, ids, in_range, counted, token_index, choice,
            device_index, slots_per_device, num_devices, impl,
        )  # fmt: skip
        fused = choice == "hash" and impl == "fused" and _fused_fits(ids.size, num_experts)
        if not (fused and rows_lib.triton_lowering()):
            return xla()
        # The kernel is CUDA (Pallas Triton): chosen by the platform the program is lowered for.
        kernel = functools.partial(
            _map_and_count_fused, log2phy, logcnt, ids,
            None if valid is None else jnp.asarray(valid, bool),
            None if token_index is None else jnp.asarray(token_index).astype(jnp.uint32),
            k=k,
        )  # fmt: skip
        return lax.platform_dependent(cuda=kernel, default=xla)


def _hash_or_local(
    log2phy, logcnt, ids, in_range, counted, token_index, choice, device_index,
    slots_per_device, num_devices, impl,
):  # fmt: skip
    """The ``"hash"`` and ``"local"`` choices' slots ([..., K], -1 out of range) and counts
    (int32[E]) of in-range-clamped ``ids``, by XLA."""
    num_experts, r_max = log2phy.shape
    batch, k = ids.shape[:-1], ids.shape[-1]
    safe = jnp.where(in_range, ids, 0)
    h = _pair_hash(batch, k, token_index)
    cnt = jnp.maximum(logcnt[safe], 1).astype(jnp.uint32)
    replica = (h % cnt).astype(jnp.int32)
    phys = log2phy.reshape(-1)[safe * r_max + replica]
    if choice == "local":
        local, has_local = _local_choice(
            log2phy, logcnt, safe, h, device_index, num_devices, slots_per_device
        )
        phys = jnp.where(has_local, local, phys)
    phys = jnp.where(in_range, phys, -1)
    dropped = jnp.where(counted, ids, num_experts).reshape(1, -1)
    counts = counts_lib.count_ids(dropped, num_experts, compare=impl == "compare")[0]
    return phys, counts


# `_dispatch_checked` as one program per shape and options (``_IMPL`` among them, passed as a
# static argument so that a change of it compiles anew): called eagerly, its few dozen
# operations would each compile and run on their own; under an outer jit it is inlined.
_dispatch_core = jax.jit(_dispatch_checked, static_argnums=(5, 7, 8, 9, 10, 11))


# How the counts are made on accelerators: "scatter" (`counts.count_ids`' blocked rows, the
# default), "compare" (its compare-sum) or "fused" (`_map_and_count_fused`: the map and the
# counts by a Pallas kernel, in programs lowered for CUDA where Pallas lowers through Triton and
# the ids fit it; elsewhere, ROCm included, the scatter). On an H100,
# inside a 58-layer decode step, the scatter costs least (benchmarks/results/dispatch_h100.md); the others stay for the
# benchmark's comparisons (benchmarks/bench_dispatch.py --impl).
_IMPL = "scatter"
# How the balanced choice ranks on a GPU: "kernel" (`balanced_kernel`'s two Pallas kernels, the
# default: in the 58-layer decode step on an H100, 33.3 us a layer per call and 27.7 back to
# back against 32.7 and 28.7 for the XLA form in the same run, the same slots;
# benchmarks/results/balanced_kernel_h100.md) or "xla" (`_ranks_blocked`'s reductions).
_BALANCED_IMPL = "kernel"
# The kernel: ids per program (a power of two), ids per counting step at E = 256 (fewer for more
# experts: a step's [chunk, E] hits stay in registers), and the largest E it takes.
_FUSED_BLOCK = 512
_FUSED_COMPARES = 4096
_FUSED_MAX_EXPERTS = 4096


def _fused_fits(n: int, num_experts: int) -> bool:
    """Whether `_map_and_count_fused` takes ``n`` ids of ``num_experts`` experts."""
    return n > 0 and n % _FUSED_BLOCK == 0 and num_experts <= _FUSED_MAX_EXPERTS


def _map_and_count_fused(log2phy, logcnt, ids, valid, token_index, *, k, interpret=False):
    """`dispatch_layer`'s result by a Pallas kernel (CUDA): each program maps a block of
    ``_FUSED_BLOCK`` ids (the same hash and table reads as `dispatch_layer`) and counts them into a row of
    its own (hits accumulated elementwise in registers, reduced once); XLA sums the rows. Integer
    adds only: exact. Needs `_fused_fits`; ``interpret`` runs it in Pallas's interpreter (any
    backend: the tests' CPU). (An atomic add of each program's counts into one zeroed row, which
    would save the sum, gave zeros on an H100 with jax 0.11.2: not used.)"""
    from jax.experimental import pallas as pl

    num_experts, r_max = log2phy.shape
    n = ids.size
    block = _FUSED_BLOCK
    programs = n // block
    padded = 1 << max(0, (num_experts - 1).bit_length())  # power of two (Triton's ranges)
    chunk = min(block, max(1, _FUSED_COMPARES // padded))
    tables = [log2phy.reshape(-1), logcnt]
    if valid is not None:
        tables.append(valid.reshape(-1).astype(jnp.int32))
    if token_index is not None:
        tables.append(token_index.reshape(-1))

    def kernel(ids_ref, table_ref, cnt_ref, *rest):
        *extra, phys_ref, counts_ref = rest
        valid_ref = extra.pop(0) if valid is not None else None
        tok_ref = extra.pop(0) if token_index is not None else None
        first = pl.program_id(0) * block

        def in_range(x):
            return (x >= 0) & (x < num_experts)

        ids = ids_ref[...]
        ok = in_range(ids)
        safe = jnp.where(ok, ids, 0)
        pos = first + lax.broadcasted_iota(jnp.int32, (block,), 0)
        if tok_ref is None:
            key = pos.astype(jnp.uint32)
        else:
            key = tok_ref[pos // k] * jnp.uint32(k) + (pos % k).astype(jnp.uint32)
        cnt = jnp.maximum(cnt_ref[safe], 1).astype(jnp.uint32)
        replica = (_mix32(key) % cnt).astype(jnp.int32)
        phys_ref[...] = jnp.where(ok, table_ref[safe * r_max + replica], -1)

        experts = lax.broadcasted_iota(jnp.int32, (chunk, padded), 1)

        def count(j, acc):  # hits accumulate elementwise ([chunk, padded] in registers)
            sub = ids_ref[pl.ds(j * chunk, chunk)]
            counted = in_range(sub)
            if valid_ref is not None:
                at = first + j * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
                counted &= valid_ref[at // k] != 0
            sub = jnp.where(counted, sub, -1)
            return acc + (sub[:, None] == experts).astype(jnp.int32)

        zero = jnp.zeros((chunk, padded), jnp.int32)
        acc = lax.fori_loop(jnp.int32(0), jnp.int32(block // chunk), count, zero)
        counts_ref[...] = jnp.sum(acc, axis=0)

    def whole(shape):
        return pl.BlockSpec(shape, lambda i: (0,) * len(shape))

    args = rows_lib.vary_alike(ids.reshape(-1), *tables)  # operands alike inside shard_map
    like = rows_lib._like(args[0])  # int32[n], varying like the operands
    blocked = pl.BlockSpec((block,), lambda i: (i,))
    phys, rows = pl.pallas_call(
        kernel,
        out_shape=(like, like.update(shape=(programs, padded))),
        grid=(programs,),
        in_specs=[blocked, *(whole(a.shape) for a in args[1:])],
        out_specs=[blocked, pl.BlockSpec((None, padded), lambda i: (i, 0))],
        interpret=interpret,
        name="eplb_dispatch",
    )(*args)
    counts = jnp.sum(rows, axis=0, dtype=jnp.int32)
    return phys.reshape(ids.shape), counts[:num_experts]


def dispatch(
    state: EplbState,
    layer: Any,
    topk_ids: jax.Array,
    *,
    valid: jax.Array | None = None,
    token_index: jax.Array | None = None,
    replica_choice: str | None = None,
    prefer_local: bool = False,
    device_index: Any = None,
    token_axes: str | tuple[str, ...] | None = None,
    record: bool = True,
) -> tuple[EplbState, jax.Array]:
    """Maps a layer's top-k logical ids to physical slots and records the load in the state.

    Args:
      state: the `EplbState` (its maps are read, its ``pass_load[layer]`` is added to).
      layer: the MoE layer's index (int, or an integer scalar array; traced inside a scan). A
        concrete index outside [0, L) is refused (negative ones are not wrapped); a traced one
        outside [0, L) gives physical ids -1 and counts nothing.
      topk_ids: int[..., K] the router's logical expert ids (usually [T, K]).
      valid: optional bool[...]: tokens to count (padding excluded).
      token_index: optional int[...]: the index the replica hash uses (default: flat position;
        the balanced choice does not use it).
      replica_choice: ``"hash"``, ``"local"`` or ``"balanced"`` (see `dispatch_layer`);
        None: the state's ``config.dispatch.replica_choice`` (``"hash"`` by default).
      prefer_local: deprecated spelling of ``replica_choice="local"`` (a DeprecationWarning).
      device_index: with ``"local"``: the token's device (int or int[...]); by default
        ``lax.axis_index(state.config.transfer.axis_name)``, which needs the call to run inside
        `jax.shard_map`.
      token_axes: with ``"balanced"`` inside `jax.shard_map` (tokens split over devices): the
        mesh axes the tokens are split over, so that the choice is the global view's (see
        `dispatch_layer`).
      record: whether to add the layer's counts to ``state.pass_load`` (the default). False:
        the ids are only mapped and the state comes back as it was; keep the layers' ids and
        count them all at once after the forward with `EplbState.record_ids` (the same
        ``pass_load``, one count per step instead of one per layer: cheaper on a GPU).

    Returns:
      ``(state, physical_ids int32[..., K])``: the state first, as every function that takes
      and returns a state, with ``state.pass_load[layer]`` increased by the counts (through `EplbState.record`: an int32 sum that would pass 2^31 - 1 raises eagerly and
      saturates under jit). Inside `jax.shard_map` the counts are this device's; see
      `jeplb.eplb_step_local`.

    Raises:
      ValueError, TypeError: as `dispatch_layer`; a concrete layer index out of range or not an
        integer scalar; a state with no layers.

    Example:
      >>> import jax.numpy as jnp
      >>> s = EplbState.create(num_layers=1, num_experts=2, num_devices=1,
      ...                      num_redundant_experts=2, window_size=1, step_interval=1)
      >>> s, phys = dispatch(s, 0, jnp.array([[0], [0], [0], [1]]))
      >>> sorted(set(phys[:3, 0].tolist())) == [0, 2], s.pass_load.tolist()
      (True, [[3, 1]])
    """
    args, traced = _state_args(
        state, layer, topk_ids, valid, token_index, replica_choice, prefer_local, device_index,
        token_axes,
    )  # fmt: skip
    check_bool("record", record, hint="False maps only; count the ids with EplbState.record_ids")
    phys, counts = _dispatch_core(*args)
    if traced:  # an index outside [0, L): no slot, nothing counted (record drops it)
        phys = jnp.where((layer >= 0) & (layer < state.num_layers), phys, -1)
    if not record:
        return state, phys
    # layer and counts are checked: add them without checking them again in record.
    return state._add_counts(counts, layer=layer), phys


def _state_args(
    state, layer, topk_ids, valid, token_index, replica_choice, prefer_local, device_index,
    token_axes,
):  # fmt: skip
    """`dispatch`'s checks: the checked core's arguments (the state's whole maps read at the
    layer, clipped into [0, L) when traced) and whether the layer is traced."""
    if not isinstance(state, EplbState):
        raise TypeError(
            f"state: expected an EplbState (use dispatch_layer with map slices), got "
            f"{type(state).__name__}"
        )
    traced = check_layer(layer, state.num_layers)
    choice = _resolve_choice(replica_choice, prefer_local, state.config.dispatch.replica_choice)
    token_axes = _check_token_axes(token_axes)
    if choice == "local" and device_index is None:
        try:
            device_index = lax.axis_index(state.config.transfer.axis_name)
        except NameError as err:
            raise ValueError(
                f"device_index: replica_choice='local' needs the token's device; pass device_index= or "
                f"call inside jax.shard_map over the {state.config.transfer.axis_name!r} axis"
            ) from err
    topk_ids, token_index = _check_tokens(topk_ids, valid, token_index, state.num_experts)
    read = jnp.clip(layer, 0, state.num_layers - 1) if traced else layer
    # The state's maps are checked values: the whole maps and the layer go to the checked core,
    # which slices them where its form needs a slice (`_map_and_count`).
    args = (
        state.log2phy, state.logcnt, topk_ids, valid, token_index, choice, device_index,
        state.slots_per_device, state.num_devices, token_axes, _IMPL, _BALANCED_IMPL, read,
    )  # fmt: skip
    return args, traced


def dispatch_kept(
    state: EplbState,
    layer: Any,
    topk_ids: jax.Array,
    kept: jax.Array,
    *,
    valid: jax.Array | None = None,
    token_index: jax.Array | None = None,
    replica_choice: str | None = None,
    device_index: Any = None,
    token_axes: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Maps a layer's top-k logical ids to physical slots and writes them into ``kept[layer]``.

    The form of `dispatch` for a model that counts once per step and scans its layers: the map
    is written straight into the array of every layer's slots (on a GPU one operation a layer,
    where mapping and keeping the ids as a scan's outputs are two), and the model reads the
    layer's slots back from it. After the forward, `EplbState.record_slots` counts every
    layer's kept slots per logical expert: the same ``pass_load`` as `dispatch` on every layer
    (for layer indices in [0, L); see ``layer``).

    Args:
      state: the `EplbState` (its maps are read; it is not changed).
      layer: the layer's index (int, or an integer scalar array, traced inside a scan). A
        concrete index outside [0, L) is refused; a traced one writes -1 into the row of the
        nearest layer (``lax.dynamic_update_slice`` clamps its index; that layer's slots are
        then lost to `EplbState.record_slots`, where `dispatch` only drops the bad layer's
        counts: keeping the row would cost the write a read of it) and maps every token to -1.
      topk_ids: int[..., K] the router's logical expert ids (usually [T, K]).
      kept: int32[L, ..., K] every layer's slots so far (start from ``jnp.full((L, T, K), -1,
        jnp.int32)``: rows never written are not counted). Inside `jax.shard_map` the slots
        vary over the devices: make the scan's starting carry varying too
        (``lax.pcast(kept, axes, to="varying")``) or the scan refuses the carry's type.
      valid: optional bool[...]: the tokens that will be counted. The slots are the same for
        every token whatever the mask, except with the balanced choice, which ranks masked pairs
        among themselves (as `dispatch`); pass the same mask to `EplbState.record_slots`, which
        leaves them uncounted.
      token_index: as in `dispatch`.
      replica_choice: as in `dispatch` (None: the state's).
      device_index: as in `dispatch`.
      token_axes: as in `dispatch`.

    Returns:
      ``(kept, physical_ids int32[..., K])``: ``kept`` with its row ``layer`` written, and the
      layer's slots (read from it), -1 for ids outside [0, E).

    Raises:
      ValueError, TypeError: as `dispatch`; ``kept`` not int32 or not of shape [L, *topk_ids.shape].

    Example:
      >>> import jax.numpy as jnp
      >>> s = EplbState.create(num_layers=2, num_experts=2, num_devices=1,
      ...                      num_redundant_experts=2, window_size=1, step_interval=1)
      >>> ids = jnp.array([[0], [0], [0], [1]])
      >>> kept = jnp.full((2, 4, 1), -1, jnp.int32)
      >>> kept, phys = dispatch_kept(s, 1, ids, kept)
      >>> bool((kept[1] == phys).all()), kept[0].ravel().tolist()
      (True, [-1, -1, -1, -1])
      >>> s.record_slots(kept).pass_load.tolist()
      [[0, 0], [3, 1]]
    """
    if not hasattr(kept, "dtype") or not hasattr(kept, "shape") or kept.dtype != jnp.int32:
        got = getattr(kept, "dtype", type(kept).__name__)
        raise TypeError(
            f"kept: expected an int32 array [L, ..., K] of every layer's slots, got {got}; "
            f"start from jnp.full((L, *topk_ids.shape), -1, jnp.int32)"
        )
    args, traced = _state_args(
        state, layer, topk_ids, valid, token_index, replica_choice, False, device_index, token_axes
    )
    want = (state.num_layers, *args[2].shape)
    if tuple(kept.shape) != want:
        raise ValueError(
            f"kept: expected shape [L, *topk_ids.shape] = {want}, got {tuple(kept.shape)}"
        )
    ok = (layer >= 0) & (layer < state.num_layers) if traced else True
    return _map_into(kept, ok, *args)


@functools.partial(jax.jit, static_argnums=(7, 9, 10, 11, 12, 13))
def _map_into(
    kept, ok, log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
    slots_per_device, num_devices, token_axes, impl, balanced_impl, layer,
):  # fmt: skip
    """`dispatch_kept` on checked arguments: the map written into ``kept[layer]`` (no
    optimisation barrier: the write makes the slots once, and XLA fuses the map into it)."""
    phys, _ = _map_and_count(
        log2phy, logcnt, topk_ids, valid, token_index, choice, device_index,
        slots_per_device, num_devices, token_axes, impl, balanced_impl, layer,
    )  # fmt: skip
    with jax.named_scope("eplb_keep"):
        kept = lax.dynamic_update_index_in_dim(kept, jnp.where(ok, phys, -1), layer, 0)
        return kept, lax.dynamic_index_in_dim(kept, layer, 0, keepdims=False)

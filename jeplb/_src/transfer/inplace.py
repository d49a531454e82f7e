"""Direct in-place row moves for a device whose whole layer is rearranged locally (D = 1).

When every move of a layer stays inside the device, staging is not needed: each moved row can be
read once and written once straight into its new slot, if the moves run in an order where a slot is
overwritten only after every slot that copies from it has read it. Sources that are themselves
overwritten form a functional graph (each written slot reads one source): in-trees are emptied
leaves first, and each cycle is broken by saving one of its rows in a temporary, which the cycle's
last move writes back. The temporary is one row-block held by the kernel (registers in the Pallas
kernel, one row in the loop), so the layer needs no staging buffer. The order itself takes a few
vectorised rounds of pointer jumping, not a loop over moves, so it costs little next to the moves.

Letters: L layers, N slots of the device per layer (N_local; N = P when D = 1), M = N + N // 2 the
longest move list (every slot written once, plus one save per cycle of at least two slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jeplb._src.transfer import rows as rows_lib

__all__ = [
    "apply_moves",
    "move_leaves",
    "order_moves",
    "order_moves_layers",
    "pallas_refusal",
    "resolve_impl",
]


def order_moves(old: jax.Array, new: jax.Array, ok: jax.Array) -> tuple[jax.Array, ...]:
    """A hazard-free order of one layer's local row moves.

    Args:
      old: int32[N] the layer's map before (the device's slots).
      new: int32[N] the map after.
      ok: bool[] the plan is feasible; when False no move is emitted.

    Returns:
      ``(src int32[M], dst int32[M], count int32[])``: move k copies row ``src[k]`` into row
      ``dst[k]`` for ``k < count``, in that order; index N stands for the temporary. Rows with
      ``new == -1`` or ``new == old`` are never written; every other row is written exactly once,
      from a row that held its new expert in the old map, before anything overwrote that row.

    The order is computed without a loop over moves, in 2 ceil(log2 N) rounds of pointer jumping:
    a written row's parent is its source when that source is itself written. Rows whose parents
    lead to a row that is never written form trees; they move deepest first, so every row is read
    by its children before its own move overwrites it. The other rows reach a cycle. Each cycle is
    cut at its least row r: r's source is saved in the temporary first, the rest of r's component
    moves deepest first (depth counted to r), and r is written last, from the temporary. With one
    temporary, cycle components run one after the other, in the order of r.

    Example:
      >>> import jax.numpy as jnp
      >>> src, dst, count = order_moves(
      ...     jnp.array([0, 1, 2, 3]), jnp.array([1, 0, 2, 2]), jnp.bool_(True))
      >>> [(int(s), int(d)) for s, d in zip(src[:count], dst[:count])]
      [(2, 3), (1, 4), (0, 1), (4, 0)]
    """
    n = old.shape[0]
    m = n + n // 2
    temp = jnp.int32(n)
    rows = jnp.arange(n, dtype=jnp.int32)
    rounds = max(1, (n - 1).bit_length())  # 2 ** rounds >= n
    changed = (new >= 0) & (new != old) & ok
    holds = old[None, :] == new[:, None]  # [dst, src]
    # The first holder, as the staged transfer copies locally (any holder would do bit-wise for
    # real replicas; the first keeps both paths identical).
    src = jnp.argmax(holds, 1).astype(jnp.int32)
    # Parents, with index N as the root that every tree ends in (its own parent).
    parent = jnp.append(jnp.where(changed & changed[src], src, temp), temp)

    with jax.named_scope("find_cycles"):
        # After the rounds, ahead[x] is 2 ** rounds >= N steps up: the root, or a row on the cycle
        # x leads to; least[x] is the least row of the first 2 ** rounds steps from x.
        ahead, least = parent, jnp.append(rows, temp)
        for _ in range(rounds):
            least = jnp.minimum(least, least[ahead])
            ahead = ahead[ahead]
        cyclic = ahead[:n] != temp
        component = jnp.where(cyclic, least[ahead[:n]], -1)  # the least row of x's cycle
        cut = cyclic & (component == rows)

    with jax.named_scope("depths"):
        # Cut every cycle at its least row, then count each row's steps to a tree's top.
        up = jnp.where(jnp.append(cut, True), temp, parent)
        depth = jnp.append(up[:n] != temp, False).astype(jnp.int32)
        for _ in range(rounds):
            depth = depth + depth[up]
            up = up[up]
        depth = depth[:n]

    with jax.named_scope("sort"):
        # One key per entry: N moves (a cut row's move reads the temporary) and N saves (one per
        # cut row). Trees first (group 0), then each cycle component (group 1 + r): its save, its
        # moves deepest first, its cut row last.
        span = 2 * n + 2
        group = (component + 1) * span
        move_key = group + jnp.where(cut, 2 * n + 1, 1 + n - depth)
        move_key = jnp.where(changed, move_key, jnp.iinfo(jnp.int32).max)
        save_key = jnp.where(cut, group, jnp.iinfo(jnp.int32).max)
        order = jnp.argsort(jnp.concatenate([move_key, save_key]), stable=True)[:m]
        entry_src = jnp.concatenate([jnp.where(cut, temp, src), src])
        entry_dst = jnp.concatenate([rows, jnp.full((n,), temp)])
        count = (changed.sum() + cut.sum()).astype(jnp.int32)
        live = jnp.arange(m) < count
        out_src = jnp.where(live, entry_src[order], temp)
        out_dst = jnp.where(live, entry_dst[order], temp)
    return out_src, out_dst, count


def order_moves_layers(old: jax.Array, new: jax.Array, ok: jax.Array) -> tuple[jax.Array, ...]:
    """`order_moves` over a leading layer axis: int32[L, N] maps, bool[L] ok."""
    return jax.vmap(order_moves)(old, new, ok)


# ------------------------------------------------------------------------------- executors


def _apply_loop(rows, src, dst, count, n, slot_major):
    """One while loop of dynamic_slice / dynamic_update_slice over every layer's moves, in place;
    the temporary is one row. (One flat loop: a loop nested in the layer loop makes XLA:CPU copy
    the whole buffer at every layer.) Rows of dtypes that move natively only (see `layout`):
    XLA:CPU runs a dynamic slice of bf16 or fp8 through f32, which drops NaN payloads, so the
    engine stages those rows instead."""
    num_layers, m = src.shape
    width = rows.shape[1]
    # Pack the moves of every layer in order, in global row indices; -1 marks the temporary.
    valid = (jnp.arange(m) < count[:, None]).reshape(-1)
    order = jnp.argsort(~valid, stable=True)
    layer = jnp.arange(num_layers, dtype=jnp.int32)[:, None]

    def row(slot):  # (layer, local slot) -> row of ``rows``; the temporary -> -1
        at = slot * num_layers + layer if slot_major else layer * n + slot
        return jnp.where(slot == n, -1, at).reshape(-1)[order]

    gsrc, gdst = row(src), row(dst)

    def read(rows, at):
        return lax.dynamic_slice(rows, (at, jnp.int32(0)), (1, width))

    def move(k, carry):
        rows, temp = carry
        s, d = gsrc[k], gdst[k]
        x = jnp.where(s < 0, temp, read(rows, jnp.maximum(s, 0)))
        # A save (d < 0) writes the row back onto itself: no branch. After a
        # dynamic_update_slice the temporary is read from the updated buffer (a read of the old
        # one would copy the buffer every move).
        at = jnp.where(d < 0, s, d)
        rows = lax.dynamic_update_slice(rows, x, (at, jnp.int32(0)))
        return rows, jnp.where(d < 0, read(rows, at), temp)

    temp = rows_lib.make_varying(jnp.zeros((1, width), rows.dtype), rows_lib.varying_axes(rows))
    rows, _ = lax.fori_loop(0, valid.sum(), move, (rows, temp))
    return rows


direct_block = rows_lib.direct_block
_packed = rows_lib.packed_words
# The kernel's limits live with the other movers' rules (`rows`).
pallas_refusal = rows_lib.direct_refusal


def _apply_pallas(rows, src, dst, count, n, interpret, slot_major):
    """One Pallas program per (layer, block of columns); it runs the layer's moves in order on its
    block, so each byte is read once and written once. The temporary lives in the program.

    Rows move as 32-bit words (fp8 and bf16 rows load as whole words), and each program sees its
    layer through a block of [N, block] words, so in-kernel offsets stay below 2^31 whatever the
    size of the whole shard."""
    from jax.experimental import pallas as pl

    num_layers, m = src.shape
    why = pallas_refusal(n, rows.shape[1], rows.dtype)
    if why:  # the public functions refuse such leaves first, by path (`engine.leaf_problems`)
        raise ValueError(why)
    packed = _packed(rows.shape[1], rows.dtype)
    words = rows_lib.words(rows) if packed else rows
    block = direct_block(words.shape[1], num_layers)

    def kernel(src_ref, dst_ref, cnt_ref, _in_ref, out_ref):
        li = pl.program_id(0)

        def move(k, temp):
            s = src_ref[li * m + k]
            d = dst_ref[li * m + k]
            # A branch, not a select: a move from the temporary must not read a row too (one
            # wasted row read per cycle, 1/8 more traffic when 4 rows move in a cycle).
            x = lax.cond(s == n, lambda: temp, lambda: out_ref[jnp.minimum(s, n - 1), :])

            @pl.when(d != n)
            def _():
                out_ref[d, :] = x

            return jnp.where(d == n, x, temp)

        lax.fori_loop(0, cnt_ref[li], move, jnp.zeros((block,), out_ref.dtype))

    tables = [src.reshape(-1), dst.reshape(-1), count]
    out = layer_kernel_call(
        kernel,
        tables,
        words,
        num_layers=num_layers,
        block=block,
        slot_major=slot_major,
        interpret=interpret,
    )
    return rows_lib.unwords(out, rows) if packed else out


def layer_kernel_call(
    kernel,
    tables: list,
    rows: jax.Array,
    *,
    num_layers: int,
    block: int,
    slot_major: bool,
    interpret: bool | None,
    num_warps: int | None = None,
) -> jax.Array:
    """Runs ``kernel(*table_refs, _rows_in_ref, rows_out_ref)`` with one Pallas program per
    (layer, block of ``block`` columns), in place on ``rows`` (``num_warps`` per program on a
    GPU; None: Pallas's default).

    Args:
      kernel: the Pallas kernel; each program sees its layer as an [N, block] ref (N = rows of a
        layer) and every table whole.
      tables: 1-D int32 arrays, passed whole to every program.
      rows: [L * N, R] layer-major (or [N * L, R] with ``slot_major``), R a multiple of ``block``.
      num_layers: L.
      block: columns per program.
      slot_major: the rows are slot-major: row ``slot * L + layer``.
      interpret: run in interpret mode; None: only on the CPU backend.

    Returns:
      ``rows`` after the kernel, [L * N, R].
    """
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    n, width = rows.shape[0] // num_layers, rows.shape[1]
    if slot_major:
        layered = rows.reshape(n, num_layers, width)
        layer_block = pl.BlockSpec((n, None, block), lambda li, b: (0, li, b))
    else:
        layered = rows.reshape(num_layers, n, width)
        layer_block = pl.BlockSpec((None, n, block), lambda li, b: (li, 0, b))
    axes = rows_lib.varying_axes(rows)
    args = [rows_lib.make_varying(a, axes) for a in [*tables, layered]]

    def whole(a):
        return pl.BlockSpec(a.shape, lambda li, b: (0,))

    out = pl.pallas_call(
        kernel,
        out_shape=rows_lib._like(args[-1]),
        grid=(num_layers, width // block),
        in_specs=[whole(a) for a in args[:-1]] + [layer_block],
        out_specs=layer_block,
        input_output_aliases={len(tables): 0},
        interpret=interpret,
        **({} if interpret or num_warps is None else {"compiler_params": _warps(num_warps)}),
    )(*args)
    return out.reshape(rows.shape)


def _warps(num_warps: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps)


def resolve_impl(impl: str, rows: jax.Array, platform: str) -> rows_lib.Mover | None:
    """The executor ``impl`` stands for on ``platform`` for rows [L * N, R]
    (`rows.Movers.direct`): None for ``scatter``, which has no ordered form, and for dtypes that
    do not move natively (bf16 and fp8 on the CPU, sub-byte types anywhere): those stage
    instead."""
    return rows_lib.Movers(impl, platform).direct(rows)


def move_leaves(leaves, src, dst, count, impls, *, slot_major: bool) -> list[jax.Array]:
    """Leaves [L, N, ...] (or [N, L, ...] slot-major) with each layer's ordered moves applied in
    place (``src``, ``dst`` int32[L, M] and ``count`` int32[L] as from `order_moves_layers`;
    ``impls`` from `resolve_impl`). The leaves' dtypes must move natively (see `layout`)."""
    out = []
    for x, impl in zip(leaves, impls, strict=True):
        rows = x.reshape(x.shape[0] * x.shape[1], -1)
        rows = apply_moves(rows, src, dst, count, impl=impl, slot_major=slot_major)
        out.append(rows.reshape(x.shape))
    return out


def apply_moves(
    rows: jax.Array,
    src: jax.Array,
    dst: jax.Array,
    count: jax.Array,
    *,
    impl: rows_lib.Mover | str = rows_lib.Mover.LOOP,
    interpret: bool | None = None,
    slot_major: bool = False,
) -> jax.Array:
    """Runs ordered local moves on every layer, in place.

    Args:
      rows: [L * N, R] the device's rows, layer-major (or [N * L, R] with ``slot_major``).
      src: int32[L, M] per layer, the source row of each move (N: the temporary).
      dst: int32[L, M] per layer, the destination row of each move (N: the temporary).
      count: int32[L] moves per layer.
      impl: ``pallas`` (one kernel for every layer; GPUs, rows of a multiple of 512 32-bit words,
        a layer below 2^31 words) or ``loop`` (any backend; dtypes that move natively there, see
        `layout`).
      interpret: run the Pallas kernel in interpret mode; None: only on the CPU backend.
      slot_major: the rows are slot-major: row ``slot * L + layer``.

    Returns:
      ``rows`` with the moves applied.
    """
    n = rows.shape[0] // src.shape[0]
    executors = {
        rows_lib.Mover.PALLAS: lambda: _apply_pallas(
            rows, src, dst, count, n, interpret, slot_major
        ),
        rows_lib.Mover.LOOP: lambda: _apply_loop(rows, src, dst, count, n, slot_major),
    }
    if impl in executors:
        return executors[rows_lib.Mover(impl)]()
    raise ValueError(f"impl: expected 'pallas' or 'loop', got {impl!r}")

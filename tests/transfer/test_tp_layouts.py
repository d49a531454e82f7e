"""Tensor-parallel experts (TP x EP): rows move inside each shard, nothing is gathered.

Mesh ("ep", "tp") = (4, 2) on 8 CPU devices, leaves [L, P, H, F] sharded
``PartitionSpec(None, "ep", None, "tp")`` (and slot-major, one-layer, tuple-axis variants). For
every entry point that moves rows, the compiled program is read: no all-gather, all-reduce or
all-to-all of an operand as large as one local row, and temporary memory at most one layer of the
device's local shard plus the plan's tables. Every result is checked bit for bit against the
numpy model (tests/transfer_model.py). Each case compiles once.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jeplb
from jeplb._src import programs
from tests.transfer_model import check_rows, compilations, make_plan

# Declared or read specs never warn: a guess here would fail the test (pytest.warns still sees it).
pytestmark = [pytest.mark.devices(8), pytest.mark.filterwarnings("error::UserWarning")]

L, NL, H, F = 2, 2, 64, 128  # layers, slots per device, an expert's [H, F]
EP, TP = 4, 2
PT = EP * NL  # P
ROW = H * (F // TP) * 4  # bytes of one local row (f32)
LOCAL_LAYER = NL * ROW  # one layer of one device's local shard: 32 KiB
TABLES = 24 * 1024  # the plan's tables, staging of C rows' bookkeeping (measured: ~20 KiB)
AUTO, EXPLICIT = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
TP_SPEC = P(None, "ep", None, "tp")

_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all)(-start)?\(", re.MULTILINE
)
_SHAPE = re.compile(r"(pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _shape_bytes(dtype: str, dims: str) -> int:
    size = _BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype)[:2] or 8) // 8)
    return size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))


def big_collectives(text: str, limit: int = ROW) -> list[str]:
    """Every all-gather / all-reduce / all-to-all of the HLO ``text`` whose result has an array of
    at least ``limit`` bytes (weight-sized: one local row or more)."""
    found = []
    for line in text.splitlines():
        m = _COLLECTIVE.search(line)
        if m and any(_shape_bytes(*s) >= limit for s in _SHAPE.findall(m.group(1))):
            found.append(line.strip()[:160])
    return found


def _mesh(shape=(EP, TP), names=("ep", "tp"), kind=AUTO) -> Mesh:
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, names, axis_types=(kind,) * len(names))


def _bits(seed: int, shape) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(0, 2**32, shape, dtype=np.uint32)
    return raw.view(np.float32)


def _u8(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x)).view(np.uint8)


def _assert_lean(compiled, local_layer: int = LOCAL_LAYER) -> None:
    assert big_collectives(compiled.as_text()) == []
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= local_layer + TABLES, (temp, local_layer)


def _plans(d=EP):
    return [make_plan(kind, seed, L, PT, 6, d) for kind, seed in (("random", 1), ("hotspot", 2))]


def test_detector_sees_the_gather_of_a_wrong_spec():
    # A traced leaf on an Auto mesh declared whole over "tp" (what jeplb once guessed for an
    # undeclared one, and now refuses to): the program gathers it, what the checks below must
    # never find.
    mesh = _mesh()
    w = jax.device_put(jnp.zeros((L, PT, H, F)), NamedSharding(mesh, TP_SPEC))
    old, new = _plans()[0]
    whole = P(None, "ep")
    f = jax.jit(
        lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh, expert_specs=whole)[0]
    )
    compiled = f.lower(old, new, w).compile()
    assert any("all-gather" in line for line in big_collectives(compiled.as_text()))
    assert compiled.memory_analysis().temp_size_in_bytes > 2 * LOCAL_LAYER + TABLES


@pytest.mark.parametrize("slot_major", [False, True], ids=["layer-major", "slot-major"])
def test_jitted_rearrange_with_declared_specs(slot_major):
    mesh = _mesh()
    spec = P("ep", None, None, "tp") if slot_major else TP_SPEC
    axes = dict(layer_axis=1, slot_axis=0) if slot_major else {}
    bits = _bits(3, (PT, L, H, F) if slot_major else (L, PT, H, F))
    w = jax.device_put(bits, NamedSharding(mesh, spec))

    @jax.jit
    def f(o, n, w):
        return jeplb.rearrange_expert_weights(o, n, w, mesh=mesh, expert_specs=spec, **axes)[0]

    plans = _plans()
    before = bits
    with compilations() as seen:
        for old, new in plans:  # one compilation serves both plans
            w = f(old, new, w)
            assert w.sharding.spec == spec
            after = np.asarray(w)
            t = (lambda x: x.transpose(1, 0, 2, 3)) if slot_major else (lambda x: x)
            check_rows(_u8(t(before)), _u8(t(after)), old, new, EP)
            before = after
    assert len(seen) == 1 and f._cache_size() == 1
    _assert_lean(f.lower(*plans[0], w).compile())


def test_tuple_expert_axis_with_tensor_axis():
    mesh = _mesh((2, 2, 2), ("ctx", "ep", "tp"))
    spec = P(None, ("ctx", "ep"), None, "tp")
    bits = _bits(4, (L, PT, H, F))
    w = jax.device_put(bits, NamedSharding(mesh, spec))
    old, new = _plans(4)[1]
    f = jax.jit(
        lambda o, n, w: jeplb.rearrange_expert_weights(
            o, n, w, mesh=mesh, axis_name=("ctx", "ep"), expert_specs={"w": spec}
        )[0]
    )
    compiled = f.lower(old, new, {"w": w}).compile()
    _assert_lean(compiled)
    out = compiled(old, new, {"w": w})["w"]
    assert out.sharding.spec == spec
    check_rows(_u8(bits), _u8(out), old, new, 4)


def test_explicit_mesh_needs_no_declared_specs():
    # On a mesh of Explicit axes the traced leaf carries its spec.
    mesh = _mesh(kind=EXPLICIT)
    bits = _bits(5, (L, PT, H, F))
    w = jax.device_put(bits, NamedSharding(mesh, TP_SPEC))
    old, new = _plans()[0]
    f = jax.jit(lambda o, n, w: jeplb.rearrange_expert_weights(o, n, w, mesh=mesh)[0])
    with jax.set_mesh(mesh):
        compiled = f.lower(old, new, w).compile()
    _assert_lean(compiled)
    out = compiled(old, new, w)
    assert out.sharding.spec == TP_SPEC
    check_rows(_u8(bits), _u8(out), old, new, EP)


def _recorded(monkeypatch) -> list:
    """The programs `programs.build` returns, recorded as they are built or looked up."""
    seen = []
    build = programs.build

    def recording(*args, **kwargs):
        seen.append(build(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(programs, "build", recording)
    return seen


def test_eager_rearrange_and_sync(monkeypatch):
    # Concrete leaves say their own sharding: the eager programs are lean too.
    mesh = _mesh()
    seen = _recorded(monkeypatch)
    bits = _bits(6, (L, PT, H, F))
    w = jax.device_put(bits, NamedSharding(mesh, TP_SPEC))
    old, new = _plans()[1]
    out, _ = jeplb.rearrange_expert_weights(old, new, w, mesh=mesh, donate=False)
    _assert_lean(seen[-1].lower(old, new, [w]).compile())
    assert out.sharding.spec == TP_SPEC
    check_rows(_u8(bits), _u8(out), old, new, EP)
    summed = jeplb.sync_replica_grads(w, new, mesh=mesh)
    _assert_lean(seen[-1].lower(new, [w]).compile())
    assert summed.sharding.spec == TP_SPEC


def test_jitted_transfer_layer():
    mesh = _mesh()
    spec = P("ep", None, "tp")
    bits = _bits(7, (PT, H, F))
    w = jax.device_put(bits, NamedSharding(mesh, spec))
    old, new = (m[:1] for m in _plans()[0])
    f = jax.jit(
        lambda o, n, w: jeplb.transfer_layer(o, n, w, mesh=mesh, expert_specs=spec)[0],
        donate_argnums=2,
    )
    compiled = f.lower(old[0], new[0], w).compile()
    _assert_lean(compiled)
    out = compiled(old[0], new[0], w)
    assert out.sharding.spec == spec
    check_rows(_u8(bits[None]), _u8(np.asarray(out)[None]), old, new, EP)


SLOT_MAJOR = pytest.mark.parametrize("slot_major", [False, True], ids=["layer", "slot-major"])


def _layout(slot_major: bool):
    """(spec, layout keywords, to [P, L, ...] and back) of a stack laid out either way."""
    if slot_major:
        return P("ep", None, None, "tp"), dict(layer_axis=1, slot_axis=0)
    return TP_SPEC, {}


def _t(x, slot_major: bool):
    return np.swapaxes(x, 0, 1) if slot_major else x


@SLOT_MAJOR
def test_jitted_sync_replica_grads(slot_major):
    mesh = _mesh()
    spec, axes = _layout(slot_major)
    g = np.random.default_rng(8).standard_normal((L, PT, H, F)).astype(np.float32)
    x = jax.device_put(np.ascontiguousarray(_t(g, slot_major)), NamedSharding(mesh, spec))
    m = make_plan("random", 9, L, PT, 5, EP)[0]
    f = jax.jit(lambda g, m: jeplb.sync_replica_grads(g, m, mesh=mesh, expert_specs=spec, **axes))
    compiled = f.lower(x, m).compile()
    _assert_lean(compiled)
    out = compiled(x, m)
    assert out.sharding.spec == spec
    want = g.copy()
    for layer in range(L):
        for e in set(m[layer].tolist()) - {-1}:
            slots = np.nonzero(m[layer] == e)[0]
            total = g[layer, slots[0]].copy()
            for p in slots[1:]:
                total = total + g[layer, p]
            want[layer, slots] = total
    np.testing.assert_array_equal(_u8(_t(np.asarray(out), slot_major)), _u8(want))


def _state(mesh, num_experts=6):
    return jeplb.EplbState.create(
        num_layers=L,
        num_experts=num_experts,
        num_devices=EP,
        num_redundant_experts=PT - num_experts,
        window_size=1,
        step_interval=1,
    ).replicated(mesh)


def _logical(seed, num_experts=6):
    return np.random.default_rng(seed).standard_normal((L, num_experts, H, F)).astype(np.float32)


@SLOT_MAJOR
def test_jitted_eplb_step(slot_major):
    mesh = _mesh()
    spec, axes = _layout(slot_major)
    state = _state(mesh)
    logical = _logical(10)
    w = jeplb.place_experts(
        jax.device_put(np.ascontiguousarray(_t(logical, slot_major)),
                       NamedSharding(mesh, P(None, None, None, "tp"))),
        state.phy2log,
        mesh=mesh,
        **axes,
    )  # fmt: skip
    load = jnp.asarray(np.tile(np.arange(1, 7) ** 3, (L, 1)), jnp.int32)

    @jax.jit
    def step(state, w):
        return jeplb.eplb_step(state.record(load), w, mesh=mesh, expert_specs={"w": spec}, **axes)

    compiled = step.lower(state, {"w": w}).compile()
    _assert_lean(compiled)
    state, out, info = compiled(state, {"w": w})
    assert bool(info.fired) and out["w"].sharding.spec == spec
    phy2log = np.asarray(state.phy2log)
    np.testing.assert_array_equal(
        _t(np.asarray(out["w"]), slot_major),
        np.take_along_axis(logical, phy2log[..., None, None], 1),
    )


def test_step_and_stages_inside_shard_map():
    # eplb_step_local and move_to_buffer / move_from_buffer inside the user's shard_map, manual
    # over both axes: each device's [.., F / TP] shard moves as it is.
    mesh = _mesh()
    state = _state(mesh)
    logical = _logical(11)
    w = jeplb.place_experts(
        jax.device_put(logical, NamedSharding(mesh, P(None, None, None, "tp"))),
        state.phy2log,
        mesh=mesh,
    )
    load = jnp.asarray(np.tile(np.arange(6, 0, -1) ** 3, (L, 1)), jnp.int32)
    old1, new1 = (m[0] for m in _plans()[0])

    def body(state, w, old, new):
        state, w, info = jeplb.eplb_step_local(state.record(load), w)
        layer = w[0]
        buf, meta = jeplb.move_to_buffer(old, new, layer)
        layer = jeplb.move_from_buffer(layer, buf, meta)
        return state, w, info, layer

    f = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P(), TP_SPEC, P(), P()),
            out_specs=(P(), TP_SPEC, P(), P("ep", None, "tp")),
        )
    )
    compiled = f.lower(state, w, old1, new1).compile()
    _assert_lean(compiled, 2 * LOCAL_LAYER)  # the step's layer + move_to_buffer's buffer
    state, out, info, layer = compiled(state, w, old1, new1)
    phy2log = np.asarray(state.phy2log)
    assert bool(info.fired)
    np.testing.assert_array_equal(
        np.asarray(out), np.take_along_axis(logical, phy2log[..., None, None], 1)
    )
    check_rows(_u8(np.asarray(out)[:1]), _u8(np.asarray(layer)[None]), old1[None], new1[None], EP)


def test_declared_specs_are_checked():
    mesh = _mesh()
    w = jax.device_put(jnp.zeros((L, PT, H, F)), NamedSharding(mesh, TP_SPEC))
    old, new = _plans()[0]
    call = dict(mesh=mesh, donate=False)
    with pytest.raises(ValueError, match=r"expert_specs\['a'\] is PartitionSpec\(None, 'ep'\), "
                       r"but expert_weights\['a'\] is sharded PartitionSpec\(None, 'ep', None, "
                       r"'tp'\)"):  # fmt: skip
        jeplb.rearrange_expert_weights(old, new, {"a": w}, expert_specs=P(None, "ep"), **call)
    with pytest.raises(ValueError, match=r"expert_specs\['a'\] is PartitionSpec\('ep'\); its "
                       r"slot dim 1 must be sharded over exactly 'ep'"):  # fmt: skip
        jeplb.rearrange_expert_weights(old, new, {"a": w}, expert_specs={"a": P("ep")}, **call)
    with pytest.raises(ValueError, match=r"expert_specs\['a'\] .* the mesh has no axis 'x'"):
        jeplb.rearrange_expert_weights(
            old, new, {"a": w}, expert_specs={"a": P(None, "ep", "x")}, **call
        )
    with pytest.raises(ValueError, match=r"expert_specs: expected a PartitionSpec or a pytree"):
        jeplb.rearrange_expert_weights(old, new, {"a": w}, expert_specs={"b": TP_SPEC}, **call)
    with pytest.raises(TypeError, match=r"expert_specs\['a'\] is a str"):
        jeplb.rearrange_expert_weights(old, new, {"a": w}, expert_specs={"a": "ep"}, **call)


def test_layout_hints_name_the_keywords():
    mesh = _mesh()
    old, new = make_plan("random", 1, 4, 16, 8, EP)  # L = 4, P = 16
    slot_major = jax.device_put(jnp.zeros((16, 4, 8)), NamedSharding(mesh, P("ep")))
    with pytest.raises(ValueError, match=r"expected leading dims L = 4 x P = 16; got them swapped: "
                       r"for slot-major stacks \[P, L, \.\.\.\] pass layer_axis=1, slot_axis=0"):  # fmt: skip
        jeplb.rearrange_expert_weights(old, new, slot_major, mesh=mesh)
    one = jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P("ep")))
    with pytest.raises(
        ValueError, match=r"a leaf of one layer \[P, \.\.\.\] moves with transfer_layer"
    ):
        jeplb.rearrange_expert_weights(old, new, one, mesh=mesh)
    stacked = jax.device_put(jnp.zeros((4, 16, 8)), NamedSharding(mesh, P(None, "ep")))
    with pytest.raises(ValueError, match=r"stacked leaves \[L, P, \.\.\.\] move with rearrange"):
        jeplb.transfer_layer(old[0], new[0], stacked, mesh=mesh)
    square = jax.device_put(jnp.zeros((8, 8, 8)), NamedSharding(mesh, P("ep")))
    o8, n8 = make_plan("random", 2, 8, 8, 4, EP)  # L = P = 8: the sharding says which is which
    with pytest.raises(ValueError, match=r"the expert axis is on dim 0; for slot-major stacks"):
        jeplb.rearrange_expert_weights(o8, n8, square, mesh=mesh)


def test_recover_experts_with_tensor_axis(monkeypatch):
    # Rank 3 of ("ep", "tp") = (4, 2) is lost (both of its devices): the survivors' shards stay
    # where they are, experts 4 and 5 of layer 0 (held only by rank 3) come from the loader, each
    # device writing its "tp" half of the row, and the transfer moves rows inside each shard.
    old_mesh, new_mesh = _mesh(), _mesh((3, TP))
    logical = _logical(12)
    old = np.array([[0, 1, 2, 3, 0, 2, 4, 5], [5, 4, 3, 2, 1, 0, 0, 1]], np.int32)
    w = jax.device_put(
        np.take_along_axis(logical, old[..., None, None], 1), NamedSharding(old_mesh, TP_SPEC)
    )
    seen = _recorded(monkeypatch)
    out, rec = jeplb.recover_experts(old, {"w": w}, lambda layer, e: {"w": logical[layer, e]},
                                     mesh=new_mesh)  # fmt: skip
    assert rec.lost_devices == (3,) and rec.loaded == ((0, 4), (0, 5))
    assert out["w"].sharding == NamedSharding(new_mesh, TP_SPEC)
    phy2log = np.asarray(rec.phy2log)
    np.testing.assert_array_equal(
        np.asarray(out["w"]), np.take_along_axis(logical, phy2log[..., None, None], 1)
    )
    staged = jax.device_put(np.zeros((L, 3 * NL, H, F), np.float32), out["w"].sharding)
    _assert_lean(seen[-1].lower(phy2log, phy2log, [staged]).compile())
    with pytest.raises(ValueError, match=r"mesh: axes other than 'ep' \{\} differ from the old"):
        jeplb.recover_experts(old, {"w": w}, lambda layer, e: None,
                              mesh=_mesh((3,), ("ep",)))  # fmt: skip

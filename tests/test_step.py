"""The rebalance step: schedule, window, maps/weights consistency, progressive invariance, one trace.

A tiny MoE model (integer-valued float32 activations and weights, so every sum is exact) runs with
`dispatch` and `eplb_step` in one jitted program per configuration; each step's output must equal a
numpy reference computed from the *logical* weights, bit for bit, whatever the placement.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jeplb._src.dispatch import dispatch
from jeplb._src.metrics import balancedness
from jeplb._src.state import EplbState
from jeplb._src.step import eplb_step, eplb_step_local
from tests.helpers import mesh_of

pytestmark = pytest.mark.devices(8)  # 8-device meshes on the default backend

D, E, R, H, T, K = 8, 8, 8, 4, 48, 2  # P = 16 slots, N_local = 2


class Model:
    """Logical weights, routing and the reference output of the tiny MoE model."""

    def __init__(self, num_layers: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.num_layers = num_layers
        self.w = rng.integers(-1, 2, (num_layers, E, H, H)).astype(np.float32)
        raw = rng.integers(0, 256, (num_layers, E, 3, 2), dtype=np.uint8)
        self.aux = raw.view(jnp.bfloat16).reshape(num_layers, E, 3)  # rides along, bit-exact
        # A skewed router: expert popularity differs per layer.
        self.logp = np.stack(
            [np.log(rng.permutation(1.0 / np.arange(1, E + 1) ** 1.5)) for _ in range(num_layers)]
        )

    def physical(self, phy2log, mesh):
        lay = np.arange(self.num_layers)[:, None]
        p2l = np.asarray(phy2log)
        sharding = NamedSharding(mesh, P(None, "ep"))
        return {
            "w": jax.device_put(self.w[lay, p2l], sharding),
            "aux": jax.device_put(self.aux[lay, p2l], sharding),
        }

    def batch(self, rng, masked: bool = False):
        x = rng.integers(-2, 3, (T, H)).astype(np.float32)
        g = rng.gumbel(size=(self.num_layers, T, E)) + self.logp[:, None, :]
        ids = np.argsort(-g, axis=-1)[..., :K].astype(np.int32)  # distinct experts per token
        valid = np.zeros(T, bool) if masked else rng.random(T) < 0.85
        return x, ids, valid

    def reference(self, x, ids):
        for lay in range(self.num_layers):
            y = np.einsum("th,tkhg->tkg", x, self.w[lay][ids[lay]])
            acc = y[:, 0]
            for k in range(1, K):
                acc = acc + y[:, k]
            x = np.maximum(acc, 0.0)
        return x


def forward(state, weights, x, ids, valid):
    """The model at global view: dispatch, gather each token's slots, combine in top-k order."""
    for lay in range(state.num_layers):
        state, phys = dispatch(state, lay, ids[lay], valid=valid)
        y = jnp.einsum("th,tkhg->tkg", x, weights["w"][lay][phys])
        acc = y[:, 0]
        for k in range(1, K):
            acc = acc + y[:, k]
        x = jnp.maximum(acc, 0.0)
    return x, state


def make_program(mesh, counter):
    def train_step(state, weights, x, ids, valid):
        counter[0] += 1
        y, state = forward(state, weights, x, ids, valid)
        state, weights, info = eplb_step(state, weights, mesh=mesh)
        return state, weights, y, info

    return jax.jit(train_step, donate_argnums=(0, 1))


def check_consistent(state, weights, model):
    """Every slot holds its logical expert's weights, bit for bit; the maps agree."""
    p2l = np.asarray(state.phy2log)
    lay = np.arange(model.num_layers)[:, None]
    np.testing.assert_array_equal(np.asarray(weights["w"]), model.w[lay, p2l])
    got = np.asarray(weights["aux"]).view(np.uint16)
    np.testing.assert_array_equal(got, model.aux[lay, p2l].view(np.uint16))
    l2p, cnt = np.asarray(state.log2phy), np.asarray(state.logcnt)
    for i in range(model.num_layers):
        for e in range(E):
            listed = l2p[i, e][l2p[i, e] >= 0]
            assert sorted(listed.tolist()) == np.flatnonzero(p2l[i] == e).tolist()
            assert cnt[i, e] == len(listed)


def run(model, state, steps, mesh, *, masked_steps=(), seed=1):
    """Runs the jitted step; checks outputs and consistency after every step; returns a log."""
    counter = [0]
    program = make_program(mesh, counter)
    weights = model.physical(state.phy2log, mesh)
    rng = np.random.default_rng(seed)
    log = []
    for i in range(steps):
        x, ids, valid = model.batch(rng, masked=i in masked_steps)
        before = np.asarray(state.phy2log)
        state, weights, y, info = program(state, weights, x, ids, valid)
        np.testing.assert_array_equal(np.asarray(y), model.reference(x, ids), err_msg=f"step {i}")
        check_consistent(state, weights, model)
        counts = np.stack(
            [np.bincount(ids[lay][valid].ravel(), minlength=E) for lay in range(model.num_layers)]
        )
        log.append(
            dict(
                info=jax.device_get(info),
                counts=counts,
                before=before,
                after=np.asarray(state.phy2log),
                cursor=int(state.cursor),
                window=np.asarray(state.window),
                window_total=np.asarray(state.window_total),
                window_leaving=np.asarray(state.window_leaving),
                window_pos=int(state.window_pos),
            )
        )
    return state, weights, log, counter[0], program


# --------------------------------------------------------------------------- all layers at once


@pytest.fixture(scope="module")
def whole_run(mesh):
    model = Model(num_layers=3, seed=0)
    state = EplbState.create(
        num_layers=3,
        num_experts=E,
        num_devices=D,
        num_redundant_experts=R,
        window_size=3,
        step_interval=4,
    ).replicated(mesh)
    # Steps 1-4 route nothing (masked): the first interval must not fire on an empty window.
    return run(model, state, 13, mesh, masked_steps=range(4))


def test_step_fires_at_the_interval_and_only_then(whole_run):
    _, _, log, _, _ = whole_run
    fired = [bool(e["info"].fired) for e in log]
    steps = [int(e["info"].step) for e in log]
    assert steps == list(range(1, 14))
    assert fired == [s in (8, 12) for s in steps]
    for e in log:
        moved = e["info"].moved
        assert moved.all() == bool(e["info"].fired) and moved.any() == moved.all()
        if not e["info"].fired:
            np.testing.assert_array_equal(e["after"], e["before"])
        assert e["cursor"] == 3 and not e["info"].in_progress


def test_window_slides_over_the_last_passes(whole_run):
    _, _, log, _, _ = whole_run
    w = 3
    for i, e in enumerate(log):
        want = np.zeros((w, 3, E), np.int64)
        for j in range(max(0, i - w + 1), i + 1):
            want[j % w] = log[j]["counts"]
        np.testing.assert_array_equal(e["window"], want, err_msg=f"step {i}")
        assert e["window_pos"] == (i + 1) % w


def test_window_total_is_the_window_sum_after_every_step(whole_run, tmp_path):
    # 13 steps through a window of 3: the running total wraps round four times.
    state, _, log, _, _ = whole_run
    for i, e in enumerate(log):
        np.testing.assert_array_equal(e["window_total"], e["window"].sum(0), err_msg=f"step {i}")
        np.testing.assert_array_equal(e["window_leaving"], e["window"][e["window_pos"]])
    assert log[-1]["window_total"].sum() > 0
    state.check_window()
    path = tmp_path / "eplb.npz"
    state.save(path)
    back = EplbState.restore(path)
    back.check_window()
    np.testing.assert_array_equal(back.window_total, log[-1]["window_total"])


def test_idle_step_has_no_window_sized_temporary():
    # The window is written in place (one row) and its sum kept as a running total: the step's
    # temporary memory does not grow with the window (bytes of alignment aside), and the window
    # is aliased (donated), not copied. The window is the state's, whatever the devices: one
    # device, whose one-row program is the one the test below checks (one compilation fewer).
    one, window_row = big_step_memory(1, 1)
    many, window_bytes = big_step_memory(1, 512)
    assert window_bytes == 512 * window_row
    assert many.temp_size_in_bytes - one.temp_size_in_bytes < window_bytes // 10
    assert many.alias_size_in_bytes - one.alias_size_in_bytes >= window_bytes - window_row


def test_rebalance_moves_experts_and_raises_balancedness(whole_run):
    _, _, log, _, _ = whole_run
    fire = [i for i, e in enumerate(log) if e["info"].fired]
    first = log[fire[0]]
    assert not np.array_equal(first["after"], first["before"])
    assert first["info"].remote_rows.sum() > 0
    before = log[fire[0] - 1]["info"].balancedness
    assert first["info"].balancedness > before + 0.05, (before, first["info"])
    assert first["info"].layer_ok.all()


def test_one_compilation_for_every_step(whole_run):
    _, _, _, traces, program = whole_run
    assert traces == 1
    assert program._cache_size() == 1


def test_balancedness_matches_its_definition():
    load = np.array([[4.0, 2.0, 2.0, 0.0]])
    p2l = np.array([[0, 0, 1, 2, 3, 1]])  # devices: {0, 0}, {1, 2}, {3, 1}
    b = balancedness(p2l, load, 3)
    per_layer, total = b.layer_balancedness, b.balancedness
    dev = np.array([4.0, 1.0 + 2.0, 0.0 + 1.0])
    np.testing.assert_allclose(per_layer, [dev.mean() / dev.max()])
    np.testing.assert_allclose(total, dev.mean() / dev.max())


# ----------------------------------------------------------------------------- progressive mode


@pytest.fixture(scope="module")
def progressive_run(mesh):
    model = Model(num_layers=4, seed=3)
    state = EplbState.create(
        num_layers=4,
        num_experts=E,
        num_devices=D,
        num_redundant_experts=R,
        window_size=2,
        step_interval=5,
        layers_per_step=1,
    ).replicated(mesh)
    return run(model, state, 12, mesh, seed=4)


def test_progressive_outputs_identical_before_during_after(progressive_run):
    # run() already compared every step's output with the reference, bit for bit, and the
    # weights with the maps; here: the rebalance really was spread over the steps.
    _, _, log, traces, _ = progressive_run
    assert traces == 1
    cursors = [e["cursor"] for e in log]
    moved = [np.flatnonzero(e["info"].moved).tolist() for e in log]
    # Steps 5 and 10 plan; layer j moves at step 5 + j (one layer per step).
    assert [bool(e["info"].fired) for e in log] == [i + 1 in (5, 10) for i in range(12)]
    assert moved[4:8] == [[0], [1], [2], [3]] and moved[9:12] == [[0], [1], [2]]
    assert cursors[4:8] == [1, 2, 3, 4] and cursors[9:12] == [1, 2, 3]
    assert all(m == [] for m in moved[:4] + moved[8:9])
    # During the rebalance the model ran with mixed maps: moved layers on the target placement,
    # the others still on the old one (and outputs stayed exact).
    mid = log[5]
    assert mid["info"].in_progress
    changed = [not np.array_equal(mid["after"][i], log[3]["after"][i]) for i in range(4)]
    assert changed[:2] == [True, True] and changed[2:] == [False, False]


def test_progressive_layer_maps_switch_with_their_weights(progressive_run):
    _, _, log, _, _ = progressive_run
    for e in log:
        for i in range(4):
            if not e["info"].moved[i]:
                np.testing.assert_array_equal(e["after"][i], e["before"][i])


# ------------------------------------------------------------------------ inside shard_map


def test_step_local_sums_partial_counts_inside_shard_map(mesh):
    """Tokens split over the devices: dispatch records per-device counts, the step sums them
    (the first step traced idle, ``idle=True``: it sums them too; the second rebalances)."""
    model = Model(num_layers=2, seed=5)
    state = EplbState.create(
        num_layers=2, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=2,
        step_interval=2,
    ).replicated(mesh)  # fmt: skip
    weights = model.physical(state.phy2log, mesh)
    wspec = {"w": P(None, "ep"), "aux": P(None, "ep")}

    def body(state, weights, ids, valid, *, idle):
        t_local = ids.shape[1]
        first = jax.lax.axis_index("ep") * t_local
        for lay in range(2):
            state, _ = dispatch(
                state, lay, ids[lay], valid=valid, token_index=first + jnp.arange(t_local)
            )
        return eplb_step_local(state, weights, load_axes="ep", idle=idle)

    f = [
        jax.jit(
            jax.shard_map(
                functools.partial(body, idle=idle),
                mesh=mesh,
                in_specs=(P(), wspec, P(None, "ep"), P("ep")),
                out_specs=(P(), wspec, P()),
            ),
            donate_argnums=(0, 1),
        )
        for idle in (True, False)
    ]
    rng = np.random.default_rng(6)
    total = np.zeros((2, E), np.int64)
    for i in range(2):
        _, ids, valid = model.batch(rng)
        state, weights, info = f[i](state, weights, ids, valid)
        counts = np.stack([np.bincount(ids[lay][valid].ravel(), minlength=E) for lay in range(2)])
        np.testing.assert_array_equal(state.window[i], counts)
        total += counts
        assert int(state.pass_load.sum()) == 0
        check_consistent(state, weights, model)
    assert bool(info.fired) and bool(info.moved.all())
    assert not np.array_equal(np.asarray(state.phy2log), np.tile(np.arange(E + R) % E, (2, 1)))


def test_step_local_checks_load_axes(mesh):
    state = EplbState.create(
        num_layers=2, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=2,
        step_interval=2,
    )  # fmt: skip
    w = jnp.zeros((2, E + R, 3))

    def trace(body, *args):
        specs = (P(), P(None, "ep")) + (P("ep"),) * (len(args) - 2)
        f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(), P(None, "ep"), P()))
        return jax.eval_shape(f, *args)

    with pytest.raises(ValueError, match=r"load_axes: state.pass_load does not vary over 'ep'"):
        trace(lambda s, w: eplb_step_local(s, w, load_axes="ep"), state, w)

    def unsummed(s, w, ids):
        s, _ = dispatch(s, 0, ids)
        return eplb_step_local(s, w)

    with pytest.raises(ValueError, match=r"holds per-device partial counts over \['ep'\]"):
        trace(unsummed, state, w, jnp.zeros((D, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"no mesh axis 'ep' is bound here"):
        eplb_step_local(state, w)


def test_step_rejects_bad_arguments(mesh):
    state = EplbState.create(
        num_layers=2, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=2,
        step_interval=2,
    )  # fmt: skip
    good = jax.device_put(jnp.zeros((2, E + R, 3)), NamedSharding(mesh, P(None, "ep")))
    small = mesh_of(4)
    with pytest.raises(
        ValueError,
        match=r"mesh: axis 'ep' has 4 devices, but the state was built for num_devices = 8",
    ):
        eplb_step(state, good, mesh=small)
    with pytest.raises(ValueError, match=r"mesh: has no axis named 'ep'"):
        eplb_step(state, good, mesh=jax.make_mesh((8,), ("x",)))
    bad = jax.device_put(jnp.zeros((2, E, 3)), NamedSharding(mesh, P(None, "ep")))
    with pytest.raises(
        ValueError,
        match=r"expert_weights has shape \(2, 8, 3\), expected leading dims L = 2 x P = 16",
    ):
        eplb_step(state, bad, mesh=mesh)
    with pytest.raises(TypeError, match=r"state: expected an EplbState, got dict"):
        eplb_step({}, good, mesh=mesh)
    with pytest.raises(
        ValueError,
        match=r"expert_weights is sharded PartitionSpec\(\); its slot dim 1 must be sharded over",
    ):
        eplb_step(state, jax.device_put(good, NamedSharding(mesh, P())), mesh=mesh)


@functools.cache
def big_step_memory(d: int, window_size: int):
    """The memory analysis of `eplb_step` compiled for d devices, N = 16 slots each, 4 layers of
    64 KiB bf16 rows and a small f32 leaf, with a window of ``window_size`` rows; and the bytes of
    the window. Cached: the two tests that read it share the compilations."""
    mesh = mesh_of(d)
    n, num_layers = 16, 4
    state = EplbState.create(
        num_layers=num_layers,
        num_experts=12 * d,
        num_devices=d,
        num_redundant_experts=4 * d,
        window_size=window_size,
        step_interval=2,
    )
    step = jax.jit(lambda s, w: eplb_step(s, w, mesh=mesh), donate_argnums=(0, 1))
    stats = step.lower(state, big_leaves(mesh, n, num_layers)).compile().memory_analysis()
    return stats, state.window.nbytes


def big_leaves(mesh, n: int, num_layers: int) -> list:
    sharding = NamedSharding(mesh, P(None, "ep"))
    d = mesh.size
    return [
        jax.ShapeDtypeStruct((num_layers, n * d, 8, 64, 64), jnp.bfloat16, sharding=sharding),
        jax.ShapeDtypeStruct((num_layers, n * d, 16), jnp.float32, sharding=sharding),
    ]


@pytest.mark.parametrize("d", [1, 8])
def test_step_temporary_memory_within_a_layer(d):
    # The step moves its due layers through the same engine as rearrange_expert_weights, in
    # place: at most one layer of the device's local weights (bf16 rows travel through their
    # bits on XLA:CPU). Rows of 64 KiB make the policy's and the plan's integer tables (about
    # 170 KB at P = 128, whatever the weights) small next to a layer.
    if len(jax.devices()) < d:
        pytest.skip(f"needs {d} devices")
    stats, _ = big_step_memory(d, 1)
    n, num_layers = 16, 4
    leaves = big_leaves(jax.make_mesh((d,), ("ep",)), n, num_layers)
    layer_local = sum(np.prod(x.shape[2:]) * x.dtype.itemsize for x in leaves) * n
    assert stats.temp_size_in_bytes <= layer_local
    assert stats.alias_size_in_bytes >= num_layers * layer_local  # the weights, in place


# ------------------------------------------------------------- idle steps known on the host


def _program_of(mesh, *, idle: bool):
    def train_step(state, weights, x, ids, valid):
        y, state = forward(state, weights, x, ids, valid)
        state, weights, info = eplb_step(state, weights, mesh=mesh, idle=idle)
        return state, weights, y, info

    return jax.jit(train_step, donate_argnums=(0, 1))


@pytest.mark.parametrize("layers_per_step, dues", [(2, [4, 5, 8, 9]), (None, [4, 8])])
def test_host_scheduled_idle_steps_change_nothing_but_the_conditional(mesh, layers_per_step, dues):
    # The same progressive run twice: the device decides every step (one program with the
    # conditional), or HostSchedule.step_due picks an idle program (no conditional) or the full
    # one. Every output, weight, state leaf and StepInfo field is the same, bit for bit.
    import jeplb

    model = Model(num_layers=3, seed=7)

    def fresh():  # (the programs donate the state)
        return EplbState.create(
            num_layers=3, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=2,
            step_interval=4, layers_per_step=layers_per_step,
        ).replicated(mesh)  # fmt: skip

    full, idle = _program_of(mesh, idle=False), _program_of(mesh, idle=True)
    runs, due_steps = [], []
    for host in (False, True):
        state = fresh()
        sched = jeplb.HostSchedule.from_state(state)
        weights = model.physical(state.phy2log, mesh)
        rng, trace = np.random.default_rng(2), []
        for _ in range(11):
            due = sched.step_due() if host else True
            state, weights, y, info = (full if due else idle)(state, weights, *model.batch(rng))
            if host and due:
                sched.stepped(info)
                due_steps.append(int(info.step))
            trace.append(jax.device_get((state, weights, y, info)))
        runs.append(trace)
    # Plans at steps 4 and 8 (two layers, then the last one; or all three); the others idle.
    assert due_steps == dues
    assert [bool(t[3].fired) for t in runs[0]] == [i + 1 in (4, 8) for i in range(11)]
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"step {i + 1}")
    check_consistent(runs[1][-1][0], runs[1][-1][1], model)
    # The idle program has no conditional at all; the full one has.
    state = fresh()
    args = (state, model.physical(state.phy2log, mesh), *model.batch(np.random.default_rng(0)))
    assert _data_conds(jax.make_jaxpr(idle)(*args).jaxpr) == 0
    assert _data_conds(jax.make_jaxpr(full)(*args).jaxpr) > 0


def _data_conds(jaxpr) -> int:
    """The `cond`s in ``jaxpr`` and every jaxpr inside it that branch on a value (not those of
    `lax.platform_dependent`, which lowering resolves)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond" and not eqn.params.get("branches_platforms"):
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _data_conds(sub)
    return n


def test_an_idle_step_does_not_log(mesh):
    # log_interval's logging is a conditional around a debug callback: the idle program has
    # none (it would copy its predicate to the host), the full one has it.
    state = EplbState.create(
        num_layers=1, num_experts=E, num_devices=D, num_redundant_experts=R, log_interval=5
    ).replicated(mesh)
    w = jax.device_put(jnp.zeros((1, E + R, 3)), NamedSharding(mesh, P(None, "ep")))
    step = {i: functools.partial(eplb_step, mesh=mesh, idle=i) for i in (True, False)}
    idle, full = (jax.make_jaxpr(step[i])(state, w) for i in (True, False))
    assert _data_conds(idle.jaxpr) == 0 and "debug_callback" not in str(idle)
    assert _data_conds(full.jaxpr) > 0 and "debug_callback" in str(full)


def test_an_idle_step_where_a_rebalance_is_due_skips_it(mesh):
    model = Model(num_layers=2, seed=8)
    state = EplbState.create(
        num_layers=2, num_experts=E, num_devices=D, num_redundant_experts=R, window_size=2,
        step_interval=2,
    ).replicated(mesh)  # fmt: skip
    idle = _program_of(mesh, idle=True)
    weights = model.physical(state.phy2log, mesh)
    before = np.asarray(state.phy2log)
    rng = np.random.default_rng(0)
    for _ in range(2):
        state, weights, _, info = idle(state, weights, *model.batch(rng))
    assert int(info.step) == 2 and bool(info.skipped) and not bool(info.fired)
    assert not np.asarray(info.moved).any() and int(state.cursor) == 2
    np.testing.assert_array_equal(state.phy2log, before)
    check_consistent(state, weights, model)


def test_idle_must_be_a_python_bool(mesh):
    state = EplbState.create(num_layers=1, num_experts=E, num_devices=D, num_redundant_experts=R)
    w = jax.device_put(jnp.zeros((1, E + R, 3)), NamedSharding(mesh, P(None, "ep")))
    with pytest.raises(
        TypeError, match=r"idle: expected a bool, got ArrayImpl .* pass it as a static argument"
    ):
        eplb_step(state, w, mesh=mesh, idle=jnp.bool_(True))

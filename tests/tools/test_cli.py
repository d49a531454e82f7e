"""The jeplb command: the demo end to end at a tiny size (in-process; skipped without flax, which
the demo extra brings), flag errors, help texts, and the bench dispatcher."""

from __future__ import annotations

import json

import pytest

from jeplb.tools import cli as _cli

TINY = [
    "demo",
    "--layers", "2", "--experts", "8", "--redundant", "8", "--d-model", "16", "--d-ff", "32",
    "--batch", "2", "--seq-len", "16", "--steps", "8", "--interval", "3", "--window", "2",
    "--layers-per-step", "1", "--drift-every", "0", "--zipf", "1.5", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cpu_devices):
    # The demo's model is flax and its plot matplotlib (the demo and test extras); the flag and
    # help tests below need neither.
    pytest.importorskip("flax")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo")
    plot, figures = out / "demo.png", out / "demo.json"
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = _cli.main([*TINY, "--plot", str(plot), "--json", str(figures)])
    return rc, text.getvalue(), plot, json.loads(figures.read_text())


def test_demo_runs_end_to_end(demo_run):
    rc, text, plot, figures = demo_run
    assert rc == 0
    for label in (
        "balancedness",
        "max device load",
        "experts moved",
        "bytes moved",
        "rebalance time",
        "outputs identical:",
    ):
        assert label in text, label
    assert "yes, bitwise, on every step" in text
    assert text.count("jeplb demo: 8 cpu devices") == 1  # the header, once
    # The table's busiest device is the plot's tallest bar (each device's load over all layers).
    for when in ("before", "after"):
        r = figures[when]
        assert r["busiest_device_load"] == max(r["device_load"])
        assert r["busiest_device_load"] <= r["max_device_load"]
    assert f"plot written to {plot}" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figures["devices"] == 8 and figures["steps"] and len(figures["steps"]) == 8


def test_demo_rebalances_progressively_and_improves_balance(demo_run):
    _, _, _, r = demo_run
    assert r["rebalance_steps"] == [2, 5]  # the 3rd and 6th step plan
    assert [s["layers_moved"] for s in r["steps"]] == [0, 0, 1, 1, 0, 1, 1, 0]
    assert r["outputs_identical"] and all(s["identical"] for s in r["steps"])
    assert r["after"]["balancedness"] > r["before"]["balancedness"]
    assert r["after"]["max_device_load"] < r["before"]["max_device_load"]
    assert r["experts_received"] > 0
    assert r["bytes_moved"] == r["experts_received"] * 3 * 16 * 32 * 4


def test_demo_train_compares_with_the_model_without_replicas(tmp_path, cpu_devices):
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    pytest.importorskip("matplotlib")
    import contextlib
    import io

    argv = [*TINY, "--train", "--steps", "6", "--interval", "2", "--layers-per-step", "0"]
    plot, figures, text = tmp_path / "train.png", tmp_path / "train.json", io.StringIO()
    with contextlib.redirect_stdout(text):
        rc = _cli.main([*argv, "--plot", str(plot), "--json", str(figures)])
    assert rc == 0
    out, r = text.getvalue(), json.loads(figures.read_text())
    assert "replicas identical:               yes, bitwise" in out, out
    assert "loss with EPLB" in out and "max device load" in out
    assert r["replicas_identical"] and r["rebalance_steps"] == [1, 3, 5]
    assert len(r["loss"]["eplb"]) == len(r["loss"]["reference"]) == 6
    assert r["max_relative_loss_difference"] <= 1e-5
    assert r["shape"]["P"] == 16 and r["compile_seconds"]["eplb"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _demo_parser():
    return _cli.build_parser()._subparsers._group_actions[0].choices["demo"]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flags = [o for a in _demo_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert len(flags) > 15
    for flag in flags:
        assert flag in text, flag
    for action in _demo_parser()._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as exc:
        _cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "demo" in text and "bench" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["demo", "--steps", "many"], "argument --steps: expected a positive integer, got 'many'"),
        (["demo", "--redundant", "-1"], "argument --redundant: expected an integer >= 0, got -1"),
        (["demo", "--zipf", "11"], "argument --zipf: expected a number in [0, 10], got 11.0"),
        (["demo", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--experts", "4", "--top-k", "5"], "--top-k: expected at most --experts = 4"),
        (
            ["demo", "--layers", "2", "--layers-per-step", "3"],
            "--layers-per-step: expected at most",
        ),
        (["demo", "--interval", "2"], "--interval: a progressive rebalance of 4 layers"),
        (["demo", "--plot", "out.jpg"], "--plot: expected a file name ending in .png"),
        (["demo", "--train", "--lr", "0"], "--lr: expected a positive number, got 0.0"),
        (["demo", "--train", "--clip", "-1"], "--clip: expected a number >= 0, got -1.0"),
        (["bench", "nothing"], "argument name: invalid choice: 'nothing'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bench_forwards_its_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["bench", "step", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: jeplb bench step")
    for flag in ("--quick", "--json", "--out", "--repeats", "--warmup"):
        assert flag in text
    with pytest.raises(SystemExit) as exc:
        _cli.main(["bench", "step", "--repeats", "0"])
    assert exc.value.code == 2


def test_bench_without_its_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(_cli._BENCHES, "policy", ("jeplb._no_such_bench", "missing"))
    assert _cli.main(["bench", "policy", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "jeplb bench policy: this installation has no jeplb._no_such_bench module" in err


def test_idle_scale_table_reports_eplb_over_plain_and_the_idle_step_over_its_step():
    """`jeplb bench step --idle-scale`'s table: EPLB's whole cost against the step without EPLB
    of the same layout, and each idle step against the same step without it."""
    from jeplb.tools import bench_decode as bd
    from jeplb.tools import bench_step

    times = {bd.PLAIN: 100, bd.DISPATCH: 150, bd.IDLE_BIG: 170, bd.IDLE_ONE: 180}
    times.update({bd.ONCE: 110, bd.ONCE_IDLE: 140})
    rows = [
        dict(layout=layout, variant=v, call_us=t + shift, pipelined_us=t / 2, temp_bytes=2e6)
        for layout, shift in (("unrolled", 0), ("scanned", 1000))
        for v, t in times.items()
    ]
    table = bench_step.idle_markdown(rows).splitlines()
    split = ([c.strip() for c in line.strip().strip("|").split("|")] for line in table[2:])
    cells = {(c[0], c[1]): c[2:] for c in split}
    assert cells[("unrolled", bd.PLAIN)][2:6] == ["-", "-", "-", "-"]
    assert cells[("scanned", bd.ONCE_IDLE)][2:7] == ["+40", "+20", "+30", "+15", "2.00"]
    assert cells[("unrolled", bd.IDLE_ONE)][2:6] == ["+80", "+40", "+30", "+15"]
    assert cells[("unrolled", bd.DISPATCH)][2:7] == ["+50", "+25", "-", "-", "-"]

"""The API reference stays in sync with the code, and every public example runs."""

from __future__ import annotations

import doctest
import inspect
import pathlib
import sys

import pytest

import jeplb
from jeplb.tools import apidoc as _apidoc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_api_reference_is_in_sync():
    text = (ROOT / "docs" / "api.md").read_text()
    assert text == _apidoc.render(), (
        "docs/api.md is stale: regenerate it with `python -m jeplb.tools.apidoc > docs/api.md`"
    )


def test_public_surface_is_curated():
    names = _apidoc.public_names()
    assert "rearrange_expert_weights" in names and "rebalance_experts" in names
    for name in names:
        obj = getattr(jeplb, name)
        # Re-exported from a private module, documented, with an example.
        assert obj.__module__.startswith("jeplb._"), (name, obj.__module__)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"jeplb.{name} has no docstring"
        if inspect.isfunction(obj):
            assert ">>>" in doc, f"jeplb.{name}: public functions carry a runnable example"


# Examples that build an 8-device mesh on the default backend.
_EIGHT_DEVICES = {"recover_experts"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.devices(8)) if n in _EIGHT_DEVICES else n
        for n in _apidoc.public_names()
    ],
)
def test_docstring_examples_run(name):
    obj = getattr(jeplb, name)
    finder = doctest.DocTestFinder(recurse=inspect.isclass(obj))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    # Examples see their module's namespace, as when doctest runs the module itself.
    globs = {**vars(sys.modules[obj.__module__]), "jeplb": jeplb}
    tests = [t for t in finder.find(obj, f"jeplb.{name}", globs=globs) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of jeplb.{name} failed"

"""Renders docs/api.md from the public surface's docstrings (``python -m jeplb.tools.apidoc``).

A test compares docs/api.md with `render()`, so the reference cannot drift from the code.
"""

from __future__ import annotations

import inspect
import sys

import jeplb

__all__ = ["public_names", "render"]


def public_names() -> list[str]:
    """The names `jeplb` exports (its ``__all__``), sorted."""
    return sorted(jeplb.__all__)


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _section(name: str, obj) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function"
    out = [f"## `jeplb.{name}`", "", f"```python\n{kind} {name}{_signature(obj)}\n```", ""]
    out += [inspect.cleandoc(obj.__doc__ or "(undocumented)"), ""]
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_"):
                continue
            func = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            if isinstance(member, property):
                doc = inspect.cleandoc(member.__doc__ or "")
                out += [f"### `{name}.{attr}` (property)", "", doc, ""]
            elif inspect.isfunction(func):
                doc = inspect.cleandoc(func.__doc__ or "(undocumented)")
                sig = _signature(func)
                out += [f"### `{name}.{attr}`", "", f"```python\n{attr}{sig}\n```", "", doc, ""]
    return out


def render() -> str:
    """The whole API reference as markdown."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python -m jeplb.tools.apidoc > docs/api.md`; a test keeps",
        "it in sync. Letters: L layers, E logical experts, P physical slots, D devices on the",
        "expert-parallel axis, N_local = P // D slots per device, R_max replica columns.",
        "",
    ]
    names = public_names()
    lines += [f"- [`{n}`](#jeplb{n.lower()})" for n in names] + [""]
    for n in names:
        lines += _section(n, getattr(jeplb, n))
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())

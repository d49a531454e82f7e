"""The shape of the library's code: lines per module, the longest functions, parameters per
public function, repeated blocks.

Usage:
  python benchmarks/code_shape.py [--root DIR] [--json OUT]

``--root`` is a checkout of the project (default: this one), so the figures of an older commit can
be taken from a worktree of it and compared with today's. Reads files as text and with `ast`
(no import of the package), except for the public functions' parameters, which it reads from the
signatures of ``jeplb.__all__`` imported from ``--root``.
"""

from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import json
import os
import subprocess
import sys

WINDOW = 6  # lines that make a repeated block


def _modules(root: str) -> list[str]:
    src = os.path.join(root, "jeplb", "_src")
    out = []
    for folder, _, files in os.walk(src):
        out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _functions(path: str) -> list[tuple[int, str]]:
    """(body lines without the docstring, qualified name) of every function and method."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                body = child.body
                if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    body = body[1:] or body  # the docstring does not count
                found.append((child.end_lineno - body[0].lineno + 1, prefix + child.name))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")

    visit(tree, "")
    return found


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, normalised text) of the lines that count: no blanks, comments, imports,
    docstring-only lines or lone punctuation."""
    out = []
    with open(path) as f:
        text_lines = f.readlines()
    for i, line in enumerate(text_lines, 1):
        text = " ".join(line.split())
        if not text or text.startswith(("#", "import ", "from ", '"""')) or len(text) <= 2:
            continue
        out.append((i, text))
    return out


def repeated_blocks(paths: list[str]) -> int:
    """Runs of WINDOW or more identical normalised lines standing in two places (two files, or
    two places of one file): each run counted once per pair of places."""
    seen = collections.defaultdict(list)
    for path in paths:
        lines = _code_lines(path)
        for k in range(len(lines) - WINDOW + 1):
            chunk = "\n".join(t for _, t in lines[k : k + WINDOW])
            seen[hashlib.sha1(chunk.encode()).hexdigest()].append((path, k))
    runs = set()  # a run shows as consecutive windows at one offset between the two places
    for places in seen.values():
        for i, (pa, ka) in enumerate(places):
            for pb, kb in places[i + 1 :]:
                if pa != pb or abs(ka - kb) >= WINDOW:
                    runs.add((pa, pb, ka - kb))
    return len(runs)


def public_parameters(root: str) -> dict[str, int]:
    """Parameters of every public function (``jeplb.__all__``; of a class, its ``create``, if
    any), read in a subprocess that imports ``--root``'s package."""
    code = (
        "import inspect, json, sys\n"
        "import jeplb\n"
        "out = {}\n"
        "for name in jeplb.__all__:\n"
        "    obj = getattr(jeplb, name)\n"
        "    if inspect.isclass(obj):\n"
        "        if not hasattr(obj, 'create'):\n"
        "            continue\n"
        "        obj = obj.create\n"
        "    try:\n"
        "        sig = inspect.signature(obj)\n"
        "    except (TypeError, ValueError):\n"
        "        continue\n"
        "    out[name] = len([p for p in sig.parameters.values() if p.name != 'self'])\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def measure(root: str) -> dict:
    paths = _modules(root)
    lines = {}
    for path in paths:
        with open(path) as f:
            lines[os.path.relpath(path, root)] = len(f.readlines())
    funcs = sorted(
        ((n, f"{os.path.relpath(p, root)}:{q}") for p in paths for n, q in _functions(p)),
        reverse=True,
    )
    params = public_parameters(root)
    return {
        "modules": len(lines),
        "lines_total": sum(lines.values()),
        "largest_modules": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:8]),
        "longest_functions": {name: n for n, name in funcs[:8]},
        "functions_over_55_lines": sum(1 for n, _ in funcs if n > 55),
        "public_parameters": dict(sorted(params.items(), key=lambda kv: -kv[1])[:10]),
        "public_parameters_max": max(params.values()),
        "repeated_blocks": repeated_blocks(paths),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    figures = measure(os.path.abspath(args.root))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

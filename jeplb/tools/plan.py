"""``jeplb plan``: a placement file planned from a recorded load.

Reads the load, runs a placement policy and writes a placement file (`jeplb.write_placement`)
that a deployment starts from (`jeplb.read_placement`, then `jeplb.EplbState.from_placement`).

The load is either a state saved by `jeplb.EplbState.save` (its ``window_load()``, the window's
sum; its sizes, device count and policy are the defaults) or an [L, E] array of token counts per
layer and logical expert: ``.npy``, ``.npz`` (its one array, or the one named ``load``) or
``.json`` (nested lists, or an object with a ``load`` entry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import zipfile
from typing import Any

import numpy as np

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``jeplb plan``."""
    p.add_argument(
        "load",
        help="the recorded load: a saved EplbState (.json/.npz, its window's sum) or an [L, E] "
        "array of token counts (.npy, .npz, .json)",
    )
    p.add_argument("-o", "--out", required=True, help="the placement file to write (.json or .npz)")
    p.add_argument(
        "--devices",
        type=_positive,
        help="D, devices the slots are spread over (default: the saved state's; required for "
        "an array)",
    )
    slots = p.add_mutually_exclusive_group()
    slots.add_argument(
        "--slots",
        type=_positive,
        help="P, physical slots per layer (default: the saved state's, else E)",
    )
    slots.add_argument(
        "--redundant", type=_non_negative, help="P - E, redundant expert slots per layer"
    )
    p.add_argument(
        "--policy",
        help="the placement policy by registry name (default: the saved state's, else deepseek)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a policy option, as EplbConfig.create names it (e.g. num_groups=8, num_nodes=2, "
        "refine=true); repeat for several; VALUE is read as JSON, else as a string",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or str(value) != text.strip():
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Recorded:
    """A recorded load [L, E] and, when it came from a saved state, that state."""

    load: np.ndarray
    state: Any = None


def _read_array(path: str) -> np.ndarray:
    """The [L, E] array of a .npy / .npz / .json file (a ValueError naming the file else)."""
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = ["load"] if "load" in z.files else z.files
                if len(names) != 1:
                    raise ValueError(
                        f"expected one array, or one named 'load', found {sorted(z.files)}"
                    )
                return z[names[0]]
        with open(path) as f:
            doc = json.load(f)
        if isinstance(doc, dict):
            if "load" not in doc:
                raise ValueError(f"expected a 'load' entry, found keys {sorted(doc)}")
            doc = doc["load"]
        return np.asarray(doc)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"load: {path!r} is not an [L, E] load file: {err}") from err


def read_load(path: str) -> Recorded:
    """The load of ``path``: a saved state's window sum, or an [L, E] array file.

    Raises:
      ValueError: another suffix, a file that does not parse, an array that is not [L, E] of
        finite counts >= 0 (naming the file).
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".npy", ".npz", ".json"):
        raise ValueError(f"load: expected a .npy, .npz or .json file, got {path!r}")
    if suffix in (".npz", ".json") and _is_state(path, suffix):
        import jeplb

        state = jeplb.EplbState.restore(path)
        return Recorded(np.asarray(state.window_load()), state)
    return Recorded(_check_load(_read_array(path), path))


def _is_state(path: str, suffix: str) -> bool:
    """Whether the file's header names a saved EplbState (cheap: the header only for npz)."""
    from jeplb._src import checkpoint

    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "__header__" not in z.files:
                    return False
                return json.loads(str(z["__header__"])).get("format") == checkpoint.FORMAT
        with open(path) as f:
            doc = json.load(f)
        return isinstance(doc, dict) and doc.get("format") == checkpoint.FORMAT
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError):
        return False


def _check_load(load: np.ndarray, path: str) -> np.ndarray:
    if load.ndim != 2 or 0 in load.shape:
        raise ValueError(
            f"load: expected an [L, E] array with L, E >= 1 in {path!r}, found shape {load.shape}"
        )
    if not (np.issubdtype(load.dtype, np.integer) or np.issubdtype(load.dtype, np.floating)):
        raise ValueError(f"load: expected numbers in {path!r}, found dtype {load.dtype}")
    bad = ~np.isfinite(load) | (load < 0)
    if bad.any():
        at = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(
            f"load{at} = {load[tuple(at)].item()!r} in {path!r}: expected finite counts >= 0"
        )
    return load


def _parse_options(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option: expected NAME=VALUE, got {item!r}")
        try:
            options[name] = json.loads(text)
        except ValueError:
            options[name] = text
    return options


def _policy(name: str | None, options: dict[str, Any], recorded: Recorded):
    """The policy: by name (or the saved state's, or the default) with its options."""
    from jeplb._src.config import EplbConfig

    base = recorded.state.config if recorded.state is not None else EplbConfig()
    config = EplbConfig.create(base, where="--option", **({} if name is None else {"policy": name}))
    fields = {f.name for f in dataclasses.fields(config.policy)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"--option: {unknown[0]!r} is not an option of policy {config.policy.name!r}; its "
            f"options are {', '.join(sorted(fields)) or 'none'}"
        )
    return config.replace(**options)


def _sizes(args: argparse.Namespace, recorded: Recorded) -> tuple[int, int, int, int]:
    """(L, E, P, D) from the flags, else the saved state."""
    num_layers, num_experts = recorded.load.shape
    state = recorded.state
    devices = args.devices if args.devices is not None else getattr(state, "num_devices", None)
    if devices is None:
        raise ValueError("--devices: required when the load is an array (a saved state has it)")
    if args.slots is not None:
        slots = args.slots
    elif args.redundant is not None:
        slots = num_experts + args.redundant
    else:
        slots = state.num_slots if state is not None else num_experts
    if slots < num_experts:
        raise ValueError(f"--slots: expected at least E = {num_experts}, got {slots}")
    return num_layers, num_experts, slots, devices


def plan(args: argparse.Namespace):
    """Reads, plans and writes; returns (placement, configuration, balancedness of the load
    under the saved state's placement (None without one, or over another D), under the new)."""
    import jax.numpy as jnp

    import jeplb

    recorded = read_load(args.load)
    num_layers, num_experts, slots, devices = _sizes(args, recorded)
    config = _policy(args.policy, _parse_options(args.option), recorded)
    config.check_sizes(
        num_layers=num_layers, num_experts=num_experts, num_slots=slots, num_devices=devices
    )
    load = jnp.asarray(recorded.load.astype(np.float32))
    phy2log = config.policy.place(load, num_slots=slots, num_devices=devices, old_phy2log=None)
    placement = jeplb.write_placement(
        args.out, np.asarray(phy2log), num_experts=num_experts, num_devices=devices
    )
    after = float(jeplb.balancedness(placement.phy2log, load, devices).balancedness)
    before = None
    if recorded.state is not None and recorded.state.num_devices == devices:
        before = float(jeplb.balancedness(recorded.state.phy2log, load, devices).balancedness)
    return placement, config, before, after


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``jeplb plan``: exit status 0, or 2 (through ``parser.error``) with the reason."""
    try:
        placement, config, before, after = plan(args)
    except FileNotFoundError as err:
        parser.error(f"load: no such file: {err.filename!r}")
    except (ValueError, TypeError, OSError) as err:
        parser.error(str(err))
    if not args.quiet:
        p = placement
        print(
            f"planned {p.num_layers} layers x {p.num_experts} experts onto {p.num_slots} slots "
            f"over {p.num_devices} devices with {config.policy!r}"
        )
        if before is not None:
            print(f"balancedness of the load: {before:.4f} (saved placement) -> {after:.4f}")
        else:
            print(f"balancedness of the load: {after:.4f}")
        print(f"placement written to {args.out}")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "jeplb plan") -> int:
    """Runs ``jeplb plan`` with ``argv``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser, parser.parse_args(sys.argv[1:] if argv is None else argv))

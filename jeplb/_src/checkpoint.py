"""The saved-state file: `EplbState.save` and `EplbState.restore` (which call `save` and `load`).

Format (version 3), the same fields in both encodings:

* ``.json``: one object ``{"format": "jeplb.EplbState", "version": 3, "num_layers": L,
  "num_experts": E, "num_slots": P, "num_devices": D, "config": {...}, "arrays": {name: nested
  lists}}``.
* ``.npz``: the arrays by name, and the same header (without ``arrays``) as a JSON string in
  ``__header__``.

``config`` is `EplbConfig.to_json`: ``{"policy": {"name": ..., options}, "transfer": {...},
"schedule": {...}, "dispatch": {...}}``; a version 3 file written before the ``dispatch`` part
existed lacks it and loads with its defaults.

Earlier versions load: version 2 and 1 files keep the configuration as one flat object of the
state's former static fields (``num_devices``, ``num_redundant_experts``, ``window_size``, ...,
with a tuple ``axis_name`` written as ``{"tuple": [names]}``); version 1 lacks the arrays
``window_total`` and ``window_leaving``, which are then derived from its window (a later file's
must agree with its window). Files from before ``num_gpus`` was removed carry it: null or equal
to ``num_devices`` loads, any other value is refused.

Saving is atomic: the file is written to a temporary file in the same folder, flushed to disk and
renamed over the target (``os.replace``), so readers see the old file or the new one, never a part.
Loading checks every field as `EplbState.create` checks its arguments (the configuration's own
checks) and every array (shape, int32 range, counts >= 0, positions in range, maps that agree).
This module does not import the state: the state calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import zipfile
import zlib
from typing import Any

import jax
import numpy as np

from jeplb._src.config import EplbConfig
from jeplb._src.counts import INT32_MAX
from jeplb._src.maps import check_derived_maps, check_phy2log
from jeplb._src.validate import check_int
from jeplb._src.window import check_window

__all__ = ["FORMAT", "VERSION", "Saved", "load", "save"]

FORMAT = "jeplb.EplbState"
VERSION = 3
# Versions this reader loads, and the array fields each one lacks (derived at load).
_LACKS = {1: ("window_total", "window_leaving"), 2: (), 3: ()}

# The letters of each array field's shape.
SHAPES = {
    "phy2log": ("L", "P"),
    "log2phy": ("L", "E", "R_max"),
    "logcnt": ("L", "E"),
    "pass_load": ("L", "E"),
    "window": ("W", "L", "E"),
    "window_total": ("L", "E"),
    "window_leaving": ("L", "E"),
    "window_pos": (),
    "step": (),
    "pending_phy2log": ("L", "P"),
    "pending_log2phy": ("L", "E", "R_max"),
    "pending_logcnt": ("L", "E"),
    "cursor": (),
}
_SIZES = ("num_layers", "num_experts", "num_slots")
# The configuration fields of version 1 and 2 files (the state's former static fields).
_FLAT = (
    "num_devices", "window_size", "step_interval", "num_redundant_experts", "layers_per_step",
    "num_groups", "num_nodes", "refine", "axis_name", "chunk_rows", "log_interval",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Saved:
    """What a file holds, checked: sizes, configuration and int32 arrays (by field name)."""

    num_layers: int
    num_experts: int
    num_slots: int
    num_devices: int
    config: EplbConfig
    arrays: dict[str, np.ndarray]


# ------------------------------------------------------------------------------------- save


def save(state: Any, path: Any) -> None:
    """Writes an `EplbState` to ``path`` (``.json`` or ``.npz``), atomically; see `EplbState.save`."""
    kind = _kind(path, "path")
    arrays = {name: np.asarray(jax.device_get(getattr(state, name))) for name in SHAPES}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": state.num_layers,
        "num_experts": state.num_experts,
        "num_slots": state.num_slots,
        "num_devices": state.num_devices,
        "config": state.config.to_json(),
    }
    writer = _write_json if kind == "json" else _write_npz
    _write_atomic(os.fspath(path), lambda f: writer(f, header, arrays))


def _write_json(f, header: dict, arrays: dict[str, np.ndarray]) -> None:
    doc = dict(header, arrays={k: v.tolist() for k, v in arrays.items()})
    f.write(json.dumps(doc, indent=1).encode() + b"\n")


def _write_npz(f, header: dict, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(f, __header__=np.array(json.dumps(header)), **arrays)


def _write_atomic(path: str, write) -> None:
    """Calls ``write(f)`` on a new temporary file next to ``path``, then renames it over ``path``.

    The temporary file is flushed and fsynced before the rename, and removed when anything fails
    (``path`` is then untouched). The folder is fsynced after the rename where the OS allows.
    """
    folder = os.path.dirname(os.path.abspath(path))
    # A short name, whatever the target's: a legal 250-byte basename plus a suffix would pass
    # the file system's 255-byte limit (ENAMETOOLONG).
    tmp = os.path.join(folder, f".jeplb.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode: as open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every OS or filesystem opens folders
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# ------------------------------------------------------------------------------------- load


def load(path: Any, *, sizes: dict[str, int | None], from_like: bool) -> Saved:
    """Reads and checks a saved state; see `EplbState.restore`.

    Args:
      path: the file.
      sizes: sizes the file must have, by name (``num_layers``, ``num_experts``, ``num_devices``,
        ``num_redundant_experts``, ``window_size``); None where any is accepted.
      from_like: the sizes come from ``like=`` (said in the error).
    """
    kind = _kind(path, "path")
    where = os.fspath(path)
    header, raw = _read_saved(path, kind)
    version = header.get("version")
    if type(version) is not int or version not in _LACKS:
        raise ValueError(
            f"version: expected {' or '.join(str(v) for v in sorted(_LACKS))}, found "
            f"{version!r} in {where!r}"
        )
    try:
        saved = _parse(header, raw, version=version)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"path: {where!r} is a damaged saved {FORMAT}: {err}") from err
    found = {
        "num_layers": saved.num_layers,
        "num_experts": saved.num_experts,
        "num_devices": saved.num_devices,
        "num_redundant_experts": saved.num_slots - saved.num_experts,
        "window_size": saved.config.schedule.window_size,
    }
    for name, want in sizes.items():
        if want is not None and want != found[name]:
            raise ValueError(
                f"{name}: expected {want}, found {found[name]} in {where!r}"
                + (" (from like=)" if from_like else "")
            )
    return saved


def _parse(header: dict, raw: dict, *, version: int) -> Saved:
    """The checked sizes, configuration and int32 arrays of a file; raises naming the bad field."""
    lacks = _LACKS[version]
    for key in (*_SIZES, "config"):
        if key not in header:
            raise ValueError(f"{key}: missing from the header")
    missing = [k for k in SHAPES if k not in raw and k not in lacks]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the file")
    sizes = {name: header[name] for name in _SIZES}
    for name, value in sizes.items():
        check_int(name, value, minimum=1)
    num_layers, num_experts, num_slots = (int(v) for v in sizes.values())
    if version >= 3:
        check_int("num_devices", header.get("num_devices"), minimum=1)
        num_devices, config = int(header["num_devices"]), EplbConfig.from_json(header["config"])
    else:
        num_devices, config = _decode_flat(header["config"], num_slots - num_experts)
    config.check_sizes(
        num_layers=num_layers, num_experts=num_experts, num_slots=num_slots, num_devices=num_devices
    )
    window_size = config.schedule.window_size
    letters = {
        "L": num_layers,
        "E": num_experts,
        "P": num_slots,
        "R_max": num_slots - num_experts + 1,
        "W": window_size,
    }
    arrays = {}
    for name, shape in SHAPES.items():
        if name in lacks:
            continue
        arrays[name] = _int32_array(name, raw[name])
        want = tuple(letters[c] for c in shape)
        if arrays[name].shape != want:
            raise ValueError(
                f"{name}: expected shape [{', '.join(shape)}] = {want} (from the file's header), "
                f"found {arrays[name].shape}"
            )
    _check_values(arrays, num_layers, window_size)
    if lacks:
        window = arrays["window"]
        arrays["window_total"] = np.minimum(window.sum(axis=0, dtype=np.int64), INT32_MAX)
        arrays["window_leaving"] = window[int(arrays["window_pos"])]
    check_window(
        arrays["window"], arrays["window_total"], arrays["window_leaving"], arrays["window_pos"]
    )
    arrays = {name: arrays[name].astype(np.int32) for name in SHAPES}  # field order
    return Saved(num_layers, num_experts, num_slots, num_devices, config, arrays)


def _decode_flat(config: Any, num_redundant: int) -> tuple[int, EplbConfig]:
    """A version 1 or 2 ``config`` (the state's former static fields): (D, the configuration)."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected an object of fields, got {type(config).__name__}")
    config = dict(config)
    gpus = config.pop("num_gpus", None)  # files from before num_gpus was removed
    missing = [k for k in _FLAT if k not in config]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the config")
    unknown = sorted(set(config) - set(_FLAT))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a field of {FORMAT} (unexpected in the config)")
    axis = config["axis_name"]
    if isinstance(axis, dict) and list(axis) == ["tuple"] and isinstance(axis["tuple"], list):
        config["axis_name"] = tuple(axis["tuple"])
    elif not isinstance(axis, str):  # a bare list is refused: a damaged value, not a tuple
        raise TypeError(f"axis_name: expected a str or {{'tuple': [names]}}, got {axis!r}")
    num_devices = config.pop("num_devices")
    check_int("num_devices", num_devices, minimum=1)
    redundant = config.pop("num_redundant_experts")
    check_int("num_redundant_experts", redundant, minimum=0)
    if redundant != num_redundant:
        raise ValueError(
            f"num_slots: expected num_experts + num_redundant_experts, found "
            f"{num_redundant} redundant slots, but num_redundant_experts = {redundant}"
        )
    if gpus is not None:
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise TypeError(f"num_gpus: expected null or an int >= 1, got {gpus!r}")
        if gpus != num_devices:
            raise ValueError(
                f"num_gpus: found {gpus}, but num_devices = {num_devices!r}; the policy "
                f"spreads the slots over the mesh's num_devices, so a state planned over another "
                f"device count cannot be loaded"
            )
    return int(num_devices), EplbConfig.create(where="config", **config)


def _int32_array(name: str, x: Any) -> np.ndarray:
    """A saved array as int32; non-integer values and values past int32 are refused, not cast."""
    try:
        a = np.asarray(x)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"{name}: expected a rectangular integer array ({err})") from err
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise TypeError(f"{name}: expected integer arrays, found dtype {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.integer):
        out = (a < -INT32_MAX - 1) | (a > INT32_MAX)
        if out.any():
            at = tuple(int(i) for i in np.argwhere(out)[0])
            raise ValueError(
                f"{name}{list(at)} = {int(a[at])}: expected a value that fits int32 [-2^31, 2^31)"
            )
    return a.astype(np.int32)


def _check_values(arrays: dict[str, np.ndarray], num_layers: int, window_size: int) -> None:
    """Counts >= 0, positions in range, maps valid and in agreement."""
    for name in ("pass_load", "window", "window_total", "window_leaving"):
        if name not in arrays:
            continue
        neg = arrays[name] < 0
        if neg.any():
            at = tuple(int(i) for i in np.argwhere(neg)[0])
            raise ValueError(
                f"{name}{list(at)} = {int(arrays[name][at])}: expected token counts >= 0"
            )
    for name, low, high, what in (
        ("window_pos", 0, window_size - 1, "a row of the window, in [0, window_size)"),
        ("step", 0, INT32_MAX, "a step count >= 0"),
        ("cursor", 0, num_layers, "a layer in [0, num_layers] (num_layers: none in progress)"),
    ):
        value = int(arrays[name])
        if not low <= value <= high:
            raise ValueError(f"{name}: expected {what}, found {value}")
    num_experts = arrays["logcnt"].shape[1]
    for prefix in ("", "pending_"):
        name = prefix + "phy2log"
        check_phy2log(arrays[name], name=name, num_experts=num_experts, require_all=True)
        check_derived_maps(
            arrays[prefix + "phy2log"],
            arrays[prefix + "log2phy"],
            arrays[prefix + "logcnt"],
            prefix=prefix,
        )


def _read_saved(path: Any, kind: str, fmt: str = FORMAT) -> tuple[dict, dict]:
    """The header and the raw arrays of a file whose header names format ``fmt`` (a saved state
    by default; `jeplb._src.placement_file` reads its own format with it); a ValueError for
    anything else."""
    where = os.fspath(path)
    try:
        if kind == "json":
            with open(path) as f:
                doc = json.load(f)
            header = doc if isinstance(doc, dict) else {}
            raw = header.get("arrays", {})
        else:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["__header__"])) if "__header__" in z.files else {}
                raw = {k: z[k] for k in z.files if k != "__header__"}
    except FileNotFoundError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,  # a damaged deflate stream
        NotImplementedError,  # zipfile: a damaged compression-method field
        RuntimeError,  # zipfile: a damaged flags field reading as "encrypted"
    ) as err:
        raise ValueError(
            f"path: {where!r} is not a saved {fmt} ({'JSON' if kind == 'json' else 'npz'}; "
            f"it does not parse: {type(err).__name__}: {err})"
        ) from err
    if not isinstance(header, dict) or header.get("format") != fmt or not isinstance(raw, dict):
        raise ValueError(
            f"path: {where!r} is not a saved {fmt} ({'JSON' if kind == 'json' else 'npz'})"
        )
    return header, raw


def _kind(path: Any, name: str) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file name (str or os.PathLike), got {type(path)}")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"{name}: expected a file name ending in .json or .npz, got {path!r}")
    return suffix[1:]

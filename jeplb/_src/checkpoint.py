"""The saved-state file: `EplbState.save` and `EplbState.load` (which call `save` and `load` here).

Format (version 2), the same fields in both encodings:

* ``.json``: one object ``{"format": "jeplb.EplbState", "version": 2, "num_layers": L,
  "num_experts": E, "num_slots": P, "config": {...}, "arrays": {name: nested lists}}``.
* ``.npz``: the arrays by name, and the same header (without ``arrays``) as a JSON string in
  ``__header__``.

``config`` holds the static fields of `EplbState` by name; a tuple ``axis_name`` is written as
``{"tuple": [names]}`` (a bare JSON list is refused, so a damaged value is not mistaken for one).
Files from before ``num_gpus`` was removed carry it: null or equal to ``num_devices`` loads, any
other value is refused.

Version 2 added the arrays ``window_total`` (the window's running sum) and ``window_leaving``
(its row ``window_pos``); a version 1 file, which lacks them, loads with them derived from its
window. A version 2 file's must agree with its window (`state.check_window`).

Saving is atomic: the file is written to a temporary file in the same folder, flushed to disk and
renamed over the target (``os.replace``), so readers see the old file or the new one, never a part.
Loading checks every field as `EplbState.create` checks its arguments (`state.check_config`) and
every array (shape, int32 range, counts >= 0, positions in range, maps that agree).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import zipfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jeplb._src.maps import check_derived_maps, check_placement
from jeplb._src.state import (
    INT32_MAX,
    EplbState,
    array_fields,
    check_config,
    check_window,
    static_fields,
)

__all__ = ["FORMAT", "VERSION", "load", "save"]

FORMAT = "jeplb.EplbState"
VERSION = 2
# Versions this reader loads, and the array fields each one lacks (derived at load).
_LACKS = {1: ("window_total", "window_leaving"), 2: ()}

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


# ------------------------------------------------------------------------------------- save


def save(state: EplbState, path: Any) -> None:
    """Writes ``state`` to ``path`` (``.json`` or ``.npz``), atomically; see `EplbState.save`."""
    kind = _kind(path, "path")
    arrays = {name: np.asarray(jax.device_get(getattr(state, name))) for name in array_fields()}
    config = state.config()
    if isinstance(config["axis_name"], tuple):
        config["axis_name"] = {"tuple": list(config["axis_name"])}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": state.num_layers,
        "num_experts": state.num_experts,
        "num_slots": state.num_slots,
        "config": config,
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


def load(
    cls: type[EplbState],
    path: Any,
    *,
    like: EplbState | None,
    num_layers: int | None,
    num_experts: int | None,
    num_devices: int | None,
    num_redundant_experts: int | None,
    window_size: int | None,
) -> EplbState:
    """Reads and checks a saved state; see `EplbState.load`."""
    kind = _kind(path, "path")
    if like is not None and not isinstance(like, EplbState):
        raise TypeError(f"like: expected an EplbState, got {type(like).__name__}")
    where = os.fspath(path)
    header, raw = _read_saved(path, kind)
    version = header.get("version")
    if type(version) is not int or version not in _LACKS:
        raise ValueError(
            f"version: expected {' or '.join(str(v) for v in sorted(_LACKS))}, found "
            f"{version!r} in {where!r}"
        )
    try:
        config, arrays = _parse(header, raw, lacks=_LACKS[version])
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"path: {where!r} is a damaged saved {FORMAT}: {err}") from err
    num_slots = int(header["num_slots"])
    found = {
        "num_layers": int(header["num_layers"]),
        "num_experts": int(header["num_experts"]),
        "num_devices": config["num_devices"],
        "num_redundant_experts": num_slots - int(header["num_experts"]),
        "window_size": config["window_size"],
    }
    wanted = {
        "num_layers": num_layers,
        "num_experts": num_experts,
        "num_devices": num_devices,
        "num_redundant_experts": num_redundant_experts,
        "window_size": window_size,
    }
    if like is not None:
        wanted = {name: getattr(like, name) for name in wanted}
    for name, want in wanted.items():
        if want is not None and want != found[name]:
            raise ValueError(
                f"{name}: expected {want}, found {found[name]} in {where!r}"
                + (" (from like=)" if like is not None else "")
            )
    if like is not None:
        config = like.config()
    return cls(**{k: jnp.asarray(v) for k, v in arrays.items()}, **config)


def _parse(
    header: dict, raw: dict, *, lacks: tuple[str, ...] = ()
) -> tuple[dict, dict[str, np.ndarray]]:
    """The checked configuration and int32 arrays of a file; raises naming the bad field.

    ``lacks``: array fields the file's version does not have; they are derived from the others.
    """
    for key in (*_SIZES, "config"):
        if key not in header:
            raise ValueError(f"{key}: missing from the header")
    missing = [k for k in array_fields() if k not in raw and k not in lacks]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the file")
    config = _decode_config(header["config"])
    sizes = {name: header[name] for name in _SIZES}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    num_layers, num_experts, num_slots = (int(v) for v in sizes.values())
    check_config(num_layers=num_layers, num_experts=num_experts, **config)
    if num_slots != num_experts + config["num_redundant_experts"]:
        raise ValueError(
            f"num_slots: expected num_experts + num_redundant_experts = {num_experts} + "
            f"{config['num_redundant_experts']}, found {num_slots}"
        )
    letters = {
        "L": num_layers,
        "E": num_experts,
        "P": num_slots,
        "R_max": num_slots - num_experts + 1,
        "W": config["window_size"],
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
    _check_values(arrays, num_layers, config["window_size"])
    if lacks:
        window = arrays["window"]
        arrays["window_total"] = np.minimum(window.sum(axis=0, dtype=np.int64), INT32_MAX)
        arrays["window_leaving"] = window[int(arrays["window_pos"])]
    check_window(
        arrays["window"], arrays["window_total"], arrays["window_leaving"], arrays["window_pos"]
    )
    arrays = {name: arrays[name].astype(np.int32) for name in array_fields()}  # field order
    return config, arrays


def _decode_config(config: Any) -> dict[str, Any]:
    """The header's ``config`` as `EplbState`'s static fields (types checked by check_config)."""
    if not isinstance(config, dict):
        raise TypeError(f"config: expected an object of fields, got {type(config).__name__}")
    config = dict(config)
    gpus = config.pop("num_gpus", None)  # files from before num_gpus was removed
    names = static_fields()
    missing = [k for k in names if k not in config]
    if missing:
        raise ValueError(f"{missing[0]}: missing from the config")
    unknown = sorted(set(config) - set(names))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a field of {FORMAT} (unexpected in the config)")
    axis = config["axis_name"]
    if isinstance(axis, dict) and list(axis) == ["tuple"] and isinstance(axis["tuple"], list):
        config["axis_name"] = tuple(axis["tuple"])
    if gpus is not None:
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise TypeError(f"num_gpus: expected null or an int >= 1, got {gpus!r}")
        if gpus != config["num_devices"]:
            raise ValueError(
                f"num_gpus: found {gpus}, but num_devices = {config['num_devices']!r}; the policy "
                f"spreads the slots over the mesh's num_devices, so a state planned over another "
                f"device count cannot be loaded"
            )
    return config


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
        check_placement(arrays[prefix + "phy2log"], num_experts, prefix + "phy2log")
        check_derived_maps(
            arrays[prefix + "phy2log"],
            arrays[prefix + "log2phy"],
            arrays[prefix + "logcnt"],
            prefix=prefix,
        )


def _read_saved(path: Any, kind: str) -> tuple[dict, dict]:
    """The header and the raw arrays of a saved state; a ValueError for anything else."""
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
            f"path: {where!r} is not a saved {FORMAT} ({'JSON' if kind == 'json' else 'npz'}; "
            f"it does not parse: {type(err).__name__}: {err})"
        ) from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or not isinstance(raw, dict):
        raise ValueError(
            f"path: {where!r} is not a saved {FORMAT} ({'JSON' if kind == 'json' else 'npz'})"
        )
    return header, raw


def _kind(path: Any, name: str) -> str:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file name (str or os.PathLike), got {type(path)}")
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"{name}: expected a file name ending in .json or .npz, got {path!r}")
    return suffix[1:]

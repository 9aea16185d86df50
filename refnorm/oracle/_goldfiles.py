"""The file format shared by golden cases and optimizer trajectories.

:mod:`refnorm.oracle.goldens` (the normalization cases, export and verification) and
:mod:`refnorm.oracle.trajectories` (optimizer trajectories) both read and write golden
directories; the pieces they share live here, below both, so that neither imports the other's
internals: the schema name and version, the JSON encoding of hyper-parameters, the
deterministic pickle-free ``.npz`` writer and reader, the manifest reader and the check that a
file name stays inside the directory. ``docs/howto/golden_format.rst`` documents the format for
readers without refnorm.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["SCHEMA", "SCHEMA_VERSION", "MANIFEST", "GoldenError"]

SCHEMA = "refnorm-goldens"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*\.npz$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_]+\.npy$")
_MAX_MANIFEST = 64 * 2 ** 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class GoldenError(ValueError):
    """A golden directory or file that cannot be trusted; the message says why."""


# ----------------------------------------------------------------------------------------------
# JSON encoding of hyper-parameters (tuples and non-finite floats survive the round trip)
# ----------------------------------------------------------------------------------------------
def _encode(value):
    if isinstance(value, (bool, type(None), str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if np.isfinite(v) else {"float": repr(v)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iub":
        return {"int0d": int(value)}
    raise TypeError(f"cannot store hyper-parameter of type {type(value).__name__}")


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"float"} and value["float"] in ("inf", "-inf", "nan"):
            return float(value["float"])
        if set(value) == {"tuple"} and isinstance(value["tuple"], list):
            return tuple(_decode(v) for v in value["tuple"])
        if set(value) == {"int0d"} and isinstance(value["int0d"], int):
            return np.asarray(value["int0d"], dtype=np.int64)
        raise GoldenError(f"unknown hyper-parameter encoding {value!r}")
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    raise GoldenError(f"unknown hyper-parameter value {value!r}")


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Deterministic, pickle-free .npz
# ----------------------------------------------------------------------------------------------
def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            a = np.asarray(arrays[name])
            a = a if a.flags.c_contiguous else a.copy(order="C")  # (0-d stays 0-d)
            member = io.BytesIO()
            np.lib.format.write_array(member, a, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _read_npz(data: bytes, label: str, kinds: str = "fiub") -> dict:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise GoldenError(f"{label}: not a valid .npz (zip) file: {exc}") from exc
    out = {}
    with zf:
        for info in zf.infolist():
            if not _MEMBER_RE.match(info.filename):
                raise GoldenError(f"{label}: unexpected member {info.filename!r} (only plain "
                                  f"<name>.npy members are allowed)")
            with zf.open(info) as fp:
                try:
                    arr = np.lib.format.read_array(fp, allow_pickle=False)
                except ValueError as exc:
                    raise GoldenError(f"{label}: member {info.filename!r} holds a pickled "
                                      f"object; refusing to load it ({exc})") from exc
            if arr.dtype.kind not in kinds or arr.dtype.hasobject:
                raise GoldenError(f"{label}: member {info.filename!r} has dtype {arr.dtype}; "
                                  f"only numeric arrays are allowed"
                                  + (" (and fixed-width strings)" if "U" in kinds else ""))
            out[info.filename[:-4]] = arr
    return out



def _metadata_mismatch(label, embedded, expected) -> GoldenError:
    """The error for a file whose embedded metadata is not its manifest entry, naming the
    fields that differ."""
    if isinstance(embedded, dict):
        fields = sorted(k for k in set(embedded) | set(expected)
                        if embedded.get(k, ...) != expected.get(k, ...))
    else:
        fields = ["(the embedded metadata is not an object)"]
    return GoldenError(f"{label}: embedded metadata disagrees with the manifest entry in "
                       f"field(s) {', '.join(map(repr, fields))}")


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.exists():
        raise GoldenError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise GoldenError(f"{directory}: not a directory")
    if not path.is_file():
        raise GoldenError(f"{directory}: no {MANIFEST}")
    if path.stat().st_size > _MAX_MANIFEST:
        raise GoldenError(f"{path}: larger than {_MAX_MANIFEST} bytes")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise GoldenError(f"{path}: the manifest must be a JSON object")
    if manifest.get("schema") != SCHEMA:
        raise GoldenError(f"{path}: schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(f"{path}: schema version {manifest.get('schema_version')!r}; this "
                          f"refnorm reads version {SCHEMA_VERSION} only (re-export the goldens "
                          f"with this refnorm, or install the refnorm that wrote them: "
                          f"{manifest.get('refnorm_version')!r})")
    claimed = manifest.get("manifest_sha256")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    try:
        actual = _sha256(_canonical(body))
    except ValueError as exc:
        raise GoldenError(f"{path}: not canonical JSON ({exc})") from exc
    if claimed != actual:
        raise GoldenError(f"{path}: the manifest was modified: its SHA-256 is {actual}, the "
                          f"manifest_sha256 it records is {claimed!r}")
    if not isinstance(manifest.get("cases"), list):
        raise GoldenError(f"{path}: 'cases' must be a list")
    return manifest


def _safe_path(directory: Path, name) -> Path:
    if not isinstance(name, str) or not name:
        raise GoldenError(f"manifest entry names no file: {name!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise GoldenError(f"manifest entry {name!r} is an absolute path: golden files must lie "
                          f"inside the golden directory")
    if ".." in Path(name).parts or "/" in name or "\\" in name or not _FILE_RE.match(name):
        raise GoldenError(f"manifest entry {name!r} is a path outside the golden directory (or "
                          f"not a plain <name>.npz file name)")
    root = directory.resolve()
    path = (directory / name)
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise GoldenError(f"manifest entry {name!r} resolves outside the golden directory")
    if not path.is_file():
        raise GoldenError(f"manifest entry {name!r}: no such file in {directory}")
    return path



"""Golden files: the oracle's cases and answers on disk, safe to load and bit-reproducible.

Layout of a golden directory::

    DIR/manifest.json
    DIR/layer_norm-bfloat16-000.npz
    DIR/layer_norm-bfloat16-001.npz
    ...
    DIR/optim-adamp-000.npz           (optimizer trajectories, see below)
    ...

``manifest.json`` holds the schema name and version, the refnorm and NumPy versions, the seed,
the case-set size, the tolerance model's constants, and for every case: its file, the file's
SHA-256, the variant, the dtype, the case name, the hyper-parameters, the shapes and storage
dtypes of every array, and the cases that were skipped with their reasons. The manifest's own
SHA-256 (of its canonical JSON without that field) is its last field.

Each ``.npz`` holds, as plain ``.npy`` members (never pickles):

==================  ============================================================================
``input__<name>``   the differentiable inputs (``x``, ``weight``, ``bias``...), exactly
                    representable in the case's dtype, stored in float32 (float64 for float64)
``kwarg__<name>``   array hyper-parameters and state (``running_mean``...), likewise
``dy``              the upstream gradient, likewise
``ref__<name>``     the float64 reference: ``y``, every gradient (``dx``, ``dweight``...), the new
                    state, and the saved ``mean`` and ``rstd``
``tol__<name>``     the per-element tolerance of each reference output (float32): a candidate
                    passes where ``|out - ref| <= tol`` (and the NaN/infinity pattern agrees)
``exact__<name>``   integer state compared exactly (``num_batches_tracked``)
``emulated__<name>``  (with ``emulated=True``) a correct kernel's output in the dtype
``meta``            the case's manifest entry as UTF-8 JSON (uint8), to cross-check
==================  ============================================================================

Optimizer trajectories (``optim-<name>-<k>.npz``, listed under the manifest's
``"trajectories"`` with ``kind: "optimizer"``), when asked for, sit beside the cases: the
parameters, gradients, state and projection decisions of the chosen optimizers over a few steps
of a small problem, for checking another optimizer step by step; see
:mod:`refnorm.oracle.trajectories`. ``docs/howto/golden_format.rst`` is the format's full
specification, for readers without refnorm.

Writing is deterministic: sorted members, fixed zip timestamps, no compression, canonical JSON,
no clock: the same seed and versions give bit-identical files.

Loading (:func:`load`, :func:`verify`) never unpickles (``allow_pickle=False`` and object
arrays refused), resolves every file name inside the directory (no ``..``, no absolute path,
no symbolic link leading out), checks the schema version, the manifest's own hash and every
file's SHA-256 before parsing it, and checks each file's embedded metadata against the
manifest. Any failure raises :class:`GoldenError` with the reason; nothing is executed.

Two lines in a GPU test suite::

    from refnorm.oracle import goldens, check
    assert check(my_candidate, cases=goldens.load("goldens/")), "see the report"
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from refnorm.oracle import cases as _cases
from refnorm.oracle._goldfiles import (_FILE_RE, MANIFEST, SCHEMA, SCHEMA_VERSION, GoldenError,
                                       _canonical, _decode, _encode, _metadata_mismatch,
                                       _npz_bytes, _read_manifest, _read_npz, _safe_path,
                                       _sha256)
from refnorm.oracle.formats import get_format

__all__ = ["export", "load", "verify", "GoldenError", "GoldenCase", "SCHEMA", "SCHEMA_VERSION",
           "MANIFEST", "DirectoryNotEmpty"]


class DirectoryNotEmpty(GoldenError):
    """:func:`export` into a directory that already holds files, without ``overwrite``."""

# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def _entry(case, prep, filename, arrays_meta):
    return {
        "file": filename,
        "variant": case.variant,
        "dtype": case.dtype,
        "case": case.name,
        "tags": list(case.tags),
        "seed": case.seed,
        "argnames": list(case.argnames),
        "absent": [n for n, a in zip(case.argnames, case.arrays) if a is None],
        "hyperparameters": {k: _encode(v) for k, v in sorted(case.kwargs.items())
                            if not (isinstance(v, np.ndarray) and v.ndim > 0)
                            and not (isinstance(v, np.ndarray) and v.dtype.kind == "f")},
        "arrays": arrays_meta,
    }


def _case_arrays(case, prep, emulated):
    fmt = get_format(case.dtype)
    store = fmt.storage
    arrays = {}
    for n, a in zip(case.argnames, case.arrays):
        if a is not None:
            arrays["input__" + n] = a.astype(store)
    for k, v in case.kwargs.items():
        if isinstance(v, np.ndarray) and (v.ndim > 0 or v.dtype.kind == "f"):
            arrays["kwarg__" + k] = v.astype(store) if v.dtype.kind == "f" else v
    arrays["dy"] = case.dy.astype(store)
    for k, v in case.douts.items():  # the upstream gradients of the other outputs ("ds")
        arrays["dout__" + k] = v.astype(store)
    for k, v in prep.ref.outputs.items():
        arrays["ref__" + k] = np.asarray(v, np.float64)
        arrays["tol__" + k] = np.asarray(prep.bounds[k], np.float32)
    for k, v in prep.ref.exact.items():
        arrays["exact__" + k] = np.asarray(v)
    if emulated and prep.emulated:
        for k, v in prep.emulated.items():
            arrays["emulated__" + k] = np.asarray(v, store)
    return arrays


def export(directory, variants=None, dtypes=("float32", "bfloat16", "float16", "float64"), *,
           seed=0, size="full", emulated=False, overwrite=False, progress=None,
           optimizers=None, steps=None) -> dict:
    """Write the golden files of ``variants`` x ``dtypes`` into ``directory``; returns the
    manifest. The directory must be empty or absent unless ``overwrite``.

    Also writes the optimizer trajectories (:mod:`refnorm.oracle.trajectories`) of
    ``optimizers``, only when asked for: names, or ``"all"`` for every registered optimizer;
    None (default), ``()`` or ``"none"`` for none; ``steps`` steps each (default
    :data:`~refnorm.oracle.trajectories.STEPS`). ``variants=()`` writes no norm case."""
    import refnorm
    from refnorm.oracle import trajectories as _traj
    from refnorm.oracle.core import _prepared_cases, select_specs

    try:
        optim_specs = [] if optimizers is None else _traj.select_optimizers(optimizers)
    except ValueError as exc:
        raise GoldenError(str(exc)) from exc

    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise GoldenError(f"{directory} exists and is not a directory")
        existing = [p for p in directory.iterdir()]
        if existing and not overwrite:
            raise DirectoryNotEmpty(f"{directory} is not empty; pass overwrite=True to "
                                    f"replace its golden files")
        for p in existing:
            if p.name == MANIFEST or _FILE_RE.match(p.name):
                p.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    from refnorm.oracle.tolerance import LAMBDA, SAFETY

    manifest = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "refnorm_version": refnorm.__version__, "numpy_version": np.__version__,
        "seed": int(seed), "size": size,
        "tolerance": {"model": "refnorm.oracle.tolerance", "lambda": LAMBDA, "safety": SAFETY,
                      "strict": False},
        "cases": [], "skipped": [], "trajectories": [],
    }
    for spec in select_specs(variants):
        for dtype in dtypes:
            fmt = get_format(dtype)
            preps, skipped = _prepared_cases(spec, fmt.name, seed, size, False)
            manifest["skipped"] += [{"variant": s.variant, "dtype": s.dtype, "case": s.name,
                                     "reason": s.reason} for s in skipped]
            for i, prep in enumerate(preps):
                case = prep.case
                filename = f"{spec.name}-{fmt.name}-{i:03d}.npz"
                arrays = _case_arrays(case, prep, emulated)
                meta = {k: {"shape": list(a.shape), "dtype": a.dtype.name}
                        for k, a in sorted(arrays.items())}
                entry = _entry(case, prep, filename, meta)
                arrays["meta"] = np.frombuffer(_canonical(entry), dtype=np.uint8)
                data = _npz_bytes(arrays)
                (directory / filename).write_bytes(data)
                manifest["cases"].append({**entry, "sha256": _sha256(data)})
            if progress is not None:  # once per (variant, dtype)
                progress(f"{spec.name} {fmt.name}")
    manifest["trajectories"] = _traj.export_trajectories(
        directory, [s.name for s in optim_specs], seed=seed,
        steps=_traj.STEPS if steps is None else steps, progress=progress)  # once per optimizer
    manifest["manifest_sha256"] = _sha256(_canonical(manifest))
    (directory / MANIFEST).write_bytes(json.dumps(manifest, indent=1, sort_keys=True,
                                                  allow_nan=False).encode() + b"\n")
    return manifest


# ----------------------------------------------------------------------------------------------
# Load and verify
# ----------------------------------------------------------------------------------------------
@dataclass
class GoldenCase:
    """One golden case: the :class:`~refnorm.oracle.cases.Case`, the stored reference outputs
    and tolerances, and its manifest entry."""

    case: _cases.Case
    reference: dict
    tolerance: dict
    exact: dict = field(default_factory=dict)
    emulated: dict = field(default_factory=dict)
    entry: dict = field(default_factory=dict)

    # a GoldenCase is accepted wherever a Case is (check(..., cases=load(DIR)))
    def __getattr__(self, name):
        if name == "case":
            raise AttributeError(name)
        return getattr(self.case, name)


def _load_entry(directory, entry, index):
    from refnorm.norms import BY_NAME

    if not isinstance(entry, dict):
        raise GoldenError(f"manifest case {index} is not an object")
    path = _safe_path(directory, entry.get("file"))
    data = path.read_bytes()
    digest = _sha256(data)
    if digest != entry.get("sha256"):
        raise GoldenError(f"{path.name}: SHA-256 mismatch (file {digest}, manifest "
                          f"{entry.get('sha256')!r}): the file or the manifest was modified")
    arrays = _read_npz(data, path.name)
    meta = arrays.pop("meta", None)
    expected = {k: v for k, v in entry.items() if k != "sha256"}
    if meta is None or meta.dtype != np.uint8 or meta.ndim != 1:
        raise GoldenError(f"{path.name}: no embedded metadata")
    try:
        embedded = json.loads(meta.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GoldenError(f"{path.name}: embedded metadata is not JSON") from exc
    if embedded != expected:
        raise _metadata_mismatch(path.name, embedded, expected)
    variant = entry.get("variant")
    if variant not in BY_NAME:
        raise GoldenError(f"{path.name}: unknown variant {variant!r} (this refnorm has "
                          f"{', '.join(BY_NAME)})")
    spec = BY_NAME[variant]
    fmt = get_format(entry.get("dtype"))
    if list(entry.get("argnames", [])) != list(spec.diff_argnames):
        raise GoldenError(f"{path.name}: inputs {entry.get('argnames')} do not match "
                          f"{variant}'s {list(spec.diff_argnames)}")
    for key, info in entry.get("arrays", {}).items():
        a = arrays.get(key)
        if a is None or list(a.shape) != info.get("shape") or a.dtype.name != info.get("dtype"):
            raise GoldenError(f"{path.name}: array {key!r} missing or not as the manifest says")
    lost = [k for k in spec.outputs[1:] if "dout__" + k not in arrays]
    if lost:
        raise GoldenError(f"{path.name}: no upstream gradient of the output(s) "
                          f"{', '.join(lost)} (arrays dout__<name>)")
    inputs = tuple(arrays["input__" + n].astype(np.float64) if "input__" + n in arrays else None
                   for n in spec.diff_argnames)
    kwargs = {k: _decode(v) for k, v in entry.get("hyperparameters", {}).items()}
    for k, a in arrays.items():
        if k.startswith("kwarg__"):
            kwargs[k[7:]] = a.astype(np.float64) if a.dtype.kind == "f" else a
    case = _cases.Case(variant, entry.get("case", f"case{index}"), fmt.name, inputs, kwargs,
                       arrays["dy"].astype(np.float64), int(entry.get("seed", 0)),
                       tuple(entry.get("tags", [])), tuple(spec.diff_argnames),
                       {k: arrays["dout__" + k].astype(np.float64) for k in spec.outputs[1:]
                        if "dout__" + k in arrays})

    def pick(prefix, dtype=np.float64):
        return {k[len(prefix):]: (a.astype(dtype) if dtype is not None else a)
                for k, a in arrays.items() if k.startswith(prefix)}

    return GoldenCase(case, pick("ref__"), pick("tol__"), pick("exact__", None),
                      pick("emulated__"), entry)


def load(directory, *, variants=None, dtypes=None) -> list:
    """The verified golden cases of ``directory`` (a list of :class:`GoldenCase`), optionally
    only those of ``variants`` / ``dtypes``. Raises :class:`GoldenError` on any doubt."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    out = []
    for i, entry in enumerate(manifest["cases"]):
        if isinstance(entry, dict):
            if variants is not None and entry.get("variant") not in variants:
                continue
            if dtypes is not None and entry.get("dtype") not in dtypes:
                continue
        out.append(_load_entry(directory, entry, i))
    return out


@dataclass
class VerifyResult:
    directory: str
    cases: int = 0
    identical: int = 0
    problems: list = field(default_factory=list)
    trajectories: int = 0
    trajectories_identical: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self):
        return self.ok

    def __str__(self):
        lines = [f"{self.directory}: {self.cases} golden cases, hashes and schema verified; "
                 f"{self.identical} reproduce the reference bit for bit"]
        if self.trajectories:
            lines.append(f"{self.directory}: {self.trajectories} optimizer trajectories, hashes "
                         f"and schema verified; {self.trajectories_identical} reproduced by "
                         f"refnorm's optimizers bit for bit")
        lines += [f"  PROBLEM {p}" for p in self.problems]
        lines.append("OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _check_tolerances(g, spec, ref, safety, strict, result):
    """The stored per-element tolerances must be the model's, with the manifest's ``safety``:
    editing ``tolerance.safety`` (or a ``tol__`` array) alone is a problem."""
    from refnorm.oracle.tolerance import bounds

    model = bounds(spec, g.case, ref, strict, safety=safety)
    for k, stored in g.tolerance.items():
        fresh = model.get(k) if hasattr(model, "get") else None
        if fresh is None or np.shape(fresh) != stored.shape:
            result.problems.append(f"{g.entry['file']}: stored tolerance {k!r} has no "
                                   f"counterpart in this refnorm's model")
            continue
        f32 = np.asarray(fresh, np.float32).astype(np.float64)
        if not np.allclose(stored, f32, rtol=1e-6, atol=0, equal_nan=True):
            result.problems.append(
                f"{g.entry['file']} ({g.case.variant} {g.case.dtype} {g.case.name}): stored "
                f"tolerance of {k} is not the model's with tolerance.safety={safety!r}, "
                f"strict={strict} (the manifest's tolerance or the tol__ array was edited)")
            return


def verify(directory, *, recompute=True, progress=None) -> VerifyResult:
    """Check every hash, the schema and the embedded metadata (raising :class:`GoldenError` on
    the first untrustworthy file), that every file of the directory is in the manifest (an
    orphan is a problem), then, with ``recompute``, that this refnorm reproduces each stored
    per-element tolerance (the model with the manifest's ``tolerance.safety``), each
    stored reference output (bit for bit, or within the float64 model's bound) and every
    optimizer trajectory (bit for bit: parameters, state and decisions after every step, from
    the recorded initial parameters and gradients)."""
    from refnorm.norms import BY_NAME
    from refnorm.oracle.reference import compute
    from refnorm.oracle.tolerance import bounds

    from refnorm.oracle.trajectories import load_trajectories, verify_trajectories

    from refnorm.oracle.tolerance import LAMBDA

    golden = load(directory)
    trajectories = load_trajectories(directory)   # every file is checked before any recompute
    result = VerifyResult(str(directory), len(golden))
    manifest = _read_manifest(Path(directory))
    listed = {e.get("file") for e in manifest["cases"] if isinstance(e, dict)}
    traj = manifest.get("trajectories")
    listed |= {e.get("file") for e in traj if isinstance(e, dict)} if isinstance(traj, list) \
        else set()
    for p in sorted(Path(directory).iterdir()):
        if p.name != MANIFEST and p.name not in listed:
            result.problems.append(f"{p.name}: orphan file, not in the manifest (a case "
                                   f"deleted from the manifest, or a stray file)")
    tol = manifest.get("tolerance") if isinstance(manifest.get("tolerance"), dict) else {}
    safety = tol.get("safety")
    if tol.get("lambda") != LAMBDA:
        result.problems.append(f"manifest tolerance.lambda is {tol.get('lambda')!r}; the "
                               f"stored tolerances follow this refnorm's model, lambda "
                               f"{LAMBDA!r}")
    if not isinstance(safety, (int, float)) or isinstance(safety, bool) or not safety > 0:
        result.problems.append(f"manifest tolerance.safety is {safety!r}, not a positive "
                               f"number")
        safety = None
    for g in golden:
        if not recompute:
            continue
        spec = BY_NAME[g.case.variant]
        ref = compute(spec, g.case)
        case64 = _cases.with_dtype(g.case, "float64")
        b64 = bounds(spec, case64, ref)
        if safety is not None:
            _check_tolerances(g, spec, ref, safety, tol.get("strict") is True, result)
        same = True
        for k, stored in g.reference.items():
            fresh = ref.outputs.get(k)
            if fresh is None or fresh.shape != stored.shape:
                result.problems.append(f"{g.entry['file']}: output {k!r} not produced by this "
                                       f"refnorm")
                same = False
                continue
            if np.array_equal(fresh, stored, equal_nan=True):
                continue
            same = False
            both = np.isfinite(fresh) & np.isfinite(stored)
            bad = np.any(np.isfinite(fresh) != np.isfinite(stored)) or np.any(
                np.abs(fresh[both] - stored[both]) > b64[k][both])
            if bad:
                result.problems.append(f"{g.entry['file']} ({g.case.variant} {g.case.dtype} "
                                       f"{g.case.name}): stored {k} differs from this refnorm's "
                                       f"reference beyond float64 rounding")
        result.identical += same
        if progress is not None:
            progress(g.entry["file"])
    return verify_trajectories(directory, result, recompute=recompute, progress=progress,
                               trajectories=trajectories)

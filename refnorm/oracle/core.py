"""``check``: run a candidate on every case of every variant it implements, and report."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from refnorm.oracle import adapters as _adapters
from refnorm.oracle import cases as _cases
from refnorm.oracle import mistakes as _mistakes
from refnorm.oracle import reference as _reference
from refnorm.oracle import tolerance as _tolerance
from refnorm.oracle.formats import get_format, round_to
from refnorm.oracle.report import CaseResult, OutputResult, Report, compare_outputs, within
from refnorm.oracle.structure import groups_of

__all__ = ["check", "prepare", "Prepared", "run_case", "select_specs"]


@dataclass
class Prepared:
    """A case with its reference, its bounds, its groups and the emulated correct kernel."""

    case: _cases.Case
    ref: _reference.Reference
    bounds: dict
    groups: object
    emulated: dict | None          # a correct kernel's outputs, rounded to the dtype
    raw: dict | None = None        # the same before that rounding (in the accumulator)


def flush_subnormals(case):
    """The case as a flush-to-zero candidate sees it: inputs below the accumulator's smallest
    normal number read as zero (DAZ)."""
    tiny = get_format(case.dtype).accumulator.tiny

    def flush(a):
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            return a
        return np.where(np.abs(a) < tiny, np.copysign(0.0, a), a)

    return dataclasses.replace(
        case, arrays=tuple(None if a is None else flush(a) for a in case.arrays),
        kwargs={k: flush(v) for k, v in case.kwargs.items()}, dy=flush(case.dy))


def prepare(spec, case, strict=False, ftz=False) -> Prepared:
    if ftz:
        case = flush_subnormals(case)
    ref = _reference.compute(spec, case)
    bnds = _tolerance.bounds(spec, case, ref, strict, ftz=ftz)
    groups = groups_of(spec, case.sample, ref.cache)
    raw = _reference.emulate(spec, case, rounded=False)
    fmt = get_format(case.dtype)
    # (the rounded values are exact in float32 storage: half the memory)
    emulated = None if raw is None else {k: round_to(v, fmt).astype(fmt.storage)
                                         for k, v in raw.items()}
    return Prepared(case, ref, bnds, groups, emulated, raw)


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 6  # (variant, dtype, seed, size) sets kept: the mistakes re-use them


def out_of_range(spec, prep: Prepared):
    """Why a case is outside the accumulation format's range, or None.

    The model assumes no intermediate overflows or underflows. To check that assumption on a
    case, refnorm's own algorithm is run in the accumulation format (float32) and compared
    with the float64 reference under the strict float32 bound: if even it fails, an
    intermediate has left float32's range and no correct float32 kernel can be held to the
    bound there.
    """
    case = prep.case
    fmt = get_format(case.dtype)
    if fmt.name == "float64":
        return None
    acc = fmt.accumulator
    emu = prep.raw
    if emu is None:
        return None
    bnds = None
    for key, ref in prep.ref.outputs.items():
        if key not in emu:
            continue
        if bnds is None:  # float32 candidates: the default bounds are the strict float32 ones
            bnds = prep.bounds if fmt.name == acc.name else _tolerance.bounds(
                spec, dataclasses.replace(case, dtype=acc.name), prep.ref, strict=True)
        if within(ref, emu[key], bnds[key], acc):
            continue
        o = compare_outputs(key, ref, emu[key], bnds[key], acc, prep.groups)
        if not o.passed:
            what = "a NaN or infinity" if o.status == "nonfinite" else \
                f"{_num(o.worst_ulp)} {acc.name} ULP off (bound {_num(o.tol_ulp)})"
            return (f"outside {acc.name}'s range: refnorm's own algorithm in {acc.name} gives "
                    f"{what} in {key}, so an intermediate over- or underflows there")
    return None


def _num(v):
    return f"{v:.3g}"


def _nonfinite_reference(prep):
    """A reason to skip a case whose finite inputs have a non-finite float64 answer."""
    if prep.case.nonfinite:
        return None
    for key, ref in prep.ref.outputs.items():
        if not np.all(np.isfinite(ref)):
            return (f"the float64 reference itself is not finite ({key}) although the inputs "
                    f"are: the case is outside float64's range")
    return None


def _prepared_cases(spec, dtype, seed, size, strict, ftz=False):
    key = (spec.name, id(spec), dtype, seed, size, strict, ftz)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cases, skipped = _cases.generate(spec, dtype, seed, size)
    preps = []
    for c in cases:
        try:
            prep = prepare(spec, c, strict, ftz)
        except Exception as exc:  # noqa: BLE001 - a broken reference must not hide the others
            skipped.append(_cases.Skipped(spec.name, c.name, c.dtype,
                                          f"BUG in refnorm: its reference raised "
                                          f"{type(exc).__name__}: {exc}"))
            continue
        reason = out_of_range(spec, prep) or _nonfinite_reference(prep)
        prep.raw = None  # only the range check needs these two
        prep.ref.cache = None
        if reason:
            skipped.append(_cases.Skipped(spec.name, c.name, c.dtype, reason))
        else:
            preps.append(prep)
    value = (preps, skipped)
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def select_specs(variant=None):
    from refnorm.norms import ALL_SPECS, BY_NAME

    if variant is None:
        return list(ALL_SPECS)
    names = [variant] if isinstance(variant, str) else list(variant)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def run_case(adapter, prep: Prepared):
    """Run the candidate on one prepared case: ``(CaseResult, outputs)``."""
    case = prep.case
    fmt = get_format(case.dtype)
    inputs = {n: a.copy() for n, a in case.inputs.items()}
    kwargs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.kwargs.items()}
    try:
        with np.errstate(all="ignore"):
            raw = adapter(case.variant, inputs, case.dy.copy(), kwargs, dtype=fmt.name)
    except NotImplementedError as exc:
        return CaseResult(case.variant, case.name, fmt.name, "skipped",
                          message=f"not implemented by the candidate: {exc}", tags=case.tags), {}
    except Exception as exc:  # noqa: BLE001 - the candidate's failure is the report's content
        return CaseResult(case.variant, case.name, fmt.name, "error",
                          message=f"{type(exc).__name__}: {exc}", tags=case.tags), {}
    if not hasattr(raw, "items"):
        return CaseResult(case.variant, case.name, fmt.name, "error",
                          message=f"the candidate returned {type(raw).__name__}, not a dict of "
                          f"outputs", tags=case.tags), {}
    got = {k: _adapters.to_numpy(v) for k, v in raw.items()}
    outputs = {}
    for key, ref in prep.ref.outputs.items():
        if key not in got and key not in prep.ref.required:
            continue  # optional outputs (state, saved statistics) are checked when returned
        emu = prep.emulated.get(key) if prep.emulated else None
        outputs[key] = compare_outputs(key, ref, got.get(key), prep.bounds[key], fmt,
                                       prep.groups if key in ("y", "dx") else None, emu)
    for key, value in prep.ref.exact.items():
        if key in got:
            same = np.array_equal(np.asarray(got[key]), np.asarray(value))
            outputs[key] = OutputResult(key, "pass" if same else "FAIL", size=np.size(value),
                                        note="" if same else f"expected {np.asarray(value)!r}, "
                                        f"got {np.asarray(got[key])!r}",
                                        worst_ulp=0.0 if same else float("inf"),
                                        budget=0.0 if same else float("inf"))
    status = "pass" if all(o.passed for o in outputs.values()) else "FAIL"
    return CaseResult(case.variant, case.name, fmt.name, status, outputs, tags=case.tags), got


def check(impl, variant=None, dtype="float32", *, device="cpu", seed=0, size="full",
          strict=False, ftz=None, cases=None, diagnose=True, progress=None) -> Report:
    """Check a candidate against the reference on every case; returns a :class:`Report`.

    Parameters
    ----------
    impl : str or callable
        ``"torch"``, ``"jax"``, ``"module:function"``, an adapter, or a callable following the
        protocol of :mod:`refnorm.oracle.adapters`.
    variant : str or list of str, optional
        Variants to check (default: every registered one the candidate supports).
    dtype : {"float32", "bfloat16", "float16", "float64"}
        The candidate's dtype: inputs are rounded to it, errors counted in its ULPs.
    device : str
        For the torch and jax adapters: ``"cpu"`` or ``"cuda"``.
    seed : int
        Cases are a deterministic function of the seed.
    size : {"full", "ci"}
        ``"ci"`` leaves out the inputs above :data:`refnorm.oracle.cases.CI_MAX_ELEMENTS`.
    strict : bool
        Require float32 accumulation everywhere, parameter gradients included.
    ftz : bool, optional
        Accept a candidate that flushes subnormal numbers to zero (CUDA fast math, XLA on the
        CPU): inputs below the accumulator's smallest normal number are flushed before the
        reference is computed, and the bounds allow the flushing of intermediates. Default:
        the adapter's ``ftz`` attribute (True for the JAX adapter), else False.
    cases : iterable of Case, optional
        Check these cases (from :func:`refnorm.oracle.goldens.load`, say) instead of
        generating them; their own dtype is used.
    diagnose : bool
        Name the known mistake that the failures match.
    progress : callable, optional
        Called with a short label after each case (the CLI's progress bar).
    """
    adapter = _adapters.resolve(impl, device)
    fmt = get_format(dtype)
    specs = select_specs(variant)
    if ftz is None:
        ftz = bool(getattr(adapter, "ftz", False))
    report = Report(adapter.name, fmt.name, getattr(adapter, "device", device), seed, size,
                    strict, ftz=ftz)
    work = []
    if cases is not None:
        by_variant = {}
        for c in cases:
            c = c.case if isinstance(getattr(c, "case", None), _cases.Case) else c
            by_variant.setdefault(c.variant, []).append(c)
        wanted = {s.name for s in specs}
        for spec in specs:
            if spec.name not in by_variant or spec.name not in wanted:
                continue
            if not adapter.supports(spec):
                report.unsupported.append(spec.name)
                continue
            work.append((spec, [prepare(spec, c, strict, ftz) for c in by_variant[spec.name]]))
        if by_variant:
            report.dtype = ",".join(sorted({c.dtype for cs in by_variant.values() for c in cs}))
        report.size = "given cases"
    else:
        for spec in specs:
            if not adapter.supports(spec):
                report.unsupported.append(spec.name)
                continue
            preps, skipped = _prepared_cases(spec, fmt.name, seed, size, strict, ftz)
            report.skipped.extend(skipped)
            work.append((spec, preps))
    for spec, preps in work:
        failing = []
        for prep in preps:
            result, got = run_case(adapter, prep)
            report.results.append(result)
            if result.status == "FAIL":
                failing.append((prep, result, got))
            if progress is not None:
                progress(f"{spec.name} {prep.case.name}")
        if diagnose and failing:
            summary, per_case, matched = _mistakes.diagnose(spec, failing, fmt.name,
                                                              n_cases=len(preps), detail=True)
            # a pattern (the reduction-fault class) is named from the shape of the failures,
            # not reproduced: flushing subnormals, when it explains them all, is the better name
            by_pattern = any(m.pattern for m in _mistakes.MISTAKES if m.id in matched)
            if (not summary.startswith("matches") or by_pattern) and not ftz and \
                    _flushes(spec, failing, strict):
                matched = []
                summary = ("matches: flushes subnormal numbers to zero (FTZ/DAZ) -- every failure "
                           "goes away when subnormal inputs and intermediates are flushed; "
                           "pass ftz=True (--ftz) to accept this")
                per_case = {res.case: "matches: flushes subnormal numbers to zero"
                            for _, res, _ in failing}
            if summary:
                report.diagnoses[spec.name] = summary
            if matched and summary.startswith("matches"):
                report.matched[spec.name] = matched
            for _, res, _ in failing:
                res.diagnosis = per_case.get(res.case, "")
    return report


def _flushes(spec, failing, strict):
    """Whether every failing case passes once subnormals are flushed to zero."""
    for prep, res, got in failing:
        tiny = get_format(prep.case.dtype).accumulator.tiny
        arrays = [a for a in prep.case.arrays if a is not None] + [prep.case.dy]
        if not any(np.any((a != 0) & (np.abs(a) < tiny)) for a in arrays) and \
                "subnormal" not in prep.case.tags:
            return False
        try:
            flushed = prepare(spec, prep.case, strict, ftz=True)
        except (ValueError, ArithmeticError):  # flushing made the input invalid (a zero weight)
            return False
        for key, o in res.outputs.items():
            if key not in flushed.ref.outputs or key not in got:
                continue
            again = compare_outputs(key, flushed.ref.outputs[key], got[key], flushed.bounds[key],
                                    prep.case.dtype, flushed.groups)
            if not again.passed:
                return False
    return True


def count_cases(impl_adapter, variant, dtype, seed, size, strict=False, ftz=False):
    """How many cases :func:`check` will run (for a progress bar)."""
    n = 0
    for spec in select_specs(variant):
        if impl_adapter.supports(spec):
            n += len(_prepared_cases(spec, get_format(dtype).name, seed, size, strict, ftz)[0])
    return n

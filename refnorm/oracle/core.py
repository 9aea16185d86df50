"""``check``: run a candidate on every case of every variant it implements, and report."""
from __future__ import annotations

import dataclasses
import traceback
import warnings
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

__all__ = ["check", "prepare", "Prepared", "run_case", "select_specs", "write_diagnosis",
           "missing_diagnosis"]


def write_diagnosis(names) -> str:
    """The diagnosis of a candidate that wrote into the arrays it was given."""
    names = list(names)
    parts = []
    upstream = [n for n in names if n in ("dy", "ds")]  # (ds: the prenorm output's gradient)
    if upstream:
        which = " and ".join(upstream)
        parts.append(f"backward wrote into {which} in place; where {which} is shared (a "
                     f"residual add passes the same gradient to both branches), this corrupts "
                     f"the other branch's gradient")
    others = [n for n in names if n not in upstream]
    if others:
        parts.append(f"the candidate wrote into its input{'s' if len(others) > 1 else ''} "
                     f"{', '.join(others)} in place; the caller's tensors (a model's "
                     f"activations, its parameters, its running statistics) are then corrupted")
    return "; ".join(parts)


#: What a missing output (not a gradient) means, by its name: said by :func:`missing_diagnosis`
MISSING_OUTPUT = {
    "s": ("the residual sum s (prenorm output) is not returned: a fused residual-add norm "
          "returns y and s = x + residual, the next block's residual (vLLM's fused_add_rms_norm "
          "writes s into `residual`; FlashAttention's layer_norm_fn returns it with "
          "prenorm=True): return it as \"s\""),
}


def missing_diagnosis(names) -> str:
    """The diagnosis of outputs and gradients a candidate does not return (and did not declare
    frozen)."""
    grads = [n for n in names if n.startswith("d")]
    said = [MISSING_OUTPUT[n] for n in names if n in MISSING_OUTPUT]
    rest = [n for n in names if n not in grads and n not in MISSING_OUTPUT]
    if rest:
        said.append(f"{', '.join(rest)} missing from the candidate's outputs")
    if not grads:
        return "; ".join(said)
    inputs = tuple(n[1:] for n in grads)
    return "; ".join(said + [""]) + (f"{', '.join(grads)} not computed by the candidate; if "
            f"{' and '.join(inputs)} {'is' if len(inputs) == 1 else 'are'} frozen (a LoRA "
            f"kernel's weight, say), declare it and the rest is judged: "
            f"candidate.frozen = {inputs!r}, check(..., frozen={inputs!r}), "
            f"torch_function(fn, frozen={inputs!r}), or --frozen {' '.join(inputs)}")


_SIGNATURE_WORDS = ("positional argument", "unexpected keyword argument",
                    "required positional", "required keyword", "takes no keyword",
                    "missing 1 required", "got multiple values")


def _hint(adapter, spec, exc):
    """A fix for a TypeError that looks like a signature mismatch, or ''."""
    if not isinstance(exc, TypeError) or not any(w in str(exc) for w in _SIGNATURE_WORDS):
        return ""
    import inspect

    try:
        sig = f"{spec.name}{inspect.signature(spec.forward)}"
    except (TypeError, ValueError):
        sig = spec.name
    if isinstance(adapter, _adapters.TorchAdapter) and adapter.fn is not None:
        return (f"hint: torch_function calls your function by keyword with the names of "
                f"refnorm's forward, {sig} (the differentiable inputs as tensors); "
                f"torch.nn.functional's functions name their first argument `input`: wrap "
                f"one, e.g. torch_function(lambda x, normalized_shape, weight=None, bias=None, "
                f"eps=1e-5: F.layer_norm(x, normalized_shape, weight, bias, eps))")
    return (f"hint: the oracle calls a candidate as {_adapters.PROTOCOL_SIGNATURE} "
            f"(refnorm.oracle.adapters documents the protocol; the inputs and kwargs are named "
            f"as in refnorm's forward, {sig}); for a PyTorch function with that forward's "
            f"signature, pass torch_function(fn)")


def _traceback(exc) -> str:
    """The traceback of a candidate's exception, without the oracle's own frames."""
    import os

    frames = traceback.extract_tb(exc.__traceback__)
    oracle = os.path.dirname(os.path.abspath(__file__))
    theirs = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) != oracle]
    # a signature mismatch raises in the oracle's own call: show that call, the last frame
    return "".join(traceback.format_list((theirs or frames[-1:])[-6:])).rstrip()


@dataclass
class Prepared:
    """A case with its reference, its bounds, its groups and the emulated correct kernel."""

    case: _cases.Case
    ref: _reference.Reference
    bounds: dict
    groups: object
    emulated: dict | None          # a correct kernel's outputs, rounded to the dtype
    raw: dict | None = None        # the same before that rounding (in the accumulator)
    ill: str | None = None         # why a memory-saving backward is ill-conditioned here


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
        kwargs={k: flush(v) for k, v in case.kwargs.items()}, dy=flush(case.dy),
        douts={k: flush(v) for k, v in case.douts.items()})


def prepare(spec, case, strict=False, ftz=False, memory_efficient=False) -> Prepared:
    if ftz:
        case = flush_subnormals(case)
    ref = _reference.compute(spec, case)
    bnds = _tolerance.bounds(spec, case, ref, strict, ftz=ftz, memory_efficient=memory_efficient)
    ill = _tolerance.recomputation_conditioning(spec, case, ref) if memory_efficient else None
    groups = groups_of(spec, case.sample, ref.cache)
    raw = _reference.emulate(spec, case, rounded=False)
    # (the rounded values are exact in the format's storage: float32 for bfloat16, half the
    # memory); each output in its own format: the candidate dtype's, but a float32 residual sum
    emulated = None if raw is None else {
        k: round_to(v, f).astype(f.storage)
        for k, v in raw.items() for f in (_tolerance.output_format(spec, case, k),)}
    return Prepared(case, ref, bnds, groups, emulated, raw, ill)


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


def _prepared_cases(spec, dtype, seed, size, strict, ftz=False, memory_efficient=False):
    key = (spec.name, id(spec), dtype, seed, size, strict, ftz, memory_efficient)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cases, skipped = _cases.generate(spec, dtype, seed, size)
    preps = []
    for c in cases:
        try:
            prep = prepare(spec, c, strict, ftz, memory_efficient)
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


def _written(originals, given):
    """The names whose array the candidate changed (compared with NaNs equal)."""
    out = {}
    for n, a in originals.items():
        b = given.get(n)
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and not (
                a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")):
            out[n] = "values changed"
    return out


def run_case(adapter, prep: Prepared, frozen=()):
    """Run the candidate on one prepared case: ``(CaseResult, outputs)``.

    The candidate gets copies; afterwards they are compared with the case's own arrays, and a
    write into any of them (or one the adapter saw in its own tensors) fails the case.
    ``frozen`` names the inputs whose gradient the candidate is declared not to compute."""
    from refnorm.norms import BY_NAME

    case = prep.case
    fmt = get_format(case.dtype)
    inputs = {n: a.copy() for n, a in case.inputs.items()}
    kwargs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.kwargs.items()}
    dy = case.candidate_dy()  # an array, or {output: dy} for a record with several outputs
    try:
        with np.errstate(all="ignore"):
            raw = adapter(case.variant, inputs, dy, kwargs, dtype=fmt.name)
    except NotImplementedError as exc:
        return CaseResult(case.variant, case.name, fmt.name, "skipped",
                          message=f"not implemented by the candidate: {exc}", tags=case.tags), {}
    except Exception as exc:  # noqa: BLE001 - the candidate's failure is the report's content
        hint = _hint(adapter, BY_NAME.get(case.variant), exc)
        return CaseResult(case.variant, case.name, fmt.name, "error",
                          message=f"{type(exc).__name__}: {exc}", tags=case.tags,
                          traceback=_traceback(exc), hint=hint), {}
    writes = {}
    writes.update(_written(case.inputs, inputs))
    writes.update(_written({k: v for k, v in case.kwargs.items()}, kwargs))
    if isinstance(dy, dict):  # the upstream gradient of each output: "dy", "ds", ...
        writes.update(_written({"d" + k: v for k, v in zip(("y",) + tuple(case.douts),
                                                           case.upstream)},
                               {"d" + k: v for k, v in dy.items()}))
    else:
        writes.update(_written({"dy": case.dy}, {"dy": dy}))
    if not hasattr(raw, "items"):
        return CaseResult(case.variant, case.name, fmt.name, "error",
                          message=f"the candidate returned {type(raw).__name__}, not a dict of "
                          f"outputs", tags=case.tags, writes=writes), {}
    raw = dict(raw)
    for n, how in (raw.pop(_adapters.WRITES, None) or {}).items():
        writes[n] = how if n not in writes else f"{writes[n]}, {how}"
    got, unreadable = {}, {}
    for k, v in raw.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got[k] = _adapters.to_numpy(v)
        except Exception as exc:  # noqa: BLE001 - a hostile output is a failed output
            unreadable[k] = f"{type(exc).__name__}: {exc}"
    outputs = {}
    with np.errstate(all="ignore"):
        for key, ref in prep.ref.outputs.items():
            if key in unreadable:
                outputs[key] = OutputResult(key, "type", size=ref.size, budget=float("inf"),
                                            note=f"not a real-valued array: {unreadable[key]}")
                continue
            if key not in got and key not in prep.ref.required:
                continue  # optional outputs (state, saved statistics) are checked when returned
            if got.get(key) is None and key.startswith("d") and key[1:] in frozen:
                outputs[key] = OutputResult(key, "frozen", size=ref.size)
                continue
            emu = prep.emulated.get(key) if prep.emulated else None
            outputs[key] = compare_outputs(key, ref, got.get(key), prep.bounds[key], fmt,
                                           prep.groups if key in ("y", "dx") else None, emu)
        for key, value in prep.ref.exact.items():
            if key in got:
                same = got[key] is not None and np.shape(got[key]) == np.shape(value) and \
                    np.array_equal(np.asarray(got[key]), np.asarray(value))
                outputs[key] = OutputResult(
                    key, "pass" if same else "FAIL", size=np.size(value),
                    note="" if same else f"expected {_short(value)}, got {_short(got[key])}",
                    worst_ulp=0.0 if same else float("inf"),
                    budget=0.0 if same else float("inf"))
    status = "pass" if all(o.passed for o in outputs.values()) and not writes else "FAIL"
    result = CaseResult(case.variant, case.name, fmt.name, status, outputs, tags=case.tags,
                        writes=writes)
    known = getattr(adapter, "known", None) or {}
    if status == "FAIL" and (case.variant, case.name) in known and not writes:
        result.known = known[(case.variant, case.name)]
    return result, got


def _short(value):
    text = np.array2string(np.asarray(value), threshold=6, precision=4)
    return text if len(text) <= 60 else text[:57] + "..."


def _residual(adapter, spec, prep):
    """The dx error of ``x + f(x)`` on one case (torch functions), or None."""
    case = prep.case
    if "x" not in case.inputs or "dx" not in prep.ref.outputs or case.douts or \
            prep.ref.outputs["y"].shape != case.inputs["x"].shape:
        return None
    fmt = get_format(case.dtype)
    try:
        with np.errstate(all="ignore"):
            got = adapter.residual(case.variant, {n: a.copy() for n, a in case.inputs.items()},
                                   case.dy.copy(), {k: (v.copy() if isinstance(v, np.ndarray)
                                                        else v) for k, v in case.kwargs.items()},
                                   dtype=fmt.name)
    except Exception:  # noqa: BLE001 - the main cases report the candidate's errors
        return None
    if got is None:
        return None
    dx = prep.ref.outputs["dx"]
    ref = case.dy + dx
    # the add rounds once in the dtype; dy and dx each carry their own bound
    bound = prep.bounds["dx"] + 2 * fmt.u * (np.abs(case.dy) + np.abs(dx))
    with np.errstate(all="ignore"):
        res = compare_outputs("dx", ref, got, bound, fmt, prep.groups)
    return case.name, res


def check(impl, variant=None, dtype="float32", *, device="cpu", seed=0, size="full",
          strict=False, ftz=None, cases=None, diagnose=True, progress=None,
          frozen=None, memory_efficient=None) -> Report:
    """Check a candidate against the reference on every case; returns a :class:`Report`.

    Every case also checks that the candidate wrote into none of the arrays it was given
    (``x``, parameters, state, ``dy``). For a :func:`~refnorm.oracle.torch_function`, one
    case per variant is also run inside a residual block ``x + f(x)`` and its ``dx`` error
    reported (``report.residual``).

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
    frozen : str or collection of str, optional
        Inputs whose gradient the candidate does not compute (a frozen parameter:
        ``("weight",)``): their gradient is reported "not computed (frozen)" and the rest is
        judged. Added to the candidate's own ``frozen`` attribute.
    memory_efficient : bool, optional
        The candidate's backward saves ``y`` instead of ``x`` and recomputes
        ``xhat = (y - bias) / weight`` from it (Apex's ``memory_efficient=True``;
        LayerNorm, RMSNorm and the fused residual-add norms). The bounds of ``dx`` and
        ``dweight`` then admit the error of that recomputation, derived in
        :func:`refnorm.oracle.tolerance._recomputation_terms`; a case where it is
        ill-conditioned (a weight near 0 against ``|y - bias|``) and fails is reported
        "ill-conditioned for a memory-saving backward", not failed. Default: the candidate's
        ``memory_efficient`` attribute, else False. A candidate that recomputes without
        declaring it fails where the difference shows, and the diagnosis says so.

    """
    adapter = _adapters.resolve(impl, device)
    fmt = get_format(dtype)
    specs = select_specs(variant)
    frozen = tuple(dict.fromkeys(tuple(getattr(adapter, "frozen", ()) or ())
                                 + _adapters._names(frozen, "frozen")))
    inputs_known = {n for s in specs for n in s.diff_argnames}
    unknown = [n for n in frozen if n not in inputs_known]
    if unknown:
        raise ValueError(f"frozen: {', '.join(map(repr, unknown))} is not a differentiable "
                         f"input of {', '.join(s.name for s in specs)} (inputs: "
                         f"{', '.join(sorted(inputs_known))})")
    if ftz is None:
        ftz = bool(getattr(adapter, "ftz", False))
    if memory_efficient is None:
        memory_efficient = bool(getattr(adapter, "memory_efficient", False))
    memory_efficient = bool(memory_efficient)
    report = Report(adapter.name, fmt.name, getattr(adapter, "device", device), seed, size,
                    strict, ftz=ftz, frozen=frozen, memory_efficient=memory_efficient)
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
            work.append((spec, [prepare(spec, c, strict, ftz, memory_efficient)
                                for c in by_variant[spec.name]]))
        if by_variant:
            report.dtype = ",".join(sorted({c.dtype for cs in by_variant.values() for c in cs}))
        report.size = "given cases"
    else:
        for spec in specs:
            if not adapter.supports(spec):
                report.unsupported.append(spec.name)
                continue
            preps, skipped = _prepared_cases(spec, fmt.name, seed, size, strict, ftz,
                                             memory_efficient)
            report.skipped.extend(skipped)
            work.append((spec, preps))
    for spec, preps in work:
        failing, writes, missing = [], {}, {}
        for prep in preps:
            result, got = run_case(adapter, prep, frozen)
            if prep.ill and result.status == "FAIL" and not result.writes:
                # a memory-saving backward where recomputing xhat is ill-conditioned: said so,
                # not failed (the failing outputs stay in the result)
                result.status, result.message = "skipped", prep.ill
            report.results.append(result)
            for n in result.writes:
                writes.setdefault(n, None)
            bad = result.failing()
            if bad and all(o.status == "missing" for o in bad):
                for o in bad:
                    missing.setdefault(o.name, None)
            elif bad:
                failing.append((prep, result, got))
            if progress is not None:
                progress(f"{spec.name} {prep.case.name}")
        if isinstance(adapter, _adapters.TorchAdapter) and adapter.fn is not None and preps:
            res = _residual(adapter, spec, preps[0])
            if res is not None:
                report.residual[spec.name] = res
        said = [d for d in (write_diagnosis(writes), missing_diagnosis(missing)) if d]
        if said:
            report.diagnoses[spec.name] = "; ".join(said)
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
            if summary and said:
                report.diagnoses[spec.name] += f"; other failures: {summary}"
            elif summary:
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
        arrays = [a for a in prep.case.arrays if a is not None] + list(prep.case.upstream)
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


def count_cases(impl_adapter, variant, dtype, seed, size, strict=False, ftz=False,
                memory_efficient=False):
    """How many cases :func:`check` will run (for a progress bar)."""
    n = 0
    for spec in select_specs(variant):
        if impl_adapter.supports(spec):
            n += len(_prepared_cases(spec, get_format(dtype).name, seed, size, strict, ftz,
                                     memory_efficient)[0])
    return n

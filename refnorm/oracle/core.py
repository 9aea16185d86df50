"""``check``: run a candidate on every case of every variant it implements, and report."""
from __future__ import annotations

import dataclasses
import time
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
           "missing_diagnosis", "CONVENTIONS", "check_conventions"]

#: The kernel conventions a candidate may claim (``fn.conventions``, ``check(...,
#: conventions=...)``, ``--convention KEY=VALUE``): keyword options of the records that say how
#: a kernel computes, not what (rms_norm's and layer_norm's ``offset`` and ``casting_mode``).
CONVENTIONS = ("offset", "casting_mode")


def _is_default(key, value):
    return value is None or (key == "offset" and value == 0)


def check_conventions(conventions, specs=None) -> dict:
    """Claimed conventions as a dict, validated: keys of :data:`CONVENTIONS`, each an option
    of at least one of ``specs``, values the records accept. Raises ValueError naming what is
    wrong."""
    import inspect

    from refnorm.norms._stats import check_casting_mode, check_offset

    conventions = dict(conventions or {})
    for key, value in conventions.items():
        if key not in CONVENTIONS:
            raise ValueError(f"conventions: unknown convention {key!r} (known: "
                             f"{', '.join(CONVENTIONS)})")
        if key == "offset":
            conventions[key] = check_offset(value, "conventions")
        else:
            check_casting_mode(value, "conventions")
        if specs is not None and not any(key in inspect.signature(s.forward).parameters
                                         for s in specs):
            raise ValueError(f"conventions: {key!r} is not an option of "
                             f"{', '.join(s.name for s in specs)}")
    return conventions


def _apply_conventions(spec, cases, claimed, accepts):
    """``(cases, skipped)``: the claimed conventions set in every case's kwargs (those that
    are options of ``spec``); a case that names a convention the candidate does not claim is
    skipped, with the reason, unless the candidate follows the kwargs (``accepts``)."""
    import inspect

    params = inspect.signature(spec.forward).parameters
    mine = {k: v for k, v in claimed.items() if k in params}
    out, skipped = [], []
    for c in cases:
        other = {k: v for k, v in c.kwargs.items() if k in CONVENTIONS and k not in mine
                 and not _is_default(k, v)}
        if other and not accepts:
            said = ", ".join(f"{k}={v!r}" for k, v in other.items())
            skipped.append(_cases.Skipped(
                spec.name, c.name, c.dtype,
                f"a kernel convention the candidate does not claim ({said}): to check it, "
                f"declare it (candidate.conventions = {other!r}, check(..., conventions=...), "
                f"or --convention)"))
            continue
        out.append(dataclasses.replace(c, kwargs={**c.kwargs, **mine}) if mine else c)
    return out, skipped


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
    #: the mistake catalogue's outputs on this case, ``{(mistake id, alternative): outputs}``,
    #: filled by the diagnosis (:func:`refnorm.oracle.mistakes.diagnose`) as it needs them:
    #: every failing candidate checked on the same cases reuses them
    mistake_outputs: dict = dataclasses.field(default_factory=dict)
    #: ``{output: (limit, half)}``: the diagnosis's allowances from ``bounds``, computed once
    #: (:func:`refnorm.oracle.mistakes._case_limits`)
    agree_limits: dict = dataclasses.field(default_factory=dict)


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


def _mode_out_of_range(prep):
    r"""Why a case is outside the range of its claimed casting mode ``"none"``, or None. That
    mode holds the squares :math:`x^2` (LayerNorm: :math:`(x-\mu)^2`), their mean and rstd in
    the candidate dtype: the squares overflow float16 beyond :math:`|x| = 256`; rstd overflows
    where :math:`\langle x^2\rangle + \epsilon` is below :math:`1/\max^2` (a zero float16 row
    with ``eps = 1e-8``); and where the mean square is so small that half a subnormal spacing
    :math:`\eta` of each square exceeds :math:`u_D(\langle x^2\rangle + \epsilon)`, the
    squares' underflow costs more than the mode's roundings. No correct kernel of that mode is
    finite or within the bound there."""
    case = prep.case
    fmt = get_format(case.dtype)
    if case.kwargs.get("casting_mode") != "none" or fmt.name == "float64" \
            or prep.groups is None:
        return None
    x = np.asarray(case.arrays[0], np.float64)
    g = prep.groups
    with np.errstate(all="ignore"):
        d = x - g.spread(g.mean(x)) if case.variant != "rms_norm" else x
        sq = np.where(np.isfinite(d), d * d, 0.0)
        ms = g.mean(sq)
        eps = float(case.kwargs.get("eps") or 0.0)
        outside = case.kwargs.get("eps_placement") == "outside"
        rstd = 1 / (np.sqrt(ms) + eps) if outside else 1 / np.sqrt(ms + eps)
    what = None
    if sq.size and (sq.max() > fmt.max or ms.max() > fmt.max):
        what = f"the squares overflow {fmt.name} (|x| up to {np.sqrt(sq.max()):.3g})"
    elif np.any(rstd > fmt.max):
        what = f"rstd overflows {fmt.name} ({rstd.max():.3g})"
    elif np.any(rstd ** 3 > fmt.max):   # the backward through rstd: r^3 in the dtype
        what = f"the backward's rstd^3 overflows {fmt.name} ({rstd.max() ** 3:.3g})"
    elif np.any((ms > 0) & (0.5 * fmt.smallest_subnormal > fmt.u * (ms + eps))):
        what = (f"the squares underflow {fmt.name} (mean square "
                f"{ms[ms > 0].min():.3g}, eps {eps:.3g})")
    return f"outside casting mode 'none''s range: {what}" if what else None


def _nonfinite_reference(prep):
    """A reason to skip a case whose finite inputs have a non-finite float64 answer."""
    if prep.case.nonfinite:
        return None
    for key, ref in prep.ref.outputs.items():
        if not np.all(np.isfinite(ref)):
            return (f"the float64 reference itself is not finite ({key}) although the inputs "
                    f"are: the case is outside float64's range")
    return None


def _prepared_cases(spec, dtype, seed, size, strict, ftz=False, conventions=None,
                    accepts=True, memory_efficient=False):
    claimed = tuple(sorted((conventions or {}).items()))
    key = (spec.name, id(spec), dtype, seed, size, strict, ftz, claimed, accepts,
           memory_efficient)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    cases, skipped = _cases.generate(spec, dtype, seed, size)
    cases, dropped = _apply_conventions(spec, cases, dict(claimed), accepts)
    skipped = skipped + dropped
    preps = []
    for c in cases:
        try:
            prep = prepare(spec, c, strict, ftz, memory_efficient)
        except Exception as exc:  # noqa: BLE001 - a broken reference must not hide the others
            skipped.append(_cases.Skipped(spec.name, c.name, c.dtype,
                                          f"BUG in refnorm: its reference raised "
                                          f"{type(exc).__name__}: {exc}", _cases.case_shape(c)))
            continue
        reason = out_of_range(spec, prep) or _mode_out_of_range(prep) \
            or _nonfinite_reference(prep)
        prep.raw = None  # only the range check needs these two
        prep.ref.cache = None
        if reason:
            skipped.append(_cases.Skipped(spec.name, c.name, c.dtype, reason,
                                          _cases.case_shape(c)))
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
    ``frozen`` names the inputs whose gradient the candidate is declared not to compute. The
    result carries the case's shape (:func:`refnorm.oracle.cases.case_shape`) and the seconds
    the call and the comparison took."""
    start = time.perf_counter()
    result, got = _run_case(adapter, prep, frozen)
    result.shape = _cases.case_shape(prep.case)
    result.seconds = time.perf_counter() - start
    return result, got


def _run_case(adapter, prep, frozen):
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
          frozen=None, only=None, conventions=None, memory_efficient=None) -> Report:
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
    only : str or collection of str, optional
        Run only the cases of these names (``Case.name``, such as ``"oracle:(37,1000)"``);
        the others are neither run nor listed as skipped. Everything else is as for the full
        run: the same preparation, bounds and skips, and the residual block is run when the
        variant's first case is among them. :func:`refnorm.testing.assert_case` checks one
        case this way. A name that no selected variant has raises ``ValueError``.
    conventions : dict, optional
        The kernel conventions the candidate claims (:data:`CONVENTIONS`): ``{"casting_mode":
        "llama", "offset": 1.0}``. Merged over the candidate's own ``conventions`` attribute
        (``fn.conventions = {...}``, as ``fn.frozen``). Every case of a variant with those
        options is run with them, the reference and the candidate alike, and the tolerance
        admits the claimed casting mode's roundings and no more
        (:meth:`refnorm.oracle.tolerance._Standardization.mode_terms`): a kernel that claims
        ``"gemma"`` and rounds like ``"llama"`` fails, and the diagnosis names it. Cases that
        carry a convention the candidate does not claim are skipped, with the reason, unless
        the candidate follows each case's kwargs (``accepts_conventions``: the torch
        adapter's records, the catalogue's kernels).
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
    claimed = check_conventions({**(getattr(adapter, "conventions", None) or {}),
                                 **(conventions or {})}, specs)
    accepts = bool(getattr(adapter, "accepts_conventions", False))
    if ftz is None:
        ftz = bool(getattr(adapter, "ftz", False))
    if memory_efficient is None:
        memory_efficient = bool(getattr(adapter, "memory_efficient", False))
    memory_efficient = bool(memory_efficient)
    report = Report(adapter.name, fmt.name, getattr(adapter, "device", device), seed, size,
                    strict, ftz=ftz, frozen=frozen, conventions=claimed,
                    memory_efficient=memory_efficient)
    wanted = None if only is None else ({only} if isinstance(only, str) else set(only))
    work, found = [], set()
    if cases is not None:
        by_variant = {}
        for c in cases:
            c = c.case if isinstance(getattr(c, "case", None), _cases.Case) else c
            by_variant.setdefault(c.variant, []).append(c)
        for spec in specs:
            if spec.name not in by_variant:
                continue
            if not adapter.supports(spec):
                report.unsupported.append(spec.name)
                continue
            cases_run, dropped = _apply_conventions(spec, by_variant[spec.name], claimed, accepts)
            given = [c for c in cases_run if wanted is None or c.name in wanted]
            dropped = [s for s in dropped if wanted is None or s.name in wanted]
            found.update([c.name for c in given] + [s.name for s in dropped])
            report.skipped.extend(dropped)
            preps = [prepare(spec, c, strict, ftz, memory_efficient) for c in given]
            first = preps[0] if preps and given[0] is cases_run[0] else None
            work.append((spec, preps, first))
        if by_variant:
            report.dtype = ",".join(sorted({c.dtype for cs in by_variant.values() for c in cs}))
        report.size = "given cases"
    else:
        for spec in specs:
            if not adapter.supports(spec):
                report.unsupported.append(spec.name)
                continue
            preps, skipped = _prepared_cases(spec, fmt.name, seed, size, strict, ftz, claimed,
                                             accepts, memory_efficient)
            first = preps[0] if preps else None
            if wanted is not None:
                preps = [p for p in preps if p.case.name in wanted]
                skipped = [s for s in skipped if s.name in wanted]
                found.update([p.case.name for p in preps] + [s.name for s in skipped])
            report.skipped.extend(skipped)
            work.append((spec, preps, first))
    if wanted is not None and work and wanted - found:
        raise ValueError(f"only: no case named {', '.join(map(repr, sorted(wanted - found)))} "
                         f"in {', '.join(s.name for s, _, _ in work)} ({fmt.name}, seed {seed}, "
                         f"size {size!r})")
    for spec, preps, first in work:
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
        if isinstance(adapter, _adapters.TorchAdapter) and adapter.fn is not None and \
                first is not None and any(p is first for p in preps):
            res = _residual(adapter, spec, first)
            if res is not None:
                report.residual[spec.name] = res
        said = [d for d in (write_diagnosis(writes), missing_diagnosis(missing)) if d]
        if said:
            report.diagnoses[spec.name] = "; ".join(said)
        if diagnose and failing:
            summary, per_case, matched = _mistakes.diagnose(spec, failing, fmt.name,
                                                              n_cases=len(preps), detail=True)
            # a claimed casting mode whose failures all fit another mode's bound: that mode
            casting = _casting_diagnosis(spec, failing, strict, ftz)
            if casting is not None:
                summary, per_case, matched = casting
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


#: for a claimed casting mode, the modes a kernel may round like instead, most likely first
_OTHER_MODES = {"gemma": ("llama", "none"), "llama": ("none",)}


def _casting_diagnosis(spec, failing, strict, ftz):
    """``(summary, per_case, matched)`` when every failure of a candidate that claims a casting
    mode is within the bound of another mode (it rounds like that one), else None. Named from
    the bounds, not by reproducing outputs: kernels of one mode still differ from each other by
    more than the claimed mode's bound (the order of their operations in the dtype)."""
    modes = {prep.case.kwargs.get("casting_mode") for prep, _, _ in failing}
    if len(modes) != 1:
        return None
    claimed = modes.pop()
    for alt in _OTHER_MODES.get(claimed, ()):
        ok, judged = True, 0
        for prep, res, got in failing:
            case = dataclasses.replace(prep.case, kwargs={**prep.case.kwargs,
                                                          "casting_mode": alt})
            try:
                other = prepare(spec, case, strict, ftz)
            except Exception:  # noqa: BLE001 - no diagnosis rather than a crash
                return None
            if _mode_out_of_range(other):   # no kernel of that mode can be judged there
                continue
            judged += 1
            for key in res.outputs:
                if key not in other.ref.outputs or key not in got or not compare_outputs(
                        key, other.ref.outputs[key], got[key], other.bounds[key],
                        case.dtype, other.groups).passed:
                    ok = False
                    break
            if not ok:
                break
        if ok and judged:
            m = next((m for m in _mistakes.MISTAKES if m.variant == spec.name
                      and m.kind == f"casting-{alt}"), None)
            name = m.name if m is not None else f"casting mode {alt}, not {claimed}"
            text = (f"matches: {name} -- every failure is within the bound of casting mode "
                    f"{alt!r}" + (f": {m.description}" if m is not None else ""))
            return (text, {res.case: f"matches: {name}" for _, res, _ in failing},
                    [m.id] if m is not None else [])
    return None


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
                conventions=None, memory_efficient=False):
    """How many cases :func:`check` will run (for a progress bar)."""
    n = 0
    specs = select_specs(variant)
    claimed = check_conventions(conventions, specs)
    accepts = bool(getattr(impl_adapter, "accepts_conventions", False))
    for spec in specs:
        if impl_adapter.supports(spec):
            n += len(_prepared_cases(spec, get_format(dtype).name, seed, size, strict, ftz,
                                     claimed, accepts, memory_efficient)[0])
    return n

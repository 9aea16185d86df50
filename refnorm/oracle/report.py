"""Comparing a candidate's outputs with the reference, and the report that says how it went.

**ULPs.** Errors are counted in units in the last place of the candidate dtype, at the
magnitude of the reference value, with a floor at the output's scale:

.. math::

   \\mathrm{ulps}_i = \\frac{|\\tilde y_i - y_i|}{\\mathrm{ulp}_D\\bigl(\\max(|y_i|, s_i)\\bigr)},
   \\qquad s_i = \\text{RMS of } y \\text{ over the group of } i

(the group is the row, channel or (sample, group) that shares the statistics; for a parameter
gradient and for a variant without groups it is the whole tensor). Without the floor, an
element that is zero by cancellation (``y = gamma * xhat + beta`` near zero) would count any
legitimate rounding error of the terms as millions of ULPs. The relative error is measured
the same way: :math:`|\\tilde y_i - y_i| / \\max(|y_i|, s_i)`.

**Pass or fail** is decided by the tolerance model (:mod:`refnorm.oracle.tolerance`), element
by element: an output passes when every element is within its bound and its non-finite
values agree with the reference's: where the reference is NaN (undefined) any NaN or infinity
is accepted, where it is an infinity only the same infinity, and where it is finite only a
finite value, or the infinity it correctly rounds to when it lies beyond the dtype's range.
``budget`` is the largest ratio error/bound (at most 1 to pass); the *worst
index* is where it is reached. ``tol ULP`` is the bound there, in ULPs. Where a whole group of
the reference is zero the ULP floor is the tensor's RMS, and 1 if that is zero too.

A :class:`Report` is bool-like (true when everything passed), prints as a table per variant,
and keeps every case's results (:class:`CaseResult`) and every output's (:class:`OutputResult`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from refnorm.oracle.formats import get_format, representable, round_to, ulp

__all__ = ["OutputResult", "CaseResult", "Report", "compare_outputs", "within"]


@dataclass
class OutputResult:
    """How one output (``y``, ``dx``, ``dweight``, ``running_var``, ``rstd``...) of a case did."""

    name: str
    status: str                 # "pass", "FAIL", "missing", "shape", "nonfinite", "type",
    #                             "frozen" (declared not computed: passes, judged by nothing)
    worst_ulp: float = 0.0      # the largest error over the elements, in ULPs
    budget: float = 0.0         # the largest error/bound over the elements (<= 1 passes)
    ulp: float = 0.0            # the error at the worst index (where error/bound peaks), in ULPs
    tol_ulp: float = 0.0        # the bound at the worst index, in ULPs
    max_abs: float = 0.0
    max_rel: float = 0.0
    index: tuple | None = None  # where error/bound is largest
    expected: float | None = None
    got: float | None = None
    n_bad: int = 0
    size: int = 0
    emulated_ulp: float | None = None   # a correct kernel's error (emulation), in ULPs
    loose: bool = False         # the bound reaches the output's scale: no information here
    wide: bool = False          # values not all representable in the dtype (a wider type?)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "frozen")

    def describe(self) -> str:
        if self.status == "missing":
            text = f"{self.name}: missing from the candidate's outputs"
            if self.name.startswith("d"):
                text += f" (not declared frozen: --frozen {self.name[1:]})"
            return text
        if self.status == "frozen":
            return f"{self.name}: not computed (frozen)"
        if self.status in ("shape", "type"):
            return f"{self.name}: {self.note}"
        where = "" if self.index is None else f" at {list(self.index)}"
        vals = "" if self.expected is None else \
            f" (expected {self.expected:.6g}, got {self.got:.6g})"
        head = (f"{self.name}: {_num(self.ulp)} ULP > tol {_num(self.tol_ulp)} ULP{where}"
                f"{vals}; max {_num(self.worst_ulp)} ULP, max abs {self.max_abs:.3g}, "
                f"max rel {self.max_rel:.3g}")
        if self.n_bad:
            head += f"; {self.n_bad}/{self.size} elements out of tolerance"
        if self.note:
            head += f"; {self.note}"
        return head


@dataclass
class CaseResult:
    """One case: its outputs, its status and, for a failure, which known mistake it matches."""

    variant: str
    case: str
    dtype: str
    status: str                          # "pass", "FAIL", "error", "skipped"
    outputs: dict = field(default_factory=dict)
    message: str = ""
    diagnosis: str = ""
    tags: tuple = ()
    traceback: str = ""                  # of an error: the candidate's frames, file and line
    hint: str = ""                       # of an error that looks like a signature mismatch
    writes: dict = field(default_factory=dict)   # name -> how the candidate wrote into it
    known: str = ""                      # why this failure is the library's known behaviour
    shape: tuple | None = None           # the shape of the case's first input (its id)
    seconds: float = 0.0                 # the time the candidate's call and the comparison took

    @property
    def passed(self) -> bool:
        return self.status in ("pass", "skipped")

    def failing(self):
        return [o for o in self.outputs.values() if not o.passed]


def _num(v):
    """A non-negative figure in at most 8 characters (the report's columns are 9 wide)."""
    if v is None:
        return "-"
    v = float(v)
    if math.isinf(v) or math.isnan(v):
        return str(v)
    if v < 1e4:
        return f"{v:.3g}"
    return f"{v:.2e}" if v < 1e100 else f"{v:.1e}"


def _sci(v):
    """A non-negative figure in at most 9 characters (the 10-wide columns)."""
    v = float(v)
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.2e}" if v < 1e100 else f"{v:.1e}"


def _scale(ref, groups):
    """The ULP floor: RMS over the group; over the tensor where that is 0; else 1.

    Computed as ``m * rms(a / m)`` with ``m = max|a|``, so that squares cannot underflow."""
    a = np.abs(np.where(np.isfinite(ref), ref, 0.0))
    m = float(a.max()) if a.size else 0.0
    whole = m * float(np.sqrt(np.mean((a / m) ** 2))) if m > 0 else 1.0
    if groups is not None and ref.shape == groups.labels.shape:
        gm = groups.max(a)
        gm = np.where(gm > 0, gm, 1.0)
        rms = gm * np.sqrt(groups.mean((a / groups.spread(gm)) ** 2))
        rms = groups.spread(rms)
        return np.where(rms > 0, rms, whole)
    return np.full(ref.shape, whole)


def _ulp_at(ref, scale, fmt):
    """The ULP each error is measured in: the spacing at ``max(|ref|, scale)``."""
    return ulp(np.maximum(np.abs(np.where(np.isfinite(ref), ref, 0.0)), scale), fmt)


def within(ref, got, bound, fmt) -> bool:
    """Whether ``got`` passes against ``ref`` under ``bound`` (the test of
    :func:`compare_outputs`, without the statistics)."""
    fmt = get_format(fmt)
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        return False
    ratio, pattern_bad = _violations(ref, got, bound, fmt)[:2]
    return not np.any(pattern_bad) and not np.any(ratio > 1)


def _violations(ref, got, bound, fmt):
    # non-finite values: where the reference is NaN (undefined) any NaN or infinity is
    # accepted; where it is an infinity, the same infinity; where it is finite, a finite value.
    # A finite reference beyond the dtype's range rounds to an infinity: that infinity is
    # then the correctly rounded answer, and is accepted.
    fr, fg = np.isfinite(ref), np.isfinite(got)
    both = fr & fg
    pattern_bad = ~both
    finite = not np.any(pattern_bad)
    if not finite:
        same_nan = np.isnan(ref) & ~fg
        same_inf = np.isinf(ref) & (ref == got)
        overflow = fr & ~fg & (np.abs(np.where(fr, ref, 0.0)) >= fmt.max) & \
            (round_to(np.where(fr, ref, 0.0), fmt) == got)
        pattern_bad = pattern_bad & ~same_nan & ~same_inf & ~overflow
    with np.errstate(divide="ignore", invalid="ignore"):
        if finite:  # the common case: the same values, without the masks
            err = np.abs(got - ref)
            ratio = err / np.where(bound > 0, bound, np.inf)
            ratio = np.where((bound <= 0) & (err > 0), np.inf, ratio)
        else:
            err = np.where(both, np.abs(got - np.where(both, ref, 0.0)), 0.0)
            ratio = np.where(both, err / np.where(bound > 0, bound, np.inf), 0.0)
            ratio = np.where(both & (bound <= 0) & (err > 0), np.inf, ratio)
        ratio = np.where(np.isnan(ratio), 0.0, ratio)
    return ratio, pattern_bad, both, err


def compare_outputs(name, ref, got, bound, fmt, groups=None, emulated=None) -> OutputResult:
    """Compare one output ``got`` with ``ref`` under the per-element ``bound``.

    Whatever ``got`` holds (infinities, NaNs, 1e300, integers), no floating-point warning
    escapes: over- and underflows of the statistics are expected there."""
    with np.errstate(all="ignore"):
        return _compare(name, ref, got, bound, fmt, groups, emulated)


def _compare(name, ref, got, bound, fmt, groups, emulated):
    fmt = get_format(fmt)
    if got is None:
        return OutputResult(name, "missing")
    got = np.asarray(got, dtype=np.float64)
    if got.shape != ref.shape:
        if got.size == ref.size and name in ("mean", "rstd"):
            got = got.reshape(ref.shape)
        else:
            return OutputResult(name, "shape", note=f"shape {tuple(got.shape)}, expected "
                                f"{tuple(ref.shape)}", size=ref.size)
    res = OutputResult(name, "pass", size=ref.size)
    scale = _scale(ref, groups)
    ratio, pattern_bad, both, err = _violations(ref, got, bound, fmt)
    fr = np.isfinite(ref)
    unit = _ulp_at(ref, scale, fmt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # beyond the range in
        ulps = np.where(both, err / unit, 0.0)                           # ULPs: inf ULP
        rel = np.where(both, err / np.maximum(np.abs(np.where(both, ref, 0.0)), scale), 0.0)
        rel = np.where(np.isnan(rel), np.inf, rel)
    if ref.size:
        res.worst_ulp = float(ulps.max())
        res.max_abs = float(err.max())
        res.max_rel = float(rel.max())
        res.budget = float(ratio.max())
        k = int(np.argmax(ratio))
        res.index = tuple(int(i) for i in np.unravel_index(k, ref.shape))
        bound_k = bound.flat[k] if np.isfinite(bound.flat[k]) else 0.0  # NumPy scalars: an
        res.tol_ulp = float(np.float64(bound_k) / unit.flat[k])          # overflow gives inf
        res.ulp = float(ulps.flat[k])
        res.expected, res.got = float(ref.flat[k]), float(got.flat[k])
        res.n_bad = int(np.count_nonzero(ratio > 1))
        fin = np.isfinite(bound) & fr
        res.loose = bool(np.any((bound[fin] >= 0.5 * np.maximum(scale[fin], np.abs(ref[fin])))
                                & (scale[fin] > 0)))
    if np.any(pattern_bad):
        k = int(np.flatnonzero(pattern_bad)[0])
        res.status = "nonfinite"
        res.index = tuple(int(i) for i in np.unravel_index(k, ref.shape))
        res.expected, res.got = float(ref.flat[k]), float(got.flat[k])
        res.n_bad += int(np.count_nonzero(pattern_bad))
        res.worst_ulp = res.ulp = math.inf
        res.note = (f"NaN/infinity pattern differs from the reference at "
                    f"{int(np.count_nonzero(pattern_bad))} element(s)")
    elif res.budget > 1:
        res.status = "FAIL"
    if emulated is not None and emulated.shape == ref.shape:
        e = np.where(np.isfinite(ref) & np.isfinite(emulated), np.abs(emulated - np.where(
            np.isfinite(ref), ref, 0.0)), 0.0)
        with np.errstate(over="ignore"):
            res.emulated_ulp = float((e / unit).max()) if ref.size else 0.0
    if fmt.name != "float64" and not representable(got[np.isfinite(got)], fmt):
        res.wide = True   # said once per variant by the report, not on every failure line
    return res


@dataclass
class Report:
    """The result of :func:`refnorm.oracle.check`: bool-like, printable, and complete."""

    impl: str
    dtype: str
    device: str = "cpu"
    seed: int = 0
    size: str = "full"
    strict: bool = False
    ftz: bool = False
    results: list = field(default_factory=list)      # CaseResult, in order
    skipped: list = field(default_factory=list)      # cases.Skipped
    diagnoses: dict = field(default_factory=dict)    # variant -> text
    #: variant -> ids of the catalogue mistakes the failures match, such as
    #: ``"layer_norm:unbiased variance"`` (see :data:`refnorm.oracle.mistakes.MISTAKES`, whose
    #: ``kind`` is stable)
    matched: dict = field(default_factory=dict)
    unsupported: list = field(default_factory=list)  # variants the candidate has no equivalent for
    frozen: tuple = ()        # inputs declared frozen: their gradient is not computed
    #: the kernel conventions the candidate claimed (``{"casting_mode": "llama"}``)
    conventions: dict = field(default_factory=dict)
    memory_efficient: bool = False  # a backward that recomputes xhat from y was declared
    #: variant -> (case, OutputResult): dx of the residual block ``x + f(x)`` (torch functions)
    residual: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        # at least one case must have been compared: a candidate that declined every case
        # has not been shown to be right
        return (any(r.status == "pass" for r in self.results)
                and all(r.passed for r in self.results)
                and all(o.passed for _, o in self.residual.values()))

    def __bool__(self) -> bool:
        return self.passed

    @property
    def variants(self):
        seen = []
        for r in self.results:
            if r.variant not in seen:
                seen.append(r.variant)
        return seen

    def failures(self):
        return [r for r in self.results if not r.passed]

    def worst(self, variant, output):
        """The OutputResult with the largest budget for ``output`` of ``variant``, or None."""
        best = None
        for r in self.results:
            o = r.outputs.get(output) if r.variant == variant else None
            if o is not None and (best is None or _key(o) > _key(best[1])):
                best = (r, o)
        return best

    def summary(self, variant):
        """Counts that add up: ``cases = pass + fail + skipped`` (skipped: the cases outside
        the model's range and those the candidate declined)."""
        rs = [r for r in self.results if r.variant == variant]
        out = {"pass": sum(r.status == "pass" for r in rs),
               "fail": sum(r.status in ("FAIL", "error") for r in rs),
               "skipped": sum(r.status == "skipped" for r in rs)
               + sum(s.variant == variant for s in self.skipped)}
        out["cases"] = out["pass"] + out["fail"] + out["skipped"]
        out["known"] = sum(bool(r.known) for r in rs if r.status == "FAIL")
        return out

    def only(self, variant, case) -> "Report":
        """The report of one case of ``variant`` (named ``case``): its result or its skip, the
        residual block when it ran on this case, and the variant's diagnosis when the case
        failed. ``refnorm compare --junit`` writes this text for each failing case."""
        results = [r for r in self.results if r.variant == variant and r.case == case]
        residual = {v: rc for v, rc in self.residual.items() if v == variant and rc[0] == case}
        failed = not all(r.passed for r in results) or \
            not all(o.passed for _, o in residual.values())
        return dataclasses.replace(
            self, results=results, residual=residual,
            skipped=[s for s in self.skipped if s.variant == variant and s.name == case],
            diagnoses={v: d for v, d in self.diagnoses.items() if v == variant and failed},
            matched={v: m for v, m in self.matched.items() if v == variant and failed},
            unsupported=[])

    def format(self, *, details=True, max_failures=12) -> str:
        lines = [f"refnorm oracle: impl={self.impl} device={self.device} dtype={self.dtype} "
                 f"seed={self.seed} size={self.size}" + (" strict" if self.strict else "")
                 + (" ftz (subnormals may be flushed to zero)" if self.ftz else "")
                 + (f" frozen={','.join(self.frozen)}" if self.frozen else "")
                 + "".join(f" {k}={v}" for k, v in self.conventions.items())
                 + (" memory-efficient (xhat recomputed from y in the backward)"
                    if self.memory_efficient else "")]
        for v in self.variants:
            s = self.summary(v)
            ok = s["fail"] == 0
            lines.append("")
            res = self.residual.get(v)
            ok = ok and (res is None or res[1].passed)
            known = f" ({s['known']} known {self._library()} behaviour)" if s["known"] else ""
            lines.append(f"{v}: {s['cases']} cases, {s['pass']} pass, {s['fail']} fail{known}, "
                         f"{s['skipped']} skipped  [{'PASS' if ok else 'FAIL'}]")
            outputs = []
            for r in self.results:
                if r.variant == v:
                    outputs += [k for k in r.outputs if k not in outputs]
            width = max([len(o) for o in outputs] + [6]) + 2
            if outputs:
                lines.append(f"  {'output':<{width}}{'ULP':>9}{'tol ULP':>9}{'budget':>8}"
                             f"{'emul ULP':>9}{'max abs':>10}{'max rel':>10}  "
                             f"worst case [index]")
            for out in outputs:
                r, o = self.worst(v, out)
                idx = "" if o.index is None else f" {list(o.index)}"
                flag = "" if o.passed else f"  {o.status}"
                if o.status == "frozen":
                    lines.append(f"  {out}: not computed (frozen)")
                    continue
                lines.append(f"  {out:<{width}}{_num(o.ulp):>9}{_num(o.tol_ulp):>9}"
                             f"{_budget(o):>8}{_num(o.emulated_ulp):>9}{_sci(o.max_abs):>10}"
                             f"{_sci(o.max_rel):>10}  {r.case}{idx}{flag}")
            if res is not None:
                case, o = res
                lines.append(f"  residual block x + f(x), {case}: dx {_num(o.ulp)} ULP, tol "
                             f"{_num(o.tol_ulp)} ULP, max abs {_sci(o.max_abs)}, budget "
                             f"{_budget(o)}  [{'pass' if o.passed else 'FAIL'}]")
            if v in self.diagnoses:
                lines.append(f"  diagnosis: {self.diagnoses[v]}")
            fails = [r for r in self.results if r.variant == v and not r.passed]
            if details and fails:
                lines.append("  failures:")
                lines += self._failure_lines(fails, max_failures)
            wide = sorted({k for r in self.results if r.variant == v
                           for k, o in r.outputs.items() if o.wide})
            if details and wide and self.dtype != "float64":
                lines.append(f"  note: {', '.join(wide)} not all representable in "
                             f"{self.dtype}: the candidate computes or returns a wider type")
            skipped = [f"{s.name} ({s.reason})" for s in self.skipped if s.variant == v]
            skipped += [f"{r.case} (declined by the candidate: {r.message})" for r in self.results
                        if r.variant == v and r.status == "skipped"]
            if details and skipped:
                lines.append("  skipped: " + "; ".join(skipped))
            loose = {}
            for r in self.results:
                if r.variant == v:
                    for k, o in r.outputs.items():
                        if o.loose and o.passed:
                            loose.setdefault(k, []).append(r.case)
            if details and loose:
                lines.append("  bound reaches the output's scale (no information) in: "
                             + "; ".join(f"{k} {len(c)} case{'s' if len(c) > 1 else ''}"
                                         for k, c in loose.items()))
        if self.unsupported:
            lines.append("")
            lines.append("no equivalent in the candidate: " + ", ".join(self.unsupported))
        n_fail = sum(not r.passed for r in self.results)
        n_known = sum(bool(r.known) for r in self.results if not r.passed)
        n_declined = sum(r.status == "skipped" for r in self.results)
        n_compared = len(self.results) - n_declined
        lines.append("")
        known = f" ({n_known} known {self._library()} behaviour)" if n_known else ""
        lines.append(f"{'PASS' if self.passed else 'FAIL'}: {n_compared} cases compared, "
                     f"{n_fail} failed{known}, {len(self.skipped) + n_declined} skipped, "
                     f"{len(self.variants)} variant(s)"
                     + ("" if n_compared else " (nothing was compared)"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def _library(self):
        return "PyTorch" if self.impl == "torch" else self.impl

    def _failure_lines(self, fails, max_failures):
        lines, first_error = [], None
        for r in fails[:max_failures]:
            if r.status == "error":
                if first_error is None or r.message != first_error.message:
                    if first_error is None:
                        first_error = r
                    lines.append(f"    {r.case}: error: {r.message}")
                    if r.traceback:
                        lines += [f"      {t}" for t in r.traceback.splitlines()]
                    if r.hint:
                        lines.append(f"      {r.hint}")
                else:
                    lines.append(f"    {r.case}: error: the same as {first_error.case}")
                continue
            for n, how in r.writes.items():
                lines.append(f"    {r.case}: wrote into {n} in place ({how})")
            for o in r.failing():
                lines.append(f"    {r.case}: {o.describe()}")
            if r.known:
                from refnorm.oracle.adapters import KNOWN_NOTE

                lines.append(f"      -> known {self._library()} behaviour: {r.known} (see "
                             f"{KNOWN_NOTE})")
            elif r.diagnosis:
                lines.append(f"      -> {r.diagnosis}")
        if len(fails) > max_failures:
            rest = fails[max_failures:]
            same = first_error is not None and all(
                r.status == "error" and r.message == first_error.message for r in rest)
            lines.append(f"    ... and {len(rest)} more failing cases"
                         + (f" (the same error as {first_error.case})" if same else ""))
        return lines

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, tuple):
                return list(v)
            return v

        return {
            "impl": self.impl, "dtype": self.dtype, "device": self.device, "seed": self.seed,
            "size": self.size, "strict": self.strict, "ftz": self.ftz, "passed": self.passed,
            "diagnoses": self.diagnoses, "matched": self.matched,
            "unsupported": self.unsupported, "frozen": list(self.frozen),
            "conventions": dict(self.conventions),
            "memory_efficient": self.memory_efficient,
            "residual": {v: {"case": c, **{f: clean(x) for f, x in asdict(o).items()}}
                         for v, (c, o) in self.residual.items()},
            "skipped": [asdict(s) for s in self.skipped],
            "results": [{"variant": r.variant, "case": r.case, "dtype": r.dtype,
                         "status": r.status, "message": r.message, "diagnosis": r.diagnosis,
                         "traceback": r.traceback, "hint": r.hint, "writes": r.writes,
                         "known": r.known,
                         "outputs": {k: {f: clean(v) for f, v in asdict(o).items()}
                                     for k, o in r.outputs.items()}} for r in self.results],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def _key(o):
    bad = 0 if o.passed else 1
    return (bad, o.budget if math.isfinite(o.budget) else 1e300)


def _budget(o):
    """The budget column, at most 7 characters: ``42%``, ``350x``, ``>1e6x``."""
    if o.status in ("missing", "shape", "type", "frozen"):
        return o.status
    if o.status == "nonfinite":
        return "nan/inf"
    if not o.budget < 1e6:          # inf and NaN too
        return ">1e6x"
    return f"{100 * o.budget:.0f}%" if o.budget < 100 else f"{o.budget:.0f}x"

r"""Finite-difference gradient checking for any function on NumPy arrays.

This module checks a hand-written (or another library's) vector-Jacobian product against
finite differences. It knows nothing of refnorm's autograd engine; it needs two callables:

* ``f(*inputs)`` returns one ndarray, or a tuple/list of ndarrays (several outputs);
* ``vjp(cotangents, *inputs)`` returns a tuple (or list) with one gradient per input, where
  ``cotangents`` is a tuple with one array :math:`u_o` per output (a single output still gets a
  1-tuple). The gradient of input :math:`k` is :math:`\sum_o J_{o,k}^T u_o`, of the shape of
  ``inputs[k]``. ``None`` stands for an input that is not differentiated (for one that is, it
  reads as zeros).

Checking PyTorch's ``tanh`` takes a two-line wrapper::

    f = lambda x: torch.tanh(torch.tensor(x)).numpy()
    vjp = lambda cts, x: [g.numpy() for g in
                          torch.func.vjp(torch.tanh, torch.tensor(x))[1](torch.tensor(cts[0]))]
    report = check_vjp(f, vjp, (np.random.randn(3, 4),))    # bool(report); print(report)

Floating-point inputs are checked in float64 copies (float16/float32 inputs are upcast, and the
report says so); integer and boolean inputs (indices, masks) are passed through and never
differentiated. ``f`` and ``vjp`` always get fresh copies, so the caller's arrays are never
written to. Cotangents and directions are random normal, never all ones: with an all-ones
cotangent the check of a normalization layer is vacuous.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["check_vjp", "numerical_jacobian", "directional_derivative", "GradcheckReport",
           "GradcheckError", "GradcheckInconclusive", "Worst", "Kink"]

_EPS = np.finfo(np.float64).eps
_LEVELS = 4          # steps t, t/2, t/4, t/8: 2 * _LEVELS evaluations of f per derivative
_FAST_LEVELS = 3     # a fast-mode projection: steps t, t/2, t/4 (6 evaluations of f)
_FIRST_LEVELS = 2    # slow mode, first pass per element: steps t, t/2 (4 evaluations of f)
_DIAGNOSIS = 3       # projections drawn in all, after a failure by projection, to name a factor
_SAFETY = 4.0        # slack, in units of the estimated finite-difference error
_NOISE = 16.0        # f is trusted to about this many ulps of its magnitude
_KINK_FACTOR = 10.0  # one-sided slopes must differ by this many of their error estimates ...
_KINK_RTOL = 1e-6    # ... and by this fraction of their size, to call a point a kink
_RESOLVE = 1e-4      # a pass must resolve a relative error this large (or rtol, if larger)
_STEP_SEARCH = (16.0, 256.0, 1.0 / 64)  # steps tried, relative to `step`, on an unresolved one
_MAX_STEP = 0.05     # ... but no relative step above this
_FLOOR = 4.0         # an error within this many float64 rounding floors is resolved anyway


class Worst(NamedTuple):
    """The comparison reported as the worst (``index`` is None for a random projection)."""
    input: int | None
    output: int
    index: tuple | None
    analytic: float
    numerical: float
    rel_error: float


class Kink(NamedTuple):
    """A non-differentiable point: the one-sided slopes ``left`` and ``right`` differ."""
    input: int | None
    output: int
    index: tuple | None
    left: float
    right: float
    analytic: float


@dataclass
class GradcheckReport:
    r"""The outcome of :func:`check_vjp`: true when the check passed, readable when printed.

    Attributes
    ----------
    passed : bool
        True only for the verdict ``"passed"``: every comparison agreed **and** was resolved.
    verdict : {"passed", "FAILED", "INCONCLUSIVE"}
        ``"FAILED"``: some analytic value is outside its tolerance, finite-difference error
        included. ``"INCONCLUSIVE"``: none is, but some comparison could not resolve the
        tolerance (its finite-difference error estimate exceeds ``max(rtol, 1e-4)`` of the
        gradient's scale) even after a step search and, in fast mode, element by element: the
        check cannot tell a right gradient from a wrong one there. The notes say why and what
        to do. ``bool(report)`` is false for both.
    mode : {"fast", "slow"}
    n_evals, n_vjp_calls : int
        How many times ``f`` and ``vjp`` were called.
    n_evals_to_failure : int or None
        How many evaluations of ``f`` had been spent when the first failure was found (None:
        none was); the rest went to localising and diagnosing it (the inputs, then the
        elements, of a failed projection; more projections to recognise a constant factor)
        and to checking that ``f`` is deterministic.
    localised : bool
        False where ``check_vjp(..., diagnose=False)`` stopped at the first failed projection:
        the verdict stands, the inputs and elements at fault were not looked for.
    n_refined : int
        Elements checked one by one (slow mode, or fast mode's fallback) whose first estimate,
        at two steps, did not decide them, so that the full Richardson table was computed
        (4 more evaluations each); see :func:`check_vjp`.
    max_rel_error : float
        Largest :math:`|a - n| / \max(|a|, |n|)` over the failures and the values large enough
        for ``rtol`` to govern (:math:`|n| \ge atol / rtol`); near zero, ``atol`` judges.
    worst : Worst or None
        The failure furthest outside its tolerance, else the largest relative error.
    kinks : list of Kink
        Non-differentiable points found (not failures if the gradient is a one-sided slope or
        between the two).
    pattern : str
        On failure, a guess at the kind of mistake (see ``_diagnose``).
    notes : list of str
        What else the reader should know: upcast inputs, element-by-element fallbacks, ...
    """
    passed: bool
    mode: str
    n_evals: int
    n_vjp_calls: int
    max_rel_error: float
    worst: Worst | None
    # max |analytic - numerical| / max |numerical| over every comparison: the error at the scale
    # of the whole gradient, which is not inflated by elements that are nearly zero
    normwise_error: float = 0.0
    kinks: list = field(default_factory=list)
    pattern: str = ""
    notes: list = field(default_factory=list)
    rtol: float = 1e-7
    atol: float = 1e-9
    verdict: str = ""
    n_unresolved: int = 0   # comparisons left unresolved (INCONCLUSIVE when > 0 and no failure)
    n_refined: int = 0      # elements whose first, two-step estimate needed the full table
    n_evals_to_failure: int | None = None  # evaluations of f spent when a failure was found
    localised: bool = True  # False: check_vjp(diagnose=False) stopped at the first failure

    def __post_init__(self):
        if not self.verdict:
            self.verdict = "passed" if self.passed else "FAILED"
        if self.verdict not in ("passed", "FAILED", "INCONCLUSIVE"):
            raise ValueError(f"verdict must be 'passed', 'FAILED' or 'INCONCLUSIVE'; got "
                             f"{self.verdict!r}")
        self.passed = self.verdict == "passed"

    @property
    def inconclusive(self) -> bool:
        return self.verdict == "INCONCLUSIVE"

    def __bool__(self) -> bool:
        return bool(self.passed)

    def __str__(self) -> str:
        refined = f", {self.n_refined} element(s) refined" if self.n_refined else ""
        if self.mode == "fast" and self.n_evals_to_failure is not None and \
                self.n_evals_to_failure < self.n_evals:
            refined += f"; the first failure was found after {self.n_evals_to_failure} " \
                "evaluations, " + ("the rest localised it" if self.localised else
                                   "one more checked that f is deterministic")
        lines = [f"gradcheck {self.verdict} ({self.mode} mode, "
                 f"{self.n_evals} evaluations of f, {self.n_vjp_calls} calls of vjp{refined})",
                 f"  max relative error: {self.max_rel_error:.3e} (rtol={self.rtol:g}, "
                 f"atol={self.atol:g}, plus {_SAFETY:g}x the finite-difference error estimate)",
                 f"  normwise error (max |a - n| / max |n|): {self.normwise_error:.3e}"]
        if self.worst is not None:
            w = self.worst
            where = "a random projection" if w.index is None else f"element {w.index}"
            where += "" if w.input is None else f" of input {w.input}"
            lines += [f"  worst: {where}, output {w.output}: analytic {w.analytic:.10g}, "
                      f"numerical {w.numerical:.10g}, relative error {w.rel_error:.3e}",
                      "  (values are " + ("u^T J v for a random cotangent u and direction v)"
                                          if w.index is None else
                                          "(J^T u)[element] for a random cotangent u)")]
        if self.pattern:
            lines.append(f"  pattern: {self.pattern}")
        if self.kinks:
            lines.append(f"  {len(self.kinks)} non-differentiable point(s), not failures:")
            lines += [f"    input {k.input}, element {k.index}, output {k.output}: slope left "
                      f"{k.left:.6g}, right {k.right:.6g}, analytic {k.analytic:.6g}"
                      for k in self.kinks[:10]]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


class GradcheckError(AssertionError):
    """Raised by ``check_vjp(..., raise_on_failure=True)``; the message is the report."""

    def __init__(self, report: GradcheckReport):
        super().__init__(str(report))
        self.report = report


class GradcheckInconclusive(GradcheckError):
    """Raised by ``check_vjp(..., raise_on_failure=True)`` when the verdict is INCONCLUSIVE:
    nothing was found wrong, but the check could not resolve its tolerance, so it cannot pass.
    A subclass of :class:`GradcheckError`; the message says so before the report."""

    def __init__(self, report: GradcheckReport):
        AssertionError.__init__(
            self, "gradcheck INCONCLUSIVE: the finite differences of f could not resolve the "
                  "tolerance, so the gradient is neither confirmed nor refuted (not a pass; "
                  "see 'what to do' below)\n" + str(report))
        self.report = report


# --------------------------------------------------------------------------- finite differences

def _richardson(quotients: np.ndarray, order: int, noise) -> tuple[np.ndarray, np.ndarray]:
    r"""Extrapolate difference quotients taken at steps :math:`t, t/2, t/4, \dots` to step 0.

    A central difference has an error series in even powers of the step,

    .. math::
        D(t) = \frac{f(x + t v) - f(x - t v)}{2t} = f'(x)\,v + c_2 t^2 + c_4 t^4 + \dots

    so :math:`(4 D(t/2) - D(t)) / 3` cancels the :math:`t^2` term and leaves :math:`O(t^4)`.
    Repeating on the new column gives :math:`O(t^6)`, and so on (Richardson's table):

    .. math::
        T_{i,k} = T_{i,k-1} + \frac{T_{i,k-1} - T_{i-1,k-1}}{2^{p k} - 1},

    with :math:`p = 2` for central and :math:`p = 1` for one-sided differences (whose series has
    every power of :math:`t`). As in Ridders' method, each entry's error is estimated by how far
    it moved from its two parents, and the entry with the smallest estimate wins, so a table
    whose last columns are spoilt by rounding still yields its best level.

    Extrapolation is only valid once the error does shrink like :math:`t^p`: successive
    differences :math:`D(t/2) - D(t)` must shrink by about :math:`2^p` per halving. Where they
    do not, beyond the rounding ``noise`` (a kink inside the step, or several kinks crossed
    along a random direction), the table is not trusted: the error becomes the distance from
    the answer to the farthest quotient. Works elementwise on ``quotients[level, ...]``.
    """
    best, error = quotients[0], np.full(quotients[0].shape, np.inf)
    previous = [quotients[0]]
    for i in range(1, len(quotients)):
        row = [quotients[i]]
        for k in range(1, i + 1):
            row.append(row[k - 1] + (row[k - 1] - previous[k - 1]) / (2.0 ** (order * k) - 1))
            moved = np.maximum(np.abs(row[k] - row[k - 1]), np.abs(row[k] - previous[k - 1]))
            better = moved < error
            best, error = np.where(better, row[k], best), np.where(better, moved, error)
        previous = row
    change = np.abs(np.diff(quotients, axis=0))
    stalled = np.any(change[1:] > np.maximum(change[:-1] * 2.0 ** (1 - order), noise), axis=0)
    spread = np.max(np.abs(quotients - best), axis=0)
    return best, np.where(stalled, np.maximum(error, spread), error)


class _Estimate(NamedTuple):
    value: np.ndarray       # the derivative, from extrapolated central differences
    error: np.ndarray
    left: np.ndarray        # the one-sided slopes, to recognise kinks
    right: np.ndarray
    kink_error: np.ndarray
    kink: np.ndarray
    still: object = False   # f did not change at all at any step (bool, per output element)
    floor: object = 0.0     # the rounding noise a float64-exact f would have: the best possible


def _scale(x: np.ndarray) -> np.ndarray:
    """Per-element step scale: the element's magnitude, but at least the input's mean one."""
    typical = float(np.mean(np.abs(x))) if x.size else 0.0
    return np.maximum(np.abs(x), typical if typical > 0 else 1.0)


def _along(fn, xs, scales, directions, f0, step, weights=None, atol=0.0, levels=_LEVELS,
           samples=None) -> list[_Estimate]:
    r"""Derivative of each output of ``fn`` along ``directions`` (one per input; None: fixed).

    The step is relative: the largest moves no element by more than ``step * scales``. With
    ``weights`` (one cotangent per output) each difference quotient is projected on its
    cotangent before extrapolating, so the table works on the very number that is compared.
    Differences come before projections: outputs that do not move then cancel exactly, instead
    of drowning a small change in the rounding of a large sum.

    ``levels`` steps :math:`t, t/2, \dots` are used (two evaluations of ``fn`` each).
    ``samples``, a list, keeps the evaluations ``(f(x + t v), f(x - t v))`` level by level:
    the levels it already holds (from an earlier call along the same direction at the same
    ``step``) are reused, not evaluated again, and the new ones are appended to it.
    """
    reach = max((float(np.max(np.abs(v) / s)) for s, v in zip(scales, directions)
                 if v is not None and v.size), default=0.0)

    def project(o, a):
        return a if weights is None else np.sum(weights[o] * a)

    if reach == 0.0:  # nothing moves: the derivative is exactly zero
        zeros = [project(o, np.zeros_like(y)) for o, y in enumerate(f0)]
        return [_Estimate(z, z, z, z, z, np.zeros_like(z, bool)) for z in zeros]
    steps = (step / reach) * 0.5 ** np.arange(levels)
    samples = [] if samples is None else samples
    central, forward, backward = [], [], []
    moved = [np.zeros(y.shape, bool) for y in f0]
    # An output element that changes at one step but is bit-identical at another has a
    # quantum (f rounds to a coarser grid inside, e.g. float16): its largest change.
    stuck = [np.zeros(y.shape, bool) for y in f0]
    jump = [np.zeros(y.shape) for y in f0]
    for level, t in enumerate(steps):
        if level == len(samples):
            samples.append((fn([x if v is None else x + t * v for x, v in zip(xs, directions)]),
                            fn([x if v is None else x - t * v for x, v in zip(xs, directions)])))
        up, down = samples[level]
        for changed, p, b, m in zip(moved, up, f0, down):
            changed |= (p != b) | (m != b)
        for s_, j_, p, b, m in zip(stuck, jump, up, f0, down):
            s_ |= (p == b) & (m == b)
            np.maximum(j_, np.maximum(np.abs(p - b), np.abs(m - b)), out=j_)
        central.append([(p - m) / (2 * t) for p, m in zip(up, down)])
        forward.append([(p - b) / t for p, b in zip(up, f0)])
        backward.append([(b - m) / t for b, m in zip(f0, down)])
    estimates = []
    for o, y in enumerate(f0):
        # Rounding in f blurs every quotient by about ulp(f) / t, whatever the table says.
        noise = _NOISE * fn.eps * np.abs(y) * moved[o] / steps[-1]
        floor = _NOISE * _EPS * np.abs(y) * moved[o] / steps[-1]
        floor = floor if weights is None else np.sum(np.abs(weights[o]) * floor)
        quantized = moved[o] & stuck[o]
        if quantized.any():  # the differences are multiples of the quantum: noise of its size
            noise = np.maximum(noise, np.where(quantized, jump[o], 0.0) / steps[-1])
        noise = noise if weights is None else np.sum(np.abs(weights[o]) * noise)
        value, error = _richardson(np.array([project(o, q[o]) for q in central]), 2, noise)
        right, e_right = _richardson(np.array([project(o, q[o]) for q in forward]), 1, 2 * noise)
        left, e_left = _richardson(np.array([project(o, q[o]) for q in backward]), 1, 2 * noise)
        kink_error = e_left + e_right + 4 * noise
        # A kink: the two one-sided slopes are each well determined, and they disagree.
        jump = np.abs(right - left)
        kink = (jump > _KINK_FACTOR * kink_error + atol) & \
               (jump > _KINK_RTOL * np.maximum(np.abs(left), np.abs(right)))
        still = ~moved[o] if weights is None else not moved[o].any()
        estimates.append(_Estimate(value, error + noise, left, right, kink_error, kink, still,
                                   floor))
    return estimates


def _one_hot(x: np.ndarray, index: tuple) -> np.ndarray:
    v = np.zeros_like(x)
    v[index] = 1.0
    return v


# --------------------------------------------------------------------------- arguments

def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _prepare_inputs(inputs, diff_argnums=None):
    """float64 copies of the inputs, the indices to differentiate, and notes for the report."""
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, (tuple, list)):
        hint = " (wrap a single array as (x,))" if isinstance(inputs, np.ndarray) else ""
        raise TypeError("inputs must be a tuple or list of arrays, one per argument of f; got "
                        f"{type(inputs).__name__}{hint}")
    xs, floating, notes = [], [], []
    for k, x in enumerate(inputs):
        a = np.asarray(x)
        if a.dtype.kind == "f":
            if a.dtype != np.float64:
                notes.append(f"inputs[{k}] is {a.dtype}: checked in a float64 copy")
            xs.append(a.astype(np.float64))  # a copy, even for float64
            floating.append(k)
        elif a.dtype.kind in "iub":
            xs.append(a.copy())
        else:
            raise TypeError(f"inputs[{k}] has dtype {a.dtype}; expected a real floating-point "
                            "array (or an integer/boolean one, which is not differentiated)")
    diff = floating if diff_argnums is None else sorted({int(k) for k in diff_argnums})
    for k in diff:
        if not 0 <= k < len(xs):
            raise ValueError(f"diff_argnums contains {k}, but there are {len(xs)} inputs")
        if k not in floating:
            raise TypeError(f"inputs[{k}] has dtype {xs[k].dtype} and cannot be differentiated; "
                            "expected a floating-point array (or leave it out of diff_argnums)")
        if not np.all(np.isfinite(xs[k])):
            raise ValueError(f"inputs[{k}] contains NaN or inf; expected finite values")
    return xs, diff, notes


class _Function:
    """Calls ``f`` on fresh copies, checks what it returns, and counts the calls."""

    def __init__(self, f):
        if not callable(f):
            raise TypeError(f"f must be callable; got {_describe(f)}")
        self.f, self.n_evals, self.shapes, self.eps = f, 0, None, _EPS

    def __call__(self, xs) -> list[np.ndarray]:
        self.n_evals += 1
        result = self.f(*[x.copy() for x in xs])
        items = list(result) if isinstance(result, (tuple, list)) else [result]
        arrays = [np.asarray(y) for y in items if isinstance(y, (np.ndarray, np.number, float))
                  or type(y) is int]
        if not items or len(arrays) < len(items) or any(a.dtype.kind not in "fiu" for a in arrays):
            raise TypeError("f must return a real NumPy array or a tuple/list of them; it "
                            f"returned {_describe(result)}")
        for a in arrays:  # f computing in float32 is noisier than float64 rounding
            if a.dtype.kind == "f":
                self.eps = max(self.eps, float(np.finfo(a.dtype).eps))
        if self.shapes is None:
            self.shapes = [a.shape for a in arrays]
        elif [a.shape for a in arrays] != self.shapes:
            raise ValueError(f"f returned outputs of shapes {[a.shape for a in arrays]} at a "
                             f"perturbed input but {self.shapes} at the original input")
        return [a.astype(np.float64) for a in arrays]


def _gradients(vjp, cotangents, xs, diff) -> dict[int, np.ndarray]:
    """Call ``vjp`` and check that it returned one gradient of the right shape per input."""
    result = vjp(tuple(cotangents), *[x.copy() for x in xs])
    if not isinstance(result, (tuple, list)):
        raise TypeError(f"vjp must return a tuple with one gradient per input ({len(xs)} "
                        f"inputs); it returned {_describe(result)}")
    if len(result) != len(xs):
        raise ValueError(f"vjp returned {len(result)} gradient(s) but f has {len(xs)} input(s); "
                         "expected one per input (None for an input that is not differentiated)")
    grads = {}
    for k in diff:
        g = np.zeros_like(xs[k]) if result[k] is None else np.asarray(result[k])
        if g.dtype.kind not in "fiu":
            raise TypeError(f"vjp returned a gradient of dtype {g.dtype} for input {k}; "
                            "expected a real array")
        if g.shape != xs[k].shape:
            raise ValueError(f"vjp returned a gradient of shape {g.shape} for input {k}, which "
                             f"has shape {xs[k].shape}; expected the same shape (a broadcast "
                             "input's gradient is summed over its broadcast axes)")
        grads[k] = g.astype(np.float64)
    return grads


# --------------------------------------------------------------------------- comparisons

class _Comparison(NamedTuple):
    input: int | None
    output: int
    index: tuple | None
    analytic: float
    numerical: float   # at a kink: the admissible slope nearest to the analytic value
    tolerance: float
    kink: bool
    left: float
    right: float
    error: float = 0.0  # the finite-difference error estimate e (tolerance = atol + rtol|n| + 4e)
    scale: float = 0.0  # the scale of the terms of a projection, sum_j |(J^T u)_j v_j|
    step: float = 0.0   # the relative step that gave `numerical`
    direction: object = None  # (moved, cotangents, analytic, input, index): to estimate again
    still: bool = False       # f did not change at all at the step (below its resolution?)
    floor: float = 0.0        # the float64 rounding noise of the estimate: its best possible e

    @property
    def bad(self) -> bool:  # written so that NaN fails
        return not abs(self.analytic - self.numerical) <= self.tolerance

    def blind(self, atol: float) -> bool:
        """``f`` did not change at all at the step, yet the analytic value exceeds ``atol``."""
        return self.still and not abs(self.analytic) <= atol

    @property
    def troubled(self) -> bool:
        return self.bad or self.kink

    def rel_error(self, atol: float) -> float:
        gap = abs(self.analytic - self.numerical)
        return gap / max(abs(self.analytic), abs(self.numerical), atol) if gap else 0.0

    def resolved(self, resolution: float, atol: float, scale: float = 0.0) -> bool:
        r"""Whether the finite-difference error could have shown a relative error of
        ``resolution``: :math:`4 e \le atol + resolution \cdot S`, with :math:`S` the largest
        of :math:`|a|`, :math:`|n|`, the projection's terms and ``scale`` (the largest analytic
        value of the comparison's group: an element near zero is judged at the scale of the
        gradient, as the normwise error is). Also resolved: an error within a few times the
        rounding noise that an exact float64 ``f`` gives at that step (the best finite
        differences can do: a gradient that is zero, or tiny next to the outputs, is then
        judged by ``atol`` and that error, as before), provided that error is below the
        gradient's scale :math:`S` or the analytic gradient is zero to ``atol`` over its group
        (else a gradient of any size hidden in the noise would pass: the tiny-scale batch norm
        of issue 16, whose outputs moved by rounding only). A failure is resolved (it is outside
        even its error); a kink of a random projection is not (no slope was compared); nor is
        an analytic value beyond ``atol`` where ``f`` did not change at all (nothing was
        measured: its change at the step is below the rounding of its outputs)."""
        if self.bad:
            return True
        if self.kink:
            return self.index is not None
        if self.blind(atol):
            return False
        s = max(abs(self.analytic), abs(self.numerical), self.scale, scale)
        # as precise as float64 finite differences get, and either able to tell the gradient
        # from zero or the analytic gradient is zero (to atol) over its whole group
        if self.error <= _FLOOR * self.floor and (
                _SAFETY * self.error <= atol + s
                or max(abs(self.analytic), self.scale, scale) <= atol):
            return True
        return _SAFETY * self.error <= atol + resolution * s


def _compare(est: _Estimate, analytic, input, output, index, rtol, atol, scale=0.0,
             step=0.0) -> _Comparison:
    r"""Compare one analytic number :math:`a` with its finite-difference estimate :math:`n`.

    A smooth point passes when :math:`|a - n| \le atol + rtol\,|n| + 4 e`, with :math:`e` the
    extrapolation's error estimate. At a kink any subgradient is right, so :math:`a` is compared
    with the nearest point between the left and right slopes. That holds for one element; a
    random projection may cross several kinks at once, so there a kink is never a failure (and
    never a pass: it is unresolved).
    """
    a, left, right = float(analytic), float(est.left), float(est.right)
    n, error = float(est.value), float(est.error)
    if est.kink:
        n = a if index is None else min(max(a, min(left, right)), max(left, right))
        error = float(est.kink_error)
    tolerance = atol + rtol * abs(n) + _SAFETY * error
    still = bool(np.all(est.still))
    if still and not abs(a) <= atol and math.isfinite(a):
        tolerance = math.inf  # f did not move: neither a failure nor a pass (unresolved)
    return _Comparison(input, output, index, a, n, tolerance, bool(est.kink), left, right, error,
                       float(scale), float(step), None, still, float(est.floor))


def _group_scales(comparisons) -> dict:
    """The largest analytic value of each group (input, output, projection or element)."""
    scales: dict = {}
    for c in comparisons:
        key = (c.input, c.output, c.index is None)
        if math.isfinite(c.analytic):
            scales[key] = max(scales.get(key, 0.0), abs(c.analytic))
    return scales


def _unresolved(comparisons, resolution, atol) -> list[bool]:
    scales = _group_scales(comparisons)
    return [not c.resolved(resolution, atol, scales.get((c.input, c.output, c.index is None),
                                                        0.0)) for c in comparisons]


def _factor(a: np.ndarray, n: np.ndarray, tolerance: np.ndarray) -> str:
    """'sign flipped' or 'off by a constant factor c' when a = c * n explains every error."""
    if not n.any():
        return ""
    c = float(a @ n / (n @ n))  # least squares
    if abs(c - 1) < 1e-12 or not np.all(np.abs(a - c * n) <= tolerance * max(1.0, abs(c))):
        return ""
    if c == 0:
        return "the analytic gradient is zero (a missing term, or an unconnected input?)"
    return "sign flipped" if abs(c + 1) < 1e-6 else f"off by a constant factor {float(f'{c:.6g}')}"


def _diagnose(comparisons: list[_Comparison], worst: _Comparison) -> str:
    """A short guess at the kind of mistake, from the errors of the worst (input, output) pair.

    Tried in order: one constant factor c with analytic = c * numerical everywhere (c = -1:
    sign flipped); a single wrong element; all wrong elements in one row (same index on axis
    0); all in one channel (same index on axis 1); else scattered. Kinks are left out. From
    projections alone (a large input), only a constant factor can be recognised.
    """
    group = [c for c in comparisons if not c.kink and (c.input, c.output) == (worst.input,
             worst.output) and (c.index is None) == (worst.index is None)]
    a, n, tolerance = (np.array([getattr(c, name) for c in group])
                       for name in ("analytic", "numerical", "tolerance"))
    factor = _factor(a, n, tolerance)
    if worst.index is None:
        return factor if len(group) > 1 and factor else \
            "wrong along random directions (input too large to check element by element)"
    wrong = [c.index for c in group if c.bad]
    if factor and (len(wrong) > 1 or len(group) == 1):
        return factor
    if len(wrong) == 1:
        return f"one element wrong: {wrong[0]}"
    for axis, (whole, part) in enumerate([("whole row off", "errors confined to one row"),
                                          ("one channel off", "errors confined to one channel")]):
        at = {j[axis] if len(j) > 1 else None for j in wrong}
        if len(at) == 1 and None not in at:
            full = all(c.bad for c in group if c.index[axis] in at)
            return f"{whole if full else part}: index {at.pop()} of axis {axis}"
    return f"scattered: {len(wrong)} of {len(group)} elements wrong"


# --------------------------------------------------------------------------- the checker

class _Checker:
    """What one call of :func:`check_vjp` shares between its projections and fallbacks."""

    def __init__(self, f, vjp, xs, diff, step, rtol, atol):
        self.fn, self.vjp, self.xs, self.diff = _Function(f), vjp, xs, diff
        self.step, self.rtol, self.atol = step, rtol, atol
        self.resolution = max(rtol, _RESOLVE)
        self.scales = [_scale(x) if x.dtype.kind == "f" else None for x in xs]
        self.movable = [k for k in diff if xs[k].size]
        self.f0 = self.fn(xs)
        self.n_vjp_calls, self.notes = 0, []
        self.searched = self.rescued = 0  # comparisons given a step search; resolved by it
        self.jitter = 0.0  # how far two calls of f at the same point differ (0: deterministic)
        self.steps_tried = {step}
        self.refined = 0  # elements whose two-step estimate needed the full Richardson table
        self.first_failure = None  # evaluations of f spent when the first failure was found
        self.stopped = False  # fast mode stopped at the first failure (diagnose=False)

    def found(self, comparisons) -> list[_Comparison]:
        """Note how many evaluations it took to find the first failure."""
        if self.first_failure is None and any(c.bad for c in comparisons):
            self.first_failure = self.fn.n_evals
        return comparisons

    def draw(self, rng):
        """Random cotangents, and the analytic J_o^T u_o of each output o (one vjp call each)."""
        cotangents = [rng.standard_normal(y.shape) for y in self.f0]
        grads = []
        for o, u in enumerate(cotangents):
            # One output at a time, so that a wrong gradient is traced to its output.
            alone = [u if i == o else np.zeros_like(y) for i, y in enumerate(self.f0)]
            grads.append(_gradients(self.vjp, alone, self.xs, self.diff))
            self.n_vjp_calls += 1
        return cotangents, grads

    def search_steps(self) -> list[float]:
        """The steps of a step search, in the order tried (``_STEP_SEARCH``, capped)."""
        steps = []
        for factor in _STEP_SEARCH:
            step = min(self.step * factor, max(_MAX_STEP, self.step))
            if step != self.step and step not in steps:
                steps.append(step)
        return steps

    def _estimate(self, moved, cotangents, analytic, input, index, scales, step,
                  levels=_LEVELS, samples=None):
        estimates = _along(self.fn, self.xs, self.scales, moved, self.f0, step, cotangents,
                           self.atol, levels, samples)
        return [_compare(est, a, input, o, index, self.rtol, self.atol, s, step)
                for o, (est, a, s) in enumerate(zip(estimates, analytic, scales))]

    def search(self, comparisons, group_scale=None) -> list[_Comparison]:
        """Give every unresolved comparison a step search: the same derivative at wider steps
        (less rounding noise per unit of step) and at a narrower one (less truncation), keeping
        the estimate with the smallest error. Costs nothing when all are resolved."""
        scales = _group_scales(comparisons) if group_scale is None else group_scale
        out = list(comparisons)

        def open_(c):  # unresolved, or failed only because f did not move at this step
            return (c.still and c.analytic != 0) or not c.resolved(
                self.resolution, self.atol, scales.get((c.input, c.output, c.index is None), 0.0))

        # comparisons that share a direction (one per output) are searched together
        by_direction: dict = {}
        for n, c in enumerate(out):
            if open_(c) and c.direction is not None and not c.kink:  # a kink stays one
                by_direction.setdefault(id(c.direction), []).append(n)
        for members in by_direction.values():
            first = out[members[0]]
            self.searched += len(members)
            for step in self.search_steps():
                self.steps_tried.add(step)
                moved, cotangents, analytic, input, index = first.direction
                new = self._estimate(moved, cotangents, analytic, input, index,
                                     [out[members[0]].scale] * len(analytic), step)
                for n in members:
                    c, d = out[n], new[out[n].output]
                    if (d.still, d.error) < (c.still, c.error):  # moved, then more precise
                        out[n] = d._replace(direction=c.direction)
                members = [n for n in members if open_(out[n])]
                if not members:
                    break
            self.rescued += sum(1 for n in by_direction[id(first.direction)]
                                if not open_(out[n]))
        return out

    def projection(self, cotangents, grads, directions: dict, input=None) -> list[_Comparison]:
        r"""Compare :math:`u^T (J v)`, by finite differences (steps :math:`t, t/2, t/4`: 6
        evaluations of ``f``), with :math:`(J^T u)^T v`; then a step search if unresolved."""
        moved = [directions.get(k) for k in range(len(self.xs))]
        analytic = [sum(float(np.sum(g[k] * v)) for k, v in directions.items()) for g in grads]
        terms = [sum(float(np.sum(np.abs(g[k] * v))) for k, v in directions.items())
                 for g in grads]
        found = self._estimate(moved, cotangents, analytic, input, None, terms, self.step,
                               _FAST_LEVELS)
        where = (moved, cotangents, analytic, input, None)
        return self.found(self.search([c._replace(direction=where) for c in found], {}))

    def settled(self, c: _Comparison, scale: float) -> bool:
        """Whether a first, two-step estimate already decides a comparison: it is smooth, f
        moved, and the analytic value agrees with it within ``atol + rtol |n|`` alone (no
        allowance for the finite-difference error) at a resolved error estimate."""
        return not c.troubled and not (c.still and c.analytic != 0) and \
            abs(c.analytic - c.numerical) <= self.atol + self.rtol * abs(c.numerical) and \
            c.resolved(self.resolution, self.atol, scale)

    def elements(self, k, cotangents, grads) -> list[_Comparison]:
        r"""Compare :math:`(J^T u)_j` with its finite difference, one element :math:`j` of input
        :math:`k` at a time.

        First at two steps :math:`t, t/2` (4 evaluations of ``f``): the extrapolation
        :math:`(4 D(t/2) - D(t)) / 3` has an error :math:`O(t^4)`, while its estimate,
        :math:`|D(t/2) - D(t)|`, is the size of the :math:`O(t^2)` term that it removed: an
        overestimate by a factor of about :math:`1 / t^2` wherever :math:`f` is smooth at the
        scale of the step. An element whose analytic value agrees within ``atol + rtol |n|``
        (no allowance for that error), at a resolved estimate, and with no kink, is settled:
        a right gradient passes there with the same tolerance as after a full table, and a
        wrong one cannot hide (it would have to equal an estimate that is far more precise
        than the tolerance). Every other element (a failure, a kink, an agreement that needs
        the error allowance, an unresolved estimate) gets Richardson/Ridders refinement: the
        steps :math:`t/4, t/8` are added (4 more evaluations) and the full table decides, as
        before. Then a step search for those that still could not resolve the tolerance.
        """
        comparisons = []
        scales = [float(np.max(np.abs(g[k]), initial=0.0, where=np.isfinite(g[k])))
                  for g in grads]
        for j in np.ndindex(self.xs[k].shape):
            moved = [_one_hot(self.xs[k], j) if i == k else None for i in range(len(self.xs))]
            analytic = [g[k][j] for g in grads]
            samples: list = []
            found = self._estimate(moved, cotangents, analytic, k, j, [0.0] * len(grads),
                                   self.step, _FIRST_LEVELS, samples)
            if not all(self.settled(c, s) for c, s in zip(found, scales)):
                self.refined += 1
                found = self._estimate(moved, cotangents, analytic, k, j, [0.0] * len(grads),
                                       self.step, _LEVELS, samples)
            where = (moved, cotangents, analytic, k, j)
            comparisons += self.found([c._replace(direction=where) for c in found])
        return self.search(comparisons)

    def slow(self, rng) -> list[_Comparison]:
        cotangents, grads = self.draw(rng)
        return [c for k in self.movable for c in self.elements(k, cotangents, grads)]

    def invisible(self, grads, directions, joint) -> list[int]:
        r"""The inputs that a projection over all inputs cannot judge: for some output, the
        terms of input :math:`k`, :math:`\sum_j |(J^T u)_{kj} v_{kj}|`, are within ten times
        the comparison's tolerance, so that its gradient could be wrong by a sign, or be
        missing, without the comparison noticing (the gradient of one input is :math:`10^{300}`
        times another's on tiny-scale inputs; or an input's gradient is zero). Each gets a
        projection of its own. None when there is one input."""
        if len(self.movable) < 2:
            return []
        out = []
        for k in self.movable:
            for g, c in zip(grads, joint):
                share = float(np.sum(np.abs(g[k] * directions[k])))
                if math.isfinite(c.tolerance) and not share > 10 * c.tolerance:
                    out.append(k)
                    break
        return out

    def fast(self, rng, n_projections, max_fallback_size, diagnose=True) -> list[_Comparison]:
        comparisons, checked = [], set()  # checked: inputs already checked element by element
        drawn = 0
        # After a failure that only projections can show (an input too large to check element
        # by element), up to _DIAGNOSIS projections in all, so that a constant factor can be
        # recognised: evaluations spent only once the gradient is known to be wrong.
        while drawn < n_projections or (diagnose and drawn < _DIAGNOSIS and any(
                c.bad and c.index is None for c in comparisons)):
            drawn += 1
            cotangents, grads = self.draw(rng)
            directions = {k: rng.standard_normal(self.xs[k].shape) for k in self.movable}
            joint = self.projection(cotangents, grads, directions)
            unresolved = any(_unresolved(joint, self.resolution, self.atol))
            agrees = not any(c.troubled for c in joint) and not unresolved
            blind = self.invisible(grads, directions, joint) if agrees else []
            if agrees and not blind:
                comparisons += joint
                continue
            if not diagnose and any(c.bad for c in joint):  # the verdict is known: FAILED
                comparisons += joint
                self.stopped = True
                break
            if agrees:  # right for the inputs it can see: the others get their own projection
                comparisons += joint
                self.notes.append(f"input{'s' if len(blind) > 1 else ''} "
                                  f"{', '.join(map(str, blind))} weighed too little in the "
                                  f"projection over all inputs to be judged there, so "
                                  f"{'each was' if len(blind) > 1 else 'it was'} projected "
                                  f"on its own")
            # Find the culprit: one input at a time, then element by element if small enough.
            explained = bool(checked) or agrees
            for k in (blind if agrees else sorted(set(self.movable) - checked)):
                local = [c._replace(input=k) for c in joint] if len(self.movable) == 1 else \
                    self.projection(cotangents, grads, {k: directions[k]}, input=k)
                open_ = any(_unresolved(local, self.resolution, self.atol))
                troubled = any(c.troubled for c in local) or open_
                explained |= troubled
                if troubled and self.xs[k].size <= max_fallback_size:
                    comparisons += self.elements(k, cotangents, grads)
                    checked.add(k)
                    why = "failed" if any(c.bad for c in local) else \
                        "met a kink" if any(c.kink for c in local) else \
                        "could not resolve the tolerance"
                    self.notes.append(f"the fast check of input {k} {why}, so its "
                                      f"{self.xs[k].size} elements were checked one by one")
                    continue
                comparisons += local
                if any(c.kink for c in local):
                    self.notes.append(f"a random direction met a kink of input {k}, too large "
                                      "to check element by element: inconclusive there")
            if not explained:  # no single input disagrees, but all of them together do
                comparisons += [c for c in joint if c.bad or not c.resolved(
                    self.resolution, self.atol)]
                self.notes.append("a projection over all inputs failed or could not resolve "
                                  "the tolerance, but no single input did")
        return comparisons


def check_vjp(f: Callable, vjp: Callable, inputs: Sequence[np.ndarray], *, mode: str = "fast",
              rng=None, rtol: float = 1e-7, atol: float = 1e-9, n_projections: int = 1,
              raise_on_failure: bool = False, diff_argnums: Sequence[int] | None = None,
              step: float = 1e-4, max_fallback_size: int = 2000,
              diagnose: bool = True) -> GradcheckReport:
    r"""Check an analytic vector-Jacobian product against finite differences.

    Parameters
    ----------
    f : callable
        ``f(*inputs)`` returns an ndarray or a tuple/list of ndarrays.
    vjp : callable
        ``vjp(cotangents, *inputs)`` returns one gradient per input (see the module docstring).
    inputs : sequence of ndarray
        The point to check at. Floating-point inputs are differentiated (in float64 copies);
        integer and boolean inputs are passed through.
    mode : {"fast", "slow"}
        ``"slow"``: each element of each differentiable input is moved on its own, which gives
        the full Jacobian by central differences; each column, projected on a random cotangent
        :math:`u`, is compared with the element of ``vjp``'s :math:`J^T u`. Each element costs
        4 evaluations of ``f`` (steps :math:`t, t/2`); only the elements that this does not
        decide (a failure, a kink, an agreement that needs the error allowance, an unresolved
        estimate) get 4 more for the full Richardson table (``report.n_refined`` counts them;
        see ``_Checker.elements``). ``"fast"``: ``n_projections`` random projections. For a
        random cotangent :math:`u` and a random direction :math:`v`,

        .. math::
            u^T (J v) = (J^T u)^T v,

        the left side is one directional derivative of ``f`` (central differences at steps
        :math:`t, t/2, t/4` extrapolated by Richardson/Ridders: 6 evaluations of ``f`` whatever
        the size of the inputs, 7 in all with :math:`f(x)`), the right side one ``vjp`` call
        dotted with :math:`v`. When a projection fails or meets a kink, the direction is
        restricted to one input at a time to find the culprit, and an input of at most
        ``max_fallback_size`` elements is then checked element by element to name the worst
        element; the report says so, and ``report.n_evals_to_failure`` says how many
        evaluations had found the failure before that localisation began. A failure that only
        projections can show gets up to 3 projections in all, to recognise a constant factor.

        *Why one projection at 7 evaluations is enough.* False negatives: a wrong ``vjp``
        gives :math:`J'^T u` with :math:`J' \ne J`; it passes only if
        :math:`|u^T (J' - J) v|` is within the tolerance :math:`\tau = atol + rtol|n| + 4e`.
        For Gaussian :math:`u, v` this is a random variable of spread
        :math:`\|J' - J\|_F`, so a pass has a probability of about
        :math:`\tau / \|J' - J\|_F`: about ``rtol`` divided by the mistake's relative size,
        since :math:`e` (near :math:`10^{-10}` relative in float64) is below ``rtol``. A
        mistake of relative size :math:`10^{-4}` passes one projection with a probability of
        order :math:`10^{-3}`, the classic ones (a missing term, a wrong axis, a mean for a
        sum: :math:`10^{-2}` to 1) of order :math:`10^{-5}` to :math:`10^{-7}`; a constant
        factor :math:`c` is seen whenever :math:`|c - 1| >` ``rtol`` (the error is then
        proportional to :math:`n` itself). Each further projection (``n_projections``)
        multiplies that probability again: ask for more to catch smaller mistakes.
        That probability argument holds for an input whose terms weigh in the projection:
        where the terms of one input, :math:`\sum_j |(J^T u)_{kj} v_{kj}|`, are within ten
        times the tolerance (its gradient is :math:`10^{-12}` of another input's, as with a
        tiny-scale input, or it is zero), even a sign error of that input would pass, so that
        input gets a projection of its own (6 more evaluations, said in the report's notes).
        Every wrong backward of the oracle's mistake catalogue, and every mutant of the core
        variants' backward code that changes a gradient by more than finite differences
        resolve, is rejected this way (``tests/test_gradcheck.py``).
        False positives: a right ``vjp`` fails only if the finite-difference error exceeds
        :math:`4 e` (plus ``atol + rtol |n|``), with :math:`e` Ridders' estimate, how far the
        chosen Richardson entry moved from its parents: in the asymptotic regime that is the
        size of the :math:`O(t^2)` or :math:`O(t^4)` term that was removed, an overestimate of
        the remaining error. Three steps also allow the ratio test of ``_richardson``
        (successive differences must shrink by about 4 per halving): where they do not (a
        kink crossed, noise), the error becomes the spread of the quotients, and the one-sided
        slopes flag kinks; either makes the comparison unresolved (a step search, then the
        per-input and element fallbacks), never a failure by itself.
    rng : numpy.random.Generator or int, optional
        Source of the random cotangents and directions; default ``np.random.default_rng(0)``.
    rtol, atol : float
        A number passes when :math:`|a - n| \le atol + rtol\,|n| + 4 e`, with :math:`e` the
        error estimate of the Richardson extrapolation (see :func:`directional_derivative`).
        In float64 :math:`e` is typically :math:`10^{-10}` relative or less, so a gradient off
        by :math:`10^{-4}` relative fails while finite-difference noise does not. Gradients
        below ``atol / rtol`` in magnitude are judged by ``atol``.
    n_projections : int
        Number of random projections (random directions and cotangents) in fast mode, 6
        evaluations of ``f`` each; default 1 (7 evaluations in all).
    raise_on_failure : bool
        Raise :class:`GradcheckError` (message: the report) instead of returning a failed report,
        and :class:`GradcheckInconclusive` (a subclass, with its own message) instead of an
        inconclusive one.
    diff_argnums : sequence of int, optional
        The inputs to differentiate; default: every floating-point input.
    step : float
        Largest relative step: an element moves by at most ``step * max(|x_j|, mean|x|)``.
    max_fallback_size : int
        Largest input that fast mode checks element by element after a failure.
    diagnose : bool
        Fast mode: after a projection fails, look for the input and the elements at fault and
        for a constant factor (default). ``False`` stops at the first failed projection: the
        same verdict at 8 evaluations (7 and the check that ``f`` is deterministic), without
        that localisation, for loops that only need the verdict.

    Returns
    -------
    GradcheckReport
        True when passed; ``print`` it for the worst element, its analytic and numerical values,
        the relative error, the error pattern and the non-differentiable points. Its
        ``verdict`` is ``"passed"``, ``"FAILED"`` or ``"INCONCLUSIVE"``: a comparison whose
        finite-difference error could hide a relative error of ``max(rtol, 1e-4)`` (at the
        gradient's scale) is *unresolved*. Before giving up on one, the checker estimates it
        again at 16 and 256 times the step and at 1/64 of it, and in fast mode checks the
        inputs of an unresolved projection element by element (up to ``max_fallback_size``);
        only what is still unresolved makes the verdict INCONCLUSIVE (never a pass), with the
        reason and what to do in the notes. Before a FAILED verdict ``f`` is called once more
        at the point: a non-deterministic ``f`` gives INCONCLUSIVE. A function that is exact in
        float64 costs nothing more than before.
    """
    if mode not in ("fast", "slow"):
        raise ValueError(f"mode must be 'fast' or 'slow'; got {mode!r}")
    if int(n_projections) < 1:
        raise ValueError(f"n_projections must be at least 1; got {n_projections}")
    if not callable(vjp):
        raise TypeError(f"vjp must be callable; got {_describe(vjp)}")
    xs, diff, notes = _prepare_inputs(inputs, diff_argnums)
    rng = np.random.default_rng(0 if rng is None else rng)
    checker = _Checker(f, vjp, xs, diff, step, rtol, atol)
    notes += [f"input {k} is empty: nothing to check" for k in diff if not xs[k].size]
    if not checker.movable:
        comparisons = []
    elif mode == "slow":
        comparisons = checker.slow(rng)
    else:
        comparisons = checker.fast(rng, n_projections, max_fallback_size, diagnose)
    if any(c.bad for c in comparisons):  # before a FAILED verdict: is f a function at all?
        again = checker.fn(xs)
        checker.jitter = max((float(np.max(np.abs(a - b), initial=0.0))
                              for a, b in zip(again, checker.f0)), default=0.0)
    report = _report(comparisons, mode, checker, notes + checker.notes, rtol, atol)
    if raise_on_failure and report.inconclusive:
        raise GradcheckInconclusive(report)
    if raise_on_failure and not report:
        raise GradcheckError(report)
    return report


def _normwise(comparisons) -> float:
    smooth = [c for c in comparisons if not c.kink]
    if not smooth:
        return 0.0
    gap = max(abs(c.analytic - c.numerical) for c in smooth)
    scale = max(abs(c.numerical) for c in smooth)
    return gap / scale if scale > 0 else gap


def _where(c) -> str:
    if c.index is None:
        return "a random projection" + ("" if c.input is None else f" of input {c.input}")
    return f"input {c.input} element {c.index}"


def _advice(open_, comparisons, mode, checker) -> list[str]:
    """Why the check could not decide, and what to do: the INCONCLUSIVE verdict's notes."""
    scales = _group_scales(comparisons)
    best = min(_SAFETY * c.error / max(abs(c.analytic), abs(c.numerical), c.scale,
                                       scales.get((c.input, c.output, c.index is None), 0.0),
                                       1e-300) for c in open_)
    steps = sorted(checker.steps_tried)
    tried = f"steps {steps[0]:g} to {steps[-1]:g}" if len(steps) > 1 else f"step {steps[0]:g}"
    noisy = checker.fn.eps > _EPS
    notes = [f"INCONCLUSIVE: {len(open_)} of {len(comparisons)} comparisons could not resolve "
             f"a relative error of {checker.resolution:g}, even after a step search ({tried})"
             + (" and element by element" if any(c.index is not None for c in open_)
                and mode == "fast" else "")
             + f": their finite-difference error is at best {best:.1e} of the gradient's scale, "
             "so an analytic gradient this far off would pass too",
             "why: f is " + ("low-precision (its outputs are not float64)" if noisy else
                             "noisy at the scale of the step (it computes in float16/float32 "
                             "inside, or adds noise)") + ", or not smooth there"]
    named = [c for c in open_ if c.index is not None][:5]
    todo = "what to do: compute f in float64 (accumulate in float64 too); or try another step " \
           f"(step= larger than {steps[-1]:g} if f is noisy, smaller than {steps[0]:g} if it " \
           "curves sharply)"
    if named:
        todo += "; or check the named elements in slow mode with that step: " + \
            ", ".join(_where(c) for c in named) + (", ..." if len(open_) > len(named) else "")
    elif any(c.index is None for c in open_):
        todo += "; or use mode='slow' (or a larger max_fallback_size) to check element by " \
                "element and name the elements"
    return notes + [todo]


def _report(comparisons, mode, checker, notes, rtol, atol) -> GradcheckReport:
    failed = any(c.bad for c in comparisons)
    flags = _unresolved(comparisons, checker.resolution, atol)
    if failed and checker.jitter > 0:  # f is not deterministic: no finite difference is sure
        notes.append(f"f is not deterministic: two calls at the same point differ by up to "
                     f"{checker.jitter:.3g}, so no disagreement with its finite differences "
                     "proves the gradient wrong")
        flags = [f or c.bad for f, c in zip(flags, comparisons)]
        failed = False
    open_ = [c for c, f in zip(comparisons, flags) if f]
    verdict = "FAILED" if failed else "INCONCLUSIVE" if open_ else "passed"

    def governed_by_rtol(c):  # near zero atol judges, and a relative error says little
        return max(abs(c.analytic), abs(c.numerical)) * rtol >= atol

    def badness(c):  # failures first, by how far outside their tolerance; then relative error
        excess = np.nan_to_num(abs(c.analytic - c.numerical) / c.tolerance, nan=np.inf)
        return (c.bad, not c.kink, excess if c.bad else c.rel_error(atol) * governed_by_rtol(c))

    if checker.fn.eps > _EPS:
        notes.append(f"f returns outputs of machine epsilon {checker.fn.eps:.1e} (not float64): "
                     "finite differences are no more precise than f")
    if checker.rescued:
        notes.append(f"{checker.rescued} of {checker.searched} comparisons that could not "
                     f"resolve a relative error of {checker.resolution:g} at step "
                     f"{checker.step:g} were resolved by a step search")
    if open_ and not failed:
        notes += _advice(open_, comparisons, mode, checker)
    elif open_:
        notes.append(f"besides the failure, {len(open_)} comparison(s) could not resolve a "
                     f"relative error of {checker.resolution:g}")
    worst = max(comparisons, key=badness, default=None)
    return GradcheckReport(
        passed=verdict == "passed", mode=mode, n_evals=checker.fn.n_evals,
        n_vjp_calls=checker.n_vjp_calls,
        max_rel_error=max((c.rel_error(atol) for c in comparisons
                           if c.bad or governed_by_rtol(c)), default=0.0),
        normwise_error=_normwise(comparisons),
        worst=None if worst is None else Worst(worst.input, worst.output, worst.index,
                                               worst.analytic, worst.numerical,
                                               worst.rel_error(atol)),
        kinks=[Kink(c.input, c.output, c.index, c.left, c.right, c.analytic)
               for c in comparisons if c.kink],
        pattern=("wrong along a random direction (not localised: diagnose=False)"
                 if checker.stopped else _diagnose(comparisons, worst)) if failed else "",
        notes=notes, rtol=rtol,
        atol=atol, verdict=verdict, n_unresolved=len(open_), n_refined=checker.refined,
        n_evals_to_failure=checker.first_failure if failed else None,
        localised=not checker.stopped)


# --------------------------------------------------------------------------- public helpers

def directional_derivative(f: Callable, inputs: Sequence[np.ndarray], directions, *,
                           step: float = 1e-4):
    r"""The derivative of ``f`` along ``directions``, with an error estimate and a kink flag.

    Central differences :math:`D(t) = (f(x + t v) - f(x - t v)) / 2t` at
    :math:`t, t/2, t/4, t/8` are extrapolated to :math:`t \to 0` with Richardson's table
    (error :math:`O(t^2) \to O(t^4) \to O(t^6) \to O(t^8)`); the error estimate is how far the
    chosen entry moved from the entries it was built from, plus the rounding of ``f`` divided by
    the step. The largest step moves no element by more than ``step`` times its magnitude (at
    least the input's mean magnitude). One-sided differences :math:`(f(x + t v) - f(x)) / t` and
    :math:`(f(x) - f(x - t v)) / t` are extrapolated the same way; when both are well determined
    and disagree, ``x`` is a non-differentiable point (a kink) along ``v``.

    Parameters
    ----------
    f : callable
    inputs : sequence of ndarray
    directions : sequence of ndarray or None
        One per input, of its shape (None: that input does not move).

    Returns
    -------
    value, error_estimate : ndarray, or tuples of ndarrays for several outputs
        :math:`J v` for each output, and its elementwise error estimate.
    kink : bool
        Whether any output element has a kink along ``directions``.
    """
    xs, _, _ = _prepare_inputs(inputs)
    if len(directions) != len(xs):
        raise ValueError(f"directions has {len(directions)} entries; expected one per input "
                         f"({len(xs)})")
    moved = [None if v is None else np.asarray(v, dtype=np.float64) for v in directions]
    for k, v in enumerate(moved):
        if v is not None and v.shape != xs[k].shape:
            raise ValueError(f"directions[{k}] has shape {v.shape}; expected {xs[k].shape}")
    fn = _Function(f)
    estimates = _along(fn, xs, [_scale(x) for x in xs], moved, fn(xs), step)
    values, errors = [e.value for e in estimates], [e.error for e in estimates]
    kink = any(bool(np.any(e.kink)) for e in estimates)
    if len(estimates) == 1:
        return values[0], errors[0], kink
    return tuple(values), tuple(errors), kink


def numerical_jacobian(f: Callable, inputs: Sequence[np.ndarray], *, argnum: int = 0,
                       step: float = 1e-4):
    """The Jacobian of ``f`` with respect to ``inputs[argnum]``, one element at a time.

    Each column is a :func:`directional_derivative` along one element (8 evaluations of ``f``).
    The result has shape ``output.shape + input.shape``, or is a tuple of such arrays for
    several outputs. Slow (``8 * input.size`` evaluations): meant for small inputs.
    """
    xs, _, _ = _prepare_inputs(inputs, diff_argnums=[argnum])
    fn, scales = _Function(f), [_scale(x) for x in xs]
    f0 = fn(xs)
    jacobians = [np.zeros(y.shape + xs[argnum].shape) for y in f0]
    for j in np.ndindex(xs[argnum].shape):
        moved = [_one_hot(xs[argnum], j) if i == argnum else None for i in range(len(xs))]
        for jacobian, est in zip(jacobians, _along(fn, xs, scales, moved, f0, step)):
            jacobian[(Ellipsis,) + j] = est.value
    return jacobians[0] if len(jacobians) == 1 else tuple(jacobians)

r"""Finite-difference gradient checking for any function on NumPy arrays.

This module checks a hand-written (or another library's) vector-Jacobian product against
finite differences. It knows nothing of refnorm's autograd engine: it needs two callables.

* ``f(*inputs)`` returns one ndarray, or a tuple/list of ndarrays (several outputs).
* ``vjp(cotangents, *inputs)`` returns a tuple with one gradient per input, where ``cotangents``
  is a tuple with one array per output (a single output still gets a 1-tuple). The gradient of
  input ``k`` is :math:`\sum_o J_{o,k}^T u_o`, of the shape of ``inputs[k]``; ``None`` is allowed for
  an input that is not differentiated (and read as zeros for one that is).

Checking PyTorch's ``tanh`` takes two lines::

    f = lambda x: torch.tanh(torch.from_numpy(x)).numpy()
    vjp = lambda cts, x: tuple(g.numpy() for g in torch.func.vjp(torch.tanh, torch.from_numpy(x))[1](torch.from_numpy(cts[0])))
    report = check_vjp(f, vjp, (np.random.randn(3, 4),))     # bool(report), print(report)

Floating-point inputs are checked in float64 copies (float16/float32 inputs are upcast and the
report says so); integer and boolean inputs (masks, indices) are passed through and never
differentiated. ``f`` and ``vjp`` always receive fresh copies: the caller's arrays are never
written to. Cotangents and directions are random (standard normal), never all ones: an all-ones
cotangent makes the check of a normalization layer vacuous.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np

__all__ = ["check_vjp", "numerical_jacobian", "directional_derivative", "GradcheckReport",
           "GradcheckError", "Worst", "Kink"]

_EPS = np.finfo(np.float64).eps
_LEVELS = 4          # steps t, t/2, t/4, t/8: 2 * _LEVELS evaluations of f per derivative
_SAFETY = 4.0        # slack, in units of the estimated finite-difference error
_NOISE = 16.0        # f is trusted to about _NOISE ulps of its magnitude
_KINK_FACTOR = 10.0  # one-sided slopes must differ by this many of their error estimates ...
_KINK_RTOL = 1e-6    # ... and by this fraction of their size, to call a point a kink


class Worst(NamedTuple):
    """The comparison furthest outside its tolerance (``index`` is None for a projection)."""
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


class GradcheckError(AssertionError):
    """Raised by ``check_vjp(..., raise_on_failure=True)``; the message is the report."""

    def __init__(self, report: GradcheckReport):
        super().__init__(str(report))
        self.report = report


@dataclass
class GradcheckReport:
    """The outcome of :func:`check_vjp`; true when the check passed, printable."""
    passed: bool
    mode: str
    n_evals: int
    n_vjp_calls: int
    max_rel_error: float
    worst: Worst | None
    kinks: list = field(default_factory=list)
    pattern: str = ""
    notes: list = field(default_factory=list)
    rtol: float = 1e-7
    atol: float = 1e-9

    def __bool__(self) -> bool:
        return bool(self.passed)

    def __str__(self) -> str:
        lines = [f"gradcheck {'passed' if self.passed else 'FAILED'} ({self.mode} mode, "
                 f"{self.n_evals} evaluations of f, {self.n_vjp_calls} calls of vjp)",
                 f"  max relative error: {self.max_rel_error:.3e} (rtol={self.rtol:g}, "
                 f"atol={self.atol:g}, plus {_SAFETY:g}x the finite-difference error estimate)"]
        if self.worst is not None:
            w = self.worst
            where = "a random projection" if w.index is None else f"element {w.index}"
            where += "" if w.input is None else f" of input {w.input}"
            lines.append(f"  worst: {where}, output {w.output}: analytic {w.analytic:.10g}, "
                         f"numerical {w.numerical:.10g}, relative error {w.rel_error:.3e}")
            lines.append("  (values are " + ("u^T J v for a random cotangent u and direction v)"
                         if w.index is None else "(J^T u)[element] for a random cotangent u)"))
        if self.pattern:
            lines.append(f"  pattern: {self.pattern}")
        if self.kinks:
            lines.append(f"  {len(self.kinks)} non-differentiable point(s) (not failures):")
            for k in self.kinks[:10]:
                lines.append(f"    input {k.input}, element {k.index}, output {k.output}: slope "
                             f"left {k.left:.6g}, right {k.right:.6g}, analytic {k.analytic:.6g}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- finite differences

def _richardson(quotients: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Extrapolate difference quotients taken at steps :math:`t, t/2, t/4, \dots` to step 0.

    A central difference has an error series in even powers of the step,

    .. math::
        D(t) = \frac{f(x + t v) - f(x - t v)}{2t} = f'(x)\,v + c_2 t^2 + c_4 t^4 + \dots

    so :math:`(4 D(t/2) - D(t)) / 3` cancels the :math:`t^2` term and leaves :math:`O(t^4)`.
    Repeating on the new column gives :math:`O(t^6)`, and so on (Richardson's table):

    .. math::
        T_{i,k} = T_{i,k-1} + \frac{T_{i,k-1} - T_{i-1,k-1}}{2^{p k} - 1},

    with :math:`p = 2` for central and :math:`p = 1` for one-sided differences (whose series has
    every power of :math:`t`). As in Ridders' method, each entry's error is estimated by how much
    it moved from its two parents, and the entry with the smallest estimate is returned, so a
    table whose last columns are ruined by rounding still yields its best level. Works elementwise
    on ``quotients`` of shape ``(levels, ...)``.
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
    return best, error


class _Estimate(NamedTuple):
    value: np.ndarray      # central difference, extrapolated
    error: np.ndarray
    left: np.ndarray       # one-sided slopes, used only to recognise kinks
    right: np.ndarray
    side_error: np.ndarray
    kink: np.ndarray


def _scale(x: np.ndarray) -> np.ndarray:
    """Per-element step scale: the element's magnitude, but at least the input's mean magnitude."""
    typical = float(np.mean(np.abs(x))) if x.size else 1.0
    return np.maximum(np.abs(x), typical if typical > 0 else 1.0)


def _along(fn, xs, directions, f0, step, weights=None, atol=0.0) -> list[_Estimate]:
    """Derivative of every output of ``fn`` along ``directions`` (one per input, None = fixed).

    The step is relative: no element moves by more than ``step`` times its :func:`_scale`.
    With ``weights`` (one cotangent per output), each output's difference quotient is projected
    to the scalar ``sum(u * quotient)`` before extrapolating, so the table works on exactly the
    quantity that is compared. Differences are taken before projecting: the outputs that do
    not move then cancel exactly instead of drowning a small change in rounding.
    """
    reach = max((float(np.max(np.abs(v) / _scale(x))) for x, v in zip(xs, directions)
                 if v is not None and v.size), default=0.0)
    if weights is None:
        project = lambda o, a: a  # noqa: E731
    else:
        project = lambda o, a: np.sum(weights[o] * a)  # noqa: E731
    if reach == 0.0:  # nothing moves: the derivative is exactly zero
        zero = [project(o, np.zeros_like(y)) for o, y in enumerate(f0)]
        return [_Estimate(z, z, z, z, z, np.zeros_like(z, bool)) for z in zero]
    steps = (step / reach) * 0.5 ** np.arange(_LEVELS)
    central, forward, backward = [], [], []
    moved = [np.zeros(y.shape, bool) for y in f0]
    for t in steps:
        up = fn([x if v is None else x + t * v for x, v in zip(xs, directions)])
        down = fn([x if v is None else x - t * v for x, v in zip(xs, directions)])
        for changed, p, b, m in zip(moved, up, f0, down):
            changed |= (p != b) | (m != b)
        central.append([(p - m) / (2 * t) for p, m in zip(up, down)])
        forward.append([(p - b) / t for p, b in zip(up, f0)])
        backward.append([(b - m) / t for b, m in zip(f0, down)])
    estimates = []
    for o, y in enumerate(f0):
        # Rounding in f makes each quotient uncertain by about ulp(f) / t, whatever the table says.
        magnitude = np.abs(y) * moved[o]
        noise = _NOISE * _EPS * (magnitude if weights is None else
                                 np.sum(np.abs(weights[o]) * magnitude)) / steps[-1]
        value, error = _richardson(np.array([project(o, q[o]) for q in central]), 2)
        right, e_right = _richardson(np.array([project(o, q[o]) for q in forward]), 1)
        left, e_left = _richardson(np.array([project(o, q[o]) for q in backward]), 1)
        side_error = e_left + e_right + 4 * noise
        # A kink: both one-sided slopes are well determined, and they disagree.
        jump = np.abs(right - left)
        kink = (jump > _KINK_FACTOR * side_error + atol) & \
               (jump > _KINK_RTOL * np.maximum(np.abs(left), np.abs(right)))
        estimates.append(_Estimate(value, error + noise, left, right, side_error, kink))
    return estimates


# --------------------------------------------------------------------------- argument handling

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
            xs.append(a.astype(np.float64))  # always a copy: nothing of the caller's is touched
            floating.append(k)
        elif a.dtype.kind in "iub":
            xs.append(a.copy())
        else:
            raise TypeError(f"inputs[{k}] has dtype {a.dtype}; expected a real floating-point "
                            "array (or an integer/boolean array that is not differentiated)")
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
    """Calls ``f`` on fresh copies, checks what it returns, and counts the evaluations."""

    def __init__(self, f):
        if not callable(f):
            raise TypeError(f"f must be callable; got {_describe(f)}")
        self.f, self.n_evals, self.shapes = f, 0, None

    def __call__(self, xs) -> list[np.ndarray]:
        self.n_evals += 1
        result = self.f(*[x.copy() for x in xs])
        items = list(result) if isinstance(result, (tuple, list)) else [result]
        outputs = []
        for y in items:
            ok = isinstance(y, (np.ndarray, np.number, float, int)) and not isinstance(y, bool)
            if not ok or np.asarray(y).dtype.kind not in "fiu" or not items:
                raise TypeError("f must return a real NumPy array or a tuple/list of them; it "
                                f"returned {_describe(result)}")
            outputs.append(np.asarray(y, dtype=np.float64))
        shapes = [y.shape for y in outputs]
        if self.shapes is None:
            self.shapes = shapes
        elif shapes != self.shapes:
            raise ValueError(f"f returned outputs of shapes {shapes} at a perturbed input but "
                             f"{self.shapes} at the original input; expected the same shapes")
        return outputs


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

    @property
    def bad(self) -> bool:  # written so that NaN fails
        return not abs(self.analytic - self.numerical) <= self.tolerance

    @property
    def troubled(self) -> bool:
        return self.bad or self.kink

    def rel_error(self, atol: float) -> float:
        gap = abs(self.analytic - self.numerical)
        return gap / max(abs(self.analytic), abs(self.numerical), atol) if gap else 0.0


def _compare(est: _Estimate, analytic, input, output, index, rtol, atol) -> _Comparison:
    """Compare one analytic number with its finite-difference estimate.

    A smooth point passes when :math:`|a - n| \\le atol + rtol |n| + 4 e`, with :math:`e` the
    extrapolation's error estimate. At a kink any subgradient is right, so the analytic value
    is compared with the nearest point of the interval between the left and right slopes.
    """
    a, left, right = float(analytic), float(est.left), float(est.right)
    if est.kink:
        n = min(max(a, min(left, right)), max(left, right))
        error = est.side_error
    else:
        n, error = float(est.value), est.error
    tolerance = atol + rtol * abs(n) + _SAFETY * float(error)
    return _Comparison(input, output, index, a, n, tolerance, bool(est.kink), left, right)


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
    a, n, tolerance = (np.array([c[i] for c in group]) for i in (3, 4, 5))
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
    """The state one call of :func:`check_vjp` shares between its projections and fallbacks."""

    def __init__(self, fn, vjp, xs, diff, step, rtol, atol):
        self.fn, self.vjp, self.xs, self.diff = fn, vjp, xs, diff
        self.step, self.rtol, self.atol = step, rtol, atol
        self.f0 = fn(xs)
        self.n_vjp_calls = 0

    def draw(self, rng):
        """Random cotangents, and the analytic J_o^T u_o of each output o (one vjp call each)."""
        cotangents = [rng.standard_normal(y.shape) for y in self.f0]
        grads = []
        for o, u in enumerate(cotangents):
            # One output at a time, so a wrong gradient is traced to the output that causes it.
            alone = [u if i == o else np.zeros_like(y) for i, y in enumerate(self.f0)]
            grads.append(_gradients(self.vjp, alone, self.xs, self.diff))
            self.n_vjp_calls += 1
        return cotangents, grads

    def projection(self, cotangents, grads, directions, input=None) -> list[_Comparison]:
        r"""Compare :math:`u^T (J v)`, by finite differences, with :math:`(J^T u)^T v`."""
        moved = [directions.get(k) for k in range(len(self.xs))]
        estimates = _along(self.fn, self.xs, moved, self.f0, self.step, cotangents, self.atol)
        return [_compare(est, sum(float(np.sum(g[k] * v)) for k, v in directions.items()),
                         input, o, None, self.rtol, self.atol)
                for o, (est, g) in enumerate(zip(estimates, grads))]

    def elements(self, k, cotangents, grads) -> list[_Comparison]:
        """Compare (J^T u)[j] with its finite difference, one element j of input k at a time."""
        comparisons = []
        for j in np.ndindex(self.xs[k].shape):
            v = np.zeros_like(self.xs[k])
            v[j] = 1.0
            moved = [v if i == k else None for i in range(len(self.xs))]
            estimates = _along(self.fn, self.xs, moved, self.f0, self.step, cotangents, self.atol)
            comparisons += [_compare(est, g[k][j], k, o, j, self.rtol, self.atol)
                            for o, (est, g) in enumerate(zip(estimates, grads))]
        return comparisons


def check_vjp(f: Callable, vjp: Callable, inputs: Sequence[np.ndarray], *, mode: str = "fast",
              rng=None, rtol: float = 1e-7, atol: float = 1e-9, n_projections: int = 3,
              raise_on_failure: bool = False, diff_argnums: Sequence[int] | None = None,
              step: float = 1e-4, max_fallback_size: int = 2000) -> GradcheckReport:
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
        ``"slow"``: every element of every differentiable input is moved on its own, which is the
        full Jacobian by central differences, :math:`2 \cdot 4` evaluations of ``f`` per element;
        each column is compared, projected on a random cotangent, with ``vjp``'s gradient.
        ``"fast"``: ``n_projections`` random projections. For a random cotangent :math:`u` and a
        random direction :math:`v`,

        .. math::
            u^T (J v) = (J^T u)^T v,

        where the left side is one directional derivative of ``f`` (8 evaluations of ``f``,
        whatever the size of the inputs) and the right side is one ``vjp`` call dotted with
        :math:`v`. On a failure (or a kink) the direction is restricted to one input at a time to
        find the culprit, and an input of at most ``max_fallback_size`` elements is then checked
        element by element, which names the worst element; the report says so.
    rng : numpy.random.Generator or int, optional
        Source of the random cotangents and directions; default ``np.random.default_rng(0)``.
    rtol, atol : float
        A number passes when :math:`|a - n| \le atol + rtol\,|n| + 4 e`, with :math:`e` the
        error estimate of the Richardson extrapolation (see :func:`directional_derivative`).
        In float64 :math:`e` is typically :math:`10^{-10}` relative, so a gradient off by
        :math:`10^{-4}` relative fails while finite-difference noise does not.
    n_projections : int
        Number of random projections in fast mode.
    raise_on_failure : bool
        Raise :class:`GradcheckError` (message: the report) instead of returning a failed report.
    diff_argnums : sequence of int, optional
        The inputs to differentiate; default: every floating-point input.
    step : float
        Largest relative step: an element moves by at most ``step * max(|x_j|, mean|x|)``.
    max_fallback_size : int
        Largest input that fast mode checks element by element after a failure.

    Returns
    -------
    GradcheckReport
        True when passed; ``print`` it for the worst element, its analytic and numerical values,
        the relative error, the error pattern and the non-differentiable points found.
    """
    if mode not in ("fast", "slow"):
        raise ValueError(f"mode must be 'fast' or 'slow'; got {mode!r}")
    if int(n_projections) < 1:
        raise ValueError(f"n_projections must be at least 1; got {n_projections}")
    if not callable(vjp):
        raise TypeError(f"vjp must be callable; got {_describe(vjp)}")
    xs, diff, notes = _prepare_inputs(inputs, diff_argnums)
    rng = np.random.default_rng(0 if rng is None else rng)
    checker = _Checker(_Function(f), vjp, xs, diff, step, rtol, atol)
    movable = [k for k in diff if xs[k].size]
    notes += [f"input {k} is empty: nothing to check" for k in diff if not xs[k].size]

    comparisons = []
    if movable and mode == "slow":
        cotangents, grads = checker.draw(rng)
        for k in movable:
            comparisons += checker.elements(k, cotangents, grads)
    elif movable:
        projections = []
        for _ in range(n_projections):
            cotangents, grads = checker.draw(rng)
            directions = {k: rng.standard_normal(xs[k].shape) for k in movable}
            found = checker.projection(cotangents, grads, directions)
            projections.append((cotangents, grads, directions, found))
        done = set()  # inputs already checked element by element
        for cotangents, grads, directions, found in projections:
            if not any(c.troubled for c in found):
                comparisons += found
                continue
            explained = False
            for k in movable:
                if k in done:
                    explained = True
                    continue
                local = [c._replace(input=k) for c in found] if len(movable) == 1 else \
                    checker.projection(cotangents, grads, {k: directions[k]}, input=k)
                if any(c.troubled for c in local) and xs[k].size <= max_fallback_size:
                    comparisons += checker.elements(k, cotangents, grads)
                    done.add(k)
                    notes.append(f"the fast check of input {k} failed or met a kink, so its "
                                 f"{xs[k].size} elements were checked one by one")
                else:
                    comparisons += local
                explained |= any(c.troubled for c in local)
            if not explained:  # the joint projection disagrees but no single input does
                comparisons += [c for c in found if c.bad]
                notes.append("a projection over all inputs failed but no single input did")

    passed = not any(c.bad for c in comparisons)
    # The worst: a failure if any, else the smooth point closest to failing.
    worst = max(comparisons, default=None, key=lambda c: (c.bad, not c.kink, np.nan_to_num(
        abs(c.analytic - c.numerical) / c.tolerance if c.tolerance else np.inf, nan=np.inf)))
    report = GradcheckReport(
        passed=passed, mode=mode, n_evals=checker.fn.n_evals, n_vjp_calls=checker.n_vjp_calls,
        max_rel_error=max((c.rel_error(atol) for c in comparisons), default=0.0),
        worst=worst and Worst(worst.input, worst.output, worst.index, worst.analytic,
                              worst.numerical, worst.rel_error(atol)),
        kinks=[Kink(c.input, c.output, c.index, c.left, c.right, c.analytic)
               for c in comparisons if c.kink],
        pattern="" if passed else _diagnose(comparisons, worst), notes=notes, rtol=rtol, atol=atol)
    if raise_on_failure and not report:
        raise GradcheckError(report)
    return report


# --------------------------------------------------------------------------- public helpers

def directional_derivative(f: Callable, inputs: Sequence[np.ndarray], directions, *,
                           step: float = 1e-4):
    r"""The derivative of ``f`` along ``directions``, with an error estimate and a kink flag.

    Central differences :math:`D(t) = (f(x + t v) - f(x - t v)) / 2t` at
    :math:`t, t/2, t/4, t/8` are extrapolated to :math:`t \to 0` with Richardson's table
    (error :math:`O(t^2) \to O(t^4) \to O(t^6) \to O(t^8)`); the error estimate is how far the
    chosen entry moved from the entries it was built from, plus the rounding noise of ``f``
    divided by the step. The largest step moves no element by more than ``step`` times its
    magnitude. One-sided differences :math:`(f(x + t v) - f(x)) / t` and
    :math:`(f(x) - f(x - t v)) / t` are extrapolated the same way; when both are well determined
    and disagree, ``x`` is a non-differentiable point (a kink) along ``v``.

    Parameters
    ----------
    f : callable
    inputs : sequence of ndarray
    directions : sequence of ndarray or None
        One per input (None: that input does not move), of the input's shape.

    Returns
    -------
    value, error_estimate : ndarray, or tuples of ndarrays for several outputs
        :math:`J v` for each output and its elementwise error estimate.
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
    estimates = _along(fn, xs, moved, fn(xs), step)
    values, errors = [e.value for e in estimates], [e.error for e in estimates]
    kink = any(bool(np.any(e.kink)) for e in estimates)
    if len(estimates) == 1:
        return values[0], errors[0], kink
    return tuple(values), tuple(errors), kink


def numerical_jacobian(f: Callable, inputs: Sequence[np.ndarray], *, argnum: int = 0,
                       step: float = 1e-4):
    """The Jacobian of ``f`` with respect to ``inputs[argnum]``, one element at a time.

    Each column is a :func:`directional_derivative` along one element (8 evaluations of ``f``).
    The result has shape ``output.shape + input.shape``; a tuple of such arrays for several
    outputs. This is slow (``8 * input.size`` evaluations) and meant for small inputs.
    """
    xs, _, _ = _prepare_inputs(inputs, diff_argnums=[argnum])
    fn = _Function(f)
    f0 = fn(xs)
    jacobians = [np.zeros(y.shape + xs[argnum].shape) for y in f0]
    for j in np.ndindex(xs[argnum].shape):
        v = np.zeros_like(xs[argnum])
        v[j] = 1.0
        moved = [v if i == argnum else None for i in range(len(xs))]
        for jac, est in zip(jacobians, _along(fn, xs, moved, f0, step)):
            jac[(Ellipsis,) + j] = est.value
    return jacobians[0] if len(jacobians) == 1 else tuple(jacobians)

"""The reliability contract, checked on one call (see ``docs/notes/reliability.rst``).

:func:`check_call` (finite inputs) and :func:`check_nonfinite` (NaN/inf put into a finite call)
return a list of :class:`Failure`; the tests assert it is empty, or, for a known and reported
bug (:mod:`reliability.known_bugs`), that every failure is explained by it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from reliability.calls import (Outcome, accepts, assert_unchanged, compare, composite_outcome,
                               copy_inputs, declares, dependency_cone, describe, execute,
                               dy_arrays, get_slot, group_axes, is_documented_error,
                               is_value_error, map_dy, reference, replace_slots, representable,
                               sensitivity, shift_invariant)


@dataclass(frozen=True)
class Failure:
    kind: str       # "crash", "undocumented-error", "value-error", "precision-error", "mutation",
    #                 "structure", "inaccurate", "constant", "scale", "statistics", "nonfinite",
    #                 "warning" (a NumPy warning escaped a public function)
    detail: str

    def __str__(self):
        return f"[{self.kind}] {self.detail}"


def _run_checked(spec, sample, dy, failures) -> Outcome:
    """Run forward and backward; record a mutation of any input (or of dy) as a failure."""
    snap = copy_inputs(sample)
    dy_snap = map_dy(dy, np.copy)
    out = execute(spec, sample, dy)
    try:
        assert_unchanged(sample, snap, dy, dy_snap)
    except AssertionError as exc:
        failures.append(Failure("mutation", f"{exc} by {spec.name}"))
    return out


def _benign(spec, sample):
    """The same call with standard-normal values in the first array (same shape and dtype)."""
    x = sample.arrays[0]
    z = np.random.default_rng(7).standard_normal(x.shape).astype(x.dtype)
    return replace_slots(sample, {("arg", 0): z})


def check_exception(spec, call_sample, dtype, exc, ref: Outcome | None) -> list[Failure]:
    """An exception is allowed when it is documented (ValueError/TypeError, ``"<name>: "``,
    naming the argument) and either does not depend on the values (the same call on a
    standard-normal input raises too) or is one of the variant's documented value errors that
    exact arithmetic raises too (or whose exact result the dtype cannot hold)."""
    if not is_documented_error(spec, exc):
        kind = "crash" if not isinstance(exc, (ValueError, TypeError)) else "undocumented-error"
        return [Failure(kind, describe(exc))]
    benign = execute(spec, _benign(spec, call_sample), backward=False)
    if not benign.ok:
        return []
    if not is_value_error(spec, exc):
        return [Failure("value-error", f"{describe(exc)} (the same call on a standard-normal "
                                       f"input succeeds)")]
    if ref is not None and ref.ok and representable(ref, dtype):
        return [Failure("precision-error", f"{describe(exc)} at {np.dtype(dtype).name}, but the "
                                           f"extended-precision reference is finite and "
                                           f"representable")]
    return []


def check_structure(spec, sample, dy, out: Outcome) -> list[Failure]:
    """Shapes and dtypes of ``y`` and of every gradient; no output aliases an input or dy."""
    bad = []
    x = sample.arrays[0]
    y = out.y
    if y.shape != spec.y_shape(sample):
        bad.append(Failure("structure", f"y has shape {y.shape}, expected "
                                        f"{spec.y_shape(sample)} (x {x.shape})"))
    if y.dtype != x.dtype:
        bad.append(Failure("structure", f"y has dtype {y.dtype}, x {x.dtype}"))
    inputs = [a for a in sample.arrays if isinstance(a, np.ndarray)] + \
        [v for v in sample.kwargs.values() if isinstance(v, np.ndarray)] + dy_arrays(dy)
    for name, g, a in zip(spec.diff_argnames, out.grads, sample.arrays):
        if (g is None) != (a is None):
            bad.append(Failure("structure", f"d{name} is {'None' if g is None else 'given'} "
                                            f"while {name} is {'None' if a is None else 'given'}"))
        elif g is not None and (g.shape != a.shape or g.dtype != a.dtype):
            bad.append(Failure("structure", f"d{name} is {g.dtype}{g.shape}, {name} is "
                                            f"{a.dtype}{a.shape}"))
    for key in list(spec.outputs) + [k for k in out.outputs if k.startswith("d")]:
        o = out.outputs[key]
        for a in inputs:
            if o.size and a.size and np.shares_memory(o, a):
                bad.append(Failure("structure", f"output {key} shares memory with an input"))
    return bad


def _same_backward_twice(spec, sample, dy) -> list[Failure]:
    """The cache is not consumed: a second backward from the same forward gives the same."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        _, _, cache = spec.run(sample)
        first = spec.backward(dy, cache)
        second = spec.backward(dy, cache)
    for name, a, b in zip(spec.diff_argnames, first, second):
        if a is not None and a.tobytes() != b.tobytes():
            return [Failure("structure", f"a second backward on the same cache gives another "
                                         f"d{name}: the first one modified the cache")]
    return []


def check_call(call) -> list[Failure]:
    """The whole contract for one finite call (see the module docstring)."""
    spec, sample, dy, dtype = call.spec, call.sample, call.dy, call.dtype
    failures: list[Failure] = []
    out = _run_checked(spec, sample, dy, failures)
    failures += [Failure("warning", f"{spec.name} emitted a warning: {w}") for w in out.warnings]
    ref = reference(spec, sample, dy, dtype)
    if not out.ok:
        return failures + check_exception(spec, sample, dtype, out.error, ref)
    if not ref.ok:
        return failures + [Failure(
            "precision-error", f"the call succeeds at {np.dtype(dtype).name} but the "
                               f"extended-precision reference raises {describe(ref.error)}")]
    failures += check_structure(spec, sample, dy, out)
    failures += _same_backward_twice(spec, sample, dy)
    sens = sensitivity(spec, sample, dy, dtype, ref)
    failures += [Failure("inaccurate", str(m))
                 for m in compare(out, ref, sens, dtype, sample.arrays[0].size)]
    failures += check_invariants(call, out, ref)
    return failures


def _eps(sample):
    eps = sample.kwargs.get("eps", 1.0)
    return eps if isinstance(eps, (int, float)) else 1.0


def check_invariants(call, out: Outcome, ref: Outcome) -> list[Failure]:
    """On a finite call:

    * **constant groups** (shift-invariant calls, eps > 0): ``y`` equals ``y`` of an all-zero
      input (``bias``, or 0) to a few units of the dtype's roundoff at magnitude 1: a constant
      group has no direction, and any rounding residue would be amplified by 1/sqrt(eps);
    * **scaling by a power of two** (calls with an ``eps``; ``eps`` scaled by its square): the
      same ``y`` for calls that declare "scale";
    * **statistics** (calls with ``stats_axes``): the reference without affine parameters has
      mean 0 and variance s^2/(s^2+eps) over the axes, to extended precision.
    """
    spec, sample, dtype = call.spec, call.sample, call.dtype
    u = float(np.finfo(dtype).eps)
    bad = []
    x = sample.arrays[0]
    y = out.y
    if x.size == 0:
        return bad
    with np.errstate(all="ignore"):
        constant = call.regime in ("constant-all", "zeros") or (
            call.regime == "constant-groups" and group_axes(spec, sample) is not None)
        if constant and shift_invariant(spec, sample) and _eps(sample) > 0:
            zero = execute(spec, replace_slots(sample, {("arg", 0): np.zeros_like(x)}),
                           backward=False)
            if zero.ok:
                err = float(np.max(np.abs(y.astype(np.float64) - zero.y)))
                tol = 8 * u * max(1.0, float(np.max(np.abs(zero.y))))
                if not err <= tol:
                    bad.append(Failure("constant", f"a constant input gives y off the output of "
                                                   f"a zero input by {err:.3g} (> {tol:.3g})"))
        if declares(spec, sample, "scale") and "eps" in sample.kwargs and np.isfinite(y).all():
            bad += _check_scale(call, y)
        axes = group_axes(spec, sample)
        if axes is not None and len(sample.arrays) > 1 and _eps(sample) > 0:
            bad += _check_statistics(call, axes)
    return bad


def _check_scale(call, y):
    spec, sample, dtype = call.spec, call.sample, call.dtype
    x = sample.arrays[0]
    info = np.finfo(dtype)
    squares = float(np.sum(np.square(x.astype(np.float64))))
    # a power of two that keeps the squares of a x inside the dtype's range (an overflow of
    # the squares is a known bug of its own)
    a = 4.0 if squares * 16 < float(info.max) / 4 else 0.25
    if squares * a * a >= float(info.max) / 4:
        return []
    small = float(np.min(np.abs(x[x != 0]))) if (x != 0).any() else 1.0
    if small * min(a, 1.0) < float(info.smallest_normal) * 64:
        return []
    eps = _eps(sample)
    if eps * a * a < float(info.smallest_normal) * 64:
        return []
    scaled = sample._replace(arrays=(x * dtype(a),) + tuple(sample.arrays[1:]),
                             kwargs={**sample.kwargs, "eps": eps * a * a})
    res = execute(spec, scaled, backward=False)
    if not res.ok:
        return [Failure("scale", f"x * {a} raises {describe(res.error)}")]
    err = float(np.max(np.abs(res.y.astype(np.float64) - y))) if y.size else 0.0
    tol = 8 * float(info.eps) * max(1.0, float(np.max(np.abs(y)))) if y.size else 0.0
    if not err <= tol:
        return [Failure("scale", f"y(x * {a}, eps * {a * a}) differs from y(x, eps) by {err:.3g} "
                                 f"(> {tol:.3g})")]
    return []


def _check_statistics(call, axes):
    spec, sample = call.spec, call.sample
    plain = sample._replace(arrays=(sample.arrays[0],) + (None,) * (len(sample.arrays) - 1))
    if not all(accepts(spec.forward, n) for n in spec.diff_argnames[1:]):
        return []
    ld = plain._replace(arrays=(sample.arrays[0].astype(np.longdouble),) + plain.arrays[1:])
    ld = ld._replace(kwargs={k: (v.astype(np.longdouble) if isinstance(v, np.ndarray)
                                 and v.dtype.kind == "f" else v) for k, v in ld.kwargs.items()})
    res = execute(spec, ld, backward=False)
    if not res.ok or not np.isfinite(res.y).all():
        return []
    x = ld.arrays[0]
    eps = _eps(sample)
    s2 = np.var(x, axis=axes, keepdims=True, dtype=np.longdouble)
    want = s2 / (s2 + eps)
    mean = np.mean(res.y, axis=axes, keepdims=True)
    var = np.var(res.y, axis=axes, keepdims=True)
    uld = float(np.finfo(np.longdouble).eps)
    n = max(1, x.size)
    tol = 64 * uld * n
    bad = []
    if not float(np.max(np.abs(mean))) <= tol:
        worst = float(np.max(np.abs(mean)))
        bad.append(Failure("statistics", f"mean of the normalized output {worst:.3g} "
                                         f"(> {tol:.3g})"))
    if not float(np.max(np.abs(var - want))) <= tol:
        bad.append(Failure("statistics", f"variance of the normalized output off s^2/(s^2+eps) by "
                                         f"{float(np.max(np.abs(var - want))):.3g} (> {tol:.3g})"))
    return bad


# ------------------------------------------------------------------------------------------
# Non-finite inputs
# ------------------------------------------------------------------------------------------
def check_nonfinite(call, injected) -> list[Failure]:
    """NaN/inf put at ``injected`` (``[(slot, index, value)]``) into a finite call.

    The contract (``docs/notes/reliability.rst``): the call either raises one of the variant's
    documented value errors (weight_norm: a slice of ``v`` that is not finite), or it returns,
    and then

    * every output element that does not depend on an injected element (its *dependency cone*,
      found by perturbing that element) is bit-identical to the clean call's;
    * every output element that depends on an injected NaN is NaN (a NaN is never dropped),
      unless it also depends on an injected inf (the limit may decide it: an inf in a row
      makes RMSNorm's rstd 0);
    * no input is mutated.
    """
    spec, sample, dy = call.spec, call.sample, call.dy
    failures: list[Failure] = []
    clean = execute(spec, sample, dy)
    if not clean.ok or check_call(call):
        return []          # the clean call is judged by check_call (and its known bugs)
    # Two cones per injected element. `local`: the outputs that change when it changes, at this
    # very call; an injected NaN must reach all of them. `allowed`: where a non-finite value may
    # appear at all: `local`, the same at a generic point (x standard normal, eps 0.5: away from
    # the degenerate groups of one or two elements, where y or dx is constant in x), the outputs
    # that change when the element goes to its dtype's largest finite values (an inf is their
    # limit), and the NaN pattern of the engine composite on the injected call (the textbook
    # formula propagates a NaN through the statistics of its group even where the exact function
    # does not depend on it: 0 * NaN is NaN). Everything outside `allowed` must be bit-identical
    # to the clean call.
    generic = _benign(spec, sample)
    if isinstance(generic.kwargs.get("eps"), float):
        generic = generic._replace(kwargs={**generic.kwargs, "eps": 0.5})
    local = [dependency_cone(spec, sample, dy, slot, index) for slot, index, _ in injected]
    allowed = {}
    for (slot, index, _), cone in zip(injected, local):
        for source in (cone, dependency_cone(spec, generic, dy, slot, index),
                       dependency_cone(spec, sample, dy, slot, index, to_the_limit=True)):
            for k, m in source.items():
                allowed[k] = allowed[k] | m if k in allowed and allowed[k].shape == m.shape else \
                    allowed.get(k, m.copy())
    arrays = {}
    for slot, index, value in injected:
        a = arrays.get(slot, get_slot(sample, slot).copy())
        a[index] = value
        arrays[slot] = a
    dirty = replace_slots(sample, arrays)
    out = _run_checked(spec, dirty, dy, failures)
    formula = composite_outcome(spec, dirty, dy)
    if formula.ok:
        for k, v in formula.outputs.items():
            if k in allowed and allowed[k].shape == v.shape and v.dtype.kind == "f":
                allowed[k] |= ~np.isfinite(v)
    if not out.ok:
        if not is_documented_error(spec, out.error):
            kind = "crash" if not isinstance(out.error, (ValueError, TypeError)) \
                else "undocumented-error"
            return failures + [Failure(kind, describe(out.error))]
        if not is_value_error(spec, out.error):
            return failures + [Failure("value-error", f"{describe(out.error)} on a non-finite "
                                                      f"input")]
        return failures
    for k, v in clean.outputs.items():
        got = out.outputs.get(k)
        if got is None or got.shape != v.shape:
            failures.append(Failure("structure", f"output {k} missing or reshaped"))
            continue
        cone = allowed.get(k, np.zeros(v.shape, bool))
        same = (got == v) | (np.isnan(got) & np.isnan(v)) if v.dtype.kind == "f" else got == v
        if not same[~cone].all():
            i = tuple(int(j) for j in np.argwhere(~cone & ~same)[0])
            failures.append(Failure("nonfinite", f"{k}[{i}] does not depend on the injected "
                                                 f"value(s) but changed: {v[i]!r} -> {got[i]!r}"))
    # every element that depends on an injected NaN (and on no injected inf, whose limit may
    # legitimately decide the element, e.g. rstd = 0) is NaN
    inf_cone = {}
    for (slot, index, value), cone in zip(injected, local):
        if np.isinf(value):
            for k, m in cone.items():
                inf_cone[k] = inf_cone[k] | m if k in inf_cone else m.copy()
    for (slot, index, value), cone in zip(injected, local):
        if not np.isnan(value):
            continue
        for k, m in cone.items():
            got = out.outputs.get(k)
            if got is None or got.dtype.kind != "f" or got.shape != m.shape:
                continue
            if k in inf_cone:
                m = m & ~inf_cone[k]
            dropped = m & ~np.isnan(got)
            if dropped.any():
                i = tuple(int(j) for j in np.argwhere(dropped)[0])
                failures.append(Failure("nonfinite", f"{k}[{i}] depends on the NaN put at "
                                                     f"{slot}{index} but is {got[i]!r}"))
    return failures

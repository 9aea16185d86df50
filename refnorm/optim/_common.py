"""Helpers shared by the optimizers: argument checking, read-only state arrays, the error measure.

Every optimizer in :mod:`refnorm.optim` is a pair of pure functions,
``<name>_init(params, **hyper) -> state`` and
``<name>_step(params, grads, state, **hyper) -> (new_params, new_state)``. The helpers here keep
the argument checking out of the optimizer files, so that those read like their equations.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "as_param_list",
    "check_grads",
    "check_buffers",
    "check_nonnegative",
    "check_real",
    "check_betas",
    "frozen",
    "max_relative_error",
]


def as_param_list(arrays: Any, name: str = "params") -> list[np.ndarray]:
    """Return ``arrays`` as a list of floating-point ndarrays, without copying.

    A bare ndarray is refused: a 2-D array is iterable, and silently treating its rows as separate
    parameters is a classic bug.
    """
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, (list, tuple)):
        raise TypeError(
            f"{name} must be a list or tuple of NumPy arrays, got {type(arrays).__name__}"
        )
    out = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"{name}[{i}] must be a floating-point array, got dtype {a.dtype}")
        out.append(a)
    return out


def check_grads(params: Sequence[np.ndarray], grads: Any) -> list[np.ndarray]:
    """Check that ``grads`` has one array per parameter, of the same shape; cast to its dtype."""
    grads = as_param_list(grads, "grads")
    if len(grads) != len(params):
        raise ValueError(
            f"grads must hold one array per parameter: got {len(grads)} grads for "
            f"{len(params)} params"
        )
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.shape != p.shape:
            raise ValueError(
                f"grads[{i}] has shape {g.shape}, but params[{i}] has shape {p.shape}"
            )
        out.append(g.astype(p.dtype, copy=False))
    return out


def check_buffers(
    state: Any, field: str, params: Sequence[np.ndarray], *, allow_none: bool = False
) -> None:
    """Check that ``state.<field>`` holds one buffer per parameter, of the parameter's shape."""
    buffers = getattr(state, field, None)
    if buffers is None or len(buffers) != len(params):
        raise ValueError(
            f"state.{field} must hold one buffer per parameter ({len(params)}); was the state "
            "made by the matching init function for these params?"
        )
    for i, (p, b) in enumerate(zip(params, buffers)):
        if b is None:
            if allow_none:
                continue
            raise ValueError(f"state.{field}[{i}] is None")
        if np.shape(b) != p.shape:
            raise ValueError(
                f"state.{field}[{i}] has shape {np.shape(b)}, but params[{i}] has shape {p.shape}"
            )


def check_nonnegative(name: str, value: Any) -> float:
    """``float(value)``, or ValueError naming the argument when it is negative or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not (value >= 0.0 and math.isfinite(value)):  # also refuses NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def check_real(name: str, value: Any) -> float:
    """``float(value)``, or TypeError/ValueError naming the argument if it is not a finite real."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_betas(betas: Any) -> tuple[float, float]:
    """The pair ``(beta1, beta2)``, each in ``[0, 1)``, or ValueError naming ``betas``."""
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats (beta1, beta2), got {betas!r}") from None
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b!r}")
    return beta1, beta2


def frozen(a: np.ndarray) -> np.ndarray:
    """Mark a freshly computed state buffer read-only.

    The state is a value, not a workspace: an in-place update of a buffer handed out in a state
    (``state.exp_avg[0] *= 2``) would silently change every later step computed from it, so we make
    it raise instead. Only arrays this package allocated are passed here, never a caller's array.
    """
    a.flags.writeable = False
    return a


def max_relative_error(actual: Iterable[Any], expected: Iterable[Any]) -> float:
    """Largest ``max|a - e| / max|e|`` over pairs of arrays (``max|a|`` when ``e`` is all zeros).

    The error is relative to the largest entry of each reference array, not element by element,
    so that an entry that happens to be near zero does not dominate.
    """
    worst = 0.0
    for a, e in zip(actual, expected):
        if a is None and e is None:
            continue
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        if a.shape != e.shape:
            return math.inf
        if a.size == 0:
            continue
        scale = float(np.max(np.abs(e)))
        diff = float(np.max(np.abs(a - e)))
        err = diff / scale if scale > 0 else diff
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


def run_check(
    init: Callable,
    step: Callable,
    reference: Callable,
    cases: Iterable[tuple[list[np.ndarray], Callable, dict, int]],
    buffer_fields: Sequence[str] = (),
    decision_fields: Sequence[str] = (),
) -> float:
    """Max relative error of ``step`` against an independent ``reference`` over a few steps.

    ``cases`` yields ``(params, grad_fn, hyper, n_steps)``. For each case the implementation runs
    ``n_steps`` steps from ``init(params, **hyper)``; the gradients are computed once per step
    (from the implementation's current parameters) and handed to both sides, so the two can be
    compared step by step. ``reference(params, grads_per_step, **hyper)`` returns, per step, a dict
    with ``"params"`` and one entry per name in ``buffer_fields`` and ``decision_fields``. A
    decision (a projection view, a weight-decay ratio) that differs makes the error infinite.
    """
    worst = 0.0
    for params, grad_fn, hyper, n_steps in cases:
        state = init(params, **hyper)
        p = list(params)
        grads_seq, ours = [], []
        for _ in range(n_steps):
            grads = grad_fn(p)
            grads_seq.append(grads)
            p, state = step(p, grads, state, **hyper)
            ours.append((p, state))
        theirs = reference(list(params), grads_seq, **hyper)
        for (p, state), ref in zip(ours, theirs):
            worst = max(worst, max_relative_error(p, ref["params"]))
            for field in buffer_fields:
                got = getattr(state, field)
                if got is None or ref[field] is None:
                    if not (got is None and ref[field] is None):
                        return math.inf
                    continue
                worst = max(worst, max_relative_error(got, ref[field]))
            for field in decision_fields:
                if tuple(getattr(state, field)) != tuple(ref[field]):
                    return math.inf
    return worst

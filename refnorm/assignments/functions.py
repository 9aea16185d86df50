"""Functions with known Jacobians, for grading a gradient checker (assignment 6).

Each :class:`Function` has ``f`` (NumPy in, NumPy out, any shapes), its exact Jacobian
``jacobian(x)`` of shape ``(f(x).size, x.size)`` (row-major flattening of both), and ``m3``, a
bound on the third derivatives along a coordinate near the grading points, from which the
truncation error of central differences, at most ``h**2 / 6 * m3`` per entry, is bounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Function", "FUNCTIONS"]

_A = np.array([[1.5, -2.0, 0.5], [0.25, 1.0, -3.0]])


@dataclass(frozen=True)
class Function:
    name: str
    f: Callable
    jacobian: Callable
    m3: float
    description: str


def _linear(x):
    return _A @ x


def _cubic(x):
    return x ** 3 - 2.0 * x


def _sin_prod(x):          # R^(2x2) -> R: sin(x00) * x11 + x01 * x10
    return np.array([np.sin(x[0, 0]) * x[1, 1] + x[0, 1] * x[1, 0]])


def _sin_prod_jac(x):
    return np.array([[np.cos(x[0, 0]) * x[1, 1], x[1, 0], x[0, 1], np.sin(x[0, 0])]])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _softmax_jac(x):
    s = _softmax(x)
    return np.diag(s) - np.outer(s, s)


def _tanh_outer(x):        # R^3 -> R^(3x3): tanh(x_i) x_j
    return np.tanh(x)[:, None] * x[None, :]


def _tanh_outer_jac(x):
    n = x.size
    t, d = np.tanh(x), 1 - np.tanh(x) ** 2
    jac = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            jac[i, j, i] += d[i] * x[j]
            jac[i, j, j] += t[i]
    return jac.reshape(n * n, n)


FUNCTIONS = {f.name: f for f in (
    Function("linear", _linear, lambda x: _A.copy(), 0.0, "y = A x, A of shape (2, 3)"),
    Function("cubic", _cubic, lambda x: np.diag(3 * x ** 2 - 2.0), 6.0,
             "y = x**3 - 2x elementwise"),
    Function("sin_prod", _sin_prod, _sin_prod_jac, 4.0,
             "a scalar function of a 2x2 matrix: sin(x00) x11 + x01 x10"),
    Function("softmax", _softmax, _softmax_jac, 2.0, "the softmax of a vector"),
    Function("tanh_outer", _tanh_outer, _tanh_outer_jac, 12.0,
             "y_ij = tanh(x_i) x_j, a matrix-valued function of a vector"),
)}

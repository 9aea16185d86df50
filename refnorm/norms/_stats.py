r"""Shared statistics helpers for the normalization variants.

Every variant that standardizes computes its statistics here, in one way:

**Two-pass moments with a correction pass.** With :math:`m_0` the rounded mean of ``x`` over the
normalized axes,

.. math::

   d = x - m_0,\qquad c = \langle d\rangle,\qquad x_c = d - c,\qquad
   \mu = m_0 + c,\qquad \sigma^2 = \langle x_c^2\rangle ,

where :math:`\langle\cdot\rangle` is the mean over the axes. Why the correction: for a row with
mean 1e4 and standard deviation 1, the rounded mean :math:`m_0` is off by up to half an ULP of
1e4, about 9e-13, which is about 4,000 ULP at the magnitude of :math:`x - \mu` (about 1). Every
centred value inherits that error. The difference :math:`d = x - m_0` is exact when :math:`x`
and :math:`m_0` are within a factor of two (Sterbenz), and :math:`c` recovers the mean's
rounding error, so :math:`x_c` is right to about one ULP. ``E[x^2] - E[x]^2`` is never used: it
cancels catastrophically.

The variance is biased (divides by the count, :math:`1/N`), as every normalization layer uses
it in its forward pass; the unbiased one appears only in running statistics.
"""
from __future__ import annotations

import numpy as np


def centered(x, axes):
    """``(x - mean, mean)`` over ``axes`` (keepdims), with one correction pass of the mean."""
    m0 = x.mean(axis=axes, keepdims=True)
    xc = x - m0
    c = xc.mean(axis=axes, keepdims=True)
    xc -= c
    return xc, m0 + c


def moments(x, axes):
    """``(xc, mean, var)`` over ``axes``: centred values, mean, biased variance (keepdims)."""
    xc, mean = centered(x, axes)
    var = np.mean(np.square(xc), axis=axes, keepdims=True)
    return xc, mean, var


def rsqrt(v):
    """``1 / sqrt(v)`` elementwise."""
    return 1.0 / np.sqrt(v)


def trailing_axes(ndim, count):
    """The last ``count`` axes of an ``ndim``-dimensional array, as a tuple."""
    return tuple(range(ndim - count, ndim))


def axis_count(shape, axes):
    """Number of elements reduced over ``axes`` of an array of ``shape``."""
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def check_array(value, name, op, *, ndim_min=0, dtype=None):
    """Raise a TypeError/ValueError naming ``name`` unless ``value`` is a floating ndarray."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{op}: `{name}` must be a numpy.ndarray, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise TypeError(f"{op}: `{name}` must have a floating dtype, got {value.dtype}")
    if value.ndim < ndim_min:
        raise ValueError(f"{op}: `{name}` must have at least {ndim_min} dimensions, got shape "
                         f"{value.shape}")
    return value


def check_param(value, name, op, shape):
    """Check an optional per-feature parameter (``weight``, ``bias``) against ``shape``."""
    if value is None:
        return None
    check_array(value, name, op)
    if value.shape != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(shape)}, got {value.shape}")
    return value


def check_eps(eps, op, name="eps"):
    if not isinstance(eps, (int, float, np.floating)) or isinstance(eps, bool) \
            or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: `{name}` must be a finite number >= 0, got {eps!r}")
    return float(eps)

r"""Shared helpers of the transformer-family variants: token layout and robust quadratic means.

**Token layout.** The batch-type norms of transformers (PowerNorm, Unified Normalization,
RepBN, PRepBN) act on token tensors :math:`(B, T, C)`, or any :math:`(\ldots, C)`: the channels
are the **last** axis and every leading axis is pooled, so channel :math:`c` has its statistics
over the :math:`M = B\,T` tokens. (The official codes transpose to :math:`(B, C, T)` for
``nn.BatchNorm1d``, or permute fairseq's :math:`(T, B, C)`; the pooled statistics are the same.)
Per-channel parameters have shape :math:`(C,)` and broadcast against the trailing axis
(``param_layout="trailing"``).

**Quadratic means without overflow or underflow.** PowerNorm, Unified Normalization and
CRMSNorm divide by :math:`\sqrt{q + \epsilon}` with :math:`q` a mean of squares, not a variance.
:func:`rsqrt_quadratic_mean` computes it in the **accumulation dtype** :func:`wide_dtype`
(float64, or ``longdouble`` for ``longdouble`` input), from the values scaled per group by a
power of two :math:`2^{-e}`, exact, with :math:`2^e \ge \max|x|` so that the scaled squares are
in :math:`[0, 1]`:

.. math::

   q = 2^{2e}\,q',\qquad (q+\epsilon)^{-1/2} =
   \begin{cases} (q+\epsilon)^{-1/2} & \text{where } q \text{ is finite and } q+\epsilon
                 \text{ is a normal number well above the underflow threshold}\\
                 2^{-e}\,(q' + \epsilon\,2^{-2e})^{-1/2} & \text{otherwise.}\end{cases}

The first form is the plain one (it is the one used at every usual scale); the second keeps
:math:`r` finite and right when :math:`q` itself overflows (float64 :math:`|x| \gtrsim
10^{154}`) or underflows (``eps = 0`` with subnormal :math:`x`).

**Geometric means to a few ULPs at any magnitude.** :math:`\exp(\tfrac1W\sum_w \log a_w)`
loses accuracy with the magnitude of the logarithms: for :math:`a \approx 10^{259}`,
:math:`\log a \approx 596` carries an absolute rounding error of about
:math:`10^{-13}`, which :math:`\exp` turns into a relative error of about 60 ULP.
:func:`geometric_mean` separates the binary exponents, exact integers
(:math:`a_w = m_w 2^{e_w}`, :math:`m_w \in [\tfrac12, 1)`), and writes
:math:`\sum_w e_w = kW + j` with :math:`0 \le j < W`:

.. math::

   \Bigl(\prod_w a_w\Bigr)^{1/W} = 2^{k}\,
   \exp\Bigl(\tfrac1W\bigl(\textstyle\sum_w \log m_w + j \log 2\bigr)\Bigr),

where the argument of :math:`\exp` lies in :math:`(-\log 2, \log 2)`: its rounding error is
a few ULPs of 1, and the power of two is exact (also for subnormal :math:`a_w`, whose product
would underflow).
"""
from __future__ import annotations

import numbers

import numpy as np

from refnorm.norms._stats import check_array


def wide_dtype(dtype):
    """The accumulation dtype of the transformer-family statistics: float64 (float16, float32
    and float64 input), or longdouble for longdouble input."""
    return np.promote_types(dtype, np.float64)


def check_tokens(x, op):
    """``x`` of shape ``(..., C)`` with at least 2 dimensions (tokens, channels)."""
    return check_array(x, "x", op, ndim_min=2)


def token_axes(ndim):
    """The pooled axes of a ``(..., C)`` token tensor: every axis but the last."""
    return tuple(range(ndim - 1))


def as_tokens(x):
    """``x`` of shape ``(..., C)`` as a 2-D ``(M, C)`` array (a view when contiguous)."""
    c = x.shape[-1]
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    return x.reshape(m, c)


def pow2_scale(x, axis):
    """``(xs, e)``: ``x = xs * 2**e`` with ``e`` per group over ``axis`` (keepdims) such that
    ``|xs| <= 1``; exact (a power of two only moves the exponent). Groups whose maximum is 0 or
    not finite get ``e = 0``."""
    with np.errstate(invalid="ignore"):
        s = np.max(np.abs(x), axis=axis, keepdims=True, initial=0.0)
        ok = np.isfinite(s) & (s > 0)
    e = np.where(ok, np.frexp(np.where(ok, s, 1.0))[1], 0)
    return np.ldexp(x, -e), e


def rsqrt_scaled(qs, e, eps):
    r""":math:`(q+\epsilon)^{-1/2}` and :math:`q` for :math:`q = 2^{2e} q'` (``qs`` is
    :math:`q'`, computed from values scaled by :math:`2^{-e}`); see the module docstring."""
    info = np.finfo(qs.dtype)
    limit = float(info.smallest_normal) * 2.0 ** (info.nmant + 2)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        q = np.ldexp(qs, 2 * e)
        plain = 1.0 / np.sqrt(q + eps)
        scaled = np.ldexp(1.0 / np.sqrt(qs + np.ldexp(np.asarray(eps, qs.dtype), -2 * e)), -e)
        use_plain = (q < np.inf) & (q + eps >= limit)
    return np.where(use_plain | np.isnan(qs), plain, scaled), q


def rsqrt_quadratic_mean(x, axis, eps):
    r"""``(q, r)``: the mean of squares :math:`q = \langle x^2\rangle` over ``axis`` (keepdims)
    and :math:`r = (q+\epsilon)^{-1/2}`, in :func:`wide_dtype`, without overflow or underflow
    (see the module docstring). ``q`` itself may be ``inf`` where it exceeds the dtype; ``r``
    is then still right."""
    x = x.astype(wide_dtype(x.dtype), copy=False)
    xs, e = pow2_scale(x, axis)
    qs = np.mean(np.square(xs), axis=axis, keepdims=True)
    r, q = rsqrt_scaled(qs, e, eps)
    return q, r


def geometric_mean(a, axis=0):
    r""":math:`(\prod a)^{1/W}` over ``axis`` (length :math:`W`) of non-negative ``a``, to a
    few ULPs at any magnitude (see the module docstring); a 0 gives 0, an inf gives inf, a
    negative or NaN entry gives NaN, as :math:`\exp(\mathrm{mean}(\log a))` does."""
    n = a.shape[axis]
    m, e = np.frexp(a)
    k, j = np.divmod(e.sum(axis=axis), n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        arg = (np.log(m).sum(axis=axis) + j * np.log(np.asarray(2.0, a.dtype))) / n
        return np.ldexp(np.exp(arg), k)


def check_int(value, name, op, *, minimum=0):
    """``value`` as an int >= ``minimum`` (Python or NumPy integer, or a 0-d integer array);
    a ValueError naming ``name`` otherwise."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) \
            or value < minimum or value >= np.iinfo(np.int64).max:
        raise ValueError(f"{op}: `{name}` must be an int >= {minimum} and < 2**63 - 1, got "
                         f"{value!r}")
    return int(value)


def check_unit(value, name, op, *, allow_none=False):
    """``value`` as a float in [0, 1] (``None`` passes where ``allow_none``)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (numbers.Real, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else float("nan")
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{op}: `{name}` must be a number in [0, 1]"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return v


def check_state(value, name, op, shape):
    """A state array: a floating ndarray of exactly ``shape``."""
    value = check_array(value, name, op)
    if value.shape != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(shape)}, got {value.shape}")
    return value


def channel_sum(a, dtype):
    """Sums over the pooled (token) axes of ``a`` of shape ``(..., C)``, accumulated in
    :func:`wide_dtype` and returned in ``dtype`` (a parameter's gradient keeps its dtype)."""
    return as_tokens(a).astype(wide_dtype(a.dtype), copy=False).sum(axis=0).astype(dtype)

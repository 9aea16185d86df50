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

**The fast form** (:func:`shifted_moments`, used by LayerNorm, BatchNorm and GroupNorm) computes
the same statistics in fewer passes over ``x``-sized arrays, which is what their cost is made of:

* the sums are BLAS matrix-vector products (``a @ ones`` for row sums, one dot product per row
  for sums of squares): one pass each, and no temporary such as ``np.square(d)``;
* :math:`x_c = d - c` is not formed. The variance comes from :math:`d` alone,
  :math:`\langle (d-c)^2\rangle = \langle d^2\rangle - c^2`, which does **not** cancel like
  :math:`E[x^2]-E[x]^2`: :math:`c` is the rounding error of :math:`m_0`, so :math:`c^2` is many
  orders of magnitude below :math:`\langle d^2\rangle` unless the group's spread is itself of
  the order of an ULP of its mean (a constant group gives 0 - 0). The callers keep :math:`m_0`
  (``shift``) and :math:`c` apart, as :math:`\hat x = (d - c)\,r`: LayerNorm subtracts
  :math:`c` in one pass over its output, BatchNorm and GroupNorm fold it into their
  per-channel coefficients, and every backward recomputes the exact :math:`d` from ``x``.

The BLAS sums are not pairwise: the error of the sum of squares grows like
:math:`\sqrt{N}\,u` rather than :math:`\log N\,u`. Measured on rows of 4096 standard normals it is
about 1.5 ULP of the variance (0.8 ULP of :math:`r`), against 0.9 for NumPy's pairwise sum; the
4-ULP accuracy of the outputs on rows with mean :math:`10^4` and standard deviation 1 holds
(``docs/notes/performance.rst``).

**Small inputs** (a few thousand elements: tutorials, assignments, gradient checks) cost
microseconds of arithmetic and, unless care is taken, tens of microseconds of Python: each NumPy
call costs about a microsecond whatever its size, a reduction or a context manager
(``np.errstate``, a buffer-size change) one to five. The helpers here keep the checks and the
arithmetic of every call exactly as they are (bit for bit), and make their fixed cost small:

* validation is O(1) Python operations on the common types (a plain ndarray, an int or a tuple
  of ints, a float), falling back to the general checks, with their messages, for anything else;
* facts of a dtype (its accumulation dtype, the limits of :func:`needs_rescaling`,
  :func:`extreme_groups` and :func:`out_of_range`, :func:`wider_dtype`) and the vectors of
  ones of :func:`row_sums` are computed once per dtype and length, not per call;
* reductions over an axis of length one (LayerNorm's single block of rows in
  :func:`shifted_moments`) are not made: the sum of one number is that number; row sums and
  row dot products over rows of one element (BatchNorm and GroupNorm on (N, C) input) are the
  term plus +0, which is what BLAS returns for them, bit for bit, without a matrix product
  over a thousand rows of length one;
* the rare-regime tests (:func:`needs_rescaling`, :func:`extreme_groups`,
  :func:`inexact_products`) first ask whether *no* group can be flagged, with a minimum and a
  maximum over all groups (three NumPy calls, no temporary per test); a NaN makes that answer
  "maybe", and the exact elementwise test then runs as before, so nothing is flagged
  differently. For the standardized groups (:func:`row_moments`, :func:`shifted_moments`) both
  :func:`needs_rescaling` and :func:`extreme_groups` are decided by the two extremes of the
  variances alone (:func:`variance_span`: rounding is monotonic, so the extremes of
  :math:`r = 1/\sqrt{\sigma^2 + \epsilon}` are those of the extreme variances);
* a context is entered once per call, not again in the helpers it calls:
  :func:`row_moments` and :func:`shifted_moments` run under their caller's ``np.errstate``;
* :func:`row_broadcasting` changes the ufunc buffer size only for arrays above
  :data:`SMALL_SIZE` elements: below it, the change costs more than it saves.

**The reliability helpers** (``docs/notes/reliability.rst``; every variant uses the same ones):

* *The whole floating range* (subnormal inputs with ``eps = 0``, values near the largest
  finite number). Per group, for variants that standardize groups (rows, groups, instances):
  compute as usual, then ``extreme_groups(var, rstd)`` gives the groups the dtype cannot do
  right; recompute them with the same public forward on ``rows[idx].astype(wider_dtype(dtype))``
  (parameters through ``widen``), assign the results back (rounded once, under
  ``np.errstate(over="ignore", under="ignore")``), keep ``(idx, sub_cache)`` in a ``wide`` field
  of the cache, and in the backward do the other groups as usual and those with the sub-cache.
  Per call, for the others: after validation, ``if wider_dtype(x.dtype) is not None and
  out_of_range(x, ...)``, run the whole forward on the widened inputs and return
  ``narrow(y, x.dtype)`` (and the state narrowed) with ``WideCache(cache, grad_dtypes, wider)``;
  the backward starts with ``if isinstance(cache, WideCache): return
  cache.narrow(backward(dy.astype(cache.wide_dtype), cache.inner))``. ``native_precision()``
  switches both off (the oracle's emulation of a low-precision kernel).
* *Size-0 axes*: return PyTorch's result, an empty output (``np.empty(x.shape, x.dtype)``) and
  zero parameter gradients, before any reduction (a mean over zero elements warns and is NaN),
  or raise the documented ``ValueError`` naming the argument. Reshape with explicit leading
  sizes (``x.reshape(rows, n)``), never ``x.size // n``, which is 0 for ``n = 0``.
* *No warning escapes*: an input with NaN or inf gives NaN or inf by design; wrap the
  arithmetic that meets them in ``np.errstate(invalid="ignore", over="ignore")`` (as the
  variants do around their statistics and backwards), never a global filter.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import math
import numbers
import os
import threading
from typing import NamedTuple

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


def row_sums(a, weights=None):
    """Sums over the last axis of ``a``, weighted by the vector ``weights`` if given: one BLAS
    matrix-vector product (``a @ ones``), one pass over ``a`` without a temporary, and faster
    than ``a.sum(axis=-1)``. ``row_sums(a.T, w)`` sums over the first axis instead.

    float16 is summed in float32, as ``np.sum`` does (a float16 sum of many terms overflows),
    and the result is left in that dtype; float32, float64 and longdouble keep theirs.
    """
    acc = accumulation_dtype(a.dtype)
    w = _ones(a.shape[-1], acc) if weights is None else weights.astype(acc, copy=False)
    a = a.astype(acc, copy=False)
    if a.shape[-1] == 1:  # rows of one element (BatchNorm1d's (N, C, 1)): see _single_terms
        return _single_terms(a[..., 0] * w[0] if weights is not None else a[..., 0])
    return a @ w


def _single_terms(terms):
    """Sums of one term each, as BLAS forms them (from +0: a -0 term gives +0), bit for bit,
    at a fifth of the cost of a matrix product over rows of length one (measured: 1 against
    5 microseconds on (16, 64, 1), the rows of BatchNorm and GroupNorm on (N, C) input)."""
    return terms + terms.dtype.type(0)


@functools.lru_cache(maxsize=64)
def _ones_cached(n, dtype):
    ones = np.ones(n, dtype)
    ones.flags.writeable = False  # shared between calls
    return ones


def _ones(n, dtype):
    """``np.ones(n, dtype)``, made once per length and dtype for lengths up to
    :data:`SMALL_SIZE` (read-only)."""
    return _ones_cached(n, dtype) if n <= SMALL_SIZE else np.ones(n, dtype)


def row_dots(a, b):
    """``sum(a * b, axis=-1)`` as one BLAS dot product per row, without the temporary ``a * b``:
    ``np.vecdot`` (NumPy 2), or for NumPy 1.x the same dot products as a stack of
    (1, N) @ (N, 1) matrix products (bit-identical to ``np.vecdot``: both call the BLAS dot per
    row; ``np.vecdot`` costs half as much per row on small inputs). float16 is summed in
    float32, as in :func:`row_sums`."""
    acc = accumulation_dtype(a.dtype)
    a, b = a.astype(acc, copy=False), b.astype(acc, copy=False)
    if a.shape[-1] == 1:  # rows of one element
        return _single_terms(a[..., 0] * b[..., 0])
    if _vecdot is not None:
        return _vecdot(a, b)
    return (a[..., None, :] @ b[..., :, None])[..., 0, 0]


_vecdot = getattr(np, "vecdot", None)  # NumPy >= 2.0


def _sum_first(s):
    """``s.sum(axis=0)``; without a reduction when axis 0 has length one (the same numbers)."""
    return s[0] if s.shape[0] == 1 else s.sum(axis=0)


def shifted_moments(x3, out, eps):
    r"""Statistics of ``x3``, of shape :math:`(A, K, L)`, for each :math:`k` over axes 0 and 2.

    The fast form of :func:`moments` (see the module docstring). Writes :math:`d = x - m_0` into
    ``out`` (an array of ``x3``'s shape and dtype; it may be the caller's output buffer) and
    returns ``(shift, c, var, rstd, span)``: each of shape :math:`(K, 1)`, :math:`m_0` (the
    rounded mean), :math:`c = \langle d\rangle` (:math:`m_0`'s rounding error, so that the mean
    is :math:`m_0 + c`, more accurately than any one float), in ``x3``'s dtype, and the biased
    variance :math:`\langle (d-c)^2\rangle` and :math:`r = (\sigma^2+\epsilon)^{-1/2}`
    in the accumulation dtype (:func:`accumulation_dtype`: float32 for float16 input, where
    :math:`r` may exceed the float16 range while :math:`(d - c)\,r` does not). Then
    :math:`x - \mu = d - c`, right to about one ULP; and ``span``, the extremes of ``var`` and
    ``rstd`` for :func:`extreme_groups` (:class:`Span`; None where a group may need rescaling).
    Layouts: BatchNorm ``(N, C, H*W)``, whose passes after the first (:math:`m_0`) go by blocks
    along axis 0 (:func:`by_row_blocks`); LayerNorm's rows ``(1, rows, N)`` and GroupNorm's
    groups ``(1, N*G, M)`` (both called on one block of rows at a time) go through
    :func:`row_moments`, its form for ``A = 1``.

    ``var`` may overflow the dtype (float32 :math:`\sigma \gtrsim 1.8\cdot 10^{19}`; it is then
    ``inf``, the true value rounded) and ``rstd`` is still right: see :func:`rescaled_rstd`.

    Call it under ``np.errstate(over="ignore", invalid="ignore", divide="ignore")``, as the
    callers do around their whole forward (an input with an inf or a NaN gives NaN statistics,
    a constant group with ``eps = 0`` an infinite ``rstd``, and overflowing squares are
    rescaled): the context is theirs, not entered again here (a microsecond per call).
    """
    count = x3.shape[0] * x3.shape[2]
    shift = (_sum_first(row_sums(x3))[:, None] / count).astype(x3.dtype, copy=False)  # m0

    def block(blk):  # d = x - m0 and its row sums, a block along axis 0 (BatchNorm's samples)
        d = np.subtract(x3[blk], shift, out=out[blk])  # exact where x is within a factor 2 of
        return row_sums(d), row_dots(d, d)             # m0 (Sterbenz)

    sum_d, sum_dd = joined(by_row_blocks(block, x3.shape[0], x3.nbytes // max(1, x3.shape[0]),
                                         x3.shape[2], live=2))
    return _moments(out, shift, _sum_first(sum_d)[:, None], _sum_first(sum_dd)[:, None],
                    count, eps)


def row_moments(rows, out, eps):
    """:func:`shifted_moments` of ``rows`` of shape (K, L), each over its L elements: the
    layout ``(1, K, L)`` of LayerNorm's rows and GroupNorm's groups, without the blocks and
    the sums over axis 0 that only BatchNorm's layout needs (the same numbers)."""
    count = rows.shape[1]
    shift = (row_sums(rows)[:, None] / count).astype(rows.dtype, copy=False)  # m0
    d = np.subtract(rows, shift, out=out)  # exact where x is within a factor 2 of m0
    return _moments(out[None], shift, row_sums(d)[:, None], row_dots(d, d)[:, None], count,
                    eps)


def _moments(d, shift, sum_d, sum_dd, count, eps):
    """The end of :func:`shifted_moments`: ``(shift, c, var, rstd, span)`` from ``d`` (the
    (A, K, L) differences :math:`x - m_0`) and its sums per group, ``sum_d`` and ``sum_dd``
    of shape (K, 1)."""
    c = sum_d / count
    # <(d - c)^2> = <d^2> - c^2, without cancellation: c^2 is tiny next to <d^2>
    var = sum_dd / count - c * c
    var = np.maximum(var, 0.0)  # rounding must not make a zero variance negative
    rstd = 1.0 / np.sqrt(var + eps)
    span = variance_span(var, eps)  # None: some group may need rescaling
    if span is None and (bad := needs_rescaling(var, eps)).any():
        rows = np.flatnonzero(bad)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            rvar, rr = rescaled_rstd(d[:, rows, :], c[rows, 0],
                                     eps if np.ndim(eps) == 0 else np.ravel(eps)[rows],
                                     axes=(0, 2))
            var[rows, 0], rstd[rows, 0] = rvar, rr
    return shift, c.astype(d.dtype, copy=False), var, rstd, span


class Span(NamedTuple):
    """The extremes of a set of groups' variances and of their ``rstd``: what
    :func:`extreme_groups` and :func:`needs_rescaling` test, known without a reduction over
    ``rstd`` (:func:`variance_span`)."""
    var_min: np.floating
    rstd_min: np.floating
    rstd_max: np.floating


def variance_span(var, eps):
    r"""The :class:`Span` of ``var`` and of :math:`r = 1/\sqrt{\mathrm{var} + \epsilon}`
    (computed elementwise in ``var``'s dtype, ``eps`` a float), from two reductions over
    ``var``; None where :func:`needs_rescaling` may flag a group (a NaN, an overflowed or a
    tiny variance: the caller then runs it, and rescales) or ``eps`` is not a float.

    Exact, not a bound: rounding is monotonic, so :math:`v \mapsto 1/\sqrt{v + \epsilon}`
    computed in floating point is non-increasing, the largest :math:`r` is that of the smallest
    variance and the smallest that of the largest, computed here with the same operations in
    the same dtype (the ``eps`` rounded to it, as an array operation rounds a Python float).
    For the same reason :math:`\min(\mathrm{var} + \epsilon)` is ``var_min + eps``, so the
    test of :func:`needs_rescaling` is decided from these two numbers too."""
    if not var.size or type(eps) is not float:
        return None
    t = var.dtype.type
    low, high = np.minimum.reduce(var, axis=None), np.maximum.reduce(var, axis=None)
    low_eps = low + t(eps)
    if not (low_eps >= _rescaling_limit(var.dtype) and high < np.inf):  # NaN: False
        return None
    return Span(low, t(1) / np.sqrt(high + t(eps)), t(1) / np.sqrt(low_eps))


def joined_spans(spans):
    """The :class:`Span` of the union of groups whose spans (or None) are ``spans``."""
    if any(s is None for s in spans):
        return None
    return Span(min(s.var_min for s in spans), min(s.rstd_min for s in spans),
                max(s.rstd_max for s in spans))


@functools.lru_cache(maxsize=None)
def accumulation_dtype(dtype):
    """The dtype the statistics are computed and kept in: float16 is promoted to float32."""
    return np.promote_types(dtype, np.float32)


@functools.lru_cache(maxsize=None)
def _rescaling_limit(dtype):
    """The bound of :func:`needs_rescaling` for ``dtype``."""
    info = np.finfo(dtype)
    return float(info.smallest_normal) * 2.0 ** (info.nmant + 2)


def needs_rescaling(var, eps):
    r"""Where the variance (or the mean square) ``var``, computed in the accumulation dtype from
    the squares of ``d``, cannot be trusted: it is not finite (the squares overflowed), or
    ``var + eps`` is below :math:`2^{p+2}` times the smallest normal number, :math:`p` the
    number of mantissa bits (float32: 4e-31; float64: 4e-292), where the squares may have
    underflowed or be subnormal and inexact. With ``eps`` of any usual size (1e-5) the second
    never holds; it flags the tiny groups only with ``eps = 0`` or an ``eps`` as tiny. A group
    with ``d`` zero or non-finite is flagged too and then left as it is by
    :func:`rescaled_rstd`. Cheap: one comparison per group."""
    if _trusted(var, eps):
        return _no_flags(var.size)  # the common case: none flagged, in three NumPy calls
    with np.errstate(invalid="ignore"):
        return ~((var + eps >= _rescaling_limit(var.dtype)) & (var < np.inf)).ravel()


def _trusted(var, eps):
    """Whether :func:`needs_rescaling` flags none of ``var`` (False: it may flag some), for any
    ``eps`` (a float or an array per group; :func:`variance_span` decides the same for a float
    from the two extremes it also returns)."""
    return bool(var.size) and _at_least(var + eps, _rescaling_limit(var.dtype)) \
        and _below(var, np.inf)


def _at_least(a, low):
    """Whether every element of the non-empty ``a`` is >= ``low``: False where one is NaN (a
    NaN minimum compares false), so that the caller then runs its elementwise test."""
    return bool(np.minimum.reduce(a, axis=None) >= low)


def _below(a, high):
    """Whether every element of the non-empty ``a`` is < ``high``; False with a NaN."""
    return bool(np.maximum.reduce(a, axis=None) < high)


_NO_GROUPS = np.empty(0, np.intp)  # extreme_groups' answer when there are none (read-only)
_NO_GROUPS.flags.writeable = False


@functools.lru_cache(maxsize=64)
def _no_flags_cached(n):
    flags = np.zeros(n, bool)
    flags.flags.writeable = False
    return flags


def _no_flags(n):
    """``np.zeros(n, bool)``, shared (read-only) for ``n`` up to :data:`SMALL_SIZE`."""
    return _no_flags_cached(n) if n <= SMALL_SIZE else np.zeros(n, bool)


def rescaled_rstd(d, c, eps, axes):
    r"""``(var, rstd)`` of the flagged groups, from :math:`d` scaled by a power of two.

    ``d`` holds the flagged groups along its axis 1 (a copy: they are few), ``c`` their
    corrections (shape ``(F,)``; 0 for RMSNorm's mean square), ``axes`` the reduced axes. With
    :math:`2^e` the power of two at or above :math:`\max|d|` of a group, :math:`d' = d\,2^{-e}`
    is exact (a power of two only moves the exponent) and in :math:`[-1, 1]`, so its squares
    neither overflow nor underflow beyond what rounding allows, and

    .. math::

       \sigma^2 = 2^{2e}\,\sigma'^2,\qquad
       r = 2^{-e}\,(\sigma'^2 + \epsilon\,2^{-2e})^{-1/2} .

    Computed in float64 and returned in float64 (the caller casts): ``var`` may be ``inf`` (its
    true value exceeds the dtype, as it does for float32 above :math:`\sigma \approx
    1.8\cdot 10^{19}`), while ``rstd`` is finite. Groups with :math:`\max|d|` zero or not finite
    get the unscaled formula (a constant group with ``eps = 0`` is undefined; a non-finite input
    gives NaN).
    """
    d = d.astype(np.float64)
    c = np.asarray(c, np.float64)
    shape = [1] * d.ndim
    shape[1] = d.shape[1]
    s = np.max(np.abs(d), axis=axes) if d.size else np.zeros(d.shape[1])
    ok = np.isfinite(s) & (s > 0)
    e = np.where(ok, np.frexp(np.where(ok, s, 1.0))[1], 0)
    ds = np.ldexp(d, -e.reshape(shape))
    cs = np.ldexp(c, -e)
    var_s = np.mean(np.square(ds - cs.reshape(shape)), axis=axes)
    rstd = np.ldexp(1.0 / np.sqrt(var_s + np.ldexp(eps, -2 * e)), -e)
    return np.ldexp(var_s, 2 * e), rstd


def correction_first(c, scale, product=None):
    r"""Where the mean correction :math:`c` must be subtracted from :math:`d = x - m_0` before
    scaling by ``scale`` (three passes), instead of being folded into a per-group offset
    :math:`-c\,\mathrm{scale}` (two passes): where :math:`|c\,\mathrm{scale}| > 1`.

    Both compute :math:`(d - c)\,\mathrm{scale}`. Folding rounds :math:`c\,\mathrm{scale}` to an
    ULP of its own size, which is below an ULP of the result where it is at most 1; on a group
    that is constant up to rounding (:math:`d - c = 0` exactly, while :math:`c` times
    :math:`r = \epsilon^{-1/2}` is large) it would leave the result off by that rounding. Decided
    per row, channel or group, so that one group's result never depends on another's (a NaN
    compares false and is folded). The one rule of the LN, BN and GN forwards and backwards.

    Returns the bool mask of those groups, or None where there is none (the common case: one
    reduction, no mask to test; ``np.fmax`` skips NaN, which is never flagged). ``product``:
    ``c * scale``, where the caller has computed it already."""
    m = np.abs(c * scale if product is None else product)
    if not m.size or not np.fmax.reduce(m, axis=None) > 1.0:
        return None
    return m > 1.0


def inexact_products(a, b, ab):
    r"""Where the product ``ab`` (``a * b`` as computed, same shape) of finite factors lost
    accuracy: it overflowed, or underflowed (it is subnormal, or 0 while neither factor is 0);
    then ``(z a) b`` is the accurate form of ``z (a b)``. A bool array of ``ab``'s shape, or
    None when no product can be flagged (the common case, decided in three NumPy calls)."""
    tiny = _smallest_normal(ab.dtype)
    m = np.abs(ab)
    if m.size and _at_least(m, tiny) and _below(m, np.inf):
        return None
    return ~((m >= tiny) & (m < np.inf) | (ab == 0) & ((a == 0) | (b == 0))) \
        & np.isfinite(a) & np.isfinite(b)


@functools.lru_cache(maxsize=None)
def _smallest_normal(dtype):
    return np.finfo(dtype).smallest_normal


def saved_mean(cache):
    """The mean :math:`m_0 + c` of a cache that keeps ``shift`` and ``correction`` apart
    (:func:`shifted_moments`), rounded to one float: for the oracle's saved statistics."""
    return cache.shift + cache.correction


def saved_xhat(cache):
    r""":math:`\hat x = (x - m_0 - c)\,r` of a cache holding ``x``, ``shift``, ``correction`` and
    ``rstd`` in shapes that broadcast against ``x``: recomputed on access, not stored."""
    with np.errstate(invalid="ignore", over="ignore"):
        xhat = (cache.x - cache.shift - cache.correction) * cache.rstd
    return xhat.astype(cache.x.dtype, copy=False)


# ------------------------------------------------------------------------------------------
# The whole floating range: groups done again in a wider dtype
# ------------------------------------------------------------------------------------------
def extreme_groups(var, rstd, dtype=None, span=None):
    r"""Flat indices of the groups that the dtype's own arithmetic cannot do right, from the
    statistics already computed (one comparison per group: free for ordinary inputs):

    * ``var`` below the smallest normal number of its (accumulation) dtype, or, with ``dtype``
      (``x``'s), below :math:`(8 t)^2`, :math:`t` its smallest normal number (float16:
      :math:`2.4\cdot 10^{-7}`): the spread of the group is below about :math:`10^{-154}`
      (float64; float32: :math:`10^{-19}`; float16: :math:`5\cdot 10^{-4}`), so that its
      differences :math:`x - \mu` may be subnormal, with few significant bits, and their
      squares underflow (subnormal inputs, e.g. float64 :math:`10^{-310}\,z`, with any
      ``eps``). Constant groups (``var = 0``) are included: their result is the same;
    * ``rstd`` above :math:`2^{e_{max}-p-2}` (float64 about :math:`10^{292}`) or below its
      inverse: :math:`1/\sigma` overflows or is about to (``eps = 0`` and a tiny spread), or
      the values are so large that :math:`x - m_0` may overflow.

    NaN statistics (a non-finite input) are not flagged. The remedy, the same for every
    variant: recompute those groups with the same function in :func:`wider_dtype` (float16,
    float32: float64; float64: ``np.longdouble`` where it is wider, 80-bit on x86), cast the
    results back (they round to the dtype as the exact values do: inf only where the exact
    value exceeds it), keep that sub-cache, and do the groups' backward with it.

    ``span``, the :class:`Span` of ``var`` and ``rstd`` where the caller has it
    (:func:`variance_span`), spares the three reductions that find their extremes."""
    v, r = np.asarray(var), np.asarray(rstd)
    low, hi, inv_hi = _extreme_limits(v.dtype, r.dtype, dtype)
    if span is None and v.size:  # the extremes: three reductions, unless the span is known
        span = Span(np.minimum.reduce(v, axis=None), np.minimum.reduce(r, axis=None),
                    np.maximum.reduce(r, axis=None))
    if span is not None and span.var_min >= low and span.rstd_min >= inv_hi \
            and span.rstd_max <= hi:
        return _NO_GROUPS  # the common case: none (a NaN compares False)
    with np.errstate(invalid="ignore"):
        return np.flatnonzero((v.ravel() < low) | (r.ravel() > hi) | (r.ravel() < inv_hi))


@functools.lru_cache(maxsize=None)
def _extreme_limits(var_dtype, rstd_dtype, dtype):
    """``(low, hi, 1 / hi)`` of :func:`extreme_groups` for these dtypes."""
    info = np.finfo(rstd_dtype)
    hi = float(info.max) * 2.0 ** -(info.nmant + 2)
    low = float(np.finfo(var_dtype).smallest_normal)
    if dtype is not None:  # the differences are in x's dtype: a float16 spread below 5e-4
        low = max(low, (8.0 * float(np.finfo(dtype).smallest_normal)) ** 2)  # is subnormal
    return low, hi, 1.0 / hi


_NATIVE = threading.local()


@contextlib.contextmanager
def native_precision():
    """Within this context :func:`wider_dtype` is None: every variant computes in its inputs'
    own (accumulation) dtype, as a kernel in that format would, even where the result is then
    inaccurate. For the oracle's emulation of a correct low-precision kernel
    (``refnorm.oracle.reference.emulate``), not for users. Per thread."""
    old = getattr(_NATIVE, "on", False)
    _NATIVE.on = True
    try:
        yield
    finally:
        _NATIVE.on = old


def wider_dtype(dtype):
    r"""The dtype that :func:`extreme_groups` are recomputed in: float64 for float16 and float32,
    ``np.longdouble`` for float64 where it has a wider exponent range (x86: 80-bit, up to
    :math:`10^{\pm 4932}`), else None (then those groups keep the dtype's own result)."""
    if getattr(_NATIVE, "on", False):
        return None
    return _wider(np.dtype(dtype))


@functools.lru_cache(maxsize=None)
def _wider(dtype):
    if dtype.itemsize < 8:
        return np.dtype(np.float64)
    if dtype == np.float64 and np.finfo(np.longdouble).maxexp > np.finfo(np.float64).maxexp:
        return np.dtype(np.longdouble)
    return None


def widen(a, dtype, flat=False):
    """``a`` cast to ``dtype`` (flattened with ``flat``), or None for None: a parameter of the
    groups that :func:`extreme_groups` recomputes."""
    if a is None:
        return None
    return (a.reshape(-1) if flat else a).astype(dtype)


class WideCache:
    """The cache of a call that the forward did entirely in :func:`wider_dtype` (because
    :func:`out_of_range`): ``inner`` is that call's cache, ``dtypes`` the dtype of each
    gradient the backward returns (its input's). Attributes not its own are the inner cache's
    (its statistics, in the wider dtype). The backward starts with::

        if isinstance(cache, WideCache):
            return cache.narrow(my_backward(dy.astype(cache.wide_dtype), cache.inner))
    """

    __slots__ = ("inner", "dtypes", "wide_dtype")

    def __init__(self, inner, dtypes, wide_dtype):
        self.inner, self.dtypes, self.wide_dtype = inner, tuple(dtypes), np.dtype(wide_dtype)

    def __getattr__(self, name):
        if name in WideCache.__slots__:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def narrow(self, grads):
        """``grads`` (a NamedTuple of arrays or None) in ``dtypes``, rounded as exact values."""
        return type(grads)(*(None if g is None else narrow(g, dt)
                             for g, dt in zip(grads, self.dtypes)))


def narrow(a, dtype):
    """``a`` cast to ``dtype`` (None stays None), without a warning: a value beyond the dtype
    rounds to inf and a tiny one to a subnormal or 0, as the exact value would."""
    if a is None:
        return None
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        return np.asarray(a).astype(dtype, copy=False)


def out_of_range(*arrays):
    r"""Whether the largest finite magnitude of any of ``arrays`` (None skipped) lies outside
    :math:`[2^{e_{min}/4}, 2^{e_{max}/4}]` of its dtype (float64: about :math:`[10^{-77},
    10^{77}]`; float32: :math:`[3\cdot 10^{-10}, 4\cdot 10^{9}]`), where squares, sums of
    squares and powers may leave the range or become subnormal. All-zero (or non-finite) arrays
    are not out of range. float16 arrays always are: their window would be :math:`[0.09, 16]`,
    with ordinary values on both sides, and a NaN put in place of the one element that decides
    would change the rounding of every other output (the locality of the non-finite contract);
    float16 is computed in float32 or float64 anyway. One pass over each array: for the
    variants that are not per-group (weight reparametrizations, LocalResponseNorm) or whose
    groups span the batch (BatchNorm, InstanceNorm); those then do the whole call in
    :func:`wider_dtype` and return a :class:`WideCache`. (A float32 or float64 call whose
    largest element sits at the edge of the window can still flip when a NaN replaces it.)
    A finite array costs two reductions (its maximum and minimum), no temporary: this check
    runs on every call of those variants, and the masked form (``np.where(np.isfinite(a),
    np.abs(a), 0)``: three temporaries of the array's size) is kept for arrays with a NaN or
    an infinity."""
    arrays = [np.asarray(a) for a in arrays if a is not None]
    for a in arrays:
        if a.dtype == np.float16:
            return True  # always: its range is too narrow for a decision by value (see above)
    for a in arrays:
        if not a.size or a.dtype.kind != "f":
            continue
        # two passes without temporaries, for finite arrays (the ufuncs' own reductions: a
        # microsecond less than a.max() and a.min() on small arrays, the same numbers)
        hi, lo = np.maximum.reduce(a, axis=None), np.minimum.reduce(a, axis=None)
        if math.isfinite(hi) and math.isfinite(lo):  # (a longdouble beyond float: the long way)
            m = max(abs(hi), abs(lo))
        else:  # a NaN or an infinity: the largest finite magnitude, the long way
            m = np.max(np.where(np.isfinite(a), np.abs(a), 0))
        low, high = _range_window(a.dtype)
        if m > 0 and not low <= m <= high:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _range_window(dtype):
    """The window of :func:`out_of_range` for ``dtype``."""
    info = np.finfo(dtype)
    return 2.0 ** (info.minexp / 4), 2.0 ** (info.maxexp / 4)


_L2_FALLBACK = 1 << 20  # bytes: where the cache size cannot be read

MIN_BLOCK_BYTES = 512 << 10
"""The least size of a block of one array (:func:`row_blocks`), in bytes: a block costs about
35 µs of Python (its per-row statistics, its slices), which blocks of a few rows do not
amortize. Measured (``benchmarks/sweep_blocks.py``, ``docs/notes/performance.rst``): on an
Intel Xeon with 2 MiB of L2 the L2-sized blocks (1 MiB forward, 512 KiB backward) were the
best and larger ones slower; on an AMD EPYC with 1 MiB of L2 (512 and 256 KiB) this least
size made LayerNorm's forward+backward 6 to 9% faster (its backward's blocks double). Where
the L2 holds four blocks of this size, as on that Intel machine, nothing changes."""
_cache_size = None


def l2_cache_bytes():
    """The size in bytes of the CPU's per-core cache of level 2 (the largest one private to a
    core, where blocks of rows are kept between passes), read once from Linux's
    ``/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}``; the environment variable
    ``REFNORM_L2_BYTES`` overrides it (for benchmarks), and 1 MiB is assumed where neither
    says (another OS, a container without ``/sys``)."""
    global _cache_size
    if _cache_size is None:
        _cache_size = _read_l2_bytes()
    return _cache_size


def _read_l2_bytes():
    env = os.environ.get("REFNORM_L2_BYTES", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data") and size:
            number, unit = (size[:-1], size[-1]) if size[-1] in units else (size, "")
            if number.isdigit() and int(number) > 0:
                return int(number) * units.get(unit, 1)
    return _L2_FALLBACK


def row_blocks(n_rows, row_bytes, block_bytes=None, *, live=4):
    """Slices that cut ``n_rows`` rows of ``row_bytes`` bytes into blocks (at least one row
    each) for work on independent rows: by default sized so that ``live`` arrays of a block's
    size (the arrays that the passes over a block touch: ``x``, ``dy``, ``dx`` and a temporary
    for the backwards) fill the L2 cache together (:func:`l2_cache_bytes`), but no smaller
    than :data:`MIN_BLOCK_BYTES`; or of about ``block_bytes`` each if given.

    Every NumPy operation is one pass over its arrays; arrays much larger than the CPU cache
    come from main memory on each pass, while a block of rows stays in the cache across all
    the passes made over it. Each block costs a few microseconds of Python per operation, so
    blocks much smaller than the cache are slower too (``docs/notes/performance.rst`` has the
    sweep of block sizes).
    """
    if block_bytes is None:
        block_bytes = max(l2_cache_bytes() // max(1, live), MIN_BLOCK_BYTES)
    step = max(1, block_bytes // max(1, row_bytes))
    return [slice(start, start + step) for start in range(0, n_rows, step)]


def by_row_blocks(body, n_rows, row_bytes, row_length, *, live=4):
    """``[body(blk) for blk in row_blocks(n_rows, row_bytes, live=live)]``, inside one
    :func:`row_broadcasting` context for rows of ``row_length`` elements.

    The one loop of the blocked forwards and backwards (LayerNorm, GroupNorm, BatchNorm,
    InstanceNorm): ``body`` does the variant's math on the rows of one block, writing its
    outputs' slices in place, and returns what the caller combines: per-row statistics
    (concatenated: :func:`joined`) or the block's part of a sum over rows (added up block after
    block: :func:`summed`, so that a parameter gradient is a sum of per-block sums, as accurate
    as a pairwise sum of that depth). Sizing and the NumPy buffer are set once here, not in
    every block; arrays of at most :data:`SMALL_SIZE` float64 elements (that many times 8
    bytes) are one block with the buffer unchanged. With no rows, ``body`` is called once on
    the empty block, so that the results have their shapes."""
    if n_rows * row_bytes <= 8 * SMALL_SIZE:
        return [body(slice(0, n_rows))]
    blocks = row_blocks(n_rows, row_bytes, live=live) or [slice(0, 0)]  # no rows: one empty
    with row_broadcasting(row_length):                                   # block, for the shapes
        return [body(blk) for blk in blocks]


def joined(parts):
    """The per-row results of :func:`by_row_blocks` (a tuple of arrays per block), each field
    concatenated along axis 0: a tuple of arrays; a field of :class:`Span` (or None) gives the
    span of all the rows (:func:`joined_spans`). A single block's results are returned as they
    are (no copy)."""
    if len(parts) == 1:
        return tuple(parts[0])
    return tuple(np.concatenate(field) if isinstance(field[0], np.ndarray)
                 else joined_spans(field) for field in zip(*parts))


def summed(parts):
    """The blocks' parts of sums over rows from :func:`by_row_blocks` (a tuple per block of
    arrays, or None where that sum is not wanted), each field added up block after block: a
    tuple of arrays (or None). The sum starts from +0, as ``sum(parts, zeros)`` does, so that
    a sum of -0 terms is +0 whatever the number of blocks."""
    total = [None if p is None else p + 0.0 for p in parts[0]]  # +0 + part: the same dtype
    for part in parts[1:]:
        total = [None if s is None else s + p for s, p in zip(total, part)]
    return tuple(total)


SMALL_SIZE = 4096
"""Arrays of at most this many elements are "small" (:func:`row_broadcasting`, :func:`row_sums`):
measured with NumPy 2.4 on rows of 64, a buffer-size change costs more than it saves up to
about 64k elements, on rows of 2048 it pays from about 8k."""

_UNCHANGED = contextlib.nullcontext()  # reusable, reentrant: a context that does nothing


def row_broadcasting(row_length, size=None):
    """A context for elementwise operations that broadcast per-row values over rows of
    ``row_length`` contiguous elements, such as ``y *= r`` with ``r`` of shape ``(rows, 1)``;
    ``size``, if given, is the number of elements of the arrays: up to :data:`SMALL_SIZE` the
    context does nothing (changing the buffer size would cost more than it saves).

    A performance detail of NumPy, not of the math: when the rows are shorter than the ufunc
    buffer (``np.getbufsize()``, 8192 elements), the iterator copies the broadcast operand through
    that buffer, refilled for every row, to make longer inner loops; ``y *= r`` then runs 3 to 5
    times slower than ``y *= 2.0`` (measured with NumPy 2.4; NumPy issues gh-13307, gh-17471).
    With a buffer no longer than a row the copy is not made. The buffer size is a per-thread
    setting of NumPy, restored on exit. Reductions are better left outside: they may use the
    buffer.
    """
    if size is not None and size <= SMALL_SIZE:
        return _UNCHANGED
    return _row_buffer(row_length)


@contextlib.contextmanager
def _row_buffer(row_length):
    size = max(16, row_length - row_length % 16)  # NumPy wants a multiple of 16
    old = np.getbufsize()
    if size >= old:
        yield
        return
    np.setbufsize(size)
    try:
        yield
    finally:
        np.setbufsize(old)


def rsqrt(v):
    """``1 / sqrt(v)`` elementwise."""
    return 1.0 / np.sqrt(v)


def trailing_axes(ndim, count):
    """The last ``count`` axes of an ``ndim``-dimensional array, as a tuple."""
    return tuple(range(ndim - count, ndim))


def axis_count(shape, axes):
    """Number of elements reduced over ``axes`` of an array of ``shape``."""
    return math.prod([shape[a] for a in axes])


def check_array(value, name, op, *, ndim_min=0, dtype=None):
    """``value`` as a plain floating ndarray; raise a TypeError/ValueError naming ``name``
    otherwise.

    ndarray subclasses whose arithmetic differs from the plain array's are rejected with a
    TypeError: ``np.matrix`` (``*`` is a matrix product, reductions keep two dimensions) and
    masked arrays (reductions skip the masked elements). Other subclasses (``np.memmap``, a
    trivial subclass) are viewed as plain arrays (``np.asarray``, no copy): the result is the
    plain array's, and a plain array."""
    if type(value) is np.ndarray and value.dtype.kind == "f" and value.ndim >= ndim_min:
        return value  # the common case, in O(1): what the checks below return for it
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{op}: `{name}` must be a numpy.ndarray, got {type(value).__name__}")
    if isinstance(value, (np.matrix, np.ma.MaskedArray)):
        raise TypeError(f"{op}: `{name}` must be a plain numpy.ndarray, got "
                        f"{type(value).__name__}")
    value = np.asarray(value)
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
    value = check_array(value, name, op)
    if value.shape != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(shape)}, got {value.shape}")
    return value


def _finite_float(value):
    """``value`` as a float, or None when it is not finite or beyond the float range (a Python
    int such as 2**1100 raises OverflowError in float(); np.isfinite would raise a TypeError
    for an int beyond int64)."""
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_eps(eps, op, name="eps"):
    """``eps`` as a float, finite and >= 0; else a ValueError naming ``name``."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # the common case, in O(1)
        return eps
    value = _finite_float(eps) if isinstance(eps, (numbers.Real, np.floating)) \
        and not isinstance(eps, (bool, np.bool_)) else None
    if value is None or value < 0:
        raise ValueError(f"{op}: `{name}` must be a finite number >= 0, got {eps!r}")
    return value


def check_normalized_shape(normalized_shape, x, op):
    """``normalized_shape`` (an int or a tuple of ints) as a tuple, checked against ``x``'s
    trailing dimensions; raise a ValueError naming it otherwise."""
    if type(normalized_shape) is int:  # the common cases, in O(1) (per axis) Python steps
        shape = (normalized_shape,)
        if x.ndim and x.shape[-1] == normalized_shape:
            return shape
    elif type(normalized_shape) is tuple and normalized_shape \
            and all(type(n) is int for n in normalized_shape):
        k = len(normalized_shape)
        if k <= x.ndim and x.shape[x.ndim - k:] == normalized_shape:
            return normalized_shape
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) \
        else tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else None
    if not shape or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool)
                            for n in shape):
        raise ValueError(f"{op}: `normalized_shape` must be an int or a non-empty tuple of "
                         f"ints, got {normalized_shape!r}")
    shape = tuple(int(n) for n in shape)
    if len(shape) > x.ndim or x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(f"{op}: `normalized_shape` {shape} must equal the trailing "
                         f"dimensions of `x`, whose shape is {x.shape}")
    return shape


def check_num_groups(num_groups, channels, op, name="num_groups"):
    """``num_groups`` as an int dividing ``channels``; else a TypeError/ValueError naming it."""
    if not isinstance(num_groups, numbers.Integral) or isinstance(num_groups, bool):
        raise TypeError(f"{op}: `{name}` must be an int, got {type(num_groups).__name__}")
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"{op}: `{name}` must be a positive divisor of the number of channels "
                         f"x.shape[1] = {channels}, got {num_groups}")
    return int(num_groups)


def group_view(x, num_groups):
    r"""``x`` of shape :math:`(N, C, *)` as :math:`(N, G, (C/G)\prod *)`: group :math:`g` holds the
    contiguous channels :math:`[gC/G, (g+1)C/G)` and all their spatial positions, so one
    reduction over the last axis gives the per-(sample, group) statistics. A view, no copy,
    when ``x`` is C-contiguous (NumPy copies otherwise)."""
    per_group = x.shape[1] // num_groups * math.prod(x.shape[2:])
    return x.reshape(x.shape[0], num_groups, per_group)


# ----- running statistics (BatchNorm, InstanceNorm) -----
def check_flag(value, name, op):
    """``value`` as a bool; raise a TypeError naming ``name`` for anything else (``1``, "yes")."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: `{name}` must be a bool, got {type(value).__name__}")
    return bool(value)


def check_momentum(momentum, op, *, allow_none=False):
    """``momentum`` as a float (or None where ``allow_none``); raise a ValueError naming it."""
    if momentum is None and allow_none:
        return None
    if type(momentum) is float and -math.inf < momentum < math.inf:  # the common case, O(1)
        return momentum
    value = _finite_float(momentum) if isinstance(momentum, (numbers.Real, np.floating)) \
        and not isinstance(momentum, (bool, np.bool_)) else None
    if value is None:
        expected = "a finite number or None" if allow_none else "a finite number"
        raise ValueError(f"{op}: `momentum` must be {expected}, got {momentum!r}")
    return value


def check_running_stats(running_mean, running_var, op, num_features):
    """Both ``None`` (no running statistics) or both floating arrays of shape ``(num_features,)``;
    returns whether they are given."""
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: `running_mean` and `running_var` must either both be None or "
                         f"neither be None")
    check_param(running_mean, "running_mean", op, (num_features,))
    check_param(running_var, "running_var", op, (num_features,))
    return running_mean is not None


def update_running_stats(running_mean, running_var, mean, var, count, factor):
    r"""New ``(running_mean, running_var)`` after one batch; the inputs are not modified.

    ``mean`` and ``var`` are per-feature batch statistics with the shape of the running ones,
    ``var`` **biased** over ``count`` values. The running variance tracks the **unbiased** one:

    .. math::

       r_\mu \leftarrow (1-f)\,r_\mu + f\,\mu,\qquad
       r_{\sigma^2} \leftarrow (1-f)\,r_{\sigma^2} + f\,\sigma^2\,\frac{m}{m-1},

    with :math:`f` = ``factor`` (PyTorch's ``momentum``: the weight of the **new** value) and
    :math:`m` = ``count`` (> 1). The results keep the dtypes of the running statistics.
    """
    unbiased = var * (count / (count - 1))
    new_mean = (1.0 - factor) * running_mean + factor * mean
    new_var = (1.0 - factor) * running_var + factor * unbiased
    return (new_mean.astype(running_mean.dtype, copy=False),
            new_var.astype(running_var.dtype, copy=False))


# ----- variants built from other variants (IBN-Net, SPADE, Batch Renorm) -----
@contextlib.contextmanager
def errors_as(op, *inner):
    """Re-raise a ValueError/TypeError of the variants ``inner`` (their messages start with
    ``"<inner>: "``) as one of ``op``: a variant that calls another one's forward (IBN-a calls
    InstanceNorm's and BatchNorm's) reports bad input under its own name, as every refnorm
    error does. The message is otherwise unchanged; anything else passes through."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for name in inner:
            if msg.startswith(f"{name}: "):
                raise type(exc)(f"{op}: " + msg[len(name) + 2:]) from None
        raise


def check_fraction(value, name, op):
    """``value`` as a float in [0, 1]; a ValueError naming ``name`` for anything else."""
    number = _finite_float(value) if isinstance(value, (numbers.Real, np.floating)) \
        and not isinstance(value, (bool, np.bool_)) else None
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(f"{op}: `{name}` must be a number in [0, 1], got {value!r}")
    return number


# ----- Euclidean norms (l2_norm, qk_norm's L2 form) -----
def vector_norm(v, axes):
    r""":math:`\lVert v\rVert_2` over ``axes`` (keepdims), in ``v``'s dtype, finite wherever the
    exact norm is: the plain :math:`\sqrt{\sum v^2}`, and, only for the slices whose sum of
    squares overflowed or lost accuracy to underflow (below :math:`\sqrt{\text{tiny}/u}`), the
    same after dividing by the slice's largest magnitude, :math:`m\sqrt{\sum (v/m)^2}`. Empty
    slices have norm 0. (The rule of ``weight_norm``'s slice norm, shared.)"""
    keep = tuple(1 if a in axes else n for a, n in enumerate(v.shape))
    if v.size == 0:
        return np.zeros(keep, v.dtype)
    with np.errstate(over="ignore", under="ignore"):  # detected below and redone scaled
        norm = np.sqrt(np.sum(np.square(v), axis=axes, keepdims=True))
    info = np.finfo(v.dtype)
    safe = (norm >= np.sqrt(info.tiny / info.eps)) & np.isfinite(norm)
    if not safe.all():
        with np.errstate(invalid="ignore", under="ignore"):
            big = np.max(np.abs(v), axis=axes, keepdims=True)
            ok = (big > 0) & np.isfinite(big)
            big = np.where(ok, big, 1).astype(v.dtype)
            scaled = big * np.sqrt(np.sum(np.square(v / big), axis=axes, keepdims=True))
        # an infinite or NaN element: the plain norm (inf or NaN) is the answer
        norm = np.where(safe | ~ok, norm, scaled)
    return norm
# ----- helpers of the small variants (EvoNorm, FRN, WS, BCN, Weight Compander) -----
def work_dtype(*arrays):
    r"""The dtype the small variants compute in: float64, or ``np.longdouble`` when an input
    has it. float16 and float32 inputs are computed in float64 and each result is rounded once
    to its own input's dtype: the most accurate result the output dtype can hold, and the range
    of float64, in which no square of a float32 value overflows or underflows (so no rescaling
    is needed, unlike :func:`shifted_moments`). ``None`` entries are ignored."""
    return np.result_type(np.float64, *[a.dtype for a in arrays if a is not None])


def centered_exact(x, axes):
    r"""``(xc, mean)`` over ``axes`` (keepdims) as :func:`centered`, with one more guarantee: a
    group whose elements are all equal gets :math:`x_c = 0` exactly and its own value as mean.
    The rounded mean of equal values need not equal them (:math:`3 \cdot 0.1 / 3`), and the
    residue, divided by a standard deviation of :math:`\sqrt\epsilon`, would otherwise show in
    the output of a group that has no direction at all."""
    xc, mean = centered(x, axes)
    if x.size:
        with np.errstate(invalid="ignore"):
            first = np.max(x, axis=axes, keepdims=True)
            const = first == np.min(x, axis=axes, keepdims=True)
        if const.any():
            xc = np.where(const, 0.0, xc)
            mean = np.where(const, first, mean)
    return xc, mean


# ----------------------------------------------------------------------------------------------
# Kernel conventions of the LLM norms (RMSNorm, LayerNorm): a weight offset and casting modes
# ----------------------------------------------------------------------------------------------
#: Liger-Kernel's names for where a low-precision kernel rounds (``casting_mode``); ``None`` is
#: refnorm's own behaviour (see :func:`scaled_rows`).
CASTING_MODES = ("llama", "gemma", "none")


def check_casting_mode(casting_mode, op):
    """``casting_mode``: None or one of :data:`CASTING_MODES`; else a ValueError naming it."""
    if casting_mode is not None and (not isinstance(casting_mode, str)
                                     or casting_mode not in CASTING_MODES):
        raise ValueError(f"{op}: `casting_mode` must be None, 'llama', 'gemma' or 'none', got "
                         f"{casting_mode!r}")
    return casting_mode


def check_offset(offset, op):
    """``offset`` (the weight offset, Gemma's 1): a finite real number, as a float. Without a
    weight there is no affine part and the offset has no effect, as in Liger-Kernel
    (``elementwise_affine=False``)."""
    if type(offset) is float and -math.inf < offset < math.inf:  # the common case, in O(1)
        return offset
    value = _finite_float(offset) if isinstance(offset, (numbers.Real, np.floating)) \
        and not isinstance(offset, (bool, np.bool_)) else None
    if value is None:
        raise ValueError(f"{op}: `offset` must be a finite number, got {offset!r}")
    return value


def offset_weight(weight, offset, dtype=None):
    r"""The effective weight :math:`o + \gamma`, formed **first** in ``dtype`` (default: the
    weight's own), or ``weight`` itself when ``offset`` is 0 (or ``weight`` is None).

    Forming the sum first is what keeps the product accurate where :math:`\gamma \approx -o`
    (a zero-centred weight that cancels its offset): by Sterbenz's lemma the sum is then
    **exact** (:math:`\gamma\in[-2o, -o/2]`), and elsewhere it is rounded once, relative to
    itself. Expanding the product instead, :math:`\hat x\gamma + \hat x o`, would cancel
    catastrophically there: each term rounded relative to :math:`|\hat x o|`, not to the
    result."""
    if weight is None or offset == 0:
        return weight if dtype is None or weight is None else weight.astype(dtype, copy=False)
    w = weight if dtype is None else weight.astype(dtype, copy=False)
    return np.add(w, w.dtype.type(offset)) if w.dtype.kind == "f" else w + offset


def scaled_rows(xhat_into, rows, weight, bias, offset, casting_mode, y=None):
    r"""``y = xhat (offset + weight) + bias`` for rows (rows, N), rounded where ``casting_mode``
    says. ``xhat_into(out)`` writes :math:`\hat x` into the buffer ``out`` (computed in the
    statistics' dtype, float32 for float16 rows, and rounded to ``out``'s dtype); ``out`` is
    ``y`` (given, or a new array of the rows' dtype) unless the mode needs a float32 buffer.

    Only float16 rows have a choice (float32 and float64 rows compute in their own dtype in
    every mode, so the modes coincide there):

    * ``None``, ``"llama"`` and ``"none"``: :math:`\hat x` rounded to float16, then multiplied
      by :math:`(o + \gamma)` formed in the weight's dtype, and the bias added, each rounded
      (Liger-Kernel's llama order). ``"none"`` would also hold the statistics in float16; the
      reference does not (its squares overflow float16 beyond :math:`|x| = 256` where the
      result is finite): its statistics stay float32, and the oracle judges a ``"none"``
      candidate by that mode's own rounding points (:mod:`refnorm.oracle.tolerance`).
    * ``"gemma"``: all in float32, :math:`(o + \gamma)` too, rounded once to float16.
    """
    y = np.empty(rows.shape, dtype=rows.dtype) if y is None else y
    gemma = rows.dtype == np.float16 and casting_mode == "gemma"
    t = np.empty(rows.shape, np.float32) if gemma else y
    xhat_into(t)
    with row_broadcasting(rows.shape[1], rows.size):
        if weight is not None:   # same_kind casting: t keeps its dtype
            t *= offset_weight(weight.reshape(-1), offset, np.float32 if gemma else None)
        if bias is not None:
            t += bias.reshape(-1)
    if gemma:
        y[...] = t
    return y

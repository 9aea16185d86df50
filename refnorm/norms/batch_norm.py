r"""Batch Normalization.

Ioffe & Szegedy, *Batch Normalization: Accelerating Deep Network Training by Reducing Internal
Covariate Shift*, arXiv:1502.03167 (2015).

The input has shape :math:`(N, C, *)` (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``,
``(N, C, D, H, W)``). Channel :math:`c` is normalized over the set :math:`S` of all axes but axis
1, which holds :math:`m = N\prod *` values. With **batch statistics** (training):

.. math::

   \mu_c = \langle x\rangle_S,\qquad
   \sigma^2_c = \langle (x-\mu_c)^2\rangle_S,\qquad
   r_c = (\sigma^2_c+\epsilon)^{-1/2},\qquad
   \hat x = (x-\mu_c)\,r_c,\qquad
   y = \gamma_c\,\hat x + \beta_c ,

where :math:`\langle\cdot\rangle_S` is the mean over :math:`S`, ``weight`` is :math:`\gamma`
and ``bias`` is :math:`\beta`. In training the **running statistics** are updated too, with
:math:`f` = ``momentum`` (the weight of the *new* value), or :math:`f = 1/t` where :math:`t` is
``num_batches_tracked`` after it is incremented, when ``momentum`` is None (a cumulative average):

.. math::

   t \leftarrow t + 1,\qquad
   \bar\mu_c \leftarrow (1-f)\,\bar\mu_c + f\,\mu_c,\qquad
   \bar\sigma^2_c \leftarrow (1-f)\,\bar\sigma^2_c + f\,\frac{m}{m-1}\,\sigma^2_c .

The running variance tracks the **unbiased** batch variance; the forward uses the biased one. In
evaluation (``training=False``) with running statistics the layer is a fixed affine map of
:math:`x`: :math:`\hat x = (x-\bar\mu_c)(\bar\sigma^2_c+\epsilon)^{-1/2}`.

Backward (derivation: ``docs/derivations/batch_norm.rst``). With batch statistics,

.. math::

   \mathrm{d}x = \gamma_c\,r_c\,\bigl(\mathrm{d}y - \langle \mathrm{d}y\rangle_S
                 - \hat x\,\langle \mathrm{d}y\odot\hat x\rangle_S\bigr),\qquad
   \mathrm{d}\gamma_c = \textstyle\sum_S \mathrm{d}y\odot\hat x,\qquad
   \mathrm{d}\beta_c = \textstyle\sum_S \mathrm{d}y ,

so the two reductions of :math:`\mathrm{d}x` are :math:`\mathrm{d}\beta/m` and
:math:`\mathrm{d}\gamma/m`, computed once. With running statistics they are constants and
:math:`\mathrm{d}x = \gamma_c\,r_c\,\mathrm{d}y`. An all-ones :math:`\mathrm{d}y` without
affine gives :math:`\mathrm{d}x = 0` exactly in training (:math:`\sum_S \hat x = 0`), which is
why gradient checks must use a random :math:`\mathrm{d}y`.

Conventions, as in ``torch.nn.functional.batch_norm`` and ``torch.nn.BatchNorm{1,2,3}d``: biased
variance in the forward, unbiased in the running variance, ``eps`` inside the square root,
``eps = 1e-5``, ``momentum = 0.1``. TensorFlow/Keras call the weight of the *old* value
``momentum``/``decay``: PyTorch 0.1 is their 0.9.

**State is explicit.** The running statistics are arguments and the updated ones are returned
in a :class:`BatchNormState`, never written in place. ``num_batches_tracked`` (a keyword, default
0) is the counter of ``nn.BatchNorm``; it matters only for ``momentum=None``. The options of the
module map to arguments:

* ``track_running_stats=False``: pass ``running_mean=running_var=None``; batch statistics are
  then used in evaluation too, as the module does (``F.batch_norm`` itself raises there);
* ``affine=False``: pass ``weight=bias=None``.

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, ``dweight`` that of ``weight`` and
``dbias`` that of ``bias``, also when they differ (PyTorch raises on mixed dtypes); float16
statistics (and ``rstd``) are computed and kept in float32. Overflowing or underflowing squares
(float32 :math:`\sigma \gtrsim 1.8\cdot 10^{19}`; ``eps = 0`` with :math:`\sigma \lesssim
10^{-19}`) are detected per group and those groups recomputed from :math:`d/2^e`
(:func:`refnorm.norms._stats.rescaled_rstd`).

Paper vs code. The paper's inference (Algorithm 2) uses population statistics averaged over
training mini-batches, :math:`E[x] = E_B[\mu_B]` and :math:`\mathrm{Var}[x] =
\frac{m}{m-1}E_B[\sigma^2_B]`; ``momentum=None`` computes exactly that over equally sized batches.
The exponential moving average with ``momentum`` is the implementations' convention.

PyTorch details reproduced: one value per channel in training raises "Expected more than 1 value
per channel when training"; PyTorch 2.x requires ``eps > 0`` whenever batch statistics are used.
PyTorch's CPU kernel computes :math:`y = x\,\gamma r + (\beta - \mu\gamma r)`, which cancels on
channels with a large mean; refnorm computes :math:`(x-\mu)\,r\,\gamma + \beta` from two-pass
statistics (:mod:`refnorm.norms._stats`) and is the more accurate there.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (axis_count, by_row_blocks, check_array, check_eps, check_flag,
                                  check_momentum, check_param, check_running_stats,
                                  correction_first, joined, row_broadcasting, row_dots, row_sums,
                                  rsqrt, saved_mean, saved_xhat, shifted_moments,
                                  update_running_stats, WideCache, narrow, out_of_range,
                                  wider_dtype, widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "batch_norm"


class BatchNormState(NamedTuple):
    running_mean: np.ndarray | None    # \bar\mu, shape (C,), or None when not tracked
    running_var: np.ndarray | None     # \bar\sigma^2 (unbiased), shape (C,), or None
    num_batches_tracked: np.ndarray    # t, an int64 0-d array


class BatchNormCache(NamedTuple):
    x: np.ndarray                   # the input, not a copy (like PyTorch's saved tensors):
    #                                 it must not be modified before the backward
    shift: np.ndarray               # m0, the rounded batch mean (or the running mean),
    correction: np.ndarray          # c = <x - m0> (0 with running statistics): mean = m0 + c,
    rstd: np.ndarray                # and the r used: all three per channel, shape (1, C, 1, ...)
    weight: np.ndarray | None       # \gamma, or None
    has_bias: bool
    axes: tuple[int, ...]           # S: every axis but 1
    batch_stats: bool               # whether \mu and r depend on x (training, or no running stats)
    bias_dtype: np.dtype | None = None  # \beta's dtype (dbias gets it), None without bias

    mean = property(saved_mean)   # m0 + c, rounded to one float
    xhat = property(saved_xhat)   # recomputed from x on access, not stored


class BatchNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _channel_axes(ndim):
    """S: every axis but the channel axis 1."""
    return (0,) + tuple(range(2, ndim))


def _channel_shape(x):
    """``(1, C, 1, ...)``: a per-channel vector broadcast against ``x``."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


_INT64_MAX = int(np.iinfo(np.int64).max)


def _check_num_batches_tracked(value):
    if type(value) is int and 0 <= value < _INT64_MAX:  # the common case, in O(1)
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0 \
            or value >= _INT64_MAX:  # it is incremented and kept as an int64
        raise ValueError(f"{_OP}: `num_batches_tracked` must be an int >= 0 and < 2**63 - 1, "
                         f"got {value!r}")
    return int(value)


def batch_norm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, num_batches_tracked=0):
    r"""Batch normalization over every axis but 1; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
    running_mean, running_var : ndarray of shape (C,), or None
        :math:`\bar\mu` and :math:`\bar\sigma^2` (unbiased). Both None: no running statistics,
        and batch statistics are used in evaluation too. Never modified.
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma` and :math:`\beta`. ``None`` means 1 and 0.
    training : bool, default False
        Batch statistics, and an update of the running ones; else the running statistics.
    momentum : float or None, default 0.1
        Weight of the new value in the running averages; None: cumulative average
        (:math:`f = 1/t`).
    eps : float, default 1e-5
        Added to the variance inside the square root; must be > 0 where batch statistics are
        used.
    num_batches_tracked : int, keyword-only, default 0
        The counter :math:`t` before this call; incremented when the running statistics are
        updated.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : BatchNormState
        Updated copies of the running statistics when they were updated, else the given arrays.
    cache : BatchNormCache
    """
    x = check_array(x, "x", _OP, ndim_min=2)
    channels = x.shape[1]
    tracking = check_running_stats(running_mean, running_var, _OP, channels)
    weight = check_param(weight, "weight", _OP, (channels,))
    bias = check_param(bias, "bias", _OP, (channels,))
    training = check_flag(training, "training", _OP)
    momentum = check_momentum(momentum, _OP, allow_none=True)
    eps = check_eps(eps, _OP)
    t = _check_num_batches_tracked(num_batches_tracked)
    wider = wider_dtype(x.dtype)
    if wider is not None and out_of_range(x):  # tiny or huge: the whole call, wider
        y, state, cache = batch_norm_forward(
            x.astype(wider), widen(running_mean, wider), widen(running_var, wider),
            widen(weight, wider), widen(bias, wider), training, momentum, eps,
            num_batches_tracked=num_batches_tracked)
        if tracking:
            state = state._replace(running_mean=narrow(state.running_mean, running_mean.dtype),
                                   running_var=narrow(state.running_var, running_var.dtype))
        return narrow(y, x.dtype), state, WideCache(
            cache, [None if a is None else a.dtype for a in (x, weight, bias)], wider)
    axes = _channel_axes(x.ndim)
    shape = _channel_shape(x)
    batch_stats = training or not tracking
    x3 = _ncl(x)  # (N, C, L): a view when x is contiguous
    spatial = x3.shape[2]
    y = np.empty(x3.shape, dtype=x.dtype)
    if batch_stats:
        m = axis_count(x.shape, axes)
        if m <= 1:
            raise ValueError(f"{_OP}: Expected more than 1 value per channel when training, got "
                             f"`x` of shape {x.shape}")
        if eps <= 0:
            raise ValueError(f"{_OP}: `eps` must be > 0 when batch statistics are used "
                             f"(training, or no running statistics), got {eps!r}")
        # y holds d = x - m0 for now; rstd in the accumulation dtype (float32 for float16)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # its own
            shift, c, var, rstd, _ = shifted_moments(x3, out=y, eps=eps)
    else:
        shift = running_mean.reshape(-1, 1).astype(x.dtype, copy=False)
        c = np.zeros_like(shift)
        rstd = rsqrt(running_var.reshape(-1, 1) + eps).astype(x.dtype, copy=False)
        with row_broadcasting(spatial, x.size):
            np.subtract(x3, shift, out=y)
    if training and tracking:
        t += 1
        f = 1.0 / t if momentum is None else momentum
        new_mean, new_var = update_running_stats(running_mean, running_var, (shift + c).ravel(),
                                                 var.ravel(), m, f)  # var: accumulation dtype
        state = BatchNormState(new_mean, new_var, np.asarray(t, dtype=np.int64))
    else:
        state = BatchNormState(running_mean, running_var, np.asarray(t, dtype=np.int64))
    # in y's own buffer, which holds d = x - m0 (or x - running mean)
    with row_broadcasting(spatial, x.size):
        if batch_stats:
            # y = (d - c) r gamma + beta, with per channel a = r gamma: folded into two passes,
            # y = d a + (beta - c a), where c a is small (|c a| <= 1 on every channel: the
            # rounding of beta - c a is then below an ULP of y's magnitude), else in three,
            # subtracting c first. Folding where c a is large (a constant channel at 1e11 in
            # float32: c is half an ULP of the mean, times r = 1/sqrt(eps)) would leave y off
            # beta by the rounding of c a, although d - c is exactly 0 there.
            # Per channel, so that a channel's y does not depend on the others' (NaN: folded).
            a = rstd * weight.reshape(-1, 1) if weight is not None else rstd
            ca = c * a
            unfold = correction_first(c, a, ca)  # None: no such channel
            c_first = None
            if unfold is not None:
                c_first = np.where(unfold, c, 0)  # 0: subtracting it changes nothing
                ca = np.where(unfold, 0, ca)
            offset = bias.reshape(-1, 1) - ca if bias is not None else -ca

            def affine(blk):  # a block of samples at a time, in the cache
                if c_first is not None:
                    y[blk] -= c_first
                y[blk] *= a
                y[blk] += offset

            by_row_blocks(affine, x3.shape[0], y.nbytes // max(1, x3.shape[0]), spatial,
                          live=2)
        else:  # ((x - running mean) r) gamma + beta, rounded as InstanceNorm rounds it
            y *= rstd
            if weight is not None:
                y *= weight.reshape(-1, 1)
            if bias is not None:
                y += bias.reshape(-1, 1)
    cache = BatchNormCache(x, shift.reshape(shape), c.reshape(shape), rstd.reshape(shape), weight,
                           bias is not None, axes, batch_stats,
                           None if bias is None else bias.dtype)
    return y.reshape(x.shape), state, cache


def batch_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`batch_norm_forward`: ``(dy, cache) -> BatchNormGrads``.

    :math:`\hat x` is not stored: with :math:`d = x - m_0` (recomputed, exact) and
    :math:`\hat x = (d - c)\,r`, the per-channel sums are
    :math:`\sum_S \mathrm{d}y\,\hat x = r\,(\sum_S \mathrm{d}y\,d - c\sum_S \mathrm{d}y)`, and
    with :math:`a = \gamma r` and :math:`k = r\,\langle \mathrm{d}y\,\hat x\rangle`

    .. math::

       \mathrm{d}x = a\,\bigl(\mathrm{d}y - d\,k - (\langle \mathrm{d}y\rangle - c\,k)\bigr):

    four passes with per-channel coefficients, in :math:`d`'s buffer, the only array of the
    size of ``x`` that is allocated. The sums are BLAS dot products over each (sample,
    channel) row, so no array is formed for them either. Both phases (the sums, then
    :math:`\mathrm{d}x`) go a block of samples at a time
    (:func:`~refnorm.norms._stats.by_row_blocks`), so that their passes find the block in the
    cache.
    """
    if isinstance(cache, WideCache):
        return cache.narrow(batch_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    x, shift, c, rstd, weight, has_bias, axes, batch_stats = cache[:8]
    x3, dy3 = _ncl(x), _ncl(dy)
    n, spatial = x3.shape[0], x3.shape[2]
    shift, c, r = shift.reshape(-1, 1), c.reshape(-1, 1), rstd.reshape(-1, 1)
    a = r * weight.reshape(-1, 1) if weight is not None else r
    dx = np.empty(x3.shape, dtype=x.dtype)
    sample = (n, x3.nbytes // max(1, n), spatial)  # blocks of samples, for by_row_blocks

    def sums(blk):  # per (sample, channel): sum dy and sum dy d, d = x - m0 again (exact, as
        d = np.subtract(x3[blk], shift, out=dx[blk])  # in the forward) in dx's buffer
        return row_sums(dy3[blk]), row_dots(dy3[blk], d)

    sum_dyx = None
    if batch_stats or weight is not None:  # sum_S dy xhat = r (sum_S dy d - c sum_S dy)
        parts = by_row_blocks(sums, *sample)
        sum_dy, sum_dyd = (p.sum(axis=0)[:, None] for p in joined(parts))
        sum_dyx = r * (sum_dyd - c * sum_dy)
    else:
        sum_dy = row_sums(dy3).sum(axis=0)[:, None]  # per channel; (sample, channel) rows first
    if batch_stats:
        # dx = a (dy - <dy> - xhat <dy xhat>) = a (dy - d k - (<dy> - c k)), in d's buffer
        k = r * sum_dyx / (n * spatial)  # r <dy xhat>
        # where |c r| > 1 (a channel constant up to rounding) d k - c k would cancel
        # catastrophically (or overflow): subtract c from d first, in one more pass
        centre = correction_first(c, r)  # None: no such channel
        c_first = None if centre is None else np.where(centre, c, 0)
        offset = sum_dy / (n * spatial) - (c if centre is None else np.where(centre, 0, c)) * k

        def finish(blk):
            d = dx[blk]
            if c_first is not None:
                d -= c_first
            d *= -k
            d += dy3[blk]
            d -= offset
            d *= a

        by_row_blocks(finish, *sample)
    else:  # the statistics are constants: dx = a dy
        with row_broadcasting(spatial, x.size):
            np.multiply(dy3, a, out=dx)
    dweight = sum_dyx.ravel().astype(weight.dtype, copy=False) if weight is not None else None
    dbias = sum_dy.ravel().astype(cache.bias_dtype or dy.dtype, copy=False) if has_bias \
        else None
    return BatchNormGrads(dx.reshape(dy.shape), dweight, dbias)


def _ncl(a):
    """``a`` of shape (N, C, *) as (N, C, L), L the product of the spatial axes."""
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


batch_norm = custom_vjp(batch_norm_forward, batch_norm_backward, ("x", "weight", "bias"),
                        stateful=True)
batch_norm.__doc__ = """Differentiable batch normalization (engine op): returns ``(y, new_state)``;
see :func:`batch_norm_forward`."""


def batch_norm_composite(x, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5, *, num_batches_tracked=0):
    """The same math with engine primitives only: the engine derives its own gradient.

    The new state is computed independently too (unbiased variance by ``ag.var(correction=1)``,
    no gradient), so tests can compare it with :func:`batch_norm_forward`'s.
    """
    axes = _channel_axes(x.ndim)
    shape = _channel_shape(x)
    tracking = running_mean is not None
    if training or not tracking:
        xc = x - ag.mean(x, axes, keepdims=True)
        xhat = xc / ag.sqrt(ag.mean(xc * xc, axes, keepdims=True) + eps)
    else:
        xhat = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps)
    y = xhat * ag.reshape(weight, shape) if weight is not None else xhat
    y = y + ag.reshape(bias, shape) if bias is not None else y
    t = int(num_batches_tracked)
    if training and tracking:
        t += 1
        f = 1.0 / t if momentum is None else momentum
        with ag.no_grad():
            mu = ag.mean(x, axes).data
            unbiased = ag.var(x, axes, correction=1).data
        running_mean = f * mu + (1.0 - f) * running_mean
        running_var = f * unbiased + (1.0 - f) * running_var
    return y, BatchNormState(running_mean, running_var, np.asarray(t, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, training=True, running=True, affine=True, bias=True,
          momentum=0.1, eps=1e-5, num_batches_tracked=0, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    running_mean = rng.standard_normal(c) if running else None
    running_var = rng.uniform(0.5, 2.0, c) if running else None
    return SampleInput(name, (x, weight, b), dict(
        running_mean=running_mean, running_var=running_var, training=training,
        momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked))


def sample_inputs(rng):
    yield _case(rng, "(4,3)-1d", (4, 3))
    yield _case(rng, "(3,2,5)-(N,C,L)", (3, 2, 5))
    yield _case(rng, "(2,3,2,3)-2d", (2, 3, 2, 3))
    yield _case(rng, "(1,2,3,4)-N1-spatial", (1, 2, 3, 4))
    yield _case(rng, "(2,2,2,3,2)-3d", (2, 2, 2, 3, 2))
    yield _case(rng, "(5,1,1)-size-1-axes", (5, 1, 1))
    yield _case(rng, "(3,2,4)-eval", (3, 2, 4), training=False)
    yield _case(rng, "(5,3)-1d-eval", (5, 3), training=False)
    yield _case(rng, "(1,3)-eval-one-value-per-channel", (1, 3), training=False)
    yield _case(rng, "(2,2,2,2,2)-3d-eval", (2, 2, 2, 2, 2), training=False)
    yield _case(rng, "(3,2,4)-momentum-None-t3", (3, 2, 4), momentum=None, num_batches_tracked=3)
    yield _case(rng, "(3,2,4)-no-running-stats", (3, 2, 4), running=False)
    yield _case(rng, "(3,2,4)-no-running-stats-eval", (3, 2, 4), running=False, training=False)
    yield _case(rng, "(4,2,3)-no-affine-eps0.1", (4, 2, 3), affine=False, eps=0.1)
    yield _case(rng, "(3,2,4)-weight-only", (3, 2, 4), bias=False)
    yield _case(rng, "(2,3,2)-eval-no-affine", (2, 3, 2), training=False, affine=False)
    constant = rng.standard_normal((3, 2, 4))
    constant[:, 0] = 0.7
    yield _case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant)
    yield _case(rng, "(3,2,4)-mean100", (3, 2, 4), x=100.0 + rng.standard_normal((3, 2, 4)))


def oracle_inputs(rng):
    yield _case(rng, "(16,37,13,11)", (16, 37, 13, 11))
    yield _case(rng, "(65536,3)-long-channels", (65536, 3))
    yield _case(rng, "(1,5,17,19)-N1", (1, 5, 17, 19))
    yield _case(rng, "(3,5,3,7,11)-3d", (3, 5, 3, 7, 11))
    yield _case(rng, "(16,37,9,9)-eval", (16, 37, 9, 9), training=False)
    yield _case(rng, "(33,37)-momentum-None-t9", (33, 37), momentum=None, num_batches_tracked=9)
    yield _case(rng, "(7,5,13)-no-running-stats-no-affine", (7, 5, 13), running=False,
                affine=False)
    yield _case(rng, "(8,5,7,9)-mean1e4-std1e-3", (8, 5, 7, 9),
                x=1e4 + 1e-3 * rng.standard_normal((8, 5, 7, 9)))
    constant = np.broadcast_to(rng.standard_normal((1, 6, 1, 1)), (8, 6, 5, 5)).copy()
    yield _case(rng, "(8,6,5,5)-constant-channels", (8, 6, 5, 5), x=constant)
    yield _case(rng, "(6,7,33)-tiny-scale", (6, 7, 33), x=1e-20 * rng.standard_normal((6, 7, 33)))
    yield _case(rng, "(6,7,33)-huge-scale", (6, 7, 33), x=1e20 * rng.standard_normal((6, 7, 33)))


def error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(3)

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias),
                           {"running_mean": c.copy(), "running_var": c.copy(), **kwargs})

    yield ErrorInput(call("list x", x=[[1.0, 2.0], [3.0, 4.0]]), TypeError,
                     r"batch_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("int x", x=np.ones((2, 3), dtype=int)), TypeError,
                     r"batch_norm: `x` must have a floating dtype")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"`x` must have at least 2 dimensions")
    yield ErrorInput(call("running_mean shape", running_mean=np.ones(4)), ValueError,
                     r"`running_mean` must have shape \(3,\), got \(4,\)")
    yield ErrorInput(call("running_var int", running_var=np.ones(3, dtype=int)), TypeError,
                     r"`running_var` must have a floating dtype")
    yield ErrorInput(call("running_var only", running_mean=None), ValueError,
                     r"`running_mean` and `running_var` must either both be None or neither")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("bias", bias=np.ones((3, 1))), ValueError,
                     r"`bias` must have shape \(3,\)")
    yield ErrorInput(call("eps", eps=-1.0), ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(call("eps 0 training", training=True, eps=0.0), ValueError,
                     r"`eps` must be > 0 when batch statistics are used")
    yield ErrorInput(call("momentum", momentum="0.1"), ValueError,
                     r"`momentum` must be a finite number or None")
    yield ErrorInput(call("training", training=1), TypeError, r"`training` must be a bool")
    yield ErrorInput(call("num_batches_tracked", num_batches_tracked=-1), ValueError,
                     r"`num_batches_tracked` must be an int >= 0")
    yield ErrorInput(call("one value per channel", x=np.ones((1, 3)), training=True), ValueError,
                     r"Expected more than 1 value per channel when training")
    yield ErrorInput(SampleInput("one value per channel, no running stats, eval",
                                 (np.ones((1, 3, 1)), None, None),
                                 dict(running_mean=None, running_var=None, training=False)),
                     ValueError, r"Expected more than 1 value per channel when training")


def _torch_call(torch, x, weight, bias, *, running_mean, running_var, training=False,
                momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """``F.batch_norm`` driven as ``nn.BatchNorm.forward`` drives it (batch statistics when there
    are no running ones, the factor 1/t for ``momentum=None``), on copies of the state. The state
    may be NumPy arrays or tensors (any device, any dtype); the new one is returned as tensors."""
    tracking = running_mean is not None
    t = int(num_batches_tracked)
    factor = 0.0 if momentum is None else momentum
    if training and tracking:
        t += 1
        factor = 1.0 / t if momentum is None else momentum
    rm = torch.as_tensor(running_mean).clone() if tracking else None  # torch updates in place
    rv = torch.as_tensor(running_var).clone() if tracking else None
    y = torch.nn.functional.batch_norm(x, rm, rv, weight, bias, training or not tracking,
                                       factor, eps)
    state = {"num_batches_tracked": np.asarray(t, dtype=np.int64)}
    if tracking:
        state.update(running_mean=rm, running_var=rv)
    return y, state


def _stats_axes(sample):
    """All axes but 1 where batch statistics are used; None (no standardization) in evaluation
    with running statistics."""
    kwargs = sample.kwargs
    if kwargs.get("training", False) or kwargs.get("running_mean") is None:
        return _channel_axes(sample.arrays[0].ndim)
    return None


def _layer_init(features, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
    """``torch.nn.BatchNorm{1,2,3}d(features, eps, momentum, affine, track_running_stats)``:
    weight 1, bias 0, running mean 0, running variance 1, counter 0. Without running
    statistics the layer uses batch statistics in evaluation too, as PyTorch's module does."""
    check_eps(eps, _OP)
    check_momentum(momentum, _OP, allow_none=True)
    params = dict(weight=np.ones(features), bias=np.zeros(features)) if affine else {}
    kwargs = dict(momentum=momentum, eps=eps)
    if not track_running_stats:
        return params, {}, dict(kwargs, running_mean=None, running_var=None)
    state = dict(running_mean=np.zeros(features), running_var=np.ones(features),
                 num_batches_tracked=np.array(0, dtype=np.int64))
    return params, state, kwargs


SPEC = NormSpec(
    name="batch_norm",
    title="Batch Normalization",
    paper=Paper("Batch Normalization: Accelerating Deep Network Training by Reducing Internal "
                "Covariate Shift", "Ioffe, Szegedy", 2015, "arXiv:1502.03167"),
    forward=batch_norm_forward,
    backward=batch_norm_backward,
    op=batch_norm,
    composite=batch_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    invariances=("shift", "scale"),
    stats_axes=_stats_axes,
    torch_equivalent="torch.nn.functional.batch_norm",
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=_layer_init,
)

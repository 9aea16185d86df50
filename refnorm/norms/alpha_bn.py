r"""α-BN: test-time calibration of BatchNorm statistics under covariate shift.

You, Li & Zhao, *Test-time Batch Statistics Calibration for Covariate Shift*, arXiv:2110.04065
(2021).

A BatchNorm layer trained on a source distribution keeps its source statistics
:math:`\bar\mu_c, \bar\sigma^2_c` (``running_mean``, ``running_var``). At test time, on a batch of
shape :math:`(N, C, *)` from a shifted distribution, the layer normalizes with a **mixture** of
the source statistics and the statistics of the test batch itself, per channel over the set
:math:`S` of every axis but 1 (:math:`m` values):

.. math::

   \mu_t = \langle x\rangle_S,\qquad
   \sigma^2_t = \tfrac{1}{m - 1}\textstyle\sum_S (x-\mu_t)^2 ,\\
   \tilde\mu = (1-w)\,\bar\mu + w\,\mu_t,\qquad
   \tilde\sigma^2 = (1-w)\,\bar\sigma^2 + w\,\sigma^2_t,\qquad
   \tilde r = (\tilde\sigma^2+\epsilon)^{-1/2},\\
   \hat x = (x - \tilde\mu)\,\tilde r,\qquad y = \gamma_c\,\hat x + \beta_c ,

with :math:`w` = ``test_weight``, **the weight of the test-batch statistics**. :math:`w = 0` is
BatchNorm in evaluation (source statistics), :math:`w = 1` with ``unbiased=False`` is BatchNorm
in training (test-batch statistics); tests check both identities.

**What is and is not known.** The paper's own equation (which side its :math:`\alpha` weights,
and whether the test variance is biased) and its default :math:`\alpha` could not be retrieved
(only the abstract was available; ``docs/notes`` and the reference catalogue record the
search). Third-party code disagrees on the side: mariodoebler/test-time-adaptation
(``AlphaBatchNorm``) weights the **test** statistics by :math:`\alpha` (config default 0.1) and
takes the **unbiased** test variance (the running variance of a helper BatchNorm with momentum
1); another implementation weights the source statistics by :math:`\alpha`. So refnorm names
the weight by what it weights, ``test_weight``, has **no default** for it, and claims no paper
default. ``unbiased=True`` (the default) follows the mariodoebler code; ``unbiased=False`` uses
the biased batch variance.

Backward (derivation: ``docs/derivations/alpha_bn.rst``). As in the reference code, which
normalizes with ``F.batch_norm(..., training=False)``, the mixed statistics are **constants of
the gradient**: the backward is BatchNorm's evaluation backward with
:math:`\tilde\mu, \tilde\sigma^2`,

.. math::

   \mathrm{d}x = \gamma_c\,\tilde r_c\,\mathrm{d}y,\qquad
   \mathrm{d}\gamma_c = \textstyle\sum_S \mathrm{d}y\,\hat x,\qquad
   \mathrm{d}\beta_c = \textstyle\sum_S \mathrm{d}y ,

a surrogate of the derivative through :math:`\mu_t, \sigma^2_t` (the record says
``gradient="surrogate"``; the finite-difference checks run on the call with the statistics
fixed, ``fixed_stats``). Nothing is updated: the source statistics are arguments, not state.

Conventions: ``eps = 1e-5`` inside the square root (the source BatchNorm's); the statistics
are computed in float64 at least (float32 squares of values beyond :math:`10^{19}` overflow,
and the source variance is mixed with the test one), from the batch mean :math:`m_0` and its
correction :math:`c` (:func:`refnorm.norms._stats.shifted_moments`), so that
:math:`x - \tilde\mu = (x - m_0) - ((1-w)(\bar\mu - m_0) + w\,c)` keeps full accuracy on
channels with a large mean. A float64 call whose values are tiny or huge
(:func:`refnorm.norms._stats.out_of_range`: the test variance of values near :math:`10^{155}`
overflows, the mixed :math:`\tilde r` of subnormal ones with ``eps = 0`` too) is computed
whole in the wider ``np.longdouble`` and rounded once (the module docstring of ``_stats``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, axis_count, check_array, check_eps, check_flag,
                                  check_fraction, check_param, check_running_stats, narrow,
                                  out_of_range, row_sums, shifted_moments, wider_dtype, widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "alpha_bn"


class AlphaBNCache(NamedTuple):
    xhat: np.ndarray            # \hat x, in the statistics' dtype (float64 at least)
    mean: np.ndarray            # \tilde\mu per channel, (1, C, 1, ...)
    rstd: np.ndarray            # \tilde r per channel, (1, C, 1, ...)
    var: np.ndarray             # \tilde\sigma^2 per channel, (1, C, 1, ...)
    weight: np.ndarray | None
    has_bias: bool
    x_dtype: np.dtype
    bias_dtype: np.dtype | None


class AlphaBNGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def alpha_bn_forward(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, *,
                     test_weight, unbiased=True, fixed_stats=None):
    r"""BatchNorm with source and test-batch statistics mixed; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
        A test batch.
    running_mean, running_var : ndarray of shape (C,)
        The source statistics :math:`\bar\mu, \bar\sigma^2` of the trained BatchNorm layer.
    weight, bias : ndarray of shape (C,), optional
        The source layer's :math:`\gamma, \beta`.
    eps : float, default 1e-5
    test_weight : float in [0, 1], keyword-only, required
        :math:`w`, the weight of the **test-batch** statistics (no default: see above).
    unbiased : bool, keyword-only, default True
        The unbiased test-batch variance (as the reference code); False: the biased one.
    fixed_stats : pair of arrays, keyword-only, optional
        :math:`(\tilde\mu, \tilde\sigma^2)` per channel to use instead of the mixture: the
        function whose exact derivative the backward is (used by the gradient checks).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : AlphaBNCache
    """
    x = check_array(x, "x", _OP, ndim_min=2)
    channels = x.shape[1]
    if running_mean is None or running_var is None:
        raise ValueError(f"{_OP}: `running_mean` and `running_var` (the source statistics) must "
                         f"be given")
    check_running_stats(running_mean, running_var, _OP, channels)
    weight = check_param(weight, "weight", _OP, (channels,))
    bias = check_param(bias, "bias", _OP, (channels,))
    eps = check_eps(eps, _OP)
    w = check_fraction(test_weight, "test_weight", _OP)
    unbiased = check_flag(unbiased, "unbiased", _OP)
    acc = np.promote_types(x.dtype, np.float64)
    shape = (1, channels) + (1,) * (x.ndim - 2)
    x3 = _ncl(x).astype(acc)   # (N, C, L), a copy
    m = axis_count(x.shape, (0,) + tuple(range(2, x.ndim)))
    src_mean = running_mean.astype(acc).reshape(-1, 1)
    src_var = running_var.astype(acc).reshape(-1, 1)
    wider = wider_dtype(acc)
    if wider is not None and out_of_range(x3, src_mean, src_var, *(
            narrow(np.asarray(v), acc) for v in fixed_stats or ())):  # tiny or huge float64
        y, cache = alpha_bn_forward(  # the whole call, wider (_stats: the whole floating range)
            x.astype(wider), widen(running_mean, wider), widen(running_var, wider),
            widen(weight, wider), widen(bias, wider), eps, test_weight=w, unbiased=unbiased,
            fixed_stats=None if fixed_stats is None else
            tuple(widen(np.asarray(v), wider) for v in fixed_stats))
        return narrow(y, x.dtype), WideCache(
            cache, [None if a is None else a.dtype for a in (x, weight, bias)], wider)
    if w > 0 and m <= (1 if unbiased else 0):
        raise ValueError(f"{_OP}: Expected more than 1 value per channel for the test-batch "
                         f"statistics, got `x` of shape {x.shape}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if m > 0:
            d = np.empty_like(x3)
            shift, c, var, _, _ = shifted_moments(x3, out=d, eps=eps)  # d = x - m0
        else:
            d, shift, c, var = x3, np.zeros_like(src_mean), np.zeros_like(src_mean), \
                np.zeros_like(src_var)
        if fixed_stats is not None:
            mix_mean, mix_var = (np.asarray(v, acc).reshape(-1, 1) for v in fixed_stats)
            offset = mix_mean - shift                       # x - mean = d - offset
        else:
            test_var = var * (m / (m - 1)) if unbiased and m > 1 else var
            # x - mix_mean = d - ((1 - w)(src_mean - m0) + w c)
            offset = (1.0 - w) * (src_mean - shift) + w * c if w > 0 else src_mean - shift
            mix_mean = shift + offset
            mix_var = (1.0 - w) * src_var + w * test_var if w > 0 else src_var
        rstd = 1.0 / np.sqrt(mix_var + eps)
        xhat = (d - offset) * rstd
    y = xhat * weight.reshape(-1, 1) if weight is not None else xhat.copy()
    if bias is not None:
        y += bias.reshape(-1, 1)
    cache = AlphaBNCache(xhat.reshape(x.shape), mix_mean.reshape(shape), rstd.reshape(shape),
                         np.broadcast_to(mix_var, rstd.shape).reshape(shape), weight,
                         bias is not None, x.dtype,
                         None if bias is None else bias.dtype)
    return y.reshape(x.shape).astype(x.dtype, copy=False), cache


def alpha_bn_backward(dy, cache):
    """Hand-derived VJP of :func:`alpha_bn_forward`, the mixed statistics held constant:
    ``(dy, cache) -> AlphaBNGrads``."""
    if isinstance(cache, WideCache):
        return cache.narrow(alpha_bn_backward(dy.astype(cache.wide_dtype), cache.inner))
    xhat, _, rstd, _, weight, has_bias, x_dtype, bias_dtype = cache
    scale = rstd if weight is None else rstd * weight.reshape(rstd.shape)
    dx = (dy * scale).astype(x_dtype, copy=False)
    dy3 = _ncl(dy).astype(xhat.dtype)
    dweight = dbias = None
    if weight is not None:
        dweight = (dy3 * xhat.reshape(dy3.shape)).sum(axis=(0, 2)).astype(weight.dtype)
    if has_bias:
        dbias = row_sums(dy3).sum(axis=0).astype(bias_dtype or dy.dtype)
    return AlphaBNGrads(dx, dweight, dbias)


def _ncl(a):
    """``a`` of shape (N, C, *) as (N, C, L), L the product of the spatial axes."""
    return a.reshape(a.shape[0], a.shape[1], int(np.prod(a.shape[2:], dtype=np.int64)))


alpha_bn = custom_vjp(alpha_bn_forward, alpha_bn_backward, ("x", "weight", "bias"))
alpha_bn.__doc__ = "Differentiable α-BN (engine op); see :func:`alpha_bn_forward`."


def alpha_bn_composite(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, *,
                       test_weight, unbiased=True, fixed_stats=None):
    """The same math with engine primitives; the test-batch statistics under ``no_grad``
    (constants, as in the reference code)."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    with ag.no_grad():
        mu_t = ag.mean(x, axes, keepdims=True).data
        var_t = ag.var(x, axes, keepdims=True, correction=1 if unbiased else 0).data \
            if test_weight > 0 else 0.0
    mean = (1 - test_weight) * running_mean.reshape(shape) + test_weight * mu_t
    var = (1 - test_weight) * running_var.reshape(shape) + test_weight * var_t
    if fixed_stats is not None:
        mean, var = (np.asarray(v).reshape(shape) for v in fixed_stats)
    y = (x - mean) / np.sqrt(var + eps)
    y = y * ag.reshape(weight, shape) if weight is not None else y
    return y + ag.reshape(bias, shape) if bias is not None else y


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, test_weight=0.1, unbiased=True, affine=True, eps=1e-5, x=None,
          source=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine else None
    rm, rv = source if source is not None else (0.5 * rng.standard_normal(c),
                                                rng.uniform(0.5, 2.0, c))
    return SampleInput(name, (x, weight, b), dict(running_mean=rm, running_var=rv, eps=eps,
                                                  test_weight=test_weight, unbiased=unbiased))


def sample_inputs(rng):
    yield _case(rng, "(4,3)-1d-w0.1", (4, 3))
    yield _case(rng, "(3,2,5)-w0.5", (3, 2, 5), test_weight=0.5)
    yield _case(rng, "(2,3,2,3)-2d-w1-biased", (2, 3, 2, 3), test_weight=1.0, unbiased=False)
    yield _case(rng, "(1,2,3,4)-N1-w0.3", (1, 2, 3, 4), test_weight=0.3)
    yield _case(rng, "(1,3)-one-value-w0", (1, 3), test_weight=0.0)
    yield _case(rng, "(4,2,3)-no-affine-eps0.1", (4, 2, 3), affine=False, eps=0.1)
    constant = rng.standard_normal((3, 2, 4))
    constant[:, 0] = 0.7
    yield _case(rng, "(3,2,4)-constant-channel-w0.2", (3, 2, 4), x=constant, test_weight=0.2)
    yield _case(rng, "(3,2,4)-shifted-mean100", (3, 2, 4), test_weight=0.6,
                x=100.0 + 3.0 * rng.standard_normal((3, 2, 4)))


def oracle_inputs(rng):
    yield _case(rng, "(16,37,13,11)-w0.1", (16, 37, 13, 11))
    yield _case(rng, "(65536,3)-long-channels-w0.5", (65536, 3), test_weight=0.5)
    yield _case(rng, "(1,5,17,19)-N1-w1", (1, 5, 17, 19), test_weight=1.0)
    yield _case(rng, "(8,5,7,9)-shifted-w0.7-biased", (8, 5, 7, 9), test_weight=0.7,
                unbiased=False, x=2.0 + 3.0 * rng.standard_normal((8, 5, 7, 9)))
    yield _case(rng, "(8,5,7,9)-mean1e4-std1e-3-w0.9", (8, 5, 7, 9), test_weight=0.9,
                x=1e4 + 1e-3 * rng.standard_normal((8, 5, 7, 9)),
                source=(1e4 + 1e-3 * rng.standard_normal(5), np.full(5, 1e-6)))


def error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(3)

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias), {"running_mean": c.copy(),
                                                     "running_var": c.copy(),
                                                     "test_weight": 0.1, **kwargs})

    yield ErrorInput(call("list x", x=[[1.0, 2.0]]), TypeError,
                     r"alpha_bn: `x` must be a numpy.ndarray")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"alpha_bn: `x` must have at least 2 dimensions")
    yield ErrorInput(call("no source statistics", running_mean=None, running_var=None),
                     ValueError, r"alpha_bn: `running_mean` and `running_var` \(the source")
    yield ErrorInput(call("running_var shape", running_var=np.ones(2)), ValueError,
                     r"alpha_bn: `running_var` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("weight", weight=np.ones(4)), ValueError,
                     r"alpha_bn: `weight` must have shape \(3,\)")
    yield ErrorInput(call("test_weight", test_weight=1.5), ValueError,
                     r"alpha_bn: `test_weight` must be a number in \[0, 1\]")
    yield ErrorInput(call("test_weight None", test_weight=None), ValueError,
                     r"alpha_bn: `test_weight` must be a number in \[0, 1\]")
    yield ErrorInput(call("one value per channel", x=np.ones((1, 3))), ValueError,
                     r"alpha_bn: Expected more than 1 value per channel")
    yield ErrorInput(call("unbiased", unbiased="no"), TypeError,
                     r"alpha_bn: `unbiased` must be a bool")


def _torch_call(torch, x, weight, bias, *, running_mean, running_var, eps=1e-5, test_weight,
                unbiased=True):
    """The reference code's computation (mariodoebler ``AlphaBatchNorm``) from torch ops: the
    test-batch statistics detached, mixed with the source ones, ``F.batch_norm`` in evaluation
    mode; float32 at least."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    axes = [0] + list(range(2, x.ndim))
    rm = torch.as_tensor(running_mean).to(device=x.device, dtype=acc)
    rv = torch.as_tensor(running_var).to(device=x.device, dtype=acc)
    if test_weight > 0:
        mu_t = xf.detach().mean(axes)
        var_t = xf.detach().var(axes, correction=1 if unbiased else 0)
        rm = (1 - test_weight) * rm + test_weight * mu_t
        rv = (1 - test_weight) * rv + test_weight * var_t
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.batch_norm(xf, rm, rv, w, b, False, 0.0, eps).to(x.dtype)


def _freeze(sample, cache):
    """The call with the mixed statistics fixed at the forward's values."""
    return sample._replace(kwargs={**sample.kwargs, "fixed_stats": (cache.mean, cache.var)})


SPEC = NormSpec(
    name="alpha_bn",
    title="α-BN: test-time mixing of source and test-batch BatchNorm statistics",
    paper=Paper("Test-time Batch Statistics Calibration for Covariate Shift",
                "You, Li, Zhao", 2021, "arXiv:2110.04065"),
    forward=alpha_bn_forward,
    backward=alpha_bn_backward,
    op=alpha_bn,
    composite=alpha_bn_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    gradient="surrogate",
    gradient_note="the mixed statistics are constants of the gradient (F.batch_norm in "
                  "evaluation mode, as the reference code)",
    freeze=_freeze,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=lambda features, test_weight: (
        {"weight": np.ones(features), "bias": np.zeros(features)},
        {}, {"running_mean": np.zeros(features), "running_var": np.ones(features),
             "test_weight": test_weight}),
)

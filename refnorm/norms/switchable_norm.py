r"""Switchable Normalization.

Luo, Ren, Peng, Zhang & Li, *Differentiable Learning-to-Normalize via Switchable Normalization*,
ICLR 2019, arXiv:1806.10779. Official code: switchablenorms/Switchable-Normalization,
``devkit/ops/switchable_norm.py`` (``SwitchNorm2d``).

The input has shape :math:`(N, C, *)`, viewed as :math:`(N, C, M)`, :math:`M = \prod *`. The
layer normalizes with a learned mixture of the InstanceNorm, LayerNorm and BatchNorm statistics,
all built from the per-instance ones:

.. math::

   \mu_{in} = \langle x\rangle_M,\qquad
   v_{in} = \tfrac{1}{M-1}\textstyle\sum_M (x-\mu_{in})^2 \quad\text{(unbiased)},\\
   \mu_{ln} = \langle\mu_{in}\rangle_C,\qquad
   v_{ln} = \langle v_{in} + \mu_{in}^2\rangle_C - \mu_{ln}^2
          = \langle v_{in}\rangle_C + \langle(\mu_{in}-\mu_{ln})^2\rangle_C,\\
   \mu_{bn} = \langle\mu_{in}\rangle_N,\qquad
   v_{bn} = \langle v_{in}\rangle_N + \langle(\mu_{in}-\mu_{bn})^2\rangle_N
   \quad\text{(training; the running statistics in evaluation)},\\
   w = \mathrm{softmax}(\lambda_\mu),\quad w' = \mathrm{softmax}(\lambda_v),\qquad
   \mu = \textstyle\sum_k w_k\mu_k,\quad v = \sum_k w'_k v_k,\\
   \hat x = (x-\mu)\,(v+\epsilon)^{-1/2},\qquad y = \gamma_c\,\hat x + \beta_c ,

:math:`\lambda_\mu` = ``mean_weight`` and :math:`\lambda_v` = ``var_weight`` (3 logits each: IN,
LN, BN; 2 with ``using_bn=False``). The second forms of :math:`v_{ln}, v_{bn}` are the official
code's first forms rearranged: they do not cancel on inputs with a large mean. Because
:math:`v_{in}` is unbiased, :math:`v_{ln}` and :math:`v_{bn}` are not the exact biased LN and
BN variances; this is the official code, kept.

In training the running statistics are updated with :math:`\mu_{bn}` and :math:`v_{bn}`:
:math:`\bar\mu \leftarrow (1-f)\,\bar\mu + f\mu_{bn}` and likewise :math:`\bar v`.

Backward (derivation: ``docs/derivations/switchable_norm.rst``). With :math:`h = \gamma\,
\mathrm{d}y`, :math:`r = (v+\epsilon)^{-1/2}` per :math:`(n, c)`:

.. math::

   \bar\mu_{nc} = -r\textstyle\sum_M h,\qquad \bar v_{nc} = -\tfrac12 r^2\sum_M h\,\hat x,\\
   \bar\lambda_{\mu,j} = w_j\textstyle\sum_{n,c}\bar\mu\,(\mu_j - \mu)
   \quad\text{(and } \bar\lambda_v
   \text{ from } \bar v, v_k),\\
   \bar v_{ln} = \textstyle\sum_c w'_1\bar v,\quad \bar v_{bn} = \sum_n w'_2\bar v,\quad
   \bar v_{in} = w'_0\bar v + \bar v_{ln}/C + \bar v_{bn}/N,\\
   \bar\mu_{in} = w_0\bar\mu + \textstyle\sum_c w_1\bar\mu/C + \sum_n w_2\bar\mu/N
        + 2(\mu_{in}-\mu_{ln})\,\bar v_{ln}/C + 2(\mu_{in}-\mu_{bn})\,\bar v_{bn}/N,\\
   \mathrm{d}x = r\,h + \bar\mu_{in}/M + \bar v_{in}\,\frac{2\,(x-\mu_{in})}{M-1},

the BatchNorm terms dropping out in evaluation, and
:math:`\mathrm{d}\gamma = \sum \mathrm{d}y\,\hat x`, :math:`\mathrm{d}\beta = \sum\mathrm{d}y`.

Conventions, as the official ``SwitchNorm2d``: ``eps = 1e-5``; :math:`\gamma = 1`,
:math:`\beta = 0`, :math:`\lambda = 1` (uniform weights) and **running statistics 0** at
initialization (``layer_init``); ``momentum`` here is PyTorch's (the weight of the new value):
the official ``momentum=0.9`` (weight of the old value) is ``momentum=0.1``. The official
``using_moving_average=False`` mode (the buffers accumulate sums, to be divided by the caller)
is not implemented. ``mean_weight``/``var_weight`` None mean uniform weights (no gradient). The
statistics are computed in float64 at least; a float64 call whose values are tiny or huge
(:func:`refnorm.norms._stats.out_of_range`: :math:`r^2` of subnormal values with ``eps = 0``
overflows, the squares of values near :math:`10^{155}` too) is computed whole in the wider
``np.longdouble`` and rounded once (the module docstring of ``_stats``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, centered, check_array, check_eps, check_flag,
                                  check_momentum, check_param, check_running_stats, narrow,
                                  out_of_range, wider_dtype, widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "switchable_norm"


class SwitchableNormState(NamedTuple):
    running_mean: np.ndarray     # \bar\mu, shape (C,)
    running_var: np.ndarray      # \bar v, shape (C,)


class SwitchableNormCache(NamedTuple):
    xc: np.ndarray               # x - mu_in, (N, C, M), float64 at least
    xhat: np.ndarray             # (N, C, M)
    rstd: np.ndarray             # r per (n, c), (N, C, 1)
    mean: np.ndarray             # the mixed mean per (n, c), (N, C, 1)
    stats: tuple                 # (mu_in, mu_ln, mu_bn), (v_in, v_ln, v_bn) broadcastable
    offset: np.ndarray           # mu_in - mu, (N, C, 1)
    var: np.ndarray              # the mixed variance v, (N, C, 1)
    w_mean: np.ndarray           # softmax(lambda_mu)
    w_var: np.ndarray
    weight: np.ndarray | None
    has_bias: bool
    lambdas: tuple               # (mean_weight, var_weight) as given (for dtypes, None)
    batch_stats: bool            # whether mu_bn, v_bn depend on x
    x_shape: tuple
    x_dtype: np.dtype
    bias_dtype: np.dtype | None


    def mixture(self):
        """``{"mean_weight": (w, deviations), "var_weight": (w', deviations)}``: the mixing
        weights and, per statistic :math:`s_j`, :math:`s_j - s` as an ``(N, C)`` array (for the
        oracle's tolerance model of the logits' gradients)."""
        (means, variances), n, c = self.stats, self.xc.shape[0], self.xc.shape[1]
        mu_in = means[0]
        mean_dev = [np.broadcast_to(self.offset - (mu_in - mk), (n, c, 1)).reshape(n, c)
                    for mk in means]
        var_dev = [np.broadcast_to(vk - self.var, (n, c, 1)).reshape(n, c) for vk in variances]
        return {"mean_weight": (self.w_mean, mean_dev), "var_weight": (self.w_var, var_dev)}


class SwitchableNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dmean_weight: np.ndarray | None
    dvar_weight: np.ndarray | None


def _softmax(a):
    e = np.exp(a - np.max(a))
    return e / e.sum()


def switchable_norm_forward(x, running_mean, running_var, weight=None, bias=None,
                            mean_weight=None, var_weight=None, training=False, momentum=0.1,
                            eps=1e-5, *, using_bn=True):
    r"""Switchable normalization; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``, at least 2 spatial elements
    running_mean, running_var : ndarray of shape (C,)
        :math:`\bar\mu, \bar v` (used in evaluation when ``using_bn``); never modified.
    weight, bias : ndarray of shape (C,), optional
    mean_weight, var_weight : ndarray of shape (3,) (or (2,) without BN), optional
        The logits :math:`\lambda_\mu, \lambda_v`; None: uniform weights.
    training : bool, default False
    momentum : float, default 0.1
        The weight of the new value in the running averages (official 0.9 = weight of the old).
    eps : float, default 1e-5
    using_bn : bool, keyword-only, default True
        Whether the BatchNorm statistics take part (and running statistics are kept).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : SwitchableNormState
    cache : SwitchableNormCache
    """
    x = check_array(x, "x", _OP, ndim_min=3)
    n, c = x.shape[:2]
    check_running_stats(running_mean, running_var, _OP, c)
    if running_mean is None:
        raise ValueError(f"{_OP}: `running_mean` and `running_var` must be given")
    weight = check_param(weight, "weight", _OP, (c,))
    bias = check_param(bias, "bias", _OP, (c,))
    using_bn = check_flag(using_bn, "using_bn", _OP)
    k = 3 if using_bn else 2
    mean_weight = check_param(mean_weight, "mean_weight", _OP, (k,))
    var_weight = check_param(var_weight, "var_weight", _OP, (k,))
    training = check_flag(training, "training", _OP)
    momentum = check_momentum(momentum, _OP)
    eps = check_eps(eps, _OP)
    m = int(np.prod(x.shape[2:], dtype=np.int64))
    if m <= 1:
        raise ValueError(f"{_OP}: Expected more than 1 spatial element (the instance variance "
                         f"is unbiased), got `x` of shape {x.shape}")
    acc = np.promote_types(x.dtype, np.float64)
    x3 = x.reshape(n, c, m).astype(acc)
    wider = wider_dtype(acc)
    if wider is not None and out_of_range(x3, running_mean.astype(acc, copy=False),
                                          running_var.astype(acc, copy=False)):
        y, state, cache = switchable_norm_forward(  # tiny or huge float64: the whole call wider
            x.astype(wider), widen(running_mean, wider),
            widen(running_var, wider), widen(weight, wider), widen(bias, wider),
            widen(mean_weight, wider), widen(var_weight, wider), training, momentum, eps,
            using_bn=using_bn)
        state = SwitchableNormState(narrow(state.running_mean, running_mean.dtype),
                                    narrow(state.running_var, running_var.dtype))
        return narrow(y, x.dtype), state, WideCache(cache, [None if a is None else a.dtype for a
                                                            in (x, weight, bias, mean_weight,
                                                                var_weight)], wider)
    w = _softmax(np.zeros(k, acc) if mean_weight is None else mean_weight.astype(acc))
    wv = _softmax(np.zeros(k, acc) if var_weight is None else var_weight.astype(acc))
    batch_stats = using_bn and training
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        xc, mu_in = centered(x3, (2,))                              # (N, C, 1)
        v_in = np.sum(np.square(xc), axis=2, keepdims=True) / (m - 1)
        mu_ln = mu_in.mean(axis=1, keepdims=True)                   # (N, 1, 1)
        v_ln = v_in.mean(axis=1, keepdims=True) \
            + np.square(mu_in - mu_ln).mean(axis=1, keepdims=True)
        means, variances = [mu_in, mu_ln], [v_in, v_ln]
        state = SwitchableNormState(running_mean, running_var)
        if using_bn:
            if batch_stats:
                mu_bn = mu_in.mean(axis=0, keepdims=True) if n else np.zeros((1, c, 1), acc)
                v_bn = (v_in.mean(axis=0, keepdims=True)
                        + np.square(mu_in - mu_bn).mean(axis=0, keepdims=True)) if n \
                    else np.zeros((1, c, 1), acc)
                if n:
                    state = SwitchableNormState(
                        ((1 - momentum) * running_mean + momentum * mu_bn.ravel())
                        .astype(running_mean.dtype, copy=False),
                        ((1 - momentum) * running_var + momentum * v_bn.ravel())
                        .astype(running_var.dtype, copy=False))
            else:
                mu_bn = running_mean.astype(acc).reshape(1, c, 1)
                v_bn = running_var.astype(acc).reshape(1, c, 1)
            means.append(mu_bn)
            variances.append(v_bn)
        # x - mu = (x - mu_in) + sum_k w_k (mu_in - mu_k): no cancellation on a large mean
        offset = sum(wk * (mu_in - mk) for wk, mk in zip(w[1:], means[1:]))
        mean = mu_in - offset
        var = sum(wk * vk for wk, vk in zip(wv, variances))
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = (xc + offset) * rstd
    y = xhat * weight.reshape(1, c, 1) if weight is not None else xhat.copy()
    if bias is not None:
        y += bias.reshape(1, c, 1)
    cache = SwitchableNormCache(xc, xhat, rstd, mean, (tuple(means), tuple(variances)), offset,
                                var, w, wv,
                                weight, bias is not None, (mean_weight, var_weight), batch_stats,
                                x.shape, x.dtype, None if bias is None else bias.dtype)
    return y.reshape(x.shape).astype(x.dtype, copy=False), state, cache


def switchable_norm_backward(dy, cache):
    """Hand-derived VJP of :func:`switchable_norm_forward` (the adjoints in the order of the
    module docstring)."""
    if isinstance(cache, WideCache):
        return cache.narrow(switchable_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    (xc, xhat, r, _, (means, variances), offset, var, w, wv, weight, has_bias, (lam_m, lam_v),
     batch_stats, shape, x_dtype, bias_dtype) = cache
    n, c, m = xc.shape
    dy3 = dy.reshape(n, c, m).astype(xc.dtype)
    h = dy3 * weight.reshape(1, c, 1) if weight is not None else dy3
    g_mu = -r * h.sum(axis=2, keepdims=True)                          # dL/dmu, (N, C, 1)
    g_v = -0.5 * r * r * (h * xhat).sum(axis=2, keepdims=True)        # dL/dv
    mu_in, v_in = means[0], variances[0]
    # through the mixtures into the statistics
    g_vin = wv[0] * g_v
    g_vln = wv[1] * g_v.sum(axis=1, keepdims=True)                    # (N, 1, 1)
    g_muin = w[0] * g_mu + w[1] * g_mu.sum(axis=1, keepdims=True) / c
    g_vin = g_vin + g_vln / c
    g_muin = g_muin + 2.0 * (mu_in - means[1]) * g_vln / c
    if batch_stats:
        g_vbn = wv[2] * g_v.sum(axis=0, keepdims=True)                # (1, C, 1)
        g_vin = g_vin + g_vbn / n
        g_muin = g_muin + w[2] * g_mu.sum(axis=0, keepdims=True) / n \
            + 2.0 * (mu_in - means[2]) * g_vbn / n
    dx = r * h + g_muin / m + g_vin * (2.0 / (m - 1)) * xc
    dweight = (dy3 * xhat).sum(axis=(0, 2)).astype(weight.dtype) if weight is not None else None
    dbias = dy3.sum(axis=(0, 2)).astype(bias_dtype) if has_bias else None
    # dL/dlambda_j = w_j sum g (s_j - s), s = sum_k w_k s_k the mixture: the deviations
    # s_j - s from the cache (mu_j - mu = offset - (mu_in - mu_j)), which do not cancel
    mu_dev = [offset - (mu_in - mk) for mk in means]
    v_dev = [vk - var for vk in variances]
    d_lam = []
    for lam, weights, g, devs in ((lam_m, w, g_mu, mu_dev), (lam_v, wv, g_v, v_dev)):
        if lam is None:
            d_lam.append(None)
            continue
        d_lam.append((weights * np.array([np.sum(g * dev) for dev in devs])).astype(lam.dtype))
    return SwitchableNormGrads(dx.reshape(shape).astype(x_dtype, copy=False), dweight, dbias,
                               *d_lam)


switchable_norm = custom_vjp(switchable_norm_forward, switchable_norm_backward,
                             ("x", "weight", "bias", "mean_weight", "var_weight"), stateful=True)
switchable_norm.__doc__ = """Differentiable switchable normalization (engine op): returns
``(y, new_state)``; see :func:`switchable_norm_forward`."""


def switchable_norm_composite(x, running_mean, running_var, weight=None, bias=None,
                              mean_weight=None, var_weight=None, training=False, momentum=0.1,
                              eps=1e-5, *, using_bn=True):
    """The same math with engine primitives, in the official code's order (``var(correction=1)``
    per instance, ``temp = v_in + mu_in^2``): the engine derives its own gradient."""
    n, c = x.shape[:2]
    x3 = ag.reshape(x, (n, c, -1))
    k = 3 if using_bn else 2
    w = ag.softmax(mean_weight if mean_weight is not None else ag.as_tensor(np.zeros(k)), 0)
    wv = ag.softmax(var_weight if var_weight is not None else ag.as_tensor(np.zeros(k)), 0)
    mu_in = ag.mean(x3, 2, keepdims=True)
    v_in = ag.var(x3, 2, keepdims=True, correction=1)
    mu_ln = ag.mean(mu_in, 1, keepdims=True)
    temp = v_in + mu_in * mu_in
    v_ln = ag.mean(temp, 1, keepdims=True) - mu_ln * mu_ln
    mean = w[0] * mu_in + w[1] * mu_ln
    var = wv[0] * v_in + wv[1] * v_ln
    state = SwitchableNormState(running_mean, running_var)
    if using_bn:
        if training:
            mu_bn = ag.mean(mu_in, 0, keepdims=True)
            v_bn = ag.mean(temp, 0, keepdims=True) - mu_bn * mu_bn
            state = SwitchableNormState(
                (1 - momentum) * running_mean + momentum * mu_bn.data.ravel(),
                (1 - momentum) * running_var + momentum * v_bn.data.ravel())
        else:
            mu_bn = running_mean.reshape(1, c, 1)
            v_bn = running_var.reshape(1, c, 1)
        mean = mean + w[2] * mu_bn
        var = var + wv[2] * v_bn
    y = ag.reshape((x3 - mean) / ag.sqrt(var + eps), x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = y * ag.reshape(weight, shape) if weight is not None else y
    return (y + ag.reshape(bias, shape) if bias is not None else y), state


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, training=True, using_bn=True, affine=True, lambdas=True,
          momentum=0.1, eps=1e-5, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    k = 3 if using_bn else 2
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine else None
    lm = rng.standard_normal(k) if lambdas else None
    lv = rng.standard_normal(k) if lambdas else None
    return SampleInput(name, (x, weight, b, lm, lv), dict(
        running_mean=0.5 * rng.standard_normal(c), running_var=rng.uniform(0.5, 2.0, c),
        training=training, momentum=momentum, eps=eps, using_bn=using_bn))


def sample_inputs(rng):
    yield _case(rng, "(3,4,2,3)-train", (3, 4, 2, 3))
    yield _case(rng, "(2,3,5)-(N,C,L)-train", (2, 3, 5))
    yield _case(rng, "(3,4,2,2)-eval", (3, 4, 2, 2), training=False)
    yield _case(rng, "(1,3,2,3)-N1-train", (1, 3, 2, 3))
    yield _case(rng, "(3,1,4)-one-channel", (3, 1, 4))
    yield _case(rng, "(2,3,4)-without-bn", (2, 3, 4), using_bn=False)
    yield _case(rng, "(2,3,4)-uniform-weights-no-affine-eps0.1", (2, 3, 4), affine=False,
                lambdas=False, eps=0.1)
    constant = rng.standard_normal((3, 3, 4))
    constant[1, 2] = 0.6
    yield _case(rng, "(3,3,4)-constant-instance", (3, 3, 4), x=constant)
    yield _case(rng, "(2,3,5)-mean100", (2, 3, 5), x=100.0 + rng.standard_normal((2, 3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(8,32,14,14)", (8, 32, 14, 14))
    yield _case(rng, "(4,37,9,11)", (4, 37, 9, 11))
    yield _case(rng, "(8,37,9,9)-eval", (8, 37, 9, 9), training=False)
    yield _case(rng, "(1,5,17,19)-N1", (1, 5, 17, 19))
    yield _case(rng, "(6,10,33)-without-bn", (6, 10, 33), using_bn=False)
    yield _case(rng, "(8,6,129)-mean1e4-std1e-3", (8, 6, 129),
                x=1e4 + 1e-3 * rng.standard_normal((8, 6, 129)))


def error_inputs():
    x = np.ones((2, 3, 4))

    def call(name, x=x, weight=None, bias=None, lm=None, lv=None, **kwargs):
        kw = {"running_mean": np.zeros(3), "running_var": np.ones(3), **kwargs}
        return SampleInput(name, (x, weight, bias, lm, lv), kw)

    yield ErrorInput(call("list x", x=[[[1.0, 2.0]]]), TypeError,
                     r"switchable_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("2-d x", x=np.ones((2, 3))), ValueError,
                     r"switchable_norm: `x` must have at least 3 dimensions")
    yield ErrorInput(call("one spatial element", x=np.ones((2, 3, 1))), ValueError,
                     r"switchable_norm: Expected more than 1 spatial element")
    yield ErrorInput(call("no running stats", running_mean=None, running_var=None), ValueError,
                     r"switchable_norm: `running_mean` and `running_var` must be given")
    yield ErrorInput(call("mean_weight shape", lm=np.ones(2)), ValueError,
                     r"switchable_norm: `mean_weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("var_weight without bn", lv=np.ones(3), using_bn=False), ValueError,
                     r"switchable_norm: `var_weight` must have shape \(2,\), got \(3,\)")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"switchable_norm: `weight` must have shape \(3,\)")
    yield ErrorInput(call("momentum", momentum=None), ValueError,
                     r"switchable_norm: `momentum` must be a finite number")
    yield ErrorInput(call("using_bn", using_bn=1), TypeError,
                     r"switchable_norm: `using_bn` must be a bool")


def _torch_call(torch, x, weight, bias, mean_weight, var_weight, *, running_mean, running_var,
                training=False, momentum=0.1, eps=1e-5, using_bn=True):
    """``SwitchNorm2d.forward`` from torch ops (float32 at least), with ``v_ln`` and ``v_bn`` in
    the rearranged form that does not cancel; the running state on copies."""
    acc = torch.promote_types(x.dtype, torch.float32)
    n, c = x.shape[:2]
    x3 = x.to(acc).reshape(n, c, -1)
    k = 3 if using_bn else 2

    def soft(lam):
        lam = torch.zeros(k, dtype=acc, device=x.device) if lam is None else lam.to(acc)
        return torch.softmax(lam, 0)

    w, wv = soft(mean_weight), soft(var_weight)
    mu_in = x3.mean(-1, keepdim=True)
    v_in = x3.var(-1, keepdim=True)
    mu_ln = mu_in.mean(1, keepdim=True)
    v_ln = v_in.mean(1, keepdim=True) + ((mu_in - mu_ln) ** 2).mean(1, keepdim=True)
    mean, var = w[0] * mu_in + w[1] * mu_ln, wv[0] * v_in + wv[1] * v_ln
    rm = torch.as_tensor(running_mean).to(device=x.device).clone()
    rv = torch.as_tensor(running_var).to(device=x.device).clone()
    state = {"running_mean": rm, "running_var": rv}
    if using_bn:
        if training:
            mu_bn = mu_in.mean(0, keepdim=True)
            v_bn = v_in.mean(0, keepdim=True) + ((mu_in - mu_bn) ** 2).mean(0, keepdim=True)
            state = {"running_mean": ((1 - momentum) * rm.to(acc)
                                      + momentum * mu_bn.detach().reshape(-1)).to(rm.dtype),
                     "running_var": ((1 - momentum) * rv.to(acc)
                                     + momentum * v_bn.detach().reshape(-1)).to(rv.dtype)}
        else:
            mu_bn, v_bn = rm.to(acc).reshape(1, c, 1), rv.to(acc).reshape(1, c, 1)
        mean, var = mean + w[2] * mu_bn, var + wv[2] * v_bn
    y = ((x3 - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    y = y * weight.to(acc).reshape(shape) if weight is not None else y
    y = y + bias.to(acc).reshape(shape) if bias is not None else y
    return y.to(x.dtype), state


def _layer_init(features, using_bn=True):
    k = 3 if using_bn else 2
    return ({"weight": np.ones(features), "bias": np.zeros(features),
             "mean_weight": np.ones(k), "var_weight": np.ones(k)},
            {"running_mean": np.zeros(features), "running_var": np.zeros(features)},
            {"using_bn": using_bn})


SPEC = NormSpec(
    name="switchable_norm",
    title="Switchable Normalization",
    paper=Paper("Differentiable Learning-to-Normalize via Switchable Normalization",
                "Luo, Ren, Peng, Zhang, Li", 2019, "arXiv:1806.10779 (ICLR 2019)"),
    forward=switchable_norm_forward,
    backward=switchable_norm_backward,
    op=switchable_norm,
    composite=switchable_norm_composite,
    diff_argnames=("x", "weight", "bias", "mean_weight", "var_weight"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    # the mixture does not standardize any group, and in evaluation the BN statistics are
    # constants: no invariance holds for every call
    invariances=(),
    stats_axes=None,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=_layer_init,
)

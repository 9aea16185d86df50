r"""EvoNorm-B0 and EvoNorm-S0: normalization-activation layers found by search.

Liu, Brock, Simonyan, Le, *Evolving Normalization-Activation Layers*, NeurIPS 2020,
arXiv:2004.02967.

The input has shape :math:`(N, C, *)` with at least one spatial axis; :math:`\gamma`
(``weight``, init 1), :math:`\beta` (``bias``, init 0) and :math:`v` (``v``, init 1) are
per-channel, shape ``(C,)``. Without ``v`` (the authors' ``nonlinearity=False``, timm's
``apply_act=False``) both layers are the affine map :math:`y = \gamma x + \beta`.

**B0** (batch-dependent). With the biased batch variance :math:`\sigma^2_{b,c}` over every axis
but 1 (training) or the running variance :math:`\bar\sigma^2_c` (evaluation), and the biased
instance variance :math:`\sigma^2_{i,nc}` over the spatial axes:

.. math::

   L_c = \sqrt{\sigma^2_{b,c} + \epsilon},\qquad
   S_{nc} = \sqrt{\sigma^2_{i,nc} + \epsilon},\qquad
   R = v_c\,x + S_{nc},\qquad
   y = \gamma_c\,\frac{x}{\max(L_c, R)} + \beta_c .

Backward (derivation: ``docs/derivations/evo_norm_b0.rst``), with :math:`D = \max(L, R)`,
:math:`h = \gamma\,\mathrm{d}y`, :math:`a = h x / D^2`, :math:`s` the share of the
``max`` that goes to :math:`R` (1 where :math:`R > L`, 0 where :math:`R < L`, the tie per the
convention), :math:`\mu_i, \mu_b` the instance and batch means, :math:`M_i, M_b` their counts:

.. math::

   \mathrm{d}x = \frac{h}{D} - v\,a\,s
       - \frac{x-\mu_i}{M_i S}\sum_{\text{inst}} a\,s
       - \frac{x-\mu_b}{M_b L}\sum_{\text{batch}} a\,(1-s),\qquad
   \mathrm{d}v_c = -\sum a\,x\,s,\quad
   \mathrm{d}\gamma_c = \sum \mathrm{d}y\,\frac{x}{D},\quad
   \mathrm{d}\beta_c = \sum \mathrm{d}y ,

the last term only with batch statistics. In training the running variance is updated (it has
no gradient): :math:`\bar\sigma^2 \leftarrow (1-f)\bar\sigma^2 + f\,\sigma^2_b`, ``f`` =
``momentum`` (PyTorch's sense: the weight of the new value; TF's ``decay`` 0.9 is 0.1 here).

**S0** (batch-independent). With the biased variance :math:`\sigma^2_{g}` of each (sample,
group) over its :math:`C/G` channels and spatial positions, and :math:`\sigma(\cdot)` the
logistic sigmoid:

.. math::

   y = \gamma_c\,\frac{x\,\sigma(v_c x)}{\sqrt{\sigma^2_g + \epsilon}} + \beta_c ,\qquad
   \mathrm{d}x = \frac{h\,u'}{s} - \frac{x-\mu_g}{M_g\,s^3}\sum_{\text{group}} h\,u,\qquad
   \mathrm{d}v_c = \sum \frac{h\,x^2\sigma(1-\sigma)}{s},\quad
   \mathrm{d}\gamma_c = \sum \mathrm{d}y\,\frac{u}{s},

with :math:`u = x\sigma(vx)`, :math:`u' = \sigma + v x\sigma(1-\sigma)`, :math:`s =
\sqrt{\sigma_g^2+\epsilon}`, :math:`h = \gamma\,\mathrm{d}y`. No running statistics.

**Conventions** (``convention=``; catalogue ``formulas_vision_optim.md`` §4, and timm's
``layers/evo_norm.py`` read for this module):

=====================  ===========================================  =========================
                       ``"tf"`` (default: the authors' TF code,      ``"timm"``
                       ``tensorflow/tpu`` ``resnet_layers.py``)      (``EvoNorm2dB0/S0``)
=====================  ===========================================  =========================
running variance       biased batch variance (``tf.nn.moments``)     unbiased, ``m/(m-1)``
tie :math:`L = R`      all of the gradient to :math:`L`              half to each
                       (``tf.maximum``)                              (``torch.maximum``)
S0 groups              ``groups`` lowered until it divides C         must divide C
=====================  ===========================================  =========================

``eps`` is 1e-5 in both codes for S0 and in the TF code for B0; timm's ``EvoNorm2dB0``
defaults to ``eps=1e-3`` (pass it). The paper's formulas are the TF code's. Where :math:`D`
(B0) is NaN, the side of the ``max`` is unknown and every gradient that the element's
:math:`\mathrm{d}y` may reach is NaN.

Both are computed in float64 (``np.longdouble`` for longdouble input) and rounded once to
each input's dtype. A float64 call whose values leave about :math:`[10^{-77}, 10^{77}]`, where
:math:`x^2`, :math:`D^2` or :math:`s^3` of the backward would overflow or underflow, is done
whole in ``np.longdouble`` where it is wider (``_stats.out_of_range``, ``WideCache``).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, centered_exact, check_array, check_eps,
                                  check_flag, check_momentum, check_param, narrow, out_of_range,
                                  wider_dtype, widen, work_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_B0 = "evo_norm_b0"
_S0 = "evo_norm_s0"
_CONVENTIONS = ("tf", "timm")


def _check_convention(convention, op):
    if not isinstance(convention, str) or convention not in _CONVENTIONS:
        raise ValueError(f"{op}: `convention` must be 'tf' or 'timm', got {convention!r}")
    return convention


def _wider(work, *arrays):
    """The dtype to do the whole call in when its values leave the range where the work dtype
    holds the squares and products of the formulas (:func:`~refnorm.norms._stats.out_of_range`
    of the inputs as computed, i.e. cast to ``work``: float64 at about
    :math:`[10^{-77}, 10^{77}]`; float16 and float32 inputs never leave it), else None."""
    wider = wider_dtype(work)
    if wider is None or np.dtype(work) != np.float64:
        return None
    cast = (None if a is None else a.astype(work, copy=False) for a in arrays)
    return wider if out_of_range(*cast) else None


def _view(p, ndim, work):
    return p.reshape((1, -1) + (1,) * (ndim - 2)).astype(work)


def _sigmoid(z):
    """The logistic function, exact in both tails (no overflow of exp)."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ----------------------------------------------------------------------------------------------
# B0
# ----------------------------------------------------------------------------------------------
class EvoNormB0State(NamedTuple):
    running_var: np.ndarray | None     # \bar\sigma^2, shape (C,)


class EvoNormB0Cache(NamedTuple):
    x: np.ndarray              # work dtype
    D: np.ndarray | None       # max(L, R) (None without v)
    L: np.ndarray | None       # (1, C, 1, ...)
    S: np.ndarray | None       # (N, C, 1, ...)
    xc_i: np.ndarray | None    # x - mu_i
    xc_b: np.ndarray | None    # x - mu_b (None with running statistics)
    share: np.ndarray | None   # s: the share of the max going to R
    gamma: np.ndarray          # (1, C, 1, ...) (ones when weight is None)
    v: np.ndarray | None
    dtypes: tuple              # dtypes of x, weight, bias, v (None: absent)


class EvoNormB0Grads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dv: np.ndarray | None


def _share(diff, convention):
    """s from the sign of ``diff`` = R - L: 1 where R > L, 0 where R < L; a tie gives 1/2
    (timm) or 0 (TF: all to L); NaN where either side is NaN (the side is unknown). ``diff`` is
    formed as :math:`v x + (S - L)`, not from the rounded R: with one sample S and L are the
    same statistic, and :math:`v x` far below an ULP of S still decides the side."""
    tie = 0.5 if convention == "timm" else 0.0
    s = np.where(diff > 0, 1.0, np.where(diff == 0, tie, 0.0))
    return np.where(np.isnan(diff), np.nan, s)


def evo_norm_b0_forward(x, running_var, weight=None, bias=None, v=None, training=False,
                        momentum=0.1, eps=1e-5, *, convention="tf"):
    r"""EvoNorm-B0; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``, at least one spatial axis
    running_var : ndarray of shape (C,), or None
        :math:`\bar\sigma^2` (init 1). None: no running statistics; batch statistics are
        used in evaluation too. Never modified.
    weight, bias, v : ndarray of shape (C,), optional
        :math:`\gamma` (None: 1), :math:`\beta` (None: 0), :math:`v` (None: no
        nonlinearity, :math:`y = \gamma x + \beta`).
    training : bool, default False
    momentum : float, default 0.1
        The weight of the new value in the running variance.
    eps : float, default 1e-5
        In both square roots (timm's B0: 1e-3).
    convention : {"tf", "timm"}, keyword-only, default "tf"
        See the module docstring.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    new_state : EvoNormB0State
    cache : EvoNormB0Cache
    """
    x = check_array(x, "x", _B0, ndim_min=3)
    c = x.shape[1]
    running_var = check_param(running_var, "running_var", _B0, (c,))
    weight = check_param(weight, "weight", _B0, (c,))
    bias = check_param(bias, "bias", _B0, (c,))
    v = check_param(v, "v", _B0, (c,))
    training = check_flag(training, "training", _B0)
    momentum = check_momentum(momentum, _B0)
    eps = check_eps(eps, _B0)
    convention = _check_convention(convention, _B0)
    batch_stats = training or running_var is None
    m = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    if batch_stats and m <= 1 and v is not None:
        raise ValueError(f"{_B0}: Expected more than 1 value per channel when training, got "
                         f"`x` of shape {x.shape}")
    work = work_dtype(x, running_var, weight, bias, v)
    dtypes = tuple(None if a is None else a.dtype for a in (x, weight, bias, v))
    wider = _wider(work, x, running_var, weight, bias, v)
    if wider is not None:  # tiny or huge: the whole call, wider
        y, state, cache = evo_norm_b0_forward(
            x.astype(wider), widen(running_var, wider), widen(weight, wider),
            widen(bias, wider), widen(v, wider), training, momentum, eps, convention=convention)
        if running_var is not None:
            state = EvoNormB0State(narrow(state.running_var, running_var.dtype))
        return narrow(y, x.dtype), state, WideCache(cache, dtypes, wider)
    xw = x.astype(work)
    nd = x.ndim
    gamma = _view(weight, nd, work) if weight is not None else np.ones((1,) * nd, work)
    state = EvoNormB0State(running_var)
    if v is None:  # no nonlinearity: the affine map alone
        y = gamma * xw + (_view(bias, nd, work) if bias is not None else 0.0)
        return (narrow(y, x.dtype), state,
                EvoNormB0Cache(xw, None, None, None, None, None, None, gamma, None, dtypes))
    spatial = tuple(range(2, nd))
    batch = (0,) + spatial
    with np.errstate(invalid="ignore", divide="ignore"):  # eps = 0 on constant data: 0/0
        if x.size:
            xc_i, _ = centered_exact(xw, spatial)
            S = np.sqrt(np.mean(xc_i * xc_i, axis=spatial, keepdims=True) + eps)
        else:
            xc_i, S = xw.copy(), np.zeros(x.shape[:2] + (1,) * (nd - 2), work)
        xc_b = None
        if batch_stats:
            if x.size:
                xc_b, _ = centered_exact(xw, batch)
                var_b = np.mean(xc_b * xc_b, axis=batch, keepdims=True)
            else:
                xc_b, var_b = xw.copy(), np.zeros((1, c) + (1,) * (nd - 2), work)
            L = np.sqrt(var_b + eps)
        else:
            L = np.sqrt(_view(running_var, nd, work) + eps)
        vv = _view(v, nd, work)
        R = vv * xw + S
        D = np.maximum(L, R)
        share = _share(vv * xw + (S - L), convention)
        y = gamma * (xw / D)
    if bias is not None:
        y = y + _view(bias, nd, work)
    if training and running_var is not None:
        var = var_b.reshape(c)
        if convention == "timm":
            var = var * (m / (m - 1))
        new = (1.0 - momentum) * running_var.astype(work) + momentum * var
        state = EvoNormB0State(narrow(new, running_var.dtype))
    cache = EvoNormB0Cache(xw, D, L, S, xc_i, xc_b, share, gamma, vv, dtypes)
    return narrow(y, x.dtype), state, cache


def evo_norm_b0_backward(dy, cache):
    """Hand-derived VJP of :func:`evo_norm_b0_forward`: ``(dy, cache) -> EvoNormB0Grads``."""
    if isinstance(cache, WideCache):
        return cache.narrow(evo_norm_b0_backward(dy.astype(cache.wide_dtype), cache.inner))
    x, D, L, S, xc_i, xc_b, s, gamma, v, (x_dt, w_dt, b_dt, v_dt) = cache
    nd = x.ndim
    spatial = tuple(range(2, nd))
    chan = (0,) + spatial
    g = dy.astype(x.dtype)
    dbias = narrow(np.sum(g, axis=chan), b_dt) if b_dt is not None else None
    if D is None:
        dweight = narrow(np.sum(g * x, axis=chan), w_dt) if w_dt is not None else None
        return EvoNormB0Grads(narrow(gamma * g, x_dt), dweight, dbias, None)
    m_i = max(1, int(np.prod(x.shape[2:], dtype=np.int64)))
    with np.errstate(invalid="ignore", divide="ignore"):
        h = gamma * g
        a = h * x / (D * D)
        as_ = a * s
        dx = h / D - v * as_ - xc_i / (m_i * S) * np.sum(as_, axis=spatial, keepdims=True)
        if xc_b is not None:
            m_b = max(1, x.shape[0] * m_i)
            dx = dx - xc_b / (m_b * L) * np.sum(a * (1.0 - s), axis=chan, keepdims=True)
        dv = narrow(-np.sum(as_ * x, axis=chan), v_dt)
        dweight = narrow(np.sum(g * x / D, axis=chan), w_dt) if w_dt is not None else None
    return EvoNormB0Grads(narrow(dx, x_dt), dweight, dbias, dv)


evo_norm_b0 = custom_vjp(evo_norm_b0_forward, evo_norm_b0_backward, ("x", "weight", "bias", "v"),
                         stateful=True)
evo_norm_b0.__doc__ = ("Differentiable EvoNorm-B0 (engine op): returns ``(y, new_state)``; see "
                       ":func:`evo_norm_b0_forward`.")


def _carry_nan(a, b):
    """``(a - b)^2`` where ``a - b`` is NaN, else 0: added to ``max(a, b)`` it changes nothing
    but carries a NaN of either side into both gradients (as the hand backward does)."""
    d = a - b
    return ag.where(np.isnan(d.data), d * d, 0.0)


def evo_norm_b0_composite(x, running_var, weight=None, bias=None, v=None, training=False,
                          momentum=0.1, eps=1e-5, *, convention="tf"):
    """The same math with engine primitives only; the new state independently (no gradient)."""
    nd = x.ndim
    shape = (1, x.shape[1]) + (1,) * (nd - 2)
    spatial = tuple(range(2, nd))
    batch = (0,) + spatial
    gamma = ag.reshape(weight, shape) if weight is not None else 1.0
    beta = ag.reshape(bias, shape) if bias is not None else 0.0
    if v is None:
        return x * gamma + beta, EvoNormB0State(running_var)
    S = ag.sqrt(ag.var(x, spatial, keepdims=True) + eps)
    batch_stats = training or running_var is None
    L = ag.sqrt(ag.var(x, batch, keepdims=True) + eps) if batch_stats else \
        ag.as_tensor(np.sqrt(running_var.reshape(shape) + eps))
    R = ag.reshape(v, shape) * x + S
    if convention == "timm":
        D = ag.maximum(L, R)
    else:  # tf.maximum(L, R): a tie goes to L
        D = ag.where((R.data > L.data), R, L)
    D = D + _carry_nan(L, R)
    y = x / D * gamma + beta
    state = EvoNormB0State(running_var)
    if training and running_var is not None:
        with ag.no_grad():
            var = ag.var(x, batch).data
        m = x.data.size // x.shape[1]
        var = var * (m / (m - 1)) if convention == "timm" else var
        state = EvoNormB0State((1.0 - momentum) * running_var + momentum * var)
    return y, state


def evo_norm_b0_layer_init(features, *, apply_act=True, momentum=0.1, eps=1e-5,
                           convention="tf"):
    """``(params, state, kwargs)``: gamma 1, beta 0, v 1 (both codes), running variance 1."""
    params = {"weight": np.ones(features), "bias": np.zeros(features)}
    if apply_act:
        params["v"] = np.ones(features)
    return (params, {"running_var": np.ones(features)},
            {"momentum": momentum, "eps": eps, "convention": convention})


# ----------------------------------------------------------------------------------------------
# S0
# ----------------------------------------------------------------------------------------------
class EvoNormS0Cache(NamedTuple):
    x: np.ndarray             # work dtype
    xc: np.ndarray | None     # x - mu_g, (N, C, *)
    s: np.ndarray | None      # sqrt(var_g + eps), broadcast over (N, C, *)
    sig: np.ndarray | None    # sigmoid(v x)
    gamma: np.ndarray
    v: np.ndarray | None
    groups: int
    dtypes: tuple


class EvoNormS0Grads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dv: np.ndarray | None


def _groups(groups, channels, convention):
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool):
        raise TypeError(f"{_S0}: `groups` must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"{_S0}: `groups` must be >= 1, got {groups}")
    groups = int(groups)
    if convention == "tf":  # the authors' code lowers the count until it divides C
        groups = min(groups, channels) if channels else groups
        while channels and channels % groups:
            groups -= 1
    elif channels % groups:
        raise ValueError(f"{_S0}: `groups` must divide the number of channels x.shape[1] = "
                         f"{channels} with convention='timm', got {groups}")
    return groups


def _group_spread(a, x_shape, groups):
    """Per-(sample, group) values of shape (N, G, 1) spread over (N, C, *)."""
    n, c = x_shape[:2]
    rest = int(np.prod(x_shape[2:], dtype=np.int64))
    return np.broadcast_to(a, (n, groups, c // groups * rest)).reshape(x_shape)


def evo_norm_s0_forward(x, weight=None, bias=None, v=None, groups=32, eps=1e-5, *,
                        convention="tf"):
    r"""EvoNorm-S0: :math:`y = \gamma\,x\,\sigma(vx)/\sqrt{\sigma_g^2+\epsilon} + \beta`.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``, at least one spatial axis
    weight, bias, v : ndarray of shape (C,), optional
        :math:`\gamma`, :math:`\beta`, :math:`v` (None: no nonlinearity: the affine map).
    groups : int, default 32
        ``"tf"``: lowered until it divides C; ``"timm"``: must divide C.
    eps : float, default 1e-5
    convention : {"tf", "timm"}, keyword-only, default "tf"

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : EvoNormS0Cache
    """
    x = check_array(x, "x", _S0, ndim_min=3)
    c = x.shape[1]
    weight = check_param(weight, "weight", _S0, (c,))
    bias = check_param(bias, "bias", _S0, (c,))
    v = check_param(v, "v", _S0, (c,))
    eps = check_eps(eps, _S0)
    convention = _check_convention(convention, _S0)
    groups = _groups(groups, c, convention)
    work = work_dtype(x, weight, bias, v)
    dtypes = tuple(None if a is None else a.dtype for a in (x, weight, bias, v))
    wider = _wider(work, x, weight, bias, v)
    if wider is not None:  # tiny or huge: the whole call, wider
        y, cache = evo_norm_s0_forward(x.astype(wider), widen(weight, wider), widen(bias, wider),
                                       widen(v, wider), groups, eps, convention=convention)
        return narrow(y, x.dtype), WideCache(cache, dtypes, wider)
    xw = x.astype(work)
    nd = x.ndim
    gamma = _view(weight, nd, work) if weight is not None else np.ones((1,) * nd, work)
    if v is None:
        y = gamma * xw + (_view(bias, nd, work) if bias is not None else 0.0)
        return narrow(y, x.dtype), EvoNormS0Cache(xw, None, None, None, gamma,
                                                             None, groups, dtypes)
    n = x.shape[0]
    flat = xw.reshape(n, groups, c // groups * int(np.prod(x.shape[2:], dtype=np.int64)))
    with np.errstate(invalid="ignore", divide="ignore"):
        if flat.size:
            xc, _ = centered_exact(flat, (2,))
            s = np.sqrt(np.mean(xc * xc, axis=2, keepdims=True) + eps)
        else:
            xc, s = flat.copy(), np.ones((n, groups, 1), work)
        vv = _view(v, nd, work)
        sig = _sigmoid(vv * xw)
        s_full = _group_spread(s, x.shape, groups)
        y = gamma * (xw * sig / s_full)
    if bias is not None:
        y = y + _view(bias, nd, work)
    cache = EvoNormS0Cache(xw, xc.reshape(x.shape), s_full, sig, gamma, vv, groups, dtypes)
    return narrow(y, x.dtype), cache


def evo_norm_s0_backward(dy, cache):
    """Hand-derived VJP of :func:`evo_norm_s0_forward`: ``(dy, cache) -> EvoNormS0Grads``."""
    if isinstance(cache, WideCache):
        return cache.narrow(evo_norm_s0_backward(dy.astype(cache.wide_dtype), cache.inner))
    x, xc, s, sig, gamma, v, groups, (x_dt, w_dt, b_dt, v_dt) = cache
    nd = x.ndim
    chan = (0,) + tuple(range(2, nd))
    g = dy.astype(x.dtype)
    dbias = narrow(np.sum(g, axis=chan), b_dt) if b_dt is not None else None
    if sig is None:
        dweight = narrow(np.sum(g * x, axis=chan), w_dt) if w_dt is not None else None
        return EvoNormS0Grads(narrow(gamma * g, x_dt), dweight, dbias, None)
    n = x.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        h = gamma * g
        u = x * sig
        dsig = sig * (1.0 - sig)
        du = sig + v * x * dsig
        hu = np.sum((h * u).reshape(n, groups, x.size // max(n * groups, 1)), axis=2,
                    keepdims=True)
        m_g = max(1, x.size // max(n * groups, 1))
        dx = h * du / s - xc / (m_g * s ** 3) * _group_spread(hu, x.shape, groups)
        dv = narrow(np.sum(h * x * x * dsig / s, axis=chan), v_dt)
        dweight = narrow(np.sum(g * u / s, axis=chan), w_dt) if w_dt is not None else None
    return EvoNormS0Grads(narrow(dx, x_dt), dweight, dbias, dv)


evo_norm_s0 = custom_vjp(evo_norm_s0_forward, evo_norm_s0_backward, ("x", "weight", "bias", "v"))
evo_norm_s0.__doc__ = "Differentiable EvoNorm-S0 (engine op); see :func:`evo_norm_s0_forward`."


def evo_norm_s0_composite(x, weight=None, bias=None, v=None, groups=32, eps=1e-5, *,
                          convention="tf"):
    """The same math with engine primitives only: the engine derives its own gradient."""
    nd = x.ndim
    shape = (1, x.shape[1]) + (1,) * (nd - 2)
    gamma = ag.reshape(weight, shape) if weight is not None else 1.0
    beta = ag.reshape(bias, shape) if bias is not None else 0.0
    if v is None:
        return x * gamma + beta
    groups = _groups(groups, x.shape[1], convention)
    n = x.shape[0]
    flat = ag.reshape(x, (n, groups, -1))
    s = ag.sqrt(ag.var(flat, 2, keepdims=True) + eps)
    num = ag.reshape(x * ag.sigmoid(ag.reshape(v, shape) * x), (n, groups, -1))
    return ag.reshape(num / s, x.shape) * gamma + beta


def evo_norm_s0_layer_init(features, *, apply_act=True, groups=32, eps=1e-5, convention="tf"):
    """``(params, state, kwargs)``: gamma 1, beta 0, v 1 (both codes); no state."""
    params = {"weight": np.ones(features), "bias": np.zeros(features)}
    if apply_act:
        params["v"] = np.ones(features)
    return params, {}, {"groups": groups, "eps": eps, "convention": convention}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _params(rng, c, affine=True, act=True):
    weight = 1.0 + 0.3 * rng.standard_normal(c) if affine else None
    bias = 0.3 * rng.standard_normal(c) if affine else None
    v = 1.0 + 0.3 * rng.standard_normal(c) if act else None
    return weight, bias, v


def _b0_case(rng, name, shape, *, x=None, training=True, running=True, affine=True, act=True,
             **kwargs):
    x = rng.standard_normal(shape) if x is None else x
    weight, bias, v = _params(rng, shape[1], affine, act)
    rv = rng.uniform(0.5, 2.0, shape[1]) if running else None
    return SampleInput(name, (x, weight, bias, v),
                       dict(running_var=rv, training=training, **kwargs))


def b0_sample_inputs(rng):
    yield _b0_case(rng, "(4,3,2,2)-tf", (4, 3, 2, 2))
    yield _b0_case(rng, "(3,2,5)-timm-eps1e-3", (3, 2, 5), convention="timm", eps=1e-3)
    yield _b0_case(rng, "(3,2,2,3)-eval", (3, 2, 2, 3), training=False)
    yield _b0_case(rng, "(3,2,4)-timm-eval", (3, 2, 4), training=False, convention="timm")
    yield _b0_case(rng, "(1,3,3,3)-N1", (1, 3, 3, 3))
    yield _b0_case(rng, "(3,2,4)-no-running-stats-eval", (3, 2, 4), training=False,
                   running=False)
    yield _b0_case(rng, "(3,2,4)-no-affine", (3, 2, 4), affine=False)
    yield _b0_case(rng, "(3,2,4)-no-nonlinearity", (3, 2, 4), act=False)
    yield _b0_case(rng, "(4,3,1)-one-spatial-element", (4, 3, 1))
    # v < 0 and large |x|: R < L on many elements, both branches of the max are exercised
    yield _b0_case(rng, "(3,2,5)-both-branches", (3, 2, 5), x=3.0 * rng.standard_normal((3, 2, 5)))
    constant = rng.standard_normal((3, 2, 4))
    constant[:, 0] = 0.7
    yield _b0_case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant)
    yield _b0_case(rng, "(3,2,4)-mean100", (3, 2, 4), x=100.0 + rng.standard_normal((3, 2, 4)))


def b0_oracle_inputs(rng):
    yield _b0_case(rng, "(16,37,13,11)", (16, 37, 13, 11))
    yield _b0_case(rng, "(8,5,33,33)-timm-eps1e-3", (8, 5, 33, 33), convention="timm", eps=1e-3)
    yield _b0_case(rng, "(16,37,9,9)-eval", (16, 37, 9, 9), training=False)
    yield _b0_case(rng, "(3,5,7,9)-no-nonlinearity", (3, 5, 7, 9), act=False)
    yield _b0_case(rng, "(4,5,9,9)-mean1e4-std1e-3", (4, 5, 9, 9),
                   x=1e4 + 1e-3 * rng.standard_normal((4, 5, 9, 9)))
    yield _b0_case(rng, "(6,7,33)-tiny-scale", (6, 7, 33),
                   x=1e-20 * rng.standard_normal((6, 7, 33)))
    yield _b0_case(rng, "(6,7,33)-huge-scale", (6, 7, 33),
                   x=1e20 * rng.standard_normal((6, 7, 33)))


def b0_error_inputs():
    x, c = np.ones((2, 3, 4)), np.ones(3)

    def call(name, x=x, weight=None, bias=None, v=c, **kwargs):
        return SampleInput(name, (x, weight, bias, v), {"running_var": c.copy(), **kwargs})

    yield ErrorInput(call("list x", x=[[[1.0]]]), TypeError,
                     r"evo_norm_b0: `x` must be a numpy.ndarray")
    yield ErrorInput(call("2-d x", x=np.ones((2, 3))), ValueError,
                     r"`x` must have at least 3 dimensions")
    yield ErrorInput(call("running_var", running_var=np.ones(2)), ValueError,
                     r"`running_var` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("v", v=np.ones(4)), ValueError, r"`v` must have shape \(3,\)")
    yield ErrorInput(call("training", training=1), TypeError, r"`training` must be a bool")
    yield ErrorInput(call("momentum", momentum=None), ValueError,
                     r"`momentum` must be a finite number")
    yield ErrorInput(call("eps", eps=-1.0), ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(call("convention", convention="jax"), ValueError,
                     r"`convention` must be 'tf' or 'timm'")
    yield ErrorInput(call("one value per channel", x=np.ones((1, 3, 1)), training=True),
                     ValueError, r"Expected more than 1 value per channel when training")


def _b0_torch_call(torch, x, weight, bias, v, *, running_var, training=False, momentum=0.1,
                   eps=1e-5, convention="tf"):
    """EvoNorm-B0 in torch ops (torch has none): timm's ``EvoNorm2dB0`` for "timm", the TF
    code's update and tie for "tf". The state may be NumPy or tensors; it comes back as
    tensors."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    spatial = tuple(range(2, x.ndim))
    batch = (0,) + spatial
    rv = None if running_var is None else torch.as_tensor(running_var).to(x.device)
    state = {"running_var": rv}
    gamma = weight.reshape(shape) if weight is not None else 1.0
    beta = bias.reshape(shape) if bias is not None else 0.0
    if v is None:
        return x * gamma + beta, state
    var = x.var(dim=batch, unbiased=False)
    if training and rv is not None:
        m = x.numel() // x.shape[1]
        new = var.detach() * (m / (m - 1)) if convention == "timm" else var.detach()
        state["running_var"] = rv * (1 - momentum) + new.to(rv.dtype) * momentum
    L = (var if training or rv is None else rv.to(x.dtype)).add(eps).sqrt().reshape(shape)
    S = x.var(dim=spatial, unbiased=False, keepdim=True).add(eps).sqrt()
    R = x * v.reshape(shape) + S
    D = torch.maximum(L, R) if convention == "timm" else torch.where(R > L, R, L)
    d = L - R   # a NaN of either side reaches both gradients (refnorm's convention)
    D = D + torch.where(torch.isnan(d), d * d, torch.zeros_like(d))
    return x / D * gamma + beta, state


def _s0_case(rng, name, shape, *, x=None, affine=True, act=True, **kwargs):
    x = rng.standard_normal(shape) if x is None else x
    weight, bias, v = _params(rng, shape[1], affine, act)
    return SampleInput(name, (x, weight, bias, v), kwargs)


def s0_sample_inputs(rng):
    yield _s0_case(rng, "(2,4,3,3)-G2", (2, 4, 3, 3), groups=2)
    yield _s0_case(rng, "(2,6,5)-timm-G3", (2, 6, 5), groups=3, convention="timm")
    yield _s0_case(rng, "(2,6,2,2)-tf-G4-lowered-to-3", (2, 6, 2, 2), groups=4)
    yield _s0_case(rng, "(1,3,2,3)-N1-G32-lowered-to-3", (1, 3, 2, 3))
    yield _s0_case(rng, "(2,4,3)-no-affine-G1", (2, 4, 3), groups=1, affine=False)
    yield _s0_case(rng, "(2,4,3)-no-nonlinearity", (2, 4, 3), groups=2, act=False)
    yield _s0_case(rng, "(3,4,1)-G4-one-element-groups", (3, 4, 1), groups=4, eps=0.1)
    constant = rng.standard_normal((2, 4, 3))
    constant[0, :2] = 0.7
    yield _s0_case(rng, "(2,4,3)-constant-group", (2, 4, 3), groups=2, x=constant)
    yield _s0_case(rng, "(2,4,3)-mean100", (2, 4, 3), groups=2,
                   x=100.0 + rng.standard_normal((2, 4, 3)))


def s0_oracle_inputs(rng):
    yield _s0_case(rng, "(8,64,13,11)-G32", (8, 64, 13, 11))
    yield _s0_case(rng, "(3,30,7,9)-timm-G5", (3, 30, 7, 9), groups=5, convention="timm")
    yield _s0_case(rng, "(2,8,128,128)-long-groups-G2", (2, 8, 128, 128), groups=2)
    yield _s0_case(rng, "(4,6,9,9)-mean1e4-std1e-3", (4, 6, 9, 9), groups=3,
                   x=1e4 + 1e-3 * rng.standard_normal((4, 6, 9, 9)))
    yield _s0_case(rng, "(3,10,33)-tiny-scale", (3, 10, 33), groups=5,
                   x=1e-20 * rng.standard_normal((3, 10, 33)))
    yield _s0_case(rng, "(3,10,33)-huge-scale", (3, 10, 33), groups=5,
                   x=1e20 * rng.standard_normal((3, 10, 33)))


def s0_error_inputs():
    x, c = np.ones((2, 4, 3)), np.ones(4)

    def call(name, x=x, v=c, **kwargs):
        return SampleInput(name, (x, None, None, v), kwargs)

    yield ErrorInput(call("list x", x=[[[1.0]]]), TypeError,
                     r"evo_norm_s0: `x` must be a numpy.ndarray")
    yield ErrorInput(call("2-d x", x=np.ones((2, 4))), ValueError,
                     r"`x` must have at least 3 dimensions")
    yield ErrorInput(call("v", v=np.ones(3)), ValueError, r"`v` must have shape \(4,\)")
    yield ErrorInput(call("groups float", groups=2.0), TypeError, r"`groups` must be an int")
    yield ErrorInput(call("groups 0", groups=0), ValueError, r"`groups` must be >= 1")
    yield ErrorInput(call("groups timm", groups=3, convention="timm"), ValueError,
                     r"`groups` must divide the number of channels")
    yield ErrorInput(call("eps", eps=float("inf")), ValueError,
                     r"`eps` must be a finite number >= 0")


def _s0_torch_call(torch, x, weight, bias, v, *, groups=32, eps=1e-5, convention="tf"):
    """EvoNorm-S0 in torch ops (timm's ``EvoNorm2dS0`` for any spatial rank)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    gamma = weight.reshape(shape) if weight is not None else 1.0
    beta = bias.reshape(shape) if bias is not None else 0.0
    if v is None:
        return x * gamma + beta
    g = _groups(groups, x.shape[1], convention)
    n = x.shape[0]
    std = x.reshape(n, g, -1).var(dim=2, unbiased=False, keepdim=True).add(eps).sqrt()
    num = (x * torch.sigmoid(x * v.reshape(shape))).reshape(n, g, -1)
    return (num / std).reshape(x.shape) * gamma + beta


_PAPER = Paper("Evolving Normalization-Activation Layers", "Liu, Brock, Simonyan, Le", 2020,
               "arXiv:2004.02967")

SPEC_B0 = NormSpec(
    name=_B0,
    title="EvoNorm-B0",
    paper=_PAPER,
    forward=evo_norm_b0_forward,
    backward=evo_norm_b0_backward,
    op=evo_norm_b0,
    composite=evo_norm_b0_composite,
    diff_argnames=("x", "weight", "bias", "v"),
    sample_inputs=b0_sample_inputs,
    oracle_inputs=b0_oracle_inputs,
    error_inputs=b0_error_inputs,
    stateful=True,
    train_eval_differ=True,
    torch_call=_b0_torch_call,
    param_layout="channel",
    layer_init=evo_norm_b0_layer_init,
)

SPEC_S0 = NormSpec(
    name=_S0,
    title="EvoNorm-S0",
    paper=_PAPER,
    forward=evo_norm_s0_forward,
    backward=evo_norm_s0_backward,
    op=evo_norm_s0,
    composite=evo_norm_s0_composite,
    diff_argnames=("x", "weight", "bias", "v"),
    sample_inputs=s0_sample_inputs,
    oracle_inputs=s0_oracle_inputs,
    error_inputs=s0_error_inputs,
    torch_call=_s0_torch_call,
    param_layout="channel",
    layer_init=evo_norm_s0_layer_init,
)

r"""Weight Standardization and Scaled Weight Standardization: standardized convolution weights.

Both reparametrize a weight :math:`W` of shape ``(out, *)`` (a Conv weight ``(O, I, kh, kw)``,
a Linear weight ``(O, I)``) slice by slice: output channel :math:`o` holds the fan-in
:math:`N = \prod *` values :math:`W_{o,\cdot}`, with

.. math::

   \mu_o = \tfrac1N \textstyle\sum_j W_{oj},\qquad d = W_o - \mu_o,\qquad
   q_o = \textstyle\sum_j d_j^2 .

The layer then convolves with the returned weight; its bias is untouched.

**Weight Standardization** (Qiao, Wang, Liu, Shen, Yuille, *Micro-Batch Training with
Batch-Channel Normalization and Weight Standardization*, arXiv:1903.10520, 2019):

.. math::

   \hat W_o = \frac{d}{s_o},\qquad
   \sigma_o^2 = \frac{q_o}{k},\qquad
   s_o = \sigma_o + \epsilon \;\;\text{(eps outside, default)}\quad\text{or}\quad
   s_o = \sqrt{\sigma_o^2 + \epsilon}\;\;\text{(eps inside)},

with :math:`k = N - 1` (``unbiased=True``, default) or :math:`k = N`. Backward (derivation:
``docs/derivations/weight_standardization.rst``), :math:`G = \mathrm{d}\hat W`, sums per slice:

.. math::

   \mathrm{d}W_o = \frac{1}{s_o}\Bigl(G - \langle G\rangle
       - \frac{d\,\sum_j G_j d_j}{k\,s_o\,\rho_o}\Bigr),\qquad
   \rho_o = \sigma_o\ \text{(outside)},\quad \rho_o = s_o\ \text{(inside)} .

Conventions. The official code disagrees with itself and with the paper (catalogue
``formulas_vision_optim.md`` §6a): the authors' README PyTorch layer (``torch.std_mean``) uses
the **unbiased** standard deviation with ``eps = 1e-5`` **outside** the square root, which is
the default here; ``unbiased=False`` gives the README's TensorFlow layer (``keras.backend.std``);
``eps_inside=True`` the authors' BCN code (``imagenet/models/layers.py``, unbiased, inside);
``unbiased=False, eps_inside=True`` the paper and timm's ``StdConv2d`` (timm's default eps is
1e-6). Only that last form standardizes exactly (output variance :math:`\sigma^2/(\sigma^2 +
\epsilon)`), so only its samples declare statistics axes.

Discrepancy kept on purpose: with eps outside, a constant slice (:math:`\sigma_o = 0`) has
:math:`\hat W_o = 0` and PyTorch's ``std`` backward returns NaN there (it divides by
:math:`\sigma`); the exact derivative exists (the :math:`\rho` term is multiplied by
:math:`d = 0`) and refnorm returns it, :math:`(G - \langle G\rangle)/\epsilon`.

**Scaled Weight Standardization** (Brock, De, Smith, *Characterizing signal propagation to close
the performance gap in unnormalized ResNets*, ICLR 2021, arXiv:2101.08692; Brock, De, Smith,
Simonyan, NFNets, arXiv:2102.06171; used without normalization layers by FedWon, Zhuang & Lyu,
ICLR 2024, arXiv:2306.05879):

.. math::

   \hat W_o = c_o\,\frac{d}{D_o},\qquad c_o = \mathrm{gain}_o\,\gamma,\qquad
   D_o = \sqrt{\max(q_o, \epsilon)}\ \text{(``eps_mode="clamp"``, default)}\quad\text{or}\quad
   D_o = \sqrt{q_o + N\epsilon} = \sqrt N\sqrt{\sigma_o^2+\epsilon}\ \text{(``"add"``)},

:math:`\sigma^2` biased. Backward, with :math:`t_o = 1` (``"add"``; ``"clamp"`` with
:math:`q_o > \epsilon`), 0 (clamped) or 1/2 (a tie, as JAX's ``maximum`` splits it):

.. math::

   \mathrm{d}W_o = \frac{c_o}{D_o}\Bigl(G - \langle G\rangle
       - t_o\,\frac{d \sum_j G_j d_j}{D_o^2}\Bigr),\qquad
   \mathrm{d}\,\mathrm{gain}_o = \gamma\,\frac{\sum_j G_j d_j}{D_o} .

Conventions. ``"clamp"`` with ``eps = 1e-4`` is DeepMind's official NFNet code
(``nfnets/base.py``, ``WSConv2D``: :math:`(W-\mu)\,\mathrm{rsqrt}(\max(N\sigma^2, 10^{-4}))`,
gain initialized to 1); ``"add"`` is timm's ``ScaledStdConv2d`` (:math:`\gamma/\sqrt N`
outside, eps inside, default 1e-6; NFNet configs pass 1e-5). ``eps = 0`` gives FedWon's
formula (its Eq. 3: :math:`\gamma (W-\mu)/(\sigma\sqrt N)`, no eps, no gain; pass ``gain=None``).
:math:`\gamma` is the activation's gain (the constant that restores unit variance after the
nonlinearity, :data:`ACTIVATION_GAMMA`, DeepMind's empirical values); DeepMind applies it in the
activation, timm in the convolution, which is equivalent for a conv that consumes an activation
output. FedWon does not state its :math:`\gamma` (addendum §4); 1.0 is the default here.

Both forms are computed in float64 (``np.longdouble`` for longdouble inputs) and rounded once to
the dtype of each input (:func:`refnorm.norms._stats.work_dtype`). The slices that float64 cannot
do right (a spread below about :math:`10^{-154}`, whose squares underflow, or values above about
:math:`10^{154}`, whose squares overflow: :func:`refnorm.norms._stats.extreme_groups`) are done
again in :func:`refnorm.norms._stats.wider_dtype`, and the cache keeps their sub-cache.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (centered_exact, check_array, check_eps, check_flag,
                                  extreme_groups, wider_dtype, work_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_WS = "weight_standardization"
_SWS = "scaled_weight_standardization"

#: DeepMind's empirical activation gains (``nfnets/base.py``, ``nonlinearities``): the factor that
#: gives an activation of a unit Gaussian unit variance again. ReLU's analytic value is
#: :math:`\sqrt{2/(1-1/\pi)} = 1.71286`; the code's empirical one is used.
ACTIVATION_GAMMA = {
    "identity": 1.0, "celu": 1.270926833152771, "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571, "glu": 1.8484294414520264, "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607, "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646, "relu6": 1.7131484746932983, "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291, "silu": 1.7881293296813965, "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233, "tanh": 1.5939117670059204,
}


def _rows(weight, op):
    """``weight`` (out, *) as (out, N) rows in the work dtype; N >= 1 required."""
    check_array(weight, "weight", op, ndim_min=2)
    fan_in = int(np.prod(weight.shape[1:], dtype=np.int64))
    if fan_in == 0:
        raise ValueError(f"{op}: `weight` must have a non-empty fan-in (every axis but 0 of "
                         f"size >= 1), got shape {weight.shape}")
    return weight.reshape(weight.shape[0], fan_in).astype(work_dtype(weight), copy=False)


def _extreme_rows(rows, var, r):
    """Rows (slices) to redo in :func:`wider_dtype`: :func:`extreme_groups` of their statistics,
    and the finite rows whose statistics are NaN (values near the largest float: the sum of the
    mean overflowed). Empty where there is no wider dtype."""
    if wider_dtype(rows.dtype) is None or not rows.size:
        return np.zeros(0, np.intp)
    idx = extreme_groups(var, r)
    nan = np.isnan(np.ravel(var))
    if nan.any():
        nan &= np.isfinite(rows).all(axis=1)
        idx = np.union1d(idx, np.flatnonzero(nan))
    return idx


# ----------------------------------------------------------------------------------------------
# Weight Standardization
# ----------------------------------------------------------------------------------------------
class WSCache(NamedTuple):
    d: np.ndarray          # W - mu, (out, N), work dtype
    s: np.ndarray          # s_o, (out, 1)
    rho: np.ndarray        # sigma_o (eps outside) or s_o (eps inside), (out, 1)
    k: int                 # N - 1 or N
    shape: tuple           # the weight's shape
    dtype: np.dtype        # the weight's dtype
    wide: tuple | None = None  # (rows, sub-cache) of the rows done in a wider dtype, or None


class WSGrads(NamedTuple):
    dweight: np.ndarray


def weight_standardization_forward(weight, eps=1e-5, *, unbiased=True, eps_inside=False):
    r"""Standardize each output channel of ``weight``: :math:`\hat W_o = (W_o - \mu_o)/s_o`.

    Parameters
    ----------
    weight : ndarray of shape ``(out, *)``, at least 2 dimensions
    eps : float, default 1e-5
    unbiased : bool, keyword-only, default True
        :math:`\sigma^2 = q/(N-1)` (the authors' PyTorch code), else :math:`q/N`. Needs a fan-in
        :math:`N \ge 2`.
    eps_inside : bool, keyword-only, default False
        :math:`s = \sqrt{\sigma^2+\epsilon}`; default :math:`s = \sigma + \epsilon`.

    Returns
    -------
    w_hat : ndarray, the shape and dtype of ``weight``
    cache : WSCache
    """
    rows = _rows(weight, _WS)
    eps = check_eps(eps, _WS)
    unbiased = check_flag(unbiased, "unbiased", _WS)
    eps_inside = check_flag(eps_inside, "eps_inside", _WS)
    n = rows.shape[1]
    if unbiased and n < 2:
        raise ValueError(f"{_WS}: `weight` must have a fan-in of at least 2 with unbiased=True "
                         f"(the unbiased variance divides by N - 1), got shape {weight.shape}")
    k = n - 1 if unbiased else n
    # eps = 0 on a constant slice: 0/0; tiny or huge slices: redone below
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        d, _ = centered_exact(rows, (1,)) if rows.size else (rows.copy(), None)
        var = np.sum(d * d, axis=1, keepdims=True) / k
        sigma = np.sqrt(var)
        s = np.sqrt(var + eps) if eps_inside else sigma + eps
        w_hat = d / s
        extreme = _extreme_rows(rows, var, 1.0 / s)
    rho = s if eps_inside else sigma
    wide = None
    if extreme.size:  # subnormal spread or huge values: those slices again, in a wider dtype
        w_wide, sub = weight_standardization_forward(
            rows[extreme].astype(wider_dtype(rows.dtype)), eps, unbiased=unbiased,
            eps_inside=eps_inside)
        with np.errstate(over="ignore", under="ignore"):  # rounded as the exact values
            w_hat[extreme] = w_wide
        wide = (extreme, sub)
    return (w_hat.reshape(weight.shape).astype(weight.dtype, copy=False),
            WSCache(d, s, rho, k, weight.shape, weight.dtype, wide))


def weight_standardization_backward(dw_hat, cache):
    r"""Hand-derived VJP: :math:`\mathrm{d}W = (G - \langle G\rangle - d\,\langle G, d\rangle/
    (k s \rho))/s`, the last term 0 where :math:`d = 0` (a constant slice, eps outside)."""
    d, s, rho, k, shape, dtype, wide = cache
    g = dw_hat.reshape(d.shape).astype(d.dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        gd = np.sum(g * d, axis=1, keepdims=True)
        coef = np.where(rho == 0, 0.0, gd / (k * s * rho))
        dw = (g - np.mean(g, axis=1, keepdims=True) - d * coef) / s
    if wide is not None:  # the slices done in a wider dtype: their backward there
        idx, sub = wide
        with np.errstate(over="ignore", under="ignore"):
            dw[idx] = weight_standardization_backward(g[idx].astype(sub.d.dtype), sub).dweight
    return WSGrads(dw.reshape(shape).astype(dtype, copy=False))


weight_standardization = custom_vjp(weight_standardization_forward,
                                    weight_standardization_backward, ("weight",))
weight_standardization.__doc__ = ("Differentiable weight standardization (engine op); see "
                                  ":func:`weight_standardization_forward`.")


def weight_standardization_composite(weight, eps=1e-5, *, unbiased=True, eps_inside=False):
    """The same math with engine primitives only: the engine derives its own gradient."""
    axes = tuple(range(1, weight.ndim))
    n = int(np.prod(weight.shape[1:]))
    d = weight - ag.mean(weight, axes, keepdims=True)
    var = ag.sum(d * d, axes, keepdims=True) / (n - 1 if unbiased else n)
    s = ag.sqrt(var + eps) if eps_inside else ag.sqrt(var) + eps
    return d / s


# ----------------------------------------------------------------------------------------------
# Scaled Weight Standardization
# ----------------------------------------------------------------------------------------------
class SWSCache(NamedTuple):
    d: np.ndarray          # W - mu, (out, N), work dtype
    D: np.ndarray          # D_o, (out, 1)
    c: np.ndarray          # gain_o * gamma, (out, 1)
    t: np.ndarray          # share of the variance path: 1, 0 (clamped) or 1/2 (tie), (out, 1)
    gamma: float
    has_gain: bool
    shape: tuple
    dtype: np.dtype
    gain_dtype: np.dtype | None
    wide: tuple | None = None  # (rows, sub-cache) of the rows done in a wider dtype, or None


class SWSGrads(NamedTuple):
    dweight: np.ndarray
    dgain: np.ndarray | None


def _gain_shape(shape):
    return (shape[0],) + (1,) * (len(shape) - 1)


def scaled_weight_standardization_forward(weight, gain=None, gamma=1.0, eps=1e-4, *,
                                          eps_mode="clamp"):
    r""":math:`\hat W_o = \mathrm{gain}_o\,\gamma\,(W_o - \mu_o)/D_o` (see the module docstring).

    Parameters
    ----------
    weight : ndarray of shape ``(out, *)``, at least 2 dimensions
    gain : ndarray of shape ``(out, 1, ..., 1)``, optional
        The learned per-channel gain (initialized to 1); None means 1 (FedWon).
    gamma : float, default 1.0
        The activation's gain (:data:`ACTIVATION_GAMMA`), a constant.
    eps : float, default 1e-4
        ``"clamp"``: the floor of :math:`N\sigma^2` (DeepMind's 1e-4); ``"add"``: added to
        :math:`\sigma^2` (timm: 1e-6, NFNet configs 1e-5).
    eps_mode : {"clamp", "add"}, keyword-only, default "clamp"

    Returns
    -------
    w_hat : ndarray, the shape and dtype of ``weight``
    cache : SWSCache
    """
    rows = _rows(weight, _SWS)
    if gain is not None:
        check_array(gain, "gain", _SWS)
        if gain.shape != _gain_shape(weight.shape):
            raise ValueError(f"{_SWS}: `gain` must have shape {_gain_shape(weight.shape)}, got "
                             f"{gain.shape}")
    gamma = check_eps(gamma, _SWS, name="gamma")
    eps = check_eps(eps, _SWS)
    if not isinstance(eps_mode, str) or eps_mode not in ("clamp", "add"):
        raise ValueError(f"{_SWS}: `eps_mode` must be 'clamp' or 'add', got {eps_mode!r}")
    work = work_dtype(weight, gain)
    rows = rows.astype(work, copy=False)
    n = rows.shape[1]
    gain_rows = gain.reshape(-1, 1).astype(work) if gain is not None else None
    # eps = 0, constant slice: 0/0; tiny or huge slices: redone below
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        d, _ = centered_exact(rows, (1,)) if rows.size else (rows.copy(), None)
        q = np.sum(d * d, axis=1, keepdims=True)
        if eps_mode == "add":
            D = np.sqrt(q + n * eps)
            t = np.ones_like(q)
        else:
            D = np.sqrt(np.maximum(q, eps))
            t = np.where(q > eps, 1.0, np.where(q == eps, 0.5, 0.0))
        c = gamma * (gain_rows if gain is not None else np.ones_like(q))
        w_hat = c * (d / D)
        extreme = _extreme_rows(rows, q / n, 1.0 / D)
    wide = None
    if extreme.size:  # subnormal spread or huge values: those slices again, in a wider dtype
        wider = wider_dtype(rows.dtype)
        w_wide, sub = scaled_weight_standardization_forward(
            rows[extreme].astype(wider),
            None if gain is None else gain_rows[extreme].astype(wider), gamma, eps,
            eps_mode=eps_mode)
        with np.errstate(over="ignore", under="ignore"):  # rounded as the exact values
            w_hat[extreme] = w_wide
        wide = (extreme, sub)
    cache = SWSCache(d, D, c, t, gamma, gain is not None, weight.shape, weight.dtype,
                     None if gain is None else gain.dtype, wide)
    return w_hat.reshape(weight.shape).astype(weight.dtype, copy=False), cache


def scaled_weight_standardization_backward(dw_hat, cache):
    r"""Hand-derived VJP: :math:`\mathrm{d}W = \frac{c}{D}(G - \langle G\rangle -
    t\,d\,\langle G, d\rangle/D^2)`, :math:`\mathrm{d}\,\mathrm{gain} = \gamma\langle G,
    d\rangle/D`."""
    d, D, c, t, gamma, has_gain, shape, dtype, gain_dtype, wide = cache
    g = dw_hat.reshape(d.shape).astype(d.dtype, copy=False)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        gd = np.sum(g * d, axis=1, keepdims=True)
        dw = (c / D) * (g - np.mean(g, axis=1, keepdims=True) - d * (t * gd / (D * D)))
        dgain = gamma * gd / D
    if wide is not None:  # the slices done in a wider dtype: their backward there
        idx, sub = wide
        grads = scaled_weight_standardization_backward(g[idx].astype(sub.d.dtype), sub)
        with np.errstate(over="ignore", under="ignore"):
            dw[idx] = grads.dweight
            if has_gain:
                dgain[idx] = grads.dgain
    if has_gain:
        with np.errstate(over="ignore", under="ignore"):
            dgain = dgain.reshape(_gain_shape(shape)).astype(gain_dtype)
    return SWSGrads(dw.reshape(shape).astype(dtype, copy=False), dgain if has_gain else None)


scaled_weight_standardization = custom_vjp(scaled_weight_standardization_forward,
                                           scaled_weight_standardization_backward,
                                           ("weight", "gain"))
scaled_weight_standardization.__doc__ = ("Differentiable scaled weight standardization (engine "
                                         "op); see :func:`scaled_weight_standardization_forward`.")


def scaled_weight_standardization_composite(weight, gain=None, gamma=1.0, eps=1e-4, *,
                                            eps_mode="clamp"):
    """The same math with engine primitives only (``maximum`` splits a tie, as JAX does)."""
    axes = tuple(range(1, weight.ndim))
    n = int(np.prod(weight.shape[1:]))
    d = weight - ag.mean(weight, axes, keepdims=True)
    q = ag.sum(d * d, axes, keepdims=True)
    D = ag.sqrt(q + n * eps) if eps_mode == "add" else ag.sqrt(ag.maximum(q, eps))
    out = d / D * gamma
    return out * gain if gain is not None else out


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _draw(rng, shape):
    """A random weight, of a random scale: its first draw is not the generator's first
    normal, so a gradient check seeded like the case does not get a cotangent proportional to
    the weight (for these scale-invariant maps J^T w = 0: a vacuous check)."""
    return np.exp(0.5 * rng.standard_normal()) * rng.standard_normal(shape)


def _ws_case(rng, name, shape, w=None, **kwargs):
    w = _draw(rng, shape) if w is None else w
    return SampleInput(name, (w,), kwargs)


def ws_sample_inputs(rng):
    yield _ws_case(rng, "(4,3,3,3)-conv", (4, 3, 3, 3))
    yield _ws_case(rng, "(5,7)-linear", (5, 7))
    yield _ws_case(rng, "(3,2,2,2)-biased-inside", (3, 2, 2, 2), unbiased=False, eps_inside=True)
    yield _ws_case(rng, "(3,2,3)-unbiased-inside-eps1e-2", (3, 2, 3), eps=1e-2, eps_inside=True)
    yield _ws_case(rng, "(3,6)-biased-outside", (3, 6), unbiased=False)
    yield _ws_case(rng, "(1,5)-one-output-channel", (1, 5))
    yield _ws_case(rng, "(4,3)-fan-in-3", (4, 3))
    yield _ws_case(rng, "(4,1,1)-fan-in-1-biased", (4, 1, 1), unbiased=False, eps_inside=True)
    yield _ws_case(rng, "(3,5)-mean100", (3, 5), w=100.0 + rng.standard_normal((3, 5)))
    yield _ws_case(rng, "(3,5)-constant-slices-inside", (3, 5),
                   w=np.repeat(rng.standard_normal((3, 1)), 5, axis=1), eps_inside=True,
                   unbiased=False)


def ws_oracle_inputs(rng):
    yield _ws_case(rng, "(64,3,7,7)-conv", (64, 3, 7, 7))
    yield _ws_case(rng, "(33,17,3,3)-odd", (33, 17, 3, 3))
    yield _ws_case(rng, "(129,65)-linear-biased-inside-eps1e-6", (129, 65), unbiased=False,
                   eps_inside=True, eps=1e-6)
    yield _ws_case(rng, "(3,65536)-long-fan-in", (3, 65536))
    yield _ws_case(rng, "(8,129)-mean1e4-std1e-3", (8, 129),
                   w=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _ws_case(rng, "(6,33)-tiny-scale", (6, 33), w=1e-20 * rng.standard_normal((6, 33)))
    yield _ws_case(rng, "(6,33)-huge-scale", (6, 33), w=1e20 * rng.standard_normal((6, 33)))


def ws_error_inputs():
    w = np.ones((3, 4))
    yield ErrorInput(SampleInput("list weight", ([[1.0, 2.0]],), {}), TypeError,
                     r"weight_standardization: `weight` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int weight", (np.ones((3, 4), dtype=int),), {}), TypeError,
                     r"`weight` must have a floating dtype")
    yield ErrorInput(SampleInput("1-d weight", (np.ones(4),), {}), ValueError,
                     r"`weight` must have at least 2 dimensions")
    yield ErrorInput(SampleInput("empty fan-in", (np.ones((3, 0)),), {}), ValueError,
                     r"`weight` must have a non-empty fan-in")
    yield ErrorInput(SampleInput("fan-in 1 unbiased", (np.ones((3, 1)),), {}), ValueError,
                     r"`weight` must have a fan-in of at least 2 with unbiased=True")
    yield ErrorInput(SampleInput("eps", (w,), dict(eps=-1.0)), ValueError,
                     r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("unbiased", (w,), dict(unbiased=1)), TypeError,
                     r"`unbiased` must be a bool")
    yield ErrorInput(SampleInput("eps_inside", (w,), dict(eps_inside="yes")), TypeError,
                     r"`eps_inside` must be a bool")


def _ws_torch_call(torch, weight, *, eps=1e-5, unbiased=True, eps_inside=False):
    """The authors' README layer (``torch.std_mean``, unbiased, eps outside) and its options,
    in torch ops (torch has no weight standardization)."""
    flat = weight.reshape(weight.shape[0], -1)
    std, mean = torch.std_mean(flat, dim=1, keepdim=True, correction=1 if unbiased else 0)
    s = torch.sqrt(std * std + eps) if eps_inside else std + eps
    return ((flat - mean) / s).reshape(weight.shape)


def _ws_stats_axes(sample):
    """All axes but 0 where the form standardizes exactly (biased, eps inside), else None."""
    kw = sample.kwargs
    if kw.get("eps_inside", False) and not kw.get("unbiased", True):
        return tuple(range(1, sample.arrays[0].ndim))
    return None


def _sws_case(rng, name, shape, w=None, gain=True, **kwargs):
    w = _draw(rng, shape) if w is None else w
    g = 1.0 + 0.3 * rng.standard_normal(_gain_shape(shape)) if gain else None
    return SampleInput(name, (w, g), kwargs)


def sws_sample_inputs(rng):
    yield _sws_case(rng, "(4,3,3,3)-conv-clamp", (4, 3, 3, 3))
    yield _sws_case(rng, "(4,3,3,3)-relu-gamma", (4, 3, 3, 3), gamma=ACTIVATION_GAMMA["relu"])
    yield _sws_case(rng, "(5,7)-linear-add-eps1e-5", (5, 7), eps_mode="add", eps=1e-5)
    yield _sws_case(rng, "(3,6)-fedwon-eps0-no-gain", (3, 6), gain=False, eps=0.0,
                    gamma=ACTIVATION_GAMMA["relu"])
    yield _sws_case(rng, "(3,4)-clamped", (3, 4), w=1e-4 * rng.standard_normal((3, 4)))
    yield _sws_case(rng, "(1,5)-one-output-channel", (1, 5))
    yield _sws_case(rng, "(4,1)-fan-in-1-add", (4, 1), eps_mode="add")
    yield _sws_case(rng, "(3,5)-mean100", (3, 5), w=100.0 + rng.standard_normal((3, 5)))
    yield _sws_case(rng, "(3,5)-constant-slices", (3, 5),
                    w=np.repeat(rng.standard_normal((3, 1)), 5, axis=1))


def sws_oracle_inputs(rng):
    yield _sws_case(rng, "(64,3,7,7)-conv", (64, 3, 7, 7), gamma=ACTIVATION_GAMMA["relu"])
    yield _sws_case(rng, "(33,17,3,3)-add-eps1e-5", (33, 17, 3, 3), eps_mode="add", eps=1e-5)
    yield _sws_case(rng, "(129,65)-fedwon", (129, 65), gain=False, eps=0.0)
    yield _sws_case(rng, "(3,65536)-long-fan-in", (3, 65536))
    yield _sws_case(rng, "(8,129)-mean1e4-std1e-3", (8, 129),
                    w=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _sws_case(rng, "(6,33)-huge-scale", (6, 33), w=1e20 * rng.standard_normal((6, 33)))


def sws_error_inputs():
    w, g = np.ones((3, 4)), np.ones((3, 1))
    yield ErrorInput(SampleInput("list weight", ([[1.0, 2.0]], None), {}), TypeError,
                     r"scaled_weight_standardization: `weight` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("1-d weight", (np.ones(4), None), {}), ValueError,
                     r"`weight` must have at least 2 dimensions")
    yield ErrorInput(SampleInput("gain flat", (w, np.ones(3)), {}), ValueError,
                     r"`gain` must have shape \(3, 1\), got \(3,\)")
    yield ErrorInput(SampleInput("gain int", (w, np.ones((3, 1), dtype=int)), {}), TypeError,
                     r"`gain` must have a floating dtype")
    yield ErrorInput(SampleInput("gamma", (w, g), dict(gamma=-1.0)), ValueError,
                     r"`gamma` must be a finite number >= 0")
    yield ErrorInput(SampleInput("eps", (w, g), dict(eps=float("nan"))), ValueError,
                     r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("eps_mode", (w, g), dict(eps_mode="inside")), ValueError,
                     r"`eps_mode` must be 'clamp' or 'add'")


def _sws_torch_call(torch, weight, gain, *, gamma=1.0, eps=1e-4, eps_mode="clamp"):
    """DeepMind's ``WSConv2D.standardize_weight`` (clamp) and timm's ``ScaledStdConv2d`` (add),
    in torch ops. At an exact tie of the clamp torch's ``clamp`` passes the whole gradient
    where JAX splits it (no sample sits on a tie)."""
    flat = weight.reshape(weight.shape[0], -1)
    n = flat.shape[1]
    var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=0)
    if eps_mode == "add":
        scale = torch.rsqrt(var + eps) * (gamma / n ** 0.5)
    else:
        scale = torch.rsqrt(torch.clamp(n * var, min=eps)) * gamma
    if gain is not None:
        scale = scale * gain.reshape(-1, 1)
    return ((flat - mean) * scale).reshape(weight.shape)


_QIAO = Paper("Micro-Batch Training with Batch-Channel Normalization and Weight "
              "Standardization", "Qiao, Wang, Liu, Shen, Yuille", 2019, "arXiv:1903.10520")

SPEC = NormSpec(
    name=_WS,
    title="Weight Standardization",
    paper=_QIAO,
    forward=weight_standardization_forward,
    backward=weight_standardization_backward,
    op=weight_standardization,
    composite=weight_standardization_composite,
    diff_argnames=("weight",),
    sample_inputs=ws_sample_inputs,
    oracle_inputs=ws_oracle_inputs,
    error_inputs=ws_error_inputs,
    invariances=("shift",),
    stats_axes=_ws_stats_axes,
    torch_call=_ws_torch_call,
    normalizes="weights",
)

SCALED_SPEC = NormSpec(
    name=_SWS,
    title="Scaled Weight Standardization (NF-Nets, FedWon)",
    paper=Paper("High-Performance Large-Scale Image Recognition Without Normalization",
                "Brock, De, Smith, Simonyan", 2021, "arXiv:2102.06171"),
    forward=scaled_weight_standardization_forward,
    backward=scaled_weight_standardization_backward,
    op=scaled_weight_standardization,
    composite=scaled_weight_standardization_composite,
    diff_argnames=("weight", "gain"),
    sample_inputs=sws_sample_inputs,
    oracle_inputs=sws_oracle_inputs,
    error_inputs=sws_error_inputs,
    torch_call=_sws_torch_call,
    normalizes="weights",
)

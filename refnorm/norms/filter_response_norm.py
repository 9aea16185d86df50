r"""Filter Response Normalization with the Thresholded Linear Unit (FRN + TLU).

Singh & Krishnan, *Filter Response Normalization Layer: Eliminating Batch Dependence in the
Training of Deep Neural Networks*, CVPR 2020, arXiv:1911.09737.

The input has shape :math:`(N, C, *)`. Each (sample, channel) pair is divided by the root mean
square of its spatial values (no mean is subtracted), then a per-channel affine map and the
TLU, a ReLU with a learned per-channel threshold :math:`\tau`:

.. math::

   \nu^2_{nc} = \langle x_{nc}^2\rangle_{S},\qquad
   r_{nc} = (\nu^2_{nc} + \epsilon_{\mathrm{eff}})^{-1/2},\qquad
   \hat x = x\,r,\qquad z = \gamma_c\,\hat x + \beta_c,\qquad
   y = \max(z, \tau_c),

:math:`S` the spatial axes (none for an ``(N, C)`` input: then :math:`\nu^2 = x^2`).
Backward (derivation: ``docs/derivations/frn.rst``), with :math:`m = 1[z > \tau] +
\tfrac12 1[z = \tau]`, :math:`g_z = m\,\mathrm{d}y` and :math:`h = \gamma\,g_z`:

.. math::

   \mathrm{d}x = r\,\bigl(h - \hat x\,\langle h\,\hat x\rangle_S\bigr),\quad
   \mathrm{d}\gamma_c = \textstyle\sum g_z\hat x,\quad
   \mathrm{d}\beta_c = \textstyle\sum g_z,\quad
   \mathrm{d}\tau_c = \textstyle\sum (1-m)\,\mathrm{d}y,\quad
   \mathrm{d}\epsilon_l = -\tfrac12\,\mathrm{sign}(\epsilon_l)\textstyle\sum h\,x\,r^3 .

**The kink.** :math:`y` is not differentiable where :math:`z = \tau` exactly. The backward
splits the gradient there in halves, as ``torch.maximum`` does (the mean of the two one-sided
derivatives, which central differences also find); TensorFlow's ``maximum`` sends all of it
to its first argument. :func:`refnorm.gradcheck.check_vjp` reports such a point as a kink,
not as a failure.

**eps** (addendum ``addendum_unverified_items.md`` §7b). The paper and TF-Addons'
``FilterResponseNormalization`` use :math:`\epsilon = 10^{-6}` (the default here); timm's
``FilterResponseNormTlu2d`` uses 1e-5. For 1x1 maps and fully connected layers the paper
learns it: pass ``eps_l`` (a shape ``(1,)`` array, initialized to 1e-4), and
:math:`\epsilon_{\mathrm{eff}} = \epsilon + |\epsilon_l|` (TF-Addons' ``learned_epsilon``).
Otherwise :math:`\epsilon_{\mathrm{eff}} = \epsilon`.

Conventions: ``weight`` is :math:`\gamma` (init 1), ``bias`` :math:`\beta` (init 0), ``tau``
:math:`\tau` (init 0), each of shape ``(C,)``; ``tau=None`` leaves the TLU out (plain FRN).
No running statistics: training and evaluation are the same. Computed in float64
(``np.longdouble`` for longdouble input) and rounded once to each input's dtype. The maps that
float64 cannot do right (a root mean square below about :math:`10^{-154}`, whose squares
underflow, or above about :math:`10^{154}`, whose squares overflow:
:func:`refnorm.norms._stats.extreme_groups`) are done again in
:func:`refnorm.norms._stats.wider_dtype`, and the cache keeps their sub-cache.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (check_array, check_eps, check_param, extreme_groups, narrow,
                                  wider_dtype, widen, work_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "frn"


class FRNCache(NamedTuple):
    x: np.ndarray                  # the input in the work dtype
    r: np.ndarray                  # (nu^2 + eps_eff)^-1/2, shape (N, C, 1, ...)
    xhat: np.ndarray
    gamma: np.ndarray              # (1, C, 1, ...) view of weight (ones when None)
    share: np.ndarray | None       # m: 1, 1/2 or 0 per element (None without TLU)
    tau_share: np.ndarray | None   # 1 - m (None without TLU); both NaN where y is NaN
    eps_sign: float                # sign(eps_l), 0 without eps_l
    dtypes: tuple                  # dtypes of x, weight, bias, tau, eps_l (None: absent)
    wide: tuple | None = None      # (maps, sub-cache) of the (sample, channel) maps done in a
    #                                wider dtype (flat indices into N*C), or None


class FRNGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dtau: np.ndarray | None
    deps_l: np.ndarray | None


def _view(p, ndim):
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def frn_forward(x, weight=None, bias=None, tau=None, eps_l=None, eps=1e-6):
    r"""FRN + TLU: :math:`y = \max(\gamma\,x(\nu^2+\epsilon_{\mathrm{eff}})^{-1/2} + \beta,
    \tau)`.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
    weight, bias, tau : ndarray of shape (C,), optional
        :math:`\gamma` (None: 1), :math:`\beta` (None: 0), :math:`\tau` (None: no TLU).
    eps_l : ndarray of shape (1,), optional
        The learned epsilon of 1x1 maps: :math:`\epsilon_{\mathrm{eff}} = \epsilon +
        |\epsilon_l|`.
    eps : float, default 1e-6
        The paper's and TF-Addons' value (timm: 1e-5).

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    cache : FRNCache
    """
    x = check_array(x, "x", _OP, ndim_min=2)
    c = x.shape[1]
    weight = check_param(weight, "weight", _OP, (c,))
    bias = check_param(bias, "bias", _OP, (c,))
    tau = check_param(tau, "tau", _OP, (c,))
    eps_l = check_param(eps_l, "eps_l", _OP, (1,))
    eps = check_eps(eps, _OP)
    work = work_dtype(x, weight, bias, tau, eps_l)
    xw = x.astype(work)
    axes = tuple(range(2, x.ndim))
    count = int(np.prod(x.shape[2:], dtype=np.int64))
    eps_eff = eps + (np.abs(eps_l[0]).astype(work) if eps_l is not None else 0.0)
    # eps = 0 on a zero map: 0/0; tiny or huge maps: redone below
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        nu2 = np.sum(xw * xw, axis=axes, keepdims=True) / max(count, 1)
        r = 1.0 / np.sqrt(nu2 + eps_eff)
        xhat = xw * r
    gamma = _view(weight.astype(work), x.ndim) if weight is not None else np.ones((), work)
    with np.errstate(invalid="ignore", over="ignore"):
        z = gamma * xhat
        if bias is not None:
            z = z + _view(bias.astype(work), x.ndim)
    share = tau_share = None
    if tau is not None:
        t = _view(tau.astype(work), x.ndim)
        share = np.where(z > t, 1.0, np.where(z == t, 0.5, 0.0)).astype(work)
        # where z or tau is NaN (so is y) the side is unknown: NaN shares, so that the NaN
        # reaches dx, dweight, dbias and dtau (torch.maximum's backward sends dy whole to
        # both sides there: finite dbias and dtau that hide the NaN)
        y_nan = np.isnan(z) | np.isnan(t)
        tau_share = np.where(y_nan, np.nan, 1.0 - share)
        share = np.where(y_nan, np.nan, share)
        y = np.maximum(z, t)
    else:
        y = z
    wide = None
    if x.size and wider_dtype(work) is not None and (extreme := extreme_groups(nu2, r)).size:
        # subnormal or huge maps: again in a wider dtype
        ys, sub = _wider_maps(xw, extreme, weight, bias, tau, eps_l, eps)
        for mine, its in ((y, ys), (r, sub.r), (xhat, sub.xhat), (share, sub.share),
                          (tau_share, sub.tau_share)):
            if mine is not None:
                _put_maps(mine, extreme, its)
        wide = (extreme, sub)
    dtypes = tuple(None if a is None else a.dtype for a in (x, weight, bias, tau, eps_l))
    eps_sign = float(np.sign(eps_l[0])) if eps_l is not None else 0.0
    cache = FRNCache(xw, r, xhat, gamma, share, tau_share, eps_sign, dtypes, wide)
    return y.astype(x.dtype, copy=False), cache


def _put_maps(a, extreme, values):
    """Write ``values`` (a sub-call's array, its maps along axis 1) into the maps ``extreme``
    (flat indices into N*C) of ``a``, of shape (N, C, *) or (N, C, 1, ...), in place (any
    memory layout), rounded to ``a``'s dtype as the exact values."""
    values = values.reshape((len(extreme),) + a.shape[2:])
    with np.errstate(over="ignore", under="ignore"):
        a[np.divmod(extreme, a.shape[1])] = values.astype(a.dtype)


def _wider_maps(xw, extreme, weight, bias, tau, eps_l, eps):
    """``(y, cache)`` of the maps ``extreme`` (flat indices into N*C) done again by
    :func:`frn_forward` in the wider dtype, as the channels of one sample, each with its own
    channel's parameters."""
    wider = wider_dtype(xw.dtype)
    ch = extreme % xw.shape[1]
    xs = xw[np.divmod(extreme, xw.shape[1])].astype(wider)  # (F, *): maps as channels
    xs = xs.reshape((1, len(extreme), -1) if xw.ndim > 2 else (1, len(extreme)))
    return frn_forward(xs, *(None if p is None else widen(p[ch], wider)
                             for p in (weight, bias, tau)), widen(eps_l, wider), eps)


def frn_backward(dy, cache):
    """Hand-derived VJP of :func:`frn_forward`: ``(dy, cache) -> FRNGrads``."""
    x, r, xhat, gamma, share, tau_share, eps_sign, dtypes, wide = cache
    axes = tuple(range(2, x.ndim))
    count = int(np.prod(x.shape[2:], dtype=np.int64))
    dy = dy_all = dy.astype(x.dtype)
    if wide is not None:  # the maps done in a wider dtype: their terms here are 0 (below)
        keep = np.ones(x.shape[:2], bool)
        keep.flat[wide[0]] = False
        keep = keep.reshape(x.shape[:2] + (1,) * len(axes))
        dy, r, xhat = (np.where(keep, a, 0.0) for a in (dy, r, xhat))
        share, tau_share = (None if a is None else np.where(keep, a, 0.0)
                            for a in (share, tau_share))
    gz = dy if share is None else dy * share
    h = gamma * gz
    chan = (0,) + axes
    with np.errstate(invalid="ignore", over="ignore"):
        hx = np.sum(h * xhat, axis=axes, keepdims=True)  # <h xhat> times the map's size
        dx = r * (h - xhat * (hx / max(count, 1)))
        _, wdt, bdt, tdt, edt = dtypes
        grads = [dx, np.sum(gz * xhat, axis=chan) if wdt is not None else None,
                 np.sum(gz, axis=chan) if bdt is not None else None,
                 np.sum(dy * tau_share, axis=chan) if tdt is not None else None,
                 # sum h x r^3 = sum_maps r^2 sum h xhat (r^3 alone may overflow)
                 np.reshape(-0.5 * eps_sign * np.sum(hx * r * r), (1,))
                 if edt is not None else None]
    if wide is not None:  # those maps' backward, in the wider dtype; their sums added
        extreme, sub = wide
        dys = dy_all[np.divmod(extreme, x.shape[1])].reshape(sub.x.shape).astype(sub.x.dtype)
        sub_grads = frn_backward(dys, sub)
        _put_maps(dx, extreme, sub_grads.dx)
        with np.errstate(over="ignore", under="ignore"):
            ch = extreme % x.shape[1]
            for g, sg in zip(grads[1:4], sub_grads[1:4]):
                if g is not None:
                    np.add.at(g, ch, narrow(sg, g.dtype))
            if grads[4] is not None:
                grads[4] = grads[4] + narrow(sub_grads.deps_l, grads[4].dtype)
    with np.errstate(over="ignore", under="ignore"):
        return FRNGrads(*(None if g is None else g.astype(dt, copy=False)
                          for g, dt in zip(grads, dtypes)))


frn = custom_vjp(frn_forward, frn_backward, ("x", "weight", "bias", "tau", "eps_l"))
frn.__doc__ = "Differentiable FRN + TLU (engine op); see :func:`frn_forward`."


def frn_composite(x, weight=None, bias=None, tau=None, eps_l=None, eps=1e-6):
    """The same math with engine primitives only (``maximum`` splits a tie in halves)."""
    axes = tuple(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    nu2 = ag.mean(x * x, axes, keepdims=True) if axes else x * x
    eps_eff = eps + ag.abs(eps_l) if eps_l is not None else eps
    z = x / ag.sqrt(nu2 + (ag.reshape(eps_eff, (1,) * x.ndim) if eps_l is not None else eps))
    z = z * ag.reshape(weight, shape) if weight is not None else z
    z = z + ag.reshape(bias, shape) if bias is not None else z
    if tau is None:
        return z
    t = ag.reshape(tau, shape)
    # + (z - tau)^2 where z - tau is NaN (0 elsewhere): adds nothing to y or to a finite
    # gradient, and carries a NaN of z or tau into both sides' gradients, as frn_backward does
    d = z - t
    return ag.maximum(z, t) + ag.where(np.isnan(d.data), d * d, 0.0)


def frn_layer_init(features, *, tlu=True, learned_eps=False, eps=1e-6):
    """``(params, state, kwargs)`` of an FRN(+TLU) layer: gamma 1, beta 0, tau 0 (timm and
    the paper), ``eps_l`` 1e-4 with ``learned_eps`` (TF-Addons)."""
    params = {"weight": np.ones(features), "bias": np.zeros(features)}
    if tlu:
        params["tau"] = np.zeros(features)
    if learned_eps:
        params["eps_l"] = np.full(1, 1e-4)
    return params, {}, {"eps": eps}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, x=None, affine=True, tlu=True, eps_l=None, eps=1e-6, tau=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = 1.0 + 0.5 * rng.standard_normal(c) if affine else None
    bias = 0.3 * rng.standard_normal(c) if affine else None
    if tlu and tau is None:
        tau = 0.3 * rng.standard_normal(c)
    eps_l = None if eps_l is None else np.full(1, eps_l)
    return SampleInput(name, (x, weight, bias, tau if tlu else None, eps_l), dict(eps=eps))


def kink_sample(rng, offset=0.0):
    r"""A sample whose ``tau`` equals ``z`` of one element of each channel of sample 0
    (``offset`` 0: exactly on the kink, else that far above it). The map of sample 0 is
    :math:`\pm 1/2` with ``eps = 0``, so :math:`\hat x = \pm 1` and :math:`z = \gamma\hat x +
    \beta` are exact in any correct evaluation order: the engine composite and PyTorch sit on
    the very same tie."""
    x = rng.standard_normal((2, 3, 2, 2))
    x[0] = np.array([[0.5, -0.5], [-0.5, -0.5]])
    weight, bias = np.array([1.5, 0.75, 2.0]), np.array([0.25, -0.5, 0.0])
    tau = weight + bias + offset                  # z where xhat = +1
    name = "(2,3,2,2)-tau-on-the-kink" if offset == 0 else f"(2,3,2,2)-tau-{offset:g}-from-kink"
    return SampleInput(name, (x, weight, bias, tau, None), dict(eps=0.0))


def sample_inputs(rng):
    yield _case(rng, "(2,3,4,4)", (2, 3, 4, 4))
    yield _case(rng, "(3,2,5)-1d", (3, 2, 5))
    yield _case(rng, "(2,3,2,3)-no-affine-no-tlu", (2, 3, 2, 3), affine=False, tlu=False)
    yield _case(rng, "(1,4,3,3)-N1-eps1e-5-timm", (1, 4, 3, 3), eps=1e-5)
    yield _case(rng, "(4,3)-fc-learned-eps", (4, 3), eps_l=1e-4)
    yield _case(rng, "(2,3,1,1)-1x1-learned-eps-negative", (2, 3, 1, 1), eps_l=-1e-3)
    yield _case(rng, "(2,2,3,3)-tau-below-all", (2, 2, 3, 3), tau=np.full(2, -10.0))
    yield _case(rng, "(2,2,3,3)-tau-above-all", (2, 2, 3, 3), tau=np.full(2, 10.0))
    constant = rng.standard_normal((2, 3, 2, 2))
    constant[:, 0] = 0.7
    yield _case(rng, "(2,3,2,2)-constant-map", (2, 3, 2, 2), x=constant)
    yield _case(rng, "(2,2,3)-mean100", (2, 2, 3), x=100.0 + rng.standard_normal((2, 2, 3)))
    yield kink_sample(rng)


def oracle_inputs(rng):
    yield _case(rng, "(16,37,13,11)", (16, 37, 13, 11))
    yield _case(rng, "(2,5,256,256)-long-maps", (2, 5, 256, 256))
    yield _case(rng, "(7,33,1,1)-1x1-learned-eps", (7, 33, 1, 1), eps_l=1e-4)
    yield _case(rng, "(33,65)-fc-learned-eps", (33, 65), eps_l=1e-4)
    yield _case(rng, "(3,5,7,9)-timm-eps1e-5-no-tlu", (3, 5, 7, 9), eps=1e-5, tlu=False)
    yield _case(rng, "(4,5,9,9)-mean1e4-std1e-3", (4, 5, 9, 9),
                x=1e4 + 1e-3 * rng.standard_normal((4, 5, 9, 9)))
    yield _case(rng, "(6,7,33)-tiny-scale", (6, 7, 33), x=1e-20 * rng.standard_normal((6, 7, 33)))
    yield _case(rng, "(6,7,33)-huge-scale", (6, 7, 33), x=1e20 * rng.standard_normal((6, 7, 33)))


def error_inputs():
    x, c = np.ones((2, 3, 4)), np.ones(3)

    def call(name, x=x, weight=c, bias=c, tau=c, eps_l=None, **kwargs):
        return SampleInput(name, (x, weight, bias, tau, eps_l), kwargs)

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError, r"frn: `x` must be a numpy.ndarray")
    yield ErrorInput(call("int x", x=np.ones((2, 3), dtype=int)), TypeError,
                     r"`x` must have a floating dtype")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"`x` must have at least 2 dimensions")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("tau", tau=np.ones((3, 1))), ValueError, r"`tau` must have shape")
    yield ErrorInput(call("eps_l", eps_l=np.ones(())), ValueError,
                     r"`eps_l` must have shape \(1,\)")
    yield ErrorInput(call("eps", eps=-1e-6), ValueError, r"`eps` must be a finite number >= 0")


def _torch_call(torch, x, weight, bias, tau, eps_l, *, eps=1e-6):
    """FRN + TLU in torch ops, as timm's ``FilterResponseNormTlu2d`` with TF-Addons' learned
    epsilon (torch has no FRN). The TLU is ``torch.maximum`` (ties split in halves, as here),
    plus a term, zero but where y is NaN, that makes a NaN reach the gradients (refnorm's
    convention)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    dims = tuple(range(2, x.ndim))
    nu2 = x.pow(2).mean(dim=dims, keepdim=True) if dims else x * x
    eps_eff = eps + eps_l.abs() if eps_l is not None else eps
    z = x * torch.rsqrt(nu2 + eps_eff)
    z = z * weight.reshape(shape) if weight is not None else z
    z = z + bias.reshape(shape) if bias is not None else z
    if tau is None:
        return z
    t = tau.reshape(shape)
    # + (z - tau)^2 where z - tau is NaN (0 elsewhere): y and finite gradients unchanged, and a
    # NaN of z or tau reaches both gradients, as refnorm's contract wants (torch.maximum's
    # backward sends dy whole to both sides at a NaN)
    d = z - t
    return torch.maximum(z, t) + torch.where(torch.isnan(d), d * d, torch.zeros_like(d))


SPEC = NormSpec(
    name=_OP,
    title="Filter Response Normalization + TLU",
    paper=Paper("Filter Response Normalization Layer: Eliminating Batch Dependence in the "
                "Training of Deep Neural Networks", "Singh, Krishnan", 2020, "arXiv:1911.09737"),
    forward=frn_forward,
    backward=frn_backward,
    op=frn,
    composite=frn_composite,
    diff_argnames=("x", "weight", "bias", "tau", "eps_l"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=frn_layer_init,
)

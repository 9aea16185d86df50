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
(``np.longdouble`` for longdouble input) and rounded once to each input's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, check_eps, check_param, work_dtype
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
    with np.errstate(divide="ignore", invalid="ignore"):  # eps = 0 on a zero map: 0/0
        nu2 = np.sum(xw * xw, axis=axes, keepdims=True) / max(count, 1)
        r = 1.0 / np.sqrt(nu2 + eps_eff)
        xhat = xw * r
    gamma = _view(weight.astype(work), x.ndim) if weight is not None else np.ones((), work)
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
    dtypes = tuple(None if a is None else a.dtype for a in (x, weight, bias, tau, eps_l))
    eps_sign = float(np.sign(eps_l[0])) if eps_l is not None else 0.0
    cache = FRNCache(xw, r, xhat, gamma, share, tau_share, eps_sign, dtypes)
    return y.astype(x.dtype, copy=False), cache


def frn_backward(dy, cache):
    """Hand-derived VJP of :func:`frn_forward`: ``(dy, cache) -> FRNGrads``."""
    x, r, xhat, gamma, share, tau_share, eps_sign, dtypes = cache
    axes = tuple(range(2, x.ndim))
    count = int(np.prod(x.shape[2:], dtype=np.int64))
    dy = dy.astype(x.dtype)
    gz = dy if share is None else dy * share
    h = gamma * gz
    chan = (0,) + axes
    with np.errstate(invalid="ignore"):
        dx = r * (h - xhat * (np.sum(h * xhat, axis=axes, keepdims=True) / max(count, 1)))
    _, wdt, bdt, tdt, edt = dtypes
    dweight = np.sum(gz * xhat, axis=chan).astype(wdt) if wdt is not None else None
    dbias = np.sum(gz, axis=chan).astype(bdt) if bdt is not None else None
    dtau = np.sum(dy * tau_share, axis=chan).astype(tdt) if tdt is not None else None
    deps_l = None
    if edt is not None:
        deps_l = np.reshape(-0.5 * eps_sign * np.sum(h * x * r ** 3), (1,)).astype(edt)
    return FRNGrads(dx.astype(dtypes[0], copy=False), dweight, dbias, dtau, deps_l)


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

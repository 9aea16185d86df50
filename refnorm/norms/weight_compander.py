r"""Weight Compander: a bounded, expanding elementwise reparametrization of the weights.

Cakaj, Mehnert, Yang, *Weight Compander: A Simple Weight Reparameterization for
Regularization*, IJCNN 2023, arXiv:2306.16993.

Every conv and linear weight :math:`w` is the image of a latent weight :math:`v` (the parameter
the optimizer updates) under

.. math::

   w = \psi(v) = a\,\arctan(v/b),\qquad a > 0,\ b > 0,

which bounds the weights (:math:`|w| < a\pi/2`) and, for :math:`a > b`, pushes small ones away
from zero (slope :math:`a/b` at :math:`v = 0`). Backward (paper Eqs. 2-3; derivation:
``docs/derivations/weight_compander.rst``), with :math:`G = \mathrm{d}w`:

.. math::

   \mathrm{d}v = G\,\frac{a\,b}{b^2 + v^2},\qquad
   \mathrm{d}a = \textstyle\sum G\,\arctan(v/b),\qquad
   \mathrm{d}b = -\textstyle\sum G\,\frac{a\,v}{b^2 + v^2} .

Conventions (addendum ``addendum_unverified_items.md`` §1, from the camera-ready paper; there
is no official code):

* :math:`a` and :math:`b` are scalars (0-d arrays). **Fixed** form: one pair for the whole
  network, constants (pass them as plain arrays to the engine op; ``da``, ``db`` are then
  discarded). **Learned** form (the paper's "fine" granularity, one pair per layer): pass them
  as parameters; the paper initializes :math:`a = 0.5,\ b = 1.0`
  (:func:`weight_compander_layer_params`).
* There is no default pair: the paper grid-searches :math:`a, b \in \{0.5, \dots, 1.0\}` per
  model (e.g. ResNet-18 on CIFAR-10: :math:`a = 1.0, b = 0.6`); its Fig. 2 uses
  :math:`a = b = 1`.
* Initialization: :math:`v_0 = b\tan(w_0/a)` (Eq. 4, :func:`weight_compander_init`), so that
  :math:`\psi(v_0)` is the usual initialization; needs :math:`|w_0| < a\pi/2`.
* Biases and normalization parameters are not reparametrized. Weight decay acts on
  :math:`\psi(v)` in the fixed form and on :math:`v` in the learned one (paper §III); that is
  the optimizer's business, not this function's.

Computed in float64 (``np.longdouble`` for longdouble input) and rounded once to each input's
dtype. ``w`` has the dtype of ``v``. A float64 call with a magnitude outside about
:math:`[10^{-77}, 10^{77}]` (:func:`refnorm.norms._stats.out_of_range`), where :math:`v^2` and
:math:`(v/b)^2` may overflow or underflow (:math:`\mathrm{d}v` of :math:`v = 10^{155}` is a
subnormal number), is computed in :func:`refnorm.norms._stats.wider_dtype`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, check_array, narrow, out_of_range, wider_dtype,
                                  work_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "weight_compander"


class WeightCompanderCache(NamedTuple):
    v: np.ndarray          # the latent weight, work dtype
    a: np.ndarray          # 0-d, work dtype
    b: np.ndarray          # 0-d, work dtype
    dtypes: tuple          # dtypes of v, a, b


class WeightCompanderGrads(NamedTuple):
    dv: np.ndarray
    da: np.ndarray
    db: np.ndarray


def _check_scalar(value, name):
    if isinstance(value, np.floating):  # a NumPy scalar (what 0-d arithmetic returns) is 0-d
        value = np.asarray(value)
    value = check_array(value, name, _OP)
    if value.shape != ():
        raise ValueError(f"{_OP}: `{name}` must be a 0-d array (one scalar per layer or "
                         f"network), got shape {value.shape}")
    if np.isfinite(value) and value <= 0:  # NaN and inf pass, and give what the formula gives
        raise ValueError(f"{_OP}: `{name}` must be > 0, got {float(value)!r}")
    return value


def weight_compander_forward(v, a, b):
    r""":math:`w = a\arctan(v/b)`, elementwise.

    Parameters
    ----------
    v : ndarray, at least 1 dimension
        The latent weight.
    a, b : 0-d ndarray
        The compander's hyper-parameters, > 0 (learned or fixed).

    Returns
    -------
    w : ndarray, the shape and dtype of ``v``
    cache : WeightCompanderCache
    """
    check_array(v, "v", _OP, ndim_min=1)
    a, b = _check_scalar(a, "a"), _check_scalar(b, "b")
    work = work_dtype(v, a, b)
    wider = wider_dtype(work)
    # tiny or huge: the whole call, wider (an input narrower than the work dtype never is: its
    # squares and quotients fit in the work dtype)
    if wider is not None and out_of_range(*(p for p in (v, a, b) if p.dtype == work)):
        w, cache = weight_compander_forward(v.astype(wider), a.astype(wider), b.astype(wider))
        return narrow(w, v.dtype), WideCache(cache, (v.dtype, a.dtype, b.dtype), wider)
    vw, aw, bw = v.astype(work), a.astype(work), b.astype(work)
    w = aw * np.arctan(vw / bw)
    return w.astype(v.dtype, copy=False), WeightCompanderCache(vw, aw, bw,
                                                               (v.dtype, a.dtype, b.dtype))


def weight_compander_backward(dw, cache):
    r"""Hand-derived VJP: :math:`\mathrm{d}v = G\,ab/(b^2+v^2)`, :math:`\mathrm{d}a = \sum
    G\arctan(v/b)`, :math:`\mathrm{d}b = -\sum G\,av/(b^2+v^2)`.

    :math:`1/(b^2+v^2)` is formed as :math:`(1/b^2)/(1+(v/b)^2)`, which does not overflow
    where :math:`v^2` alone would; where :math:`(v/b)^2` leaves the range, the forward chose the
    wider dtype (a :class:`~refnorm.norms._stats.WideCache`)."""
    if isinstance(cache, WideCache):
        return cache.narrow(weight_compander_backward(dw.astype(cache.wide_dtype), cache.inner))
    v, a, b, (v_dtype, a_dtype, b_dtype) = cache
    g = dw.astype(v.dtype)
    t = v / b
    with np.errstate(over="ignore"):  # (v/b)^2 = inf: the slope is 0 there, as it should be
        slope = 1.0 / (1.0 + t * t)           # b^2 / (b^2 + v^2)
    dv = g * (a / b) * slope
    da = np.sum(g * np.arctan(t))
    db = -np.sum(g * t * slope) * (a / b)     # -sum G a v / (b^2 + v^2)
    return WeightCompanderGrads(dv.astype(v_dtype, copy=False), np.asarray(da, a_dtype),
                                np.asarray(db, b_dtype))


weight_compander = custom_vjp(weight_compander_forward, weight_compander_backward,
                              ("v", "a", "b"))
weight_compander.__doc__ = ("Differentiable weight compander (engine op); see "
                            ":func:`weight_compander_forward`.")


def weight_compander_composite(v, a, b):
    """The same math with engine primitives only: the engine derives its own gradient."""
    return a * ag.arctan(v / b)


def weight_compander_init(weight, a, b):
    r""":math:`v_0 = b\tan(w_0/a)` (paper Eq. 4), so that :math:`\psi(v_0) = w_0`; raises a
    ValueError naming ``weight`` unless :math:`|w_0| < a\pi/2` everywhere."""
    check_array(weight, "weight", _OP)
    a, b = float(_check_scalar(a, "a")), float(_check_scalar(b, "b"))
    if not np.all(np.abs(weight) < a * np.pi / 2):
        raise ValueError(f"{_OP}: `weight` must lie in (-a pi/2, a pi/2) = +-{a * np.pi / 2:.4g} "
                         f"to be inverted, got max |weight| {float(np.max(np.abs(weight))):.4g}")
    return b * np.tan(weight / a)


def weight_compander_layer_params():
    """The learned form's initial pair (paper §IV.E: best of {0.5, 1.0}): ``a = 0.5``,
    ``b = 1.0`` as 0-d arrays."""
    return np.asarray(0.5), np.asarray(1.0)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, a, b, v=None):
    v = rng.standard_normal(shape) if v is None else v
    return SampleInput(name, (v, np.asarray(a), np.asarray(b)), {})


def sample_inputs(rng):
    yield _case(rng, "(4,3,3,3)-conv-resnet18-cifar10", (4, 3, 3, 3), 1.0, 0.6)
    yield _case(rng, "(5,7)-linear-a=b=1", (5, 7), 1.0, 1.0)
    yield _case(rng, "(6,)-learned-init", (6,), 0.5, 1.0)
    yield _case(rng, "(1,1)-one-weight", (1, 1), 0.7, 0.8)
    yield _case(rng, "(3,4)-large-latent", (3, 4), 0.7, 0.7, v=50.0 * rng.standard_normal((3, 4)))
    yield _case(rng, "(3,5)-constant", (3, 5), 0.6, 0.7, v=np.full((3, 5), 0.3))
    yield _case(rng, "(3,5)-mean100", (3, 5), 1.0, 0.8, v=100.0 + rng.standard_normal((3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(64,3,7,7)-conv", (64, 3, 7, 7), 1.0, 0.6)
    yield _case(rng, "(33,17,3,3)-odd", (33, 17, 3, 3), 0.7, 0.8)
    yield _case(rng, "(3,65536)-long", (3, 65536), 0.5, 1.0)
    yield _case(rng, "(129,65)-tiny", (129, 65), 0.7, 0.7,
                v=1e-20 * rng.standard_normal((129, 65)))
    yield _case(rng, "(6,33)-huge", (6, 33), 0.7, 0.7, v=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    v, a, b = np.ones((3, 4)), np.asarray(0.7), np.asarray(0.8)
    yield ErrorInput(SampleInput("list v", ([[1.0]], a, b), {}), TypeError,
                     r"weight_compander: `v` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("0-d v", (np.asarray(1.0), a, b), {}), ValueError,
                     r"`v` must have at least 1 dimensions")
    yield ErrorInput(SampleInput("list a", (v, [0.7], b), {}), TypeError,
                     r"`a` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("a shape", (v, np.ones(1), b), {}), ValueError,
                     r"`a` must be a 0-d array")
    yield ErrorInput(SampleInput("a negative", (v, np.asarray(-0.5), b), {}), ValueError,
                     r"`a` must be > 0")
    yield ErrorInput(SampleInput("b zero", (v, a, np.asarray(0.0)), {}), ValueError,
                     r"`b` must be > 0")
    yield ErrorInput(SampleInput("b int", (v, a, np.asarray(1)), {}), TypeError,
                     r"`b` must have a floating dtype")


def _torch_call(torch, v, a, b):
    return a * torch.atan(v / b)


SPEC = NormSpec(
    name=_OP,
    title="Weight Compander",
    paper=Paper("Weight Compander: A Simple Weight Reparameterization for Regularization",
                "Cakaj, Mehnert, Yang", 2023, "arXiv:2306.16993"),
    forward=weight_compander_forward,
    backward=weight_compander_backward,
    op=weight_compander,
    composite=weight_compander_composite,
    diff_argnames=("v", "a", "b"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_call=_torch_call,
    normalizes="weights",
)

r"""Dynamic Tanh (DyT): an elementwise replacement of the normalization layer.

Zhu, Chen, He, LeCun & Liu, *Transformers without Normalization*, CVPR 2025,
arXiv:2503.10622.

No statistics: each element is squashed by a tanh of learnable slope :math:`\alpha` (one
scalar per layer), then scaled and shifted per channel:

.. math::

   t = \tanh(\alpha x),\qquad y = \gamma\odot t + \beta ,

``alpha`` is :math:`\alpha` (shape ``(1,)``), ``weight`` :math:`\gamma` and ``bias``
:math:`\beta` (shape ``(C,)``), ``C`` the last axis of ``x`` (``channels_last=True``) or axis 1
(``channels_last=False``: NCHW, the replacement of a ``LayerNorm2d``).

Backward (derivation: ``docs/derivations/dyt.rst``). With :math:`g = \gamma\odot\mathrm{d}y` and
:math:`s = 1 - t^2 = \operatorname{sech}^2(\alpha x)`:

.. math::

   \mathrm{d}x = \alpha\, g\odot s,\qquad
   \mathrm{d}\alpha = \textstyle\sum_{\text{all}} g\odot x\odot s,\qquad
   \mathrm{d}\gamma = \textstyle\sum_{\text{batch}} \mathrm{d}y\odot t,\qquad
   \mathrm{d}\beta = \textstyle\sum_{\text{batch}} \mathrm{d}y .

Conventions, as the official code (``jiachenzhu/DyT``, ``dynamic_tanh.py``, class
``DynamicTanh``): :math:`\alpha_0 = 0.5`, :math:`\gamma_0 = 1`, :math:`\beta_0 = 0`
(:func:`dyt_init`); train and eval are the same. :math:`s` is computed as :math:`(1-t)(1+t)`,
which keeps its relative accuracy where :math:`t` saturates.

**The LLaMA variant** of the same repository (``other_tasks/LLaMA``) is this function without
:math:`\beta` (``bias=None``, mirroring RMSNorm) and with other initial slopes: the code's
default :math:`\alpha_0` is 1.0, and the README sets it per position and model size (7B: 0.8 for
the attention norm, 0.2 for the FFN and final norms; 13B: 0.6 / 0.15; 34B and 70B: 0.2 / 0.05).
It is one record here, not two: the forward and backward are the same with ``bias=None``, and
only the initialization differs (``dyt_init(..., bias=False, alpha_init=...)``), which is what
``layer_init`` options are for. The LLaMA code's learnable scale of the token embeddings
(``shared_scale``, initial :math:`\sqrt{d}`) belongs to the model, not to this layer.

**Non-finite input.** An infinite :math:`x_i` gives :math:`y_i = \pm\gamma + \beta` (tanh's limit)
and :math:`\mathrm{d}x_i = 0`, and makes ``dalpha`` NaN: its term :math:`x_i\,s_i` is
:math:`\infty\cdot 0` in floating point, as in PyTorch (the limit of the exact term is 0).

**Dtypes**: each gradient has the dtype of its input; float16 is computed in float32 and rounded
once.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import accumulation_dtype, check_array, check_flag, check_param
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "dyt"


class DyTCache(NamedTuple):
    x: np.ndarray                   # the input, not a copy
    alpha: np.ndarray               # \alpha, shape (1,)
    t: np.ndarray                   # tanh(alpha x), in the accumulation dtype
    weight: np.ndarray | None       # \gamma, or None
    has_bias: bool
    channel_axis: int               # the axis that weight and bias run along
    bias_dtype: np.dtype | None = None


class DyTGrads(NamedTuple):
    dx: np.ndarray
    dalpha: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _channel_axis(x, channels_last):
    if channels_last:
        return x.ndim - 1
    if x.ndim < 2:
        raise ValueError(f"{_OP}: `x` must have at least 2 dimensions (N, C, ...) when "
                         f"channels_last=False, got shape {x.shape}")
    return 1


def _per_channel(p, ndim, axis):
    """A ``(C,)`` parameter shaped to broadcast along ``axis`` of an ``ndim``-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def dyt_forward(x, alpha, weight=None, bias=None, channels_last=True):
    r"""Dynamic Tanh :math:`\gamma\tanh(\alpha x) + \beta`; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray
        Channels on the last axis (``channels_last=True``) or on axis 1 (NCHW).
    alpha : ndarray of shape (1,)
        The slope :math:`\alpha` (``DynamicTanh.alpha``).
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma` and :math:`\beta`. ``None`` means 1 and 0 (``bias=None``: the LLaMA form).
    channels_last : bool, default True
        Whether the channels are the last axis; ``False`` broadcasts ``weight`` and ``bias``
        along axis 1, as the official code's ``channels_last=False``.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : DyTCache
    """
    x = check_array(x, "x", _OP)
    alpha = check_param(check_array(alpha, "alpha", _OP), "alpha", _OP, (1,))
    channels_last = check_flag(channels_last, "channels_last", _OP)
    if x.ndim < 1:
        raise ValueError(f"{_OP}: `x` must have at least 1 dimension, got shape {x.shape}")
    axis = _channel_axis(x, channels_last)
    weight = check_param(weight, "weight", _OP, (x.shape[axis],))
    bias = check_param(bias, "bias", _OP, (x.shape[axis],))
    acc = accumulation_dtype(x.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # alpha x = inf: tanh gives +-1
        t = np.tanh(alpha.astype(acc)[0] * x.astype(acc, copy=False))
        y = t.copy()
        if weight is not None:
            y *= _per_channel(weight.astype(acc, copy=False), x.ndim, axis)
        if bias is not None:
            y += _per_channel(bias.astype(acc, copy=False), x.ndim, axis)
    cache = DyTCache(x, alpha, t, weight, bias is not None, axis,
                     None if bias is None else bias.dtype)
    return y.astype(x.dtype, copy=False), cache


def dyt_backward(dy, cache):
    r"""Hand-derived VJP of :func:`dyt_forward`: ``(dy, cache) -> DyTGrads``."""
    x, alpha, t, weight, has_bias, axis, bias_dtype = cache
    acc = t.dtype
    dy_a = dy.astype(acc, copy=False)
    batch = tuple(a for a in range(x.ndim) if a != axis)  # the axes a channel is summed over
    g = dy_a * _per_channel(weight.astype(acc), x.ndim, axis) if weight is not None else dy_a
    with np.errstate(invalid="ignore", over="ignore"):  # inf x: x s = inf * 0 (documented)
        s = (1.0 - t) * (1.0 + t)
        gs = g * s
        dx = gs * alpha.astype(acc)[0]
        dalpha = np.sum(gs * x.astype(acc, copy=False)).reshape(1)
    dweight = np.sum(dy_a * t, axis=batch).astype(weight.dtype) if weight is not None else None
    dbias = None
    if has_bias:
        dbias = np.sum(dy_a, axis=batch).astype(bias_dtype if bias_dtype is not None else dy.dtype)
    return DyTGrads(dx.astype(x.dtype, copy=False), dalpha.astype(alpha.dtype), dweight, dbias)


dyt = custom_vjp(dyt_forward, dyt_backward, ("x", "alpha", "weight", "bias"))
dyt.__doc__ = "Differentiable Dynamic Tanh (engine op); see dyt_forward."


def dyt_composite(x, alpha, weight=None, bias=None, channels_last=True):
    """The same math with engine primitives only: the engine derives its own gradient."""
    axis = x.ndim - 1 if channels_last else 1
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    y = ag.tanh(alpha * x)
    if weight is not None:
        y = y * ag.reshape(weight, tuple(shape))
    return y + ag.reshape(bias, tuple(shape)) if bias is not None else y


def dyt_init(features, alpha_init=0.5, bias=True, channels_last=True, dtype=np.float64):
    r"""A layer's parameters as the official code initializes them: ``(params, state, kwargs)``
    (the protocol of ``NormSpec.layer_init``).

    ``alpha_init``: :math:`\alpha_0`, 0.5 in ``DynamicTanh``; the LLaMA code uses 1.0 by default
    and 0.8/0.2 (7B attention/FFN) and others from its README. ``bias=False`` is the LLaMA
    form. :math:`\gamma_0 = 1`, :math:`\beta_0 = 0`."""
    params = {"alpha": np.full(1, alpha_init, dtype), "weight": np.ones(features, dtype)}
    if bias:
        params["bias"] = np.zeros(features, dtype)
    return params, {}, {"channels_last": channels_last}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, alpha=0.5, affine=True, bias=True, x=None, channels_last=True):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[-1] if channels_last else shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    kwargs = {} if channels_last else {"channels_last": False}
    return SampleInput(name, (x, np.array([alpha]), weight, b), kwargs)


def sample_inputs(rng):
    yield _case(rng, "(4,6)", (4, 6))
    yield _case(rng, "(2,3,5)-tokens", (2, 3, 5), alpha=0.8)
    yield _case(rng, "(3,7)-plain", (3, 7), affine=False)
    yield _case(rng, "(3,4)-llama-no-bias", (3, 4), alpha=0.2, bias=False)
    yield _case(rng, "(2,3,2,2)-nchw", (2, 3, 2, 2), channels_last=False)
    yield _case(rng, "(5,1)-one-channel", (5, 1))
    yield _case(rng, "(3,6)-constant-rows", (3, 6), x=np.repeat(rng.standard_normal((3, 1)), 6, 1))
    yield _case(rng, "(3,5)-negative-alpha", (3, 5), alpha=-1.3)
    # alpha x up to ~5: t near saturation, s = sech^2 small (still resolvable by differences)
    yield _case(rng, "(3,5)-near-saturation", (3, 5), alpha=2.0, x=2.5 * rng.standard_normal((3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(37,1000)", (37, 1000))
    yield _case(rng, "(4,7,13)-tokens", (4, 7, 13), alpha=0.8)
    yield _case(rng, "(3,1)-one-channel", (3, 1))
    yield _case(rng, "(2,65536)-long-rows", (2, 65536))
    yield _case(rng, "(16,129)-llama-ffn-no-bias", (16, 129), alpha=0.2, bias=False)
    yield _case(rng, "(4,24,9,9)-nchw", (4, 24, 9, 9), channels_last=False)
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129), x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), x=1e20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(8,100)-saturated", (8, 100), alpha=4.0, x=3.0 * rng.standard_normal((8, 100)))


def error_inputs():
    x, a = np.ones((2, 3)), np.array([0.5])
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], a, None, None)),
                     TypeError, r"dyt: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int), a, None, None)),
                     TypeError, r"`x` must have a floating dtype")
    yield ErrorInput(SampleInput("0-d x", (np.array(1.0), a, None, None)),
                     ValueError, r"`x` must have at least 1 dimension")
    yield ErrorInput(SampleInput("alpha shape", (x, np.array(0.5), None, None)),
                     ValueError, r"`alpha` must have shape \(1,\), got \(\)")
    yield ErrorInput(SampleInput("alpha missing", (x, None, None, None)),
                     TypeError, r"`alpha` must be a numpy.ndarray, got NoneType")
    yield ErrorInput(SampleInput("weight", (x, a, np.ones(2), None)),
                     ValueError, r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(SampleInput("bias nchw", (np.ones((2, 3, 4)), a, None, np.ones(4)),
                                 dict(channels_last=False)),
                     ValueError, r"`bias` must have shape \(3,\), got \(4,\)")
    yield ErrorInput(SampleInput("1-d nchw", (np.ones(3), a, None, None),
                                 dict(channels_last=False)),
                     ValueError, r"`x` must have at least 2 dimensions")
    yield ErrorInput(SampleInput("channels_last str", (x, a, None, None),
                                 dict(channels_last="yes")),
                     TypeError, r"`channels_last` must be a bool")


def _torch_call(torch, x, alpha, weight, bias, *, channels_last=True):
    """``DynamicTanh.forward`` of the official code, written with torch ops."""
    y = torch.tanh(alpha * x)
    shape = (-1,) if channels_last else (-1,) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    return y + bias.reshape(shape) if bias is not None else y


def _layer_init(features, **options):
    return dyt_init(features, **options)


SPEC = NormSpec(
    name="dyt",
    title="Dynamic Tanh (DyT)",
    paper=Paper("Transformers without Normalization", "Zhu, Chen, He, LeCun, Liu", 2025,
                "arXiv:2503.10622"),
    forward=dyt_forward,
    backward=dyt_backward,
    op=dyt,
    composite=dyt_composite,
    diff_argnames=("x", "alpha", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=_layer_init,
)

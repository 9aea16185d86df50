r"""LayerNorm Scaling: a pre-norm's output divided by the square root of its layer's depth.

Sun, Song, Li, Yin, Zheng & Liu, *The Curse of Depth in Large Language Models*, arXiv:2502.05795
(2025).

In a Pre-LN block of (1-based) depth :math:`\ell = i + 1` (:math:`i` the 0-based index of the
block), both pre-norms' outputs are divided by :math:`\sqrt\ell`:

.. math::

   h = x + \mathrm{Attn}\bigl(\mathrm{Norm}_a(x)/\sqrt\ell\bigr),\qquad
   x' = h + \mathrm{MLP}\bigl(\mathrm{Norm}_f(h)/\sqrt\ell\bigr).

This function is one such norm: with :math:`\mathrm{Norm}` LayerNorm (``norm="layer"``) or
RMSNorm (``norm="rms"``) over the trailing ``normalized_shape`` axes,

.. math::

   y = \frac{\gamma\odot\hat x + \beta}{\sqrt\ell},\qquad
   \hat x = (x-\mu)(\sigma^2+\epsilon)^{-1/2}\ \ (\text{LayerNorm}),\quad
   \hat x = x\,(\langle x^2\rangle+\epsilon)^{-1/2}\ \ (\text{RMSNorm, no }\beta).

``layer_index`` is :math:`\ell`, **1-based**: the first block (``layer_index=1``) is unscaled, as
in the official code (``1/sqrt(layer_index + 1)`` of a 0-based index). The final norm and the
embeddings are not scaled (pass ``layer_index=1``, or use the plain norm).

Backward (derivation: ``docs/derivations/layer_norm_scaling.rst``): the norm's own backward
(:mod:`refnorm.norms.layer_norm`, :mod:`refnorm.norms.rms_norm`) applied to
:math:`\mathrm{d}y/\sqrt\ell`. As a function this equals the plain norm with
:math:`\gamma, \beta` replaced by :math:`\gamma/\sqrt\ell, \beta/\sqrt\ell`; the optimizer
dynamics differ (Adam's normalized step on :math:`\gamma` does not see the factor).

Conventions. The paper names LayerNorm, and ``norm="layer"`` (biased variance, ``eps`` inside
the root, default ``1e-5``, ``torch.nn.functional.layer_norm``) is the default here. The
official code (``lmsdss/LayerNorm-Scaling``, LLaMA models) scales LLaMA's **RMSNorm** with
``eps = 1e-6``: ``norm="rms"`` (``eps=None`` gives 1e-6 for it). Discrepancies in the official
repository: at its head (3ac54dd) the environment key is lower-cased and then compared with
``'LNS'``, which never matches, so the README's command builds no decoder norms and every decoder
layer returns its input; the earlier key ``'cod'`` (before 33c3899) runs the formula above. Its
README warns that depth-scaled initialization (OLMo style) cancels the benefit.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, saved_mean, saved_xhat, trailing_axes
from refnorm.norms.layer_norm import LayerNormCache, layer_norm_backward, layer_norm_forward
from refnorm.norms.rms_norm import RMSNormCache, rms_norm_backward, rms_norm_forward
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "layer_norm_scaling"
FORMS = ("layer", "rms")
DEFAULT_EPS = {"layer": 1e-5, "rms": 1e-6}


class LayerScaledCache(NamedTuple):
    """LayerNorm's cache (the same fields) and the output's scale."""
    x: np.ndarray
    shift: np.ndarray
    correction: np.ndarray
    rstd: np.ndarray
    weight: np.ndarray | None
    has_bias: bool
    axes: tuple[int, ...]
    bias_dtype: np.dtype | None
    wide: tuple | None              # LayerNorm's rows done in a wider dtype, or None
    output_scale: float             # 1 / sqrt(layer_index)
    depth_root: float               # sqrt(layer_index): y and dy are divided by it

    mean = property(saved_mean)
    xhat = property(saved_xhat)


class RMSScaledCache(NamedTuple):
    """RMSNorm's cache (the same fields) and the output's scale."""
    x: np.ndarray
    rstd: np.ndarray
    q: np.ndarray | None
    weight: np.ndarray | None
    axes: tuple[int, ...]
    wide: tuple | None
    output_scale: float
    depth_root: float

    @property
    def xhat(self):
        return (self.x * self.rstd).astype(self.x.dtype, copy=False)


class LayerNormScalingGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _check_layer_index(layer_index):
    if not isinstance(layer_index, numbers.Integral) or isinstance(layer_index, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `layer_index` must be an int, got {type(layer_index).__name__}")
    if layer_index < 1:
        raise ValueError(f"{_OP}: `layer_index` must be >= 1 (1-based: the first layer is "
                         f"unscaled), got {layer_index}")
    return int(layer_index)


def _check_form(norm):
    if not isinstance(norm, str) or norm not in FORMS:
        raise ValueError(f"{_OP}: `norm` must be 'layer' or 'rms', got {norm!r}")
    return norm


def _renamed(exc):
    msg = str(exc)
    for name in ("layer_norm", "rms_norm"):
        if msg.startswith(name + ": "):
            return type(exc)(f"{_OP}: " + msg[len(name) + 2:])
    return exc


def layer_norm_scaling_forward(x, normalized_shape, weight=None, bias=None, eps=None,
                               layer_index=1, norm="layer"):
    r"""A LayerNorm (or RMSNorm) of ``x`` divided by :math:`\sqrt{\ell}`; ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``
    normalized_shape : int or tuple of int
    weight, bias : ndarray of shape ``normalized_shape``, optional
        :math:`\gamma` and :math:`\beta` (``bias`` must be None for ``norm="rms"``).
    eps : float, optional
        ``None``: 1e-5 for LayerNorm, 1e-6 for RMSNorm (the official LLaMA code's).
    layer_index : int, default 1
        :math:`\ell \ge 1`, the 1-based depth of the block.
    norm : {"layer", "rms"}, default "layer"

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : LayerScaledCache or RMSScaledCache
    """
    x = check_array(x, "x", _OP)
    norm = _check_form(norm)
    ell = _check_layer_index(layer_index)
    if norm == "rms" and bias is not None:
        raise ValueError(f"{_OP}: `bias` must be None for norm='rms' (RMSNorm has no shift)")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    try:
        if norm == "layer":
            y, inner = layer_norm_forward(x, normalized_shape, weight, bias, eps)
        else:
            y, inner = rms_norm_forward(x, normalized_shape, weight, eps)
    except (TypeError, ValueError) as exc:
        raise _renamed(exc) from None
    root = math.sqrt(ell)
    y /= np.asarray(root, y.dtype)        # y is the norm's own new array
    cls = LayerScaledCache if norm == "layer" else RMSScaledCache
    # the norm's fields up to ``wide`` (no weight offset here: the later fields keep defaults)
    return y, cls(*inner[:len(cls._fields) - 2], 1.0 / root, root)


def layer_norm_scaling_backward(dy, cache):
    r"""Hand-derived VJP: the norm's backward of :math:`\mathrm{d}y/\sqrt\ell`."""
    root = cache.depth_root
    dys = dy / np.asarray(root, dy.dtype)
    if isinstance(cache, LayerScaledCache):
        return LayerNormScalingGrads(*layer_norm_backward(
            dys, LayerNormCache(*cache[:len(LayerScaledCache._fields) - 2])))
    return LayerNormScalingGrads(*rms_norm_backward(
        dys, RMSNormCache(*cache[:len(RMSScaledCache._fields) - 2])), None)


layer_norm_scaling = custom_vjp(layer_norm_scaling_forward, layer_norm_scaling_backward,
                                ("x", "weight", "bias"))
layer_norm_scaling.__doc__ = ("Differentiable LayerNorm Scaling (engine op); see "
                              "layer_norm_scaling_forward.")


def layer_norm_scaling_composite(x, normalized_shape, weight=None, bias=None, eps=None,
                                 layer_index=1, norm="layer"):
    """The same math with engine primitives only: the engine derives its own gradient."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = trailing_axes(x.ndim, len(shape))
    eps = DEFAULT_EPS[norm] if eps is None else eps
    if norm == "layer":
        xc = x - ag.mean(x, axes, keepdims=True)
        y = xc / ag.sqrt(ag.mean(xc * xc, axes, keepdims=True) + eps)
    else:
        y = x / ag.sqrt(ag.mean(x * x, axes, keepdims=True) + eps)
    y = y * weight if weight is not None else y
    y = y + bias if bias is not None else y
    return y / math.sqrt(layer_index)


def layer_norm_scaling_init(features, layer_index=1, norm="layer", eps=None, dtype=np.float64):
    r"""A layer's parameters: ``(params, state, kwargs)`` (the protocol of
    ``NormSpec.layer_init``): :math:`\gamma_0 = 1`, :math:`\beta_0 = 0` (LayerNorm only), the
    official code's plain init (no depth-scaled initialization)."""
    norm = _check_form(norm)
    params = {"weight": np.ones(features, dtype)}
    if norm == "layer":
        params["bias"] = np.zeros(features, dtype)
    return params, {}, {"normalized_shape": (features,), "eps": eps,
                        "layer_index": _check_layer_index(layer_index), "norm": norm}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, nd=1, ell=4, norm="layer", eps=1e-5, affine=True, x=None):
    x = rng.standard_normal(shape) if x is None else x
    p = shape[len(shape) - nd:]
    weight = rng.standard_normal(p) + 1.0 if affine else None
    bias = rng.standard_normal(p) if affine and norm == "layer" else None
    return SampleInput(name, (x, weight, bias), dict(normalized_shape=p, eps=eps,
                                                     layer_index=ell, norm=norm))


def sample_inputs(rng):
    yield _case(rng, "(4,6)-layer4", (4, 6))
    yield _case(rng, "(2,3,5)-nd2-layer7", (2, 3, 5), nd=2, ell=7)
    yield _case(rng, "(3,7)-plain-first-layer", (3, 7), ell=1, affine=False, eps=0.1)
    yield _case(rng, "(3,5)-rms-layer3", (3, 5), ell=3, norm="rms", eps=1e-6)
    yield _case(rng, "(2,4)-rms-eps-None-layer12", (2, 4), ell=12, norm="rms", eps=None)
    yield _case(rng, "(5,1)-one-element-rows", (5, 1), ell=2)
    yield _case(rng, "(3,6)-constant-rows", (3, 6), ell=5,
                x=np.repeat(np.array([[0.375], [-1.25], [2.5]]), 6, axis=1))
    yield _case(rng, "(3,5)-mean100", (3, 5), ell=9, x=100.0 + rng.standard_normal((3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(37,1000)-layer5", (37, 1000), ell=5)
    yield _case(rng, "(37,1000)-rms-layer24", (37, 1000), ell=24, norm="rms", eps=1e-6)
    yield _case(rng, "(4,7,13)-nd2-layer3", (4, 7, 13), nd=2, ell=3)
    yield _case(rng, "(3,1)-one-element-rows", (3, 1), ell=2)
    yield _case(rng, "(2,65536)-long-rows-layer32", (2, 65536), ell=32)
    yield _case(rng, "(8,129)-mean1e4-std1e-3-layer6", (8, 129), ell=6,
                x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), ell=3, x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), ell=3, x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], None, None), dict(normalized_shape=2)),
                     TypeError, r"layer_norm_scaling: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("shape", (x, None, None), dict(normalized_shape=(2,))),
                     ValueError, r"layer_norm_scaling: `normalized_shape` \(2,\) must equal")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2), None), dict(normalized_shape=3)),
                     ValueError, r"layer_norm_scaling: `weight` must have shape \(3,\)")
    yield ErrorInput(SampleInput("layer 0", (x, None, None),
                                 dict(normalized_shape=3, layer_index=0)),
                     ValueError, r"`layer_index` must be >= 1 \(1-based")
    yield ErrorInput(SampleInput("layer float", (x, None, None),
                                 dict(normalized_shape=3, layer_index=2.0)),
                     TypeError, r"`layer_index` must be an int, got float")
    yield ErrorInput(SampleInput("norm", (x, None, None), dict(normalized_shape=3, norm="group")),
                     ValueError, r"`norm` must be 'layer' or 'rms', got 'group'")
    yield ErrorInput(SampleInput("rms bias", (x, None, np.ones(3)),
                                 dict(normalized_shape=3, norm="rms")),
                     ValueError, r"`bias` must be None for norm='rms'")
    yield ErrorInput(SampleInput("eps", (x, None, None), dict(normalized_shape=3, eps=-1.0)),
                     ValueError, r"layer_norm_scaling: `eps` must be a finite number >= 0")


def _torch_call(torch, x, weight, bias, *, normalized_shape, eps=None, layer_index=1,
                norm="layer"):
    """The official block's ``norm(x) / sqrt(layer_index)``, with torch's norms."""
    eps = DEFAULT_EPS[norm] if eps is None else eps
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if norm == "layer":
        y = torch.nn.functional.layer_norm(x, ns, weight, bias, eps)
    else:
        y = torch.nn.functional.rms_norm(x, ns, weight, eps)
    return y / math.sqrt(layer_index)


def _layer_init(features, **options):
    return layer_norm_scaling_init(features, **options)


SPEC = NormSpec(
    name="layer_norm_scaling",
    title="LayerNorm Scaling (a pre-norm divided by the square root of its depth)",
    paper=Paper("The Curse of Depth in Large Language Models",
                "Sun, Song, Li, Yin, Zheng, Liu", 2025, "arXiv:2502.05795"),
    forward=layer_norm_scaling_forward,
    backward=layer_norm_scaling_backward,
    op=layer_norm_scaling,
    composite=layer_norm_scaling_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    # not standardized (variance s^2/(s^2+eps)/l): no stats_axes; the oracle's groups for its
    # rstd are in refnorm.oracle.structure.GROUPS
    stats_axes=None,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=_layer_init,
)

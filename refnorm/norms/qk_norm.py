r"""QK-norm: queries and keys normalized per head, over the head dimension, before attention.

``x`` is a query or key tensor with the head dimension last, :math:`(\dots, d_h)` (for example
``(B, H, T, d_h)``); every vector of :math:`d_h` elements is normalized on its own, and
``weight`` and ``bias`` (shape :math:`(d_h,)`) are shared across heads and tokens. Three forms
(``norm=``):

* ``"layer"`` (the default): LayerNorm over :math:`d_h`, as ViT-22B (Dehghani et al., *Scaling
  Vision Transformers to 22 Billion Parameters*, ICML 2023, arXiv:2302.05442) and timm's
  ``Attention(qk_norm=True)``: :math:`y = \gamma\odot(x-\mu)(\sigma^2+\epsilon)^{-1/2} + \beta`,
  biased variance, ``eps`` inside the root, default ``1e-5`` (``nn.LayerNorm``; timm's ViT passes
  ``1e-6``). Math and backward: :mod:`refnorm.norms.layer_norm`.
* ``"rms"``: RMSNorm over :math:`d_h`, as Qwen3 (per head, :math:`\gamma` of size :math:`d_h`,
  before RoPE): :math:`y = \gamma\odot x\,(\langle x^2\rangle+\epsilon)^{-1/2}`, no ``bias``;
  ``eps=None`` is ``torch.nn.functional.rms_norm``'s default (the machine epsilon of the
  dtype); Qwen3 passes ``rms_norm_eps = 1e-6``. Math and backward:
  :mod:`refnorm.norms.rms_norm`. (OLMo-2 normalizes the whole projection, :math:`H d_h` wide,
  before the split into heads: that is :func:`refnorm.norms.rms_norm.rms_norm_forward` over
  the last axis of the unsplit tensor, not this function.)
* ``"l2"``: QKNorm (Henry, Dachapally, Pawar & Chen, *Query-Key Normalization for
  Transformers*, Findings of EMNLP 2020, arXiv:2010.04245): :math:`y = x/\max(\lVert
  x\rVert_2, \epsilon)`, ``eps = 1e-12``, no ``weight`` or ``bias``. QKNorm's learnable scale
  :math:`g` multiplies the **logits**, :math:`g\,\hat q\hat k^\top` with no
  :math:`1/\sqrt{d_h}` (one scalar per attention module, shared across heads, initialized
  to :math:`\log_2(L^2 - L)` for the 97.5th percentile :math:`L` of the training sequence
  lengths): it is a parameter of the attention, not of this normalization. Math and backward:
  :mod:`refnorm.norms.l2_norm`.

The backward of each form is that form's own (derivations: ``docs/derivations/qk_norm.rst``);
``qk_norm_backward`` dispatches on the cache. The attention logits are then formed by the
caller (:math:`q k^\top/\sqrt{d_h}` for the first two forms, :math:`g\,\hat q\hat k^\top` for
QKNorm); the same function (and parameters of their own) normalizes ``q`` and ``k``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.norms._stats import check_array
from refnorm.norms.l2_norm import L2NormCache, l2_norm_backward, l2_norm_forward
from refnorm.norms.layer_norm import (LayerNormCache, layer_norm_backward,
                                      layer_norm_forward)
from refnorm.norms.rms_norm import RMSNormCache, rms_norm_backward, rms_norm_forward
from refnorm.norms.rms_norm import default_eps as _rms_default_eps
from refnorm.autograd import custom_vjp
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "qk_norm"
FORMS = ("layer", "rms", "l2")
#: each form's default eps (``eps=None``): nn.LayerNorm's, F.rms_norm's (dtype-dependent:
#: None is passed on), F.normalize's
DEFAULT_EPS = {"layer": 1e-5, "rms": None, "l2": 1e-12}


class QKNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def default_eps(dtype):
    """What ``eps=None`` stands for in the RMS form at ``dtype`` (``F.rms_norm``'s default: the
    machine epsilon of the dtype promoted to float32). The oracle and the reliability tests
    resolve ``eps=None`` with it, so that the float64 reference and a low-precision candidate
    use the same number; the sample and oracle inputs pass ``eps=None`` for the RMS form only
    (the other forms' defaults do not depend on the dtype)."""
    return _rms_default_eps(dtype)


def _check_form(norm):
    if not isinstance(norm, str) or norm not in FORMS:
        raise ValueError(f"{_OP}: `norm` must be 'layer', 'rms' or 'l2', got {norm!r}")
    return norm


def _reraise(exc):
    """An error of the form's own forward, renamed to this op (the argument names are
    the same)."""
    msg = str(exc)
    for name in ("layer_norm", "rms_norm", "l2_norm"):
        if msg.startswith(name + ": "):
            return type(exc)(f"{_OP}: " + msg[len(name) + 2:])
    return exc


def qk_norm_forward(x, weight=None, bias=None, norm="layer", eps=None):
    r"""Normalize each head-dimension vector (the last axis) of a query or key tensor;
    returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., head_dim)``
    weight, bias : ndarray of shape ``(head_dim,)``, optional
        :math:`\gamma` (``"layer"`` and ``"rms"``) and :math:`\beta` (``"layer"`` only),
        shared across heads. ``None`` means 1 and 0.
    norm : {"layer", "rms", "l2"}, default "layer"
    eps : float, optional
        ``None``: the form's default (1e-5; F.rms_norm's machine epsilon; 1e-12).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : the form's cache (LayerNormCache, RMSNormCache or L2NormCache)
    """
    x = check_array(x, "x", _OP, ndim_min=1)
    norm = _check_form(norm)
    if norm != "layer" and bias is not None:
        raise ValueError(f"{_OP}: `bias` must be None for norm={norm!r} (it has no shift)")
    if norm == "l2" and weight is not None:
        raise ValueError(f"{_OP}: `weight` must be None for norm='l2' (QKNorm's scale "
                         f"multiplies the attention logits)")
    eps = DEFAULT_EPS[norm] if eps is None else eps
    d = x.shape[-1]
    try:
        if norm == "layer":
            return layer_norm_forward(x, d, weight, bias, eps)
        if norm == "rms":
            return rms_norm_forward(x, d, weight, eps)
        return l2_norm_forward(x, dim=-1, eps=eps)
    except (TypeError, ValueError) as exc:
        raise _reraise(exc) from None


def qk_norm_backward(dy, cache):
    """Hand-derived VJP of :func:`qk_norm_forward`: the form's own backward, by its cache."""
    if isinstance(cache, LayerNormCache):
        return QKNormGrads(*layer_norm_backward(dy, cache))
    if isinstance(cache, RMSNormCache):
        return QKNormGrads(*rms_norm_backward(dy, cache), None)
    if isinstance(cache, L2NormCache):
        return QKNormGrads(l2_norm_backward(dy, cache).dx, None, None)
    raise TypeError(f"{_OP}: not a cache of qk_norm_forward: {type(cache).__name__}")


qk_norm = custom_vjp(qk_norm_forward, qk_norm_backward, ("x", "weight", "bias"))
qk_norm.__doc__ = "Differentiable QK-norm (engine op); see qk_norm_forward."


def qk_norm_composite(x, weight=None, bias=None, norm="layer", eps=None):
    """The same math with engine primitives only: the engine derives its own gradient."""
    eps = DEFAULT_EPS[norm] if eps is None else eps
    if norm == "rms" and eps is None:
        eps = float(np.finfo(np.promote_types(x.dtype, np.float32)).eps)
    if norm == "layer":
        xc = x - ag.mean(x, -1, keepdims=True)
        y = xc / ag.sqrt(ag.mean(xc * xc, -1, keepdims=True) + eps)
    elif norm == "rms":
        y = x / ag.sqrt(ag.mean(x * x, -1, keepdims=True) + eps)
    else:
        return x / ag.maximum(ag.sqrt(ag.sum(x * x, -1, keepdims=True)), eps)
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def qk_norm_init(features, norm="layer", eps=None, affine=True, dtype=np.float64):
    r"""A layer's parameters as the official codes initialize them: ``(params, state,
    kwargs)`` (the protocol of ``NormSpec.layer_init``); ``features`` is :math:`d_h`.
    :math:`\gamma_0 = 1`, :math:`\beta_0 = 0` (``"layer"``: both; ``"rms"``: :math:`\gamma`;
    ``"l2"``: none)."""
    norm = _check_form(norm)
    params = {}
    if affine and norm != "l2":
        params["weight"] = np.ones(features, dtype)
        if norm == "layer":
            params["bias"] = np.zeros(features, dtype)
    return params, {}, {"norm": norm, "eps": eps}


def _stats_axes(sample):
    """The standardized axis: the head dimension, for the LayerNorm form only."""
    if sample.kwargs.get("norm", "layer") != "layer":
        return None
    return (np.ndim(sample.arrays[0]) - 1,)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, norm="layer", eps=None, affine=True, x=None):
    x = rng.standard_normal(shape) if x is None else x
    d = shape[-1]
    weight = rng.standard_normal(d) + 1.0 if affine and norm != "l2" else None
    bias = rng.standard_normal(d) if affine and norm == "layer" else None
    # eps=None only for the RMS form (default_eps): the others give theirs explicitly
    assert eps is not None or norm == "rms"
    return SampleInput(name, (x, weight, bias), {"norm": norm, "eps": eps})


def sample_inputs(rng):
    yield _case(rng, "(2,3,4,8)-layer-BHTd", (2, 3, 4, 8), eps=1e-6)
    yield _case(rng, "(2,5,3,4)-layer-BTHd-plain", (2, 5, 3, 4), affine=False, eps=1e-5)
    yield _case(rng, "(2,3,4,8)-rms", (2, 3, 4, 8), "rms", eps=1e-6)
    yield _case(rng, "(2,2,3,5)-rms-eps-None", (2, 2, 3, 5), "rms")
    yield _case(rng, "(2,3,4,8)-l2", (2, 3, 4, 8), "l2", eps=1e-12, x=0.5 + rng.standard_normal((2, 3, 4, 8)))
    yield _case(rng, "(3,2,1)-layer-one-element", (3, 2, 1), eps=1e-5)
    # constants with few bits: the composite's mean is then exact too, and both give xhat = 0
    yield _case(rng, "(2,2,6)-layer-constant-rows", (2, 2, 6), eps=1e-5,
                x=np.repeat(np.array([[[0.375], [-1.25]], [[2.5], [0.8125]]]), 6, axis=2))
    yield _case(rng, "(2,3,5)-rms-mean100", (2, 3, 5), "rms", eps=1e-6,
                x=100.0 + rng.standard_normal((2, 3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(2,12,37,64)-layer", (2, 12, 37, 64), eps=1e-6)
    yield _case(rng, "(2,37,12,64)-rms", (2, 37, 12, 64), "rms", eps=1e-6)
    yield _case(rng, "(2,8,37,128)-rms-eps-None", (2, 8, 37, 128), "rms")
    yield _case(rng, "(2,8,37,64)-l2", (2, 8, 37, 64), "l2", eps=1e-12)
    yield _case(rng, "(4,3,7,13)-layer-odd", (4, 3, 7, 13), eps=1e-5)
    yield _case(rng, "(3,2,1)-layer-one-element", (3, 2, 1), eps=1e-5)
    yield _case(rng, "(4,129)-layer-mean1e4-std1e-3", (4, 129), eps=1e-6,
                x=1e4 + 1e-3 * rng.standard_normal((4, 129)))
    yield _case(rng, "(6,33)-rms-tiny-scale", (6, 33), "rms", eps=1e-6,
                x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-l2-huge-scale", (6, 33), "l2", eps=1e-12, x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], None, None)),
                     TypeError, r"qk_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int), None, None)),
                     TypeError, r"qk_norm: `x` must have a floating dtype")
    yield ErrorInput(SampleInput("0-d x", (np.array(1.0), None, None)),
                     ValueError, r"qk_norm: `x` must have at least 1 dimensions")
    yield ErrorInput(SampleInput("norm", (x, None, None), dict(norm="batch")),
                     ValueError, r"`norm` must be 'layer', 'rms' or 'l2', got 'batch'")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2), None)),
                     ValueError, r"qk_norm: `weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(SampleInput("rms bias", (x, None, np.ones(3)), dict(norm="rms")),
                     ValueError, r"`bias` must be None for norm='rms'")
    yield ErrorInput(SampleInput("l2 weight", (x, np.ones(3), None), dict(norm="l2")),
                     ValueError, r"`weight` must be None for norm='l2'")
    yield ErrorInput(SampleInput("eps", (x, None, None), dict(eps=-1.0)),
                     ValueError, r"qk_norm: `eps` must be a finite number >= 0")


def _torch_call(torch, x, weight, bias, *, norm="layer", eps=None):
    eps = DEFAULT_EPS[norm] if eps is None else eps
    d = x.shape[-1]
    if norm == "layer":
        return torch.nn.functional.layer_norm(x, (d,), weight, bias, eps)
    if norm == "rms":
        return torch.nn.functional.rms_norm(x, (d,), weight, eps)
    return torch.nn.functional.normalize(x, p=2.0, dim=-1, eps=eps)


def _layer_init(features, **options):
    return qk_norm_init(features, **options)


SPEC = NormSpec(
    name="qk_norm",
    title="QK-norm (LayerNorm, RMSNorm or L2 of queries and keys, per head)",
    paper=Paper("Query-Key Normalization for Transformers", "Henry, Dachapally, Pawar, Chen",
                2020, "arXiv:2010.04245"),
    forward=qk_norm_forward,
    backward=qk_norm_backward,
    op=qk_norm,
    composite=qk_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    invariances=("shift", "scale"),   # the LayerNorm form (the one with stats_axes)
    stats_axes=_stats_axes,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=_layer_init,
)

r"""Compressed RMSNorm (CRMSNorm), and the array-level steps of the Pre-LN to Pre-(C)RMSNorm
conversion.

Jiang, Gu, Zhu, Pan, *Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient
Pre-LN Transformers*, NeurIPS 2023, arXiv:2305.14858. Official code:
``ZixuanJiang/pre-rmsnorm-transformer`` (``torch/customized_layer.py``, ``torch/model.py``).

**Zero-mean vectors are compressible.** On :math:`V = \{x\in\mathbb R^d : \sum_i x_i = 0\}` the
last coordinate is redundant: :func:`compress` keeps :math:`z = (x_1,\ldots,x_{d-1})` and
:func:`decompress` restores :math:`x = (z, -\sum_i z_i)`. CRMSNorm is RMSNorm of the decompressed
vector, compressed again: with :math:`z \in \mathbb R^{d-1}` (the last axis of ``x``),
:math:`s = \sum_i z_i` and :math:`d = \dim z + 1`,

.. math::

   q = \frac{\sum_i z_i^2 + s^2}{d},\qquad r = (q+\epsilon)^{-1/2},\qquad y = z\,r ,

since :math:`\|D(z)\|^2 = \sum z_i^2 + s^2`. So :math:`\mathrm{CRMS}(z) = C(\mathrm{RMS}(D(z)))`
and, on zero-mean :math:`x`, :math:`\mathrm{RMS}(x) = \mathrm{LN}(x)` exactly, :math:`\epsilon`
included (it is inside the square root in all three).

Backward (derivation: ``docs/derivations/crms_norm.rst``). With :math:`\hat z = r z`,
:math:`\hat s = r s` and :math:`g = \mathrm{d}y`:

.. math::

   \mathrm{d}z = r\,\Bigl(g - (\hat z + \hat s\,\mathbf 1)\,\frac{\sum_j g_j \hat z_j}{d}\Bigr).

Conventions, from the official code: **no affine** (the LayerNorm's :math:`\gamma, \beta` are
folded into the next linear layer, :func:`fold_affine_into_consumer`), ``eps`` inside the square
root, ``eps = 1e-5`` (the torch classes subclass ``nn.LayerNorm``; the JAX code uses 1e-6), the
mean square divides by :math:`d = \dim z + 1` (the code divides by ``x.shape[-1] + 1``). The
statistic is over the last axis only; every leading axis is a batch axis.

**The conversion, on arrays** (Section 3 of the paper; the conversion of whole models is in
``refnorm.nn``). A Pre-LN transformer reads its residual stream only through LayerNorms, and
:math:`\mathrm{LN}(x + c\mathbf 1) = \mathrm{LN}(x)`, so

1. fold every LayerNorm affine into the linear layer that consumes it,
   :math:`W \leftarrow W\,\mathrm{diag}(\gamma)`, :math:`b \leftarrow b + W\beta`
   (:func:`fold_affine_into_consumer`: QKV, FFN-in, the head);
2. re-centre every **producer** that writes into the stream,
   :math:`W \leftarrow P W`, :math:`b \leftarrow P b` with :math:`P = I - \frac1d\mathbf 1
   \mathbf 1^\top` (:func:`recenter_producer`: embeddings, positional embedding, cls token,
   attention output projection, FFN-out); the stream is then zero-mean, every LN equals an
   RMSNorm without affine: **Pre-RMSNorm**;
3. drop the last output row of every producer (:func:`compress_producer`) and fold the dropped
   coordinate into every consumer, :math:`W' = W_{:, :d-1} - W_{:, d-1}`
   (:func:`compress_consumer`); the norm becomes CRMSNorm: **Pre-CRMSNorm**.

Weights follow ``nn.Linear``: shape ``(out, in)``, :math:`y = x W^\top + b`.

Paper vs code, and code bugs (``formulas_transformer.md`` section 3.6):

* the JAX ``DenseZeroMeanOutput`` subtracts the mean of the flax kernel ``(in, out)`` over axis
  0, the **input** axis: its outputs are not zero-mean (the torch code, ``(out, in)`` and dim 0,
  is right); the JAX code is used for timing only;
* the JAX LayerNorm computes a one-pass :math:`\max(E[x^2]-\mu^2, 0)` variance;
* ``pre-crms-same-dim`` in ``torch/model.py`` applies CRMSNorm to a :math:`d`-dim stream dividing
  by :math:`d+1`: not equivalent, for speed benchmarks only;
* the equivalence needs **every** writer of the stream re-centred (an extra bias or adapter
  breaks it).

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``; the statistics are computed in float64
(longdouble for longdouble input) from values scaled by a power of two, so they neither
overflow nor underflow (:mod:`refnorm.norms._tokens`); where :math:`1/\mathrm{RMS}` itself
exceeds float64 (``eps = 0`` and a row of subnormal values), it is kept as :math:`r\,2^{-e}`
and applied to the scaled values, exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, check_eps, check_param
from refnorm.norms._tokens import pow2_scale, rsqrt_scaled, wide_dtype
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "crms_norm"


class CRMSNormCache(NamedTuple):
    x: np.ndarray           # z, the compressed input (not a copy)
    rstd: np.ndarray        # r, keepdims over the last axis, in the wide dtype: 1/RMS is
    shift: np.ndarray       # r 2^-shift, shift = 0 except where 1/RMS exceeds the wide dtype


class CRMSNormGrads(NamedTuple):
    dx: np.ndarray


def crms_norm_forward(x, eps=1e-5):
    r"""CRMSNorm over the last axis of ``x`` (the compressed :math:`z`); returns
    ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., d - 1)``
        A compressed zero-mean vector per row (:func:`compress`); any values are accepted.
    eps : float, default 1e-5
        Added inside the square root.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : CRMSNormCache
    """
    x = check_array(x, "x", _OP, ndim_min=1)
    eps = check_eps(eps, _OP)
    d = x.shape[-1] + 1
    xw = x.astype(wide_dtype(x.dtype), copy=False)
    zs, e = pow2_scale(xw, -1)   # z = zs 2^e: no overflow or underflow in the squares
    qs = (np.sum(np.square(zs), axis=-1, keepdims=True)
          + np.square(np.sum(zs, axis=-1, keepdims=True))) / d
    rstd, _ = rsqrt_scaled(qs, e, eps)
    # where r = 1/RMS itself exceeds the dtype (eps = 0 and a subnormal row), it is kept as
    # r = rs 2^-shift with rs = qs^-1/2, and every product by r is formed from zs = z 2^-e
    over = np.isinf(rstd) & (qs > 0)
    shift = np.where(over, e, 0)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rstd = np.where(over, 1.0 / np.sqrt(qs), rstd)
        y = (np.ldexp(xw, -shift) * rstd).astype(x.dtype)
    return y, CRMSNormCache(x, rstd, shift)


def crms_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`crms_norm_forward`:
    :math:`\mathrm{d}z = r\,(g - (\hat z + \hat s)\,\sum_j g_j\hat z_j / d)`."""
    x, r, shift = cache                  # 1/RMS = r 2^-shift (shift = 0 but in subnormal rows)
    d = x.shape[-1] + 1
    wide = r.dtype
    z = np.ldexp(x.astype(wide, copy=False), -shift)
    g = dy.astype(wide, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        zhat = z * r
        shat = np.sum(zhat, axis=-1, keepdims=True)
        k = np.sum(g * zhat, axis=-1, keepdims=True) / d
        dx = np.ldexp(r * (g - (zhat + shat) * k), -shift)
    return CRMSNormGrads(dx.astype(x.dtype))


crms_norm = custom_vjp(crms_norm_forward, crms_norm_backward, ("x",))
crms_norm.__doc__ = "Differentiable CRMSNorm (engine op); see :func:`crms_norm_forward`."


def crms_norm_composite(x, eps=1e-5):
    """The same math with engine primitives only: the engine derives its own gradient."""
    d = x.shape[-1] + 1
    s = ag.sum(x, -1, keepdims=True)
    q = (ag.sum(x * x, -1, keepdims=True) + s * s) / d
    return x / ag.sqrt(q + eps)


# ----------------------------------------------------------------------------------------------
# The conversion steps, on arrays
# ----------------------------------------------------------------------------------------------
def compress(x):
    """:math:`C(x) = (x_1, \\ldots, x_{d-1})`: drop the last coordinate (last axis)."""
    x = check_array(x, "x", "compress", ndim_min=1)
    if x.shape[-1] < 1:
        raise ValueError(f"compress: `x` must have a last axis of size >= 1, got {x.shape}")
    return x[..., :-1].copy()


def decompress(z):
    """:math:`D(z) = (z_1, \\ldots, z_{d-1}, -\\sum_i z_i)`: the zero-mean vector whose
    :func:`compress` is ``z`` (last axis)."""
    z = check_array(z, "z", "decompress", ndim_min=1)
    return np.concatenate([z, -np.sum(z, axis=-1, keepdims=True)], axis=-1)


def recenter(x):
    """:math:`P x = x - \\bar x\\,\\mathbf 1` over the last axis (an embedding table, a
    positional embedding, a cls token, a hidden state)."""
    x = check_array(x, "x", "recenter", ndim_min=1)
    return x - np.mean(x, axis=-1, keepdims=True)


def fold_affine_into_consumer(weight, bias, gamma, beta=None):
    r"""Fold a norm's affine :math:`\gamma\odot\hat x + \beta` into the ``nn.Linear`` that
    consumes it: :math:`W(\gamma\odot\hat x+\beta) + b = (W\,\mathrm{diag}\gamma)\,\hat x +
    (W\beta + b)`. Returns ``(W', b')``; ``bias=None`` is 0 (a bias is created when
    ``beta`` is given)."""
    weight = check_array(weight, "weight", "fold_affine_into_consumer", ndim_min=2)
    out, n = weight.shape
    bias = check_param(bias, "bias", "fold_affine_into_consumer", (out,))
    gamma = check_param(gamma, "gamma", "fold_affine_into_consumer", (n,))
    beta = check_param(beta, "beta", "fold_affine_into_consumer", (n,))
    new_w = weight * gamma if gamma is not None else weight.copy()
    if beta is None:
        return new_w, None if bias is None else bias.copy()
    return new_w, weight @ beta + (bias if bias is not None else 0.0)


def recenter_producer(weight, bias=None):
    r"""Make an ``nn.Linear`` that writes into the residual stream produce zero-mean outputs:
    :math:`W \leftarrow P W` (the mean over the **output** axis 0 removed from each column) and
    :math:`b \leftarrow P b`. Returns ``(W', b')``."""
    weight = check_array(weight, "weight", "recenter_producer", ndim_min=2)
    bias = check_param(bias, "bias", "recenter_producer", (weight.shape[0],))
    new_w = weight - weight.mean(axis=0, keepdims=True)
    return new_w, None if bias is None else bias - bias.mean()


def compress_producer(weight, bias=None):
    """A zero-mean producer of the compressed stream: its first ``d - 1`` output rows."""
    weight = check_array(weight, "weight", "compress_producer", ndim_min=2)
    bias = check_param(bias, "bias", "compress_producer", (weight.shape[0],))
    return weight[:-1].copy(), None if bias is None else bias[:-1].copy()


def compress_consumer(weight):
    r"""A consumer of the compressed stream: :math:`W x = \sum_{i<d} W_{:,i} x_i +
    W_{:,d}(-\sum_{i<d} x_i)`, so :math:`W' = W_{:, :d-1} - W_{:, d-1}`. The bias is
    unchanged."""
    weight = check_array(weight, "weight", "compress_consumer", ndim_min=2)
    return weight[:, :-1] - weight[:, -1:]


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, eps=1e-5, x=None):
    x = rng.standard_normal(shape) if x is None else x
    return SampleInput(name, (x,), dict(eps=eps))


def sample_inputs(rng):
    yield _case(rng, "(4,7)", (4, 7))
    yield _case(rng, "(2,3,5)-tokens", (2, 3, 5))
    yield _case(rng, "(3,6)-eps0.1", (3, 6), eps=0.1)
    yield _case(rng, "(5,1)-d2", (5, 1), eps=0.5)
    constant = np.repeat(rng.standard_normal((3, 1)), 6, axis=1)
    yield _case(rng, "(3,6)-constant-rows", (3, 6), x=constant)
    yield _case(rng, "(3,5)-mean100", (3, 5), x=100.0 + rng.standard_normal((3, 5)))
    zero_row = rng.standard_normal((3, 4))
    zero_row[1] = 0.0
    yield _case(rng, "(3,4)-zero-row-eps1e-3", (3, 4), eps=1e-3, x=zero_row)
    # the compression of zero-mean rows (what the equivalent model feeds it)
    yield _case(rng, "(4,8)-compressed-zero-mean", (4, 8),
                x=np.asarray(compress(recenter(rng.standard_normal((4, 9))))))
    yield _case(rng, "(6,)-one-row", (6,))


def oracle_inputs(rng):
    yield _case(rng, "(37,767)", (37, 767))
    yield _case(rng, "(4,7,13)-tokens", (4, 7, 13))
    # d = 2 with eps = 0.5: with a small eps, dz = g eps r^3 is a cancellation that every
    # kernel of the textbook formula loses log2(z^2 / eps) bits to, which the oracle's normwise
    # bound cannot express (see the docstring of the derivation page)
    yield _case(rng, "(3,1)-d2-eps0.5", (3, 1), eps=0.5)
    yield _case(rng, "(2,65535)-long-rows", (2, 65535))
    yield _case(rng, "(8,129)-compressed-zero-mean", (8, 129),
                x=compress(recenter(rng.standard_normal((8, 130)))))
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129),
                x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]],), {}), TypeError,
                     r"crms_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int),), {}), TypeError,
                     r"crms_norm: `x` must have a floating dtype")
    yield ErrorInput(SampleInput("0-d x", (np.array(1.0),), {}), ValueError,
                     r"crms_norm: `x` must have at least 1 dimensions")
    yield ErrorInput(SampleInput("eps", (x,), dict(eps=-1.0)), ValueError,
                     r"crms_norm: `eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("eps str", (x,), dict(eps="1e-5")), ValueError,
                     r"crms_norm: `eps` must be a finite number >= 0")


def _torch_call(torch, x, *, eps=1e-5):
    """CRMSNorm with torch ops (PyTorch has no built-in), as the official ``CRMSNorm`` module
    computes it; half-precision input is computed in float32, as PyTorch's norms do."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    d = xf.shape[-1] + 1
    q = (torch.sum(xf * xf, dim=-1, keepdim=True)
         + torch.sum(xf, dim=-1, keepdim=True) ** 2) / d
    return (xf * torch.rsqrt(q + eps)).to(x.dtype)


def layer_init(features, *, eps=1e-5):
    """A CRMSNorm layer on a compressed stream of ``features = d - 1`` coordinates: no
    parameters (the official code folds the affine into the next linear), no state."""
    return {}, {}, dict(eps=eps)


SPEC = NormSpec(
    name="crms_norm",
    title="Compressed RMSNorm (Pre-CRMSNorm Transformers)",
    paper=Paper("Pre-RMSNorm and Pre-CRMSNorm Transformers: Equivalent and Efficient Pre-LN "
                "Transformers", "Jiang, Gu, Zhu, Pan", 2023, "arXiv:2305.14858"),
    forward=crms_norm_forward,
    backward=crms_norm_backward,
    op=crms_norm,
    composite=crms_norm_composite,
    diff_argnames=("x",),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    invariances=(),      # scale holds only with eps scaled by a^2; no shift invariance
    stats_axes=None,     # not standardizing
    torch_call=_torch_call,
    param_layout=None,
    layer_init=layer_init,
)

r"""Fused residual add and normalization: ``add_rms_norm`` and ``add_layer_norm``.

The pre-norm Transformer block adds a sublayer's output to the residual stream and normalizes
the sum for the next sublayer. LLM kernels fuse the two (vLLM's ``fused_add_rms_norm(input,
residual, weight, epsilon)``, ``csrc/layernorm_kernels.cu``; FlashAttention's
``layer_norm_fn(x, weight, bias, residual=..., prenorm=True, residual_in_fp32=...)`` and
``rms_norm_fn``, ``flash_attn/ops/triton/layer_norm.py``) and return **two** outputs: the
normalized ``y`` and the sum ``s`` itself (the "prenorm" output), which is the next block's
residual:

.. math::

   s = x + \mathrm{residual},\qquad y = \mathrm{norm}(s),

with :math:`\mathrm{norm}` refnorm's :func:`~refnorm.norms.rms_norm.rms_norm_forward` (RMSNorm,
Zhang & Sennrich 2019, arXiv:1910.07467) or :func:`~refnorm.norms.layer_norm.layer_norm_forward`
(LayerNorm, Ba et al. 2016, arXiv:1607.06450), the same functions, conventions and defaults
(RMSNorm ``eps=None``: the machine epsilon of the computation dtype; LayerNorm ``eps=1e-5``).

Backward (derivation: ``docs/derivations/fused_add_norm.rst``). ``s`` feeds both ``y`` and the
output ``s``, so with upstream gradients :math:`\mathrm{d}y` and :math:`\mathrm{d}s`:

.. math::

   \mathrm{d}x = \mathrm{d}\,\mathrm{residual} = \mathrm{d}s + \mathrm{d}x_{\mathrm{norm}}(
   \mathrm{d}y;\ s),

:math:`\mathrm{d}x_{\mathrm{norm}}` the norm's own backward at :math:`s` (refnorm's
``rms_norm_backward``/``layer_norm_backward``), and :math:`\mathrm{d}\gamma,
\mathrm{d}\beta` the norm's. With :math:`\mathrm{d}s = 0` it is the backward of
``norm(x + residual)``.

**Dtypes and** ``residual_in_fp32``. ``y`` and ``dx`` have the dtype of ``x``,
``dresidual`` that of ``residual``. ``s`` has the dtype of ``x + residual`` (vLLM writes it in
place into ``residual``, of the input dtype); with ``residual_in_fp32=True`` it is kept in at
least float32 (FlashAttention's option: for float16 and bfloat16 inputs the residual stream is
float32, and ``y`` is computed from that float32 sum and rounded to ``x``'s dtype). For float32
and float64 inputs the option changes nothing: ``s`` is never narrowed, and float64 stays
float64. In the oracle (inputs cast up to float64) it says which precision the candidate's
``s`` must have: a candidate that rounds ``s`` to bfloat16 under ``residual_in_fp32=True`` fails
``s`` by hundreds of float32 ULPs and is named.

Neither PyTorch nor its ``torch.nn`` has these ops: ``torch_call`` is written from torch ops
(an add, then ``F.rms_norm``/``F.layer_norm``). They are not ``refnorm.nn`` layers (a layer
takes one input).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, check_eps, check_normalized_shape, check_param
from refnorm.norms.layer_norm import (layer_norm_backward, layer_norm_composite,
                                      layer_norm_forward)
from refnorm.norms.rms_norm import (EPS_PLACEMENTS, default_eps, rms_norm_backward,
                                    rms_norm_composite, rms_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

__all__ = ["add_rms_norm_forward", "add_rms_norm_backward", "add_layer_norm_forward",
           "add_layer_norm_backward", "add_rms_norm", "add_layer_norm", "default_eps"]


class FusedAddCache(NamedTuple):
    norm: tuple                     # the norm's cache, of s (its x is s)
    x_dtype: np.dtype
    residual_dtype: np.dtype

    # the statistics the oracle compares and its tolerance model reads, as the norm's
    @property
    def rstd(self):
        return self.norm.rstd

    @property
    def s(self):
        return self.norm.x


class AddRMSNormGrads(NamedTuple):
    dx: np.ndarray
    dresidual: np.ndarray
    dweight: np.ndarray | None


class AddLayerNormGrads(NamedTuple):
    dx: np.ndarray
    dresidual: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _residual_sum(op, x, residual, residual_in_fp32):
    """``s = x + residual``, checked; in at least float32 when ``residual_in_fp32``."""
    x = check_array(x, "x", op)
    residual = check_array(residual, "residual", op)
    if residual.shape != x.shape:
        raise ValueError(f"{op}: `residual` must have the shape of `x` {x.shape}, got "
                         f"{residual.shape}")
    if not isinstance(residual_in_fp32, (bool, np.bool_)):
        raise TypeError(f"{op}: `residual_in_fp32` must be a bool, got {residual_in_fp32!r}")
    dtype = np.result_type(x, residual)
    if residual_in_fp32:
        dtype = np.promote_types(dtype, np.float32)
    with np.errstate(over="ignore"):  # a sum beyond the dtype's range is inf, as in a kernel
        s = np.add(x, residual, dtype=dtype)
    return x, residual, s


def _backward(norm_backward, douts, cache):
    """``(dsum, grads)``: ``ds + dx_norm`` in the accumulation dtype, the norm's gradients."""
    dy, ds = douts
    s_dtype = cache.norm.x.dtype
    grads = norm_backward(np.asarray(dy).astype(s_dtype, copy=False), cache.norm)
    acc = np.promote_types(s_dtype, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        dsum = grads.dx.astype(acc) + np.asarray(ds).astype(acc)
        return dsum, grads, (dsum.astype(cache.x_dtype, copy=False),
                             dsum.astype(cache.residual_dtype, copy=False))


def add_rms_norm_forward(x, residual, normalized_shape, weight=None, eps=None, *,
                         eps_placement="inside", residual_in_fp32=False):
    r"""``s = x + residual``, ``y = rms_norm(s)``; returns ``((y, s), cache)``.

    Parameters
    ----------
    x, residual : ndarray of the same shape ``(..., *normalized_shape)``
        The sublayer's output and the residual stream (vLLM's ``input`` and ``residual``).
    normalized_shape, weight, eps, eps_placement
        As in :func:`~refnorm.norms.rms_norm.rms_norm_forward` (``eps=None``: the machine
        epsilon of the computation dtype).
    residual_in_fp32 : bool, keyword-only, default False
        Keep ``s`` in at least float32 (FlashAttention's option); no effect on float32 and
        float64 inputs.

    Returns
    -------
    (y, s) : ndarrays of ``x``'s shape; ``y`` of ``x``'s dtype, ``s`` of ``x + residual``'s
        (at least float32 with ``residual_in_fp32``)
    cache : FusedAddCache
    """
    op = "add_rms_norm"
    x, residual, s = _residual_sum(op, x, residual, residual_in_fp32)
    shape = check_normalized_shape(normalized_shape, x, op)
    check_param(weight, "weight", op, shape)
    if eps is not None:
        check_eps(eps, op)
    if not isinstance(eps_placement, str) or eps_placement not in EPS_PLACEMENTS:
        raise ValueError(f"{op}: `eps_placement` must be 'inside' or 'outside', got "
                         f"{eps_placement!r}")
    y, cache = rms_norm_forward(s, shape, weight, eps, eps_placement=eps_placement)
    with np.errstate(over="ignore"):
        y = y.astype(x.dtype, copy=False)
    return (y, s), FusedAddCache(cache, x.dtype, residual.dtype)


def add_rms_norm_backward(douts, cache):
    r"""VJP of :func:`add_rms_norm_forward`: ``((dy, ds), cache) -> AddRMSNormGrads``,
    :math:`\mathrm{d}x = \mathrm{d}\,\mathrm{residual} = \mathrm{d}s + {}` RMSNorm's
    :math:`\mathrm{d}x` at :math:`s`."""
    _, grads, (dx, dres) = _backward(rms_norm_backward, douts, cache)
    return AddRMSNormGrads(dx, dres, grads.dweight)


def add_layer_norm_forward(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                           residual_in_fp32=False):
    r"""``s = x + residual``, ``y = layer_norm(s)``; returns ``((y, s), cache)``.

    Parameters
    ----------
    x, residual : ndarray of the same shape ``(..., *normalized_shape)``
    normalized_shape, weight, bias, eps
        As in :func:`~refnorm.norms.layer_norm.layer_norm_forward` (default ``eps=1e-5``).
    residual_in_fp32 : bool, keyword-only, default False
        Keep ``s`` in at least float32 (FlashAttention's ``layer_norm_fn`` option).

    Returns
    -------
    (y, s) : ndarrays of ``x``'s shape (dtypes as in :func:`add_rms_norm_forward`)
    cache : FusedAddCache
    """
    op = "add_layer_norm"
    x, residual, s = _residual_sum(op, x, residual, residual_in_fp32)
    shape = check_normalized_shape(normalized_shape, x, op)
    check_param(weight, "weight", op, shape)
    check_param(bias, "bias", op, shape)
    check_eps(eps, op)
    y, cache = layer_norm_forward(s, shape, weight, bias, eps)
    with np.errstate(over="ignore"):
        y = y.astype(x.dtype, copy=False)
    return (y, s), FusedAddCache(cache, x.dtype, residual.dtype)


def add_layer_norm_backward(douts, cache):
    r"""VJP of :func:`add_layer_norm_forward`: ``((dy, ds), cache) -> AddLayerNormGrads``."""
    _, grads, (dx, dres) = _backward(layer_norm_backward, douts, cache)
    return AddLayerNormGrads(dx, dres, grads.dweight, grads.dbias)


add_rms_norm = custom_vjp(add_rms_norm_forward, add_rms_norm_backward,
                          ("x", "residual", "weight"), outputs=2)
add_rms_norm.__doc__ = "Fused residual add and RMSNorm (engine op, returns (y, s))."
add_layer_norm = custom_vjp(add_layer_norm_forward, add_layer_norm_backward,
                            ("x", "residual", "weight", "bias"), outputs=2)
add_layer_norm.__doc__ = "Fused residual add and LayerNorm (engine op, returns (y, s))."


def add_rms_norm_composite(x, residual, normalized_shape, weight=None, eps=None, *,
                           eps_placement="inside", residual_in_fp32=False):
    """The same math with engine primitives only (dtypes those of the inputs)."""
    s = x + residual
    return rms_norm_composite(s, normalized_shape, weight, eps, eps_placement=eps_placement), s


def add_layer_norm_composite(x, residual, normalized_shape, weight=None, bias=None, eps=1e-5, *,
                             residual_in_fp32=False):
    """The same math with engine primitives only (dtypes those of the inputs)."""
    s = x + residual
    return layer_norm_composite(s, normalized_shape, weight, bias, eps), s


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, nd, *, bias, eps, affine=True, s=None, scale=1.0, fp32=False,
          **kwargs):
    """x and residual of ``shape`` (``s``: their sum, if given; ``scale``: the residual
    stream's magnitude against x's), weight near 1, and a bias for LayerNorm."""
    x = rng.standard_normal(shape)
    if s is not None:  # x on a grid of 1/64, so that s - x is exact and x + residual is s
        x = np.round(64 * x) / 64
    residual = scale * rng.standard_normal(shape) if s is None else s - x
    p = shape[len(shape) - nd:]
    weight = rng.standard_normal(p) + 1.0 if affine else None
    arrays = (x, residual, weight) + ((rng.standard_normal(p) if affine else None,)
                                      if bias else ())
    kw = dict(normalized_shape=p, eps=eps, **kwargs)
    if fp32:
        kw["residual_in_fp32"] = True
    return SampleInput(name, arrays, kw)


def _samples(bias, eps):
    def sample_inputs(rng):
        yield _case(rng, "(4,6)", (4, 6), 1, bias=bias, eps=eps)
        yield _case(rng, "(2,3,5)-nd2-residual-x3", (2, 3, 5), 2, bias=bias, eps=eps, scale=3.0)
        yield _case(rng, "(3,7)-plain-eps0.1", (3, 7), 1, bias=bias, eps=0.1, affine=False)
        yield _case(rng, "(5,1)-one-element-rows-eps0.5", (5, 1), 1, bias=bias, eps=0.5)
        yield _case(rng, "(3,6)-constant-sum-rows", (3, 6), 1, bias=bias, eps=1e-3,
                    s=np.repeat(np.round(64 * rng.standard_normal((3, 1))) / 64, 6, axis=1))
        yield _case(rng, "(3,5)-sum-mean100", (3, 5), 1, bias=bias, eps=eps,
                    s=100.0 + rng.standard_normal((3, 5)))
        yield _case(rng, "(4,6)-residual-in-fp32", (4, 6), 1, bias=bias, eps=eps, fp32=True)
    return sample_inputs


def _oracle(bias):
    def oracle_inputs(rng):
        yield _case(rng, "(37,1000)", (37, 1000), 1, bias=bias, eps=1e-5)
        yield _case(rng, "(37,1000)-residual-in-fp32", (37, 1000), 1, bias=bias, eps=1e-5,
                    fp32=True)
        yield _case(rng, "(16,515)-residual-x30", (16, 515), 1, bias=bias, eps=1e-6, scale=30.0)
        yield _case(rng, "(16,515)-residual-x30-in-fp32", (16, 515), 1, bias=bias, eps=1e-6,
                    scale=30.0, fp32=True)
        yield _case(rng, "(3,1)-one-element-rows", (3, 1), 1, bias=bias, eps=1e-5)
        yield _case(rng, "(4,7,13)-nd2", (4, 7, 13), 2, bias=bias, eps=1e-5)
        yield _case(rng, "(2,65536)-long-rows", (2, 65536), 1, bias=bias, eps=1e-5)
        yield _case(rng, "(8,100)-constant-sum-rows", (8, 100), 1, bias=bias, eps=1e-5,
                    s=np.repeat(np.round(64 * rng.standard_normal((8, 1))) / 64, 100, axis=1))
    return oracle_inputs


def _errors(op, bias):
    def error_inputs():
        x = np.ones((2, 3))
        extra = (None,) if bias else ()
        yield ErrorInput(SampleInput("list residual", (x, [[1.0, 2.0, 3.0]], None) + extra,
                                     dict(normalized_shape=3)),
                         TypeError, rf"{op}: `residual` must be a numpy.ndarray")
        yield ErrorInput(SampleInput("residual shape", (x, np.ones((2, 1)), None) + extra,
                                     dict(normalized_shape=3)),
                         ValueError, rf"{op}: `residual` must have the shape of `x` \(2, 3\)")
        yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int), x, None) + extra,
                                     dict(normalized_shape=3)), TypeError, r"floating dtype")
        yield ErrorInput(SampleInput("shape", (x, x, None) + extra, dict(normalized_shape=(2,))),
                         ValueError, rf"{op}: `normalized_shape` \(2,\) must equal the trailing")
        yield ErrorInput(SampleInput("weight", (x, x, np.ones(2)) + extra,
                                     dict(normalized_shape=3)),
                         ValueError, rf"{op}: `weight` must have shape \(3,\), got \(2,\)")
        yield ErrorInput(SampleInput("eps", (x, x, None) + extra,
                                     dict(normalized_shape=3, eps=-1.0)),
                         ValueError, rf"{op}: `eps` must be a finite number >= 0")
        yield ErrorInput(SampleInput("fp32 flag", (x, x, None) + extra,
                                     dict(normalized_shape=3, residual_in_fp32="yes")),
                         TypeError, rf"{op}: `residual_in_fp32` must be a bool, got 'yes'")
        if bias:
            yield ErrorInput(SampleInput("bias", (x, x, None, np.ones((1, 3))),
                                         dict(normalized_shape=3)),
                             ValueError, rf"{op}: `bias` must have shape \(3,\)")
        else:
            yield ErrorInput(SampleInput("placement", (x, x, None),
                                         dict(normalized_shape=3, eps_placement="both")),
                             ValueError, rf"{op}: `eps_placement` must be 'inside' or 'outside'")
    return error_inputs


def _torch_sum(torch, x, residual, residual_in_fp32):
    if residual_in_fp32:
        wide = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), torch.float32)
        return x.to(wide) + residual.to(wide)
    return x + residual


def _torch_call_rms(torch, x, residual, weight, *, normalized_shape, eps=None,
                    eps_placement="inside", residual_in_fp32=False):
    """FlashAttention's ``rms_norm_ref`` with ``prenorm=True``, from torch ops."""
    from refnorm.norms.rms_norm import SPEC as RMS

    s = _torch_sum(torch, x, residual, residual_in_fp32)
    w = None if weight is None else weight.to(s.dtype)
    y = RMS.torch_call(torch, s, w, normalized_shape=normalized_shape, eps=eps,
                       eps_placement=eps_placement)
    return y.to(x.dtype), s


def _torch_call_layer(torch, x, residual, weight, bias, *, normalized_shape, eps=1e-5,
                      residual_in_fp32=False):
    """FlashAttention's ``layer_norm_ref`` with ``prenorm=True``, from torch ops."""
    s = _torch_sum(torch, x, residual, residual_in_fp32)
    w = None if weight is None else weight.to(s.dtype)
    b = None if bias is None else bias.to(s.dtype)
    y = torch.nn.functional.layer_norm(s, normalized_shape, w, b, eps)
    return y.to(x.dtype), s


_VLLM = Paper("vLLM fused_add_rms_norm (csrc/layernorm_kernels.cu); FlashAttention "
              "layer_norm_fn / rms_norm_fn with residual and prenorm=True "
              "(flash_attn/ops/triton/layer_norm.py)", "vLLM team; Dao", 2023,
              "https://github.com/Dao-AILab/flash-attention/blob/main/flash_attn/ops/triton/"
              "layer_norm.py")

ADD_RMS_SPEC = NormSpec(
    name="add_rms_norm",
    title="Fused residual add and RMSNorm (returns y and the residual sum s)",
    paper=_VLLM,
    forward=add_rms_norm_forward,
    backward=add_rms_norm_backward,
    op=add_rms_norm,
    composite=add_rms_norm_composite,
    diff_argnames=("x", "residual", "weight"),
    outputs=("y", "s"),
    sample_inputs=_samples(bias=False, eps=None),
    oracle_inputs=_oracle(bias=False),
    error_inputs=_errors("add_rms_norm", bias=False),
    invariances=(),
    stats_axes=None,      # y is standardized over s, not over x
    torch_equivalent=None,
    torch_call=_torch_call_rms,
    param_layout="trailing",
    layer_init=None,      # two inputs: not a one-input layer
)

ADD_LAYER_SPEC = NormSpec(
    name="add_layer_norm",
    title="Fused residual add and LayerNorm (returns y and the residual sum s)",
    paper=_VLLM,
    forward=add_layer_norm_forward,
    backward=add_layer_norm_backward,
    op=add_layer_norm,
    composite=add_layer_norm_composite,
    diff_argnames=("x", "residual", "weight", "bias"),
    outputs=("y", "s"),
    sample_inputs=_samples(bias=True, eps=1e-5),
    oracle_inputs=_oracle(bias=True),
    error_inputs=_errors("add_layer_norm", bias=True),
    invariances=(),
    stats_axes=None,
    torch_equivalent=None,
    torch_call=_torch_call_layer,
    param_layout="trailing",
    layer_init=None,
)

r"""Weight Normalization: a reparametrisation of a weight by a direction and a length.

Salimans & Kingma, *Weight Normalization: A Simple Reparameterization to Accelerate Training of
Deep Neural Networks*, NeurIPS 2016, arXiv:1602.07868.

The weight :math:`w` is not a parameter: it is computed from a direction :math:`v` (same shape)
and a length :math:`g`, one per slice :math:`s` along axis ``dim`` (a slice = one output
row of a Linear, one output channel of a Conv):

.. math::

   w = g\,\frac{v}{\lVert v\rVert},\qquad
   \lVert v\rVert_s = \Bigl(\sum_{i \in s} v_i^2\Bigr)^{1/2},

the norm taken over every axis except ``dim`` (``dim=None``: over the whole tensor, one scalar
:math:`g`).

Backward (derivation: ``docs/derivations/weight_norm.rst``). With :math:`G = \mathrm{d}w`,
:math:`\hat v = v/\lVert v\rVert` and per-slice sums :math:`\langle\cdot,\cdot\rangle_s`:

.. math::

   \mathrm{d}g = \langle G, \hat v\rangle_s ,\qquad
   \mathrm{d}v = \frac{g}{\lVert v\rVert}\bigl(G - \mathrm{d}g\,\hat v\bigr) .

So :math:`\langle \mathrm{d}v, v\rangle_s = 0`: :math:`w` does not change when a slice of
:math:`v` is rescaled, and its gradient has no component along :math:`v`.

Conventions, as ``torch.nn.utils.parametrizations.weight_norm(module, name='weight', dim=0)``,
whose computation is ``torch._weight_norm(v, g, dim)`` (``original0`` is :math:`g`,
``original1`` is :math:`v`):

* ``g`` has the shape of the per-slice norm with the reduced axes kept: ``(out, 1, ..., 1)``
  for ``dim=0``; shape ``()`` for ``dim=None``.
* ``dim=None`` and ``dim=-1`` both mean *the whole tensor* (PyTorch maps ``None`` to ``-1``, and
  ``torch._weight_norm`` reads ``-1`` as "no axis kept"). So ``dim=-1`` is **not** the last axis;
  for the last axis write ``dim=v.ndim - 1``. Other negative ``dim`` count from the end as
  usual (``-2`` is ``v.ndim - 2``).
* No :math:`\epsilon`, as in the paper and PyTorch. A slice of ``v`` that is all zeros has no
  direction: PyTorch returns NaN there; refnorm raises a ValueError naming ``v``.
* The norm is computed in a scaled form where the plain sum of squares would underflow or
  overflow (slices of magnitude below about 1e-146 or above 1e146 in float64), so such ``v``
  still give :math:`\lVert w\rVert_s = |g|`.
* A ``v`` with a zero-size axis among the reduced ones (shape ``(3, 0)`` with ``dim=0``) has
  empty slices, whose norm is 0: the same ValueError as a zero slice. With no slices at all
  (``(0, 3)``, ``dim=0``) ``w`` is empty.
* float16 is computed in float32 (the norm, :math:`v/\lVert v\rVert`, and the backward's
  :math:`g/\lVert v\rVert`) and rounded once at the end; ``w`` is formed as
  :math:`(v/\lVert v\rVert)\,g`, never through :math:`g/\lVert v\rVert`, which overflows for a
  tiny norm although :math:`|w| \le |g|`.
* Mixed dtypes (``v`` float32, ``g`` float64 or the reverse) are accepted, unlike PyTorch:
  the arithmetic runs in the promoted dtype, ``w`` has the promoted dtype, and each gradient
  the dtype of its own input (``dv`` that of ``v``, ``dg`` that of ``g``).
* The paper's data-dependent initialisation (:math:`g`, bias from one minibatch) is not part
  of the function; PyTorch's initialisation is :math:`g = \lVert W\rVert_s, v = W`, so that
  :math:`w = W` at registration (:func:`weight_norm_init`).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import WideCache, check_array, narrow, out_of_range, wider_dtype
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "weight_norm"


class WeightNormCache(NamedTuple):
    v: np.ndarray                   # the direction (not a copy: inputs are never mutated)
    g: np.ndarray                   # the length, shape of the per-slice norm (keepdims)
    norm: np.ndarray                # ||v|| per slice (keepdims)
    axes: tuple[int, ...]           # the reduced axes: every axis except dim (all for None)


class WeightNormGrads(NamedTuple):
    dv: np.ndarray
    dg: np.ndarray


def _reduced_axes(dim, ndim):
    """The axes the norm runs over: all but ``dim``; all of them for ``dim`` None or -1."""
    if dim is None or (isinstance(dim, numbers.Integral) and not isinstance(dim, bool)
                       and dim == -1):
        return tuple(range(ndim))
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise TypeError(f"{_OP}: `dim` must be an int or None, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{_OP}: `dim` must be None or in [-{ndim}, {ndim - 1}] for `v` of "
                         f"{ndim} dimensions, got {dim}")
    dim = int(dim) % ndim
    return tuple(a for a in range(ndim) if a != dim)


def _g_shape(shape, axes):
    return tuple(1 if a in axes else n for a, n in enumerate(shape)) \
        if len(axes) < len(shape) else ()


def _rows(a, axes):
    """``a`` as a 2-D (slice, element) array when each slice is one contiguous block (``dim``
    0, or the whole tensor), else None."""
    if len(axes) == a.ndim:
        return a.reshape(1, a.size)
    if axes == tuple(range(1, a.ndim)):
        return a.reshape(a.shape[0], a.size // max(a.shape[0], 1))
    return None


def _slice_dot(a, b, axes, keep):
    """Per-slice :math:`\\sum a b` (keepdims shape ``keep``). Contiguous slices go through
    stacked matmul (BLAS dot products: no temporary, within about 2 ULP up to 65536 elements);
    other layouts through ``np.sum`` of the product."""
    ra, rb = _rows(a, axes), _rows(b, axes)
    if ra is not None:
        return (ra[:, None, :] @ rb[:, :, None]).reshape(keep)
    return np.sum(a * b, axis=axes).reshape(keep)


def _work_dtype(*arrays):
    """The dtype the arithmetic runs in: the promoted one, float32 for float16 (whose range
    would overflow ``<G, v> / ||v||`` and the squares long before the results do)."""
    dtype = np.result_type(*arrays)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def _slice_norm(v, axes):
    r""":math:`\lVert v\rVert` per slice (keepdims). The plain :math:`\sqrt{\sum v^2}`, and,
    only for slices whose sum of squares lost accuracy to underflow or overflowed, the same
    after dividing by the slice's largest magnitude."""
    keep = _g_shape(v.shape, axes)
    if v.size == 0:  # empty slices (a zero-size axis among ``axes``) have norm 0
        return np.zeros(keep, v.dtype)
    with np.errstate(over="ignore", under="ignore"):  # detected below and redone scaled
        norm = np.sqrt(_slice_dot(v, v, axes, keep))
    info = np.finfo(v.dtype)
    safe = (norm >= np.sqrt(info.tiny / info.eps)) & np.isfinite(norm)
    if not safe.all():
        big = np.max(np.abs(v), axis=axes).reshape(keep)
        big = np.where(big > 0, big, 1).astype(v.dtype)
        scaled = big * np.sqrt(np.sum(np.square(v / big), axis=axes).reshape(keep))
        norm = np.where(safe, norm, scaled)
    return norm


def weight_norm_forward(v, g, dim=0):
    r"""The weight :math:`w = g\, v / \lVert v\rVert` (norm over every axis except ``dim``).

    Parameters
    ----------
    v : ndarray
        The direction, with the weight's shape (at least 1 dimension). No slice may be all zero.
    g : ndarray
        The length: shape ``v.shape`` with every axis but ``dim`` set to 1; shape ``()`` when
        ``dim`` is None or -1.
    dim : int or None, default 0
        The axis that indexes the slices (output features). ``None`` and ``-1`` both mean one
        norm over the whole tensor (PyTorch's convention; ``-1`` is not the last axis).

    Returns
    -------
    w : ndarray, same shape as ``v``
        In the dtype of ``v`` (the promoted one, ``np.result_type(v, g)``, when ``g`` has
        another).
    cache : WeightNormCache
    """
    check_array(v, "v", _OP, ndim_min=1)
    axes = _reduced_axes(dim, v.ndim)
    if g is None:
        raise TypeError(f"{_OP}: `g` is required (the length; there is no default)")
    if isinstance(g, np.floating):  # a NumPy scalar is a 0-d g
        g = np.asarray(g)
    check_array(g, "g", _OP)
    shape = _g_shape(v.shape, axes)
    if g.shape != shape:
        raise ValueError(f"{_OP}: `g` must have shape {shape} (that of the norm of `v` over "
                         f"all axes but dim={dim}), got {g.shape}")
    wider = wider_dtype(np.result_type(v, g))
    if wider is not None and out_of_range(v, g):  # tiny or huge: the whole call, wider
        w, cache = weight_norm_forward(v.astype(wider), g.astype(wider), dim)
        return narrow(w, np.result_type(v, g)), WideCache(cache, (v.dtype, g.dtype), wider)
    work = _work_dtype(v, g)
    vw, gw = v.astype(work, copy=False), g.astype(work, copy=False)
    norm = _slice_norm(vw, axes)
    if not np.all(norm > 0):
        bad = np.argwhere(~(norm > 0).reshape(norm.shape or (1,)))[0]
        raise ValueError(f"{_OP}: `v` has a slice with zero norm (or NaN) at index "
                         f"{tuple(int(i) for i in bad)} of its norm: w = g v / ||v|| has no "
                         f"direction there (PyTorch returns NaN)")
    # (v / ||v||) * g, not v * (g / ||v||): |v / ||v||| <= 1, while g / ||v|| overflows
    # where the norm is below |g| / max (float16: ||v|| ~ 1e-5) although |w| <= |g|.
    w = (vw / norm) * gw
    return w.astype(np.result_type(v, g), copy=False), WeightNormCache(v, g, norm, axes)


def weight_norm_backward(dw, cache):
    """Hand-derived VJP of :func:`weight_norm_forward`: ``(dw, cache) -> WeightNormGrads``."""
    if isinstance(cache, WideCache):
        return cache.narrow(weight_norm_backward(dw.astype(cache.wide_dtype), cache.inner))
    v, g, norm, axes = cache
    v_dtype, g_dtype = v.dtype, g.dtype
    work = _work_dtype(v, g)
    v, g, norm, dw = (a.astype(work, copy=False) for a in (v, g, norm, dw))
    # \hat v by division, not by v * (1/||v||): one rounding, so a one-element slice gives
    # \hat v = +-1 exactly and its dv (exactly 0) comes out as 0, not as amplified rounding.
    vhat = v / norm
    dg = _slice_dot(dw, vhat, axes, g.shape)                    # <G, \hat v> per slice
    dv = np.multiply(vhat, dg, out=vhat)
    np.subtract(dw, dv, out=dv)
    # dv *= g / ||v||; where that quotient overflows (a tiny norm), (dv / ||v||) * g instead.
    with np.errstate(over="ignore"):
        ratio = g / norm
    finite = np.isfinite(ratio)
    if finite.all():
        dv *= ratio
    else:
        with np.errstate(all="ignore"):
            dv = np.where(finite, dv * ratio, (dv / norm) * g)
    # Each gradient in its own input's dtype (mixed v and g dtypes are computed promoted).
    # (float16: a dv beyond 65504 is inf, as the exact value is not representable.)
    with np.errstate(over="ignore"):
        return WeightNormGrads(dv.astype(v_dtype, copy=False), dg.astype(g_dtype, copy=False))


weight_norm = custom_vjp(weight_norm_forward, weight_norm_backward, ("v", "g"))
weight_norm.__doc__ = ("Differentiable weight normalization (engine op); see "
                       ":func:`weight_norm_forward`.")


def weight_norm_composite(v, g, dim=0):
    """The same math with engine primitives only: the engine derives its own gradient."""
    axes = _reduced_axes(dim, v.ndim)
    return g * (v / ag.sqrt(ag.sum(v * v, axes, keepdims=True)))


def weight_norm_init(weight, dim=0):
    r"""``(v, g)`` with :math:`w(v, g) =` ``weight``: :math:`v = W`, :math:`g = \lVert W\rVert_s`
    (PyTorch's ``right_inverse``). Returns copies."""
    check_array(weight, "weight", _OP, ndim_min=1)
    axes = _reduced_axes(dim, weight.ndim)
    return weight.copy(), _slice_norm(weight, axes).reshape(_g_shape(weight.shape, axes))


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, dim=0, v=None, dtype=np.float64):
    v = rng.standard_normal(shape) if v is None else v
    axes = _reduced_axes(dim, len(shape))
    g = rng.standard_normal(_g_shape(shape, axes)) + 0.5
    return SampleInput(name, (v.astype(dtype), np.asarray(g, dtype=dtype)), dict(dim=dim))


def sample_inputs(rng):
    yield _case(rng, "(5,4)-linear", (5, 4))
    yield _case(rng, "(3,2,2,2)-conv", (3, 2, 2, 2))
    yield _case(rng, "(3,4,2)-dim1", (3, 4, 2), dim=1)
    yield _case(rng, "(3,4,2)-dim2", (3, 4, 2), dim=2)
    yield _case(rng, "(3,4,2)-dim-2", (3, 4, 2), dim=-2)
    yield _case(rng, "(4,5)-dimNone", (4, 5), dim=None)
    yield _case(rng, "(3,4)-dim-1-whole", (3, 4), dim=-1)
    # (With one-element slices, dim=0 on (n, 1) or on a 1-D v, w = g sign(v) and dv is
    # exactly 0: tests/norms/test_weight_norm.py checks that case, and oracle_inputs has one.)
    yield _case(rng, "(6,)-1d-dimNone", (6,), dim=None)
    yield _case(rng, "(1,7)-one-slice", (1, 7))
    yield _case(rng, "(4,5)-mean100", (4, 5), v=100.0 + rng.standard_normal((4, 5)))
    yield _case(rng, "(3,5)-constant-slices", (3, 5),
                v=np.repeat(rng.standard_normal((3, 1)), 5, axis=1))


def oracle_inputs(rng):
    yield _case(rng, "(1000,37)-linear", (1000, 37))
    yield _case(rng, "(64,3,7,7)-conv", (64, 3, 7, 7))
    yield _case(rng, "(33,17,3,3)-dim1", (33, 17, 3, 3), dim=1)
    yield _case(rng, "(129,33)-dimNone", (129, 33), dim=None)
    yield _case(rng, "(3,65536)-long-rows", (3, 65536))
    yield _case(rng, "(100,1)-one-element-slices", (100, 1))
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129),
                v=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(8,100)-constant-slices", (8, 100),
                v=np.repeat(rng.standard_normal((8, 1)), 100, axis=1))
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), v=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), v=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    v, g = np.ones((3, 4)), np.ones((3, 1))
    yield ErrorInput(SampleInput("list v", ([[1.0, 2.0]], g), {}),
                     TypeError, r"weight_norm: `v` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int v", (np.ones((3, 4), dtype=int), g), {}),
                     TypeError, r"`v` must have a floating dtype")
    yield ErrorInput(SampleInput("0-d v", (np.array(1.0), np.array(1.0)), dict(dim=None)),
                     ValueError, r"`v` must have at least 1 dimensions, got shape \(\)")
    yield ErrorInput(SampleInput("g missing", (v, None), {}),
                     TypeError, r"`g` is required")
    yield ErrorInput(SampleInput("g flat", (v, np.ones(3)), {}),
                     ValueError, r"`g` must have shape \(3, 1\) .* got \(3,\)")
    yield ErrorInput(SampleInput("g for dim None", (v, np.ones((1, 1))), dict(dim=None)),
                     ValueError, r"`g` must have shape \(\) .* got \(1, 1\)")
    yield ErrorInput(SampleInput("g for dim 1", (v, g), dict(dim=1)),
                     ValueError, r"`g` must have shape \(1, 4\) .* got \(3, 1\)")
    yield ErrorInput(SampleInput("dim 2", (v, g), dict(dim=2)),
                     ValueError, r"`dim` must be None or in \[-2, 1\] .* got 2")
    yield ErrorInput(SampleInput("dim -3", (v, g), dict(dim=-3)),
                     ValueError, r"`dim` must be None or in \[-2, 1\] .* got -3")
    yield ErrorInput(SampleInput("dim float", (v, g), dict(dim=0.0)),
                     TypeError, r"`dim` must be an int or None, got float")
    zero_row = np.ones((3, 4))
    zero_row[1] = 0.0
    yield ErrorInput(SampleInput("zero slice", (zero_row, g), {}),
                     ValueError, r"`v` has a slice with zero norm .* index \(1, 0\)")


def _torch_call(torch, v, g, *, dim=0):
    # The computation behind parametrizations.weight_norm; it maps dim=None to -1 itself.
    return torch._weight_norm(v, g, -1 if dim is None else dim)


SPEC = NormSpec(
    name="weight_norm",
    title="Weight Normalization",
    paper=Paper("Weight Normalization: A Simple Reparameterization to Accelerate Training of "
                "Deep Neural Networks", "Salimans, Kingma", 2016, "arXiv:1602.07868"),
    forward=weight_norm_forward,
    backward=weight_norm_backward,
    op=weight_norm,
    composite=weight_norm_composite,
    diff_argnames=("v", "g"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_equivalent="torch.nn.utils.parametrizations.weight_norm",
    torch_call=_torch_call,
    normalizes="weights",
)

r"""Layer Normalization.

Ba, Kiros & Hinton, *Layer Normalization*, arXiv:1607.06450 (2016).

Each sample is normalized over its trailing axes :math:`A` (those of ``normalized_shape``,
:math:`N = \prod_{a\in A} n_a` elements):

.. math::

   \mu = \langle x\rangle_A,\qquad
   \sigma^2 = \langle (x-\mu)^2\rangle_A,\qquad
   r = (\sigma^2+\epsilon)^{-1/2},\qquad
   \hat x = (x-\mu)\,r,\qquad
   y = \gamma\odot\hat x + \beta ,

where :math:`\langle\cdot\rangle_A` is the mean over :math:`A`, ``weight`` is :math:`\gamma`
and ``bias`` is :math:`\beta`.

Backward (derivation: ``docs/derivations/layer_norm.rst``). With :math:`g = \gamma\odot
\mathrm{d}y`:

.. math::

   \mathrm{d}x = r\,\bigl(g - \langle g\rangle_A - \hat x\,\langle g\odot\hat x\rangle_A\bigr),
   \qquad
   \mathrm{d}\gamma = \textstyle\sum_{\text{batch}} \mathrm{d}y\odot\hat x,\qquad
   \mathrm{d}\beta = \textstyle\sum_{\text{batch}} \mathrm{d}y .

Conventions, as in ``torch.nn.functional.layer_norm``: biased variance (:math:`1/N`), ``eps``
inside the square root, default ``eps = 1e-5``. Statistics are two-pass with a correction pass
(:mod:`refnorm.norms._stats`), so rows with a large mean keep full accuracy.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, check_eps, check_param, moments, rsqrt, trailing_axes
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput


class LayerNormCache(NamedTuple):
    xhat: np.ndarray                # \hat x, same shape as x
    mean: np.ndarray                # \mu, keepdims over the normalized axes
    rstd: np.ndarray                # r, keepdims over the normalized axes
    weight: np.ndarray | None       # \gamma, or None
    has_bias: bool
    axes: tuple[int, ...]           # the normalized axes A


class LayerNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _normalized_shape(normalized_shape, x):
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) \
        else tuple(normalized_shape)
    if not shape or not all(isinstance(n, numbers.Integral) for n in shape):
        raise ValueError(f"layer_norm: `normalized_shape` must be an int or a non-empty tuple of "
                         f"ints, got {normalized_shape!r}")
    if x.shape[x.ndim - len(shape):] != shape or len(shape) > x.ndim:
        raise ValueError(f"layer_norm: `normalized_shape` {shape} must equal the trailing "
                         f"dimensions of `x`, whose shape is {x.shape}")
    return shape


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Layer normalization over the trailing ``normalized_shape`` axes; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``
    normalized_shape : int or tuple of int
    weight, bias : ndarray of shape ``normalized_shape``, optional
        :math:`\\gamma` and :math:`\\beta`. ``None`` means 1 and 0.
    eps : float, default 1e-5
        Added to the variance inside the square root.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : LayerNormCache
    """
    check_array(x, "x", "layer_norm")
    shape = _normalized_shape(normalized_shape, x)
    check_param(weight, "weight", "layer_norm", shape)
    check_param(bias, "bias", "layer_norm", shape)
    eps = check_eps(eps, "layer_norm")
    axes = trailing_axes(x.ndim, len(shape))
    xhat, mean, var = moments(x, axes)
    rstd = rsqrt(var + eps)
    xhat *= rstd  # the centred buffer becomes \hat x in place
    y = xhat * weight if weight is not None else xhat.copy()
    if bias is not None:
        y += bias
    return y, LayerNormCache(xhat, mean, rstd, weight, bias is not None, axes)


def layer_norm_backward(dy, cache):
    """Hand-derived VJP of :func:`layer_norm_forward`: ``(dy, cache) -> LayerNormGrads``."""
    xhat, _, rstd, weight, has_bias, axes = cache
    batch_axes = tuple(range(dy.ndim - len(axes)))
    dyx = dy * xhat
    dweight = dyx.sum(axis=batch_axes) if weight is not None else None
    dbias = dy.sum(axis=batch_axes) if has_bias else None
    if weight is not None:
        g, gx = dy * weight, dyx
        gx *= weight  # g * xhat, reusing dy * xhat's buffer (dweight is already summed)
    else:
        g, gx = dy, dyx
    dx = xhat * gx.mean(axis=axes, keepdims=True)
    np.subtract(g, dx, out=dx)
    dx -= g.mean(axis=axes, keepdims=True)
    dx *= rstd
    return LayerNormGrads(dx, dweight, dbias)


layer_norm = custom_vjp(layer_norm_forward, layer_norm_backward, ("x", "weight", "bias"))
layer_norm.__doc__ = """Differentiable layer normalization (engine op); see :func:`layer_norm_forward`."""


def layer_norm_composite(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """The same math with engine primitives only: the engine derives its own gradient."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = trailing_axes(x.ndim, len(shape))
    xc = x - ag.mean(x, axes, keepdims=True)
    xhat = xc / ag.sqrt(ag.mean(xc * xc, axes, keepdims=True) + eps)
    y = xhat * weight if weight is not None else xhat
    return y + bias if bias is not None else y


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, nd, eps=1e-5, affine=True, bias=True, x=None, dtype=np.float64):
    x = rng.standard_normal(shape) if x is None else x
    p = shape[len(shape) - nd:]
    weight = rng.standard_normal(p) + 1.0 if affine else None
    b = rng.standard_normal(p) if affine and bias else None
    arrays = tuple(None if a is None else a.astype(dtype) for a in (x, weight, b))
    return SampleInput(name, arrays, dict(normalized_shape=p, eps=eps))


def sample_inputs(rng):
    yield _case(rng, "(4,6)", (4, 6), 1)
    yield _case(rng, "(2,3,5)-nd2", (2, 3, 5), 2)
    yield _case(rng, "(3,7)-plain-eps0.1", (3, 7), 1, eps=0.1, affine=False)
    yield _case(rng, "(3,4)-weight-only", (3, 4), 1, bias=False)
    yield _case(rng, "(5,1)-one-element-rows", (5, 1), 1)
    yield _case(rng, "(2,2,3)-nd3", (2, 2, 3), 3)
    constant = np.repeat(rng.standard_normal((3, 1)), 6, axis=1)
    yield _case(rng, "(3,6)-constant-rows", (3, 6), 1, x=constant)
    yield _case(rng, "(3,5)-mean100", (3, 5), 1, x=100.0 + rng.standard_normal((3, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(37,1000)", (37, 1000), 1)
    yield _case(rng, "(3,1)-one-element-rows", (3, 1), 1)
    yield _case(rng, "(4,7,13)-nd2", (4, 7, 13), 2)
    yield _case(rng, "(2,65536)-long-rows", (2, 65536), 1)
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129), 1,
                x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(8,100)-constant-rows", (8, 100), 1,
                x=np.repeat(rng.standard_normal((8, 1)), 100, axis=1))
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), 1, x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), 1, x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], None, None), dict(normalized_shape=2)),
                     TypeError, r"layer_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int), None, None),
                                 dict(normalized_shape=3)), TypeError, r"floating dtype")
    yield ErrorInput(SampleInput("shape", (x, None, None), dict(normalized_shape=(2,))),
                     ValueError, r"`normalized_shape` \(2,\) must equal the trailing dimensions")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2), None), dict(normalized_shape=3)),
                     ValueError, r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(SampleInput("bias", (x, None, np.ones((1, 3))), dict(normalized_shape=3)),
                     ValueError, r"`bias` must have shape \(3,\)")
    yield ErrorInput(SampleInput("eps", (x, None, None), dict(normalized_shape=3, eps=-1.0)),
                     ValueError, r"`eps` must be a finite number >= 0")


def _torch_call(torch, x, weight, bias, *, normalized_shape, eps):
    return torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)


SPEC = NormSpec(
    name="layer_norm",
    title="Layer Normalization",
    paper=Paper("Layer Normalization", "Ba, Kiros, Hinton", 2016, "arXiv:1607.06450"),
    forward=layer_norm_forward,
    backward=layer_norm_backward,
    op=layer_norm,
    composite=layer_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    invariances=("shift", "scale"),
    stats_axes=lambda s: trailing_axes(s.arrays[0].ndim, len(s.kwargs["normalized_shape"])),
    torch_equivalent="torch.nn.functional.layer_norm",
    torch_call=_torch_call,
)

r"""L2 normalization of vectors, and Matryoshka embeddings (truncate, then normalize).

Each vector along axis ``dim`` is divided by its Euclidean norm, clamped below by
:math:`\epsilon`, as ``torch.nn.functional.normalize(x, p=2, dim, eps)``:

.. math::

   \rho = \max\bigl(\lVert x\rVert_2, \epsilon\bigr),\qquad y = x / \rho .

Used for cosine similarity of embeddings, for QKNorm (Henry et al. 2020; see
:mod:`refnorm.norms.qk_norm`) and, with ``truncate_dim = m``, for **Matryoshka** embeddings
(Kusupati et al., *Matryoshka Representation Learning*, NeurIPS 2022, arXiv:2205.13147): the
first :math:`m` coordinates of ``dim`` are kept, then normalized,

.. math::

   y = x_{:m} / \max\bigl(\lVert x_{:m}\rVert_2, \epsilon\bigr),

as sentence-transformers' ``MatryoshkaLoss`` and ``SentenceTransformer(truncate_dim=m)`` do.
``y`` then has ``m`` coordinates along ``dim`` (``NormSpec.output_shape``). Normalizing first and
truncating afterwards is a different function (the prefix is then not a unit vector).

Backward (derivation: ``docs/derivations/l2_norm.rst``). With :math:`g = \mathrm{d}y`, per vector:

.. math::

   \mathrm{d}x_{:m} = \frac{g - y\,\langle y, g\rangle}{\lVert x_{:m}\rVert}
   \quad\text{if } \lVert x_{:m}\rVert \ge \epsilon ,\qquad
   \mathrm{d}x_{:m} = g/\epsilon \quad\text{otherwise},\qquad
   \mathrm{d}x_{m:} = 0 .

At :math:`\lVert x\rVert = \epsilon` exactly the first form is used, as PyTorch's ``clamp_min``
passes the gradient at equality.

Conventions, as PyTorch: :math:`\epsilon` is a **clamp** (not added), default ``1e-12``; ``dim``
defaults to 1 (``F.normalize``'s default; embeddings usually pass ``dim=-1``). Only ``p = 2`` is
implemented (the argument is there so that the signature is ``F.normalize``'s). The norm is
computed with a rescaling where its squares over- or underflow
(:func:`refnorm.norms._stats.vector_norm`), so tiny and huge vectors give unit vectors; a norm
that is itself subnormal (and so has lost bits) is taken of the vector scaled by a power of two
instead, exactly (:func:`refnorm.norms._tokens.pow2_scale`).
A zero vector with ``eps = 0`` is 0/0: its ``y`` is NaN (undefined), as in PyTorch. float16 is
computed in float32 and rounded once.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import accumulation_dtype, check_array, check_eps, vector_norm
from refnorm.norms._tokens import pow2_scale
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "l2_norm"


class L2NormCache(NamedTuple):
    y: np.ndarray                   # x_{:m} / rho, in the accumulation dtype
    norm: np.ndarray                # rho = max(||x_{:m}||, eps), keepdims; accumulation dtype
    clamped: np.ndarray             # bool, keepdims: ||x_{:m}|| < eps (dx = g / eps)
    axes: tuple[int, ...]           # (dim,), nonnegative
    x_shape: tuple[int, ...]        # the shape of x (dx has it; zero beyond m)
    x_dtype: np.dtype
    norm_scaled: np.ndarray | None = None   # rho = norm_scaled 2^shift exactly; norm itself
    shift: np.ndarray | None = None         # but where rho is subnormal (shift 0 elsewhere)


class L2NormGrads(NamedTuple):
    dx: np.ndarray


def _check_int(value, name):
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `{name}` must be an int, got {type(value).__name__}")
    return int(value)


def check_dim(dim, ndim, op=_OP):
    """``dim`` as a nonnegative axis of an ``ndim``-array; a TypeError/ValueError otherwise."""
    if not isinstance(dim, numbers.Integral) or isinstance(dim, (bool, np.bool_)):
        raise TypeError(f"{op}: `dim` must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{op}: `dim` must be in [-{ndim}, {ndim - 1}] for `x` of {ndim} "
                         f"dimensions, got {dim}")
    return int(dim) % ndim


def _truncated(x, axis, m):
    index = [slice(None)] * x.ndim
    index[axis] = slice(0, m)
    return x[tuple(index)]


def l2_norm_forward(x, p=2.0, dim=1, eps=1e-12, truncate_dim=None):
    r"""``x`` (its first ``truncate_dim`` coordinates along ``dim``) over its L2 norm clamped
    at ``eps``; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray, at least 1 dimension
    p : float, default 2.0
        The norm's order; only 2 is implemented (``F.normalize``'s signature).
    dim : int, default 1
        The axis of the vectors (``F.normalize``'s default; ``-1`` for embeddings).
    eps : float, default 1e-12
        The lower bound of the norm (a clamp, not added).
    truncate_dim : int, optional
        Matryoshka: keep the first ``truncate_dim`` coordinates along ``dim``, then normalize.
        ``None``: all of them.

    Returns
    -------
    y : ndarray
        ``x``'s dtype; ``x``'s shape with ``truncate_dim`` coordinates along ``dim``.
    cache : L2NormCache
    """
    x = check_array(x, "x", _OP, ndim_min=1)
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real) or p != 2:
        raise ValueError(f"{_OP}: `p` must be 2 (only the L2 norm is implemented), got {p!r}")
    axis = check_dim(dim, x.ndim)
    eps = check_eps(eps, _OP)
    m = x.shape[axis]
    if truncate_dim is not None:
        m = _check_int(truncate_dim, "truncate_dim")
        if not 1 <= m <= x.shape[axis]:
            raise ValueError(f"{_OP}: `truncate_dim` must be in [1, {x.shape[axis]}] (the size "
                             f"of `x` along dim={dim}), got {truncate_dim}")
    acc = accumulation_dtype(x.dtype)
    xt = _truncated(x, axis, m).astype(acc, copy=False)
    norm = vector_norm(xt, (axis,))
    clamped = norm < eps
    rho = np.maximum(norm, np.asarray(eps, acc)) if eps > 0 else norm
    # a subnormal norm has lost significant bits: there, rho = rho_s 2^shift, rho_s the norm of
    # the vector scaled by 2^-shift (exact), and x 2^-shift / rho_s = x / rho
    rho_s, shift = rho, np.zeros(rho.shape, np.int32)
    tiny = (rho < np.finfo(acc).smallest_normal) & (rho > 0) & ~clamped
    if tiny.any():
        xs, e = pow2_scale(xt, axis)
        shift = np.where(tiny, e, 0)
        rho_s = np.where(tiny, vector_norm(xs, (axis,)), rho)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 with eps=0: NaN, documented
        y = np.ldexp(xt, -shift) / rho_s
    cache = L2NormCache(y, rho, clamped, (axis,), x.shape, x.dtype, rho_s, shift)
    return y.astype(x.dtype), cache


def l2_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`l2_norm_forward`: ``(dy, cache) -> L2NormGrads``."""
    y, rho, clamped, axes, x_shape, x_dtype, rho_s, shift = cache
    if rho_s is None:
        rho_s, shift = rho, 0
    g = dy.astype(y.dtype, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        radial = np.sum(y * g, axis=axes, keepdims=True)        # <y, g> per vector
        # / rho = / rho_s, then 2^-shift exactly (1/rho of a subnormal rho may overflow alone)
        dxt = np.ldexp((g - np.where(clamped, 0, y * radial)) / rho_s, -shift)
    dx = np.zeros(x_shape, x_dtype)
    index = [slice(None)] * len(x_shape)
    index[axes[0]] = slice(0, y.shape[axes[0]])
    dx[tuple(index)] = dxt
    return L2NormGrads(dx)


l2_norm = custom_vjp(l2_norm_forward, l2_norm_backward, ("x",))
l2_norm.__doc__ = "Differentiable L2 normalization (engine op); see l2_norm_forward."


def l2_norm_composite(x, p=2.0, dim=1, eps=1e-12, truncate_dim=None):
    """The same math with engine primitives only: the engine derives its own gradient."""
    axis = dim % x.ndim
    if truncate_dim is not None:
        index = [slice(None)] * x.ndim
        index[axis] = slice(0, truncate_dim)
        x = ag.getitem(x, tuple(index))
    norm = ag.sqrt(ag.sum(x * x, axis, keepdims=True))
    return x / ag.maximum(norm, eps)


def _output_shape(sample):
    x = sample.arrays[0]
    m = sample.kwargs.get("truncate_dim")
    shape = list(np.shape(x))
    if m is not None:
        shape[sample.kwargs.get("dim", 1) % len(shape)] = m
    return tuple(shape)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, x=None, **kwargs):
    x = rng.standard_normal(shape) if x is None else x
    return SampleInput(name, (x,), kwargs)


def sample_inputs(rng):
    # Not a standard-normal x first: the generic gradient check draws its cotangent from a
    # generator seeded as the one given here, so it would equal x, whose J^T x = 0 (J is the
    # symmetric projection off x): a vacuous check.
    yield _case(rng, "(3,6)-mean100", (3, 6), x=100.0 + rng.standard_normal((3, 6)))
    yield _case(rng, "(4,6)-dim1", (4, 6))
    yield _case(rng, "(2,3,5)-dim-1", (2, 3, 5), dim=-1)
    yield _case(rng, "(3,4,2)-dim0", (3, 4, 2), dim=0)
    yield _case(rng, "(4,8)-matryoshka-m3", (4, 8), dim=-1, truncate_dim=3)
    yield _case(rng, "(2,8,3)-matryoshka-dim1-m5", (2, 8, 3), dim=1, truncate_dim=5)
    # one-element vectors: y = sign(x) and dx = 0 exactly where |x| > eps, dx = dy / eps below
    yield _case(rng, "(5,1)-one-element-eps0.5", (5, 1), eps=0.5,
                x=np.array([[1.3], [-0.2], [0.7], [0.1], [-2.0]]))
    # ||x|| < eps for two of the rows: the clamp is active, dx = dy / eps there
    small = rng.standard_normal((3, 4))
    small[:2] *= 0.05
    yield _case(rng, "(3,4)-clamped-rows-eps0.5", (3, 4), x=small, eps=0.5)


def oracle_inputs(rng):
    yield _case(rng, "(37,1000)-dim-1", (37, 1000), dim=-1)
    yield _case(rng, "(64,768)-matryoshka-m256", (64, 768), dim=-1, truncate_dim=256)
    yield _case(rng, "(16,768)-matryoshka-m64", (16, 768), dim=-1, truncate_dim=64)
    yield _case(rng, "(4,7,13)-dim1", (4, 7, 13))
    yield _case(rng, "(3,1)-one-element", (3, 1))
    yield _case(rng, "(2,65536)-long-rows", (2, 65536), dim=-1)
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129), dim=-1,
                x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(6,33)-tiny-scale-clamped", (6, 33), dim=-1,
                x=1e-14 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), dim=-1, x=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]],)),
                     TypeError, r"l2_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int),)),
                     TypeError, r"`x` must have a floating dtype")
    yield ErrorInput(SampleInput("0-d x", (np.array(1.0),)),
                     ValueError, r"`x` must have at least 1 dimensions")
    yield ErrorInput(SampleInput("p 1", (x,), dict(p=1)),
                     ValueError, r"`p` must be 2 \(only the L2 norm is implemented\), got 1")
    yield ErrorInput(SampleInput("dim 2", (x,), dict(dim=2)),
                     ValueError, r"`dim` must be in \[-2, 1\] for `x` of 2 dimensions, got 2")
    yield ErrorInput(SampleInput("dim float", (x,), dict(dim=1.0)),
                     TypeError, r"`dim` must be an int, got float")
    yield ErrorInput(SampleInput("eps", (x,), dict(eps=-1.0)),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("truncate 0", (x,), dict(truncate_dim=0)),
                     ValueError, r"`truncate_dim` must be in \[1, 3\]")
    yield ErrorInput(SampleInput("truncate 4", (x,), dict(truncate_dim=4)),
                     ValueError, r"`truncate_dim` must be in \[1, 3\] \(the size of `x` along "
                                 r"dim=1\), got 4")
    yield ErrorInput(SampleInput("truncate float", (x,), dict(truncate_dim=2.0)),
                     TypeError, r"`truncate_dim` must be an int, got float")


def _torch_call(torch, x, *, p=2.0, dim=1, eps=1e-12, truncate_dim=None):
    if truncate_dim is not None:
        x = x.narrow(dim, 0, truncate_dim)
    return torch.nn.functional.normalize(x, p=p, dim=dim, eps=eps)


def _layer_init(features, dim=-1, eps=1e-12, truncate_dim=None):
    """No parameters: ``({}, {}, kwargs)`` with the vectors on the last axis by default."""
    return {}, {}, {"dim": dim, "eps": eps, "truncate_dim": truncate_dim}


SPEC = NormSpec(
    name="l2_norm",
    title="L2 normalization (F.normalize), with Matryoshka truncation",
    paper=Paper("Matryoshka Representation Learning", "Kusupati, Bhatt, Rege, Wallingford, "
                "Sinha, Ramanujan, Howard-Snyder, Chen, Kakade, Jain, Farhadi", 2022,
                "arXiv:2205.13147"),
    forward=l2_norm_forward,
    backward=l2_norm_backward,
    op=l2_norm,
    composite=l2_norm_composite,
    diff_argnames=("x",),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    torch_equivalent="torch.nn.functional.normalize",
    torch_call=_torch_call,
    layer_init=_layer_init,
    output_shape=_output_shape,
)

r"""Spectral Normalization: a weight divided by an estimate of its largest singular value.

Miyato, Kataoka, Koyama & Yoshida, *Spectral Normalization for Generative Adversarial
Networks*, ICLR 2018, arXiv:1802.05957.

The weight is viewed as a matrix :math:`W \in \mathbb{R}^{h\times w}` (axis ``dim`` first, the
other axes flattened). Its spectral norm :math:`\sigma(W)` is estimated by power iteration from
explicit state, a left vector :math:`u \in \mathbb{R}^h` and a right vector :math:`v \in
\mathbb{R}^w`. In training mode, ``n_power_iterations`` times:

.. math::

   u \leftarrow \frac{W v}{\max(\lVert W v\rVert, \epsilon)},\qquad
   v \leftarrow \frac{W^\top u}{\max(\lVert W^\top u\rVert, \epsilon)} ;

then, with the new :math:`u, v` (in eval mode: the given ones, unchanged),

.. math::

   \sigma = u^\top W v ,\qquad W_{SN} = W / \sigma .

The new :math:`(u, v)` are returned as the new state; the input state is not mutated.

Backward (derivation: ``docs/derivations/spectral_norm.rst``). As in PyTorch, :math:`u` and
:math:`v` are constants of the backward pass (the power iteration runs without gradient), so
with :math:`G = \mathrm{d}W_{SN}` and :math:`\langle A, B\rangle = \sum_{ij} A_{ij} B_{ij}`:

.. math::

   \mathrm{d}W = \frac{1}{\sigma}\Bigl(G - \langle G, W_{SN}\rangle\, u v^\top\Bigr)
   \quad\text{(in the matrix view, reshaped back to the weight's shape).}

This is the exact gradient of :math:`W \mapsto W/(u^\top W v)` for the :math:`u, v` the forward
used, and (because :math:`\partial\sigma_{\max}/\partial W = u_1 v_1^\top` for the top singular
pair) of :math:`W \mapsto W/\sigma_{\max}(W)` once the power iteration has converged. It omits
the dependence of the freshly iterated :math:`u, v` on :math:`W` in training mode, as PyTorch and
the paper do. :math:`\langle \mathrm{d}W, W\rangle = 0`: :math:`W_{SN}` is invariant to the
scale of :math:`W` for fixed :math:`u, v`.

Conventions, as ``torch.nn.utils.parametrizations.spectral_norm(module, name='weight',
n_power_iterations=1, eps=1e-12, dim=None)`` (``_SpectralNorm``):

* The update order is :math:`u` first (from the stored :math:`v`), then :math:`v`; so in training
  mode the input :math:`u` does not affect the result (it matters in eval mode). Miyato et al.'s
  Algorithm 1 updates :math:`v` first from :math:`u`; the fixed point is the same.
* :math:`\epsilon` clamps the norm in the normalisation (``F.normalize``), it is not added.
* ``dim`` defaults to 0 (PyTorch uses 1 for ``ConvTranspose``; pass ``dim=1`` there).
* ``n_power_iterations`` must be positive, as in PyTorch; eval mode (``training=False``) runs
  none. PyTorch also runs 15 iterations from a random start at registration:
  :func:`spectral_norm_init`.
* PyTorch handles a 1-D weight without power iteration (``F.normalize(weight, eps)``, and no
  :math:`u, v` buffers); refnorm requires at least 2 dimensions.
* :math:`\sigma = 0` (a zero weight, or :math:`u \perp Wv` in eval mode) raises a ValueError where
  PyTorch returns inf/NaN.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, check_array, check_eps, narrow, out_of_range,
                                  wider_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "spectral_norm"


class SpectralNormState(NamedTuple):
    u: np.ndarray                   # left singular vector estimate, shape (h,)
    v: np.ndarray                   # right singular vector estimate, shape (w,)


class SpectralNormCache(NamedTuple):
    weight: np.ndarray              # W (not a copy: inputs are never mutated)
    sigma: np.ndarray               # u^T W v, a 0-d array
    u: np.ndarray                   # the u and v that sigma used (after the power iteration)
    v: np.ndarray
    dim: int                        # the axis that indexes the rows of the matrix view


class SpectralNormGrads(NamedTuple):
    dweight: np.ndarray


def _check_dim(dim, ndim):
    if not isinstance(dim, numbers.Integral) or isinstance(dim, bool):
        raise TypeError(f"{_OP}: `dim` must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{_OP}: `dim` must be in [-{ndim}, {ndim - 1}] for `weight` of "
                         f"{ndim} dimensions, got {dim}")
    return int(dim) % ndim


def _check_iterations(n):
    if not isinstance(n, numbers.Integral) or isinstance(n, bool):
        raise TypeError(f"{_OP}: `n_power_iterations` must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{_OP}: `n_power_iterations` must be positive, got {n}")
    return int(n)


def _check_vector(value, name, length, dtype):
    check_array(value, name, _OP)
    if value.shape != (length,):
        raise ValueError(f"{_OP}: `{name}` must have shape ({length},) for this `weight` and "
                         f"`dim`, got {value.shape}")
    return value.astype(dtype, copy=True)


def _matrix(weight, dim):
    """The (h, w) matrix view: axis ``dim`` first, the rest flattened (a view when dim = 0)."""
    return np.moveaxis(weight, dim, 0).reshape(weight.shape[dim], -1)


def _normalize(a, eps):
    r""":math:`a / \max(\lVert a\rVert, \epsilon)`, as ``F.normalize``."""
    return a / max(np.sqrt(np.dot(a, a)), eps)


def _power_iteration(w_mat, u, v, n, eps):
    for _ in range(n):
        u = _normalize(w_mat @ v, eps)
        v = _normalize(w_mat.T @ u, eps)
    return u, v


def spectral_norm_forward(weight, u, v, n_power_iterations=1, eps=1e-12, dim=0, training=True):
    r"""The spectrally normalized weight :math:`W / (u^\top W v)`: ``(w_sn, state, cache)``.

    Parameters
    ----------
    weight : ndarray, at least 2 dimensions
        :math:`W`; its matrix view has ``weight.shape[dim]`` rows.
    u : ndarray, shape (h,)
        Left vector (``_u`` of PyTorch's parametrization), :math:`h` = ``weight.shape[dim]``.
    v : ndarray, shape (w,)
        Right vector (``_v``), :math:`w` = ``weight.size // h``.
    n_power_iterations : int, default 1
        Power iterations per call in training mode (positive).
    eps : float, default 1e-12
        Lower bound of the norms the power iteration divides by.
    dim : int, default 0
        The axis of ``weight`` that becomes the rows of the matrix view.
    training : bool, default True
        Whether to run the power iteration (and return the updated vectors).

    Returns
    -------
    w_sn : ndarray, same shape and dtype as ``weight``
    state : SpectralNormState
        The new ``(u, v)``: new arrays, also in eval mode, where they equal the given ones.
    cache : SpectralNormCache
    """
    check_array(weight, "weight", _OP, ndim_min=2)
    dim = _check_dim(dim, weight.ndim)
    n_power_iterations = _check_iterations(n_power_iterations)
    eps = check_eps(eps, _OP)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `training` must be a bool, got {type(training).__name__}")
    if not weight.size:  # an empty matrix has no largest singular value
        raise ValueError(f"{_OP}: `weight` must not be empty (sigma = u^T W v of a matrix "
                         f"without elements is undefined), got shape {weight.shape}")
    h = weight.shape[dim]
    w_mat = _matrix(weight, dim)
    u = _check_vector(u, "u", h, weight.dtype)
    v = _check_vector(v, "v", w_mat.shape[1], weight.dtype)
    wider = wider_dtype(weight.dtype)
    if wider is not None and out_of_range(weight):  # tiny or huge: the whole call, wider
        y, state, cache = spectral_norm_forward(weight.astype(wider), u.astype(wider),
                                                v.astype(wider), n_power_iterations, eps, dim,
                                                training)
        return narrow(y, weight.dtype), SpectralNormState(*(narrow(a, weight.dtype)
                                                            for a in state)), \
            WideCache(cache, (weight.dtype,), wider)
    if training:
        u, v = _power_iteration(w_mat, u, v, n_power_iterations, eps)
    sigma = np.asarray(np.dot(u, w_mat @ v))
    if sigma == 0:
        raise ValueError(f"{_OP}: sigma = u^T W v is {float(sigma)} (a zero `weight`, or `u` "
                         f"orthogonal to W v): W / sigma is undefined (PyTorch returns inf/NaN)")
    y = weight / sigma
    return y, SpectralNormState(u.copy(), v.copy()), SpectralNormCache(weight, sigma, u, v, dim)


def spectral_norm_backward(dy, cache):
    """Hand-derived VJP of :func:`spectral_norm_forward` (u, v held constant)."""
    if isinstance(cache, WideCache):
        return cache.narrow(spectral_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    weight, sigma, u, v, dim = cache
    out_dtype = weight.dtype
    # float16 is computed in float32 (<G, W> and the products would overflow its range) and
    # rounded once at the end.
    work = np.float32 if out_dtype == np.float16 else out_dtype
    weight, sigma, u, v, dy = (np.asarray(a).astype(work, copy=False)
                               for a in (weight, sigma, u, v, dy))
    c = np.vdot(dy, weight) / sigma                     # <G, W_SN>
    rest = weight.shape[:dim] + weight.shape[dim + 1:]
    # (G - c u v^T) / sigma: divide by sigma once, at the end. The former G / sigma -
    # (c / sigma) u v^T formed <G, W> / sigma^2, which overflows for a small sigma (float16,
    # eval mode with u nearly orthogonal to W v) although dW itself is representable.
    uvt = np.multiply.outer(u * c, v)                   # c u v^T, matrix view
    dweight = dy - np.moveaxis(uvt.reshape((u.shape[0],) + rest), 0, dim)
    dweight /= sigma
    with np.errstate(over="ignore"):  # float16: beyond 65504 the exact dW is not representable
        return SpectralNormGrads(dweight.astype(out_dtype, copy=False))


spectral_norm = custom_vjp(spectral_norm_forward, spectral_norm_backward, ("weight",),
                           stateful=True)
spectral_norm.__doc__ = ("Differentiable spectral normalization (engine op) returning "
                         "``(w_sn, state)``; see :func:`spectral_norm_forward`.")


def spectral_norm_composite(weight, u, v, n_power_iterations=1, eps=1e-12, dim=0,
                            training=True):
    """The same math with engine primitives only. The power iteration runs under ``no_grad``
    (u and v are constants of the graph, as in PyTorch); the engine differentiates
    ``weight / (u^T W v)``."""
    weight = ag.as_tensor(weight)
    dim = dim % weight.ndim
    perm = (dim,) + tuple(a for a in range(weight.ndim) if a != dim)
    h = weight.shape[dim]
    w_mat = ag.reshape(ag.transpose(weight, perm), (h, weight.size // h))
    u, v = ag.Tensor(u), ag.Tensor(v)
    if training:
        with ag.no_grad():
            for _ in range(n_power_iterations):
                u = w_mat @ v
                u = u / ag.maximum(ag.sqrt(ag.sum(u * u)), eps)
                v = w_mat.T @ u
                v = v / ag.maximum(ag.sqrt(ag.sum(v * v)), eps)
    sigma = u @ (w_mat @ v)
    return weight / sigma, SpectralNormState(u.data.copy(), v.data.copy())


def spectral_norm_init(weight, rng=None, dim=0, eps=1e-12, n_power_iterations=15):
    """Initial state as PyTorch's registration makes it: ``u, v`` standard normal, normalized,
    then ``n_power_iterations`` (15) power iterations on ``weight``."""
    check_array(weight, "weight", _OP, ndim_min=2)
    rng = np.random.default_rng() if rng is None else rng
    w_mat = _matrix(weight, _check_dim(dim, weight.ndim))
    u = _normalize(rng.standard_normal(w_mat.shape[0]).astype(weight.dtype), eps)
    v = _normalize(rng.standard_normal(w_mat.shape[1]).astype(weight.dtype), eps)
    return SpectralNormState(*_power_iteration(w_mat, u, v, n_power_iterations, eps))


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, weight=None, start="init", **kwargs):
    """``start``: "init" (PyTorch's registration state), or "random" (unconverged vectors)."""
    weight = rng.standard_normal(shape) if weight is None else weight
    dim = kwargs.get("dim", 0) % len(shape)
    if start == "init":
        u, v = spectral_norm_init(weight, rng, dim=dim)
    else:
        h = shape[dim]
        u, v = rng.standard_normal(h), rng.standard_normal(weight.size // h)
    return SampleInput(name, (weight,), dict(u=u, v=v, **kwargs))


def sample_inputs(rng):
    # Eval mode only: finite differences re-run the forward on a perturbed weight, and in
    # training mode the power iteration would move u, v with it, which the backward (as
    # PyTorch's) holds constant. Training mode is checked against PyTorch in oracle_inputs
    # and against the u, v-constant function in tests/norms/test_spectral_norm.py.
    ev = dict(training=False)
    yield _case(rng, "(5,4)-linear", (5, 4), **ev)
    yield _case(rng, "(3,2,2,2)-conv", (3, 2, 2, 2), **ev)
    yield _case(rng, "(3,4,2)-dim1", (3, 4, 2), dim=1, **ev)
    yield _case(rng, "(3,4,2)-dim-1", (3, 4, 2), dim=-1, **ev)
    yield _case(rng, "(4,6)-random-state", (4, 6), start="random", **ev)
    yield _case(rng, "(6,1)-one-column", (6, 1), **ev)
    yield _case(rng, "(1,7)-one-row", (1, 7), **ev)
    yield _case(rng, "(4,5)-mean100", (4, 5), weight=100.0 + rng.standard_normal((4, 5)), **ev)


def oracle_inputs(rng):
    yield _case(rng, "(64,3,3,3)-conv-train", (64, 3, 3, 3))
    yield _case(rng, "(1000,37)-linear-train", (1000, 37))
    yield _case(rng, "(37,129)-random-state-train-n3", (37, 129), start="random",
                n_power_iterations=3)
    yield _case(rng, "(16,32,3,3)-convtranspose-dim1-train", (16, 32, 3, 3), dim=1)
    yield _case(rng, "(17,33)-eval", (17, 33), training=False)
    yield _case(rng, "(2,65536)-long-rows-train", (2, 65536))
    yield _case(rng, "(8,129)-mean1e4-std1e-3-train", (8, 129),
                weight=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(8,100)-constant-rows-train", (8, 100),
                weight=np.repeat(rng.standard_normal((8, 1)), 100, axis=1))
    # |W v| ~ 1e-19 < eps: the clamp is active, u and v are not unit vectors.
    yield _case(rng, "(6,33)-tiny-scale-eps-clamp-train", (6, 33), start="random",
                weight=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale-train", (6, 33),
                weight=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    w, u, v = np.ones((3, 4)), np.ones(3), np.ones(4)
    ok = dict(u=u, v=v)
    yield ErrorInput(SampleInput("list weight", ([[1.0, 2.0]],), ok),
                     TypeError, r"spectral_norm: `weight` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int weight", (np.ones((3, 4), dtype=int),), ok),
                     TypeError, r"`weight` must have a floating dtype")
    yield ErrorInput(SampleInput("1-d weight", (np.ones(3),), ok),
                     ValueError, r"`weight` must have at least 2 dimensions, got shape \(3,\)")
    yield ErrorInput(SampleInput("u shape", (w,), dict(u=np.ones(4), v=v)),
                     ValueError, r"`u` must have shape \(3,\) for this `weight` and `dim`, got "
                                 r"\(4,\)")
    yield ErrorInput(SampleInput("u 2-d", (w,), dict(u=np.ones((3, 1)), v=v)),
                     ValueError, r"`u` must have shape \(3,\)")
    yield ErrorInput(SampleInput("v shape for dim 1", (w,), dict(u=np.ones(4), v=v, dim=1)),
                     ValueError, r"`v` must have shape \(3,\)")
    yield ErrorInput(SampleInput("u list", (w,), dict(u=[1.0, 1.0, 1.0], v=v)),
                     TypeError, r"`u` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("v missing", (w,), dict(u=u, v=None)),
                     TypeError, r"`v` must be a numpy.ndarray, got NoneType")
    yield ErrorInput(SampleInput("dim 2", (w,), dict(ok, dim=2)),
                     ValueError, r"`dim` must be in \[-2, 1\] for `weight` of 2 dimensions, got 2")
    yield ErrorInput(SampleInput("dim None", (w,), dict(ok, dim=None)),
                     TypeError, r"`dim` must be an int, got NoneType")
    yield ErrorInput(SampleInput("n 0", (w,), dict(ok, n_power_iterations=0)),
                     ValueError, r"`n_power_iterations` must be positive, got 0")
    yield ErrorInput(SampleInput("n float", (w,), dict(ok, n_power_iterations=1.0)),
                     TypeError, r"`n_power_iterations` must be an int, got float")
    yield ErrorInput(SampleInput("eps", (w,), dict(ok, eps=-1e-12)),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("training str", (w,), dict(ok, training="yes")),
                     TypeError, r"`training` must be a bool, got str")
    yield ErrorInput(SampleInput("zero weight", (np.zeros((3, 4)),), ok),
                     ValueError, r"sigma = u\^T W v is 0.0")
    yield ErrorInput(SampleInput("u orthogonal to Wv, eval", (np.eye(2),),
                                 dict(u=np.array([1.0, 0.0]), v=np.array([0.0, 1.0]),
                                      training=False)),
                     ValueError, r"sigma = u\^T W v is 0.0")


def _torch_call(torch, weight, *, u, v, n_power_iterations=1, eps=1e-12, dim=0, training=True):
    """The real parametrization: register it on a holder module (its random initialisation
    runs under a forked RNG), load the given state into its ``_u``/``_v`` buffers, and call it
    on ``weight`` in the requested mode. ``u``/``v`` may be NumPy arrays or tensors; the new ones
    are returned as tensors on ``weight``'s device."""
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight.detach().clone())
    with torch.random.fork_rng(devices=[]):
        torch.nn.utils.parametrizations.spectral_norm(
            holder, n_power_iterations=n_power_iterations, eps=eps, dim=dim)
    sn = holder.parametrizations.weight[0]
    with torch.no_grad():
        sn._u.copy_(torch.as_tensor(u, device=weight.device))
        sn._v.copy_(torch.as_tensor(v, device=weight.device))
    sn.train(training)
    y = sn(weight)
    return y, SpectralNormState(sn._u.detach().clone(), sn._v.detach().clone())


SPEC = NormSpec(
    name="spectral_norm",
    title="Spectral Normalization",
    paper=Paper("Spectral Normalization for Generative Adversarial Networks",
                "Miyato, Kataoka, Koyama, Yoshida", 2018, "arXiv:1802.05957"),
    forward=spectral_norm_forward,
    backward=spectral_norm_backward,
    op=spectral_norm,
    composite=spectral_norm_composite,
    diff_argnames=("weight",),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    gradient="exact",
    gradient_note=("Exact for W -> W / (u^T W v) with the u, v the forward used (after its power "
                   "iteration), and for W -> W / sigma_max(W) once the iteration has converged. "
                   "In training mode the dependence of the freshly iterated u, v on W is not "
                   "differentiated, as in PyTorch and the paper; sample_inputs are in eval mode "
                   "so that finite differences see the same function."),
    stateful=True,
    train_eval_differ=True,
    torch_equivalent="torch.nn.utils.parametrizations.spectral_norm",
    torch_call=_torch_call,
    normalizes="weights",
)

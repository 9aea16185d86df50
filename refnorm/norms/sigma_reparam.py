r"""σReparam: a weight divided by its spectral norm and multiplied by a learnable scalar.

Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu & Susskind, *Stabilizing
Transformer Training by Preventing Attention Entropy Collapse*, ICML 2023, arXiv:2303.06296.

The weight is viewed as a matrix :math:`W \in \mathbb R^{h\times w}` (axis ``dim`` first, the
others flattened: ``(out, in * kh * kw)`` for a convolution), and

.. math::

   \hat W = \frac{\gamma}{\sigma(W)}\, W ,

with :math:`\gamma` a learnable scalar (``gamma``, shape ``(1,)``) and :math:`\sigma(W)` the
largest singular value estimated by power iteration from explicit state: a left vector
:math:`u \in \mathbb R^h` and a right vector :math:`v \in \mathbb R^w`. Each call runs
``n_power_iterations`` steps (without gradient), in training **and** in eval mode,

.. math::

   u \leftarrow \frac{W v}{\max(\lVert W v\rVert, \epsilon)},\qquad
   v \leftarrow \frac{W^\top u}{\max(\lVert W^\top u\rVert, \epsilon)},\qquad
   \sigma = u^\top W v ;

the new :math:`(u, v)` are returned as the new state in training mode, while in eval mode the
given state is returned unchanged (a one-step refresh that is not stored). The input state is
never mutated.

Backward (derivation: ``docs/derivations/sigma_reparam.rst``). As in the official code and
:mod:`refnorm.norms.spectral_norm`, :math:`u, v` are constants of the backward, held at their
new values; with :math:`G = \mathrm{d}\hat W` and :math:`\langle A, B\rangle = \sum_{ij}
A_{ij}B_{ij}`:

.. math::

   \mathrm{d}W = \frac{\gamma}{\sigma}\Bigl(G - \frac{\langle G, W\rangle}{\sigma}\, u v^\top
   \Bigr),\qquad \mathrm{d}\gamma = \frac{\langle G, W\rangle}{\sigma}.

This is the exact gradient of :math:`W \mapsto \gamma W/(u^\top W v)` for the :math:`u, v` the
forward used, and of :math:`W \mapsto \gamma W/\sigma_{\max}(W)` at a converged state (the
first-order change of :math:`u, v` does not move :math:`u^\top W v` at a singular pair). It
omits the dependence of the freshly iterated :math:`u, v` on :math:`W`, as the paper's code does.

Conventions, as the official PyTorch code (``apple/ml-sigma-reparam``, ``vision/layers.py``,
``SpectralNormedWeight``), with these differences from :mod:`refnorm.norms.spectral_norm`:

* the power iteration runs in eval mode too (one step from the stored vector, not stored);
  ``n_power_iterations=0`` gives PyTorch ``spectral_norm``'s eval convention (the given
  :math:`u, v` as they are), and the function of :math:`W` whose gradient the backward is;
* :math:`\gamma` is learnable, initialized to :math:`\sigma(W_0)` so that :math:`\hat W = W_0`
  at initialization, and the state from the SVD of :math:`W_0` (:func:`sigma_reparam_init`).
  The official JAX speech code (``speech/layers.py``) initializes :math:`\gamma = 1` instead
  (``gamma_init="one"``); which one the paper states is not verified here;
* the official code stores only the right vector (named ``u`` there, in
  :math:`\mathbb R^{\text{in}}`: the names are swapped against PyTorch's ``spectral_norm``) and
  recomputes the left one first; here both are state, named as in PyTorch (:math:`u` left,
  :math:`v` right), and the left one is recomputed first, so with ``n_power_iterations >= 1``
  the given :math:`u` does not affect the result;
* :math:`\epsilon` clamps the norms (``F.normalize``), default ``1e-12``; the official code also
  tracks :math:`\sigma` in a buffer, which is not needed here (it is ``gamma / (W_hat / W)``);
* the ViT recipe of the paper replaces every LayerNorm by the identity
  (``remove_all_normalization_layers``) and reparametrizes every Linear and Conv2d: a model
  choice, not part of this function;
* :math:`\sigma = 0` raises a ValueError (the official code divides by it), and so does an
  empty ``weight`` (a size-0 axis: no singular value; PyTorch divides by :math:`\sigma = 0`).

Range: a call whose ``weight`` or :math:`\gamma` lies outside about :math:`[10^{-77}, 10^{77}]`
(float64) or :math:`[3\cdot 10^{-10}, 4\cdot 10^9]` (float32), and every float16 call, is
computed entirely in the wider dtype (float64, or ``np.longdouble`` where it is wider) and
rounded once (:func:`refnorm.norms._stats.out_of_range`): subnormal weights keep their
products :math:`Wv` out of the subnormal range.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, check_array, check_eps, check_flag, check_param,
                                  narrow, out_of_range, vector_norm, wider_dtype)
from refnorm.norms.spectral_norm import _matrix
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "sigma_reparam"
#: the iteration converges geometrically (one step per call is the official setting): a count
#: beyond this is a mistake, not a wish, and would run for ever (2**70)
MAX_POWER_ITERATIONS = 10_000


class SigmaReparamState(NamedTuple):
    u: np.ndarray                   # left singular vector estimate, shape (h,)
    v: np.ndarray                   # right singular vector estimate, shape (w,)


class SigmaReparamCache(NamedTuple):
    weight: np.ndarray              # W (not a copy)
    gamma: np.ndarray               # \gamma, shape (1,)
    sigma_hat: np.ndarray           # \hat u^T W \hat v (unit vectors), 0-d, the work dtype
    u_hat: np.ndarray               # the u and v that sigma used (after the iteration),
    v_hat: np.ndarray               # divided by their norms
    norms: float                    # ||u|| ||v|| (not 1 where the eps clamp was active)
    dim: int

    @property
    def sigma(self):
        r""":math:`\sigma = u^\top W v`, as a float64 0-d array."""
        return np.asarray(float(self.sigma_hat) * self.norms)


class SigmaReparamGrads(NamedTuple):
    dweight: np.ndarray
    dgamma: np.ndarray


def _normalize(a, eps):
    r""":math:`a / \max(\lVert a\rVert, \epsilon)` (``F.normalize``), with the norm computed
    without overflow or underflow of its squares (:func:`refnorm.norms._stats.vector_norm`):
    a float32 weight of 1e19 has :math:`\lVert Wv\rVert^2` beyond float32's range."""
    return a / max(float(vector_norm(a, (0,))[0]), eps)


def _power_iteration(w_mat, u, v, n, eps):
    for _ in range(n):
        u = _normalize(w_mat @ v, eps).astype(w_mat.dtype, copy=False)
        v = _normalize(w_mat.T @ u, eps).astype(w_mat.dtype, copy=False)
    return u, v


def _check_dim(dim, ndim):
    if not isinstance(dim, numbers.Integral) or isinstance(dim, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `dim` must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{_OP}: `dim` must be in [-{ndim}, {ndim - 1}] for `weight` of "
                         f"{ndim} dimensions, got {dim}")
    return int(dim) % ndim


def _check_iterations(n):
    if not isinstance(n, numbers.Integral) or isinstance(n, (bool, np.bool_)):
        raise TypeError(f"{_OP}: `n_power_iterations` must be an int, got {type(n).__name__}")
    if not 0 <= n <= MAX_POWER_ITERATIONS:
        raise ValueError(f"{_OP}: `n_power_iterations` must be in [0, {MAX_POWER_ITERATIONS}], "
                         f"got {n}")
    return int(n)


def _check_vector(value, name, length, dtype):
    check_array(value, name, _OP)
    if value.shape != (length,):
        raise ValueError(f"{_OP}: `{name}` must have shape ({length},) for this `weight` and "
                         f"`dim`, got {value.shape}")
    return value.astype(dtype, copy=True)


def sigma_reparam_forward(weight, gamma, u, v, n_power_iterations=1, eps=1e-12, dim=0,
                          training=True):
    r""":math:`\hat W = \gamma W / (u^\top W v)` after the power iteration: ``(w_hat, state,
    cache)``.

    Parameters
    ----------
    weight : ndarray, at least 2 dimensions
        :math:`W`; its matrix view has ``weight.shape[dim]`` rows.
    gamma : ndarray of shape (1,)
        The learnable scale :math:`\gamma` (``sigma`` in the official code).
    u : ndarray, shape (h,)
        Left vector, :math:`h` = ``weight.shape[dim]``.
    v : ndarray, shape (w,)
        Right vector, :math:`w` = ``weight.size // h`` (the official code's ``u`` buffer).
    n_power_iterations : int, default 1
        Power iterations per call, in both modes (0: use ``u``, ``v`` as given).
    eps : float, default 1e-12
        Lower bound of the norms the power iteration divides by.
    dim : int, default 0
        The axis of ``weight`` that becomes the rows of the matrix view.
    training : bool, default True
        Whether the iterated vectors are returned as the new state (eval: the given ones).

    Returns
    -------
    w_hat : ndarray, same shape and dtype as ``weight``
    state : SigmaReparamState
        New arrays, also in eval mode.
    cache : SigmaReparamCache
    """
    check_array(weight, "weight", _OP, ndim_min=2)
    gamma = check_param(check_array(gamma, "gamma", _OP), "gamma", _OP, (1,))
    dim = _check_dim(dim, weight.ndim)
    n = _check_iterations(n_power_iterations)
    eps = check_eps(eps, _OP)
    training = check_flag(training, "training", _OP)
    if not weight.size:  # an empty matrix has no largest singular value
        raise ValueError(f"{_OP}: `weight` must not be empty (sigma = u^T W v of a matrix "
                         f"without elements is undefined), got shape {weight.shape}")
    work = np.float32 if weight.dtype == np.float16 else weight.dtype
    w_mat = _matrix(weight, dim).astype(work, copy=False)
    u0 = _check_vector(u, "u", w_mat.shape[0], work)
    v0 = _check_vector(v, "v", w_mat.shape[1], work)
    wider = wider_dtype(weight.dtype)
    if wider is not None and out_of_range(weight, gamma):  # tiny or huge: the whole call, wider
        y, state, cache = sigma_reparam_forward(weight.astype(wider), gamma.astype(wider),
                                                u0.astype(wider), v0.astype(wider), n, eps, dim,
                                                training)
        return narrow(y, weight.dtype), SigmaReparamState(*(narrow(a, weight.dtype)
                                                            for a in state)), \
            WideCache(cache, (weight.dtype, gamma.dtype), wider)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        u1, v1 = _power_iteration(w_mat, u0, v0, n, eps) if n else (u0, v0)
        # sigma = ||u|| ||v|| (u/||u||)^T W (v/||v||): where the eps clamp was active, u and v
        # are short and u^T W v may be subnormal (float32 W of 1e-20: 6e-43) while W / sigma
        # is not; the unit-vector form keeps sigma_hat in range, and the scalar
        # gamma / sigma = gamma / (sigma_hat ||u|| ||v||) is formed in float64
        nu, nv = (float(vector_norm(a, (0,))[0]) if a.size else 0.0 for a in (u1, v1))
        u_hat = u1 / nu if nu > 0 else u1
        v_hat = v1 / nv if nv > 0 else v1
        sigma_hat = np.asarray(np.dot(u_hat, w_mat @ v_hat))
    sigma = float(sigma_hat) * nu * nv
    if not sigma != 0:  # 0 or NaN: nothing defines W / sigma
        raise ValueError(f"{_OP}: sigma = u^T W v is {sigma} (a zero `weight`, or `u` "
                         f"orthogonal to W v): gamma W / sigma is undefined")
    scale = float(gamma[0]) / sigma                        # gamma / sigma, float64
    with np.errstate(over="ignore"):
        y = weight.astype(np.float64) * scale if work != np.float64 else weight * scale
    state = SigmaReparamState(*(a.astype(weight.dtype, copy=True)
                                for a in ((u1, v1) if training else (u0, v0))))
    cache = SigmaReparamCache(weight, gamma, sigma_hat, u_hat, v_hat, nu * nv, dim)
    return y.astype(weight.dtype, copy=False), state, cache


def sigma_reparam_backward(dy, cache):
    """Hand-derived VJP of :func:`sigma_reparam_forward` (u, v held constant)."""
    if isinstance(cache, WideCache):
        return cache.narrow(sigma_reparam_backward(dy.astype(cache.wide_dtype), cache.inner))
    weight, gamma, sigma_hat, u, v, norms, dim = cache
    work = np.float32 if weight.dtype == np.float16 else weight.dtype
    w = weight.astype(work, copy=False)
    g = dy.astype(work, copy=False)
    sigma = float(sigma_hat) * norms
    with np.errstate(over="ignore", invalid="ignore"):
        # <G, W> / sigma u v^T = (<G, W> / sigma_hat) u_hat v_hat^T: no short vectors
        c_hat = np.vdot(g, w) / sigma_hat
        rest = weight.shape[:dim] + weight.shape[dim + 1:]
        uvt = np.multiply.outer(u * c_hat, v)              # matrix view
        dweight = g - np.moveaxis(uvt.reshape((u.shape[0],) + rest), 0, dim)
        # times gamma / sigma, a float64 number that may exceed the work dtype's range
        dweight = dweight.astype(np.float64, copy=False) * (float(gamma[0]) / sigma)
        dgamma = np.reshape(float(c_hat) / norms, (1,))    # <G, W> / sigma
        return SigmaReparamGrads(dweight.astype(weight.dtype, copy=False),
                                 dgamma.astype(gamma.dtype))


sigma_reparam = custom_vjp(sigma_reparam_forward, sigma_reparam_backward, ("weight", "gamma"),
                           stateful=True)
sigma_reparam.__doc__ = ("Differentiable sigma-reparametrization (engine op) returning "
                         "``(w_hat, state)``; see :func:`sigma_reparam_forward`.")


def sigma_reparam_composite(weight, gamma, u, v, n_power_iterations=1, eps=1e-12, dim=0,
                            training=True):
    """The same math with engine primitives only. The power iteration runs under ``no_grad``
    (u and v are constants of the graph); the engine differentiates ``gamma W / (u^T W v)``."""
    weight = ag.as_tensor(weight)
    dim = dim % weight.ndim
    perm = (dim,) + tuple(a for a in range(weight.ndim) if a != dim)
    h = weight.shape[dim]
    w_mat = ag.reshape(ag.transpose(weight, perm), (h, weight.size // h))
    u0, v0 = ag.Tensor(u), ag.Tensor(v)
    u1, v1 = u0, v0
    with ag.no_grad():
        for _ in range(n_power_iterations):
            u1 = w_mat @ v1
            u1 = u1 / ag.maximum(ag.sqrt(ag.sum(u1 * u1)), eps)
            v1 = w_mat.T @ u1
            v1 = v1 / ag.maximum(ag.sqrt(ag.sum(v1 * v1)), eps)
    sigma = u1 @ (w_mat @ v1)
    new = (u1, v1) if training else (u0, v0)
    return (weight / sigma) * gamma, SigmaReparamState(new[0].data.copy(), new[1].data.copy())


def sigma_reparam_init(weight, dim=0, gamma_init="sigma"):
    r"""``(gamma, state)`` as the official code initializes them at construction: the SVD of
    the matrix view, :math:`u, v` its top singular vectors, and :math:`\gamma = \sigma(W_0)`
    (``gamma_init="sigma"``, the PyTorch vision code: :math:`\hat W = W_0`) or 1
    (``"one"``, the JAX speech code)."""
    check_array(weight, "weight", _OP, ndim_min=2)
    if gamma_init not in ("sigma", "one"):
        raise ValueError(f"{_OP}: `gamma_init` must be 'sigma' or 'one', got {gamma_init!r}")
    w_mat = _matrix(weight, _check_dim(dim, weight.ndim)).astype(np.float64)
    left, s, right_t = np.linalg.svd(w_mat, full_matrices=False)
    sign = 1.0 if left[:, 0].sum() >= 0 else -1.0   # any sign; fixed for reproducibility
    u, v = sign * left[:, 0], sign * right_t[0]
    gamma = np.array([s[0] if gamma_init == "sigma" else 1.0], weight.dtype)
    return gamma, SigmaReparamState(u.astype(weight.dtype), v.astype(weight.dtype))


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, weight=None, start="svd", gamma=None, **kwargs):
    """``start``: "svd" (the official initialization, converged) or "random" (unconverged
    vectors: then only ``n_power_iterations=0`` is the function the backward differentiates)."""
    weight = rng.standard_normal(shape) * 0.1 if weight is None else weight
    dim = kwargs.get("dim", 0) % len(shape)
    g0, (u, v) = sigma_reparam_init(weight, dim=dim)
    if start == "random":
        h = shape[dim]
        u, v = rng.standard_normal(h), rng.standard_normal(weight.size // h)
    gamma = g0 * (1 + 0.3 * rng.standard_normal(1)) if gamma is None else gamma
    return SampleInput(name, (weight, gamma), dict(u=u, v=v, **kwargs))


def sample_inputs(rng):
    # Finite differences re-run the forward on a perturbed weight: the iteration then moves
    # u and v, which the backward holds constant. Random states are checked with
    # n_power_iterations=0 (the function the backward is the gradient of); converged (SVD)
    # states with the official one step, where the omitted term vanishes.
    yield _case(rng, "(5,4)-linear-svd", (5, 4))
    yield _case(rng, "(5,4)-linear-svd-eval", (5, 4), training=False)
    yield _case(rng, "(3,2,2,2)-conv-svd", (3, 2, 2, 2))
    yield _case(rng, "(3,4,2)-dim1-svd", (3, 4, 2), dim=1)
    yield _case(rng, "(4,6)-random-state-n0", (4, 6), start="random", n_power_iterations=0)
    yield _case(rng, "(4,6)-random-state-n0-eval", (4, 6), start="random",
                n_power_iterations=0, training=False)
    yield _case(rng, "(6,1)-one-column", (6, 1))
    yield _case(rng, "(1,7)-one-row", (1, 7))
    yield _case(rng, "(4,5)-mean100-gamma1", (4, 5), gamma=np.array([1.0]),
                weight=100.0 + rng.standard_normal((4, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(64,3,3,3)-conv-train", (64, 3, 3, 3))
    yield _case(rng, "(384,129)-linear-train", (384, 129))
    yield _case(rng, "(37,129)-random-state-train-n3", (37, 129), start="random",
                n_power_iterations=3)
    yield _case(rng, "(17,33)-random-state-eval-refresh", (17, 33), start="random",
                training=False)
    yield _case(rng, "(17,33)-random-state-n0", (17, 33), start="random", n_power_iterations=0)
    yield _case(rng, "(2,65536)-long-rows-train", (2, 65536))
    yield _case(rng, "(8,129)-mean1e4-std1e-3-train", (8, 129),
                weight=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    yield _case(rng, "(6,33)-huge-scale-train", (6, 33), weight=1e20 * rng.standard_normal((6, 33)))


def error_inputs():
    w, g, u, v = np.ones((3, 4)), np.ones(1), np.ones(3), np.ones(4)
    ok = dict(u=u, v=v)
    yield ErrorInput(SampleInput("list weight", ([[1.0, 2.0]], g), ok),
                     TypeError, r"sigma_reparam: `weight` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("1-d weight", (np.ones(3), g), ok),
                     ValueError, r"`weight` must have at least 2 dimensions")
    yield ErrorInput(SampleInput("gamma shape", (w, np.ones(())), ok),
                     ValueError, r"`gamma` must have shape \(1,\), got \(\)")
    yield ErrorInput(SampleInput("gamma missing", (w, None), ok),
                     TypeError, r"`gamma` must be a numpy.ndarray, got NoneType")
    yield ErrorInput(SampleInput("u shape", (w, g), dict(u=np.ones(4), v=v)),
                     ValueError, r"`u` must have shape \(3,\) for this `weight` and `dim`")
    yield ErrorInput(SampleInput("v missing", (w, g), dict(u=u, v=None)),
                     TypeError, r"`v` must be a numpy.ndarray, got NoneType")
    yield ErrorInput(SampleInput("dim 2", (w, g), dict(ok, dim=2)),
                     ValueError, r"`dim` must be in \[-2, 1\]")
    yield ErrorInput(SampleInput("n -1", (w, g), dict(ok, n_power_iterations=-1)),
                     ValueError, r"`n_power_iterations` must be in \[0, 10000\], got -1")
    yield ErrorInput(SampleInput("eps", (w, g), dict(ok, eps=-1e-12)),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("training str", (w, g), dict(ok, training="yes")),
                     TypeError, r"`training` must be a bool, got str")
    yield ErrorInput(SampleInput("empty weight", (np.ones((0, 4)), g), dict(u=np.ones(0), v=v)),
                     ValueError, r"sigma_reparam: `weight` must not be empty")
    yield ErrorInput(SampleInput("zero weight", (np.zeros((3, 4)), g), ok),
                     ValueError, r"sigma = u\^T W v is 0.0")


def _torch_call(torch, weight, gamma, *, u, v, n_power_iterations=1, eps=1e-12, dim=0,
                training=True):
    """``SpectralNormedWeight.forward`` of the official code, with torch ops: the power
    iteration under no_grad (in both modes), sigma from clones of the vectors."""
    dev, dt = weight.device, weight.dtype
    u0 = torch.as_tensor(u, device=dev).to(dt)
    v0 = torch.as_tensor(v, device=dev).to(dt)
    w_mat = weight.movedim(dim, 0).reshape(weight.shape[dim], -1)
    u1, v1 = u0, v0
    with torch.no_grad():
        for _ in range(n_power_iterations):
            u1 = torch.nn.functional.normalize(w_mat @ v1, dim=0, eps=eps)
            v1 = torch.nn.functional.normalize(w_mat.T @ u1, dim=0, eps=eps)
    sigma = u1.clone() @ (w_mat @ v1.clone())
    new = (u1, v1) if training else (u0, v0)
    return (weight / sigma) * gamma, SigmaReparamState(new[0].clone(), new[1].clone())


SPEC = NormSpec(
    name="sigma_reparam",
    title="σReparam (spectral reparametrization with a learnable scale)",
    paper=Paper("Stabilizing Transformer Training by Preventing Attention Entropy Collapse",
                "Zhai, Likhomanenko, Littwin, Busbridge, Ramapuram, Zhang, Gu, Susskind", 2023,
                "arXiv:2303.06296"),
    forward=sigma_reparam_forward,
    backward=sigma_reparam_backward,
    op=sigma_reparam,
    composite=sigma_reparam_composite,
    diff_argnames=("weight", "gamma"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    gradient="exact",
    gradient_note=("Exact for W -> gamma W / (u^T W v) with the u, v the forward used (after its "
                   "power iteration), and for W -> gamma W / sigma_max(W) at a converged state. "
                   "The dependence of the freshly iterated u, v on W is not differentiated, as in "
                   "the official code; sample_inputs use n_power_iterations=0 for unconverged "
                   "states and the official one step only from converged (SVD) states."),
    stateful=True,
    train_eval_differ=True,
    torch_equivalent=None,
    torch_call=_torch_call,
    normalizes="weights",
)

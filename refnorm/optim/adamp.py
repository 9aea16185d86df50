r"""SGDP and AdamP: momentum optimizers that remove the radial part of the update of
scale-invariant weights (Heo et al., ICLR 2021).

**Why.** A weight :math:`w` followed by a normalization (a conv weight feeding BatchNorm, a
weight-standardized layer) is *scale-invariant*: :math:`f(cw) = f(w)` for :math:`c > 0`. Then
:math:`\langle w, \nabla f(w)\rangle = 0` and :math:`\nabla f(cw) = \nabla f(w)/c`, so plain
gradient descent only ever grows :math:`\lVert w\rVert`
(:math:`\lVert w_{t+1}\rVert^2 = \lVert w_t\rVert^2 + \eta^2\lVert g_t\rVert^2`) and the
*effective* step size on the sphere, :math:`\eta/\lVert w\rVert^2`, shrinks. Momentum makes it
far worse: the buffer holds old gradients, which are no longer orthogonal to the current :math:`w`,
so the update gains a radial, norm-increasing component. SGDP and AdamP project that component out.

**The projection** :math:`\Pi`, applied to the update :math:`u` of every parameter with more than
one dimension. For a *view* of the weight as rows :math:`w_r` (first one row per output channel,
the "channel view"; then the whole weight as one row, the "layer view"), with row length :math:`D`:

.. math::

    \cos_r = \frac{|\langle g_r, w_r\rangle|}{\max(\lVert g_r\rVert, \epsilon)\,
             \max(\lVert w_r\rVert, \epsilon)}, \qquad
    \text{fire if}\ \max_r \cos_r < \frac{\delta}{\sqrt{D}}

and for the first view that fires,

.. math::

    \hat w_r = \frac{w_r}{\lVert w_r\rVert + \epsilon}, \qquad
    u_r \leftarrow u_r - \langle \hat w_r, u_r\rangle\, \hat w_r, \qquad
    r_{wd} = \texttt{wd\_ratio}

otherwise :math:`u` is unchanged and :math:`r_{wd} = 1`. The test uses the raw gradient
:math:`g`, not the momentum; a random vector in :math:`D` dimensions has
:math:`|\cos| \approx 1/\sqrt{D}`, hence the threshold :math:`\delta/\sqrt{D}`.

**SGDP** (momentum :math:`\mu`, dampening :math:`\tau`, :math:`b_0 = 0`):

.. math::

    b_t = \mu b_{t-1} + (1-\tau) g_t, \quad
    u = g_t + \mu b_t \ \text{(nesterov) or}\ b_t, \quad
    (u, r_{wd}) = \Pi(w, g_t, u), \\
    b_t \leftarrow u \ \text{(without nesterov, when}\ \Pi\ \text{fired: the official code)},
    \\
    w \leftarrow w\,\Bigl(1 - \frac{\eta\lambda r_{wd}}{1-\mu}\Bigr)\ \text{(if}\ \lambda \ne 0),
    \quad w_t = w - \eta u

Without Nesterov the official code's update *is* the buffer, and the projection subtracts from
it in place: the stored momentum buffer is projected too, whenever the projection fires. That is
the default here (``project_buffer=True``); ``project_buffer=False`` is the paper's Algorithm 1,
which projects only the update and keeps :math:`b_t` as accumulated. With Nesterov both agree
(the update is a new array).

**AdamP** (:math:`m_0 = v_0 = 0`):

.. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    d = \sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon, \\
    u = \bigl(\beta_1 m_t + (1-\beta_1) g_t\bigr)/d \ \text{(nesterov) or}\ m_t/d, \quad
    (u, r_{wd}) = \Pi(w, g_t, u), \\
    w \leftarrow w\,(1 - \eta\lambda r_{wd})\ \text{(if}\ \lambda > 0), \quad
    w_t = w - \frac{\eta}{1-\beta_1^t}\, u

The cosine test and the projection both use the weight *before* weight decay.

References
----------
Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha (2021), "AdamP: Slowing Down the Slowdown for Momentum
Optimizers on Scale-invariant Weights", ICLR 2021, arXiv:2006.08217. Official code: clovaai/AdamP.

Notes
-----
We follow the official code (``adamp/sgdp.py``, ``adamp/adamp.py``) where it adds to, or differs
from, the algorithm as the paper states it (the projection
:math:`\Pi_w(x) = x - (\hat w\cdot x)\hat w`, applied when
:math:`\cos(w, \nabla_w f) < \delta/\sqrt{\dim w}`):

* **Views.** The paper tests "the weight"; the code tests each output channel separately first
  (the channel view; *all* channels must pass), then the whole layer, and projects in the first
  view that passes. One-dimensional parameters (biases, norm gains) are never projected.
* **eps.** The paper has no :math:`\epsilon` in the test or the projection. The code clamps both
  norms at :math:`\epsilon` in the cosine (``F.cosine_similarity``) and normalises with
  :math:`\lVert w_r\rVert + \epsilon` (:math:`\epsilon` *outside* the norm). Consequently the
  projected update is orthogonal to :math:`w` only up to a relative
  :math:`1 - \lVert w_r\rVert^2/(\lVert w_r\rVert+\epsilon)^2 \approx 2\epsilon/\lVert w_r\rVert`,
  not exactly. (An older single-file version of the code used
  :math:`|\langle x,y\rangle|/((\lVert x\rVert+\epsilon)(\lVert y\rVert+\epsilon))`; for
  non-degenerate norms all forms agree.)
* **Weight decay** is decoupled (applied to the weight, not the gradient) and multiplied by
  ``wd_ratio`` (default 0.1) whenever the projection fires. For SGDP it is also divided by
  :math:`1-\mu`, which matches the steady-state size of coupled L2 decay through a momentum buffer.
* **SGDP projects its momentum buffer.** Without Nesterov, the official ``sgdp.py`` sets
  ``d_p = buf`` and projects ``d_p`` in place, so the buffer itself loses its radial component
  whenever the projection fires (timm's ``SGDP`` inherits this). The paper's Algorithm 1 projects
  only the update. The default, ``project_buffer=True``, is the official code; after the first
  step that projects, the two buffers differ (by ~0.3% relative on the golden problem), and the
  trajectories with them. ``project_buffer=False`` gives the paper's form. AdamP is unaffected:
  its update ``m_t / d`` is a new array in the official code too.
* **SGDP's buffer starts at zero**, so its first step is dampened by :math:`(1-\tau)`; PyTorch's
  SGD copies the first gradient into the buffer instead. SGDP with :math:`\lambda = 0`,
  :math:`\tau = 0` and no projection therefore equals ``torch.optim.SGD``.
* The official SGDP accepts ``nesterov`` with zero momentum or nonzero dampening (unlike
  ``torch.optim.SGD``), and so do we. Neither optimizer has ``maximize`` or ``amsgrad``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..registry import OptimizerSpec, Paper
from . import _equations
from ._common import (
    as_param_list,
    check_betas,
    check_buffers,
    check_grads,
    check_nonnegative,
    check_real,
    frozen,
    run_check,
)

__all__ = [
    "channel_view", "layer_view", "VIEWS", "cosine_similarity_rows", "ProjectionResult",
    "project_update", "SGDPState", "sgdp_init", "sgdp_step", "AdamPState", "adamp_init",
    "adamp_step", "SGDP_SPEC", "ADAMP_SPEC", "SGDP_DEFAULTS", "ADAMP_DEFAULTS",
]

#: Defaults of the official SGDP (``lr`` has none there: it is required).
SGDP_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, eps=1e-8,
                     delta=0.1, wd_ratio=0.1)
#: Defaults of the official AdamP.
ADAMP_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                      wd_ratio=0.1, nesterov=False)


# --------------------------------------------------------------------------------------------
# The projection


def channel_view(x: np.ndarray) -> np.ndarray:
    """One row per output channel: shape ``(x.shape[0], -1)`` (a view, no copy)."""
    return x.reshape(x.shape[0], -1)


def layer_view(x: np.ndarray) -> np.ndarray:
    """The whole weight as one row: shape ``(1, -1)``."""
    return x.reshape(1, -1)


#: The views in the order the official code tries them.
VIEWS = (("channel", channel_view), ("layer", layer_view))


def cosine_similarity_rows(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    r"""Row-wise :math:`|\langle a_r, b_r\rangle| / (\max(\lVert a_r\rVert,\epsilon)\,
    \max(\lVert b_r\rVert,\epsilon))`, as ``F.cosine_similarity(a, b, dim=1, eps=eps).abs()``."""
    dot = np.sum(a * b, axis=1)
    norm_a = np.maximum(np.linalg.norm(a, axis=1), eps)
    norm_b = np.maximum(np.linalg.norm(b, axis=1), eps)
    return np.abs(dot) / (norm_a * norm_b)


class ProjectionResult(NamedTuple):
    """What :func:`project_update` decided.

    ``update`` is the (possibly projected) update; ``view`` is ``"channel"``, ``"layer"`` or None
    (no projection); ``wd_ratio`` is the factor applied to the weight decay (``wd_ratio`` when
    projected, else 1.0).
    """

    update: np.ndarray
    view: str | None
    wd_ratio: float


def project_update(p: np.ndarray, grad: np.ndarray, update: np.ndarray, *, delta: float,
                   wd_ratio: float, eps: float) -> ProjectionResult:
    r"""Remove the radial component of ``update`` if ``p`` looks scale-invariant.

    Tries the channel view, then the layer view. In a view with rows of length :math:`D`, ``p``
    counts as scale-invariant when every row's :math:`|\cos(g_r, w_r)| < \delta/\sqrt{D}`; then
    each row of the update loses its component along :math:`w_r/(\lVert w_r\rVert+\epsilon)`.
    Parameters with ``ndim <= 1`` (biases, gains) and empty ones are returned unchanged.
    Nothing is modified in place.
    """
    if p.ndim <= 1 or p.size == 0:
        return ProjectionResult(update, None, 1.0)
    for name, view in VIEWS:
        w_rows = view(p)
        cosine = cosine_similarity_rows(view(grad), w_rows, eps)
        if cosine.max() < delta / math.sqrt(w_rows.shape[1]):
            w_hat = w_rows / (np.linalg.norm(w_rows, axis=1, keepdims=True) + eps)
            u_rows = view(update)
            radial = np.sum(w_hat * u_rows, axis=1, keepdims=True)  # <w_hat_r, u_r> per row
            projected = (u_rows - radial * w_hat).reshape(p.shape)
            return ProjectionResult(projected, name, wd_ratio)
    return ProjectionResult(update, None, 1.0)


def _validate_projection(eps, delta, wd_ratio) -> None:
    check_nonnegative("eps", eps)
    check_nonnegative("delta", delta)
    check_nonnegative("wd_ratio", wd_ratio)


def _check_decision_fields(state, params) -> None:
    for field in ("projection", "wd_ratio_applied"):
        if len(getattr(state, field, ())) != len(params):
            raise ValueError(f"state.{field} must hold one entry per parameter ({len(params)})")


# --------------------------------------------------------------------------------------------
# SGDP


class SGDPState(NamedTuple):
    """The state of SGDP: a value, never modified in place (its arrays are read-only).

    Attributes
    ----------
    step : int
        Number of steps taken.
    momentum_buffer : tuple of ndarray
        :math:`b_t` per parameter; zeros at initialisation (as in the official code).
    projection : tuple of (str or None)
        Per parameter, the view in which the last step projected (``"channel"``, ``"layer"``),
        or None.
    wd_ratio_applied : tuple of float
        Per parameter, the factor the last step applied to the weight decay.
    """

    step: int
    momentum_buffer: tuple
    projection: tuple
    wd_ratio_applied: tuple


def _validate_sgdp(lr, momentum, dampening, weight_decay, eps, delta, wd_ratio) -> None:
    if lr is not None:
        check_nonnegative("lr", lr)
    check_nonnegative("momentum", momentum)
    check_nonnegative("weight_decay", weight_decay)
    check_real("dampening", dampening)
    _validate_projection(eps, delta, wd_ratio)
    if weight_decay != 0 and momentum >= 1:
        raise ValueError(
            f"momentum must be < 1 when weight_decay != 0 (SGDP divides the decay by "
            f"1 - momentum), got momentum={momentum!r}"
        )


def sgdp_init(params, *, lr=None, momentum=0.0, dampening=0.0, weight_decay=0.0,
              nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1,
              project_buffer=True) -> SGDPState:
    """The state before the first step: zero momentum buffers, no projection yet.

    Takes the same keyword arguments as :func:`sgdp_step` (and checks them).
    """
    params = as_param_list(params)
    _validate_sgdp(lr, momentum, dampening, weight_decay, eps, delta, wd_ratio)
    return SGDPState(
        step=0,
        momentum_buffer=tuple(frozen(np.zeros_like(p)) for p in params),
        projection=(None,) * len(params),
        wd_ratio_applied=(1.0,) * len(params),
    )


def sgdp_step(params, grads, state: SGDPState, *, lr, momentum=0.0, dampening=0.0,
              weight_decay=0.0, nesterov=False, eps=1e-8, delta=0.1, wd_ratio=0.1,
              project_buffer=True):
    r"""One SGDP step; returns ``(new_params, new_state)`` and modifies nothing.

    Parameters
    ----------
    params, grads : list of ndarray
        The weights and their gradients.
    state : SGDPState
        From :func:`sgdp_init` or the previous step.
    lr : float
        Learning rate :math:`\eta` (required, as in the official code).
    momentum, dampening, weight_decay, nesterov
        :math:`\mu, \tau, \lambda` and Nesterov momentum, as in ``torch.optim.SGD`` except that
        the weight decay is decoupled (see the module notes).
    eps, delta, wd_ratio
        The projection's :math:`\epsilon`, threshold :math:`\delta` and weight-decay factor.
    project_buffer : bool
        True (default, the official code): without Nesterov, the stored buffer is the projected
        update whenever the projection fires. False: the paper's Algorithm 1, the buffer stays
        unprojected. No effect with ``nesterov=True``. (Not an argument of the official SGDP,
        hence not in :data:`SGDP_DEFAULTS`.)

    Notes
    -----
    .. math::

        b_t = \mu b_{t-1} + (1-\tau) g_t,\quad (u, r_{wd}) = \Pi(w, g_t, g_t + \mu b_t
        \ \text{or}\ b_t),\quad
        w_t = w\,\bigl(1 - \tfrac{\eta\lambda r_{wd}}{1-\mu}\bigr) - \eta u

    and, without Nesterov and with ``project_buffer``, :math:`b_t \leftarrow u`.
    """
    params = as_param_list(params)
    grads = check_grads(params, grads)
    check_buffers(state, "momentum_buffer", params)
    _check_decision_fields(state, params)
    _validate_sgdp(lr, momentum, dampening, weight_decay, eps, delta, wd_ratio)

    new_params, new_buffers, views, ratios = [], [], [], []
    for w, g, buf in zip(params, grads, state.momentum_buffer):
        buf = momentum * buf + (1 - dampening) * g
        update = g + momentum * buf if nesterov else buf
        update, view, ratio = project_update(w, g, update, delta=delta, wd_ratio=wd_ratio,
                                             eps=eps)
        if project_buffer and not nesterov:
            buf = update  # the official code projects d_p = buf in place: the buffer too
        if weight_decay != 0:
            # Decoupled decay; dividing by 1 - mu matches coupled L2 through the buffer, whose
            # steady-state gain is 1/(1 - mu).
            w = w * (1 - lr * weight_decay * ratio / (1 - momentum))
        new_params.append(w - lr * update)
        new_buffers.append(frozen(buf))
        views.append(view)
        ratios.append(ratio)
    return new_params, SGDPState(state.step + 1, tuple(new_buffers), tuple(views), tuple(ratios))


# --------------------------------------------------------------------------------------------
# AdamP


class AdamPState(NamedTuple):
    """The state of AdamP: a value, never modified in place (its arrays are read-only).

    Attributes
    ----------
    step : int
        Number of steps taken, :math:`t`.
    exp_avg, exp_avg_sq : tuple of ndarray
        The moments :math:`m_t`, :math:`v_t` per parameter (not bias-corrected).
    projection : tuple of (str or None)
        Per parameter, the view in which the last step projected, or None.
    wd_ratio_applied : tuple of float
        Per parameter, the factor the last step applied to the weight decay.
    """

    step: int
    exp_avg: tuple
    exp_avg_sq: tuple
    projection: tuple
    wd_ratio_applied: tuple


def _validate_adamp(lr, betas, eps, weight_decay, delta, wd_ratio) -> tuple[float, float]:
    if lr is not None:
        check_nonnegative("lr", lr)
    check_nonnegative("weight_decay", weight_decay)
    _validate_projection(eps, delta, wd_ratio)
    return check_betas(betas)


def adamp_init(params, *, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
               wd_ratio=0.1, nesterov=False) -> AdamPState:
    """The state before the first step: zero moments, no projection yet.

    Takes the same keyword arguments as :func:`adamp_step` (and checks them).
    """
    params = as_param_list(params)
    _validate_adamp(lr, betas, eps, weight_decay, delta, wd_ratio)
    return AdamPState(
        step=0,
        exp_avg=tuple(frozen(np.zeros_like(p)) for p in params),
        exp_avg_sq=tuple(frozen(np.zeros_like(p)) for p in params),
        projection=(None,) * len(params),
        wd_ratio_applied=(1.0,) * len(params),
    )


def adamp_step(params, grads, state: AdamPState, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False):
    r"""One AdamP step; returns ``(new_params, new_state)`` and modifies nothing.

    Parameters
    ----------
    params, grads : list of ndarray
        The weights and their gradients.
    state : AdamPState
        From :func:`adamp_init` or the previous step.
    lr, betas, eps, weight_decay
        As in ``torch.optim.AdamW`` (the decay is decoupled), but the default decay is 0.
    delta, wd_ratio
        The projection's threshold :math:`\delta` and weight-decay factor.
    nesterov : bool
        Use :math:`\beta_1 m_t + (1-\beta_1) g_t` in place of :math:`m_t`.

    Notes
    -----
    .. math::

        (u, r_{wd}) = \Pi\Bigl(w, g_t, \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t}+\epsilon}\Bigr),
        \quad w_t = w(1 - \eta\lambda r_{wd}) - \frac{\eta}{1-\beta_1^t} u
    """
    params = as_param_list(params)
    grads = check_grads(params, grads)
    beta1, beta2 = _validate_adamp(lr, betas, eps, weight_decay, delta, wd_ratio)
    check_buffers(state, "exp_avg", params)
    check_buffers(state, "exp_avg_sq", params)
    _check_decision_fields(state, params)

    t = state.step + 1
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1

    new_params, new_m, new_v, views, ratios = [], [], [], [], []
    for i, (w, g) in enumerate(zip(params, grads)):
        m = beta1 * state.exp_avg[i] + (1 - beta1) * g
        v = beta2 * state.exp_avg_sq[i] + (1 - beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
        if nesterov:
            update = (beta1 * m + (1 - beta1) * g) / denom
        else:
            update = m / denom
        update, view, ratio = project_update(w, g, update, delta=delta, wd_ratio=wd_ratio,
                                             eps=eps)
        if weight_decay > 0:
            # Decoupled (AdamW-style) and, unlike the update, not divided by the bias correction.
            w = w * (1 - lr * weight_decay * ratio)
        new_params.append(w - step_size * update)
        new_m.append(frozen(m))
        new_v.append(frozen(v))
        views.append(view)
        ratios.append(ratio)
    new_state = AdamPState(t, tuple(new_m), tuple(new_v), tuple(views), tuple(ratios))
    return new_params, new_state


# --------------------------------------------------------------------------------------------
# The records: the checks cover a projection in the channel view, one in the layer view only,
# none, and a 1-D parameter that is never projected.


def orthogonal_rows(w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """``z`` with, in each output channel, its component along ``w`` removed.

    The gradient of a per-channel scale-invariant loss has this form; the channel view fires.
    """
    w2, z2 = channel_view(w), channel_view(z)
    coef = np.sum(w2 * z2, axis=1, keepdims=True) / np.sum(w2 * w2, axis=1, keepdims=True)
    return (z2 - coef * w2).reshape(w.shape)


def layer_only_gradient(w: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A gradient orthogonal to the whole of ``w`` but far from orthogonal to its channels.

    Channel 0 gets ``+w_0``, channel 1 gets ``-w_1 * |w_0|^2/|w_1|^2``: both are strongly
    aligned with their channel, so the channel view does not fire, yet the inner products cancel
    over the layer, so the layer view does. (Needs ``w.shape[0] >= 2``.)
    """
    g = orthogonal_rows(w, z)
    w2, g2 = channel_view(w), channel_view(g).copy()
    g2[0] += w2[0]
    g2[1] -= w2[1] * (w2[0] @ w2[0]) / (w2[1] @ w2[1])
    return g2.reshape(w.shape)


def _projection_cases(rng: np.random.Generator):
    """(params, grad_fn, expected views) exercising every branch of the projection."""
    shapes = [(4, 3, 2, 2), (3, 5), (4,)]
    params = [rng.standard_normal(s) for s in shapes]
    noise = [rng.standard_normal(s) for s in shapes]

    def channel(p):  # per-channel scale-invariant weights, and an orthogonal-ish bias gradient
        return [orthogonal_rows(p[0], noise[0]), orthogonal_rows(p[1], noise[1]),
                noise[2] - (noise[2] @ p[2]) / (p[2] @ p[2]) * p[2]]

    def layer(p):
        return [layer_only_gradient(p[0], noise[0]), layer_only_gradient(p[1], noise[1]),
                noise[2]]

    def neither(p):
        return [noise[0] + p[0], noise[1] - p[1], noise[2]]

    yield params, channel, ("channel", "channel", None)
    yield params, layer, ("layer", "layer", None)
    yield params, neither, (None, None, None)


def _expect_views(grad_fn, expected, step, init, hyper, params):
    """Fail loudly (error = inf) if a case does not take the branch it was built for."""
    _, state = step(params, grad_fn(params), init(params, **hyper), **hyper)
    return tuple(state.projection) == tuple(expected)


def _sgdp_check(rng: np.random.Generator) -> float:
    """Max relative error of :func:`sgdp_step` against :func:`_equations.sgdp_reference`."""
    flags = [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9, weight_decay=0.1),
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, wd_ratio=0.3),
        dict(lr=0.05, momentum=0.5, dampening=0.2, eps=1e-6, delta=0.2),
        dict(lr=0.05, momentum=0.9, weight_decay=0.1, project_buffer=False),  # the paper's form
    ]
    cases = []
    for params, grad_fn, expected in _projection_cases(rng):
        for hyper in flags:
            if not _expect_views(grad_fn, expected, sgdp_step, sgdp_init, hyper, params):
                return math.inf
            cases.append((params, grad_fn, hyper, 3))
    return run_check(sgdp_init, sgdp_step, _equations.sgdp_reference, cases,
                     buffer_fields=("momentum_buffer",),
                     decision_fields=("projection", "wd_ratio_applied"))


def _adamp_check(rng: np.random.Generator) -> float:
    """Max relative error of :func:`adamp_step` against :func:`_equations.adamp_reference`."""
    flags = [
        dict(lr=0.01),
        dict(lr=0.01, weight_decay=0.1),
        dict(lr=0.02, betas=(0.8, 0.99), nesterov=True, weight_decay=0.05, wd_ratio=0.5),
        dict(lr=0.01, eps=1e-6, delta=0.2),
    ]
    cases = []
    for params, grad_fn, expected in _projection_cases(rng):
        for hyper in flags:
            if not _expect_views(grad_fn, expected, adamp_step, adamp_init, hyper, params):
                return math.inf
            cases.append((params, grad_fn, hyper, 3))
    return run_check(adamp_init, adamp_step, _equations.adamp_reference, cases,
                     buffer_fields=("exp_avg", "exp_avg_sq"),
                     decision_fields=("projection", "wd_ratio_applied"))


_PAPER = Paper(
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    "Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha",
    2021,
    "arXiv:2006.08217",
)

SGDP_SPEC = OptimizerSpec(
    name="sgdp",
    title="SGDP (SGD with projection for scale-invariant weights)",
    paper=_PAPER,
    init=sgdp_init,
    step=sgdp_step,
    defaults=SGDP_DEFAULTS,
    check=_sgdp_check,
    torch_equivalent=None,
)

ADAMP_SPEC = OptimizerSpec(
    name="adamp",
    title="AdamP (Adam with projection for scale-invariant weights)",
    paper=_PAPER,
    init=adamp_init,
    step=adamp_step,
    defaults=ADAMP_DEFAULTS,
    check=_adamp_check,
    torch_equivalent=None,
)

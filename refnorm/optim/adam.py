r"""Adam and AdamW, as ``torch.optim.Adam`` and ``torch.optim.AdamW`` compute them.

Per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t \ge 1`, with
:math:`m_0 = v_0 = \hat v^{\max}_0 = 0`:

.. math::

    g &\leftarrow -g_t \ \text{if maximize, else}\ g_t \\
    \text{Adam:}\quad g &\leftarrow g + \lambda\,\theta_{t-1}
        \qquad \text{(coupled L2, if } \lambda \ne 0) \\
    \text{AdamW:}\quad \theta_{t-1} &\leftarrow \theta_{t-1}\,(1 - \eta\lambda)
        \qquad \text{(decoupled decay, applied first)} \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g \\
    v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g^2 \\
    v^{\max}_t &= \max(v^{\max}_{t-1}, v_t) \qquad \text{(amsgrad; used in place of } v_t) \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

The last line is :math:`\theta_{t-1} - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)` with the
bias-corrected moments :math:`\hat m_t = m_t/(1-\beta_1^t)`, :math:`\hat v_t = v_t/(1-\beta_2^t)`.

References
----------
Kingma, Ba (2015), "Adam: A Method for Stochastic Optimization", ICLR 2015, arXiv:1412.6980.
Loshchilov, Hutter (2019), "Decoupled Weight Decay Regularization", ICLR 2019, arXiv:1711.05101.
Reddi, Kale, Kumar (2018), "On the Convergence of Adam and Beyond", ICLR 2018 (AMSGrad).

Notes
-----
Where the papers and ``torch.optim`` differ, this module follows the PyTorch source:

* **eps placement.** :math:`\epsilon` is added to :math:`\sqrt{\hat v_t}`, as in Algorithm 1 of
  Kingma & Ba. It is *not* the paper's "efficient" variant (end of its section 2) that adds an
  :math:`\hat\epsilon` to :math:`\sqrt{v_t}` before bias correction, nor TensorFlow's form.
* **AMSGrad.** Reddi et al. keep the running maximum of :math:`v` and use no bias correction.
  PyTorch takes the maximum of the *raw* :math:`v_t` (the docs' pseudo-code says of
  :math:`\hat v_t`) and divides it by the *current* :math:`\sqrt{1-\beta_2^t}`; we follow the
  source.
* **AdamW's decay is multiplied by the learning rate.** In Loshchilov & Hutter's Algorithm 2 the
  decay is :math:`\eta_t \lambda \theta` with :math:`\eta_t` the schedule *multiplier*,
  independent of the base step size :math:`\alpha`. PyTorch uses :math:`\mathrm{lr}\cdot\lambda`,
  with :math:`\mathrm{lr} = \alpha\eta_t`; the two coincide when :math:`\lambda_{\text{torch}} =
  \lambda_{\text{paper}}/\alpha`.
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
    frozen,
    run_check,
)

__all__ = [
    "AdamState", "adam_init", "adam_step", "adamw_init", "adamw_step",
    "ADAM_SPEC", "ADAMW_SPEC", "ADAM_DEFAULTS", "ADAMW_DEFAULTS",
]

#: The defaults of ``torch.optim.Adam`` (torch 2.x).
ADAM_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False
)
#: ``torch.optim.AdamW`` differs only in its default weight decay.
ADAMW_DEFAULTS = dict(ADAM_DEFAULTS, weight_decay=1e-2)


class AdamState(NamedTuple):
    """The state of Adam/AdamW: a value, never modified in place (its arrays are read-only).

    Attributes
    ----------
    step : int
        Number of steps taken, :math:`t`.
    exp_avg, exp_avg_sq : tuple of ndarray
        The moments :math:`m_t` and :math:`v_t`, one per parameter (not bias-corrected).
    max_exp_avg_sq : tuple of ndarray, or None
        :math:`v^{\\max}_t` (the running maximum of the raw :math:`v`) when ``amsgrad``, else None.
    """

    step: int
    exp_avg: tuple
    exp_avg_sq: tuple
    max_exp_avg_sq: tuple | None


def _validate(lr, betas, eps, weight_decay) -> tuple[float, float]:
    if lr is not None:
        check_nonnegative("lr", lr)
    check_nonnegative("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    return check_betas(betas)


def _init(params, lr, betas, eps, weight_decay, amsgrad) -> AdamState:
    params = as_param_list(params)
    _validate(lr, betas, eps, weight_decay)
    return AdamState(
        step=0,
        exp_avg=tuple(frozen(np.zeros_like(p)) for p in params),
        exp_avg_sq=tuple(frozen(np.zeros_like(p)) for p in params),
        max_exp_avg_sq=tuple(frozen(np.zeros_like(p)) for p in params) if amsgrad else None,
    )


def _step(params, grads, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    params = as_param_list(params)
    grads = check_grads(params, grads)
    beta1, beta2 = _validate(lr, betas, eps, weight_decay)
    check_buffers(state, "exp_avg", params)
    check_buffers(state, "exp_avg_sq", params)
    if amsgrad:
        if state.max_exp_avg_sq is None:
            raise ValueError(
                "amsgrad=True but state.max_exp_avg_sq is None: initialise the state with "
                "amsgrad=True"
            )
        check_buffers(state, "max_exp_avg_sq", params)

    t = state.step + 1
    # Bias corrections are Python floats (float64), whatever the parameters' dtype, as in torch.
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1

    new_params, new_m, new_v, new_vmax = [], [], [], []
    for i, (theta, g) in enumerate(zip(params, grads)):
        if maximize:
            g = -g
        if weight_decay != 0:
            if decoupled:
                # AdamW: shrink the weights directly; the decay never enters m or v, so it is not
                # rescaled by the adaptive denominator (the point of Loshchilov & Hutter).
                theta = theta * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * theta
        m = beta1 * state.exp_avg[i] + (1 - beta1) * g
        v = beta2 * state.exp_avg_sq[i] + (1 - beta2) * g * g
        if amsgrad:
            # The maximum of the raw second moment, bias-corrected below by the current step's
            # factor (the PyTorch source, not the docs' max of v-hat).
            vmax = np.maximum(state.max_exp_avg_sq[i], v)
            new_vmax.append(frozen(vmax))
            denom = np.sqrt(vmax) / math.sqrt(bias_correction2) + eps
        else:
            denom = np.sqrt(v) / math.sqrt(bias_correction2) + eps
        new_params.append(theta - step_size * (m / denom))
        new_m.append(frozen(m))
        new_v.append(frozen(v))
    new_state = AdamState(
        step=t,
        exp_avg=tuple(new_m),
        exp_avg_sq=tuple(new_v),
        max_exp_avg_sq=tuple(new_vmax) if amsgrad else None,
    )
    return new_params, new_state


def adam_init(params, *, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              amsgrad=False, maximize=False) -> AdamState:
    """The state before the first step: zero moments (and a zero running maximum if amsgrad).

    Takes the same keyword arguments as :func:`adam_step` (and checks them).
    """
    return _init(params, lr, betas, eps, weight_decay, amsgrad)


def adam_step(params, grads, state: AdamState, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, amsgrad=False, maximize=False):
    r"""One Adam step (coupled L2 weight decay); returns ``(new_params, new_state)``.

    Parameters
    ----------
    params, grads : list of ndarray
        The parameters :math:`\theta_{t-1}` and their gradients :math:`g_t`.
    state : AdamState
        From :func:`adam_init` or the previous step.
    lr, betas, eps, weight_decay, amsgrad, maximize
        As in ``torch.optim.Adam``.

    Notes
    -----
    .. math::

        g \leftarrow \pm g_t + \lambda\theta_{t-1},\quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2,\quad
        \theta_t = \theta_{t-1} - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
    """
    return _step(params, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 amsgrad=amsgrad, maximize=maximize, decoupled=False)


def adamw_init(params, *, lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
               amsgrad=False, maximize=False) -> AdamState:
    """The state before the first step (same as :func:`adam_init`)."""
    return _init(params, lr, betas, eps, weight_decay, amsgrad)


def adamw_step(params, grads, state: AdamState, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
               weight_decay=1e-2, amsgrad=False, maximize=False):
    r"""One AdamW step (decoupled weight decay); returns ``(new_params, new_state)``.

    Notes
    -----
    .. math::

        \theta' = \theta_{t-1}(1 - \eta\lambda),\quad
        \theta_t = \theta' - \eta\,\frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    with :math:`m, v` built from :math:`\pm g_t` alone. See the module notes for the difference
    from the paper's :math:`\eta_t\lambda`.
    """
    return _step(params, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 amsgrad=amsgrad, maximize=maximize, decoupled=True)


# --------------------------------------------------------------------------------------------
# The records


def _check_cases(rng: np.random.Generator, decoupled: bool):
    shapes = [(3, 4), (5,), (2, 2, 3)]
    params = [rng.standard_normal(s) for s in shapes]
    scales = [rng.uniform(0.1, 10.0, s) for s in shapes]  # uneven curvature: Adam's point

    def grad_fn(p):
        return [a * x + np.cos(x) for a, x in zip(scales, p)]

    flags = [
        dict(lr=0.01),
        dict(lr=0.01, amsgrad=True),
        dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True),
    ]
    for hyper in flags:
        if decoupled:
            hyper = dict(ADAMW_DEFAULTS, **hyper)
        yield params, grad_fn, hyper, 5


def _make_check(step, init, decoupled: bool):
    def reference(params, grads_seq, **hyper):
        return _equations.adam_reference(params, grads_seq, decoupled=decoupled, **hyper)

    def check(rng: np.random.Generator) -> float:
        return run_check(init, step, reference, _check_cases(rng, decoupled),
                         buffer_fields=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))

    check.__doc__ = (f"Max relative error of {step.__name__} against "
                     "refnorm.optim._equations.adam_reference.")
    return check


ADAM_SPEC = OptimizerSpec(
    name="adam",
    title="Adam (with optional AMSGrad)",
    paper=Paper("Adam: A Method for Stochastic Optimization", "Kingma, Ba", 2015,
                "arXiv:1412.6980"),
    init=adam_init,
    step=adam_step,
    defaults=ADAM_DEFAULTS,
    check=_make_check(adam_step, adam_init, decoupled=False),
    torch_equivalent="torch.optim.Adam",
)

ADAMW_SPEC = OptimizerSpec(
    name="adamw",
    title="AdamW (Adam with decoupled weight decay)",
    paper=Paper("Decoupled Weight Decay Regularization", "Loshchilov, Hutter", 2019,
                "arXiv:1711.05101"),
    init=adamw_init,
    step=adamw_step,
    defaults=ADAMW_DEFAULTS,
    check=_make_check(adamw_step, adamw_init, decoupled=True),
    torch_equivalent="torch.optim.AdamW",
)

r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD`` computes it.

Per parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t \ge 1`:

.. math::

    g &\leftarrow -g_t \ \text{if maximize, else}\ g_t \\
    g &\leftarrow g + \lambda\,\theta_{t-1}
        \qquad \text{(coupled L2 weight decay, if } \lambda \ne 0) \\
    b_t &= \begin{cases} g & t = 1 \\ \mu\, b_{t-1} + (1 - \tau)\, g & t > 1 \end{cases}
        \qquad \text{(if } \mu \ne 0) \\
    d &= \begin{cases} g + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases} \\
    \theta_t &= \theta_{t-1} - \eta\, d

with learning rate :math:`\eta`, momentum :math:`\mu`, dampening :math:`\tau` and weight decay
:math:`\lambda`. Without momentum, :math:`d = g`.

References
----------
Momentum: Polyak (1964), "Some methods of speeding up the convergence of iteration methods".
Nesterov momentum in deep learning: Sutskever, Martens, Dahl, Hinton (2013), "On the importance of
initialization and momentum in deep learning", ICML 2013.

Notes
-----
This follows the ``torch.optim.SGD`` source, which differs from the papers in three ways:

* **Learning rate outside the buffer.** Sutskever et al. write :math:`v \leftarrow \mu v - \eta g`,
  :math:`\theta \leftarrow \theta + v`; PyTorch keeps :math:`\eta` out of the buffer. The two agree
  for a constant learning rate and differ as soon as a schedule changes :math:`\eta`.
* **Nesterov** is the reformulation in terms of the current parameters (the gradient is taken at
  :math:`\theta_{t-1}`, not at the look-ahead point), as in the PyTorch docs.
* **The first step is not dampened:** the buffer starts as a copy of the gradient, not as
  :math:`(1-\tau)g`. (SGDP's official code starts it at zero instead; see
  :mod:`refnorm.optim.adamp`.)
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..registry import OptimizerSpec, Paper
from . import _equations
from ._common import (
    as_param_list,
    check_buffers,
    check_grads,
    check_nonnegative,
    check_real,
    frozen,
    run_check,
)

__all__ = ["SGDState", "sgd_init", "sgd_step", "SPEC", "DEFAULTS"]

#: The defaults of ``torch.optim.SGD`` (torch 2.x).
DEFAULTS = dict(
    lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
)


class SGDState(NamedTuple):
    """The state of SGD: a value, never modified in place (its arrays are read-only).

    Attributes
    ----------
    step : int
        Number of steps taken.
    momentum_buffer : tuple of (ndarray or None)
        One buffer :math:`b_t` per parameter; ``None`` before the first step (the first step
        *copies* the gradient into it) and whenever ``momentum == 0``.
    """

    step: int
    momentum_buffer: tuple


def _validate(lr, momentum, dampening, weight_decay, nesterov) -> None:
    if lr is not None:
        check_nonnegative("lr", lr)
    check_nonnegative("momentum", momentum)
    check_nonnegative("weight_decay", weight_decay)
    check_real("dampening", dampening)
    # torch refuses the combination: Nesterov's look-ahead needs a momentum, and its derivation
    # assumes an undampened buffer.
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"nesterov=True requires momentum > 0 and dampening == 0, got momentum={momentum!r}, "
            f"dampening={dampening!r}"
        )


def sgd_init(
    params,
    *,
    lr: float | None = None,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> SGDState:
    """The state before the first step: no momentum buffers yet.

    Takes the same keyword arguments as :func:`sgd_step` (and checks them), so that one dict of
    hyper-parameters serves both.
    """
    params = as_param_list(params)
    _validate(lr, momentum, dampening, weight_decay, nesterov)
    return SGDState(step=0, momentum_buffer=(None,) * len(params))


def sgd_step(
    params,
    grads,
    state: SGDState,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> tuple[list[np.ndarray], SGDState]:
    r"""One SGD step; returns ``(new_params, new_state)`` and modifies nothing.

    Parameters
    ----------
    params, grads : list of ndarray
        The parameters :math:`\theta_{t-1}` and their gradients, one array each, same shapes.
    state : SGDState
        From :func:`sgd_init` or the previous step.
    lr, momentum, dampening, weight_decay, nesterov, maximize
        As in ``torch.optim.SGD``: :math:`\eta, \mu, \tau, \lambda`; ``maximize`` ascends.

    Returns
    -------
    new_params : list of ndarray
    new_state : SGDState

    Notes
    -----
    .. math::

        g \leftarrow \pm g_t + \lambda\theta_{t-1}, \quad
        b_t = \mu b_{t-1} + (1-\tau) g \ (b_1 = g), \quad
        \theta_t = \theta_{t-1} - \eta\,(g + \mu b_t \ \text{or}\ b_t)
    """
    params = as_param_list(params)
    grads = check_grads(params, grads)
    check_buffers(state, "momentum_buffer", params, allow_none=True)
    _validate(lr, momentum, dampening, weight_decay, nesterov)

    new_params, new_buffers = [], []
    for theta, g, buf in zip(params, grads, state.momentum_buffer):
        d = -g if maximize else g  # maximizing f is minimizing -f
        if weight_decay != 0:
            # Coupled L2: the decay enters the gradient, so momentum accumulates it too.
            d = d + weight_decay * theta
        if momentum != 0:
            if buf is None:
                buf = np.array(d, copy=True)  # first step: b_1 = g, no dampening
            else:
                buf = momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
            new_buffers.append(frozen(buf))
        else:
            new_buffers.append(None)
        new_params.append(theta - lr * d)
    return new_params, SGDState(step=state.step + 1, momentum_buffer=tuple(new_buffers))


# --------------------------------------------------------------------------------------------
# The record


def _check_cases(rng: np.random.Generator):
    shapes = [(3, 4), (5,), (2, 2, 3)]
    params = [rng.standard_normal(s) for s in shapes]
    flags = [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
        dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
        dict(lr=0.02, momentum=0.5, maximize=True),
    ]

    def grad_fn(p):
        # A smooth nonlinear gradient field: every term of the update is exercised.
        return [0.5 * x + np.sin(x) for x in p]

    for hyper in flags:
        yield params, grad_fn, hyper, 4


def _check(rng: np.random.Generator) -> float:
    """Max relative error of :func:`sgd_step` against
    :func:`refnorm.optim._equations.sgd_reference`."""
    return run_check(
        sgd_init, sgd_step, _equations.sgd_reference, _check_cases(rng),
        buffer_fields=("momentum_buffer",),
    )


SPEC = OptimizerSpec(
    name="sgd",
    title="SGD with momentum (PyTorch convention)",
    paper=Paper(
        "On the importance of initialization and momentum in deep learning",
        "Sutskever, Martens, Dahl, Hinton",
        2013,
        "ICML 2013, PMLR 28(3):1139-1147",
    ),
    init=sgd_init,
    step=sgd_step,
    defaults=DEFAULTS,
    check=_check,
    torch_equivalent="torch.optim.SGD",
)

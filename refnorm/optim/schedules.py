r"""Learning-rate schedules as closed forms: ``schedule.lr_at(t)`` is the learning rate of step t.

Each schedule is a small frozen dataclass; calling it is the same as ``lr_at``. Step ``t = 0`` is
the first optimizer step, and ``lr_at(t)`` equals ``optimizer.param_groups[0]["lr"]`` after ``t``
calls of ``scheduler.step()`` for the ``torch.optim.lr_scheduler`` class of the same name (PyTorch
computes most of them recursively, by multiplying the previous value; the closed forms agree with
those to rounding).

==========================  =================================================================
schedule                    :math:`\eta_t`
==========================  =================================================================
:class:`StepLR`             :math:`\eta_0\,\gamma^{\lfloor t/s\rfloor}`
:class:`CosineAnnealingLR`  :math:`\eta_{\min}+(\eta_0-\eta_{\min})\frac{1+\cos(\pi t/T)}{2}`
:class:`LinearLR`           :math:`\eta_0\,\bigl(f_0 + (f_1-f_0)\min(t,T)/T\bigr)` (linear warm-up)
:class:`SequentialLR`       one schedule after another, each restarted at its milestone
==========================  =================================================================

:func:`warmup_cosine` builds the common linear warm-up followed by cosine decay.

References
----------
Loshchilov, Hutter (2017), "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017,
arXiv:1608.03983 (cosine annealing). Goyal et al. (2017), "Accurate, Large Minibatch SGD: Training
ImageNet in 1 Hour", arXiv:1706.02677 (linear warm-up).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._common import check_nonnegative

__all__ = ["StepLR", "CosineAnnealingLR", "LinearLR", "SequentialLR", "warmup_cosine"]


def _check_step(t) -> int:
    if int(t) != t or t < 0:
        raise ValueError(f"step must be an integer >= 0, got {t!r}")
    return int(t)


def _check_positive_int(name: str, value) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class _Schedule:
    """Shared behaviour: ``schedule(t) == schedule.lr_at(t)``, ``schedule.values(n)``."""

    def lr_at(self, t: int) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, t: int) -> float:
        return self.lr_at(t)

    def values(self, n: int) -> np.ndarray:
        """The learning rates of steps ``0 .. n-1``."""
        return np.array([self.lr_at(t) for t in range(n)], dtype=np.float64)


@dataclass(frozen=True)
class StepLR(_Schedule):
    r"""Multiply by ``gamma`` every ``step_size`` steps: :math:`\eta_t = \eta_0\gamma^{\lfloor
    t/s\rfloor}` (``torch.optim.lr_scheduler.StepLR``)."""

    base_lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        check_nonnegative("base_lr", self.base_lr)
        _check_positive_int("step_size", self.step_size)
        check_nonnegative("gamma", self.gamma)

    def lr_at(self, t: int) -> float:
        t = _check_step(t)
        return self.base_lr * self.gamma ** (t // self.step_size)


@dataclass(frozen=True)
class CosineAnnealingLR(_Schedule):
    r"""Half a cosine from ``base_lr`` down to ``eta_min`` over ``T_max`` steps
    (``torch.optim.lr_scheduler.CosineAnnealingLR``; like it, the curve continues periodically
    after ``T_max``, rising again).

    .. math:: \eta_t = \eta_{\min} + (\eta_0 - \eta_{\min})\,\frac{1 + \cos(\pi t / T_{\max})}{2}
    """

    base_lr: float
    T_max: int
    eta_min: float = 0.0

    def __post_init__(self):
        check_nonnegative("base_lr", self.base_lr)
        _check_positive_int("T_max", self.T_max)
        check_nonnegative("eta_min", self.eta_min)

    def lr_at(self, t: int) -> float:
        t = _check_step(t)
        cosine = (1 + math.cos(math.pi * t / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cosine


@dataclass(frozen=True)
class LinearLR(_Schedule):
    r"""Linear warm-up: the factor goes from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then stays (``torch.optim.lr_scheduler.LinearLR``, same defaults).

    .. math:: \eta_t = \eta_0\Bigl(f_0 + (f_1 - f_0)\,\frac{\min(t, T)}{T}\Bigr)
    """

    base_lr: float
    start_factor: float = 1.0 / 3
    end_factor: float = 1.0
    total_iters: int = 5

    def __post_init__(self):
        check_nonnegative("base_lr", self.base_lr)
        # torch's ranges: a zero start factor would make its recursive form divide by zero.
        if not 0 < self.start_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1], got {self.start_factor!r}")
        if not 0 <= self.end_factor <= 1:
            raise ValueError(f"end_factor must be in [0, 1], got {self.end_factor!r}")
        _check_positive_int("total_iters", self.total_iters)

    def lr_at(self, t: int) -> float:
        t = _check_step(t)
        fraction = min(t, self.total_iters) / self.total_iters
        return self.base_lr * (
            self.start_factor + (self.end_factor - self.start_factor) * fraction
        )


@dataclass(frozen=True)
class SequentialLR(_Schedule):
    """Run ``schedules[0]`` until ``milestones[0]``, then ``schedules[1]`` restarted at step 0, ...
    (``torch.optim.lr_scheduler.SequentialLR``)."""

    schedules: Sequence[_Schedule]
    milestones: Sequence[int]

    def __post_init__(self):
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if len(self.milestones) != len(self.schedules) - 1:
            raise ValueError(
                f"milestones must have one entry fewer than schedules: got {len(self.milestones)}"
                f" milestones for {len(self.schedules)} schedules"
            )
        if list(self.milestones) != sorted(self.milestones) or any(m < 0 for m in self.milestones):
            raise ValueError(f"milestones must be increasing and >= 0, got {self.milestones!r}")

    def lr_at(self, t: int) -> float:
        t = _check_step(t)
        i = bisect.bisect_right(self.milestones, t)
        start = self.milestones[i - 1] if i > 0 else 0
        return self.schedules[i].lr_at(t - start)


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int, *,
                  start_factor: float = 1e-3, eta_min: float = 0.0) -> SequentialLR:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to ``eta_min`` at step
    ``total_steps``.

    The same as ``SequentialLR([LinearLR(...), CosineAnnealingLR(T_max=total_steps -
    warmup_steps)], milestones=[warmup_steps])`` in PyTorch; like it, the cosine rises again
    after ``total_steps``.
    """
    _check_positive_int("warmup_steps", warmup_steps)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps must be greater than warmup_steps, got {total_steps!r} <= "
            f"{warmup_steps!r}"
        )
    return SequentialLR(
        (LinearLR(base_lr, start_factor, 1.0, warmup_steps),
         CosineAnnealingLR(base_lr, total_steps - warmup_steps, eta_min)),
        (warmup_steps,),
    )

r"""The effective step size :math:`\eta_t/\lVert w_t\rVert^2` of scale-invariant weights.

For a scale-invariant loss (:math:`f(cw) = f(w)`, e.g. a weight followed by a normalization) only
the direction :math:`\hat w = w/\lVert w\rVert` matters, and :math:`\nabla f(w) = \nabla_{\hat w}
f/\lVert w\rVert` is orthogonal to :math:`w`. A gradient step :math:`w_{t+1} = w_t - \eta g_t`
moves the direction by

.. math::

    \hat w_{t+1} - \hat w_t \approx -\frac{\eta}{\lVert w_t\rVert^2}\, \nabla_{\hat w} f(\hat w_t),

so on the sphere the learning rate is in effect :math:`\eta/\lVert w_t\rVert^2`, and it shrinks as
the norm grows: :math:`\lVert w_{t+1}\rVert^2 = \lVert w_t\rVert^2 + \eta^2\lVert g_t\rVert^2`
for plain GD, faster with momentum (Heo et al. 2021, arXiv:2006.08217; also van Laarhoven 2017,
arXiv:1706.05350). For Adam-type updates, whose size does not scale as
:math:`1/\lVert w\rVert`, the angular step is about :math:`\eta\lVert u\rVert/\lVert w\rVert`
and the relevant quantity is :math:`\eta/\lVert w_t\rVert` (``power=1``).

The functions here take a trajectory and return one number per step and per parameter; the AdamP
tutorial plots them. :func:`angular_update` needs no assumption about the optimizer.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["weight_norms", "effective_step_size", "angular_update", "pairs_from_records"]


def _pairs(trajectory: Iterable[Any]) -> list[tuple[float, list[np.ndarray]]]:
    pairs = []
    for item in trajectory:
        if isinstance(item, dict):
            lr, params = item["lr"], item["params"]
        else:
            lr, params = item
        pairs.append((float(lr), [np.asarray(p) for p in params]))
    return pairs


def weight_norms(params_seq: Iterable[Sequence[np.ndarray]]) -> np.ndarray:
    r"""``out[t, i]`` = :math:`\lVert w^{(i)}_t\rVert_2`, the Frobenius norm of parameter ``i``."""
    return np.array([[np.linalg.norm(np.ravel(p)) for p in params] for params in params_seq],
                    dtype=np.float64)


def effective_step_size(trajectory: Iterable[Any], *, power: float = 2) -> np.ndarray:
    r"""``out[t, i]`` = :math:`\eta_t / \lVert w^{(i)}_t\rVert^{\text{power}}`.

    Parameters
    ----------
    trajectory : iterable of ``(lr, params)`` pairs, or of dicts with ``"lr"`` and ``"params"``
        :math:`\eta_t` and the weights :math:`w_t` that step ``t`` is applied to (the weights
        *before* the step; see :func:`pairs_from_records` for the records of
        :func:`refnorm.optim.trajectory.run_trajectory`, which hold the weights after it).
    power : float
        2 for SGD-type updates (the default), 1 for Adam-type updates (see the module docstring).

    Returns
    -------
    ndarray of shape ``(steps, n_params)``; ``inf`` where a weight is zero.
    """
    pairs = _pairs(trajectory)
    if not pairs:
        return np.zeros((0, 0))
    norms = weight_norms([params for _, params in pairs])
    lrs = np.array([lr for lr, _ in pairs], dtype=np.float64)[:, None]
    with np.errstate(divide="ignore"):
        return lrs / norms**power


def angular_update(params_seq: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    r"""``out[t, i]`` = the angle in radians between :math:`w^{(i)}_t` and :math:`w^{(i)}_{t+1}`,
    :math:`\arccos\bigl(\langle w_t, w_{t+1}\rangle/(\lVert w_t\rVert\,
    \lVert w_{t+1}\rVert)\bigr)`."""
    out = []
    for before, after in zip(params_seq[:-1], params_seq[1:]):
        row = []
        for a, b in zip(before, after):
            a, b = np.ravel(a), np.ravel(b)
            cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
            row.append(np.arccos(np.clip(cos, -1.0, 1.0)))
        out.append(row)
    return np.array(out, dtype=np.float64).reshape(len(out), -1)


def pairs_from_records(initial_params: Sequence[np.ndarray],
                       records: Sequence[dict]) -> list[tuple[float, list[np.ndarray]]]:
    """``(lr_t, w_t)`` for each step of a :func:`~refnorm.optim.trajectory.run_trajectory` run.

    Record ``t`` holds the weights *after* step ``t``; the step's learning rate applies to the
    weights before it, i.e. ``initial_params`` for the first step and record ``t - 1`` after that.
    """
    before = [list(initial_params)] + [r["params"] for r in records[:-1]]
    return [(r["lr"], w) for r, w in zip(records, before)]

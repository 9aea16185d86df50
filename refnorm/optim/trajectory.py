"""Optimizer trajectories for golden files: parameters, state and decisions after every step.

:func:`run_trajectory` runs any optimizer record from given parameters and a deterministic gradient
function, and returns one plain dict per step. :func:`stack_trajectory` turns those into one flat
``{name: ndarray}`` dict, ready for ``np.savez`` (no object arrays, so loading never needs
``allow_pickle``) or for JSON after ``.tolist()``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..registry import OptimizerSpec
from ._common import as_param_list

__all__ = ["run_trajectory", "stack_trajectory", "DECISION_FIELDS"]

#: State fields that record decisions rather than buffers (SGDP, AdamP).
DECISION_FIELDS = ("projection", "wd_ratio_applied")


def _state_record(state: Any) -> dict[str, Any]:
    """The state's buffers as ``{field: [array per parameter]}`` plus ``"step"``.

    Fields that are None (no AMSGrad buffer) or all-None (SGD without momentum) are left out.
    """
    out: dict[str, Any] = {}
    for field, value in state._asdict().items():
        if field in DECISION_FIELDS or value is None:
            continue
        if field == "step":
            out["step"] = int(value)
        elif all(v is None for v in value):
            continue
        else:
            out[field] = [None if v is None else np.array(v, copy=True) for v in value]
    return out


def run_trajectory(spec: OptimizerSpec, params: Sequence[np.ndarray],
                   grad_fn: Callable[[list[np.ndarray]], Sequence[np.ndarray]], steps: int,
                   **hyper) -> list[dict[str, Any]]:
    """Run ``steps`` steps of ``spec`` and record everything after each one.

    Parameters
    ----------
    spec : OptimizerSpec
        The optimizer, e.g. ``refnorm.optim.BY_NAME["adamp"]``.
    params : list of ndarray
        The initial parameters (not modified).
    grad_fn : callable
        ``grad_fn(params) -> grads``; must be deterministic for the trajectory to be.
    steps : int
        Number of steps.
    **hyper
        The optimizer's hyper-parameters, on top of ``spec.defaults``. ``lr`` may be a number
        or a schedule (any callable ``t -> lr``, e.g. :mod:`refnorm.optim.schedules`).

    Returns
    -------
    list of dict, one per step ``t = 1 .. steps``, with keys

    ``"step"`` (int), ``"lr"`` (float, the learning rate of this step), ``"grads"`` (the gradients
    used, at the parameters before the step), ``"params"`` (after the step), ``"state"`` (the
    buffers after the step, ``{field: [array per parameter]}``, and ``"step"``) and, for
    optimizers that project (SGDP, AdamP), ``"projection"`` (per parameter ``"channel"``,
    ``"layer"`` or ``"none"``) and ``"wd_ratio_applied"`` (per parameter, float).
    All arrays are fresh copies.
    """
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    hyper = {**spec.defaults, **hyper}
    lr = hyper.pop("lr", None)
    if lr is None:
        raise ValueError(f"lr is required for {spec.name!r}")
    schedule = lr if callable(lr) else None
    params = [np.array(p, copy=True) for p in as_param_list(params)]
    state = spec.init(params, **hyper)

    records = []
    for t in range(int(steps)):
        lr_t = float(schedule(t)) if schedule is not None else float(lr)
        grads = [np.array(g, dtype=p.dtype, copy=True) for g, p in zip(grad_fn(params), params)]
        params, state = spec.step(params, grads, state, lr=lr_t, **hyper)
        record = {
            "step": t + 1,
            "lr": lr_t,
            "grads": grads,
            "params": [np.array(p, copy=True) for p in params],
            "state": _state_record(state),
        }
        if hasattr(state, "projection"):
            record["projection"] = ["none" if v is None else v for v in state.projection]
            record["wd_ratio_applied"] = [float(r) for r in state.wd_ratio_applied]
        records.append(record)
    return records


def stack_trajectory(records: Sequence[dict[str, Any]],
                     initial_params: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One flat dict of arrays, each stacked over the steps (first axis = step).

    Keys: ``"step"``, ``"lr"``, ``"params/<i>"``, ``"grads/<i>"``, ``"state/<field>/<i>"``, and for
    SGDP/AdamP ``"projection/<i>"`` (strings) and ``"wd_ratio_applied/<i>"``; with
    ``initial_params``, also ``"initial_params/<i>"``. Suitable for ``np.savez``.
    """
    out: dict[str, np.ndarray] = {}
    if initial_params is not None:
        for i, p in enumerate(initial_params):
            out[f"initial_params/{i}"] = np.array(p, copy=True)
    if not records:
        return out
    out["step"] = np.array([r["step"] for r in records], dtype=np.int64)
    out["lr"] = np.array([r["lr"] for r in records], dtype=np.float64)
    n = len(records[0]["params"])
    for key in ("params", "grads"):
        for i in range(n):
            out[f"{key}/{i}"] = np.stack([r[key][i] for r in records])
    for field, buffers in records[0]["state"].items():
        if field == "step":
            continue
        for i, b in enumerate(buffers):
            if b is not None:
                out[f"state/{field}/{i}"] = np.stack([r["state"][field][i] for r in records])
    for field in DECISION_FIELDS:
        if field in records[0]:
            for i in range(n):
                out[f"{field}/{i}"] = np.array([r[field][i] for r in records])
    return out

"""Optimizers for normalized networks, as pure functions on lists of NumPy arrays.

Each optimizer is a pair ``<name>_init(params, **hyper) -> state`` and
``<name>_step(params, grads, state, **hyper) -> (new_params, new_state)``. Nothing is modified in
place; the state is an inspectable NamedTuple whose arrays are read-only. Hyper-parameter names and
defaults follow ``torch.optim`` (SGD, Adam, AdamW) and the official AdamP code (SGDP, AdamP).

Each optimizer also has a record (:class:`refnorm.registry.OptimizerSpec`), listed in
:data:`ALL_OPTIMIZERS`; ``spec.check(rng)`` compares the implementation with its equations written
independently (:mod:`refnorm.optim._equations`).

Also here: learning-rate schedules (:mod:`~refnorm.optim.schedules`), the effective step size of
scale-invariant weights (:mod:`~refnorm.optim.effective_step`) and trajectories for golden files
(:mod:`~refnorm.optim.trajectory`).
"""
from . import adam, adamp, schedules, sgd  # noqa: F401  (the submodules, for users)
from .adam import AdamState, adam_init, adam_step, adamw_init, adamw_step
from .adamp import (
    AdamPState,
    SGDPState,
    adamp_init,
    adamp_step,
    project_update,
    sgdp_init,
    sgdp_step,
)
from .effective_step import angular_update, effective_step_size, pairs_from_records, weight_norms
from .schedules import CosineAnnealingLR, LinearLR, SequentialLR, StepLR, warmup_cosine
from .sgd import SGDState, sgd_init, sgd_step
from .trajectory import run_trajectory, stack_trajectory

#: Every optimizer record, in a fixed order.
ALL_OPTIMIZERS = (
    sgd.SPEC,
    adam.ADAM_SPEC,
    adam.ADAMW_SPEC,
    adamp.SGDP_SPEC,
    adamp.ADAMP_SPEC,
)

#: The records by name: ``BY_NAME["adamp"]``.
BY_NAME = {spec.name: spec for spec in ALL_OPTIMIZERS}

__all__ = [
    "ALL_OPTIMIZERS", "BY_NAME",
    "SGDState", "sgd_init", "sgd_step",
    "AdamState", "adam_init", "adam_step", "adamw_init", "adamw_step",
    "SGDPState", "sgdp_init", "sgdp_step", "AdamPState", "adamp_init", "adamp_step",
    "project_update",
    "StepLR", "CosineAnnealingLR", "LinearLR", "SequentialLR", "warmup_cosine",
    "effective_step_size", "weight_norms", "angular_update", "pairs_from_records",
    "run_trajectory", "stack_trajectory",
]

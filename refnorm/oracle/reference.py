"""The reference answer for a case, and the emulation of a correct low-precision kernel.

:func:`compute` runs the variant's own float64 forward and hand-derived backward (two-pass
statistics with a correction pass, see :mod:`refnorm.norms._stats`) on the case's inputs, which
are exactly the candidate's inputs cast back up. Its outputs, by name:

* ``y`` (and the record's other outputs by name: ``s`` for the fused residual-add norms);
  ``d<name>`` for every present differentiable input (``dx``, ``dweight``, ``dbias``);
* for a stateful variant, every float field of the new state (``running_mean``, ...);
* ``mean`` and ``rstd`` when the forward saves them (the statistics a kernel's backward reuses).

:func:`emulate` computes what a *correct* kernel in the candidate dtype would return: the same
algorithm run in the accumulation format (float32 for float32, float16 and bfloat16
candidates), with the outputs rounded once to the candidate dtype. Its distance from the
float64 reference is rounding error that no correct kernel avoids; a candidate far beyond it
has a bug, however large the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refnorm.norms._stats import native_precision
from refnorm.oracle.formats import FORMATS, get_format, round_to

__all__ = ["Reference", "compute", "emulate", "state_dict", "STAT_NAMES"]

STAT_NAMES = ("mean", "rstd")


def state_dict(state) -> dict:
    """A new state (NamedTuple, dict or None) as a dict of its fields."""
    if state is None:
        return {}
    if isinstance(state, dict):
        return dict(state)
    if hasattr(state, "_asdict"):
        return dict(state._asdict())
    return {"state": state}


@dataclass
class Reference:
    """The float64 answer for one case."""

    outputs: dict                                  # name -> float64 array
    exact: dict = field(default_factory=dict)      # non-float state fields, compared exactly
    cache: object = None
    required: tuple = ()                           # the names a candidate must return

    def __getitem__(self, key):
        return self.outputs[key]


def _outputs(spec, case, y, state, cache, grads, dtype=np.float64):
    outs = {name: np.asarray(v, dtype) for name, v in zip(spec.outputs, spec.output_values(y))}
    required = list(spec.outputs)
    for name, g, a in zip(spec.diff_argnames, grads, case.arrays):
        if a is not None and g is not None:
            outs["d" + name] = np.asarray(g, dtype)
            required.append("d" + name)
    exact = {}
    for key, value in state_dict(state).items():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            outs[key] = np.asarray(value, dtype)
        elif isinstance(value, (float, np.floating)):
            outs[key] = np.asarray(value, dtype)
        elif value is not None:
            exact[key] = value
    for key in STAT_NAMES:
        value = getattr(cache, key, None)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and key not in outs:
            outs[key] = np.asarray(value, dtype)
    return outs, exact, tuple(required)


def compute(spec, case) -> Reference:
    """The float64 reference: the record's forward and backward on the case's inputs."""
    sample = case.sample
    with np.errstate(all="ignore"):  # non-finite cases produce NaN on purpose
        y, state, cache = spec.run(sample)
        grads = spec.backward(spec.upstream(case.upstream), cache)
    outs, exact, required = _outputs(spec, case, y, state, cache, grads)
    for a in outs.values():
        a.setflags(write=False)
    return Reference(outs, exact, cache, required)


def emulate(spec, case, accumulate=None, *, rounded=True) -> dict | None:
    """The outputs of a correct kernel in ``case.dtype``: computed in ``accumulate`` (default:
    the dtype's accumulator, float32 below float64) and rounded once to ``case.dtype``.

    Returns None for float64 candidates (the reference itself) or if the variant's code
    cannot run in the accumulation format. ``rounded=False`` keeps the accumulation format's
    results (cast to float64), before the rounding to ``case.dtype``.
    """
    fmt = get_format(case.dtype)
    acc = np.dtype(accumulate or fmt.accumulate)
    if fmt.name == "float64" and acc == np.float64:
        return None

    def cast(v):
        return v.astype(acc) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v

    arrays = tuple(None if a is None else a.astype(acc) for a in case.arrays)
    kwargs = {k: cast(v) for k, v in case.kwargs.items()}
    try:
        # native_precision: in the accumulation format only, as the kernel computes (refnorm
        # would otherwise redo out-of-range groups in a wider dtype)
        with np.errstate(all="ignore"), native_precision():
            y, state, cache = spec.run(case.sample._replace(arrays=arrays, kwargs=kwargs))
            grads = spec.backward(spec.upstream(d.astype(acc) for d in case.upstream), cache)
    except Exception:  # noqa: BLE001 - a variant whose code is float64-only has no emulation
        return None
    outs, _, _ = _outputs(spec, case, y, state, cache, grads)
    return {k: round_to(v, output_format(spec, case, k)) if rounded else v
            for k, v in outs.items()}


#: The fused residual-add records and the norm each applies to s = x + residual
FUSED_ADD = {"add_rms_norm": "rms_norm", "add_layer_norm": "layer_norm"}


def residual_format(case):
    """The format of the residual sum ``s`` a correct candidate returns: float32 with
    ``residual_in_fp32`` (for candidates below float32), else the candidate dtype."""
    fmt = get_format(case.dtype)
    if case.kwargs.get("residual_in_fp32") and fmt.u > FORMATS["float32"].u:
        return FORMATS["float32"]
    return fmt


def output_format(spec, case, key):
    """The format a correct candidate returns output ``key`` in: the candidate dtype, except
    the residual sum ``s`` of a fused residual-add norm (:func:`residual_format`)."""
    if spec.name in FUSED_ADD and key == "s":
        return residual_format(case)
    return get_format(case.dtype)

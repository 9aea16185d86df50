"""Parity with PyTorch, float64 on the CPU: forward, every gradient and the new running state.

Every sample and oracle input of every variant with a ``torch_call``. The bar is 1e-12
relative (normwise). Where the two differ by more, refnorm must be the more accurate one: both
are compared against refnorm's own algorithm run in ``np.longdouble`` (80-bit extended on x86),
whose rounding error is about 2,000 times smaller, and refnorm must be at least as close.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from refnorm.norms import ALL_SPECS
from refnorm.verify import normwise as _normwise

SEED = 99


def _params():
    params = []
    for spec in ALL_SPECS:
        if spec.torch_call is None:
            continue
        for kind in ("sample_inputs", "oracle_inputs"):
            make = getattr(spec, kind)
            for sample in (make(np.random.default_rng(SEED)) if make else ()):
                params.append(pytest.param(spec, sample, id=f"{spec.name}-{kind[:6]}-{sample.name}"))
    return params


def normwise(a, b):
    """The normwise relative error, in extended precision (the references are long double)."""
    return _normwise(a, b, dtype=np.longdouble)


def _as_state_dict(state):
    if state is None:
        return {}
    if isinstance(state, dict):
        return state
    return state._asdict()


@pytest.mark.parametrize("spec,sample", _params())
def test_matches_torch_float64(spec, sample, torch):
    y, state, cache = spec.run(sample)
    ys = spec.output_values(y)
    douts = [np.random.default_rng(zlib.crc32(
        (f"{spec.name}/{sample.name}" + ("" if k == 0 else f"/{name}")).encode()))
        .standard_normal(v.shape) for k, (name, v) in enumerate(zip(spec.outputs, ys))]
    dy = spec.upstream(douts)  # random, for every output
    grads = spec.backward(dy, cache)

    tensors = [None if a is None else torch.tensor(a, requires_grad=True) for a in sample.arrays]
    result = spec.torch_call(torch, *tensors, **sample.kwargs)
    yt, state_t = result if spec.stateful else (result, None)
    yts = spec.output_values(yt)
    torch.autograd.backward(yts, [torch.tensor(d) for d in douts])
    theirs = {name: t.detach().numpy() for name, t in zip(spec.outputs, yts)}
    ours = dict(zip(spec.outputs, ys))
    for name, g, t in zip(spec.diff_argnames, grads, tensors):
        if t is not None:
            ours["d" + name], theirs["d" + name] = g, t.grad.numpy()
    for key, value in _as_state_dict(state_t).items():
        ours[key], theirs[key] = _as_state_dict(state)[key], np.asarray(value)

    bad = {k: normwise(ours[k], theirs[k]) for k in ours if normwise(ours[k], theirs[k]) > 1e-12}
    if not bad:
        return
    # Who is right? Run refnorm's algorithm in extended precision on the same inputs.
    ld = [None if a is None else a.astype(np.longdouble) for a in sample.arrays]
    kwargs_ld = {k: (v.astype(np.longdouble) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                     else v) for k, v in sample.kwargs.items()}
    s_ld = sample._replace(arrays=tuple(ld), kwargs=kwargs_ld)
    y_ld, state_ld, cache_ld = spec.run(s_ld)
    exact = dict(zip(spec.outputs, spec.output_values(y_ld)))
    dy_ld = spec.upstream(d.astype(np.longdouble) for d in douts)
    for name, g in zip(spec.diff_argnames, spec.backward(dy_ld, cache_ld)):
        exact["d" + name] = g
    exact.update(_as_state_dict(state_ld))
    for key, diff in bad.items():
        err_ours, err_theirs = normwise(ours[key], exact[key]), normwise(theirs[key], exact[key])
        assert err_ours <= max(err_theirs, 1e-15), (
            f"{key}: refnorm and torch differ by {diff:.3g} and refnorm is the less accurate "
            f"({err_ours:.3g} vs torch's {err_theirs:.3g} against extended precision)")

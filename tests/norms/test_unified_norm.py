"""Unified Normalization: the backward's state against the official algorithm written with
torch ops, the exact window-1 case, outlier filtration, fluctuation smoothing."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.unified_norm import (SPEC, _torch_call, unified_norm_backward,
                                        unified_norm_forward)
from refnorm.verify import norm_gradients, normwise

SAMPLES = list(SPEC.sample_inputs(np.random.default_rng(5)))
TRAINING = [s for s in SAMPLES if s.kwargs["training"]]


@pytest.mark.parametrize("sample", TRAINING, ids=lambda s: s.name)
def test_backward_state_matches_the_torch_function(sample, torch):
    y, state, cache = SPEC.run(sample)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    grads = unified_norm_backward(dy, cache)
    tensors = [None if a is None else torch.tensor(a, requires_grad=True) for a in sample.arrays]
    out = {}
    yt, tstate = _torch_call(torch, *tensors, **sample.kwargs, backward_state=out)
    yt.backward(torch.tensor(dy))
    assert normwise(grads.ema_gz, out["ema_gz"].detach().numpy()) < 1e-12
    assert normwise(grads.buffer_gz, out["buffer_gz"].detach().numpy()) < 1e-12
    assert int(state.skip_counter) == int(tstate["skip_counter"])


def _window_one(rng):
    return next(s for s in SAMPLES if s.name == "(3,5)-window1-exact")


def test_window_one_is_the_exact_gradient(rng):
    sample = _window_one(rng)
    dy = rng.standard_normal(sample.arrays[0].shape)
    hand, engine = norm_gradients(SPEC, sample, dy)
    for h, e in zip(hand[:3], engine):
        assert normwise(h, e) < 1e-12


def test_outlier_filtration_skips_and_counts():
    skip = next(s for s in SAMPLES if s.name == "(2,3,4)-outlier-skip")
    kept = next(s for s in SAMPLES if s.name == "(2,3,4)-outlier-kept")
    _, state, cache = SPEC.run(skip)
    assert cache.skip and int(state.skip_counter) == 1
    t = int(state.iters)
    np.testing.assert_array_equal(state.buffer_x2[t % 4], skip.kwargs["running_var"])
    _, state, cache = SPEC.run(kept)
    assert not cache.skip and int(state.skip_counter) == 0


def test_a_nan_that_decides_the_outlier_test_is_not_dropped():
    """The outlier test is one decision for all channels. On the 'kept' sample a large value in
    channel 0 alone makes the step an outlier, so a NaN there leaves it undecided: every output
    that differs between the two branches is NaN (the official ``torch.any`` would read the NaN
    comparison as False and drop it), the count is unchanged; an inf is the limit of large
    values: an outlier step, finite in the other channels."""
    kept = next(s for s in SAMPLES if s.name == "(2,3,4)-outlier-kept")
    dy = np.random.default_rng(3).standard_normal(kept.arrays[0].shape)

    def run(value):
        x = kept.arrays[0].copy()
        x[0, 0, 0] = value
        y, state, cache = SPEC.run(kept._replace(arrays=(x,) + kept.arrays[1:]))
        return y, state, cache, unified_norm_backward(dy, cache)

    y, state, cache, _ = run(1e6)
    assert cache.skip and int(state.skip_counter) == 1          # channel 0 decides
    y, state, cache, grads = run(np.nan)
    assert cache.skip is None and int(state.skip_counter) == 0
    for a in (y, state.running_var, grads.dx, grads.dweight, grads.ema_gz):
        assert np.isnan(a).all()
    y, state, cache, grads = run(np.inf)
    assert cache.skip and int(state.skip_counter) == 1
    assert np.isfinite(y[..., 1:]).all() and np.isfinite(grads.dx[..., 1:]).all()


def test_fluctuation_smoothing_is_the_geometric_mean_of_the_window(rng):
    c = 3
    x = rng.standard_normal((5, 4, c))
    window = np.exp(rng.standard_normal((4, c)))
    kw = dict(running_var=np.ones(c), ema_gz=np.zeros(c), buffer_x2=window,
              buffer_gz=np.zeros((4, c)), warmup_iters=2)
    y, state, _ = unified_norm_forward(x, training=True, iters=10, **kw)
    q = np.mean(x ** 2, axis=(0, 1))
    w = window.copy()
    w[11 % 4] = q
    gm = np.exp(np.mean(np.log(w), axis=0))
    np.testing.assert_allclose(y, x / np.sqrt(gm + 1e-5), rtol=1e-13)
    np.testing.assert_allclose(state.running_var, 0.9 + 0.1 * gm, rtol=1e-13)
    np.testing.assert_array_equal(state.buffer_x2, w)
    # during the warm-up the batch statistic is used
    y, _, _ = unified_norm_forward(x, training=True, iters=0, **{**kw, "warmup_iters": 4000})
    np.testing.assert_allclose(y, x / np.sqrt(q + 1e-5), rtol=1e-13)


def test_composite_state_equals_forward_state():
    for sample in SAMPLES:
        _, state, _ = SPEC.run(sample)
        _, cstate = SPEC.composite(**SPEC.arguments(sample))
        for a, b in zip(state, cstate):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-13,
                                       err_msg=sample.name)

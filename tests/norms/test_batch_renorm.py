"""Batch Renormalization: with rmax = 1, dmax = 0 it is BatchNorm in training; r and d are
constants of the gradient; the schedule; the oracle's tolerance model still catches mistakes."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.batch_renorm import (batch_renorm_backward, batch_renorm_forward,
                                        renorm_limits)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (2, 3, 4, 5)])
def test_rmax_1_dmax_0_is_batch_norm_in_training(rng, shape):
    """Outputs, gradients and running statistics, to 1e-12."""
    c = shape[1]
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    w, b = rng.standard_normal(c) + 1, rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 2, c)   # far from the batch's
    dy = rng.standard_normal(shape)
    for momentum in (0.1, None):
        y, state, cache = batch_renorm_forward(x, rm, rv, w, b, True, momentum, 1e-5, rmax=1.0,
                                               dmax=0.0, num_batches_tracked=4)
        yb, state_b, cache_b = batch_norm_forward(x, rm, rv, w, b, True, momentum, 1e-5,
                                                  num_batches_tracked=4)
        assert np.all(cache.r == 1.0) and np.all(cache.d == 0.0)
        assert _rel(y, yb) <= 1e-12
        for key in ("running_mean", "running_var"):
            assert _rel(getattr(state, key), getattr(state_b, key)) <= 1e-12
        assert int(state.num_batches_tracked) == int(state_b.num_batches_tracked) == 5
        for g, gb in zip(batch_renorm_backward(dy, cache), batch_norm_backward(dy, cache_b)):
            assert _rel(g, gb) <= 1e-12


def test_r_and_d_follow_the_definition_and_are_clipped(rng):
    x = rng.standard_normal((16, 4, 3)) * np.array([1, 2, 0.2, 1])[:, None] \
        + np.array([0, 1, 0, -3])[:, None]
    rm, rv = np.zeros(4), np.ones(4)
    eps = 1e-5
    _, _, cache = batch_renorm_forward(x, rm, rv, None, None, True, eps=eps, rmax=1.5, dmax=0.5)
    mu = x.mean(axis=(0, 2))
    sigma_b = np.sqrt(x.var(axis=(0, 2)) + eps)
    sigma = np.sqrt(rv + eps)
    np.testing.assert_allclose(cache.r.ravel(), np.clip(sigma_b / sigma, 1 / 1.5, 1.5),
                               rtol=1e-14)
    np.testing.assert_allclose(cache.d.ravel(), np.clip((mu - rm) / sigma, -0.5, 0.5),
                               rtol=1e-14, atol=1e-15)
    assert cache.r.ravel()[2] == 1 / 1.5 and cache.d.ravel()[3] == -0.5   # clipped


def test_eval_is_batch_norm_eval(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b, rm, rv = rng.standard_normal(4), rng.standard_normal(4), rng.standard_normal(4), \
        rng.uniform(0.5, 2, 4)
    y, _, cache = batch_renorm_forward(x, rm, rv, w, b, False)
    yb, _, cache_b = batch_norm_forward(x, rm, rv, w, b, False)
    np.testing.assert_array_equal(y, yb)


def test_schedule_is_the_papers_linear_reading():
    assert renorm_limits(0) == (1.0, 0.0) and renorm_limits(5000) == (1.0, 0.0)
    assert renorm_limits(25000) == pytest.approx((1 + 2 * 20000 / 35000, 5.0))
    assert renorm_limits(40000) == (3.0, 5.0) and renorm_limits(10 ** 6) == (3.0, 5.0)
    r, d = renorm_limits(15000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(2.5)


def test_the_oracle_still_catches_wrong_batch_renorms(torch):
    """The tolerance model's Batch Renorm term (tolerance.py, ``renorm``) lets the correct
    torch-op implementation pass in float32 (test_oracle's no-false-alarm test) but not an
    implementation that lets the gradient flow through r and d, nor one that uses the unbiased
    batch variance in sigma_B."""
    from refnorm.norms.batch_renorm import _torch_call
    from refnorm.oracle import check, torch_function

    def make(detach, correction):
        def fn(x, weight=None, bias=None, *, running_mean, running_var, training=False,
               momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0, num_batches_tracked=0):
            if not training:
                return _torch_call(torch, x, weight, bias, running_mean=running_mean,
                                   running_var=running_var, momentum=momentum, eps=eps,
                                   num_batches_tracked=num_batches_tracked)
            xf = x.float()
            axes = [0] + list(range(2, x.ndim))
            shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
            rm = torch.as_tensor(running_mean).float().reshape(shape)
            rv = torch.as_tensor(running_var).float().reshape(shape)
            mu = xf.mean(axes, keepdim=True)
            sigma_b = torch.sqrt(xf.var(axes, keepdim=True, correction=correction) + eps)
            sigma = torch.sqrt(rv + eps)
            r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
            d = ((mu - rm) / sigma).clamp(-dmax, dmax)
            if detach:
                r, d = r.detach(), d.detach()
            y = (xf - mu) / sigma_b * r + d
            y = y * weight.float().reshape(shape) if weight is not None else y
            y = y + bias.float().reshape(shape) if bias is not None else y
            _, state = _torch_call(torch, x.detach(), None, None, running_mean=running_mean,
                                   running_var=running_var, training=True, momentum=momentum,
                                   eps=eps, num_batches_tracked=num_batches_tracked)
            return y.to(x.dtype), state
        return fn

    good = check(torch_function(make(True, 0)), "batch_renorm", dtype="float32", size="ci")
    assert good, good.format()
    through = check(torch_function(make(False, 0)), "batch_renorm", dtype="float32", size="ci")
    assert not through and "dx" in through.format()   # y is right; the gradient is not
    unbiased = check(torch_function(make(True, 1)), "batch_renorm", dtype="float32", size="ci")
    assert not unbiased

"""BatchNorm: running-statistics conventions, train vs eval, and the identities of its gradient."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.autograd import Tensor
from refnorm.norms.batch_norm import (SPEC, BatchNormState, batch_norm, batch_norm_backward,
                                      batch_norm_composite, batch_norm_forward)

AXES = (0, 2, 3)


def _state(rng, c):
    return rng.standard_normal(c), rng.uniform(0.5, 2.0, c)


def test_running_update_weights_the_new_value_by_momentum_and_uses_unbiased_variance(rng):
    x = 3.0 + 2.0 * rng.standard_normal((4, 3, 5, 2))
    rm, rv = _state(rng, 3)
    _, state, _ = batch_norm_forward(x, rm, rv, training=True, momentum=0.1,
                                     num_batches_tracked=7)
    m = 4 * 5 * 2
    np.testing.assert_allclose(state.running_mean, 0.9 * rm + 0.1 * x.mean(axis=AXES),
                               rtol=1e-14)
    unbiased = x.var(axis=AXES, ddof=1)
    np.testing.assert_allclose(state.running_var, 0.9 * rv + 0.1 * unbiased, rtol=1e-14)
    np.testing.assert_allclose(unbiased, x.var(axis=AXES) * m / (m - 1), rtol=1e-14)
    assert state.num_batches_tracked == 8 and state.num_batches_tracked.dtype == np.int64


def test_momentum_one_stores_the_batch_statistics(rng):
    x = rng.standard_normal((5, 2, 3))
    _, state, _ = batch_norm_forward(x, *_state(rng, 2), training=True, momentum=1.0)
    np.testing.assert_allclose(state.running_mean, x.mean(axis=(0, 2)), rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(state.running_var, x.var(axis=(0, 2), ddof=1), rtol=1e-14)


def test_momentum_none_is_the_cumulative_average_of_the_batch_statistics(rng):
    """After t steps the running statistics are the plain means of the t batch statistics (the
    paper's population statistics, Algorithm 2): the initial values drop out at step 1 (f = 1)."""
    batches = [rng.standard_normal((6, 3, 4)) + k for k in range(5)]
    state = BatchNormState(*_state(rng, 3), 0)
    for x in batches:
        _, state, _ = batch_norm_forward(x, state.running_mean, state.running_var, training=True,
                                         momentum=None,
                                         num_batches_tracked=state.num_batches_tracked)
    assert state.num_batches_tracked == 5
    np.testing.assert_allclose(state.running_mean,
                               np.mean([b.mean(axis=(0, 2)) for b in batches], axis=0),
                               rtol=1e-13)
    np.testing.assert_allclose(state.running_var,
                               np.mean([b.var(axis=(0, 2), ddof=1) for b in batches], axis=0),
                               rtol=1e-13)


def test_eval_uses_the_running_statistics_and_leaves_the_state_alone(rng):
    x = rng.standard_normal((3, 4, 2, 2))
    rm, rv = _state(rng, 4)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    y, state, _ = batch_norm_forward(x, rm, rv, w, b, training=False, eps=1e-3,
                                     num_batches_tracked=2)
    c = (slice(None), None, None)
    expected = (x - rm[c]) / np.sqrt(rv[c] + 1e-3) * w[c] + b[c]
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-15)
    assert state.running_mean is rm and state.running_var is rv
    assert state.num_batches_tracked == 2


def test_train_and_eval_differ(rng):
    x = rng.standard_normal((4, 3, 5))
    rm, rv = _state(rng, 3)
    y_train, s_train, _ = batch_norm_forward(x, rm, rv, training=True)
    y_eval, s_eval, _ = batch_norm_forward(x, rm, rv, training=False)
    assert np.abs(y_train - y_eval).max() > 0.1
    assert not np.allclose(s_train.running_mean, s_eval.running_mean)
    assert s_train.num_batches_tracked == 1 and s_eval.num_batches_tracked == 0
    # Training normalizes with the batch statistics, not the running ones.
    np.testing.assert_allclose(y_train.mean(axis=(0, 2)), 0.0, atol=1e-15)


def test_without_running_statistics_eval_uses_batch_statistics(rng):
    """``track_running_stats=False``: batch statistics in eval too, and nothing is tracked."""
    x = rng.standard_normal((4, 3, 5))
    y_train, s_train, _ = batch_norm_forward(x, None, None, training=True)
    y_eval, s_eval, _ = batch_norm_forward(x, None, None, training=False)
    np.testing.assert_array_equal(y_train, y_eval)
    assert s_train == s_eval == BatchNormState(None, None, 0)


def test_one_value_per_channel(rng):
    rm, rv = _state(rng, 3)
    message = "Expected more than 1 value per channel when training"
    for shape in [(1, 3), (1, 3, 1), (1, 3, 1, 1, 1)]:
        with pytest.raises(ValueError, match=message):
            batch_norm_forward(np.ones(shape), rm, rv, training=True)
        with pytest.raises(ValueError, match=message):
            batch_norm_forward(np.ones(shape), None, None, training=False)  # batch statistics
        batch_norm_forward(np.ones(shape), rm, rv, training=False)  # running statistics: fine
    batch_norm_forward(rng.standard_normal((1, 3, 2)), rm, rv, training=True)  # N=1, m=2: fine


def test_all_ones_dy_gives_zero_dx_in_training(rng):
    """Without affine, sum(y) over a channel is identically 0, so an all-ones dy has dx == 0:
    a gradient check with dy = 1 would pass for any backward whose dx vanishes (or is wrong by
    a multiple of the ones vector). That is why the checks draw a random dy."""
    x = 5.0 + rng.standard_normal((4, 3, 2, 3))
    y, _, cache = batch_norm_forward(x, None, None, training=True)
    dx = batch_norm_backward(np.ones_like(y), cache).dx
    np.testing.assert_allclose(dx, 0.0, atol=1e-14)
    dx_random = batch_norm_backward(rng.standard_normal(y.shape), cache).dx
    assert np.abs(dx_random).max() > 0.1
    # In eval the statistics are constants: dx = dy * r, far from zero.
    rm, rv = _state(rng, 3)
    _, _, cache_eval = batch_norm_forward(x, rm, rv, training=False)
    dx_eval = batch_norm_backward(np.ones_like(y), cache_eval).dx
    np.testing.assert_allclose(dx_eval, np.broadcast_to(cache_eval.rstd, x.shape), rtol=1e-15)


def test_eval_backward_is_the_affine_map(rng):
    x = rng.standard_normal((3, 2, 4))
    rm, rv = _state(rng, 2)
    w, b = rng.standard_normal(2), rng.standard_normal(2)
    _, _, cache = batch_norm_forward(x, rm, rv, w, b, training=False)
    dy = rng.standard_normal(x.shape)
    grads = batch_norm_backward(dy, cache)
    c = (slice(None), None)
    np.testing.assert_allclose(grads.dx, dy * w[c] / np.sqrt(rv[c] + 1e-5), rtol=1e-14)
    xhat = (x - rm[c]) / np.sqrt(rv[c] + 1e-5)
    np.testing.assert_allclose(grads.dweight, (dy * xhat).sum(axis=(0, 2)), rtol=1e-13)
    np.testing.assert_allclose(grads.dbias, dy.sum(axis=(0, 2)), rtol=1e-14)


def test_composite_computes_the_same_new_state():
    for sample in SPEC.sample_inputs(np.random.default_rng(3)):
        _, state, _ = SPEC.run(sample)
        _, composite_state = batch_norm_composite(**SPEC.arguments(sample))
        assert composite_state.num_batches_tracked == state.num_batches_tracked
        for a, b in [(state.running_mean, composite_state.running_mean),
                     (state.running_var, composite_state.running_var)]:
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)


def test_op_returns_tensor_and_state(rng):
    x = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    y, state = batch_norm(x, *_state(rng, 3), training=True, num_batches_tracked=1)
    assert isinstance(y, Tensor) and isinstance(state, BatchNormState)
    assert state.num_batches_tracked == 2


def test_float32_input_with_float64_running_statistics(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv = _state(rng, 3)
    for training in (True, False):
        y, state, _ = batch_norm_forward(x, rm, rv, training=training)
        assert y.dtype == np.float32
        assert state.running_mean.dtype == state.running_var.dtype == np.float64


def test_matches_the_torch_module_over_several_steps(rng, torch):
    """nn.BatchNorm2d, driven through training steps (both momentum conventions) and eval,
    against refnorm's state threaded by hand."""
    for momentum in (0.3, None):
        module = torch.nn.BatchNorm2d(3, momentum=momentum).double()
        with torch.no_grad():
            module.weight.copy_(torch.tensor(rng.standard_normal(3) + 1.0))
            module.bias.copy_(torch.tensor(rng.standard_normal(3)))
        w, b = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
        state = BatchNormState(np.zeros(3), np.ones(3), 0)
        for step in range(4):
            x = 2.0 * rng.standard_normal((3, 3, 4, 2)) + step
            training = step < 3
            module.train(training)
            y_t = module(torch.tensor(x)).detach().numpy()
            y, state, _ = batch_norm_forward(x, state.running_mean, state.running_var, w, b,
                                             training, momentum,
                                             num_batches_tracked=state.num_batches_tracked)
            np.testing.assert_allclose(y, y_t, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(state.running_mean, module.running_mean.numpy(),
                                       rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(state.running_var, module.running_var.numpy(), rtol=1e-13)
            assert state.num_batches_tracked == module.num_batches_tracked.item()

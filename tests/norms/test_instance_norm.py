"""InstanceNorm: the BatchNorm identity, running statistics, and the state convention."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.instance_norm import (SPEC, InstanceNormState, instance_norm,
                                         instance_norm_backward, instance_norm_composite,
                                         instance_norm_forward)


def _params(rng, c):
    return (rng.standard_normal(c), rng.uniform(0.5, 2.0, c),   # running_mean, running_var
            rng.standard_normal(c) + 1.0, rng.standard_normal(c))   # weight, bias


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 3), (1, 2, 2, 3, 2), (4, 1, 6)])
def test_equals_batch_norm_of_the_input_viewed_as_one_sample(rng, shape):
    """instance_norm(x) is batch_norm(x.reshape(1, N*C, *spatial), training=True) with the
    parameters and running statistics repeated N times; the new running statistics are the
    repeated ones averaged over n, and the parameter gradients the repeated ones summed."""
    n, c = shape[:2]
    x = rng.standard_normal(shape)
    rm, rv, w, b = _params(rng, c)
    y, state, cache = instance_norm_forward(x, rm, rv, w, b, True, 0.2, 1e-3)

    xb = x.reshape((1, n * c) + shape[2:])
    yb, state_b, cache_b = batch_norm_forward(xb, np.tile(rm, n), np.tile(rv, n), np.tile(w, n),
                                              np.tile(b, n), True, 0.2, 1e-3)
    np.testing.assert_allclose(y, yb.reshape(shape), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(state.running_mean,
                               state_b.running_mean.reshape(n, c).mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(state.running_var,
                               state_b.running_var.reshape(n, c).mean(axis=0), rtol=1e-14)

    dy = rng.standard_normal(shape)
    grads = instance_norm_backward(dy, cache)
    grads_b = batch_norm_backward(dy.reshape(xb.shape), cache_b)
    np.testing.assert_allclose(grads.dx, grads_b.dx.reshape(shape), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(grads.dweight, grads_b.dweight.reshape(n, c).sum(axis=0),
                               rtol=1e-13)
    np.testing.assert_allclose(grads.dbias, grads_b.dbias.reshape(n, c).sum(axis=0), rtol=1e-13)


def test_with_running_statistics_it_is_batch_norm_in_eval(rng):
    x = rng.standard_normal((3, 4, 5))
    rm, rv, w, b = _params(rng, 4)
    y, state, cache = instance_norm_forward(x, rm, rv, w, b, use_input_stats=False)
    yb, _, cache_b = batch_norm_forward(x, rm, rv, w, b, training=False)
    np.testing.assert_array_equal(y, yb)
    assert state.running_mean is rm and state.running_var is rv
    dy = rng.standard_normal(x.shape)
    for g, gb in zip(instance_norm_backward(dy, cache), batch_norm_backward(dy, cache_b)):
        np.testing.assert_allclose(g, gb, rtol=1e-14)


def test_running_update_averages_per_instance_unbiased_statistics(rng):
    x = 1.5 + rng.standard_normal((4, 3, 2, 5))
    rm, rv, _, _ = _params(rng, 3)
    _, state, _ = instance_norm_forward(x, rm, rv, momentum=0.1)
    spatial = (2, 3)
    np.testing.assert_allclose(state.running_mean,
                               0.9 * rm + 0.1 * x.mean(axis=spatial).mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(state.running_var,
                               0.9 * rv + 0.1 * x.var(axis=spatial, ddof=1).mean(axis=0),
                               rtol=1e-14)


def test_each_instance_is_standardized_on_its_own(rng):
    x = rng.standard_normal((3, 2, 7)) * rng.uniform(0.1, 10, (3, 2, 1)) + 50.0
    y, _, _ = instance_norm_forward(x, eps=1e-12)
    np.testing.assert_allclose(y.mean(axis=2), 0.0, atol=1e-14)
    np.testing.assert_allclose(y.var(axis=2), 1.0, rtol=1e-10)


def test_state_mirrors_the_state_arguments(rng):
    """Always an InstanceNormState; None fields when no running statistics were given, so
    ``y, state = instance_norm(x, *state)`` threads the state either way."""
    x = rng.standard_normal((2, 3, 4))
    _, state, _ = instance_norm_forward(x)
    assert state == InstanceNormState(None, None)
    y, state = instance_norm(x, *state)
    assert state == InstanceNormState(None, None)
    rm, rv, _, _ = _params(rng, 3)
    y, state = instance_norm(x, rm, rv)
    y, state2 = instance_norm(x, *state)
    assert not np.allclose(state.running_mean, rm)
    assert not np.allclose(state2.running_mean, state.running_mean)


def test_use_input_stats_false_needs_running_statistics(rng):
    with pytest.raises(ValueError, match="must be given when `use_input_stats` is False"):
        instance_norm_forward(rng.standard_normal((2, 3, 4)), use_input_stats=False)


def test_all_ones_dy_gives_zero_dx(rng):
    x = rng.standard_normal((2, 3, 6))
    y, _, cache = instance_norm_forward(x)
    np.testing.assert_allclose(instance_norm_backward(np.ones_like(y), cache).dx, 0.0,
                               atol=1e-14)


def test_composite_computes_the_same_new_state():
    for sample in SPEC.sample_inputs(np.random.default_rng(5)):
        _, state, _ = SPEC.run(sample)
        _, composite_state = instance_norm_composite(**SPEC.arguments(sample))
        for a, b in zip(state, composite_state):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-16)


def test_matches_the_torch_module_over_several_steps(rng, torch):
    """nn.InstanceNorm2d(affine=True, track_running_stats=True): training steps, then eval."""
    module = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True,
                                     momentum=0.3).double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor(rng.standard_normal(3) + 1.0))
        module.bias.copy_(torch.tensor(rng.standard_normal(3)))
    w, b = module.weight.detach().numpy().copy(), module.bias.detach().numpy().copy()
    state = InstanceNormState(np.zeros(3), np.ones(3))
    for step in range(4):
        x = 2.0 * rng.standard_normal((2, 3, 4, 3)) + step
        training = step < 3
        module.train(training)
        y_t = module(torch.tensor(x)).detach().numpy()
        y, state, _ = instance_norm_forward(x, *state, w, b, use_input_stats=training,
                                            momentum=0.3)
        np.testing.assert_allclose(y, y_t, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(state.running_mean, module.running_mean.numpy(), rtol=1e-13,
                                   atol=1e-15)
        np.testing.assert_allclose(state.running_var, module.running_var.numpy(), rtol=1e-13)

"""Spectral normalization: the power iteration against the SVD, PyTorch's algorithm and state,
and what the backward (u, v held constant, as in PyTorch) is the exact gradient of."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.autograd import Tensor
from refnorm.gradcheck import check_vjp
from refnorm.norms.spectral_norm import (SPEC, SpectralNormState, spectral_norm,
                                         spectral_norm_backward, spectral_norm_composite,
                                         spectral_norm_forward, spectral_norm_init)

EPS = np.finfo(np.float64).eps


def _matrix(weight, dim):
    return np.moveaxis(weight, dim, 0).reshape(weight.shape[dim], -1)


@pytest.mark.parametrize("shape,dim", [((6, 4), 0), ((4, 3, 2, 2), 0), ((3, 5, 2), 1),
                                       ((3, 5, 2), -1)])
def test_converged_sigma_is_the_largest_singular_value(rng, shape, dim):
    weight = rng.standard_normal(shape)
    state = spectral_norm_init(weight, rng, dim=dim, n_power_iterations=500)
    y, new, _ = spectral_norm_forward(weight, *state, dim=dim)
    u1, s, vt = np.linalg.svd(_matrix(weight, dim))
    np.testing.assert_allclose(weight / y, s[0], rtol=1e-12)  # y = W / sigma
    np.testing.assert_allclose(np.linalg.svd(_matrix(y, dim), compute_uv=False)[0], 1.0,
                               rtol=1e-12)
    sign = np.sign(new.u @ u1[:, 0])
    np.testing.assert_allclose(new.u, sign * u1[:, 0], atol=1e-10)
    np.testing.assert_allclose(new.v, sign * vt[0], atol=1e-10)


def test_one_training_step_is_torchs_update_order(rng):
    """u <- normalize(W v) first, from the stored v, then v <- normalize(W^T u): the input u
    does not matter in training mode."""
    weight = rng.standard_normal((5, 7))
    u0, v0 = rng.standard_normal(5), rng.standard_normal(7)
    y, state, _ = spectral_norm_forward(weight, u0, v0, training=True)
    u = weight @ v0
    u /= np.linalg.norm(u)
    v = weight.T @ u
    v /= np.linalg.norm(v)
    np.testing.assert_allclose(state.u, u, rtol=1e-14)
    np.testing.assert_allclose(state.v, v, rtol=1e-14)
    np.testing.assert_allclose(y, weight / (u @ weight @ v), rtol=1e-14)
    y2, state2, _ = spectral_norm_forward(weight, -3.0 * u0 + 1.0, v0, training=True)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(state2.u, state.u)


def test_eval_uses_the_given_state_and_returns_copies(rng):
    weight = rng.standard_normal((4, 6))
    u, v = rng.standard_normal(4), rng.standard_normal(6)
    u0, v0 = u.copy(), v.copy()
    y, state, _ = spectral_norm_forward(weight, u, v, training=False, n_power_iterations=5)
    np.testing.assert_allclose(y, weight / (u @ weight @ v), rtol=1e-14)
    np.testing.assert_array_equal(state.u, u)
    np.testing.assert_array_equal(state.v, v)
    assert not np.shares_memory(state.u, u) and not np.shares_memory(state.v, v)
    np.testing.assert_array_equal(u, u0)
    np.testing.assert_array_equal(v, v0)


@pytest.mark.parametrize("n,training", [(1, True), (3, True), (1, False)])
@pytest.mark.parametrize("shape,dim", [((5, 4), 0), ((3, 4, 2, 2), 1), ((4, 3, 2), -1)])
def test_matches_the_torch_parametrization(rng, torch, shape, dim, n, training):
    weight = rng.standard_normal(shape)
    h = shape[dim]
    u, v = rng.standard_normal(h), rng.standard_normal(weight.size // h)
    dy = rng.standard_normal(shape)
    y, state, cache = spectral_norm_forward(weight, u, v, n_power_iterations=n, dim=dim,
                                            training=training)
    w_t = torch.tensor(weight, requires_grad=True)
    y_t, state_t = SPEC.torch_call(torch, w_t, u=u, v=v, n_power_iterations=n, dim=dim,
                                   training=training)
    y_t.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(state.u, state_t.u, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(state.v, state_t.v, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(spectral_norm_backward(dy, cache).dweight, w_t.grad.numpy(),
                               rtol=1e-12, atol=1e-14)


def test_torch_rejects_zero_iterations_and_so_does_refnorm(rng, torch):
    with pytest.raises(ValueError, match="n_power_iterations"):
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(3, 2),
                                                      n_power_iterations=0)
    with pytest.raises(ValueError, match="`n_power_iterations` must be positive"):
        spectral_norm_forward(np.ones((2, 3)), np.ones(2), np.ones(3), n_power_iterations=0)


def test_gradient_is_orthogonal_to_the_weight(rng):
    """W / (u^T W v) is invariant to the scale of W (u, v fixed), so <dW, W> = 0."""
    weight = rng.standard_normal((3, 4, 2))
    y, _, cache = spectral_norm_forward(weight, *spectral_norm_init(weight, rng))
    np.testing.assert_array_equal(spectral_norm_forward(4.0 * weight, cache.u, cache.v,
                                                        training=False)[0], y)
    dy = rng.standard_normal(weight.shape)
    dweight = spectral_norm_backward(dy, cache).dweight
    assert abs(np.sum(dweight * weight)) <= 16 * EPS * np.sum(np.abs(dweight * weight))


def test_training_backward_is_the_gradient_with_the_new_state_held_fixed(rng):
    """The honest statement of the surrogate: in training mode the backward equals the exact
    gradient of W -> W / (u1^T W v1) with u1, v1 the vectors the forward produced (an eval call
    with the new state), not the derivative through the power iteration."""
    weight = rng.standard_normal((4, 5))
    u, v = rng.standard_normal(4), rng.standard_normal(5)
    _, state, cache = spectral_norm_forward(weight, u, v, training=True)

    def train_vjp(ct, w):  # the training-mode backward at the point checked
        return (spectral_norm_backward(ct[0], cache).dweight,)

    def fixed(w):
        return spectral_norm_forward(w, *state, training=False)[0]

    report = check_vjp(fixed, train_vjp, [weight], mode="slow", rng=rng, rtol=1e-10,
                       atol=1e-12)
    assert report, str(report)

    # Through the iteration (finite differences of the training forward) it differs.
    def through(w):
        return spectral_norm_forward(w, u, v, training=True)[0]

    full = check_vjp(through, train_vjp, [weight], mode="slow", rng=rng, rtol=1e-6, atol=1e-8)
    assert not full


def test_at_convergence_the_gradient_is_that_of_w_over_sigma_max(rng):
    """d sigma_max / dW = u1 v1^T, so with converged u, v the backward is the exact gradient of
    W -> W / sigma_max(W) (computed by SVD)."""
    weight = rng.standard_normal((5, 3))
    state = spectral_norm_init(weight, rng, n_power_iterations=1000)
    _, _, cache = spectral_norm_forward(weight, *state, training=False)
    report = check_vjp(lambda w: w / np.linalg.svd(w, compute_uv=False)[0],
                       lambda ct, w: (spectral_norm_backward(ct[0], cache).dweight,), [weight],
                       mode="slow", rng=rng, rtol=1e-8, atol=1e-10)
    assert report, str(report)


def test_eps_clamps_the_norm_in_the_power_iteration(rng):
    """|W v| < eps: u = W v / eps, not a unit vector (F.normalize's clamp)."""
    weight = 1e-20 * rng.standard_normal((3, 4))
    v = rng.standard_normal(4)
    _, state, _ = spectral_norm_forward(weight, np.ones(3), v, eps=1e-12)
    np.testing.assert_allclose(state.u, weight @ v / 1e-12, rtol=1e-14)
    assert np.linalg.norm(state.u) < 1e-6
    _, state, _ = spectral_norm_forward(weight, np.ones(3), v, eps=0.0)
    np.testing.assert_allclose(np.linalg.norm(state.u), 1.0, rtol=1e-14)


def test_engine_op_and_composite_in_training_mode(rng):
    weight = rng.standard_normal((3, 2, 2))
    u, v = rng.standard_normal(3), rng.standard_normal(4)
    dy = rng.standard_normal(weight.shape)
    kw = dict(u=u, v=v, n_power_iterations=2, training=True)
    y_np, state_np, cache = spectral_norm_forward(weight, **kw)
    t1, t2 = Tensor(weight, requires_grad=True), Tensor(weight, requires_grad=True)
    y1, s1 = spectral_norm(t1, **kw)
    y2, s2 = spectral_norm_composite(t2, **kw)
    y1.backward(dy)
    y2.backward(dy)
    np.testing.assert_array_equal(y1.data, y_np)
    np.testing.assert_allclose(y2.data, y_np, rtol=1e-14)
    for a, b in zip(s1, state_np):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(s2, state_np):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    np.testing.assert_allclose(t1.grad, spectral_norm_backward(dy, cache).dweight, rtol=1e-15)
    np.testing.assert_allclose(t2.grad, t1.grad, rtol=1e-12, atol=1e-14)


def test_state_round_trips_over_steps_like_torch(rng, torch):
    """Three training steps, feeding each new state back in, against one torch module."""
    weight = rng.standard_normal((6, 4))
    holder = torch.nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        holder.weight.copy_(torch.tensor(weight))
    torch.nn.utils.parametrizations.spectral_norm(holder)
    sn = holder.parametrizations.weight[0]
    state = SpectralNormState(sn._u.numpy().copy(), sn._v.numpy().copy())
    for _ in range(3):
        y, state, _ = spectral_norm_forward(weight, *state)
        y_t = holder.weight
        np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-13)
        np.testing.assert_allclose(state.u, sn._u.numpy(), rtol=1e-13, atol=1e-15)


def test_accuracy_against_extended_precision(rng):
    weight = 1e4 + rng.standard_normal((7, 300))
    u, v = rng.standard_normal(7), rng.standard_normal(300)
    dy = rng.standard_normal(weight.shape)
    y, state, cache = spectral_norm_forward(weight, u, v, n_power_iterations=2)
    yl, statel, cachel = spectral_norm_forward(weight.astype(np.longdouble), u, v,
                                               n_power_iterations=2)
    assert np.max(np.abs((y - yl) / yl)) < 8 * EPS
    for a, b in zip(state, statel):
        assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 8 * EPS
    d = spectral_norm_backward(dy, cache).dweight
    dl = spectral_norm_backward(dy.astype(np.longdouble), cachel).dweight
    assert np.max(np.abs(d - dl)) / np.max(np.abs(dl)) < 8 * EPS

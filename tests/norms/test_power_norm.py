"""PowerNorm: the backward's state against the official algorithm written with torch ops, the
exactness of evaluation, the warm-up, and a few steps of training carrying the state."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.power_norm import (SPEC, _torch_call, power_norm_backward,
                                      power_norm_forward, power_norm_surrogate)
from refnorm.verify import norm_gradients, normwise

TRAINING = [s for s in SPEC.sample_inputs(np.random.default_rng(5)) if s.kwargs["training"]]


@pytest.mark.parametrize("sample", TRAINING, ids=lambda s: s.name)
def test_backward_state_matches_the_torch_function(sample, torch):
    y, _, cache = SPEC.run(sample)
    dy = np.random.default_rng(1).standard_normal(y.shape)
    grads = power_norm_backward(dy, cache)
    tensors = [None if a is None else torch.tensor(a, requires_grad=True) for a in sample.arrays]
    out = {}
    yt, _ = _torch_call(torch, *tensors, **sample.kwargs, backward_state=out)
    yt.backward(torch.tensor(dy))
    assert normwise(grads.ema_gz, out["ema_gz"].detach().numpy()) < 1e-12
    assert normwise(grads.dx, tensors[0].grad.numpy()) < 1e-12


def test_evaluation_backward_is_exact_and_leaves_ema_alone(rng):
    for sample in SPEC.sample_inputs(rng):
        if sample.kwargs["training"]:
            continue
        dy = rng.standard_normal(sample.arrays[0].shape)
        hand, engine = norm_gradients(SPEC, sample, dy)
        for h, e in zip(hand[:3], engine):
            if h is not None:
                assert normwise(h, e) < 1e-12
        assert hand.ema_gz is sample.kwargs["ema_gz"]


def test_training_is_a_surrogate_not_the_gradient(rng):
    """The approximation is real: far from the exact gradient in training (so a test that
    compared it with finite differences would fail)."""
    sample = TRAINING[0]
    dy = rng.standard_normal(sample.arrays[0].shape)
    hand, engine = norm_gradients(SPEC, sample, dy)
    assert normwise(hand.dx, engine[0]) > 1e-2


def test_warmup_forward_and_the_two_running_updates(rng):
    c = 3
    x = rng.standard_normal((4, 5, c))
    phi = rng.uniform(0.5, 2.0, c)
    kw = dict(running_phi=phi, ema_gz=np.zeros(c), alpha_fwd=0.9, warmup_iters=10)
    psi2 = np.mean((x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5)) ** 2,
                   axis=(0, 1))
    # t = 4 < T_w: batch statistics, the cumulative average then the EMA
    y, state, _ = power_norm_forward(x, training=True, iters=3, **kw)
    cum = phi * 3 / 4 + psi2 / 4
    np.testing.assert_allclose(state.running_phi, 0.9 * cum + 0.1 * psi2, rtol=1e-13)
    xt = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, xt / np.sqrt(psi2 + 1e-5), rtol=1e-13)
    # t = 10 = T_w: still batch statistics, the EMA only
    y, state, _ = power_norm_forward(x, training=True, iters=9, **kw)
    np.testing.assert_allclose(state.running_phi, 0.9 * phi + 0.1 * psi2, rtol=1e-13)
    np.testing.assert_allclose(y, xt / np.sqrt(psi2 + 1e-5), rtol=1e-13)
    # t = 11 > T_w: the running statistic BEFORE this step's update
    y, state, _ = power_norm_forward(x, training=True, iters=10, **kw)
    np.testing.assert_allclose(y, xt / np.sqrt(phi + 1e-5), rtol=1e-13)
    assert int(state.iters) == 11


def test_three_training_steps_carrying_the_state(rng):
    c = 4
    params = dict(weight=rng.standard_normal(c) + 1, bias=rng.standard_normal(c))
    state = dict(running_phi=np.ones(c), ema_gz=np.zeros(c), iters=0)
    hyper = dict(group_num=2, warmup_iters=2)
    nu = np.zeros(c)
    for step in range(3):
        x = rng.standard_normal((3, 5, c))
        dy = rng.standard_normal(x.shape)
        y, new_state, cache = power_norm_forward(x, training=True, **params, **state, **hyper)
        grads = power_norm_backward(dy, cache)
        want = power_norm_surrogate(dy, x, training=True, **params, **state, **hyper)
        assert normwise(grads.dx, want.dx) < 1e-12
        assert normwise(grads.ema_gz, want.ema_gz) < 1e-12
        assert not np.array_equal(grads.ema_gz, nu)     # the backward moved it
        nu = grads.ema_gz
        state = dict(running_phi=new_state.running_phi, ema_gz=grads.ema_gz,
                     iters=new_state.iters)
    assert int(state["iters"]) == 3


def test_composite_state_equals_forward_state():
    for sample in SPEC.sample_inputs(np.random.default_rng(3)):
        _, state, _ = SPEC.run(sample)
        _, cstate = SPEC.composite(**SPEC.arguments(sample))
        for a, b in zip(state, cstate):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-13)


@pytest.mark.parametrize("training", [True, False])
def test_a_subnormal_token_group_with_eps_0_is_its_scaled_copy(rng, training):
    """GroupScaling with eps = 0 is invariant to the scale of each token group: a group of
    subnormal values (1/RMS beyond float64; was NaN) gives the outputs of the same values
    scaled by 2^1040 (exact), and its dx is 2^1040 times theirs (beyond float64 here: inf of
    the right sign, where not a cancellation residue). The whole call then runs in long
    double."""
    if np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp:
        pytest.skip("no long double wider than float64 on this platform")
    ints = rng.integers(-8, 9, (3, 4)).astype(np.float64)
    ints[:, 0] = 3.0                                         # no all-zero group
    x = rng.standard_normal((2, 3, 4))
    tiny, normal = x.copy(), x.copy()
    tiny[1, :, 2:] = np.ldexp(ints[:, 2:], -1040)           # subnormal: |x| < 2^-1022
    normal[1, :, 2:] = ints[:, 2:]
    weight, bias = rng.standard_normal(4) + 1, rng.standard_normal(4)
    kw = dict(training=training, eps=0.0, running_phi=rng.uniform(0.5, 2, 4),
              ema_gz=rng.standard_normal(4), iters=2, group_num=2, warmup_iters=10)
    dy = rng.standard_normal(x.shape)
    y, state, cache = power_norm_forward(tiny, weight, bias, **kw)
    grads = power_norm_backward(dy, cache)
    y_ref, state_ref, cache_ref = power_norm_forward(normal, weight, bias, **kw)
    grads_ref = power_norm_backward(dy, cache_ref)
    assert np.isfinite(y).all() and np.isfinite(state.running_phi).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(state.running_phi, state_ref.running_phi, rtol=1e-14)
    for name in ("dweight", "dbias", "ema_gz"):
        np.testing.assert_allclose(getattr(grads, name), getattr(grads_ref, name), rtol=1e-13,
                                   atol=1e-14)
    keep = np.ones(x.shape, bool)
    keep[1, :, 2:] = False
    np.testing.assert_allclose(grads.dx[keep], grads_ref.dx[keep], rtol=1e-13, atol=1e-14)
    scaled, ref = grads.dx[1, :, 2:], grads_ref.dx[1, :, 2:]
    big = np.abs(ref) > 1e-6 * np.abs(ref).max()       # not a cancellation residue
    assert big.sum() >= 3 and np.isinf(scaled[big]).all()
    assert (np.sign(scaled[big]) == np.sign(ref[big])).all()
    assert grads.dx.dtype == y.dtype == state.running_phi.dtype == np.float64

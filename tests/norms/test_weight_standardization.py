"""Weight Standardization and its scaled form: the properties the generic suites do not see."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.weight_standardization import (scaled_weight_standardization_backward,
                                                  scaled_weight_standardization_forward,
                                                  weight_standardization_backward,
                                                  weight_standardization_forward)


def _cosines(eps, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    w = rng.standard_normal((6, 4, 3, 3))
    g = rng.standard_normal(w.shape)          # a random upstream gradient
    w_hat, cache = weight_standardization_forward(w, eps)
    dw = weight_standardization_backward(g, cache).dweight
    a, b = dw.reshape(6, -1), w_hat.reshape(6, -1)
    return np.abs(np.sum(a * b, axis=1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_weight_gradient_is_orthogonal_to_the_standardized_weight_as_eps_vanishes():
    """At eps = 0 the map is invariant to scaling each slice of W, and its gradient has zero
    mean per slice, so <dW_o, W_hat_o> = 0; with eps the cosine is O(eps / sigma)."""
    epss = (1e-2, 1e-4, 1e-6, 1e-8)
    worst = [float(_cosines(eps).max()) for eps in epss]
    print("eps -> max cosine(dW_o, W_hat_o) over output channels:",
          ", ".join(f"{e:g}: {c:.3e}" for e, c in zip(epss, worst)))
    for before, after in zip(worst, worst[1:]):
        assert after < before / 10                       # shrinks with eps (about 100x per step)
    assert worst[-1] < 1e-7
    assert worst[0] > 1e-4                               # eps does break it: the check can fail


def test_constant_slice_with_eps_outside_has_the_exact_finite_gradient():
    """sigma = 0: PyTorch's std backward gives NaN; the derivative exists, (G - <G>) / eps."""
    w = np.repeat(np.array([[0.0], [-1.2]]), 5, axis=1)  # FD on the exact zero slice
    g = np.random.default_rng(1).standard_normal(w.shape)
    w_hat, cache = weight_standardization_forward(w, 1e-5)
    assert np.all(w_hat == 0)
    dw = weight_standardization_backward(g, cache).dweight
    np.testing.assert_allclose(dw, (g - g.mean(axis=1, keepdims=True)) / 1e-5, rtol=1e-12)
    # finite differences agree (the map is differentiable there)
    h = 1e-12  # the sigma term is a cone: the FD error is O(h / eps)
    for j in range(5):
        e = np.zeros_like(w)
        e[0, j] = h
        fd = np.sum(g * (weight_standardization_forward(w + e, 1e-5)[0]
                         - weight_standardization_forward(w - e, 1e-5)[0])) / (2 * h)
        assert abs(fd - dw[0, j]) <= 1e-5 * abs(dw[0, j])


def test_scaled_form_matches_fedwon_and_deepmind():
    """eps = 0, no gain: FedWon's gamma (W - mu) / (sigma sqrt(N)); clamp: DeepMind's floor."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3))
    flat = w.reshape(4, -1)
    n = flat.shape[1]
    want = 1.7 * (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) * np.sqrt(n))
    got, _ = scaled_weight_standardization_forward(w, None, 1.7, 0.0)
    np.testing.assert_allclose(got.reshape(4, -1), want, rtol=1e-13)
    small = 1e-4 * w                                      # N sigma^2 below the 1e-4 floor
    got, cache = scaled_weight_standardization_forward(small, None, 1.0, 1e-4)
    flat = small.reshape(4, -1)
    np.testing.assert_allclose(got.reshape(4, -1), (flat - flat.mean(1, keepdims=True)) / 1e-2,
                               rtol=1e-13)
    assert np.all(cache.t == 0)                          # the variance path carries no gradient


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_oracle_catches_wrong_weight_standardization(torch, dtype):
    """The tolerance model's conditioning term does not hide the classic mistakes."""
    from refnorm.oracle import check, torch_function

    def good(weight, eps=1e-5, *, unbiased=True, eps_inside=False):
        flat = weight.float().reshape(weight.shape[0], -1)
        std, mean = torch.std_mean(flat, dim=1, keepdim=True, correction=int(unbiased))
        s = torch.sqrt(std * std + eps) if eps_inside else std + eps
        return ((flat - mean) / s).reshape(weight.shape).to(weight.dtype)

    def biased(weight, eps=1e-5, *, unbiased=True, eps_inside=False):   # N instead of N - 1
        return good(weight, eps, unbiased=False, eps_inside=eps_inside)

    def inside(weight, eps=1e-5, *, unbiased=True, eps_inside=False):   # eps placement
        return good(weight, eps, unbiased=unbiased, eps_inside=not eps_inside)

    def no_mean(weight, eps=1e-5, *, unbiased=True, eps_inside=False):  # x / s only
        flat = weight.float().reshape(weight.shape[0], -1)
        std = torch.std(flat, dim=1, keepdim=True, correction=int(unbiased))
        return (flat / (std + eps)).reshape(weight.shape).to(weight.dtype)

    assert check(torch_function(good), "weight_standardization", dtype=dtype, size="ci")
    for wrong in (biased, inside, no_mean):
        assert not check(torch_function(wrong), "weight_standardization", dtype=dtype,
                         size="ci"), wrong.__name__


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_oracle_catches_wrong_scaled_weight_standardization(torch, dtype):
    from refnorm.oracle import check, torch_function

    def make(root_n=True, clamp_n=True):
        def fn(weight, gain=None, gamma=1.0, eps=1e-4, *, eps_mode="clamp"):
            flat = weight.float().reshape(weight.shape[0], -1)
            n = flat.shape[1]
            var, mean = torch.var_mean(flat, dim=1, keepdim=True, correction=0)
            if eps_mode == "add":
                scale = torch.rsqrt(var + eps) * (gamma / (n ** 0.5 if root_n else 1.0))
            else:
                scale = torch.rsqrt(torch.clamp((n if clamp_n else 1) * var, min=eps)) * gamma
            if gain is not None:
                scale = scale * gain.float().reshape(-1, 1)
            return ((flat - mean) * scale).reshape(weight.shape).to(weight.dtype)
        return fn

    assert check(torch_function(make()), "scaled_weight_standardization", dtype=dtype,
                 size="ci")
    assert not check(torch_function(make(root_n=False)), "scaled_weight_standardization",
                     dtype=dtype, size="ci")
    assert not check(torch_function(make(clamp_n=False)), "scaled_weight_standardization",
                     dtype=dtype, size="ci")

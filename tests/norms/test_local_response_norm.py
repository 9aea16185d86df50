"""Local Response Normalization: PyTorch's window and divisor, exact identities, the backward."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.autograd import Tensor
from refnorm.gradcheck import check_vjp
from refnorm.norms.local_response_norm import (local_response_norm, local_response_norm_backward,
                                               local_response_norm_composite,
                                               local_response_norm_forward)


def _by_definition(x, size, alpha, beta, k):
    """The formula element by element: window [c - size//2, c + (size-1)//2], divisor size."""
    y = np.empty_like(x)
    channels = x.shape[1]
    for c in range(channels):
        lo, hi = c - size // 2, c + (size - 1) // 2
        s = sum(x[:, j] ** 2 for j in range(max(lo, 0), min(hi, channels - 1) + 1))
        y[:, c] = x[:, c] * (k + alpha / size * s) ** -beta
    return y


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("shape", [(2, 7), (2, 7, 3), (2, 7, 3, 2), (1, 7, 2, 2, 3)])
def test_forward_is_the_defining_formula(rng, shape, size):
    x = rng.standard_normal(shape)
    y, _ = local_response_norm_forward(x, size, alpha=2.0, beta=0.75, k=1.5)
    np.testing.assert_allclose(y, _by_definition(x, size, 2.0, 0.75, 1.5), rtol=1e-14)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(2, 6, 5), (2, 6, 3, 4), (1, 6, 2, 3, 2)])
def test_matches_torch_including_even_sizes_and_borders(rng, torch, shape, size):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    y, cache = local_response_norm_forward(x, size, alpha=3.0, beta=0.6, k=0.7)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha=3.0, beta=0.6, k=0.7)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-14, atol=1e-15)
    dx = local_response_norm_backward(dy, cache).dx
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-13, atol=1e-15)


def test_two_dimensional_input_is_torch_on_a_trailing_unit_axis(rng, torch):
    """PyTorch refuses (N, C); refnorm accepts it as (N, C, 1) without the unit axis."""
    x = rng.standard_normal((3, 8))
    with pytest.raises(ValueError, match="3D or higher"):
        torch.nn.functional.local_response_norm(torch.tensor(x), 3)
    y, _ = local_response_norm_forward(x, 3, alpha=1.0)
    y3, _ = local_response_norm_forward(x[..., None], 3, alpha=1.0)
    np.testing.assert_array_equal(y, y3[..., 0])


def test_alpha_is_divided_by_size_also_at_the_borders(rng):
    """One nonzero channel: every channel whose window holds it sees D = k + alpha/n x^2."""
    x = np.zeros((1, 5, 1))
    x[0, 0, 0] = 2.0  # the first channel: at the border, windows hold fewer than n channels
    _, cache = local_response_norm_forward(x, 4, alpha=3.0, beta=0.75, k=1.0)
    # size 4: window [c - 2, c + 1], so channel 0 is in the windows of channels 0, 1, 2
    np.testing.assert_array_equal(cache.denom[0, :, 0], [4.0, 4.0, 4.0, 1.0, 1.0])


def test_identities_alpha_zero_and_size_one(rng):
    x = rng.standard_normal((2, 4, 3))
    y, _ = local_response_norm_forward(x, 3, alpha=0.0, beta=0.75, k=2.0)
    np.testing.assert_allclose(y, x * 2.0 ** -0.75, rtol=1e-15)
    y, _ = local_response_norm_forward(x, 1, alpha=0.5, beta=0.5, k=1.0)
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 0.5 * x * x), rtol=2e-16 * 4)


def test_homogeneity_with_k_zero(rng):
    """With k = 0, y(a x) = a^(1 - 2 beta) y(x): exact for a power of two."""
    x = rng.standard_normal((2, 6, 4)) + 3.0
    y, _ = local_response_norm_forward(x, 3, alpha=1.0, beta=0.75, k=0.0)
    y4, _ = local_response_norm_forward(4.0 * x, 3, alpha=1.0, beta=0.75, k=0.0)
    np.testing.assert_array_equal(y4, 4.0 ** (1 - 1.5) * y)


def test_backward_window_is_mirrored_for_even_sizes(rng):
    """A gradient on one output channel c reaches the inputs of its window [c-n/2, c+n/2-1]."""
    x = rng.standard_normal((1, 8, 1))
    _, cache = local_response_norm_forward(x, 4, alpha=2.0)
    dy = np.zeros_like(x)
    dy[0, 4, 0] = 1.0
    dx = local_response_norm_backward(dy, cache).dx
    assert np.flatnonzero(dx[0, :, 0]).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("size", [2, 3, 5])
def test_hand_backward_against_finite_differences_and_engine(rng, size):
    x = rng.standard_normal((2, 6, 3))
    dy = rng.standard_normal(x.shape)
    kw = dict(size=size, alpha=1.7, beta=0.8, k=0.9)
    report = check_vjp(lambda a: local_response_norm_forward(a, **kw)[0],
                       lambda ct, a: tuple(local_response_norm_backward(
                           ct[0], local_response_norm_forward(a, **kw)[1])),
                       [x], mode="slow", rng=rng, rtol=1e-10, atol=1e-12)
    assert report, str(report)
    t = Tensor(x, requires_grad=True)
    local_response_norm_composite(t, **kw).backward(dy)
    t2 = Tensor(x, requires_grad=True)
    local_response_norm(t2, **kw).backward(dy)
    np.testing.assert_allclose(t2.grad, t.grad, rtol=1e-12, atol=1e-14)


def test_accuracy_against_extended_precision(rng):
    x = 1e4 + rng.standard_normal((3, 9, 50))
    dy = rng.standard_normal(x.shape)
    kw = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
    y, cache = local_response_norm_forward(x, **kw)
    yl, cl = local_response_norm_forward(x.astype(np.longdouble), **kw)
    dx = local_response_norm_backward(dy, cache).dx
    dxl = local_response_norm_backward(dy.astype(np.longdouble), cl).dx
    eps = np.finfo(np.float64).eps
    assert np.max(np.abs((y - yl) / yl)) < 4 * eps
    assert np.max(np.abs(dx - dxl)) / np.max(np.abs(dxl)) < 8 * eps


def test_empty_input_and_inputs_not_mutated(rng):
    y, cache = local_response_norm_forward(np.zeros((0, 3, 2)), 3)
    assert y.shape == (0, 3, 2)
    assert local_response_norm_backward(np.zeros((0, 3, 2)), cache).dx.shape == (0, 3, 2)
    x = rng.standard_normal((2, 4, 3))
    x0 = x.copy()
    _, cache = local_response_norm_forward(x, 2, alpha=1.0)
    local_response_norm_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(x, x0)

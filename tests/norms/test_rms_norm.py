"""RMSNorm: the identities and conventions the generic tests do not cover."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms import BY_NAME
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward
from refnorm.norms.rms_norm import default_eps, rms_norm_backward, rms_norm_forward


def _rows(rng, shape=(5, 9)):
    return rng.standard_normal(shape), rng.standard_normal(shape[-1:]) + 1.0


def test_equals_layer_norm_on_zero_mean_rows(rng):
    """On rows with zero mean LayerNorm's variance is RMSNorm's mean square: same output, same
    dweight (dx differs: LayerNorm's also removes the mean direction)."""
    x, w = _rows(rng)
    x -= x.mean(axis=1, keepdims=True)
    dy = rng.standard_normal(x.shape)
    for eps in (1e-5, 0.3):
        y_rms, c_rms = rms_norm_forward(x, 9, w, eps=eps)
        y_ln, c_ln = layer_norm_forward(x, 9, w, None, eps=eps)
        np.testing.assert_allclose(y_rms, y_ln, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(rms_norm_backward(dy, c_rms).dweight,
                                   layer_norm_backward(dy, c_ln).dweight, rtol=1e-13)


@pytest.mark.parametrize("eps", [1e-5, 0.5, None])
def test_dx_dot_x_is_the_eps_fraction_of_g_dot_x(rng, eps):
    """Inside placement: sum(dx * x) = r eps / (ms + eps) * sum(g * x) per row (eps -> 0 gives 0,
    the scale invariance), with g = dy * weight and ms = mean(x^2)."""
    x, w = _rows(rng)
    x *= 1e-2  # small rows, so that eps is not negligible
    dy = rng.standard_normal(x.shape)
    y, cache = rms_norm_forward(x, 9, w, eps=eps)
    dx = rms_norm_backward(dy, cache).dx
    e = default_eps(x.dtype) if eps is None else eps
    ms = np.mean(x * x, axis=1)
    expected = (ms + e) ** -0.5 * e / (ms + e) * np.sum(dy * w * x, axis=1)
    np.testing.assert_allclose(np.sum(dx * x, axis=1), expected,
                               atol=1e-13 * np.abs(dx * x).sum(axis=1).max())


def test_dx_dot_x_outside_placement(rng):
    """Outside placement: sum(dx * x) = eps / (rho + eps)^2 * sum(g * x), rho = sqrt(ms)."""
    x, w = _rows(rng)
    x *= 1e-2
    dy = rng.standard_normal(x.shape)
    eps = 1e-3
    _, cache = rms_norm_forward(x, 9, w, eps=eps, eps_placement="outside")
    dx = rms_norm_backward(dy, cache).dx
    rho = np.sqrt(np.mean(x * x, axis=1))
    expected = eps / (rho + eps) ** 2 * np.sum(dy * w * x, axis=1)
    np.testing.assert_allclose(np.sum(dx * x, axis=1), expected,
                               atol=1e-13 * np.abs(dx * x).sum(axis=1).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eps_none_is_the_machine_epsilon_of_the_dtype(rng, dtype):
    x = (1e-4 * rng.standard_normal((3, 8))).astype(dtype)  # ms ~ 1e-8: eps matters
    eps = np.finfo(dtype).eps
    assert default_eps(dtype) == eps
    y_none, _ = rms_norm_forward(x, 8)
    y_explicit, _ = rms_norm_forward(x, 8, eps=float(eps))
    np.testing.assert_array_equal(y_none, y_explicit)
    y_other, _ = rms_norm_forward(x, 8, eps=1e-3)
    assert not np.allclose(y_none, y_other)


def test_eps_none_for_float16_follows_pytorch_float32_epsilon():
    assert default_eps(np.float16) == np.finfo(np.float32).eps


def test_eps_none_matches_torch_default_for_float32(rng, torch):
    x = (1e-3 * rng.standard_normal((4, 16))).astype(np.float32)
    w = (rng.standard_normal(16) + 1).astype(np.float32)
    y, _ = rms_norm_forward(x, 16, w)
    yt = torch.nn.functional.rms_norm(torch.tensor(x), (16,), torch.tensor(w)).numpy()
    np.testing.assert_allclose(y, yt, rtol=2e-6)


def test_outside_placement_formula(rng):
    x, w = _rows(rng)
    eps = 1e-2
    y, _ = rms_norm_forward(x, 9, w, eps=eps, eps_placement="outside")
    expected = x / (np.sqrt(np.mean(x * x, axis=1, keepdims=True)) + eps) * w
    np.testing.assert_allclose(y, expected, rtol=1e-15)
    y_in, _ = rms_norm_forward(x, 9, w, eps=eps)
    assert not np.allclose(y, y_in, rtol=1e-6)


def test_outside_placement_zero_row_gradient_is_the_limit(rng):
    """At a zero row sqrt(mean(x^2)) is a cone: the gradient is taken as the limit g / eps,
    and it is what the gradient tends to as the row shrinks to zero."""
    x, w = _rows(rng, (3, 6))
    x[1] = 0.0
    dy = rng.standard_normal(x.shape)
    eps = 1e-3
    _, cache = rms_norm_forward(x, 6, w, eps=eps, eps_placement="outside")
    dx = rms_norm_backward(dy, cache).dx
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx[1], dy[1] * w / eps, rtol=1e-15)
    tiny = x.copy()
    tiny[1] = 1e-12 * rng.standard_normal(6)
    _, cache_tiny = rms_norm_forward(tiny, 6, w, eps=eps, eps_placement="outside")
    dx_tiny = rms_norm_backward(dy, cache_tiny).dx
    np.testing.assert_allclose(dx_tiny[1], dx[1], rtol=1e-8)


@pytest.mark.parametrize("placement,power", [("inside", 2), ("outside", 1)])
def test_scale_invariance_per_placement(rng, placement, power):
    """x -> a x leaves y unchanged when eps -> a^2 eps (inside) or eps -> a eps (outside); the
    other rescaling of eps does not (which is why the record declares no invariance)."""
    x, w = _rows(rng)
    eps, a = 1e-2, 3.7
    y, _ = rms_norm_forward(x, 9, w, eps=eps, eps_placement=placement)
    y_scaled, _ = rms_norm_forward(a * x, 9, w, eps=eps * a ** power, eps_placement=placement)
    np.testing.assert_allclose(y_scaled, y, rtol=1e-13)
    y_wrong, _ = rms_norm_forward(a * x, 9, w, eps=eps * a ** (3 - power),
                                  eps_placement=placement)
    assert not np.allclose(y_wrong, y, rtol=1e-6)


def test_not_shift_invariant(rng):
    x, _ = _rows(rng)
    assert not np.allclose(rms_norm_forward(x + 1.0, 9)[0], rms_norm_forward(x, 9)[0])


def test_no_weight_equals_unit_weight(rng):
    x, _ = _rows(rng)
    dy = rng.standard_normal(x.shape)
    for placement in ("inside", "outside"):
        y0, c0 = rms_norm_forward(x, 9, None, 1e-5, eps_placement=placement)
        y1, c1 = rms_norm_forward(x, 9, np.ones(9), 1e-5, eps_placement=placement)
        np.testing.assert_array_equal(y0, y1)
        np.testing.assert_array_equal(rms_norm_backward(dy, c0).dx, rms_norm_backward(dy, c1).dx)


def test_outside_torch_call_is_the_same_formula(rng, torch):
    """The record's torch_call for the outside placement (torch has none) is torch ops."""
    spec = BY_NAME["rms_norm"]
    x, w = _rows(rng)
    yt = spec.torch_call(torch, torch.tensor(x), torch.tensor(w), normalized_shape=(9,),
                         eps=1e-3, eps_placement="outside")
    y, _ = rms_norm_forward(x, 9, w, eps=1e-3, eps_placement="outside")
    np.testing.assert_allclose(yt.numpy(), y, rtol=1e-14)


def test_float16_input_keeps_its_dtype():
    x = np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)
    y, cache = rms_norm_forward(x, 4)
    assert y.dtype == np.float16
    assert rms_norm_backward(np.ones_like(x), cache).dx.dtype == np.float16

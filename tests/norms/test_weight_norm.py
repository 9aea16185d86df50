"""Weight normalization: scale invariance in v, the gradient's orthogonality, PyTorch's dim rules."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.weight_norm import (weight_norm_backward, weight_norm_forward,
                                       weight_norm_init)

EPS = np.finfo(np.float64).eps

# (shape, dim, the axes the norm runs over)
LAYOUTS = [((5, 4), 0, (1,)), ((3, 2, 2, 2), 0, (1, 2, 3)), ((3, 4, 2), 1, (0, 2)),
           ((3, 4, 2), 2, (0, 1)), ((3, 4, 2), -2, (0, 2)), ((4, 5), None, (0, 1)),
           ((4, 5), -1, (0, 1)), ((6,), None, (0,))]


def _g(rng, shape, axes):
    keep = tuple(1 if a in axes else n for a, n in enumerate(shape))
    return rng.standard_normal(keep if len(axes) < len(shape) else ()) + 0.5


@pytest.mark.parametrize("shape,dim,axes", LAYOUTS)
def test_w_has_the_direction_of_v_and_the_length_of_g(rng, shape, dim, axes):
    v = rng.standard_normal(shape)
    g = _g(rng, shape, axes)
    w, _ = weight_norm_forward(v, g, dim)
    keep = np.broadcast_to(g, w.shape) if g.ndim else g
    norm_w = np.sqrt(np.sum(w * w, axis=axes, keepdims=g.ndim > 0))
    np.testing.assert_allclose(norm_w, np.abs(g), rtol=4 * EPS)
    np.testing.assert_allclose(w * np.sign(keep), v / np.sqrt(np.sum(v * v, axis=axes,
                                                                     keepdims=True)) * np.abs(keep),
                               rtol=4 * EPS, atol=1e-300)


@pytest.mark.parametrize("shape,dim,axes", LAYOUTS)
def test_invariant_to_the_scale_of_v_and_gradient_orthogonal_to_v(rng, shape, dim, axes):
    v = rng.standard_normal(shape)
    g = _g(rng, shape, axes)
    w, cache = weight_norm_forward(v, g, dim)
    np.testing.assert_array_equal(weight_norm_forward(4.0 * v, g, dim)[0], w)  # exact: 2^k
    np.testing.assert_allclose(weight_norm_forward(3.7 * v, g, dim)[0], w, rtol=4 * EPS)
    dw = rng.standard_normal(shape)
    dv, dg = weight_norm_backward(dw, cache)
    # <dv, v> = 0 per slice, to rounding: compare with the size of the terms
    inner = np.sum(dv * v, axis=axes)
    assert np.all(np.abs(inner) <= 16 * EPS * np.sum(np.abs(dv * v), axis=axes))
    # dg = <dw, v / ||v||> per slice
    vhat = v / np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
    np.testing.assert_allclose(dg, np.sum(dw * vhat, axis=axes).reshape(np.shape(g)),
                               rtol=1e-14)


def test_dim_minus_one_is_the_whole_tensor_as_in_torch(rng, torch):
    """PyTorch's convention: dim=None and dim=-1 both mean "no axis kept" (not the last axis)."""
    v = rng.standard_normal((3, 4))
    g = np.array(1.7)
    w_none, _ = weight_norm_forward(v, g, None)
    w_m1, _ = weight_norm_forward(v, g, -1)
    np.testing.assert_array_equal(w_none, w_m1)
    np.testing.assert_allclose(w_none, 1.7 * v / np.linalg.norm(v), rtol=4 * EPS)
    assert torch.norm_except_dim(torch.tensor(v), 2, -1).shape == ()
    np.testing.assert_allclose(torch._weight_norm(torch.tensor(v), torch.tensor(g), -1).numpy(),
                               w_m1, rtol=4 * EPS)
    # The last axis is dim = ndim - 1, and -2 counts from the end as usual
    g_last = rng.standard_normal((1, 4))
    np.testing.assert_array_equal(weight_norm_forward(v, g_last, 1)[0],
                                  weight_norm_forward(v.T.copy(), g_last.T.copy(), 0)[0].T)
    g_first = rng.standard_normal((3, 1))
    np.testing.assert_array_equal(weight_norm_forward(v, g_first, -2)[0],
                                  weight_norm_forward(v, g_first, 0)[0])


def test_init_reproduces_the_weight(rng, torch):
    weight = rng.standard_normal((6, 3, 2))
    v, g = weight_norm_init(weight)
    np.testing.assert_allclose(weight_norm_forward(v, g)[0], weight, rtol=4 * EPS)
    module = torch.nn.Linear(6, 6)
    with torch.no_grad():
        module.weight = torch.nn.Parameter(torch.tensor(weight.reshape(6, 6)))
    torch.nn.utils.parametrizations.weight_norm(module)
    g_torch = module.parametrizations.weight.original0.detach().numpy()
    np.testing.assert_allclose(g.reshape(6, 1), g_torch, rtol=4 * EPS)


def test_zero_slice_raises_where_torch_returns_nan(rng, torch):
    v = rng.standard_normal((3, 4))
    v[2] = 0.0
    g = np.ones((3, 1))
    w_torch = torch._weight_norm(torch.tensor(v), torch.tensor(g), 0).numpy()
    assert np.isnan(w_torch[2]).all() and np.isfinite(w_torch[:2]).all()
    with pytest.raises(ValueError, match=r"`v` has a slice with zero norm .* index \(2, 0\)"):
        weight_norm_forward(v, g, 0)
    with pytest.raises(ValueError, match=r"`v` has a slice with zero norm"):
        weight_norm_forward(np.zeros(4), np.array(1.0), None)


def test_one_element_slices_give_sign_and_an_exactly_zero_dv(rng):
    """dim=0 on (n, 1): w = g sign(v), so dv = 0, and it comes out exactly 0."""
    v = rng.standard_normal((7, 1)) * np.logspace(-3, 3, 7)[:, None]
    g = rng.standard_normal((7, 1))
    w, cache = weight_norm_forward(v, g, 0)
    np.testing.assert_array_equal(w, g * np.sign(v))
    dw = rng.standard_normal(v.shape)
    dv, dg = weight_norm_backward(dw, cache)
    np.testing.assert_array_equal(dv, 0.0)
    np.testing.assert_array_equal(dg, dw * np.sign(v))


@pytest.mark.parametrize("scale", [1e-160, 1e-200, 1e160, 1e300])
def test_tiny_and_huge_v_whose_squares_underflow_or_overflow(rng, scale):
    v = rng.standard_normal((3, 5))
    g = rng.standard_normal((3, 1))
    w_ref, c_ref = weight_norm_forward(v, g, 0)
    w, cache = weight_norm_forward(v * scale, g, 0)
    np.testing.assert_allclose(w, w_ref, rtol=8 * EPS)
    dw = rng.standard_normal(v.shape)
    dv_ref, dg_ref = weight_norm_backward(dw, c_ref)
    dv, dg = weight_norm_backward(dw, cache)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-14)
    np.testing.assert_allclose(dv * scale, dv_ref, rtol=1e-13, atol=1e-15)


def test_accuracy_against_extended_precision(rng):
    for dim, shape in ((0, (4, 4097)), (1, (3, 50, 7)), (None, (20, 30))):
        v = 1e4 + rng.standard_normal(shape)
        axes = tuple(range(len(shape))) if dim is None else \
            tuple(a for a in range(len(shape)) if a != dim)
        g = _g(rng, shape, axes)
        dw = rng.standard_normal(shape)
        w, c = weight_norm_forward(v, g, dim)
        wl, cl = weight_norm_forward(v.astype(np.longdouble), g.astype(np.longdouble), dim)
        dv, dg = weight_norm_backward(dw, c)
        dvl, dgl = weight_norm_backward(dw.astype(np.longdouble), cl)
        assert np.max(np.abs((w - wl) / wl)) < 4 * EPS
        # dg = <dw, vhat> cancels (random dw): bound its error by the size of the terms
        terms = np.sum(np.abs(dw * v), axis=axes).reshape(np.shape(g)) / np.sqrt(
            np.sum(v * v, axis=axes)).reshape(np.shape(g))
        assert np.max(np.abs(dg - dgl) / terms) < 4 * EPS
        assert np.max(np.abs(dv - dvl)) / np.max(np.abs(dvl)) < 16 * EPS


def test_matches_torch_parametrization_module(rng, torch):
    """The public parametrization (not just torch._weight_norm) on a Conv2d, gradients included."""
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    torch.nn.utils.parametrizations.weight_norm(conv)
    g_t = conv.parametrizations.weight.original0
    v_t = conv.parametrizations.weight.original1
    with torch.no_grad():
        v_t.copy_(torch.tensor(rng.standard_normal(v_t.shape)))
        g_t.copy_(torch.tensor(rng.standard_normal(g_t.shape)))
    dw = rng.standard_normal(v_t.shape)
    conv.weight.backward(torch.tensor(dw))
    v, g = v_t.detach().numpy().copy(), g_t.detach().numpy().copy()
    w, cache = weight_norm_forward(v, g, 0)
    dv, dg = weight_norm_backward(dw, cache)
    np.testing.assert_allclose(w, conv.weight.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(dv, v_t.grad.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(dg, g_t.grad.numpy(), rtol=1e-13)

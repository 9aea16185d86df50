"""GroupNorm: per-group statistics and invariances (which the generic tests, reducing over axes
of the output, cannot express), the G = C and G = 1 identities, and group-wise gradient sums."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms import BY_NAME
from refnorm.norms.group_norm import group_norm_backward, group_norm_forward, sample_inputs
from refnorm.norms.layer_norm import layer_norm_forward

SHAPES = [((2, 6, 5), 3), ((2, 8, 3, 4), 4), ((1, 6, 2, 3, 2), 2), ((3, 4), 2),
          ((2, 4, 3), 1), ((2, 4, 3), 4), ((3, 4, 1), 4)]


def _inputs(rng, shape):
    c = shape[1]
    return (rng.standard_normal(shape), rng.standard_normal(c) + 1.0, rng.standard_normal(c))


def _groups(a, g):
    return a.reshape(a.shape[0], g, -1)


@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_normalized_statistics_per_group_are_exact(rng, shape, groups, eps):
    """Without affine: each (sample, group) has mean 0 and variance s^2 / (s^2 + eps)."""
    x = 3.0 + 2.0 * rng.standard_normal(shape)
    y, _ = group_norm_forward(x, groups, eps=eps)
    s2 = _groups(x, groups).astype(np.longdouble).var(axis=2)
    np.testing.assert_allclose(_groups(y, groups).mean(axis=2), 0.0, atol=1e-14)
    np.testing.assert_allclose(_groups(y, groups).var(axis=2),
                               (s2 / (s2 + eps)).astype(np.float64), rtol=1e-12, atol=1e-15)


def test_sample_inputs_statistics_per_group():
    """The same on the record's own sample inputs (what the generic test would check)."""
    for sample in sample_inputs(np.random.default_rng(0)):
        x, groups, eps = sample.arrays[0], sample.kwargs["num_groups"], sample.kwargs["eps"]
        y, _ = group_norm_forward(x, groups, eps=eps)
        s2 = _groups(x, groups).astype(np.longdouble).var(axis=2)
        np.testing.assert_allclose(_groups(y, groups).mean(axis=2), 0.0, atol=1e-14)
        np.testing.assert_allclose(_groups(y, groups).var(axis=2),
                                   (s2 / (s2 + eps)).astype(np.float64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_shift_and_scale_invariance_per_group(rng, shape, groups):
    x, w, b = _inputs(rng, shape)
    y, _ = group_norm_forward(x, groups, w, b, eps=1e-3)
    n = shape[0]
    per_group = rng.standard_normal((n, groups, 1))
    shifted = (_groups(x, groups) + per_group).reshape(shape)
    np.testing.assert_allclose(group_norm_forward(shifted, groups, w, b, eps=1e-3)[0], y,
                               rtol=1e-10, atol=1e-10)
    a = 3.7
    scaled, _ = group_norm_forward(a * x, groups, w, b, eps=1e-3 * a * a)
    np.testing.assert_allclose(scaled, y, rtol=1e-12, atol=1e-13)


def test_not_invariant_to_a_shift_of_one_channel_when_groups_are_wider(rng):
    x, w, b = _inputs(rng, (2, 4, 5))
    shifted = x.copy()
    shifted[:, 0] += 1.0
    y, _ = group_norm_forward(x, 2, w, b)
    assert not np.allclose(group_norm_forward(shifted, 2, w, b)[0], y)


def _instance_norm_numpy(x, weight, bias, eps):
    axes = tuple(range(2, x.ndim))
    xc = x - x.mean(axis=axes, keepdims=True)
    xhat = xc / np.sqrt(np.mean(xc * xc, axis=axes, keepdims=True) + eps)
    affine = (-1,) + (1,) * (x.ndim - 2)
    return xhat * weight.reshape(affine) + bias.reshape(affine)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 4, 3, 5)])
def test_g_equals_c_is_instance_norm(rng, shape):
    x, w, b = _inputs(rng, shape)
    y, _ = group_norm_forward(x, shape[1], w, b, eps=1e-5)
    np.testing.assert_allclose(y, _instance_norm_numpy(x, w, b, 1e-5), rtol=1e-13, atol=1e-13)
    spec = BY_NAME.get("instance_norm")
    if spec is not None:  # the registered variant, once there is one
        args = {"x": x, "weight": w, "bias": b}
        result = spec.forward(**{k: args[k] for k in spec.diff_argnames if k in args}, eps=1e-5)
        np.testing.assert_allclose(result[0], y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 4, 3, 5), (3, 5)])
def test_g_one_is_layer_norm_over_channels_and_space_then_per_channel_affine(rng, shape):
    x, w, b = _inputs(rng, shape)
    y, _ = group_norm_forward(x, 1, w, b, eps=1e-5)
    ln, _ = layer_norm_forward(x, shape[1:], None, None, eps=1e-5)
    affine = (-1,) + (1,) * (x.ndim - 2)
    np.testing.assert_allclose(y, ln * w.reshape(affine) + b.reshape(affine), rtol=1e-13,
                               atol=1e-13)


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_dx_sums_to_zero_and_is_orthogonal_to_xhat_in_each_group(rng, shape, groups):
    """Shift invariance makes dx sum to 0 over each group; scale invariance (broken only by eps)
    makes sum(dx * xhat) = r * eps / (var + eps) * sum(g * xhat) per group, g = gamma * dy."""
    x, w, b = _inputs(rng, shape)
    dy = rng.standard_normal(shape)
    eps = 1e-2
    y, cache = group_norm_forward(x, groups, w, b, eps=eps)
    dx = group_norm_backward(dy, cache).dx
    scale = np.abs(_groups(dx, groups)).sum(axis=2)
    np.testing.assert_allclose(_groups(dx, groups).sum(axis=2), 0.0, atol=1e-14 * scale.max())
    xhat, rstd = _groups(cache.xhat, groups), cache.rstd[..., 0]
    g_xhat = _groups(dy * w.reshape((-1,) + (1,) * (x.ndim - 2)), groups) * xhat
    # sum dx xhat = r (sum g xhat - sum xhat^2 <g xhat>) and sum xhat^2 = M var r^2
    expected = rstd * g_xhat.sum(axis=2) * eps * rstd ** 2
    np.testing.assert_allclose((_groups(dx, groups) * xhat).sum(axis=2), expected,
                               atol=1e-13 * scale.max())


def test_parameter_gradients(rng):
    x, w, b = _inputs(rng, (3, 6, 4, 5))
    dy = rng.standard_normal(x.shape)
    _, cache = group_norm_forward(x, 3, w, b)
    grads = group_norm_backward(dy, cache)
    np.testing.assert_allclose(grads.dweight, (dy * cache.xhat).sum(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(grads.dbias, dy.sum(axis=(0, 2, 3)), rtol=1e-13)


def test_one_element_groups_give_the_bias_and_zero_dx(rng):
    x, w, b = _inputs(rng, (3, 4, 1))
    dy = rng.standard_normal(x.shape)
    y, cache = group_norm_forward(x, 4, w, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b[:, None], y.shape))
    grads = group_norm_backward(dy, cache)
    np.testing.assert_array_equal(grads.dx, 0.0)
    np.testing.assert_array_equal(grads.dweight, 0.0)


def test_non_contiguous_input(rng):
    x, w, b = _inputs(rng, (5, 6, 4))
    xt = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)  # same values, F-order
    assert not xt.flags.c_contiguous
    dy = rng.standard_normal(x.shape)
    y, c = group_norm_forward(x, 3, w, b)
    yt, ct = group_norm_forward(xt, 3, w, b)
    np.testing.assert_array_equal(y, yt)
    np.testing.assert_array_equal(group_norm_backward(dy, c).dx, group_norm_backward(dy, ct).dx)


def test_saved_statistics(rng):
    x, w, b = _inputs(rng, (2, 6, 3, 3))
    _, cache = group_norm_forward(x, 3, w, b, eps=1e-5)
    xg = _groups(x, 3)
    np.testing.assert_allclose(cache.mean[..., 0], xg.mean(axis=2), rtol=1e-14)
    np.testing.assert_allclose(cache.rstd[..., 0], 1 / np.sqrt(xg.var(axis=2) + 1e-5), rtol=1e-14)


def test_matches_torch_module_defaults(rng, torch):
    """nn.GroupNorm's parameters start at 1 and 0: the same as weight=None, bias=None."""
    x = rng.standard_normal((2, 8, 5))
    module = torch.nn.GroupNorm(4, 8).double()
    yt = module(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(group_norm_forward(x, 4)[0], yt, rtol=1e-12, atol=1e-14)


def test_num_groups_error_names_the_argument():
    with pytest.raises(ValueError, match=r"group_norm: `num_groups` must be a positive divisor "
                                         r"of the number of channels x.shape\[1\] = 6, got 4"):
        group_norm_forward(np.ones((2, 6, 3)), 4)
    with pytest.raises(TypeError, match=r"`num_groups` must be an int, got bool"):
        group_norm_forward(np.ones((2, 6, 3)), True)

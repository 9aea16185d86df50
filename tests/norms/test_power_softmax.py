"""Power-Softmax at the ends of float64's range, against the formula in long double."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.power_softmax import power_softmax_backward, power_softmax_forward


def _reference(x, dy, p, mask):
    """y_i = s_i^p / sum_j s_j^p and dx_i = M_i p s_i^{p-1} / Z (dy_i - <dy, y>), eps = 0,
    written directly in long double (its exponent range holds s^p for float64 s, p <= 8)."""
    s = np.where(mask, x, 0).astype(np.longdouble)
    z = np.sum(s ** p, axis=-1, keepdims=True)
    y = s ** p / z
    d = np.sum(dy * y, axis=-1, keepdims=True)
    k = np.where(mask, p * s ** (p - 1) / z, 0)
    # the size of dx_i's terms, k_i (|dy_i| + sum_j |dy_j y_j|): where dy_i - D cancels, the
    # error is relative to it (as in the oracle's model), not to dx_i
    size = np.abs(k) * (np.abs(dy) + np.sum(np.abs(dy * y), axis=-1, keepdims=True))
    return y, k * (dy - d), size                    # long double


@pytest.mark.parametrize("scale", [1e-309, 1e-300, 1e-160, 1e160, 1e300])
def test_tiny_and_huge_rows_give_the_long_double_formula(rng, scale):
    if np.finfo(np.longdouble).maxexp <= np.finfo(np.float64).maxexp:
        pytest.skip("no long double wider than float64 on this platform")
    # the reliability test's failure: a causal row of two subnormal scores, where 1/max|s|
    # exceeds float64 but dx does not (it was -inf)
    x = np.array([[[2.87e-300, -4.15e-304], [-1.17147458235424e-309, 1.1210417850362864e-308]]])
    x = np.concatenate([x, scale * rng.standard_normal((1, 2, 2))])
    x = np.concatenate([x, scale * rng.standard_normal((2, 2, 2)) * 10.0 ** rng.uniform(
        -3, 3, (2, 2, 2))], axis=0)
    mask = np.tril(np.ones((2, 2), bool))
    dy = 0.5 + 0.01 * rng.standard_normal(x.shape)       # dy - <dy, y> small: dx finite
    y, cache = power_softmax_forward(x, 4, mask=mask)
    dx = power_softmax_backward(dy, cache).dx
    y_ref, dx_ref, size = _reference(x, dy, 4, np.broadcast_to(mask, x.shape))
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref.astype(np.float64), rtol=1e-14, atol=0)
    finite = np.abs(dx_ref) <= np.finfo(np.float64).max
    assert finite[0].all() and (np.isinf(dx[~finite]) & (np.sign(dx) == np.sign(dx_ref))[
        ~finite]).all()
    err = np.abs(dx.astype(np.longdouble) - dx_ref)       # in long double: size may exceed
    assert (err[finite] <= 1e-14 * size[finite] + 5e-324).all()     # float64 (1/s)

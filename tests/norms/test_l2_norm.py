"""L2 normalization of vectors whose norm is subnormal (it has lost significant bits)."""
from __future__ import annotations

import numpy as np

from refnorm.norms.l2_norm import l2_norm_backward, l2_norm_forward


def test_a_float32_vector_with_a_subnormal_norm_is_a_unit_vector():
    """The reliability test's failure (float32, eps = 0, x = [3.46e-41, 8.22e-41]): y was
    0.92177206, 120 ULP from x / ||x|| = 0.92177913 (the norm rounded to a subnormal)."""
    x = np.array([[3.455882272717864e-41, 8.2162332858757e-41]], np.float32)
    y, _ = l2_norm_forward(x, dim=-1, eps=0.0)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(y, (x64 / np.sqrt(np.sum(x64 ** 2))).astype(np.float32))


def test_subnormal_vectors_are_their_exactly_scaled_copies(rng):
    """With eps = 0, y(x) = y(2^k x) and dx(x) = 2^k dx(2^k x) (exact in binary): vectors of
    subnormal float64 values against the same values times 2^1040 (dx then exceeds float64:
    inf of the right sign; dx ~ 1/||x|| overflows for every subnormal norm but by
    cancellation)."""
    ints = rng.integers(1, 9, (3, 4)).astype(np.float64) * rng.choice([-1.0, 1.0], (3, 4))
    normal = np.vstack([ints, rng.standard_normal((2, 4))])
    tiny = normal.copy()
    tiny[:3] = np.ldexp(ints, -1040)
    dy = rng.standard_normal(normal.shape)
    y, cache = l2_norm_forward(tiny, dim=-1, eps=0.0)
    y_ref, cache_ref = l2_norm_forward(normal, dim=-1, eps=0.0)
    np.testing.assert_array_equal(y, y_ref)
    dx, dx_ref = l2_norm_backward(dy, cache).dx, l2_norm_backward(dy, cache_ref).dx
    np.testing.assert_array_equal(dx[3:], dx_ref[3:])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(dx[:3], np.ldexp(dx_ref[:3], 1040))  # inf: beyond float64

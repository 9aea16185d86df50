"""Weight Compander: the paper's inverse initialization and the oracle on wrong candidates."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.weight_compander import (weight_compander_forward, weight_compander_init,
                                            weight_compander_layer_params)


def test_init_inverts_the_compander_and_refuses_what_it_cannot_reach():
    rng = np.random.default_rng(0)
    w0 = 0.3 * rng.standard_normal((8, 5))
    a, b = np.asarray(0.6), np.asarray(0.7)
    v0 = weight_compander_init(w0, a, b)
    np.testing.assert_allclose(weight_compander_forward(v0, a, b)[0], w0, rtol=1e-13, atol=1e-16)
    with pytest.raises(ValueError, match=r"`weight` must lie in"):
        weight_compander_init(np.array([1.0]), a, b)          # 1 > 0.6 pi / 2
    a0, b0 = weight_compander_layer_params()
    assert (float(a0), float(b0)) == (0.5, 1.0)


def test_bounded_and_expanding():
    v = np.linspace(-1e3, 1e3, 2001)
    w, _ = weight_compander_forward(v, np.asarray(1.0), np.asarray(0.6))
    assert np.all(np.abs(w) < np.pi / 2) and np.all(np.diff(w) > 0)
    small = np.array([1e-8])                                  # slope a/b > 1 at 0
    assert weight_compander_forward(small, np.asarray(1.0), np.asarray(0.6))[0][0] > small[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_oracle_catches_wrong_companders(torch, dtype):
    from refnorm.oracle import check, torch_function

    def good(v, a, b):
        return (a.float() * torch.atan(v.float() / b.float())).to(v.dtype)

    def tanh(v, a, b):                                        # another function
        return (a.float() * torch.tanh(v.float() / b.float())).to(v.dtype)

    def b_outside(v, a, b):                                   # a arctan(v) / b
        return (a.float() * torch.atan(v.float()) / b.float()).to(v.dtype)

    def detached_b(v, a, b):                                  # b not learned: db = 0
        return (a.float() * torch.atan(v.float() / b.detach().float())).to(v.dtype)

    assert check(torch_function(good), "weight_compander", dtype=dtype, size="ci")
    for wrong in (tanh, b_outside, detached_b):
        assert not check(torch_function(wrong), "weight_compander", dtype=dtype,
                         size="ci"), wrong.__name__

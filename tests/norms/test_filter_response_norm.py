"""FRN + TLU: the kink, the learned epsilon, and the oracle on wrong candidates."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.gradcheck import check_vjp
from refnorm.norms import BY_NAME
from refnorm.norms.filter_response_norm import (frn_backward, frn_forward, frn_layer_init,
                                                kink_sample)

SPEC = BY_NAME["frn"]


def _check(sample, seed=0):
    present = [i for i, a in enumerate(sample.arrays) if a is not None]

    def full(arrays):
        out = list(sample.arrays)
        for i, a in zip(present, arrays):
            out[i] = a
        return out

    def f(*arrays):
        return SPEC.output(sample, full(arrays))

    def vjp(cts, *arrays):
        grads = SPEC.backward(cts[0], SPEC.run(sample, full(arrays))[2])
        return tuple(grads[i] for i in present)

    return check_vjp(f, vjp, [sample.arrays[i] for i in present], mode="slow",
                     rng=np.random.default_rng(seed), rtol=1e-9, atol=1e-12)


def test_the_tlu_kink_is_reported_as_a_kink_not_a_failure():
    sample = kink_sample(np.random.default_rng(0))
    x, weight, bias, tau, _ = sample.arrays
    z = weight[None, :, None, None] * frn_forward(x, None, None, None, None, 0.0)[0] \
        + bias[None, :, None, None]
    assert np.sum(z[0] == tau[:, None, None]) == 3          # one tie per channel, exact
    report = _check(sample)
    assert report, str(report)
    assert report.kinks, "the tie z == tau must be seen as a kink"
    assert {k.input for k in report.kinks} >= {0, 3}          # through x and through tau
    assert report.normwise_error < 1e-9                      # the smooth elements are exact
    # the backward splits the tie: dtau gets half of dy at each tied element
    dy = np.random.default_rng(1).standard_normal(x.shape)
    _, cache = frn_forward(*sample.arrays, **sample.kwargs)
    assert np.all(cache.share[z == tau[None, :, None, None]] == 0.5)
    g = frn_backward(dy, cache)
    want = np.sum(dy * np.where(z > tau[None, :, None, None], 0.0,
                                np.where(z == tau[None, :, None, None], 0.5, 1.0)), axis=(0, 2, 3))
    np.testing.assert_allclose(g.dtau, want, rtol=1e-14)


@pytest.mark.parametrize("offset", [1e-3, -1e-3, 1e-7, -1e-7])
def test_near_the_kink_passes(offset):
    """tau just above / below the tie: at 1e-7 every finite-difference step straddles it;
    still no failure (one one-sided slope is the true derivative, the other is seen as a
    kink's)."""
    report = _check(kink_sample(np.random.default_rng(0), offset))
    assert report, str(report)


def test_learned_eps_is_eps_plus_its_absolute_value():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3))
    for eps_l in (2e-4, -2e-4):
        y, _ = frn_forward(x, None, None, None, np.array([eps_l]), 1e-6)
        np.testing.assert_allclose(y, x / np.sqrt(x * x + 1e-6 + 2e-4), rtol=1e-15)


def test_layer_init():
    params, state, kwargs = frn_layer_init(5, learned_eps=True)
    assert set(params) == {"weight", "bias", "tau", "eps_l"} and state == {}
    assert np.all(params["weight"] == 1) and np.all(params["tau"] == 0)
    assert params["eps_l"].shape == (1,) and params["eps_l"][0] == 1e-4 and kwargs["eps"] == 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_oracle_catches_wrong_frn(torch, dtype):
    """The kink term of the tolerance model does not hide the classic mistakes."""
    from refnorm.oracle import check, torch_function

    def make(centre=False, eps_outside=False, relu=False):
        def fn(x, weight=None, bias=None, tau=None, eps_l=None, eps=1e-6):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            dims = tuple(range(2, x.ndim))
            xf = x.float()
            if centre and dims:
                xf = xf - xf.mean(dim=dims, keepdim=True)
            nu2 = xf.pow(2).mean(dim=dims, keepdim=True) if dims else xf * xf
            e = eps + eps_l.float().abs() if eps_l is not None else eps
            z = xf / (nu2.sqrt() + e) if eps_outside else xf * torch.rsqrt(nu2 + e)
            z = z * weight.float().reshape(shape) if weight is not None else z
            z = z + bias.float().reshape(shape) if bias is not None else z
            if tau is not None:
                t = tau.float().reshape(shape)
                d = z - t                                    # a NaN reaches the gradients
                z = torch.relu(z) if relu else torch.maximum(z, t) + torch.where(
                    torch.isnan(d), d * d, torch.zeros_like(d))
            return z.to(x.dtype)
        return fn

    assert check(torch_function(make()), "frn", dtype=dtype, size="ci")
    for wrong in (dict(centre=True), dict(eps_outside=True), dict(relu=True)):
        assert not check(torch_function(make(**wrong)), "frn", dtype=dtype, size="ci"), wrong

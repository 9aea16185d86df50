"""Switchable Norm: one-hot weights give InstanceNorm with the unbiased variance; the running
statistics; the oracle's tolerance terms for the mixing logits still catch mistakes."""
from __future__ import annotations

import numpy as np

from refnorm.norms.instance_norm import instance_norm_forward
from refnorm.norms.switchable_norm import switchable_norm_forward


def test_one_hot_in_weights_give_instance_norm_with_the_unbiased_variance(rng):
    """softmax([1000, 0, 0]) is (1, 0, 0) exactly: y = xc / sqrt(v_unbiased + eps), which is
    sqrt((M-1)/M) IN(x) with eps (M-1)/M."""
    x = rng.standard_normal((3, 4, 5))
    m, eps = 5, 1e-3
    one_hot = np.array([1000.0, 0.0, 0.0])
    y, _, _ = switchable_norm_forward(x, np.zeros(4), np.ones(4), None, None, one_hot, one_hot,
                                      True, eps=eps)
    yi, _, _ = instance_norm_forward(x, eps=eps * (m - 1) / m)
    np.testing.assert_allclose(y, np.sqrt((m - 1) / m) * yi, rtol=1e-13, atol=1e-14)


def test_running_statistics_follow_the_batch_statistics(rng):
    x = 2.0 + rng.standard_normal((4, 3, 6))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    _, state, _ = switchable_norm_forward(x, rm, rv, training=True, momentum=0.3)
    mu_in = x.mean(axis=2)
    v_in = x.var(axis=2, ddof=1)
    mu_bn = mu_in.mean(axis=0)
    v_bn = (v_in + mu_in ** 2).mean(axis=0) - mu_bn ** 2     # the official code's form
    np.testing.assert_allclose(state.running_mean, 0.7 * rm + 0.3 * mu_bn, rtol=1e-13)
    np.testing.assert_allclose(state.running_var, 0.7 * rv + 0.3 * v_bn, rtol=1e-12)


def test_the_oracle_catches_wrong_switchable_norms(torch):
    """The logits' tolerance terms (tolerance.py, ``_mixture_terms``) pass the correct torch-op
    implementation (test_oracle's no-false-alarm test) but not a biased instance variance, nor
    the IN and LN weights swapped."""
    from refnorm.norms.switchable_norm import _torch_call
    from refnorm.oracle import check, torch_function

    def correct(x, weight=None, bias=None, mean_weight=None, var_weight=None, **kw):
        return _torch_call(torch, x, weight, bias, mean_weight, var_weight, **kw)

    def unbiased_to_biased(x, weight=None, bias=None, mean_weight=None, var_weight=None, **kw):
        # the same computation with the biased instance variance (torch.var correction=0)
        orig = torch.Tensor.var

        def var(self, *args, **kwargs):
            kwargs.setdefault("correction", 0)
            return orig(self, *args, **kwargs)
        torch.Tensor.var = var
        try:
            return _torch_call(torch, x, weight, bias, mean_weight, var_weight, **kw)
        finally:
            torch.Tensor.var = orig

    def swapped(x, weight=None, bias=None, mean_weight=None, var_weight=None, **kw):
        perm = [1, 0, 2] if kw.get("using_bn", True) else [1, 0]
        return _torch_call(torch, x, weight, bias,
                           None if mean_weight is None else mean_weight[perm], var_weight, **kw)

    assert check(torch_function(correct), "switchable_norm", dtype="float32", size="ci")
    assert not check(torch_function(unbiased_to_biased), "switchable_norm", dtype="float32",
                     size="ci")
    assert not check(torch_function(swapped), "switchable_norm", dtype="float32", size="ci")

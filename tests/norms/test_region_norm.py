"""Region Normalization: an all-ones mask gives InstanceNorm (N = 1; BatchNorm with batch
statistics for any N); the effective epsilon; the official fill-and-BatchNorm algorithm; the
oracle still catches a plain epsilon."""
from __future__ import annotations

import numpy as np

from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.instance_norm import instance_norm_backward, instance_norm_forward
from refnorm.norms.region_norm import (region_norm_b_backward, region_norm_b_forward,
                                       region_standardize)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_all_ones_mask_is_instance_norm_for_one_sample(rng):
    """RN's statistics run over the batch and the pixels of a region (the official code's
    BatchNorm), so with one region covering everything it is InstanceNorm for N = 1 ..."""
    x = rng.standard_normal((1, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    y, cache = region_norm_b_forward(x, mask=np.ones((1, 1, 4, 5), bool))
    yi, _, cache_i = instance_norm_forward(x)
    assert _rel(y, yi) <= 1e-12
    assert _rel(region_norm_b_backward(dy, cache).dx, instance_norm_backward(dy, cache_i).dx) \
        <= 1e-12


def test_all_ones_mask_is_batch_norm_with_batch_statistics(rng):
    """... and parameter-free BatchNorm in training for any N (S = N_tot: eps is not scaled)."""
    x = 3.0 + rng.standard_normal((4, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    y, cache = region_norm_b_forward(x, mask=np.ones((4, 1, 4, 5), bool))
    yb, _, cache_b = batch_norm_forward(x, None, None, None, None, True)
    assert _rel(y, yb) <= 1e-12
    assert _rel(region_norm_b_backward(dy, cache).dx, batch_norm_backward(dy, cache_b).dx) \
        <= 1e-12


def test_each_region_is_standardized_with_the_effective_epsilon(rng):
    x = rng.standard_normal((2, 3, 5, 4))
    fg = rng.uniform(size=(2, 1, 5, 4)) < 0.3
    eps = 1e-2
    xhat = region_standardize(x, fg, eps).xhat
    total = 2 * 5 * 4
    for region in (fg, ~fg):
        r = np.broadcast_to(region, x.shape)
        s = r[:, 0].sum()
        for c in range(3):
            v, z = x[:, c][r[:, c]], xhat[:, c][r[:, c]]
            np.testing.assert_allclose(z.mean(), 0.0, atol=1e-14)
            np.testing.assert_allclose(z.var(), v.var() / (v.var() + eps * total / s),
                                       rtol=1e-12)


def test_equals_the_official_fill_and_batch_norm_algorithm(rng, torch):
    from refnorm.norms.region_norm import _torch_call_b
    x = rng.standard_normal((2, 4, 6, 6))
    mask = rng.uniform(size=(2, 1, 12, 12)) < 0.4
    ps = [0.3 * rng.standard_normal(4) for _ in range(4)]
    y, _ = region_norm_b_forward(x, *ps, mask=mask)
    yt = _torch_call_b(torch, torch.tensor(x), *[torch.tensor(p) for p in ps], mask=mask)
    assert _rel(y, yt.numpy()) <= 1e-12


def test_the_oracle_catches_a_plain_epsilon(torch):
    """RN-B with eps instead of eps N_tot / S_r (the BatchNorm of the filled input without the
    sqrt(S/N) rescale, i.e. the regions normalized by a plain BatchNorm each)."""
    from refnorm.norms import region_norm
    from refnorm.oracle import check, torch_function

    def plain(x, foreground_gamma=None, foreground_beta=None, background_gamma=None,
              background_beta=None, *, eps=1e-5, mask):
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        m = region_norm._torch_mask(torch, mask, xf)
        rn = 0
        for region in (m, 1 - m):
            s = region.expand_as(xf).sum(dim=(0, 2, 3)).clamp(min=1)
            mu = (xf * region).sum(dim=(0, 2, 3)) / s
            xc = (xf - mu[None, :, None, None]) * region
            var = (xc * xc).sum(dim=(0, 2, 3)) / s
            rn = rn + xc / torch.sqrt(var + eps)[None, :, None, None]

        def p(t):
            return 0 if t is None else t.to(acc)[None, :, None, None]
        y = rn * m * (1 + p(foreground_gamma)) + p(foreground_beta) \
            + rn * (1 - m) * (1 + p(background_gamma)) + p(background_beta)
        return y.to(x.dtype)

    assert not check(torch_function(plain), "region_norm_b", dtype="float32", size="ci")

"""Batch-Channel Normalization: its stages, its state, and the oracle on wrong candidates."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.batch_channel_norm import (_torch_call, batch_channel_norm_forward,
                                              batch_channel_norm_layer_init)
from refnorm.norms.batch_norm import batch_norm_forward
from refnorm.norms.group_norm import group_norm_forward


def test_is_per_group_affine_of_group_norm_of_batch_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 3, 3))
    bw, bb = 1 + 0.3 * rng.standard_normal(6), 0.3 * rng.standard_normal(6)
    w, b = 1 + 0.3 * rng.standard_normal(3), 0.3 * rng.standard_normal(3)
    rm, rv = np.zeros(6), np.ones(6)
    y, state, _ = batch_channel_norm_forward(x, rm, rv, bw, bb, w, b, True, num_groups=3)
    u, bn_state, _ = batch_norm_forward(x, rm, rv, bw, bb, True)
    z, _ = group_norm_forward(u, 3)
    want = z * np.repeat(w, 2)[None, :, None, None] + np.repeat(b, 2)[None, :, None, None]
    np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-15)
    for a, c in zip(state, bn_state):                       # the estimated statistics
        np.testing.assert_array_equal(a, c)
    assert np.all(rm == 0) and np.all(rv == 1)              # never written in place


def test_layer_init():
    p, s, k = batch_channel_norm_layer_init(64)
    assert p["weight"].shape == (32,) and p["bn_weight"].shape == (64,)
    assert np.all(s["running_var"] == 1) and int(s["num_batches_tracked"]) == 0
    assert k["num_groups"] == 32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_oracle_catches_wrong_bcn(torch, dtype):
    from refnorm.oracle import check, torch_function

    def make(per_channel=False, no_bn=False):
        def fn(x, running_mean, running_var, bn_weight=None, bn_bias=None, weight=None,
               bias=None, training=False, momentum=0.1, eps=1e-5, num_groups=32, *,
               num_batches_tracked=0):
            if no_bn:   # the batch stage left out: GN of x directly
                y, state = _torch_call(torch, x, None, None, weight, bias,
                                       running_mean=running_mean, running_var=running_var,
                                       training=training, momentum=momentum, eps=eps,
                                       num_groups=num_groups,
                                       num_batches_tracked=num_batches_tracked)
                z = torch.nn.functional.group_norm(x, num_groups, None, None, eps)
                zg = z.reshape(x.shape[0], num_groups, -1)
                if weight is not None:
                    zg = zg * weight.reshape(1, -1, 1)
                if bias is not None:
                    zg = zg + bias.reshape(1, -1, 1)
                return zg.reshape(x.shape) + 0 * y, state
            if per_channel and weight is not None:  # scales shifted by one group (misindexed)
                weight = torch.cat([weight[:1], weight])[:num_groups]
            return _torch_call(torch, x, bn_weight, bn_bias, weight, bias,
                               running_mean=running_mean, running_var=running_var,
                               training=training, momentum=momentum, eps=eps,
                               num_groups=num_groups, num_batches_tracked=num_batches_tracked)
        return fn

    assert check(torch_function(make()), "batch_channel_norm", dtype=dtype, size="ci")
    for wrong in (dict(per_channel=True), dict(no_bn=True)):
        assert not check(torch_function(make(**wrong)), "batch_channel_norm", dtype=dtype,
                         size="ci"), wrong

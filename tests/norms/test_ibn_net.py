"""IBN-Net: IBN-a with an IN ratio of 0 is BatchNorm, with 1 InstanceNorm; the parts are
independent; IBN-b is affine InstanceNorm."""
from __future__ import annotations

import numpy as np

from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.ibn_net import ibn_a_backward, ibn_a_forward, ibn_b_backward, ibn_b_forward
from refnorm.norms.instance_norm import instance_norm_backward, instance_norm_forward


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_ratio_0_is_batch_norm_in_training_and_evaluation(rng):
    x = rng.standard_normal((4, 5, 3, 2))
    w, b = rng.standard_normal(5) + 1, rng.standard_normal(5)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    dy = rng.standard_normal(x.shape)
    for training in (True, False):
        y, state, cache = ibn_a_forward(x, rm, rv, w, b, training, 0.1, 1e-5, ratio=0.0,
                                        num_batches_tracked=3)
        yb, state_b, cache_b = batch_norm_forward(x, rm, rv, w, b, training, 0.1, 1e-5,
                                                  num_batches_tracked=3)
        assert _rel(y, yb) <= 1e-12
        for key in ("running_mean", "running_var"):
            assert _rel(getattr(state, key), getattr(state_b, key)) <= 1e-12
        assert int(state.num_batches_tracked) == int(state_b.num_batches_tracked)
        for g, gb in zip(ibn_a_backward(dy, cache), batch_norm_backward(dy, cache_b)):
            assert _rel(g, gb) <= 1e-12


def test_ratio_1_is_instance_norm(rng):
    x = rng.standard_normal((3, 4, 5))
    w, b = rng.standard_normal(4) + 1, rng.standard_normal(4)
    dy = rng.standard_normal(x.shape)
    y, _, cache = ibn_a_forward(x, None, None, w, b, True, ratio=1.0)
    yi, _, cache_i = instance_norm_forward(x, None, None, w, b)
    assert _rel(y, yi) <= 1e-12
    for g, gi in zip(ibn_a_backward(dy, cache), instance_norm_backward(dy, cache_i)):
        assert _rel(g, gi) <= 1e-12


def test_the_two_parts_are_independent_and_in_the_official_order(rng):
    """Official IBN: IN on x[:, :h], BN on x[:, h:], h = int(C * ratio); the paper's ConvBNIN
    (in_first=False): BN on the first C - h channels, IN on the last h."""
    x = rng.standard_normal((3, 7, 4))
    w, b = rng.standard_normal(7) + 1, rng.standard_normal(7)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    y, _, _ = ibn_a_forward(x, rm, rv, w, b, True, ratio=0.5)      # h = 3
    yi, _, _ = instance_norm_forward(x[:, :3], None, None, w[:3], b[:3])
    yb, _, _ = batch_norm_forward(x[:, 3:], rm, rv, w[3:], b[3:], True)
    np.testing.assert_array_equal(y[:, :3], yi)
    np.testing.assert_array_equal(y[:, 3:], yb)
    y2, _, _ = ibn_a_forward(x, rm, rv, w, b, True, ratio=0.5, in_first=False)
    yb2, _, _ = batch_norm_forward(x[:, :4], rm, rv, w[:4], b[:4], True)
    yi2, _, _ = instance_norm_forward(x[:, 4:], None, None, w[4:], b[4:])
    np.testing.assert_array_equal(y2[:, :4], yb2)
    np.testing.assert_array_equal(y2[:, 4:], yi2)


def test_ibn_b_is_affine_instance_norm(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    w, b = rng.standard_normal(3) + 1, rng.standard_normal(3)
    dy = rng.standard_normal(x.shape)
    y, cache = ibn_b_forward(x, w, b)
    yi, _, cache_i = instance_norm_forward(x, None, None, w, b)
    np.testing.assert_array_equal(y, yi)
    for g, gi in zip(ibn_b_backward(dy, cache), instance_norm_backward(dy, cache_i)):
        np.testing.assert_array_equal(g, gi)

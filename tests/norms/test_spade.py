"""SPADE: with zero modulation it is the parameter-free BatchNorm (outputs, dx, running
statistics); the nearest resize; the oracle still catches a wrong SPADE."""
from __future__ import annotations

import numpy as np

from refnorm.norms._spatial import nearest_resize
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.spade import sample_inputs, spade_backward, spade_forward


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_zero_modulation_is_parameter_free_batch_norm(rng):
    sample = next(sample_inputs(np.random.default_rng(0)))      # (2,3,4,4)-train
    x, sw, sb, gw, gb, bw, bb = sample.arrays
    kw = sample.kwargs
    dy = rng.standard_normal(x.shape)
    zeros = (sw, sb, np.zeros_like(gw), np.zeros_like(gb), np.zeros_like(bw), np.zeros_like(bb))
    for training in (True, False):
        yb, state_b, cache_b = batch_norm_forward(x, kw["running_mean"], kw["running_var"], None,
                                                  None, training)
        for params in (zeros, (None,) * 6):
            y, state, cache = spade_forward(x, *params, kw["running_mean"], kw["running_var"],
                                            training, segmap=kw["segmap"])
            assert _rel(y, yb) <= 1e-12
            for key in ("running_mean", "running_var"):
                assert _rel(getattr(state, key), getattr(state_b, key)) <= 1e-12
            assert _rel(spade_backward(dy, cache).dx, batch_norm_backward(dy, cache_b).dx) \
                <= 1e-12


def test_nearest_resize_is_pytorchs(rng, torch):
    a = rng.standard_normal((2, 3, 7, 5))
    for size in ((14, 10), (3, 2), (9, 13), (7, 5), (1, 1)):
        want = torch.nn.functional.interpolate(torch.tensor(a), size=size, mode="nearest")
        np.testing.assert_array_equal(nearest_resize(a, size), want.numpy())


def test_the_oracle_catches_a_wrong_spade(torch):
    """Bilinear instead of nearest resizing of the segmentation map, and a missing ReLU."""
    from refnorm.norms.spade import _torch_call
    from refnorm.oracle import check, torch_function
    F = torch.nn.functional

    def make(mode, relu):
        def fn(x, shared_weight=None, shared_bias=None, gamma_weight=None, gamma_bias=None,
               beta_weight=None, beta_bias=None, *, segmap, **kw):
            if shared_weight is None:
                return _torch_call(torch, x, *(None,) * 6, segmap=segmap, **kw)
            nhat, state = _torch_call(torch, x, *(None,) * 6, segmap=segmap, **kw)
            pad = shared_weight.shape[2] // 2
            seg = torch.as_tensor(segmap).float()
            seg = F.interpolate(seg, size=tuple(x.shape[2:]), mode=mode)
            act = F.conv2d(seg, shared_weight.float(), shared_bias.float(), padding=pad)
            act = F.relu(act) if relu else act
            gamma = F.conv2d(act, gamma_weight.float(), gamma_bias.float(), padding=pad)
            beta = F.conv2d(act, beta_weight.float(), beta_bias.float(), padding=pad)
            return (nhat.float() * (1 + gamma) + beta).to(x.dtype), state
        return fn

    assert check(torch_function(make("nearest", True)), "spade", dtype="float32", size="ci")
    assert not check(torch_function(make("bilinear", True)), "spade", dtype="float32",
                     size="ci")
    assert not check(torch_function(make("nearest", False)), "spade", dtype="float32",
                     size="ci")

"""alpha-BN: the two BatchNorm identities, which side the weight is on, and that calibration
helps a source-trained classifier under a synthetic covariate shift."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.alpha_bn import alpha_bn_backward, alpha_bn_forward
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_weight_0_is_batch_norm_eval_and_1_biased_is_batch_norm_training(rng):
    x = 2.0 + 3.0 * rng.standard_normal((6, 4, 5))
    w, b = rng.standard_normal(4) + 1, rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    dy = rng.standard_normal(x.shape)
    y, cache = alpha_bn_forward(x, rm, rv, w, b, test_weight=0.0)
    yb, _, cache_b = batch_norm_forward(x, rm, rv, w, b, False)
    assert _rel(y, yb) <= 1e-12
    for g, gb in zip(alpha_bn_backward(dy, cache), batch_norm_backward(dy, cache_b)):
        assert _rel(g, gb) <= 1e-12
    y, _ = alpha_bn_forward(x, rm, rv, w, b, test_weight=1.0, unbiased=False)
    yb, _, _ = batch_norm_forward(x, rm, rv, w, b, True)
    assert _rel(y, yb) <= 1e-12


def test_the_weight_is_on_the_test_statistics_and_the_test_variance_is_unbiased(rng):
    x = rng.standard_normal((5, 3, 4))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    t = 0.3
    y, cache = alpha_bn_forward(x, rm, rv, test_weight=t)
    mu = (1 - t) * rm + t * x.mean(axis=(0, 2))
    var = (1 - t) * rv + t * x.var(axis=(0, 2), ddof=1)
    expected = (x - mu[:, None]) / np.sqrt(var[:, None] + 1e-5)
    assert _rel(y, expected) <= 1e-13


def _entropy(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return float(np.mean(-np.sum(p * np.log(p + 1e-300), axis=1)))


def test_calibration_lowers_the_error_under_covariate_shift(capsys):
    """A nearest-class-mean classifier on BatchNorm-normalized features, fitted on a seeded
    source task (3 classes, 6 features); the test batch is the same task with every feature
    scaled and shifted. The source statistics mis-normalize it; mixing in the test-batch
    statistics recovers most of the source accuracy."""
    rng = np.random.default_rng(0)
    classes, c, n = 3, 6, 600
    centres = 1.5 * rng.standard_normal((classes, c))

    def task(count):
        labels = rng.integers(0, classes, count)
        return centres[labels] + rng.standard_normal((count, c)), labels

    xs, ls = task(n)
    running_mean, running_var = xs.mean(axis=0), xs.var(axis=0, ddof=1)   # the source BN
    zs, _ = alpha_bn_forward(xs, running_mean, running_var, test_weight=0.0)
    means = np.stack([zs[ls == k].mean(axis=0) for k in range(classes)])

    def logits(z):
        return z @ means.T - 0.5 * np.sum(means ** 2, axis=1)

    source_error = float(np.mean(logits(zs).argmax(axis=1) != ls))
    xt, lt = task(512)
    scale, shift = rng.uniform(1.5, 2.5, c), rng.uniform(-6.0, 6.0, c)
    xt = xt * scale + shift
    rows = []
    for t in (0.0, 0.1, 0.5, 1.0):
        z, _ = alpha_bn_forward(xt, running_mean, running_var, test_weight=t)
        out = logits(z)
        rows.append((t, float(np.mean(out.argmax(axis=1) != lt)), _entropy(out)))
    with capsys.disabled():
        print(f"\nalpha-BN under covariate shift (source error {source_error:.3f}):")
        for t, err, ent in rows:
            print(f"  test_weight={t:.1f}: error {err:.3f}, mean entropy {ent:.3f}")
    before, after = rows[0][1], rows[-1][1]
    assert after < 0.5 * before, rows
    assert rows[2][1] < before, rows           # even a partial mix helps
    assert after <= source_error + 0.05, (after, source_error)


@pytest.mark.parametrize("t", [0.0, 0.4])
def test_source_statistics_are_not_modified(rng, t):
    x = rng.standard_normal((4, 2, 3))
    rm, rv = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    rm0, rv0 = rm.copy(), rv.copy()
    alpha_bn_forward(x, rm, rv, test_weight=t)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_oracle_catches_the_weight_on_the_wrong_side(torch):
    """The per-channel tolerance term (oracle structure.GROUPS["alpha_bn"]) passes the correct
    torch-op implementation (test_oracle's no-false-alarm test) but not one that puts the
    weight on the source statistics, nor one with the biased test variance."""
    from refnorm.norms.alpha_bn import _torch_call
    from refnorm.oracle import check, torch_function

    def swapped(x, weight=None, bias=None, *, running_mean, running_var, eps=1e-5, test_weight,
                unbiased=True):
        return _torch_call(torch, x, weight, bias, running_mean=running_mean,
                           running_var=running_var, eps=eps, test_weight=1 - test_weight,
                           unbiased=unbiased)

    def biased(x, weight=None, bias=None, *, running_mean, running_var, eps=1e-5, test_weight,
               unbiased=True):
        return _torch_call(torch, x, weight, bias, running_mean=running_mean,
                           running_var=running_var, eps=eps, test_weight=test_weight,
                           unbiased=False)

    assert not check(torch_function(swapped), "alpha_bn", dtype="float32", size="ci")
    assert not check(torch_function(biased), "alpha_bn", dtype="float32", size="ci")

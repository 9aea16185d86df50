"""CRMSNorm: the compression identities, and the Pre-LN -> Pre-RMSNorm -> Pre-CRMSNorm
conversion of a small Pre-LN network, on arrays, with the helpers of refnorm.norms.crms_norm."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.crms_norm import (compress, compress_consumer, compress_producer,
                                     crms_norm_forward, decompress, fold_affine_into_consumer,
                                     recenter, recenter_producer)
from refnorm.norms.layer_norm import layer_norm_forward
from refnorm.norms.rms_norm import rms_norm_forward
from refnorm.verify import normwise

EPS = 1e-5


def _ln(x, gamma=None, beta=None):
    return layer_norm_forward(x, x.shape[-1], gamma, beta, EPS)[0]


def _rms(x):
    return rms_norm_forward(x, x.shape[-1], None, EPS)[0]


def _crms(z):
    return crms_norm_forward(z, EPS)[0]


def test_compress_and_decompress_are_inverse_on_zero_mean_vectors(rng):
    x = recenter(rng.standard_normal((5, 9)))
    np.testing.assert_allclose(x.sum(axis=-1), 0.0, atol=1e-14)
    np.testing.assert_allclose(decompress(compress(x)), x, atol=1e-14)
    z = rng.standard_normal((5, 8))
    np.testing.assert_array_equal(compress(decompress(z)), z)
    # the squared norm of the decompressed vector, which CRMSNorm's statistic uses
    np.testing.assert_allclose(np.sum(decompress(z) ** 2, axis=-1),
                               np.sum(z ** 2, axis=-1) + np.sum(z, axis=-1) ** 2, rtol=1e-14)


def test_crms_of_the_compression_is_rms_and_ln_of_the_zero_mean_vector(rng):
    x = recenter(3.0 * rng.standard_normal((6, 17)))
    np.testing.assert_allclose(_rms(x), _ln(x), rtol=1e-13, atol=1e-15)   # eps included
    np.testing.assert_allclose(_crms(compress(x)), compress(_rms(x)), rtol=1e-13, atol=1e-15)
    # on a vector that is not zero-mean RMSNorm and LayerNorm differ
    y = x + 1.0
    assert normwise(_rms(y), _ln(y)) > 1e-2


def _pre_ln_net(p, tokens):
    """A 2-block Pre-LN network on a residual stream of width d (no attention: the conversion
    only cares about who writes into and who reads from the stream)."""
    x = p["embed"][tokens] + p["pos"][: tokens.shape[-1]]
    for blk in p["blocks"]:
        h = _ln(x, blk["g1"], blk["b1"]) @ blk["w_in"].T + blk["c_in"]          # consumer
        x = x + np.tanh(h) @ blk["w_out"].T + blk["c_out"]                       # producer
    return _ln(x, p["gf"], p["bf"]) @ p["head"].T + p["head_b"]


def _rms_net(p, tokens, norm):
    x = p["embed"][tokens] + p["pos"][: tokens.shape[-1]]
    for blk in p["blocks"]:
        h = norm(x) @ blk["w_in"].T + blk["c_in"]
        x = x + np.tanh(h) @ blk["w_out"].T + blk["c_out"]
    return norm(x) @ p["head"].T + p["head_b"]


def _params(rng, d=8, vocab=11, hidden=6, out=5, length=7):
    def blk():
        return dict(g1=1 + 0.3 * rng.standard_normal(d), b1=0.3 * rng.standard_normal(d),
                    w_in=rng.standard_normal((hidden, d)), c_in=rng.standard_normal(hidden),
                    w_out=rng.standard_normal((d, hidden)), c_out=rng.standard_normal(d))

    return dict(embed=rng.standard_normal((vocab, d)) + 2.0, pos=rng.standard_normal((length, d)),
                blocks=[blk(), blk()], gf=1 + 0.3 * rng.standard_normal(d),
                bf=0.3 * rng.standard_normal(d), head=rng.standard_normal((out, d)),
                head_b=rng.standard_normal(out))


def test_pre_ln_to_pre_rmsnorm_to_pre_crmsnorm_gives_the_same_outputs(rng):
    p = _params(rng)
    tokens = rng.integers(0, 11, size=(3, 7))
    want = _pre_ln_net(p, tokens)
    # step 1: fold every LN affine into its consumer; step 2: re-centre every producer
    rms = dict(embed=recenter(p["embed"]), pos=recenter(p["pos"]), blocks=[])
    for blk in p["blocks"]:
        w_in, c_in = fold_affine_into_consumer(blk["w_in"], blk["c_in"], blk["g1"], blk["b1"])
        w_out, c_out = recenter_producer(blk["w_out"], blk["c_out"])
        rms["blocks"].append(dict(w_in=w_in, c_in=c_in, w_out=w_out, c_out=c_out))
    rms["head"], rms["head_b"] = fold_affine_into_consumer(p["head"], p["head_b"], p["gf"],
                                                           p["bf"])
    got_rms = _rms_net(rms, tokens, _rms)
    assert normwise(got_rms, want) < 1e-12
    # the LN of the re-centred stream still sees a mean component without re-centring: the
    # test can fail (a producer left out breaks the equivalence)
    broken = dict(rms, embed=p["embed"])
    assert normwise(_rms_net(broken, tokens, _rms), want) > 1e-3
    # step 3: compress the stream (producers drop the last row, consumers absorb it)
    crms = dict(embed=compress(rms["embed"]), pos=compress(rms["pos"]), blocks=[])
    for blk in rms["blocks"]:
        w_out, c_out = compress_producer(blk["w_out"], blk["c_out"])
        crms["blocks"].append(dict(w_in=compress_consumer(blk["w_in"]), c_in=blk["c_in"],
                                   w_out=w_out, c_out=c_out))
    crms["head"], crms["head_b"] = compress_consumer(rms["head"]), rms["head_b"]
    got_crms = _rms_net(crms, tokens, _crms)
    assert normwise(got_crms, want) < 1e-12


def test_fold_affine_into_consumer_without_bias_creates_one(rng):
    w, g, b = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4)
    x = rng.standard_normal((5, 4))
    new_w, new_b = fold_affine_into_consumer(w, None, g, b)
    np.testing.assert_allclose(x @ new_w.T + new_b, (g * x + b) @ w.T, rtol=1e-13)
    new_w, new_b = fold_affine_into_consumer(w, None, g)
    assert new_b is None
    np.testing.assert_allclose(x @ new_w.T, (g * x) @ w.T, rtol=1e-13)


def test_recenter_producer_makes_outputs_zero_mean(rng):
    w, b = rng.standard_normal((6, 3)), rng.standard_normal(6)
    new_w, new_b = recenter_producer(w, b)
    out = rng.standard_normal((4, 3)) @ new_w.T + new_b
    np.testing.assert_allclose(out.sum(axis=-1), 0.0, atol=1e-13)


@pytest.mark.parametrize("call,match", [
    (lambda: compress(np.ones((2, 0))), r"compress: `x` must have a last axis of size >= 1"),
    (lambda: decompress([1.0]), r"decompress: `z` must be a numpy.ndarray"),
    (lambda: fold_affine_into_consumer(np.ones((2, 3)), None, np.ones(2)),
     r"fold_affine_into_consumer: `gamma` must have shape \(3,\)"),
    (lambda: recenter_producer(np.ones(3)), r"recenter_producer: `weight` must have at least 2"),
])
def test_helpers_reject_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_subnormal_rows_with_eps_0_are_their_scaled_copies(rng):
    """With eps = 0, CRMSNorm is invariant to each row's scale: rows of subnormal values
    (where 1/RMS exceeds float64; y was inf) give the outputs of the same values scaled by
    2^1040 (exact), and dx is 2^1040 times theirs: 0 for a one-element row (y = sign(z)),
    inf of the right sign where that exceeds float64. The reliability test's failure:
    x = [[1.257302210933935e-309]], eps = 0."""
    from refnorm.norms.crms_norm import crms_norm_backward
    ints = rng.integers(1, 9, (3, 5)).astype(np.float64) * rng.choice([-1.0, 1.0], (3, 5))
    normal = np.vstack([ints, rng.standard_normal((2, 5))])
    tiny = normal.copy()
    tiny[:3] = np.ldexp(ints, -1040)                      # |z| < 2^-1022: subnormal
    dy = rng.standard_normal(normal.shape)
    y, cache = crms_norm_forward(tiny, 0.0)
    y_ref, cache_ref = crms_norm_forward(normal, 0.0)
    np.testing.assert_array_equal(y, y_ref)
    dx, dx_ref = crms_norm_backward(dy, cache).dx, crms_norm_backward(dy, cache_ref).dx
    np.testing.assert_array_equal(dx[3:], dx_ref[3:])
    big = np.abs(dx_ref[:3]) > 1e-6 * np.abs(dx_ref[:3]).max()
    assert np.isinf(dx[:3][big]).all()
    assert (np.sign(dx[:3][big]) == np.sign(dx_ref[:3][big])).all()
    one = np.array([[1.257302210933935e-309]])
    y1, cache1 = crms_norm_forward(one, 0.0)
    assert y1[0, 0] == 1.0 and crms_norm_backward(np.array([[0.7]]), cache1).dx[0, 0] == 0.0

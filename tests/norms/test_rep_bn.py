"""RepBN and PRepBN (SLAB): the eval-time fold into the next linear layer, the schedule against
the official counters, and how the mix reduces to its branches."""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.batch_norm import batch_norm_forward
from refnorm.norms.layer_norm import layer_norm_forward
from refnorm.norms.rep_bn import (PREP_SPEC, REP_SPEC, fold_into_linear, prep_bn_forward,
                                  prep_bn_lambda, rep_bn_backward, rep_bn_forward)
from refnorm.verify import normwise


def _bn_state(rng, c):
    return rng.standard_normal(c), rng.uniform(0.5, 2.0, c)


@pytest.mark.parametrize("alpha,affine,linear_bias", [(True, True, True), (True, False, False),
                                                      (False, True, True)])
def test_folded_linear_equals_rep_bn_then_linear(rng, alpha, affine, linear_bias):
    c, out = 7, 5
    x = 2.0 + rng.standard_normal((3, 11, c))
    rm, rv = _bn_state(rng, c)
    w = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine else None
    a = rng.standard_normal(1) if alpha else None
    lw = rng.standard_normal((out, c))
    lb = rng.standard_normal(out) if linear_bias else None
    y, _, _ = rep_bn_forward(x, rm, rv, w, b, a, training=False)
    want = y @ lw.T + (lb if lb is not None else 0.0)
    new_w, new_b = fold_into_linear(lw, lb, rm, rv, w, b, a)
    got = x @ new_w.T + new_b
    assert normwise(got, want) < 1e-12
    # alpha = None is plain BatchNorm: the fold of a BN layer
    if not alpha:
        bn, _, _ = batch_norm_forward(x.reshape(-1, c), rm, rv, w, b, training=False)
        assert normwise(bn.reshape(x.shape) @ lw.T + lb, got) < 1e-12


def test_fold_is_only_exact_in_evaluation(rng):
    c = 4
    x = rng.standard_normal((2, 6, c))
    rm, rv = _bn_state(rng, c)
    lw = rng.standard_normal((3, c))
    y_train, _, _ = rep_bn_forward(x, rm, rv, None, None, np.ones(1), training=True)
    new_w, new_b = fold_into_linear(lw, None, rm, rv, None, None, np.ones(1))
    assert normwise(x @ new_w.T + new_b, y_train @ lw.T) > 1e-2


def test_fold_rejects_missing_running_statistics():
    with pytest.raises(ValueError, match=r"fold_into_linear: `running_mean` and `running_var`"):
        fold_into_linear(np.ones((2, 3)), None, None, None)


def _official_lambdas(calls, warm, step, r0):
    """The counters of the official LinearNorm, replayed: (warm, iter, total_step) buffers,
    iter decremented after lambda is computed."""
    out, iters = [], step
    for _ in range(calls):
        if warm > 0:
            warm -= 1
            out.append(None)
        else:
            out.append(r0 * iters / step)
            if iters > 0:
                iters -= 1
    return out


@pytest.mark.parametrize("warm,step,r0", [(0, 5, 1.0), (3, 4, 1.0), (2, 6, 0.5)])
def test_schedule_matches_the_official_counters(warm, step, r0):
    calls = warm + step + 4
    want = _official_lambdas(calls, warm, step, r0)
    got = [prep_bn_lambda(k, total_step=step, warm=warm, r0=r0) for k in range(1, calls + 1)]
    assert got == want
    assert got[warm] == r0 and got[-1] == 0.0


def test_prep_bn_reduces_to_its_branches(rng):
    c = 5
    x = rng.standard_normal((2, 4, c))
    rm, rv = _bn_state(rng, c)
    w, b, a = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(1)
    lw, lb = rng.standard_normal(c), rng.standard_normal(c)
    rep, rep_state, _ = rep_bn_forward(x, rm, rv, w, b, a, training=True)
    ln, _ = layer_norm_forward(x, c, lw, lb, 1e-6)
    args = (x, rm, rv, w, b, a, lw, lb)
    y0, s0, _ = prep_bn_forward(*args, training=True, ln_eps=1e-6, lam=0.0)
    y1, s1, _ = prep_bn_forward(*args, training=True, ln_eps=1e-6, lam=1.0)
    yh, _, _ = prep_bn_forward(*args, training=True, ln_eps=1e-6, lam=0.25)
    assert normwise(y0, rep) < 1e-14 and normwise(y1, ln) < 1e-14
    assert normwise(yh, 0.25 * ln + 0.75 * rep) < 1e-14
    # lam = 1 still runs the BN branch (its running statistics move), as the first official
    # non-warm call does; the warm phase (lam=None) leaves them alone
    np.testing.assert_array_equal(s1.running_mean, rep_state.running_mean)
    yw, sw, _ = prep_bn_forward(*args, training=True, ln_eps=1e-6, lam=None)
    assert normwise(yw, ln) < 1e-14
    assert sw.running_mean is rm and sw.running_var is rv and int(sw.num_batches_tracked) == 0
    # evaluation is RepBN alone, whatever lam
    ye, _, _ = prep_bn_forward(*args, training=False, lam=0.7)
    rep_e, _, _ = rep_bn_forward(x, rm, rv, w, b, a, training=False)
    assert normwise(ye, rep_e) < 1e-14


def test_rep_bn_dalpha_and_dx_shortcut(rng):
    c = 3
    x = rng.standard_normal((4, 2, c))
    dy = rng.standard_normal(x.shape)
    rm, rv = _bn_state(rng, c)
    _, _, cache = rep_bn_forward(x, rm, rv, None, None, np.array([0.7]), training=False)
    grads = rep_bn_backward(dy, cache)
    np.testing.assert_allclose(grads.dalpha, [np.sum(dy * x)], rtol=1e-13)
    np.testing.assert_allclose(grads.dx, dy / np.sqrt(rv + 1e-5) + 0.7 * dy, rtol=1e-13)


@pytest.mark.parametrize("spec", [REP_SPEC, PREP_SPEC], ids=lambda s: s.name)
def test_composite_state_equals_forward_state(spec):
    for sample in spec.sample_inputs(np.random.default_rng(3)):
        _, state, _ = spec.run(sample)
        _, cstate = spec.composite(**spec.arguments(sample))
        for a, b in zip(state, cstate):
            if a is None:
                assert b is None
            else:
                np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float),
                                           rtol=1e-13, atol=1e-15, err_msg=sample.name)


def test_layer_init_follows_the_official_inits():
    params, state, kwargs = REP_SPEC.layer_init(4)
    assert (params["alpha"] == 1).all() and (params["weight"] == 1).all()
    assert (state["running_var"] == 1).all() and kwargs["eps"] == 1e-5
    params, _, kwargs = REP_SPEC.layer_init(4, llama=True)
    assert not params["alpha"].any() and not params["weight"].any() and kwargs["eps"] == 1e-6
    params, state, kwargs = PREP_SPEC.layer_init(4)
    y, _, _ = PREP_SPEC.forward(np.ones((2, 3, 4)), training=True, **params, **state, **kwargs)
    assert y.shape == (2, 3, 4)

"""Tests of refnorm.optim: torch.optim parity, the SGDP/AdamP equations and projection, the
scale-invariant behaviour, the effective step size, schedules, trajectories, purity and the
argument checks.
"""
from __future__ import annotations

import itertools
import json
import math
import sys

import numpy as np
import pytest

from refnorm import optim
from refnorm.optim import _equations, adamp, schedules
from refnorm.optim._common import max_relative_error, run_check
from refnorm.optim.adamp import (
    cosine_similarity_rows,
    layer_only_gradient,
    orthogonal_rows,
    project_update,
)
from refnorm.registry import OptimizerSpec, Paper

SHAPES = [(4, 3), (5,), (2, 3, 2), (3,)]
PARITY_TOL = 1e-12


# --------------------------------------------------------------------------------------------
# Problems with hand-written gradients


class LeastSquares:
    """f(params) = sum_i |A_i vec(w_i) - b_i|^2 / (2 m): a random convex problem per tensor."""

    def __init__(self, rng, shapes=SHAPES, m=7):
        self.shapes = shapes
        self.A = [rng.standard_normal((m, int(np.prod(s)))) * rng.uniform(0.2, 2.0)
                  for s in shapes]
        self.b = [rng.standard_normal(m) for _ in shapes]
        self.m = m
        self.x0 = [rng.standard_normal(s) for s in shapes]

    def grad(self, params):
        return [(A.T @ (A @ w.ravel() - b) / self.m).reshape(w.shape)
                for A, b, w in zip(self.A, self.b, params)]


def cosine_loss(w, target):
    """The project page's toy: f(w) = -<w/|w|, u>, scale-invariant over the whole of w."""
    u = target.ravel() / np.linalg.norm(target)
    return -float(w.ravel() @ u) / np.linalg.norm(w)


def cosine_loss_grad(w, target):
    """grad f = -(u - <w_hat, u> w_hat)/|w|."""
    u = target.ravel() / np.linalg.norm(target)
    norm = np.linalg.norm(w)
    w_hat = w.ravel() / norm
    return (-(u - (w_hat @ u) * w_hat) / norm).reshape(w.shape)


class WSLinear:
    """A weight-standardized linear layer fitted by least squares.

    W_hat[r] = (W[r] - mean W[r]) / std W[r] (biased std, eps = 0), y = x W_hat^T,
    f = |y - t|^2 / (2 n). Each output channel of W is scale-invariant (and shift-invariant).
    """

    def __init__(self, rng, d_in=6, d_out=4, n=16):
        self.x = rng.standard_normal((n, d_in))
        self.t = rng.standard_normal((n, d_out))
        self.n = n

    def standardize(self, w):
        d = w - w.mean(axis=1, keepdims=True)
        s = np.sqrt(np.mean(d * d, axis=1, keepdims=True))
        return d / s, s

    def loss(self, w):
        w_hat, _ = self.standardize(w)
        r = self.x @ w_hat.T - self.t
        return 0.5 * float(np.sum(r * r)) / self.n

    def grad(self, w):
        # Standardization backward (STD-BWD): (G - mean G - w_hat mean(G w_hat)) / s.
        w_hat, s = self.standardize(w)
        g_hat = (self.x @ w_hat.T - self.t).T @ self.x / self.n
        return (g_hat - g_hat.mean(axis=1, keepdims=True)
                - w_hat * np.mean(g_hat * w_hat, axis=1, keepdims=True)) / s


def finite_difference(f, w, h=1e-6):
    g = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        e = np.zeros_like(w)
        e[idx] = h
        g[idx] = (f(w + e) - f(w - e)) / (2 * h)
    return g


def run(step, init, params, grad_fn, steps, **hyper):
    """Run an optimizer, returning the list of parameter lists (initial one first) and states."""
    state = init(params, **hyper)
    out, states = [list(params)], [state]
    for _ in range(steps):
        params, state = step(params, grad_fn(params), state, **hyper)
        out.append(params)
        states.append(state)
    return out, states


# --------------------------------------------------------------------------------------------
# The registry


def test_registry_lists_every_optimizer_once():
    names = [s.name for s in optim.ALL_OPTIMIZERS]
    assert names == ["sgd", "adam", "adamw", "sgdp", "adamp"]
    assert optim.BY_NAME == {s.name: s for s in optim.ALL_OPTIMIZERS}
    for spec in optim.ALL_OPTIMIZERS:
        assert isinstance(spec, OptimizerSpec)
        assert isinstance(spec.paper, Paper)
        assert callable(spec.init) and callable(spec.step) and callable(spec.check)
        # the equations are in the docstrings, and the paper is cited
        assert ".. math::" in spec.step.__doc__
        assert ".. math::" in sys.modules[spec.step.__module__].__doc__
        assert spec.paper.ref in sys.modules[spec.step.__module__].__doc__ or spec.name == "sgd"


@pytest.mark.parametrize("spec", optim.ALL_OPTIMIZERS, ids=lambda s: s.name)
def test_check_against_equations(spec, rng):
    assert spec.check(rng) < 1e-12


def test_check_catches_a_wrong_step(rng):
    """The checks are not vacuous: a step with a classic bug fails them."""
    from refnorm.optim import sgd

    def dampening_ignored(params, grads, state, **hyper):
        return sgd.sgd_step(params, grads, state, **dict(hyper, dampening=0.0))

    err = run_check(sgd.sgd_init, dampening_ignored, _equations.sgd_reference,
                    sgd._check_cases(rng), buffer_fields=("momentum_buffer",))
    assert err > 1e-3

    def no_bias_correction(params, grads, state, **hyper):
        new, st = optim.adam_step(params, grads, state._replace(step=0), **hyper)
        return new, st._replace(step=state.step + 1)  # every step believes it is the first

    case = ([rng.standard_normal((3, 2))], lambda p: [p[0] + 1.0], dict(lr=0.1), 4)
    err = run_check(optim.adam_init, no_bias_correction, _equations.adam_reference, [case],
                    buffer_fields=("exp_avg",))
    assert err > 1e-3


def test_check_catches_layer_view_first(rng, monkeypatch):
    """Trying the layer view before the channel view changes the decisions: the check fails."""
    monkeypatch.setattr(adamp, "VIEWS", tuple(reversed(adamp.VIEWS)))
    assert adamp.ADAMP_SPEC.check(rng) == math.inf
    assert adamp.SGDP_SPEC.check(rng) == math.inf


# --------------------------------------------------------------------------------------------
# Parity with torch.optim, 100 steps, every step, params and state


def _torch_params(torch, params):
    return [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params]


def _parity_run(torch, rng, init, step, torch_cls, hyper, torch_hyper, state_map, steps=100):
    problem = LeastSquares(rng)
    maximize = hyper.get("maximize", False)
    sign = -1.0 if maximize else 1.0  # maximizing -f follows the same path as minimizing f

    def grad_fn(params):
        # Minibatch-like: the full gradient plus noise. Without noise the gradient vanishes at the
        # minimum, the moment buffers shrink by cancellation, and a relative comparison of them
        # would measure the rounding of numbers near zero rather than the optimizer.
        return [sign * (g + 0.1 * rng.standard_normal(g.shape)) for g in problem.grad(params)]

    params = [p.copy() for p in problem.x0]
    tparams = _torch_params(torch, params)
    topt = torch_cls(tparams, foreach=False, **torch_hyper)
    state = init(params, **hyper)
    worst = 0.0
    for t in range(1, steps + 1):
        grads = grad_fn(params)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        topt.step()
        params, state = step(params, grads, state, **hyper)
        theirs = [tp.detach().numpy() for tp in tparams]
        worst = max(worst, max_relative_error(params, theirs))
        for ours_field, torch_key in state_map.items():
            buffers = getattr(state, ours_field)
            for i, tp in enumerate(tparams):
                ref = topt.state[tp].get(torch_key)
                if ref is None:
                    assert buffers is None or buffers[i] is None
                    continue
                worst = max(worst, max_relative_error([buffers[i]], [ref.detach().numpy()]))
        assert worst <= PARITY_TOL, f"step {t}: relative error {worst:.3g}"
    return params, state, worst


SGD_CONFIGS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for (m, d, n), wd, mx in itertools.product(
        [(0.0, 0.0, False), (0.0, 0.5, False), (0.9, 0.0, False), (0.9, 0.0, True),
         (0.9, 0.5, False)],
        [0.0, 0.1],
        [False, True],
    )
]


@pytest.mark.parametrize("flags", SGD_CONFIGS,
                         ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_sgd_matches_torch(torch, rng, flags):
    hyper = dict(lr=0.05, **flags)
    _, state, _ = _parity_run(torch, rng, optim.sgd_init, optim.sgd_step, torch.optim.SGD, hyper,
                              hyper, {"momentum_buffer": "momentum_buffer"})
    assert state.step == 100


ADAM_CONFIGS = [
    dict(amsgrad=a, maximize=m, weight_decay=wd)
    for a, m, wd in itertools.product([False, True], [False, True], [0.0, 0.1])
]


@pytest.mark.parametrize("variant", ["adam", "adamw"])
@pytest.mark.parametrize("flags", ADAM_CONFIGS,
                         ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_adam_matches_torch(torch, rng, variant, flags):
    spec = optim.BY_NAME[variant]
    cls = torch.optim.Adam if variant == "adam" else torch.optim.AdamW
    hyper = dict(lr=0.02, betas=(0.85, 0.995), eps=1e-7, **flags)
    _, state, _ = _parity_run(
        torch, rng, spec.init, spec.step, cls, hyper, hyper,
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq"},
    )
    assert state.step == 100
    assert (state.max_exp_avg_sq is not None) == flags["amsgrad"]


def test_adamw_defaults_match_torch(torch, rng):
    """With no hyper-parameters at all, AdamW (weight_decay=1e-2) and Adam match torch's."""
    for spec, cls in ((optim.BY_NAME["adam"], torch.optim.Adam),
                      (optim.BY_NAME["adamw"], torch.optim.AdamW)):
        _parity_run(torch, rng, spec.init, spec.step, cls, {}, {}, {"exp_avg": "exp_avg"},
                    steps=20)


def test_defaults_mirror_torch(torch):
    p = [torch.nn.Parameter(torch.zeros(2))]
    for name, cls in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                      ("adamw", torch.optim.AdamW)):
        theirs = cls(p).defaults
        for key, value in optim.BY_NAME[name].defaults.items():
            assert theirs[key] == value, (name, key)


def test_sgdp_without_projection_or_decay_is_torch_sgd(torch, rng):
    """SGDP's buffer starts at zero, which with dampening 0 gives torch's b_1 = g: SGDP with no
    weight decay on parameters where the projection never fires is torch.optim.SGD."""
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True)
    problem = LeastSquares(rng, shapes=[(6,), (3,)])  # 1-D: never projected
    ours, _ = run(optim.sgdp_step, optim.sgdp_init, problem.x0, problem.grad, 50, **hyper)
    tparams = _torch_params(torch, problem.x0)
    topt = torch.optim.SGD(tparams, foreach=False, **hyper)
    for t in range(1, 51):
        for tp, g in zip(tparams, problem.grad([tp.detach().numpy() for tp in tparams])):
            tp.grad = torch.tensor(g)
        topt.step()
        assert max_relative_error(ours[t], [tp.detach().numpy() for tp in tparams]) < 1e-12


# --------------------------------------------------------------------------------------------
# SGDP / AdamP: the projection and the equations


def test_cosine_matches_torch(torch, rng):
    a = rng.standard_normal((5, 7))
    b = rng.standard_normal((5, 7))
    a[2] = 0.0  # a zero row: the eps clamp decides
    b[3] *= 1e-12
    eps = 1e-8
    theirs = torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=1,
                                                   eps=eps).abs().numpy()
    np.testing.assert_allclose(cosine_similarity_rows(a, b, eps), theirs, rtol=1e-12, atol=1e-15)


def _radial(w_rows, u_rows, eps):
    """The component of each row of u along w_r/(|w_r| + eps), as the code computes it."""
    w_hat = w_rows / (np.linalg.norm(w_rows, axis=1, keepdims=True) + eps)
    return np.sum(w_hat * u_rows, axis=1, keepdims=True) * w_hat


def test_channel_view_fires_first(rng):
    """A per-channel orthogonal gradient passes both views; the channel view is used, and its
    per-row projection differs from the whole-layer projection."""
    w = rng.standard_normal((4, 3, 2))
    g = orthogonal_rows(w, rng.standard_normal(w.shape))
    u = rng.standard_normal(w.shape)
    res = project_update(w, g, u, delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert res.view == "channel" and res.wd_ratio == 0.1
    w2, u2 = w.reshape(4, -1), u.reshape(4, -1)
    np.testing.assert_allclose(res.update.reshape(4, -1), u2 - _radial(w2, u2, 1e-8), rtol=1e-13)
    layer = u.ravel() - _radial(w.reshape(1, -1), u.reshape(1, -1), 1e-8).ravel()
    assert np.max(np.abs(res.update.ravel() - layer)) > 1e-3
    # every row of the projected update is orthogonal to its row of w (up to the eps in the norm)
    cos = cosine_similarity_rows(res.update.reshape(4, -1), w2, 0.0)
    assert np.max(cos) < 1e-7


def test_layer_view_fires_when_channels_do_not(rng):
    w = rng.standard_normal((3, 5))
    g = layer_only_gradient(w, rng.standard_normal(w.shape))
    assert np.max(cosine_similarity_rows(g, w, 1e-8)) > 0.1 / math.sqrt(5)  # channel test fails
    assert abs(g.ravel() @ w.ravel()) < 1e-12 * np.linalg.norm(g) * np.linalg.norm(w)
    u = rng.standard_normal(w.shape)
    res = project_update(w, g, u, delta=0.1, wd_ratio=0.25, eps=1e-8)
    assert res.view == "layer" and res.wd_ratio == 0.25
    expected = u.ravel() - _radial(w.reshape(1, -1), u.reshape(1, -1), 1e-8).ravel()
    np.testing.assert_allclose(res.update.ravel(), expected, rtol=1e-13)


def test_neither_view_fires(rng):
    w = rng.standard_normal((3, 5))
    g = w + 0.1 * rng.standard_normal(w.shape)
    u = rng.standard_normal(w.shape)
    res = project_update(w, g, u, delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert res.view is None and res.wd_ratio == 1.0
    assert res.update is u  # untouched


@pytest.mark.parametrize("shape", [(7,), (), (1,)])
def test_vectors_and_scalars_are_never_projected(rng, shape):
    """Biases and gains (ndim <= 1) are never projected, even with an orthogonal gradient."""
    w = rng.standard_normal(shape)
    z = rng.standard_normal(shape)
    g = z - (np.sum(z * w) / np.sum(w * w)) * w if w.size > 1 else np.zeros(shape)
    res = project_update(w, g, z, delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert res.view is None and res.wd_ratio == 1.0


@pytest.mark.parametrize("factor, fires", [(0.99, True), (1.01, False)])
def test_threshold_is_delta_over_sqrt_dim(rng, factor, fires):
    """One row of length D: fires iff |cos(g, w)| < delta / sqrt(D)."""
    d, delta = 16, 0.3
    w = rng.standard_normal((1, d))
    w_hat = w.ravel() / np.linalg.norm(w)
    z = rng.standard_normal(d)
    z_perp = z - (z @ w_hat) * w_hat
    z_perp /= np.linalg.norm(z_perp)
    c = factor * delta / math.sqrt(d)  # the target cosine
    g = (c * w_hat + math.sqrt(1 - c * c) * z_perp).reshape(1, d)
    res = project_update(w, g, rng.standard_normal((1, d)), delta=delta, wd_ratio=0.1, eps=1e-8)
    assert (res.view == "channel") == fires


@pytest.mark.parametrize("name", ["sgdp", "adamp"])
@pytest.mark.parametrize("case", ["channel", "layer", "neither"])
def test_sgdp_adamp_match_equations_over_many_steps(rng, name, case):
    """10 steps against the independent scalar-loop formulation, with decisions, weight decay
    and nesterov on; each case keeps taking the branch it was built for."""
    spec = optim.BY_NAME[name]
    cases = {c[2][0] or "neither": c for c in adamp._projection_cases(rng)}
    params, grad_fn, expected = cases[case]
    hyper = dict(lr=0.03, weight_decay=0.05, nesterov=True)
    if name == "sgdp":
        hyper.update(momentum=0.9)
    reference = _equations.sgdp_reference if name == "sgdp" else _equations.adamp_reference
    buffers = ("momentum_buffer",) if name == "sgdp" else ("exp_avg", "exp_avg_sq")
    err = run_check(spec.init, spec.step, reference, [(params, grad_fn, hyper, 10)],
                    buffer_fields=buffers, decision_fields=("projection", "wd_ratio_applied"))
    assert err < 1e-12
    _, states = run(spec.step, spec.init, params, grad_fn, 10, **hyper)
    for state in states[1:]:
        assert state.projection == expected
        assert state.wd_ratio_applied == tuple(1.0 if v is None else 0.1 for v in expected)


def test_weight_decay_uses_ratio_when_projected(rng):
    """AdamP: w_t = w (1 - lr wd r) - lr/bc1 * Pi(u), with r = wd_ratio when projected."""
    w = rng.standard_normal((3, 4))
    g = orthogonal_rows(w, rng.standard_normal(w.shape))
    hyper = dict(lr=0.1, weight_decay=0.5, wd_ratio=0.2, eps=1e-8)
    (new,), state = optim.adamp_step([w], [g], optim.adamp_init([w], **hyper), **hyper)
    u = (0.1 * g) / (np.sqrt(0.001 * g * g) / math.sqrt(0.001) + 1e-8)  # m/denom at t = 1
    w2, u2 = w.reshape(3, -1), u.reshape(3, -1)
    u_proj = u2 - _radial(w2, u2, 1e-8)
    expected = w * (1 - 0.1 * 0.5 * 0.2) - (0.1 / 0.1) * u_proj.reshape(w.shape)
    np.testing.assert_allclose(new, expected, rtol=1e-13)
    assert state.projection == ("channel",) and state.wd_ratio_applied == (0.2,)


# --------------------------------------------------------------------------------------------
# Scale-invariant losses


def test_cosine_loss_gradient(rng):
    w = rng.standard_normal((3, 4))
    target = rng.standard_normal((3, 4))
    g = cosine_loss_grad(w, target)
    fd = finite_difference(lambda v: cosine_loss(v, target), w)
    assert max_relative_error([g], [fd]) < 1e-7
    assert abs(np.sum(g * w)) < 1e-14 * np.linalg.norm(g) * np.linalg.norm(w)
    np.testing.assert_allclose(cosine_loss_grad(3.0 * w, target), g / 3.0, rtol=1e-12)


def test_ws_linear_gradient(rng):
    problem = WSLinear(rng)
    w = rng.standard_normal((4, 6))
    g = problem.grad(w)
    assert max_relative_error([g], [finite_difference(problem.loss, w)]) < 1e-7
    # scale- and shift-invariant per output channel: g_r is orthogonal to w_r and to 1
    assert np.max(np.abs(np.sum(g * w, axis=1))) < 1e-13
    assert np.max(np.abs(g.sum(axis=1))) < 1e-13
    np.testing.assert_allclose(problem.grad(w * np.array([[2.0], [0.5], [3.0], [1.0]])),
                               g / np.array([[2.0], [0.5], [3.0], [1.0]]), rtol=1e-10, atol=1e-14)


def test_plain_gd_norm_identity(rng):
    """Plain GD on a scale-invariant loss: |w_{t+1}|^2 = |w_t|^2 + lr^2 |g_t|^2 exactly."""
    target = rng.standard_normal(8)
    w = rng.standard_normal(8)
    for _ in range(20):
        g = cosine_loss_grad(w, target)
        (new,), _ = optim.sgd_step([w], [g], optim.sgd_init([w]), lr=0.5)
        assert math.isclose(new @ new, w @ w + 0.25 * (g @ g), rel_tol=1e-13)
        w = new


def test_momentum_norm_growth_identity(rng):
    """Heavy ball (torch SGD, dampening 0) on a scale-invariant loss (docs/derivations/adamp.rst):
    |w_{t+1}|^2 = |w_t|^2 + lr^2 |p_t|^2 + 2 lr^2 sum_{k<t} beta^(t-k) |p_k|^2."""
    target = rng.standard_normal(6)
    w = rng.standard_normal(6)
    lr, beta = 0.1, 0.9
    state = optim.sgd_init([w])
    buffers = []
    for t in range(50):
        (new,), state = optim.sgd_step([w], [cosine_loss_grad(w, target)], state, lr=lr,
                                       momentum=beta)
        p = state.momentum_buffer[0]
        buffers.append(p)
        past = sum(beta ** (t - k) * (buffers[k] @ buffers[k]) for k in range(t))
        assert math.isclose(new @ new, w @ w + lr**2 * (p @ p) + 2 * lr**2 * past, rel_tol=1e-13)
        w = new


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamp_update_is_orthogonal_to_the_weight(rng, weight_decay):
    """AdamP on a weight-standardized layer: every step projects in the channel view.

    What holds exactly: with w_hat_r = w_r/(|w_r| + eps), the projected update q satisfies
    <q_r, w_r> = <u_r, w_r> (1 - |w_r|^2 / (|w_r| + eps)^2), i.e. orthogonal up to ~2 eps/|w_r|.
    The weight decay acts after the projection and is radial, so the orthogonal part of the step
    is (w_{t+1} - w_t) + lr wd wd_ratio w_t.
    """
    problem = WSLinear(rng)
    w = rng.standard_normal((4, 6))
    hyper = dict(lr=0.01, weight_decay=weight_decay)
    grad_fn = lambda p: [problem.grad(p[0])]  # noqa: E731
    ws, states = run(optim.adamp_step, optim.adamp_init, [w], grad_fn, 30, **hyper)
    for t in range(1, 31):
        before, after, state = ws[t - 1][0], ws[t][0], states[t]
        assert state.projection == ("channel",)
        ratio = state.wd_ratio_applied[0]
        assert ratio == 0.1
        step = (after - before) + 0.01 * weight_decay * ratio * before  # = -lr/bc1 * q
        # the Adam direction before projection, rebuilt from the state
        bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
        u = state.exp_avg[0] / (np.sqrt(state.exp_avg_sq[0]) / math.sqrt(bc2) + 1e-8)
        norms = np.linalg.norm(before, axis=1)
        kappa = 1 - norms**2 / (norms + 1e-8) ** 2
        lhs = np.sum(step * before, axis=1)
        rhs = -(0.01 / bc1) * np.sum(u * before, axis=1) * kappa
        scale = (0.01 / bc1) * np.linalg.norm(u, axis=1) * norms
        assert np.max(np.abs(lhs - rhs) / scale) < 1e-13
        cos = np.abs(lhs) / (np.linalg.norm(step, axis=1) * norms)
        assert np.max(cos) < 1e-7  # ~ 2 eps / |w_r|
        if weight_decay == 0:
            # then the whole step is orthogonal and the norm grows by Pythagoras, up to the
            # eps-sized radial remainder 2 <w, step>
            np.testing.assert_allclose(np.sum(after**2, axis=1),
                                       norms**2 + np.sum(step**2, axis=1), rtol=1e-9)


def test_adam_update_is_not_orthogonal(rng):
    """The contrast: plain Adam's step on the same problem has a sizeable radial part."""
    problem = WSLinear(rng)
    w = rng.standard_normal((4, 6))
    ws, _ = run(optim.adam_step, optim.adam_init, [w], lambda p: [problem.grad(p[0])], 30, lr=0.01)
    cos = [np.max(np.abs(np.sum((b[0] - a[0]) * a[0], axis=1))
                  / (np.linalg.norm(b[0] - a[0], axis=1) * np.linalg.norm(a[0], axis=1)))
           for a, b in zip(ws[:-1], ws[1:])]
    assert max(cos) > 1e-2


def test_weight_norm_grows_more_slowly_with_adamp(rng):
    problem = WSLinear(rng)
    w = rng.standard_normal((4, 6))
    grad_fn = lambda p: [problem.grad(p[0])]  # noqa: E731
    adam_ws, _ = run(optim.adam_step, optim.adam_init, [w], grad_fn, 200, lr=0.05)
    adamp_ws, _ = run(optim.adamp_step, optim.adamp_init, [w], grad_fn, 200, lr=0.05)
    n0 = np.linalg.norm(w)
    n_adam = np.linalg.norm(adam_ws[-1][0])
    n_adamp = np.linalg.norm(adamp_ws[-1][0])
    assert n_adamp - n0 < 0.5 * (n_adam - n0), (n0, n_adam, n_adamp)
    # and the loss still goes down with AdamP
    assert problem.loss(adamp_ws[-1][0]) < problem.loss(w)


def test_weight_norm_grows_more_slowly_with_sgdp(rng):
    """The project page's toy, with heavy-ball momentum: SGDP keeps the norm (and with it the
    effective step size) far closer to where it started."""
    target = rng.standard_normal((3, 4))
    w = rng.standard_normal((3, 4))
    grad_fn = lambda p: [cosine_loss_grad(p[0], target)]  # noqa: E731
    hyper = dict(lr=0.1, momentum=0.9)
    sgd_ws, _ = run(optim.sgd_step, optim.sgd_init, [w], grad_fn, 100, **hyper)
    sgdp_ws, sgdp_states = run(optim.sgdp_step, optim.sgdp_init, [w], grad_fn, 100, **hyper)
    assert all(s.projection == ("layer",) for s in sgdp_states[1:])
    eff_sgd = optim.effective_step_size([(0.1, p) for p in sgd_ws])
    eff_sgdp = optim.effective_step_size([(0.1, p) for p in sgdp_ws])
    assert eff_sgdp[-1, 0] > 1.5 * eff_sgd[-1, 0]
    assert np.all(np.diff(np.linalg.norm([p[0] for p in sgdp_ws], axis=(1, 2))) > -1e-12)


# --------------------------------------------------------------------------------------------
# Effective step size


def test_effective_step_size_on_hand_made_trajectory():
    traj = [
        (0.1, [np.array([3.0, 4.0]), np.array([[1.0, 0.0], [0.0, 0.0]])]),
        (0.05, [np.array([0.0, 2.0]), np.array([[0.5, 0.5], [0.5, 0.5]])]),
    ]
    eff = optim.effective_step_size(traj)
    np.testing.assert_allclose(eff, [[0.1 / 25, 0.1 / 1], [0.05 / 4, 0.05 / 1]], rtol=1e-15)
    np.testing.assert_allclose(optim.effective_step_size(traj, power=1),
                               [[0.1 / 5, 0.1], [0.05 / 2, 0.05]], rtol=1e-15)
    as_dicts = [{"lr": lr, "params": p} for lr, p in traj]
    np.testing.assert_array_equal(optim.effective_step_size(as_dicts), eff)
    np.testing.assert_allclose(optim.weight_norms([p for _, p in traj]), [[5, 1], [2, 1]])


def test_angular_update():
    seq = [[np.array([1.0, 0.0])], [np.array([0.0, 2.0])], [np.array([0.0, 3.0])]]
    np.testing.assert_allclose(optim.angular_update(seq), [[math.pi / 2], [0.0]], atol=1e-15)


def test_pairs_from_records_use_the_weights_before_each_step(rng):
    w0 = [rng.standard_normal((2, 3))]
    records = optim.run_trajectory(optim.BY_NAME["sgd"], w0, lambda p: [p[0]], 3,
                                   lr=schedules.StepLR(0.1, 1, 0.5))
    pairs = optim.pairs_from_records(w0, records)
    assert [lr for lr, _ in pairs] == [0.1, 0.05, 0.025]
    np.testing.assert_array_equal(pairs[0][1][0], w0[0])
    np.testing.assert_array_equal(pairs[2][1][0], records[1]["params"][0])
    np.testing.assert_allclose(optim.effective_step_size(pairs)[:, 0],
                               [lr / np.sum(w[0] ** 2) for lr, w in pairs], rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Schedules


def _torch_lrs(torch, make, n):
    p = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(p, lr=0.4)
    sched = make(torch.optim.lr_scheduler, opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("name", ["step", "cosine", "cosine_eta_min", "linear", "sequential"])
def test_schedules_match_torch(torch, name):
    n = 60
    ours, make = {
        "step": (schedules.StepLR(0.4, step_size=7, gamma=0.3),
                 lambda s, o: s.StepLR(o, step_size=7, gamma=0.3)),
        "cosine": (schedules.CosineAnnealingLR(0.4, T_max=25),
                   lambda s, o: s.CosineAnnealingLR(o, T_max=25)),
        "cosine_eta_min": (schedules.CosineAnnealingLR(0.4, T_max=13, eta_min=0.01),
                           lambda s, o: s.CosineAnnealingLR(o, T_max=13, eta_min=0.01)),
        "linear": (schedules.LinearLR(0.4, start_factor=0.1, total_iters=9),
                   lambda s, o: s.LinearLR(o, start_factor=0.1, total_iters=9)),
        "sequential": (schedules.warmup_cosine(0.4, 5, 30, start_factor=0.01),
                       lambda s, o: s.SequentialLR(
                           o, [s.LinearLR(o, start_factor=0.01, total_iters=5),
                               s.CosineAnnealingLR(o, T_max=25)], milestones=[5])),
    }[name]
    theirs = _torch_lrs(torch, make, n)
    np.testing.assert_allclose(ours.values(n), theirs, rtol=1e-12, atol=1e-15)
    assert ours(3) == ours.lr_at(3)


def test_schedule_closed_forms():
    assert schedules.StepLR(1.0, 10, 0.5).lr_at(25) == 0.25
    cos = schedules.CosineAnnealingLR(2.0, T_max=10, eta_min=0.5)
    assert cos.lr_at(0) == 2.0 and math.isclose(cos.lr_at(5), 1.25) and cos.lr_at(10) == 0.5
    lin = schedules.LinearLR(1.0, start_factor=0.25, total_iters=3)
    assert [lin(t) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.StepLR(0.1, 0), "step_size"),
    (lambda: schedules.StepLR(-0.1, 3), "base_lr"),
    (lambda: schedules.CosineAnnealingLR(0.1, 0), "T_max"),
    (lambda: schedules.LinearLR(0.1, start_factor=0.0), "start_factor"),
    (lambda: schedules.LinearLR(0.1, end_factor=1.5), "end_factor"),
    (lambda: schedules.warmup_cosine(0.1, 10, 5), "total_steps"),
    (lambda: schedules.StepLR(0.1, 2).lr_at(-1), "step"),
])
def test_schedule_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------------------
# Trajectories


def _adamp_problem(rng):
    problem = WSLinear(rng)
    params = [rng.standard_normal((4, 6)), rng.standard_normal(4)]
    bias_target = rng.standard_normal(4)

    def grad_fn(p):
        return [problem.grad(p[0]), p[1] - bias_target]

    return params, grad_fn


def test_trajectory_is_deterministic_and_records_decisions(rng, tmp_path):
    params, grad_fn = _adamp_problem(rng)
    spec = optim.BY_NAME["adamp"]
    lr = schedules.warmup_cosine(0.05, 2, 6)
    a = optim.run_trajectory(spec, params, grad_fn, 6, lr=lr, weight_decay=0.01)
    b = optim.run_trajectory(spec, [p.copy() for p in params], grad_fn, 6, lr=lr,
                             weight_decay=0.01)
    flat_a = optim.stack_trajectory(a, initial_params=params)
    flat_b = optim.stack_trajectory(b, initial_params=params)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
        assert flat_a[key].dtype != object
    assert [r["projection"] for r in a] == [["channel", "none"]] * 6
    assert [r["wd_ratio_applied"] for r in a] == [[0.1, 1.0]] * 6
    assert [r["lr"] for r in a] == [lr(t) for t in range(6)]
    assert flat_a["params/0"].shape == (6, 4, 6)
    assert flat_a["state/exp_avg_sq/1"].shape == (6, 4)
    assert list(flat_a["projection/0"]) == ["channel"] * 6
    # the records agree with stepping by hand
    state = spec.init(params, **dict(spec.defaults, weight_decay=0.01))
    p = params
    for t, record in enumerate(a):
        hyper = dict(spec.defaults, lr=lr(t), weight_decay=0.01)
        p, state = spec.step(p, grad_fn(p), state, **hyper)
        np.testing.assert_array_equal(record["params"][0], p[0])
        np.testing.assert_array_equal(record["state"]["exp_avg"][1], state.exp_avg[1])
        assert record["state"]["step"] == t + 1
    # ready for npz (no pickling) and JSON
    np.savez(tmp_path / "traj.npz", **flat_a)
    with np.load(tmp_path / "traj.npz", allow_pickle=False) as loaded:
        np.testing.assert_array_equal(loaded["params/1"], flat_a["params/1"])
        assert list(loaded["projection/1"]) == ["none"] * 6
    json.dumps({k: v.tolist() for k, v in flat_a.items()})


@pytest.mark.parametrize("spec", optim.ALL_OPTIMIZERS, ids=lambda s: s.name)
def test_trajectory_runs_every_optimizer(rng, spec):
    params, grad_fn = _adamp_problem(rng)
    records = optim.run_trajectory(spec, params, grad_fn, 3, lr=0.01, **(
        {"momentum": 0.9} if spec.name in ("sgd", "sgdp") else {}))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert ("projection" in records[0]) == (spec.name in ("sgdp", "adamp"))
    flat = optim.stack_trajectory(records)
    assert flat["params/0"].shape == (3, 4, 6)
    assert any(k.startswith("state/") for k in flat)


def test_trajectory_requires_lr_for_sgdp(rng):
    with pytest.raises(ValueError, match="lr"):
        optim.run_trajectory(optim.BY_NAME["sgdp"], [np.ones(2)], lambda p: p, 1)


# --------------------------------------------------------------------------------------------
# Purity: nothing passed in is modified


HYPER = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adam": dict(lr=0.1, amsgrad=True, weight_decay=0.1),
    "adamw": dict(lr=0.1, amsgrad=True),
    "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamp": dict(lr=0.1, weight_decay=0.1, nesterov=True),
}


def _readonly(arrays):
    out = []
    for a in arrays:
        a = a.copy()
        a.flags.writeable = False
        out.append(a)
    return out


@pytest.mark.parametrize("spec", optim.ALL_OPTIMIZERS, ids=lambda s: s.name)
def test_nothing_is_mutated(rng, spec):
    hyper = HYPER[spec.name]
    params = _readonly([rng.standard_normal((3, 4)), rng.standard_normal(5)])
    copies = [p.copy() for p in params]
    state = spec.init(params, **hyper)
    for _ in range(3):  # read-only inputs: any in-place write would raise
        # a per-channel orthogonal gradient for the matrix, so that SGDP/AdamP project it
        grads = _readonly([orthogonal_rows(params[0], rng.standard_normal((3, 4))),
                           rng.standard_normal(5)])
        grad_copies = [g.copy() for g in grads]
        snapshot = {f: [None if b is None else b.copy() for b in v]
                    for f, v in state._asdict().items() if isinstance(v, tuple) and v
                    and isinstance(v[0], np.ndarray)}
        new_params, new_state = spec.step(params, grads, state, **hyper)
        for a, b in zip(params + grads, copies + grad_copies):
            np.testing.assert_array_equal(a, b)
        for field, bufs in snapshot.items():
            for a, b in zip(getattr(state, field), bufs):
                np.testing.assert_array_equal(a, b)
        assert new_state.step == state.step + 1
        if hasattr(new_state, "projection"):
            assert new_state.projection == ("channel", None)
        assert all(np.shares_memory(a, b) is False for a, b in zip(new_params, params))
        params, state = new_params, new_state
        copies = [p.copy() for p in params]
    # the state's arrays are read-only: a value, not a workspace
    for value in state:
        if isinstance(value, tuple):
            for b in value:
                if isinstance(b, np.ndarray):
                    assert not b.flags.writeable
                    with pytest.raises(ValueError):
                        b += 1.0


def test_first_sgd_buffer_does_not_alias_the_gradient(rng):
    g = rng.standard_normal(3)
    _, state = optim.sgd_step([np.zeros(3)], [g], optim.sgd_init([np.zeros(3)]), momentum=0.9)
    assert not np.shares_memory(state.momentum_buffer[0], g)


def test_float32_stays_float32(rng):
    for spec in optim.ALL_OPTIMIZERS:
        params = [rng.standard_normal((3, 4)).astype(np.float32)]
        grads = [rng.standard_normal((3, 4)).astype(np.float32)]
        hyper = HYPER[spec.name]
        new, state = spec.step(params, grads, spec.init(params, **hyper), **hyper)
        assert new[0].dtype == np.float32, spec.name


# --------------------------------------------------------------------------------------------
# Bad arguments raise, naming the argument


BAD_HYPER = [
    ("sgd", dict(lr=-0.1), "lr"),
    ("sgd", dict(momentum=-0.5), "momentum"),
    ("sgd", dict(weight_decay=-1.0), "weight_decay"),
    ("sgd", dict(nesterov=True), "nesterov"),
    ("sgd", dict(nesterov=True, momentum=0.9, dampening=0.1), "nesterov"),
    ("sgd", dict(dampening=float("nan")), "dampening"),
    ("adam", dict(lr=-1e-3), "lr"),
    ("adam", dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    ("adam", dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    ("adam", dict(betas=(0.9,)), "betas"),
    ("adam", dict(eps=-1e-8), "eps"),
    ("adamw", dict(weight_decay=-0.1), "weight_decay"),
    ("adamw", dict(betas=(0.9, 1.5)), "betas"),
    ("sgdp", dict(lr=-0.1), "lr"),
    ("sgdp", dict(lr=0.1, delta=-0.1), "delta"),
    ("sgdp", dict(lr=0.1, wd_ratio=-0.1), "wd_ratio"),
    ("sgdp", dict(lr=0.1, momentum=1.0, weight_decay=0.1), "momentum"),
    ("sgdp", dict(lr=0.1, eps=-1.0), "eps"),
    ("adamp", dict(betas=(0.9, 1.0)), "betas"),
    ("adamp", dict(lr=0.1, delta=float("inf")), "delta"),
    ("adamp", dict(lr=0.1, wd_ratio=-1.0), "wd_ratio"),
]


@pytest.mark.parametrize("name, hyper, match", BAD_HYPER)
def test_bad_hyper_parameters(name, hyper, match):
    spec = optim.BY_NAME[name]
    params = [np.ones((2, 3))]
    with pytest.raises(ValueError, match=match):
        spec.init(params, **hyper)
    good = dict(spec.defaults, lr=0.1)
    state = spec.init(params, **good)
    with pytest.raises(ValueError, match=match):
        spec.step(params, [np.ones((2, 3))], state, **dict(good, **hyper))


@pytest.mark.parametrize("spec", optim.ALL_OPTIMIZERS, ids=lambda s: s.name)
def test_bad_grads_and_state(spec):
    hyper = dict(spec.defaults, lr=0.1)
    params = [np.ones((2, 3)), np.ones(4)]
    state = spec.init(params, **hyper)
    with pytest.raises(ValueError, match="grads"):
        spec.step(params, [np.ones((2, 3))], state, **hyper)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        spec.step(params, [np.ones((2, 3)), np.ones(5)], state, **hyper)
    with pytest.raises(TypeError, match="grads"):
        spec.step(params, np.ones((2, 3)), state, **hyper)
    with pytest.raises(TypeError, match="params"):
        spec.step(np.ones((2, 3)), [np.ones((2, 3))], state, **hyper)
    with pytest.raises(TypeError, match=r"params\[0\]"):
        spec.init([np.ones((2, 3), dtype=int)], **hyper)
    other = spec.init([np.ones((2, 3))], **hyper)
    if spec.name != "sgd":  # SGD's state before the first step holds no arrays to compare
        with pytest.raises(ValueError, match="state"):
            spec.step(params, [np.ones((2, 3)), np.ones(4)], other, **hyper)


def test_amsgrad_needs_an_amsgrad_state():
    params = [np.ones(3)]
    state = optim.adam_init(params)
    with pytest.raises(ValueError, match="amsgrad"):
        optim.adam_step(params, [np.ones(3)], state, amsgrad=True)

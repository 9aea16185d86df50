r"""PowerNorm: batch quadratic-mean normalization with running statistics and an approximate
backward, for transformers.

Shen, Yao, Gholami, Mahoney, Keutzer, *PowerNorm: Rethinking Batch Normalization in
Transformers*, ICML 2020, arXiv:2003.07845. Official code: ``sIncerass/powernorm``,
``fairseq/modules/norms/mask_powernorm.py`` (commit 1159641), which this module follows.

Layout: ``x`` of shape :math:`(\ldots, C)`, tokens :math:`(B, T, C)`; channel :math:`c` pools the
:math:`M` tokens (every leading axis; see :mod:`refnorm.norms._tokens`). The official code takes
fairseq's :math:`(T, B, C)`: the same pooled statistics.

**Step 0, GroupScaling1D** (training and evaluation): the :math:`C` channels are split into
``group_num`` :math:`G` contiguous groups, and each token is divided by its root mean square in
each group,

.. math::

   \tilde x = x\,(\langle x^2\rangle_{\text{group}} + \epsilon)^{-1/2} .

**Forward, training** (:math:`t` = ``iters`` + 1, the number of training forwards so far):

.. math::

   \psi^2_c = \tfrac1M\textstyle\sum_{m} \tilde x_{mc}^2 ,\qquad
   z = \begin{cases} \tilde x\,(\psi^2+\epsilon)^{-1/2} & t \le T_w \text{ (warm-up)}\\
                     \tilde x\,(\varphi+\epsilon)^{-1/2} & t > T_w \end{cases},\qquad
   y = \gamma\odot z + \beta ,

a quadratic mean (no centring, :math:`1/M`), with :math:`\varphi` = ``running_phi`` **before**
this step's update, which is (after :math:`y`)

.. math::

   \varphi \leftarrow \varphi\,\tfrac{t-1}{t} + \tfrac{\psi^2}{t}\ \ \text{if } t < T_w,
   \qquad\text{then always}\qquad
   \varphi \leftarrow \alpha_f\,\varphi + (1-\alpha_f)\,\psi^2 .

**Evaluation**: :math:`y = \gamma\odot\tilde x\,(\varphi+\epsilon)^{-1/2} + \beta`, state
unchanged.

**Backward, training: the approximate backpropagation** (``gradient="surrogate"``). With
:math:`g = \gamma\odot\mathrm{d}y` and :math:`\tilde\nu` = ``ema_gz`` from the previous step:

.. math::

   \hat g = g - (1-\alpha_b)\,\tilde\nu\odot z,\qquad
   \tilde\nu \leftarrow \tilde\nu + \tfrac1M\textstyle\sum_m \hat g\odot z,\qquad
   \mathrm{d}\tilde x = \hat g\,(\psi^2+\epsilon)^{-1/2},

then :math:`\mathrm{d}x` = the exact GroupScaling backward of :math:`\mathrm{d}\tilde x`,
per token and group :math:`\mathrm{d}x = \rho\,(\mathrm{d}\tilde x - \tilde x\,\langle
\mathrm{d}\tilde x\odot\tilde x\rangle_{\text{group}})` with :math:`\rho` the GroupScaling factor;
:math:`\mathrm{d}\gamma = \sum_m \mathrm{d}y\odot z`, :math:`\mathrm{d}\beta = \sum_m
\mathrm{d}y`. The same rule is used during the warm-up. In evaluation the backward is exact,
:math:`\mathrm{d}\tilde x = g\,(\varphi+\epsilon)^{-1/2}`.

What the surrogate replaces (derivation: ``docs/derivations/power_norm.rst``): the exact
gradient in the warm-up is :math:`\mathrm{d}\tilde x = (g - z\,\langle g\odot z\rangle_M)\,
(\psi^2+\epsilon)^{-1/2}`; PowerNorm replaces the batch term :math:`\langle g\odot z\rangle_M`
by the running :math:`(1-\alpha_b)\tilde\nu`. After the warm-up the exact gradient is
:math:`g\,(\varphi+\epsilon)^{-1/2}` (:math:`\varphi` is a constant), while the code still
divides by the current batch's :math:`\psi`. ``refnorm verify`` prints the distance between the
two on every sample; the record's ``composite`` is the exact function, checked against finite
differences.

**State is explicit.** ``running_phi`` (:math:`\varphi`, init 1), ``ema_gz``
(:math:`\tilde\nu`, init 0) and ``iters`` (:math:`t`, init 0) are arguments; the forward
returns a :class:`PowerNormState` with the new ``running_phi`` and ``iters`` and the **given**
``ema_gz``: :math:`\tilde\nu` is updated by the backward, which returns the new one as the last
field of :class:`PowerNormGrads` (``grads.ema_gz``); a training loop carries it to the next
step. (The engine op drops it: a graph's backward returns gradients only.)

Conventions and defaults, from the official code: ``eps = 1e-5`` (PowerNorm and GroupScaling1D
both default to 1e-5; one ``eps`` here), ``alpha_fwd = alpha_bkw = 0.9``, ``warmup_iters``
10000 (class default; ``NormSelect`` passes ``--warmup-updates``, 8000 in the IWSLT/WMT scripts,
and 1000 to the final encoder/decoder norm), ``group_num = 1`` (class default; ``NormSelect``
passes the number of attention heads, 4 for ``transformer_iwslt_de_en``), always affine
(:math:`\gamma = 1`, :math:`\beta = 0` at init; ``weight=None``/``bias=None`` mean 1 and 0).

Paper vs code (``formulas_transformer.md`` section 4.6; the paper side from the catalogue's
memory of Algorithm 1, not re-read): (1) the code's backward divides by the current batch
statistic :math:`\sqrt{\psi^2+\epsilon}`, the paper by the running :math:`\psi_{t-1}` used in the
forward; (2) the warm-up (batch statistics for :math:`t\le T_w`, and two updates of
:math:`\varphi` per step for :math:`t<T_w`) is the code's; (3) GroupScaling1D is the code's
(not confirmed in the paper's main algorithm); (4) with a padding mask the code's forward
statistics skip padded tokens while the :math:`\tilde\nu` update averages over **all**
positions (no mask here: every token counts in both); (5) ``iters`` counts forward calls, not
optimizer steps (with gradient accumulation the warm-up ends earlier in steps). The paper's
recurrence :math:`\nu_t = \nu_{t-1}(1-(1-\alpha)\Gamma_t) + (1-\alpha)\Lambda_t`,
:math:`\Gamma = \langle z^2\rangle`, :math:`\Lambda = \langle g\odot z\rangle`, is the code's
update with :math:`\nu = (1-\alpha_b)\tilde\nu`.

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, each other gradient that of its input,
the new state the dtypes of the given state; statistics are computed in float64 (longdouble for
longdouble input) without overflow or underflow (:mod:`refnorm.norms._tokens`). A float64 call
whose ``x`` lies outside about :math:`[10^{-77}, 10^{77}]`
(:func:`refnorm.norms._stats.out_of_range`), or has a token group whose GroupScaling factor
:math:`\rho` exceeds float64 (its RMS is subnormal, with ``eps = 0``), is computed entirely in
``np.longdouble`` where that is wider, and rounded once; its backward follows
(:class:`refnorm.norms._stats.WideCache`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, check_eps, check_flag, check_num_groups,
                                  check_param, narrow, out_of_range, wider_dtype)
from refnorm.norms._tokens import (as_tokens, channel_sum, check_int, check_state, check_tokens,
                                   check_unit, rsqrt_quadratic_mean, token_axes, wide_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "power_norm"


class PowerNormState(NamedTuple):
    running_phi: np.ndarray     # \varphi, shape (C,)
    ema_gz: np.ndarray          # \tilde\nu as given: the backward returns the new one
    iters: np.ndarray           # t, an int64 0-d array


class PowerNormCache(NamedTuple):
    x: np.ndarray               # the input (not a copy)
    gs_rstd: np.ndarray         # GroupScaling factor per token and group, (M, G, 1), wide dtype
    rstd: np.ndarray            # the forward's (psi^2 + eps)^-1/2 or (phi + eps)^-1/2, (1, C)
    batch_rstd: np.ndarray | None   # (psi^2 + eps)^-1/2, the surrogate's divisor; None in eval
    weight: np.ndarray | None
    bias_dtype: np.dtype | None  # None without bias
    ema_gz: np.ndarray          # \tilde\nu before this step
    alpha_bkw: float


class PowerNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    ema_gz: np.ndarray          # the backward's new \tilde\nu (state, not a gradient)


def _check(x, weight, bias, training, eps, running_phi, ema_gz, iters, group_num, alpha_fwd,
           alpha_bkw, warmup_iters):
    x = check_tokens(x, _OP)
    c = x.shape[-1]
    return (x, check_param(weight, "weight", _OP, (c,)), check_param(bias, "bias", _OP, (c,)),
            check_flag(training, "training", _OP), check_eps(eps, _OP),
            check_state(running_phi, "running_phi", _OP, (c,)),
            check_state(ema_gz, "ema_gz", _OP, (c,)), check_int(iters, "iters", _OP),
            check_num_groups(group_num, c, _OP, "group_num"),
            check_unit(alpha_fwd, "alpha_fwd", _OP), check_unit(alpha_bkw, "alpha_bkw", _OP),
            check_int(warmup_iters, "warmup_iters", _OP))


def group_scaling(x2, group_num, eps):
    r"""GroupScaling1D of ``x2`` (shape :math:`(M, C)`): ``(xt, rho)`` with
    :math:`\tilde x = x\rho` and :math:`\rho = (\langle x^2\rangle_{\text{group}}+\epsilon)
    ^{-1/2}` of shape :math:`(M, G, 1)`, in the wide dtype."""
    m, c = x2.shape
    xg = x2.astype(wide_dtype(x2.dtype), copy=False).reshape(m, group_num, c // group_num)
    _, rho = rsqrt_quadratic_mean(xg, 2, eps)
    with np.errstate(invalid="ignore", over="ignore"):
        return (xg * rho).reshape(m, c), rho


def _rho_overflows(x2, rho):
    r"""Whether a GroupScaling factor is inf for a group that is not all zero (its RMS below
    about :math:`5.6\cdot 10^{-309}`: subnormal values with ``eps = 0``)."""
    with np.errstate(invalid="ignore"):
        m, c = x2.shape
        groups = rho.shape[1]
        nonzero = np.any(x2.reshape(m, groups, c // groups) != 0, axis=2)
        return bool(np.any((rho[..., 0] == np.inf) & nonzero))


def power_norm_forward(x, weight=None, bias=None, training=False, eps=1e-5, *, running_phi,
                       ema_gz, iters=0, group_num=1, alpha_fwd=0.9, alpha_bkw=0.9,
                       warmup_iters=10000):
    r"""PowerNorm of a token tensor; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., C)``
        Tokens; channel statistics pool every leading axis.
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma` and :math:`\beta`; None means 1 and 0.
    training : bool, default False
    eps : float, default 1e-5
        Inside the square roots, of GroupScaling and of the batch/running statistic.
    running_phi, ema_gz : ndarray of shape (C,), keyword-only
        :math:`\varphi` (init 1) and :math:`\tilde\nu` (init 0). Never modified.
    iters : int, default 0
        :math:`t` before this call; incremented by a training forward.
    group_num : int, default 1
        GroupScaling groups :math:`G` (a divisor of C).
    alpha_fwd, alpha_bkw : float in [0, 1], default 0.9
    warmup_iters : int, default 10000
        :math:`T_w`.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : PowerNormState
    cache : PowerNormCache
    """
    (x, weight, bias, training, eps, running_phi, ema_gz, t, group_num, alpha_fwd, alpha_bkw,
     warmup_iters) = _check(x, weight, bias, training, eps, running_phi, ema_gz, iters,
                            group_num, alpha_fwd, alpha_bkw, warmup_iters)
    x2 = as_tokens(x)
    if training and x2.shape[0] == 0:
        raise ValueError(f"{_OP}: `x` must hold at least one token when training, got shape "
                         f"{x.shape}")
    xt, rho = group_scaling(x2, group_num, eps)
    wide = xt.dtype
    wider = wider_dtype(wide)
    if wider is not None and (out_of_range(x2.astype(wide, copy=False))
                              or _rho_overflows(x2, rho)):
        # 1/RMS beyond float64 (a subnormal token with eps = 0), or squares out of range: the
        # whole call in the wider dtype, rounded once
        y, state, cache = power_norm_forward(
            x.astype(wider), *(None if a is None else a.astype(wider) for a in (weight, bias)),
            training, eps, running_phi=running_phi.astype(wider), ema_gz=ema_gz.astype(wider),
            iters=t, group_num=group_num, alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw,
            warmup_iters=warmup_iters)
        state = PowerNormState(narrow(state.running_phi, running_phi.dtype), ema_gz,
                               state.iters)
        dtypes = [x.dtype] + [x.dtype if a is None else a.dtype for a in (weight, bias)]
        return narrow(y, x.dtype), state, WideCache(cache, dtypes + [ema_gz.dtype], wider)
    phi = running_phi.astype(wide)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        running_rstd = (1.0 / np.sqrt(phi + eps))[None, :]
        batch_rstd = None
        if training:
            t += 1
            psi2, batch_rstd = rsqrt_quadratic_mean(xt, 0, eps)
            rstd = batch_rstd if t <= warmup_iters else running_rstd
            if t < warmup_iters:  # the cumulative average, during the warm-up only
                phi = phi * ((t - 1) / t) + psi2[0] / t
            phi = alpha_fwd * phi + (1.0 - alpha_fwd) * psi2[0]
            running_phi = phi.astype(running_phi.dtype)
        else:
            rstd = running_rstd
        y = xt * rstd
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
    state = PowerNormState(running_phi, ema_gz, np.asarray(t, dtype=np.int64))
    cache = PowerNormCache(x, rho, rstd, batch_rstd, weight,
                           None if bias is None else bias.dtype, ema_gz, alpha_bkw)
    return y.astype(x.dtype).reshape(x.shape), state, cache


def power_norm_backward(dy, cache):
    r"""The official backward of :func:`power_norm_forward`: the approximate backpropagation
    in training (a surrogate, see the module docstring), exact in evaluation. Returns
    :class:`PowerNormGrads`, whose last field is the new :math:`\tilde\nu`."""
    if isinstance(cache, WideCache):
        return cache.narrow(power_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    x, rho, rstd, batch_rstd, weight, bias_dtype, ema_gz, alpha_bkw = cache
    x2 = as_tokens(x)
    m, c = x2.shape
    groups = rho.shape[1]
    wide = rho.dtype
    dy2 = as_tokens(dy).astype(wide, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        xt = (x2.astype(wide, copy=False).reshape(m, groups, c // groups) * rho).reshape(m, c)
        z = xt * rstd
        g = dy2 * weight if weight is not None else dy2
        if batch_rstd is not None:       # training: the approximate backpropagation
            nu = ema_gz.astype(wide)
            ghat = g - (1.0 - alpha_bkw) * nu * z
            new_ema = (nu + np.mean(ghat * z, axis=0)).astype(ema_gz.dtype)
            dxt = ghat * batch_rstd
        else:                            # evaluation: exact
            new_ema = ema_gz
            dxt = g * rstd
        # GroupScaling backward (exact): d = rho (dxt - xt <dxt xt>_group)
        dxt = dxt.reshape(m, groups, c // groups)
        xtg = xt.reshape(m, groups, c // groups)
        dx = rho * (dxt - xtg * np.mean(dxt * xtg, axis=2, keepdims=True))
        dweight = None if weight is None else (dy2 * z).sum(axis=0).astype(weight.dtype)
    dbias = None if bias_dtype is None else channel_sum(dy, bias_dtype)
    return PowerNormGrads(dx.reshape(x.shape).astype(x.dtype), dweight, dbias, new_ema)


power_norm = custom_vjp(power_norm_forward, power_norm_backward, ("x", "weight", "bias"),
                        stateful=True)
power_norm.__doc__ = """Differentiable PowerNorm (engine op) with the official approximate
backward: returns ``(y, new_state)``; see :func:`power_norm_forward`. The backward's new
``ema_gz`` is returned by :func:`power_norm_backward`, and passed to
``on_backward_state(fields)`` when given (:class:`refnorm.nn.Norm` keeps it as its state)."""


def power_norm_composite(x, weight=None, bias=None, training=False, eps=1e-5, *, running_phi,
                         ema_gz, iters=0, group_num=1, alpha_fwd=0.9, alpha_bkw=0.9,
                         warmup_iters=10000):
    """The forward with engine primitives only: the engine derives the **exact** gradient
    (which the surrogate backward approximates). The new state is computed independently."""
    c = x.shape[-1]
    xg = ag.reshape(x, tuple(x.shape[:-1]) + (group_num, c // group_num))
    xt = ag.reshape(xg / ag.sqrt(ag.mean(xg * xg, -1, keepdims=True) + eps), x.shape)
    axes = token_axes(x.ndim)
    t = int(iters)
    if training:
        t += 1
        psi2 = ag.mean(xt * xt, axes, keepdims=True)
        z = xt / ag.sqrt(psi2 + eps) if t <= warmup_iters else xt / np.sqrt(running_phi + eps)
        p = psi2.data.reshape(c)
        phi = np.asarray(running_phi, np.float64)
        if t < warmup_iters:
            phi = (t - 1) / t * phi + p / t
        running_phi = alpha_fwd * phi + (1 - alpha_fwd) * p
    else:
        z = xt / np.sqrt(running_phi + eps)
    y = z * weight if weight is not None else z
    y = y + bias if bias is not None else y
    return y, PowerNormState(running_phi, ema_gz, np.asarray(t, dtype=np.int64))


def power_norm_surrogate(dy, x, weight=None, bias=None, training=False, eps=1e-5, *,
                         running_phi, ema_gz, iters=0, group_num=1, alpha_fwd=0.9,
                         alpha_bkw=0.9, warmup_iters=10000):
    r"""The official backward written a second, independent way, from the forward's arguments
    (not its cache): GroupScaling's Jacobian formed explicitly, per token and group,
    :math:`J = \rho\,(I - \tilde x\tilde x^\top/n)`, and the running term in the paper's
    recurrence form :math:`\tilde\nu_{\text{new}} = \tilde\nu\,(1-(1-\alpha_b)\Gamma) + \Lambda`
    with :math:`\Gamma = \langle z^2\rangle_M`, :math:`\Lambda = \langle g z\rangle_M`.
    Float64; for the tests and ``refnorm verify``."""
    x = np.asarray(x, np.float64)
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    m, n = x2.shape[0], c // group_num
    xg = x2.reshape(m, group_num, n)
    rho = 1.0 / np.sqrt(np.einsum("mgi,mgi->mg", xg, xg) / n + eps)          # (M, G)
    xt = xg * rho[..., None]
    jac = rho[..., None, None] * (np.eye(n) - np.einsum("mgi,mgj->mgij", xt, xt) / n)
    xt = xt.reshape(m, c)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    g = np.asarray(dy, np.float64).reshape(m, c) * w
    nu = np.asarray(ema_gz, np.float64)
    t = int(iters) + (1 if training else 0)
    denom_batch = np.sqrt(np.einsum("mc,mc->c", xt, xt) / m + eps) if training else None
    denom_run = np.sqrt(np.asarray(running_phi, np.float64) + eps)
    z = xt / (denom_batch if training and t <= warmup_iters else denom_run)
    if training:
        gamma_, lam_ = np.einsum("mc,mc->c", z, z) / m, np.einsum("mc,mc->c", g, z) / m
        new_nu = nu * (1.0 - (1.0 - alpha_bkw) * gamma_) + lam_
        dxt = (g - (1.0 - alpha_bkw) * nu * z) / denom_batch
    else:
        new_nu = nu
        dxt = g / denom_run
    dx = np.einsum("mgij,mgj->mgi", jac, dxt.reshape(m, group_num, n)).reshape(x.shape)
    dy2 = np.asarray(dy, np.float64).reshape(m, c)
    return PowerNormGrads(dx, None if weight is None else np.einsum("mc,mc->c", dy2, z),
                          None if bias is None else dy2.sum(axis=0), new_nu)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, training=True, iters=0, warmup_iters=10, group_num=1,
          affine=True, bias=True, eps=1e-5, alpha_fwd=0.9, alpha_bkw=0.9, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[-1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    return SampleInput(name, (x, weight, b), dict(
        training=training, eps=eps, running_phi=rng.uniform(0.5, 2.0, c),
        ema_gz=0.3 * rng.standard_normal(c), iters=iters, group_num=group_num,
        alpha_fwd=alpha_fwd, alpha_bkw=alpha_bkw, warmup_iters=warmup_iters))


def sample_inputs(rng):
    yield _case(rng, "(2,3,4)-warmup-t1", (2, 3, 4))
    yield _case(rng, "(2,3,4)-warmup-G2-t5", (2, 3, 4), iters=4, group_num=2)
    yield _case(rng, "(3,2,6)-after-warmup-G3", (3, 2, 6), iters=20, group_num=3)
    yield _case(rng, "(4,4)-t-equals-Tw-G2", (4, 4), iters=9, group_num=2)
    # one channel per group: GroupScaling is x / sqrt(x^2 + eps) and its backward the
    # cancellation rho (1 - xt^2) = eps rho^3; eps = 0.5 keeps it well conditioned for the oracle
    yield _case(rng, "(4,4)-one-channel-groups-eps0.5", (4, 4), iters=3, group_num=4, eps=0.5)
    yield _case(rng, "(5,3)-eval", (5, 3), training=False)
    yield _case(rng, "(2,2,4)-eval-G2", (2, 2, 4), training=False, group_num=2)
    yield _case(rng, "(2,3,4)-no-affine-eps0.1", (2, 3, 4), affine=False, eps=0.1)
    yield _case(rng, "(3,4)-weight-only-alphas0.5", (3, 4), bias=False, alpha_fwd=0.5,
                alpha_bkw=0.5)
    yield _case(rng, "(1,1,4)-one-token", (1, 1, 4), iters=3)
    constant = rng.standard_normal((3, 2, 4))
    constant[..., 1] = 0.7
    yield _case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant, iters=2)
    yield _case(rng, "(3,4)-mean100", (3, 4), x=100.0 + rng.standard_normal((3, 4)))


def oracle_inputs(rng):
    yield _case(rng, "(8,37,64)-warmup-G4", (8, 37, 64), group_num=4, iters=3, warmup_iters=8000)
    yield _case(rng, "(8,37,64)-after-warmup-G4", (8, 37, 64), group_num=4, iters=9000,
                warmup_iters=8000)
    yield _case(rng, "(5,13,33)-eval", (5, 13, 33), training=False, group_num=3)
    yield _case(rng, "(1,1,7)-one-token", (1, 1, 7))
    yield _case(rng, "(4096,17)-many-tokens", (4096, 17), iters=5)
    yield _case(rng, "(6,5,12)-mean1e4-std1e-3", (6, 5, 12), group_num=2,
                x=1e4 + 1e-3 * rng.standard_normal((6, 5, 12)))
    yield _case(rng, "(6,5,12)-tiny-scale", (6, 5, 12), x=1e-20 * rng.standard_normal((6, 5, 12)))
    yield _case(rng, "(6,5,12)-huge-scale", (6, 5, 12), x=1e20 * rng.standard_normal((6, 5, 12)))


def error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(4)

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias), {"running_phi": c.copy(),
                                                     "ema_gz": 0 * c, **kwargs})

    yield ErrorInput(call("list x", x=[[1.0, 2.0]]), TypeError,
                     r"power_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("int x", x=np.ones((2, 4), dtype=int)), TypeError,
                     r"power_norm: `x` must have a floating dtype")
    yield ErrorInput(call("1-d x", x=np.ones(4)), ValueError,
                     r"power_norm: `x` must have at least 2 dimensions")
    yield ErrorInput(call("weight", weight=np.ones(3)), ValueError,
                     r"power_norm: `weight` must have shape \(4,\), got \(3,\)")
    yield ErrorInput(call("running_phi", running_phi=np.ones(3)), ValueError,
                     r"power_norm: `running_phi` must have shape \(4,\), got \(3,\)")
    yield ErrorInput(call("ema_gz None", ema_gz=None), TypeError,
                     r"power_norm: `ema_gz` must be a numpy.ndarray")
    yield ErrorInput(call("group_num", group_num=3), ValueError,
                     r"power_norm: `group_num` must be a positive divisor")
    yield ErrorInput(call("iters", iters=-1), ValueError, r"power_norm: `iters` must be an int")
    yield ErrorInput(call("warmup_iters", warmup_iters=2.5), ValueError,
                     r"power_norm: `warmup_iters` must be an int")
    yield ErrorInput(call("alpha_fwd", alpha_fwd=1.5), ValueError,
                     r"power_norm: `alpha_fwd` must be a number in \[0, 1\]")
    yield ErrorInput(call("eps", eps=-1.0), ValueError, r"power_norm: `eps` must be a finite")
    yield ErrorInput(call("training", training=1), TypeError, r"power_norm: `training` must be")
    yield ErrorInput(call("no tokens", x=np.ones((0, 3, 4)), training=True), ValueError,
                     r"power_norm: `x` must hold at least one token when training")


def _torch_function(torch):
    """The official ``PowerFunction`` written with torch ops: a ``torch.autograd.Function``
    whose backward is the approximate backpropagation (GroupScaling outside it, differentiated
    by autograd, as in the official module)."""

    class PowerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, xt, weight, bias, rstd, batch_rstd, ema_gz, alpha_bkw, out):
            z = xt * rstd
            ctx.save_for_backward(z, weight, batch_rstd, ema_gz)
            ctx.alpha_bkw, ctx.out = alpha_bkw, out
            y = z
            if weight is not None:
                y = y * weight
            if bias is not None:
                y = y + bias
            return y

        @staticmethod
        def backward(ctx, dy):
            z, weight, batch_rstd, ema_gz = ctx.saved_tensors
            g = dy * weight if weight is not None else dy
            dims = tuple(range(z.dim() - 1))
            ghat = g - (1 - ctx.alpha_bkw) * ema_gz * z
            ctx.out["ema_gz"] = ema_gz + (ghat * z).mean(dim=dims)
            dweight = (dy * z).sum(dim=dims) if ctx.needs_input_grad[1] else None
            dbias = dy.sum(dim=dims) if ctx.needs_input_grad[2] else None
            return ghat * batch_rstd, dweight, dbias, None, None, None, None, None

    return PowerFunction


def _torch_call(torch, x, weight, bias, *, running_phi, ema_gz, training=False, eps=1e-5,
                iters=0, group_num=1, alpha_fwd=0.9, alpha_bkw=0.9, warmup_iters=10000,
                backward_state=None):
    """PowerNorm with torch ops, after the official ``MaskPowerNorm`` (no mask): GroupScaling1D
    by autograd, then a ``torch.autograd.Function`` with the approximate backward in training
    (plain autograd in evaluation, where the backward is exact). Half precision is computed in
    float32. ``backward_state``: a dict that receives the backward's new ``ema_gz``."""
    out_dtype = x.dtype
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf = x.float() if low else x
    wf = weight.float() if weight is not None and low else weight
    bf = bias.float() if bias is not None and low else bias
    wide = xf.dtype
    phi = torch.as_tensor(running_phi).to(device=x.device, dtype=wide)
    nu = torch.as_tensor(ema_gz).to(device=x.device, dtype=wide)
    c = x.shape[-1]
    xg = xf.reshape(*x.shape[:-1], group_num, c // group_num)
    xt = (xg / torch.sqrt((xg * xg).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)
    dims = tuple(range(x.dim() - 1))
    t = int(iters)
    new_phi = phi
    if training:
        t += 1
        with torch.no_grad():
            psi2 = (xt * xt).mean(dim=dims)
            batch_rstd = torch.rsqrt(psi2 + eps)
            rstd = batch_rstd if t <= warmup_iters else torch.rsqrt(phi + eps)
            new_phi = phi
            if t < warmup_iters:
                new_phi = new_phi * (t - 1) / t + psi2 / t
            new_phi = alpha_fwd * new_phi + (1 - alpha_fwd) * psi2
        out = {} if backward_state is None else backward_state
        y = _torch_function(torch).apply(xt, wf, bf, rstd, batch_rstd, nu, alpha_bkw, out)
    else:
        y = xt * torch.rsqrt(phi + eps)
        y = y * wf if wf is not None else y
        y = y + bf if bf is not None else y
    state = {"running_phi": new_phi, "ema_gz": torch.as_tensor(ema_gz),
             "iters": np.asarray(t, dtype=np.int64)}
    return y.to(out_dtype), state


def layer_init(features, *, group_num=1, warmup_iters=10000, alpha_fwd=0.9, alpha_bkw=0.9,
               eps=1e-5):
    """A PowerNorm layer on ``features`` channels, initialized as the official module:
    :math:`\\gamma = 1`, :math:`\\beta = 0`, ``running_phi = 1``, ``ema_gz = 0``, ``iters = 0``."""
    params = {"weight": np.ones(features), "bias": np.zeros(features)}
    state = {"running_phi": np.ones(features), "ema_gz": np.zeros(features),
             "iters": np.asarray(0, dtype=np.int64)}
    return params, state, dict(eps=eps, group_num=group_num, alpha_fwd=alpha_fwd,
                               alpha_bkw=alpha_bkw, warmup_iters=warmup_iters)


SPEC = NormSpec(
    name="power_norm",
    title="PowerNorm (batch quadratic mean, running statistics, approximate backward)",
    paper=Paper("PowerNorm: Rethinking Batch Normalization in Transformers",
                "Shen, Yao, Gholami, Mahoney, Keutzer", 2020, "arXiv:2003.07845"),
    forward=power_norm_forward,
    backward=power_norm_backward,
    op=power_norm,
    composite=power_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    gradient="surrogate",
    gradient_note="training uses the official approximate backpropagation (running "
                  "ema_gz term, current-batch divisor); evaluation is exact",
    surrogate=power_norm_surrogate,
    stateful=True,
    train_eval_differ=True,
    invariances=(),
    stats_axes=None,     # a quadratic mean: not mean 0 / unit variance
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=layer_init,
)

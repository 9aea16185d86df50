r"""Unified Normalization (UN): batch quadratic-mean normalization with fluctuation smoothing,
outlier filtration and a smoothed approximate backward, for transformers.

Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu, *Unified Normalization for Accelerating and
Stabilizing Transformers*, ACM MM 2022, arXiv:2208.01313. Official code:
``hikvision-research/Unified-Normalization``, ``neural_machine_translation/fairseq/modules/
unified_normalization/unified_normalization.py`` (commit 6e8497f; the image-classification copy
is the same algorithm), which this module follows.

Layout: ``x`` of shape :math:`(\ldots, C)`, tokens :math:`(B, N, C)`; channel :math:`c` pools the
:math:`M` tokens (:mod:`refnorm.norms._tokens`). No centring: a quadratic mean.

**State**: ``running_var`` (init 1), ``ema_gz`` (init 0), ``buffer_x2`` :math:`(W_f, C)` and
``buffer_gz`` :math:`(W_b, C)` (init 0; their lengths are the windows, ``window_size`` 4 by
default), ``iters`` :math:`t` (init 0) and ``skip_counter`` (init 0).

**Forward, training** (:math:`t` = ``iters`` + 1, :math:`k_f = t \bmod W_f`):

.. math::

   q_c = \tfrac1M\textstyle\sum_m x_{mc}^2,\qquad
   \rho = \mathrm{Var}_{\text{unbiased}}\bigl(\sqrt{\text{buffer\_x2}}\bigr)
   \ \text{(one scalar over all } W_f C \text{ entries, before the insertion)},\qquad
   \text{buffer\_x2}[k_f] \leftarrow q .

*Adaptive outlier filtration* (``outlier_filtration=True`` and :math:`t \ge T_w`): with the
window's arithmetic and geometric means :math:`A_c, G_c` per channel, if any
:math:`A_c - G_c > \rho\,W_f`, the step is an outlier: ``buffer_x2[k_f]`` :math:`\leftarrow`
``running_var``, ``skip``, ``skip_counter`` + 1. (``skip`` is also always set when
:math:`W_f \le 1`.) *Fluctuation smoothing*: the statistic is the geometric mean of the window
(the current :math:`q` included),

.. math::

   \sigma^2 = \begin{cases} q & t \le W_f \text{ or } t < T_w \text{ or skip}\\
              \exp\bigl(\tfrac1{W_f}\sum_w \log \text{buffer\_x2}[w]\bigr) & \text{otherwise}
              \end{cases},\qquad
   z = x\,(\sigma^2+\epsilon)^{-1/2},\qquad y = \gamma\odot z + \beta,

and ``running_var`` :math:`\leftarrow m\,` ``running_var`` :math:`+ (1-m)\,\sigma^2`. The
*gradient compensation* factor, used by the backward only, is
:math:`r = \mathrm{clip}(\sqrt{\sigma^2+\epsilon}/\sqrt{\text{running\_var}+\epsilon}, 1/5, 5)`
(running_var before the update), or :math:`r = 1` when :math:`t \le \max(1000, T_w)` or skip.

**Evaluation**: :math:`y = \gamma\odot x\,(\text{running\_var}+\epsilon)^{-1/2} + \beta`.

**Backward, training** (``gradient="surrogate"``), :math:`k_b = t \bmod W_b`:

.. math::

   g = \mathrm{d}y\odot\gamma\,r,\qquad
   \bar g_c = \tfrac1M\textstyle\sum_m g\odot z,\qquad
   \text{buffer\_gz}[k_b] \leftarrow (\text{ema\_gz if skip else } \bar g),

   \mu = \begin{cases}\bar g & t \le W_b \text{ or } t < T_w \text{ or skip}\\
         \tfrac1{W_b}\sum_w \text{buffer\_gz}[w] & \text{otherwise}\end{cases},\qquad
   \text{ema\_gz} \leftarrow m\,\text{ema\_gz} + (1-m)\,\mu,

   \mathrm{d}x = (g - \nu\odot z)\,(\sigma^2+\epsilon)^{-1/2},\quad
   \nu = \mu \text{ if skip else the new ema\_gz},\qquad
   \mathrm{d}\gamma = \textstyle\sum_m \mathrm{d}y\odot r z,\qquad
   \mathrm{d}\beta = \textstyle\sum_m \mathrm{d}y .

With :math:`W_f = W_b = 1` (skip always) this is the **exact** gradient of
:math:`x\,(q+\epsilon)^{-1/2}` (:math:`\nu = \bar g`, :math:`r = 1`); otherwise it is an
approximation of the exact gradient (the record's ``composite``, which differentiates through
the geometric mean; derivation: ``docs/derivations/unified_norm.rst``). In evaluation the
backward is exact. ``refnorm verify`` prints the distance on every sample.

**Explicit state.** The forward returns :class:`UnifiedNormState` with the new
``running_var``, ``buffer_x2``, ``iters`` and ``skip_counter`` and the **given** ``ema_gz`` and
``buffer_gz``; the backward computes the new ``ema_gz`` and ``buffer_gz`` and returns them as
the last two fields of :class:`UnifiedNormGrads`. Nothing is modified in place.

Conventions and defaults, from the official code: ``eps = 1e-5`` inside the square root,
``momentum = 0.9`` (the weight of the **old** value), ``window_size = 4`` (``(W_f, W_b)``, here
the buffer lengths), ``warmup_iters = 4000``, ``outlier_filtration = False`` (recommended for
NLP; the T2T-ViT image code uses True), affine (:math:`\gamma = 1`, :math:`\beta = 0`).

Discrepancies and pitfalls (``formulas_transformer.md`` section 5): :math:`\mathrm{d}\gamma`
uses the compensated :math:`r z`, not the forward's :math:`z`; during the warm-up with
:math:`W > 1` the backward is not exact (EMA-smoothed, :math:`\nu` = 0.9 old + 0.1 current); the
outlier test is one global scalar threshold (any channel triggers it); the NMT code calls UN
without a padding mask, so padding tokens count in its statistics (no mask here); a channel
identically 0 in the window makes :math:`\log 0 = -\infty` and a geometric mean of 0, finite
after :math:`+\epsilon`.

**NaN**: a NaN in ``x`` or in the state that the outlier test compares (no channel passes it
and a comparison is NaN) leaves the step undecided; the outputs are then NaN wherever the two
branches differ (the official code's ``torch.any`` reads the NaN comparison as False), and
``skip_counter`` is unchanged.

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, the other gradients those of their inputs,
the new state those of the given state; statistics in float64 (longdouble for longdouble input)
without overflow or underflow, and the window's geometric mean to a few ULPs at any magnitude
(:mod:`refnorm.norms._tokens`). A float64 call whose ``x`` lies outside about
:math:`[10^{-77}, 10^{77}]` (where :math:`q` or the window leaves float64's range) is computed
entirely in ``np.longdouble`` where that is wider, and rounded once
(:func:`refnorm.norms._stats.out_of_range`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (WideCache, check_array, check_eps, check_flag, check_param,
                                  narrow, out_of_range, wider_dtype)
from refnorm.norms._tokens import (as_tokens, channel_sum, check_int, check_state, check_tokens,
                                   check_unit, geometric_mean, rsqrt_quadratic_mean, token_axes,
                                   wide_dtype)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "unified_norm"


class UnifiedNormState(NamedTuple):
    running_var: np.ndarray     # (C,)
    ema_gz: np.ndarray          # as given: the backward returns the new one
    buffer_x2: np.ndarray       # (W_f, C)
    buffer_gz: np.ndarray       # (W_b, C), as given: the backward returns the new one
    iters: np.ndarray           # t, int64 0-d
    skip_counter: np.ndarray    # int64 0-d


class UnifiedNormCache(NamedTuple):
    x: np.ndarray
    rstd: np.ndarray            # (sigma^2 + eps)^-1/2 (training) or (running_var + eps)^-1/2
    r: np.ndarray               # the gradient-compensation factor, (1, C); 1 in evaluation
    weight: np.ndarray | None
    bias_dtype: np.dtype | None
    ema_gz: np.ndarray
    buffer_gz: np.ndarray
    t: int
    skip: bool
    training: bool
    momentum: float
    warmup_iters: int


class UnifiedNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    ema_gz: np.ndarray          # the backward's new ema_gz (state, not a gradient)
    buffer_gz: np.ndarray       # the backward's new buffer_gz (state)


def _check_window(value, name, channels):
    value = check_array(value, name, _OP)
    if value.ndim != 2 or value.shape[1] != channels:
        raise ValueError(f"{_OP}: `{name}` must have shape (W, C) with C = {channels}, got "
                         f"{value.shape}")
    return value


def _outlier_test(window, rho, wf):
    r"""The adaptive outlier test, :math:`\exists c: A_c - G_c > \rho\,W_f`: True, False, or
    None where no channel passes it and a NaN comparison leaves it undecided (a NaN in ``x`` or
    in the state is never dropped). :math:`A \ge G`, so an infinite entry makes
    :math:`A - G` infinite (its limit), not ``inf - inf``."""
    am = window.mean(axis=0)
    spread = np.where(am == np.inf, np.inf, am - geometric_mean(window, axis=0))
    if np.any(spread > rho * wf):
        return True
    if window.size > 1 and np.isnan(spread - rho * wf).any():
        return None
    return False


def _either(a, b):
    """The arrays of ``a`` where they equal those of ``b`` (NaN with NaN), NaN elsewhere: the
    result of a branch that a NaN decides."""
    return tuple(np.where((p == q) | (np.isnan(p) & np.isnan(q)), p, np.nan)
                 for p, q in zip(a, b))


def unified_norm_forward(x, weight=None, bias=None, training=False, eps=1e-5, *, running_var,
                         ema_gz, buffer_x2, buffer_gz, iters=0, skip_counter=0, momentum=0.9,
                         warmup_iters=4000, outlier_filtration=False):
    r"""Unified Normalization of a token tensor; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., C)``
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma`, :math:`\beta`; None means 1 and 0.
    training : bool, default False
    eps : float, default 1e-5
    running_var, ema_gz : ndarray of shape (C,), keyword-only
    buffer_x2 : ndarray of shape (W_f, C); buffer_gz : ndarray of shape (W_b, C)
        The windows (their lengths are ``window_size``). Never modified.
    iters, skip_counter : int, default 0
    momentum : float in [0, 1], default 0.9
        Weight of the old value in ``running_var`` and ``ema_gz``.
    warmup_iters : int, default 4000
    outlier_filtration : bool, default False

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : UnifiedNormState
    cache : UnifiedNormCache
    """
    x = check_tokens(x, _OP)
    c = x.shape[-1]
    weight = check_param(weight, "weight", _OP, (c,))
    bias = check_param(bias, "bias", _OP, (c,))
    training = check_flag(training, "training", _OP)
    eps = check_eps(eps, _OP)
    running_var = check_state(running_var, "running_var", _OP, (c,))
    ema_gz = check_state(ema_gz, "ema_gz", _OP, (c,))
    buffer_x2 = _check_window(buffer_x2, "buffer_x2", c)
    buffer_gz = _check_window(buffer_gz, "buffer_gz", c)
    wf, wb = buffer_x2.shape[0], buffer_gz.shape[0]
    if wf < 1 or wb < 1:
        raise ValueError(f"{_OP}: `buffer_x2` and `buffer_gz` must hold at least one window "
                         f"entry each, got shapes {buffer_x2.shape} and {buffer_gz.shape}")
    t = check_int(iters, "iters", _OP)
    skip_counter = check_int(skip_counter, "skip_counter", _OP)
    momentum = check_unit(momentum, "momentum", _OP)
    warmup_iters = check_int(warmup_iters, "warmup_iters", _OP)
    outlier_filtration = check_flag(outlier_filtration, "outlier_filtration", _OP)
    x2 = as_tokens(x)
    wide = wide_dtype(x.dtype)
    xw = x2.astype(wide, copy=False)
    wider = wider_dtype(wide)
    if wider is not None and out_of_range(xw):  # q = <x^2> beyond float64: the call, wider
        y, state, cache = unified_norm_forward(
            x.astype(wider), *(None if p is None else p.astype(wider) for p in (weight, bias)),
            training, eps, running_var=running_var.astype(wider), ema_gz=ema_gz.astype(wider),
            buffer_x2=buffer_x2.astype(wider), buffer_gz=buffer_gz.astype(wider), iters=t,
            skip_counter=skip_counter, momentum=momentum, warmup_iters=warmup_iters,
            outlier_filtration=outlier_filtration)
        given = (running_var, ema_gz, buffer_x2, buffer_gz)
        state = state._replace(**{k: narrow(getattr(state, k), a.dtype)
                                  for k, a in zip(state._fields, given)})
        dtypes = [x.dtype] + [x.dtype if p is None else p.dtype for p in (weight, bias)]
        return narrow(y, x.dtype), state, WideCache(cache, dtypes + [ema_gz.dtype,
                                                                     buffer_gz.dtype], wider)
    skip = False
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rv = running_var.astype(wide)
        if not training:
            rstd = (1.0 / np.sqrt(rv + eps))[None, :]
            r = np.ones((1, c), wide)
        else:
            if x2.shape[0] == 0:
                raise ValueError(f"{_OP}: `x` must hold at least one token when training, got "
                                 f"shape {x.shape}")
            t += 1
            skip = wf <= 1
            q, q_rstd = rsqrt_quadratic_mean(xw, 0, eps)
            window = buffer_x2.astype(wide)
            root = np.sqrt(window).ravel()
            rho = np.var(root, ddof=1) if root.size > 1 else np.asarray(np.nan, wide)
            window[t % wf] = q[0]
            outlier = False
            if outlier_filtration and t >= warmup_iters:
                outlier = _outlier_test(window, rho, wf)

            def smoothing(is_outlier):
                """``(window, var, rstd, r)`` of the step, an outlier or not."""
                win, skipped = window.copy(), skip or is_outlier
                if is_outlier:
                    win[t % wf] = rv
                if t <= wf or t < warmup_iters or skipped:
                    var, rstd = q[0], q_rstd
                else:
                    var = geometric_mean(win, axis=0)
                    rstd = (1.0 / np.sqrt(var + eps))[None, :]
                if t <= max(1000, warmup_iters) or skipped:
                    r = np.ones((1, c), wide)
                else:
                    r = np.clip(np.sqrt(var + eps) / np.sqrt(rv + eps), 0.2, 5.0)[None, :]
                return win, var, rstd, r

            if outlier is None:     # a NaN leaves the test undecided: NaN where it matters
                window, var, rstd, r = _either(smoothing(False), smoothing(True))
                skip = skip or None     # skip_counter unchanged
            else:
                window, var, rstd, r = smoothing(outlier)
                skip = skip or outlier
                skip_counter += int(outlier)
            new_rv = momentum * rv + (1.0 - momentum) * var
            running_var = new_rv.astype(running_var.dtype)
            buffer_x2 = window.astype(buffer_x2.dtype)
        y = xw * rstd
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
    state = UnifiedNormState(running_var, ema_gz, buffer_x2, buffer_gz,
                             np.asarray(t, dtype=np.int64), np.asarray(skip_counter, np.int64))
    cache = UnifiedNormCache(x, rstd, r, weight, None if bias is None else bias.dtype, ema_gz,
                             buffer_gz, t, skip, training, momentum, warmup_iters)
    return y.astype(x.dtype).reshape(x.shape), state, cache


def unified_norm_backward(dy, cache):
    r"""The official backward of :func:`unified_norm_forward` (a surrogate in training, see the
    module docstring; exact in evaluation). Returns :class:`UnifiedNormGrads`, whose last two
    fields are the new ``ema_gz`` and ``buffer_gz``."""
    if isinstance(cache, WideCache):
        return cache.narrow(unified_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    (x, rstd, r, weight, bias_dtype, ema_gz, buffer_gz, t, skip, training, momentum,
     warmup_iters) = cache
    wide = rstd.dtype
    x2 = as_tokens(x).astype(wide, copy=False)
    dy2 = as_tokens(dy).astype(wide, copy=False)
    with np.errstate(invalid="ignore", over="ignore"):
        z = x2 * rstd
        gamma = weight if weight is not None else 1.0
        g = dy2 * gamma * r
        if training:
            wb = buffer_gz.shape[0]
            nu_prev = ema_gz.astype(wide)
            gz = np.mean(g * z, axis=0)

            def smoothing(skip):
                """``(dx, new ema_gz, new buffer_gz)``, after an outlier step or not."""
                window = buffer_gz.astype(wide)
                window[t % wb] = nu_prev if skip else gz
                mu = gz if (t <= wb or t < warmup_iters or skip) else window.mean(axis=0)
                nu = momentum * nu_prev + (1.0 - momentum) * mu
                return (g - (mu if skip else nu) * z) * rstd, nu, window

            # skip None: the forward's outlier test met a NaN (NaN where the branches differ)
            dx, nu, window = smoothing(skip) if skip is not None else \
                _either(smoothing(False), smoothing(True))
            new_ema, new_buffer = nu.astype(ema_gz.dtype), window.astype(buffer_gz.dtype)
        else:
            dx = g * rstd
            new_ema, new_buffer = ema_gz, buffer_gz
        dweight = None if weight is None else (dy2 * (r * z)).sum(axis=0).astype(weight.dtype)
    dbias = None if bias_dtype is None else channel_sum(dy, bias_dtype)
    return UnifiedNormGrads(dx.astype(x.dtype).reshape(x.shape), dweight, dbias, new_ema,
                            new_buffer)


unified_norm = custom_vjp(unified_norm_forward, unified_norm_backward, ("x", "weight", "bias"),
                          stateful=True)
unified_norm.__doc__ = """Differentiable Unified Normalization (engine op) with the official
backward: returns ``(y, new_state)``; see :func:`unified_norm_forward`. The backward's new
``ema_gz`` and ``buffer_gz`` are returned by :func:`unified_norm_backward`, and passed to
``on_backward_state(fields)`` when given (:class:`refnorm.nn.Norm` keeps it as its state)."""


def _schedule(t, wf, warmup_iters, outlier_filtration, q, buffer_x2, running_var):
    """``(window, skip, skip_counter increment)``: the forward's window logic, on arrays."""
    skip = wf <= 1
    root = np.sqrt(buffer_x2).ravel()
    rho = np.var(root, ddof=1) if root.size > 1 else np.nan
    window = np.array(buffer_x2, np.float64)
    window[t % wf] = q
    extra = 0
    if outlier_filtration and t >= warmup_iters:
        with np.errstate(divide="ignore"):
            gm = np.exp(np.log(window).mean(axis=0))
        if np.any(window.mean(axis=0) - gm > rho * wf):
            window[t % wf] = running_var
            skip, extra = True, 1
    return window, skip, extra


def unified_norm_composite(x, weight=None, bias=None, training=False, eps=1e-5, *, running_var,
                           ema_gz, buffer_x2, buffer_gz, iters=0, skip_counter=0, momentum=0.9,
                           warmup_iters=4000, outlier_filtration=False):
    """The forward with engine primitives only: the engine derives the **exact** gradient,
    through the geometric mean of the window where it is used (the buffer's older entries are
    constants; the current quadratic mean is the graph's). The state is computed independently
    (no gradient)."""
    axes = token_axes(x.ndim)
    c = x.shape[-1]
    t = int(iters)
    wf = buffer_x2.shape[0]
    new_buffer = buffer_x2
    if not training:
        z = x / np.sqrt(running_var + eps)
    else:
        t += 1
        q = ag.mean(x * x, axes)
        window, skip, extra = _schedule(t, wf, warmup_iters, outlier_filtration, q.data,
                                        buffer_x2, running_var)
        skip_counter = int(skip_counter) + extra
        if t <= wf or t < warmup_iters or skip:
            var = q
        else:   # the geometric mean, with the current entry q from the graph
            others = np.delete(np.log(window), t % wf, axis=0).sum(axis=0)
            var = ag.exp((others + ag.log(q)) / wf)
        z = x / ag.reshape(ag.sqrt(var + eps), (1,) * (x.ndim - 1) + (c,))
        running_var = momentum * running_var + (1 - momentum) * var.data
        new_buffer = window
    y = z * weight if weight is not None else z
    y = y + bias if bias is not None else y
    return y, UnifiedNormState(running_var, ema_gz, new_buffer, buffer_gz,
                               np.asarray(t, dtype=np.int64),
                               np.asarray(int(skip_counter), dtype=np.int64))


def unified_norm_surrogate(dy, x, weight=None, bias=None, training=False, eps=1e-5, *,
                           running_var, ema_gz, buffer_x2, buffer_gz, iters=0, skip_counter=0,
                           momentum=0.9, warmup_iters=4000, outlier_filtration=False):
    """The official backward written a second time, from the forward's arguments (not its
    cache), channel by channel in float64: for the tests and ``refnorm verify``."""
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    dy2 = np.asarray(dy, np.float64).reshape(x2.shape)
    m, c = x2.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    wb = buffer_gz.shape[0]
    dx, dw = np.empty_like(x2), np.empty(c)
    new_ema, new_buf = np.array(ema_gz, np.float64), np.array(buffer_gz, np.float64)
    t = int(iters) + 1
    if training:
        q = np.array([x2[:, j] @ x2[:, j] / m for j in range(c)])
        window, skip, _ = _schedule(t, buffer_x2.shape[0], warmup_iters, outlier_filtration, q,
                                    buffer_x2, running_var)
        smooth = not (t <= buffer_x2.shape[0] or t < warmup_iters or skip)
        with np.errstate(divide="ignore"):
            var = np.exp(np.log(window).mean(axis=0)) if smooth else q
    for j in range(c):
        if not training:
            s = np.sqrt(running_var[j] + eps)
            dx[:, j] = dy2[:, j] * w[j] / s
            dw[j] = dy2[:, j] @ (x2[:, j] / s)
            continue
        s = np.sqrt(var[j] + eps)
        r = 1.0 if (t <= max(1000, warmup_iters) or skip) else \
            min(max(s / np.sqrt(running_var[j] + eps), 0.2), 5.0)
        z = x2[:, j] / s
        g = dy2[:, j] * w[j] * r
        gz = (g @ z) / m
        new_buf[t % wb, j] = ema_gz[j] if skip else gz
        mu = gz if (t <= wb or t < warmup_iters or skip) else new_buf[:, j].mean()
        new_ema[j] = momentum * ema_gz[j] + (1 - momentum) * mu
        dx[:, j] = (g - (mu if skip else new_ema[j]) * z) / s
        dw[j] = dy2[:, j] @ (r * z)
    return UnifiedNormGrads(dx.reshape(x.shape), None if weight is None else dw,
                            None if bias is None else dy2.sum(axis=0), new_ema, new_buf)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, training=True, iters=0, warmup_iters=2, window=(4, 4),
          affine=True, bias=True, eps=1e-5, momentum=0.9, outlier=False, spread=0.3, x=None,
          buffer_x2=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[-1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    if buffer_x2 is None:   # past quadratic means
        buffer_x2 = np.exp(spread * rng.standard_normal((window[0], c)))
    return SampleInput(name, (x, weight, b), dict(
        training=training, eps=eps, running_var=rng.uniform(0.5, 2.0, c),
        ema_gz=0.3 * rng.standard_normal(c), buffer_x2=buffer_x2,
        buffer_gz=0.3 * rng.standard_normal((window[1], c)), iters=iters, skip_counter=0,
        momentum=momentum, warmup_iters=warmup_iters, outlier_filtration=outlier))


def sample_inputs(rng):
    yield _case(rng, "(2,3,4)-smoothing-compensated", (2, 3, 4), iters=1500)
    yield _case(rng, "(2,3,4)-smoothing-warm-r1", (2, 3, 4), iters=10)
    yield _case(rng, "(2,3,4)-warmup", (2, 3, 4), iters=0, warmup_iters=4000)
    yield _case(rng, "(3,5)-window1-exact", (3, 5), iters=7, window=(1, 1))
    yield _case(rng, "(3,2,3)-windows-3-2", (3, 2, 3), iters=1500, window=(3, 2))
    # a tight window (rho ~ 0) and a batch with q ~ 9: AM - GM > rho W, the step is skipped
    yield _case(rng, "(2,3,4)-outlier-skip", (2, 3, 4), iters=1500, outlier=True, spread=0.01,
                x=3.0 * rng.standard_normal((2, 3, 4)))
    # a spread window (rho = 0.75, rho W = 3) and q ~ 1: AM - GM ~ 0.7, kept
    yield _case(rng, "(2,3,4)-outlier-kept", (2, 3, 4), iters=1500, outlier=True,
                buffer_x2=np.tile([[0.25], [4.0], [0.25], [4.0]], (1, 4)))
    yield _case(rng, "(5,3)-eval", (5, 3), training=False)
    yield _case(rng, "(2,3,4)-no-affine-eps0.1", (2, 3, 4), iters=1500, affine=False, eps=0.1)
    yield _case(rng, "(3,4)-weight-only", (3, 4), iters=1500, bias=False)
    yield _case(rng, "(1,1,4)-one-token", (1, 1, 4), iters=1500)
    constant = rng.standard_normal((3, 2, 4))
    constant[..., 1] = 0.7
    yield _case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant, iters=1500)
    yield _case(rng, "(3,4)-mean100", (3, 4), iters=1500, x=100.0 + rng.standard_normal((3, 4)))


def oracle_inputs(rng):
    yield _case(rng, "(8,37,64)-smoothing", (8, 37, 64), iters=5000, warmup_iters=4000)
    yield _case(rng, "(8,37,64)-warmup", (8, 37, 64), iters=3, warmup_iters=4000)
    yield _case(rng, "(5,13,33)-eval", (5, 13, 33), training=False)
    yield _case(rng, "(4096,17)-many-tokens", (4096, 17), iters=1500)
    yield _case(rng, "(6,5,12)-outlier", (6, 5, 12), iters=1500, outlier=True, spread=0.01,
                x=3.0 * rng.standard_normal((6, 5, 12)))
    yield _case(rng, "(1,1,7)-one-token", (1, 1, 7), iters=1500)
    yield _case(rng, "(6,5,12)-mean1e4-std1e-3", (6, 5, 12), iters=1500,
                x=1e4 + 1e-3 * rng.standard_normal((6, 5, 12)))
    yield _case(rng, "(6,5,12)-tiny-scale", (6, 5, 12), iters=1500,
                x=1e-20 * rng.standard_normal((6, 5, 12)))


def error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(4)

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias), {
            "running_var": c.copy(), "ema_gz": 0 * c, "buffer_x2": np.zeros((4, 4)),
            "buffer_gz": np.zeros((4, 4)), **kwargs})

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError,
                     r"unified_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("1-d x", x=np.ones(4)), ValueError,
                     r"unified_norm: `x` must have at least 2 dimensions")
    yield ErrorInput(call("bias", bias=np.ones(5)), ValueError,
                     r"unified_norm: `bias` must have shape \(4,\), got \(5,\)")
    yield ErrorInput(call("running_var", running_var=np.ones((1, 4))), ValueError,
                     r"unified_norm: `running_var` must have shape \(4,\)")
    yield ErrorInput(call("buffer_x2 1-d", buffer_x2=np.ones(4)), ValueError,
                     r"unified_norm: `buffer_x2` must have shape \(W, C\) with C = 4, got \(4,\)")
    yield ErrorInput(call("buffer_gz channels", buffer_gz=np.ones((4, 3))), ValueError,
                     r"unified_norm: `buffer_gz` must have shape \(W, C\) with C = 4, "
                     r"got \(4, 3\)")
    yield ErrorInput(call("empty window", buffer_gz=np.ones((0, 4))), ValueError,
                     r"unified_norm: `buffer_x2` and `buffer_gz` must hold at least one")
    yield ErrorInput(call("momentum", momentum=2.0), ValueError,
                     r"unified_norm: `momentum` must be a number in \[0, 1\]")
    yield ErrorInput(call("iters", iters=1.0), ValueError, r"unified_norm: `iters` must be an int")
    yield ErrorInput(call("outlier", outlier_filtration="yes"), TypeError,
                     r"unified_norm: `outlier_filtration` must be a bool")
    yield ErrorInput(call("no tokens", x=np.ones((2, 0, 4)), training=True), ValueError,
                     r"unified_norm: `x` must hold at least one token when training")


def _torch_function(torch):
    """The official ``UnifiedNormalizationFunction`` backward, with torch ops."""

    class UNFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, rstd, r, info):
            z = x * rstd
            ctx.save_for_backward(z, weight, rstd, r)
            ctx.info = info
            y = z * weight if weight is not None else z
            return y + bias if bias is not None else y

        @staticmethod
        def backward(ctx, dy):
            z, weight, rstd, r = ctx.saved_tensors
            info = ctx.info
            dims = tuple(range(z.dim() - 1))
            g = (dy * weight if weight is not None else dy) * r
            gz = (g * z).mean(dim=dims)
            buf = info["buffer_gz"].clone()
            t, wb, m, skip = info["t"], buf.shape[0], info["momentum"], info["skip"]
            buf[t % wb] = info["ema_gz"] if skip else gz
            mu = gz if (t <= wb or t < info["warmup_iters"] or skip) else buf.mean(dim=0)
            ema = m * info["ema_gz"] + (1 - m) * mu
            info["out"].update(ema_gz=ema, buffer_gz=buf)
            dx = (g - (mu if skip else ema) * z) * rstd
            dweight = (dy * r * z).sum(dim=dims) if ctx.needs_input_grad[1] else None
            dbias = dy.sum(dim=dims) if ctx.needs_input_grad[2] else None
            return dx, dweight, dbias, None, None, None

    return UNFunction


def _torch_call(torch, x, weight, bias, *, running_var, ema_gz, buffer_x2, buffer_gz,
                training=False, eps=1e-5, iters=0, skip_counter=0, momentum=0.9,
                warmup_iters=4000, outlier_filtration=False, backward_state=None):
    """UN1d with torch ops, after the official module (no padding mask); half precision is
    computed in float32. ``backward_state``: a dict that receives the backward's new
    ``ema_gz`` and ``buffer_gz``."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf = x.float() if low else x
    wf_ = weight.float() if weight is not None and low else weight
    bf = bias.float() if bias is not None and low else bias
    wide = xf.dtype

    def tensor(a):
        return torch.as_tensor(a).to(device=x.device, dtype=wide)

    rv, nu, bx, bg = tensor(running_var), tensor(ema_gz), tensor(buffer_x2), tensor(buffer_gz)
    dims = tuple(range(x.dim() - 1))
    t, count = int(iters), int(skip_counter)
    state = {"running_var": rv, "ema_gz": torch.as_tensor(ema_gz),
             "buffer_x2": torch.as_tensor(buffer_x2), "buffer_gz": torch.as_tensor(buffer_gz)}
    if not training:
        y = xf * torch.rsqrt(rv + eps)
        y = y * wf_ if wf_ is not None else y
        y = y + bf if bf is not None else y
    else:
        t += 1
        w = bx.shape[0]
        with torch.no_grad():
            skip = w <= 1
            q = (xf * xf).mean(dim=dims)
            rho = torch.var(torch.sqrt(bx)) if bx.numel() > 1 else torch.tensor(float("nan"))
            bx = bx.clone()
            bx[t % w] = q
            if outlier_filtration and t >= warmup_iters:
                am, gm = bx.mean(dim=0), torch.exp(torch.log(bx).mean(dim=0))
                if bool(((am - gm) > rho * w).any()):
                    bx[t % w] = rv
                    skip, count = True, count + 1
            var = q if (t <= w or t < warmup_iters or skip) else \
                torch.exp(torch.log(bx).mean(dim=0))
            r = torch.ones_like(var) if (t <= max(1000, warmup_iters) or skip) else \
                torch.clamp(torch.sqrt(var + eps) / torch.sqrt(rv + eps), 0.2, 5.0)
            state.update(running_var=momentum * rv + (1 - momentum) * var, buffer_x2=bx)
        info = dict(t=t, skip=skip, momentum=momentum, warmup_iters=warmup_iters, ema_gz=nu,
                    buffer_gz=bg, out={} if backward_state is None else backward_state)
        y = _torch_function(torch).apply(xf, wf_, bf, torch.rsqrt(var + eps), r, info)
    state.update(iters=np.asarray(t, dtype=np.int64), skip_counter=np.asarray(count, np.int64))
    return y.to(x.dtype), state


def layer_init(features, *, window_size=4, warmup_iters=4000, momentum=0.9,
               outlier_filtration=False, eps=1e-5):
    """A UN layer on ``features`` channels, initialized as the official module: :math:`\\gamma
    = 1`, :math:`\\beta = 0`, ``running_var = 1``, ``ema_gz = 0``, zero windows of
    ``window_size`` (an int, or ``(W_f, W_b)``), counters 0."""
    wf, wb = (window_size, window_size) if isinstance(window_size, int) else window_size
    params = {"weight": np.ones(features), "bias": np.zeros(features)}
    state = {"running_var": np.ones(features), "ema_gz": np.zeros(features),
             "buffer_x2": np.zeros((wf, features)), "buffer_gz": np.zeros((wb, features)),
             "iters": np.asarray(0, np.int64), "skip_counter": np.asarray(0, np.int64)}
    return params, state, dict(eps=eps, momentum=momentum, warmup_iters=warmup_iters,
                               outlier_filtration=outlier_filtration)


SPEC = NormSpec(
    name="unified_norm",
    title="Unified Normalization (fluctuation smoothing, outlier filtration)",
    paper=Paper("Unified Normalization for Accelerating and Stabilizing Transformers",
                "Yang, Zhang, Lan, Yang, Li, Tan, Xiao, Pu", 2022, "arXiv:2208.01313"),
    forward=unified_norm_forward,
    backward=unified_norm_backward,
    op=unified_norm,
    composite=unified_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    gradient="surrogate",
    gradient_note="training uses the official smoothed backward (windowed/EMA gradient "
                  "statistic, compensation factor r); exact for window 1 and in evaluation",
    surrogate=unified_norm_surrogate,
    stateful=True,
    train_eval_differ=True,
    invariances=(),
    stats_axes=None,
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=layer_init,
)

r"""RepBN and PRepBN (progressive re-parameterized BatchNorm) from SLAB, and the eval-time
folding of RepBN/BatchNorm into the next linear layer.

Guo, Chen, Tang, Wang, *SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized Batch Normalization*, ICML 2024, arXiv:2405.11582. Official code:
``xinghaochen/SLAB``, ``classification/models/prepbn.py`` (``RepBN``, ``LinearNorm``) and
``swin_transformer.py`` (``merge_bn``), commit f58db00; a second official port in MindSpore
(``mindspore-lab/models``, ``research/huawei-noah/SLAB``) has the same schedule.

Layout: tokens ``x`` of shape :math:`(\ldots, C)`; RepBN transposes to :math:`(B, C, N)` and
applies ``nn.BatchNorm1d(C)``, so channel :math:`c` is normalized over the :math:`M` pooled
tokens (:mod:`refnorm.norms._tokens`). Per-channel parameters have shape :math:`(C,)`.

**RepBN** (:func:`rep_bn_forward`): BatchNorm plus a learnable scalar shortcut,

.. math::

   \mathrm{RepBN}(x) = \mathrm{BN}(x) + \alpha\,x ,

with ``torch.nn.functional.batch_norm``'s semantics (:mod:`refnorm.norms.batch_norm`: biased
variance in the forward, unbiased running variance, ``momentum`` the weight of the new value,
``eps = 1e-5`` inside the square root, running statistics in evaluation). Backward:
:math:`\mathrm{d}x = \mathrm{d}x_{\mathrm{BN}} + \alpha\,\mathrm{d}y`,
:math:`\mathrm{d}\alpha = \sum \mathrm{d}y\odot x` (over every element).

**PRepBN** (:func:`prep_bn_forward`, the official ``LinearNorm``): LayerNorm is replaced by RepBN
progressively during training,

.. math::

   y = \lambda\,\mathrm{LN}(x) + (1-\lambda)\,\mathrm{RepBN}(x)\quad\text{(training)},\qquad
   y = \mathrm{RepBN}(x)\quad\text{(evaluation, whatever } \lambda),

and during the ``warm`` phase :math:`y = \mathrm{LN}(x)` alone (the BN branch is not run: its
running statistics do not move). :math:`\lambda` is an explicit argument ``lam`` here (None for
the warm phase), computed by :func:`prep_bn_lambda` from the index :math:`k` of the training
forward call: with :math:`W_0` = ``warm`` and :math:`T` = ``total_step``,

.. math::

   k \le W_0:\ \text{warm (LN only)},\qquad
   j = k - W_0 \ge 1:\ \lambda_j = r_0\,\frac{\max(T - j + 1, 0)}{T},

so :math:`\lambda_1 = r_0` and :math:`\lambda` reaches 0 at :math:`j = T+1`. Backward:
:math:`\mathrm{d}x = \lambda\,\mathrm{d}x_{\mathrm{LN}}(\mathrm{d}y) + (1-\lambda)\,
\mathrm{d}x_{\mathrm{RepBN}}(\mathrm{d}y)`; the LN parameters get :math:`\lambda` times their
LN gradients, the BN parameters and :math:`\alpha` :math:`(1-\lambda)` times theirs (derivation:
``docs/derivations/rep_bn.rst``).

**Eval-time re-parametrization** (:func:`fold_into_linear`, the official ``merge_bn``): in
evaluation :math:`\mathrm{RepBN}(x) = a\odot x + b` with
:math:`a = \gamma/\sqrt{\bar\sigma^2+\epsilon} + \alpha` and
:math:`b = \beta - \gamma\,\bar\mu/\sqrt{\bar\sigma^2+\epsilon}`, so the next
``nn.Linear`` :math:`W x + b_{\text{lin}}` absorbs it: :math:`W' = W\,\mathrm{diag}(a)`,
:math:`b' = W b + b_{\text{lin}}` (a bias is created where the linear had none, as for Swin's
``reduction``). SLAB folds norm1 into ``attn.qkv``, norm2 into ``mlp.fc1``.

Conventions and defaults, from the official code: RepBN :math:`\alpha` init 1, BN defaults
(``eps = 1e-5``, ``momentum = 0.1``, :math:`\gamma = 1`, :math:`\beta = 0`, running mean 0,
running variance 1); the LayerNorm inside ``LinearNorm`` has ``eps`` 1e-6 in DeiT and PVT
(``partial(nn.LayerNorm, eps=1e-6)``) and 1e-5 (``nn.LayerNorm``) in Swin and CSwin; the
default here is 1e-5. Schedule: ``warm = 0``, ``r0 = 1``, class default ``step`` (:math:`T`)
300000; DeiT and Swin 60000, CSwin 120000, PVT 300000; ``detection/mmdet_custom/prepbn.py`` has
no ``warm``.

Discrepancies and pitfalls (``formulas_transformer.md`` section 6; addendum section 6):

* evaluation always uses the BN branch: evaluating before :math:`\lambda` reaches 0 drops the
  LN share that training still had (training and eval outputs differ);
* the counters tick once per **training forward call of each module**, not per optimizer step
  (extra forwards or gradient accumulation advance the schedule faster);
* the LLaMA-350M variant initializes :math:`\alpha`, :math:`\gamma_{\mathrm{bn}}` and
  :math:`\beta_{\mathrm{bn}}` to **0** (RepBN = 0 at init; ``layer_init(..., llama=True)``),
  uses the RMSNorm ``eps`` 1e-6 for its BN, ``warm = 10000``, ``step = 18000``, counts once per
  16 calls (gradient accumulation), uses ``LlamaRMSNorm`` instead of LN, and with a padding mask
  takes the statistics over valid tokens only (masks are not modelled here);
* the paper writes the mix as :math:`\gamma\,\mathrm{LN} + (1-\gamma)\,\mathrm{RepBN}` with
  :math:`\gamma` decaying linearly from 1 to 0 (from the catalogue's memory of the paper; its
  wording on the unit of :math:`T_0` is unverified): the code's :math:`\lambda`.

**Dtypes**: as :mod:`refnorm.norms.batch_norm` and :mod:`refnorm.norms.layer_norm`, whose
forwards and hand backwards these compose; :math:`\alpha x` and :math:`\mathrm{d}\alpha` are
computed in float64 (longdouble for longdouble input).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (check_array, check_eps, check_flag, check_momentum,
                                  check_param, check_running_stats)
from refnorm.norms._tokens import (as_tokens, check_int, check_tokens, check_unit, token_axes,
                                   wide_dtype)
from refnorm.norms.batch_norm import (BatchNormState, _torch_call as _bn_torch_call,
                                      batch_norm_backward, batch_norm_composite,
                                      batch_norm_forward)
from refnorm.norms.layer_norm import (layer_norm_backward, layer_norm_composite,
                                      layer_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_SLAB = Paper("SLAB: Efficient Transformers with Simplified Linear Attention and Progressive "
              "Re-parameterized Batch Normalization", "Guo, Chen, Tang, Wang", 2024,
              "arXiv:2405.11582")


@contextlib.contextmanager
def _errors_as(op):
    """Re-raise the composed ops' documented errors under this op's name."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for inner in ("batch_norm: ", "layer_norm: ", "rep_bn: "):
            if msg.startswith(inner):
                raise type(exc)(f"{op}: {msg[len(inner):]}") from None
        raise


class RepBNCache(NamedTuple):
    bn: object                  # the BatchNormCache of the (M, C) token view
    x: np.ndarray               # the input (not a copy)
    alpha: np.ndarray | None    # \alpha, shape (1,), or None (no shortcut)
    dtypes: tuple               # (weight, bias) dtypes (None where absent), for their gradients

    rstd = property(lambda self: self.bn.rstd)     # the statistics, for the oracle
    mean = property(lambda self: self.bn.mean)


class RepBNGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dalpha: np.ndarray | None


def rep_bn_forward(x, running_mean, running_var, weight=None, bias=None, alpha=None,
                   training=False, momentum=0.1, eps=1e-5, *, num_batches_tracked=0):
    r"""RepBN of a token tensor, :math:`\mathrm{BN}(x) + \alpha x`; returns
    ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., C)``
    running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked
        As :func:`refnorm.norms.batch_norm.batch_norm_forward`, for the channels of the pooled
        tokens.
    alpha : ndarray of shape (1,), optional
        The shortcut :math:`\alpha`; None: no shortcut (plain BatchNorm over the tokens).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : BatchNormState
    cache : RepBNCache
    """
    y, state, cache = _rep_bn_wide(x, running_mean, running_var, weight, bias, alpha, training,
                                   momentum, eps, num_batches_tracked, "rep_bn")
    return y.astype(x.dtype), state, cache


def _widen(a, wide):
    return None if a is None else a.astype(wide)


def _rep_bn_wide(x, running_mean, running_var, weight, bias, alpha, training, momentum, eps,
                 num_batches_tracked, op):
    """:func:`rep_bn_forward` with ``y`` left in the wide dtype (PRepBN mixes it unrounded)."""
    x = check_tokens(x, op)
    c = x.shape[-1]
    weight = check_param(weight, "weight", op, (c,))
    bias = check_param(bias, "bias", op, (c,))
    alpha = check_param(alpha, "alpha", op, (1,))
    wide = wide_dtype(x.dtype)   # BN and the shortcut in one precision, rounded once
    with _errors_as(op):
        y2, state, bn = batch_norm_forward(as_tokens(x).astype(wide), running_mean, running_var,
                                           _widen(weight, wide), _widen(bias, wide), training,
                                           momentum, eps, num_batches_tracked=num_batches_tracked)
    y = y2.reshape(x.shape)
    if alpha is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            y = y + alpha.astype(wide)[0] * x.astype(wide)
    dtypes = tuple(None if a is None else a.dtype for a in (weight, bias))
    return y, state, RepBNCache(bn, x, alpha, dtypes)


def rep_bn_backward(dy, cache):
    r"""Hand-derived VJP of :func:`rep_bn_forward`: BatchNorm's backward plus
    :math:`\alpha\,\mathrm{d}y`, and :math:`\mathrm{d}\alpha = \sum \mathrm{d}y\odot x`."""
    grads = _rep_bn_backward_wide(dy, cache)
    return grads._replace(dx=grads.dx.astype(cache.x.dtype))


def _rep_bn_backward_wide(dy, cache):
    """:func:`rep_bn_backward` with ``dx`` left in the wide dtype."""
    bn, x, alpha, (weight_dtype, bias_dtype) = cache
    wide = wide_dtype(x.dtype)
    dyw = dy.astype(wide)
    grads = batch_norm_backward(as_tokens(dyw), bn)
    dx = grads.dx.reshape(x.shape)
    dalpha = None
    if alpha is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            dx = dx + alpha.astype(wide)[0] * dyw
            dalpha = np.asarray([np.sum(dyw * x.astype(wide))], alpha.dtype)
    dweight = None if grads.dweight is None else grads.dweight.astype(weight_dtype)
    dbias = None if grads.dbias is None else grads.dbias.astype(bias_dtype)
    return RepBNGrads(dx, dweight, dbias, dalpha)


rep_bn = custom_vjp(rep_bn_forward, rep_bn_backward, ("x", "weight", "bias", "alpha"),
                    stateful=True)
rep_bn.__doc__ = "Differentiable RepBN (engine op): ``(y, new_state)``; see rep_bn_forward."


def rep_bn_composite(x, running_mean, running_var, weight=None, bias=None, alpha=None,
                     training=False, momentum=0.1, eps=1e-5, *, num_batches_tracked=0):
    """The same math with engine primitives: BatchNorm's composite on the token view, plus
    the shortcut."""
    c = x.shape[-1]
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    y2, state = batch_norm_composite(ag.reshape(x, (m, c)), running_mean, running_var, weight,
                                     bias, training, momentum, eps,
                                     num_batches_tracked=num_batches_tracked)
    y = ag.reshape(y2, x.shape)
    return (y + alpha * x if alpha is not None else y), state


# ----------------------------------------------------------------------------------------------
# PRepBN
# ----------------------------------------------------------------------------------------------
class PRepBNCache(NamedTuple):
    ln: object | None       # LayerNormCache, or None in evaluation
    rep: RepBNCache | None  # RepBNCache, or None in the warm phase
    lam: float              # the weight of LN in this call (1 in warm, 0 in evaluation)
    shapes: tuple           # (weight, bias, alpha, ln_weight, ln_bias) arrays, for zero grads


class PRepBNGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None
    dalpha: np.ndarray | None
    dln_weight: np.ndarray | None
    dln_bias: np.ndarray | None


def prep_bn_lambda(k, *, total_step=300000, warm=0, r0=1.0):
    r""":math:`\lambda` of the ``k``-th training forward call (1-based) of a PRepBN layer, as
    the official ``LinearNorm`` counters give it: None during the ``warm`` calls (LN only, pass
    ``lam=None``), then :math:`r_0\max(T - j + 1, 0)/T` with :math:`j = k - W_0`."""
    op = "prep_bn_lambda"
    k = check_int(k, "k", op, minimum=1)
    total_step = check_int(total_step, "total_step", op, minimum=1)
    warm = check_int(warm, "warm", op)
    r0 = check_unit(r0, "r0", op)
    if k <= warm:
        return None
    return r0 * max(total_step - (k - warm) + 1, 0) / total_step


def prep_bn_forward(x, running_mean, running_var, weight=None, bias=None, alpha=None,
                    ln_weight=None, ln_bias=None, training=False, momentum=0.1, eps=1e-5,
                    ln_eps=1e-5, *, lam=0.0, num_batches_tracked=0):
    r"""PRepBN (``LinearNorm``) of a token tensor; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., C)``
    running_mean, running_var, weight, bias, alpha, momentum, eps, num_batches_tracked
        The RepBN branch (:func:`rep_bn_forward`).
    ln_weight, ln_bias : ndarray of shape (C,), optional
        The LayerNorm branch's affine; ``ln_eps`` its epsilon (default 1e-5).
    training : bool, default False
        Evaluation is RepBN alone, whatever ``lam``.
    lam : float in [0, 1] or None, keyword-only, default 0.0
        :math:`\lambda`, the weight of LN (:func:`prep_bn_lambda`); None: the warm phase,
        LN alone and the BN state unchanged.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : BatchNormState
    cache : PRepBNCache
    """
    op = "prep_bn"
    x = check_tokens(x, op)
    c = x.shape[-1]
    ln_weight = check_param(ln_weight, "ln_weight", op, (c,))
    ln_bias = check_param(ln_bias, "ln_bias", op, (c,))
    ln_eps = check_eps(ln_eps, op, "ln_eps")
    lam = check_unit(lam, "lam", op, allow_none=True)
    training = check_flag(training, "training", op)
    shapes = (weight, bias, alpha, ln_weight, ln_bias)
    with _errors_as(op):
        if training and lam is None:      # warm: LN only; the BN branch is checked, not run
            check_param(weight, "weight", op, (c,))
            check_param(bias, "bias", op, (c,))
            check_param(alpha, "alpha", op, (1,))
            check_running_stats(running_mean, running_var, op, c)
            check_momentum(momentum, op, allow_none=True)
            check_eps(eps, op)
            t = check_int(num_batches_tracked, "num_batches_tracked", op)
            y, ln = layer_norm_forward(x, (c,), ln_weight, ln_bias, ln_eps)
            state = BatchNormState(running_mean, running_var, np.asarray(t, np.int64))
            return y, state, PRepBNCache(ln, None, 1.0, shapes)
        y_rep, state, rep = _rep_bn_wide(x, running_mean, running_var, weight, bias, alpha,
                                         training, momentum, eps, num_batches_tracked, op)
        if not training:
            return y_rep.astype(x.dtype), state, PRepBNCache(None, rep, 0.0, shapes)
        wide = y_rep.dtype   # both branches in one precision, rounded once
        y_ln, ln = layer_norm_forward(x.astype(wide), (c,), _widen(ln_weight, wide),
                                      _widen(ln_bias, wide), ln_eps)
    with np.errstate(over="ignore", invalid="ignore"):
        y = (lam * y_ln + (1.0 - lam) * y_rep).astype(x.dtype)
    return y, state, PRepBNCache(ln, rep, lam, shapes)


def prep_bn_backward(dy, cache):
    r"""Hand-derived VJP of :func:`prep_bn_forward`: LN's backward of :math:`\lambda\,
    \mathrm{d}y` plus RepBN's backward of :math:`(1-\lambda)\,\mathrm{d}y` (both linear in
    :math:`\mathrm{d}y`); a branch that is not run gives zero gradients to its parameters."""
    ln, rep, lam, (weight, bias, alpha, ln_weight, ln_bias) = cache
    wide = wide_dtype(dy.dtype)

    def zeros(a):
        return None if a is None else np.zeros_like(a)

    dx = np.zeros(dy.shape, wide)
    g_rep = (zeros(weight), zeros(bias), zeros(alpha))
    g_ln = (zeros(ln_weight), zeros(ln_bias))
    with np.errstate(over="ignore", invalid="ignore"):
        if rep is not None:
            r = _rep_bn_backward_wide(dy.astype(wide) * (1.0 - lam), rep)
            dx += r.dx
            g_rep = r[1:]
        if ln is not None:   # the LN cache holds the wide x: its gradients come out wide
            gl = layer_norm_backward(dy.astype(ln.x.dtype) * lam, ln)
            dx += gl.dx
            g_ln = tuple(None if g is None else g.astype(p.dtype)
                         for g, p in zip(gl[1:], (ln_weight, ln_bias)))
    return PRepBNGrads(dx.astype(dy.dtype), *g_rep, *g_ln)


prep_bn = custom_vjp(prep_bn_forward, prep_bn_backward,
                     ("x", "weight", "bias", "alpha", "ln_weight", "ln_bias"), stateful=True)
prep_bn.__doc__ = "Differentiable PRepBN (engine op): ``(y, new_state)``; see prep_bn_forward."


def prep_bn_composite(x, running_mean, running_var, weight=None, bias=None, alpha=None,
                      ln_weight=None, ln_bias=None, training=False, momentum=0.1, eps=1e-5,
                      ln_eps=1e-5, *, lam=0.0, num_batches_tracked=0):
    """The same math with engine primitives (LayerNorm's and RepBN's composites)."""
    c = x.shape[-1]
    if training and lam is None:
        state = BatchNormState(running_mean, running_var,
                               np.asarray(int(num_batches_tracked), np.int64))
        return layer_norm_composite(x, (c,), ln_weight, ln_bias, ln_eps), state
    y_rep, state = rep_bn_composite(x, running_mean, running_var, weight, bias, alpha, training,
                                    momentum, eps, num_batches_tracked=num_batches_tracked)
    if not training:
        return y_rep, state
    y_ln = layer_norm_composite(x, (c,), ln_weight, ln_bias, ln_eps)
    return y_ln * lam + y_rep * (1.0 - lam), state


# ----------------------------------------------------------------------------------------------
# Folding into the next linear layer
# ----------------------------------------------------------------------------------------------
def fold_into_linear(linear_weight, linear_bias, running_mean, running_var, weight=None,
                     bias=None, alpha=None, eps=1e-5):
    r"""``(W', b')``: the ``nn.Linear`` (weight ``(out, C)``) that computes
    :math:`W\,\mathrm{RepBN}_{\text{eval}}(x) + b_{\text{lin}}` from :math:`x` directly
    (``alpha=None``: plain BatchNorm in evaluation). See the module docstring; the official
    ``merge_bn``. ``linear_bias=None`` is 0; a bias is always returned."""
    op = "fold_into_linear"
    linear_weight = check_array_2d(linear_weight, op)
    out, c = linear_weight.shape
    linear_bias = check_param(linear_bias, "linear_bias", op, (out,))
    running_mean = check_param(running_mean, "running_mean", op, (c,))
    running_var = check_param(running_var, "running_var", op, (c,))
    if running_mean is None or running_var is None:
        raise ValueError(f"{op}: `running_mean` and `running_var` are required (evaluation "
                         f"statistics)")
    weight = check_param(weight, "weight", op, (c,))
    bias = check_param(bias, "bias", op, (c,))
    alpha = check_param(alpha, "alpha", op, (1,))
    eps = check_eps(eps, op)
    rstd = 1.0 / np.sqrt(running_var + eps)
    gamma = rstd * (weight if weight is not None else 1.0)
    a = gamma + (alpha[0] if alpha is not None else 0.0)
    b = (bias if bias is not None else 0.0) - gamma * running_mean
    new_w = linear_weight * a
    new_b = linear_weight @ b + (linear_bias if linear_bias is not None else 0.0)
    return new_w, new_b


def check_array_2d(value, op):
    """``linear_weight``: a 2-D floating array ``(out, C)``."""
    value = check_array(value, "linear_weight", op, ndim_min=2)
    if value.ndim != 2:
        raise ValueError(f"{op}: `linear_weight` must be 2-D (out, C), got {value.shape}")
    return value


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _params(rng, c, affine, bias, alpha):
    return (rng.standard_normal(c) + 1.0 if affine else None,
            rng.standard_normal(c) if affine and bias else None,
            rng.standard_normal(1) + 1.0 if alpha else None)


def _bn_kwargs(rng, c, training, running, momentum, eps, t):
    return dict(running_mean=rng.standard_normal(c) if running else None,
                running_var=rng.uniform(0.5, 2.0, c) if running else None, training=training,
                momentum=momentum, eps=eps, num_batches_tracked=t)


def _rep_case(rng, name, shape, *, training=True, running=True, affine=True, bias=True,
              alpha=True, momentum=0.1, eps=1e-5, t=0, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[-1]
    return SampleInput(name, (x,) + _params(rng, c, affine, bias, alpha),
                       _bn_kwargs(rng, c, training, running, momentum, eps, t))


def rep_sample_inputs(rng):
    yield _rep_case(rng, "(2,3,4)", (2, 3, 4))
    yield _rep_case(rng, "(5,3)-eval", (5, 3), training=False)
    yield _rep_case(rng, "(1,1,3)-one-token-eval", (1, 1, 3), training=False)
    yield _rep_case(rng, "(2,3,4)-no-alpha", (2, 3, 4), alpha=False)
    yield _rep_case(rng, "(3,2,4)-no-running-stats", (3, 2, 4), running=False)
    yield _rep_case(rng, "(3,4)-momentum-None-t3", (3, 4), momentum=None, t=3)
    yield _rep_case(rng, "(2,3,4)-no-affine-eps0.1", (2, 3, 4), affine=False, eps=0.1)
    yield _rep_case(rng, "(2,2,3)-eval-weight-only", (2, 2, 3), training=False, bias=False)
    constant = rng.standard_normal((3, 2, 4))
    constant[..., 1] = 0.7
    yield _rep_case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant)
    yield _rep_case(rng, "(3,4)-mean100", (3, 4), x=100.0 + rng.standard_normal((3, 4)))


def rep_oracle_inputs(rng):
    yield _rep_case(rng, "(8,37,64)", (8, 37, 64))
    yield _rep_case(rng, "(8,37,64)-eval", (8, 37, 64), training=False)
    yield _rep_case(rng, "(4096,17)-many-tokens", (4096, 17))
    yield _rep_case(rng, "(5,13,33)-no-alpha-no-running", (5, 13, 33), alpha=False,
                    running=False)
    yield _rep_case(rng, "(6,5,12)-mean1e4-std1e-3", (6, 5, 12),
                    x=1e4 + 1e-3 * rng.standard_normal((6, 5, 12)))
    yield _rep_case(rng, "(6,5,12)-tiny-scale", (6, 5, 12),
                    x=1e-20 * rng.standard_normal((6, 5, 12)))


def rep_error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(4)

    def call(name, x=x, weight=None, bias=None, alpha=None, **kwargs):
        return SampleInput(name, (x, weight, bias, alpha),
                           {"running_mean": c.copy(), "running_var": c.copy(), **kwargs})

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError, r"rep_bn: `x` must be a numpy.ndarray")
    yield ErrorInput(call("1-d x", x=np.ones(4)), ValueError,
                     r"rep_bn: `x` must have at least 2 dimensions")
    yield ErrorInput(call("alpha shape", alpha=np.ones(2)), ValueError,
                     r"rep_bn: `alpha` must have shape \(1,\), got \(2,\)")
    yield ErrorInput(call("weight", weight=np.ones(3)), ValueError,
                     r"rep_bn: `weight` must have shape \(4,\), got \(3,\)")
    yield ErrorInput(call("running_var", running_var=np.ones(2)), ValueError,
                     r"rep_bn: `running_var` must have shape \(4,\)")
    yield ErrorInput(call("eps 0 training", training=True, eps=0.0), ValueError,
                     r"rep_bn: `eps` must be > 0 when batch statistics are used")
    yield ErrorInput(call("one token", x=np.ones((1, 1, 4)), training=True), ValueError,
                     r"rep_bn: Expected more than 1 value per channel when training")


def _rep_torch_call(torch, x, weight, bias, alpha, *, running_mean, running_var,
                    training=False, momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """The official ``RepBN``: ``x.transpose(1, 2)``, ``nn.BatchNorm1d`` (driven as
    :mod:`refnorm.norms.batch_norm`'s ``torch_call`` drives ``F.batch_norm``), back, plus
    ``alpha * x``; any leading axes are pooled as the tokens. Half precision is computed in
    float32 (and the new state rounded back to the input dtype), as the other
    transformer-family ``torch_call`` s: PyTorch's own bfloat16 ``F.batch_norm`` on this
    transposed layout is less accurate than a float32 computation rounded once (a running
    variance 7 ULP off on data of mean 1e3; a dweight of the wrong sign on subnormal input)."""
    low = x.dtype in (torch.float16, torch.bfloat16)

    def up(t):
        return t.float() if low and t is not None else t

    def stat(a):
        return None if a is None else torch.as_tensor(a).to(device=x.device, dtype=up(x).dtype)

    c = x.shape[-1]
    tokens = up(x).reshape(-1, c).t().unsqueeze(0)     # (1, C, M)
    y, state = _bn_torch_call(torch, tokens, up(weight), up(bias),
                              running_mean=stat(running_mean), running_var=stat(running_var),
                              training=training, momentum=momentum, eps=eps,
                              num_batches_tracked=num_batches_tracked)
    y = y.squeeze(0).t().reshape(x.shape)
    y = y + up(alpha) * up(x) if alpha is not None else y
    if low:
        state = {k: (v.to(x.dtype) if torch.is_tensor(v) else v) for k, v in state.items()}
    return y.to(x.dtype), state


def _rep_stats_axes(sample):
    kwargs = sample.kwargs
    if kwargs.get("training", False) or kwargs.get("running_mean") is None:
        return token_axes(sample.arrays[0].ndim)
    return None


def rep_layer_init(features, *, llama=False, eps=None, momentum=0.1):
    """A RepBN layer on ``features`` channels: BN defaults and :math:`\\alpha = 1`
    (classification and detection code), or, ``llama=True``, :math:`\\alpha = \\gamma = \\beta
    = 0` and ``eps = 1e-6`` (the LLaMA-350M code)."""
    fill = 0.0 if llama else 1.0
    params = {"weight": np.full(features, fill), "bias": np.zeros(features),
              "alpha": np.full(1, fill)}
    state = {"running_mean": np.zeros(features), "running_var": np.ones(features),
             "num_batches_tracked": np.asarray(0, np.int64)}
    eps = (1e-6 if llama else 1e-5) if eps is None else eps
    return params, state, dict(eps=eps, momentum=momentum)


REP_SPEC = NormSpec(
    name="rep_bn",
    title="RepBN (BatchNorm with a learnable shortcut, re-parameterizable)",
    paper=_SLAB,
    forward=rep_bn_forward,
    backward=rep_bn_backward,
    op=rep_bn,
    composite=rep_bn_composite,
    diff_argnames=("x", "weight", "bias", "alpha"),
    sample_inputs=rep_sample_inputs,
    oracle_inputs=rep_oracle_inputs,
    error_inputs=rep_error_inputs,
    stateful=True,
    train_eval_differ=True,
    invariances=(),      # alpha x breaks shift and scale invariance
    stats_axes=_rep_stats_axes,   # without affine and alpha: BatchNorm over the tokens
    torch_call=_rep_torch_call,
    param_layout="trailing",
    layer_init=rep_layer_init,
)


# ----- PRepBN inputs -----
def _prep_case(rng, name, shape, *, lam=0.6, training=True, running=True, affine=True,
               ln_affine=True, alpha=True, momentum=0.1, eps=1e-5, ln_eps=1e-5, t=0, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[-1]
    ln = (rng.standard_normal(c) + 1.0, rng.standard_normal(c)) if ln_affine else (None, None)
    kwargs = _bn_kwargs(rng, c, training, running, momentum, eps, t)
    kwargs.update(ln_eps=ln_eps, lam=lam)
    return SampleInput(name, (x,) + _params(rng, c, affine, True, alpha) + ln, kwargs)


def prep_sample_inputs(rng):
    yield _prep_case(rng, "(2,3,4)-lam0.6", (2, 3, 4))
    yield _prep_case(rng, "(2,3,4)-lam1-first-call", (2, 3, 4), lam=1.0)
    yield _prep_case(rng, "(3,4)-lam0-reparametrized", (3, 4), lam=0.0)
    yield _prep_case(rng, "(2,3,4)-warm-LN-only", (2, 3, 4), lam=None)
    yield _prep_case(rng, "(5,3)-eval", (5, 3), training=False, lam=0.3)
    yield _prep_case(rng, "(2,2,4)-no-affine-ln-eps1e-6", (2, 2, 4), affine=False,
                     ln_affine=False, alpha=False, ln_eps=1e-6)
    yield _prep_case(rng, "(3,2,4)-no-running-stats", (3, 2, 4), running=False, lam=0.25)
    yield _prep_case(rng, "(3,4)-mean100", (3, 4), x=100.0 + rng.standard_normal((3, 4)))


def prep_oracle_inputs(rng):
    yield _prep_case(rng, "(8,37,64)-lam0.7", (8, 37, 64), lam=0.7)
    yield _prep_case(rng, "(8,37,64)-eval", (8, 37, 64), training=False)
    yield _prep_case(rng, "(4096,17)-lam0.1", (4096, 17), lam=0.1)
    yield _prep_case(rng, "(5,13,33)-warm", (5, 13, 33), lam=None)
    yield _prep_case(rng, "(6,5,12)-tiny-scale", (6, 5, 12),
                     x=1e-20 * rng.standard_normal((6, 5, 12)))


def prep_error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(4)

    def call(name, x=x, **kwargs):
        return SampleInput(name, (x, None, None, None, None, None),
                           {"running_mean": c.copy(), "running_var": c.copy(), **kwargs})

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError,
                     r"prep_bn: `x` must be a numpy.ndarray")
    yield ErrorInput(call("lam", lam=1.5), ValueError,
                     r"prep_bn: `lam` must be a number in \[0, 1\] or None")
    yield ErrorInput(call("ln_eps", ln_eps=-1.0), ValueError,
                     r"prep_bn: `ln_eps` must be a finite number >= 0")
    yield ErrorInput(call("momentum", momentum="x", training=True), ValueError,
                     r"prep_bn: `momentum` must be a finite number or None")
    yield ErrorInput(call("running_mean", running_mean=np.ones(3)), ValueError,
                     r"prep_bn: `running_mean` must have shape \(4,\)")
    warm = call("warm alpha", lam=None, training=True)
    yield ErrorInput(warm._replace(arrays=(x, None, None, np.ones(2), None, None)), ValueError,
                     r"prep_bn: `alpha` must have shape \(1,\)")


def _prep_torch_call(torch, x, weight, bias, alpha, ln_weight, ln_bias, *, running_mean,
                     running_var, training=False, momentum=0.1, eps=1e-5, ln_eps=1e-5, lam=0.0,
                     num_batches_tracked=0):
    """The official ``LinearNorm`` with an explicit :math:`\\lambda` (None: warm)."""
    c = x.shape[-1]
    low = x.dtype in (torch.float16, torch.bfloat16)   # in float32, as _rep_torch_call

    def up(t):
        return t.float() if low and t is not None else t

    def unused(*params):   # a branch that is not run: zero gradients, as refnorm returns
        return sum((p - p.detach()).sum() * 0 for p in params if p is not None)

    if training and lam is None:
        state = {"running_mean": running_mean, "running_var": running_var,
                 "num_batches_tracked": np.asarray(int(num_batches_tracked), np.int64)}
        y = torch.nn.functional.layer_norm(up(x), (c,), up(ln_weight), up(ln_bias), ln_eps)
        return y.to(x.dtype) + unused(weight, bias, alpha), state
    y_rep, state = _rep_torch_call(torch, x, weight, bias, alpha, running_mean=running_mean,
                                   running_var=running_var, training=training,
                                   momentum=momentum, eps=eps,
                                   num_batches_tracked=num_batches_tracked)
    if not training:
        return y_rep + unused(ln_weight, ln_bias), state
    y_ln = torch.nn.functional.layer_norm(up(x), (c,), up(ln_weight), up(ln_bias), ln_eps)
    return (lam * y_ln + (1 - lam) * up(y_rep)).to(x.dtype), state


def prep_layer_init(features, *, ln_eps=1e-5, eps=1e-5, momentum=0.1):
    """A PRepBN layer: the LN affine (1, 0), RepBN as :func:`rep_layer_init`. ``lam`` is
    passed per training call, from :func:`prep_bn_lambda` (it starts at ``r0``)."""
    params, state, _ = rep_layer_init(features, eps=eps, momentum=momentum)
    params.update(ln_weight=np.ones(features), ln_bias=np.zeros(features))
    return params, state, dict(eps=eps, ln_eps=ln_eps, momentum=momentum, lam=1.0)


PREP_SPEC = NormSpec(
    name="prep_bn",
    title="PRepBN (progressive LayerNorm to RepBN, SLAB's LinearNorm)",
    paper=_SLAB,
    forward=prep_bn_forward,
    backward=prep_bn_backward,
    op=prep_bn,
    composite=prep_bn_composite,
    diff_argnames=("x", "weight", "bias", "alpha", "ln_weight", "ln_bias"),
    sample_inputs=prep_sample_inputs,
    oracle_inputs=prep_oracle_inputs,
    error_inputs=prep_error_inputs,
    stateful=True,
    train_eval_differ=True,
    invariances=(),
    stats_axes=None,     # a mix of two standardizations is not one
    torch_call=_prep_torch_call,
    param_layout="trailing",
    layer_init=prep_layer_init,
)

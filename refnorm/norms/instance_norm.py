r"""Instance Normalization.

Ulyanov, Vedaldi & Lempitsky, *Instance Normalization: The Missing Ingredient for Fast
Stylization*, arXiv:1607.08022 (2016).

The input has shape :math:`(N, C, *)`. Each (sample, channel) pair :math:`(n, c)` is normalized
over the set :math:`A` of its spatial axes (2, 3, ...), which holds :math:`m = \prod *` values.
With **input statistics** (``use_input_stats=True``, the default):

.. math::

   \mu_{nc} = \langle x\rangle_A,\qquad
   \sigma^2_{nc} = \langle (x-\mu_{nc})^2\rangle_A,\qquad
   r_{nc} = (\sigma^2_{nc}+\epsilon)^{-1/2},\qquad
   \hat x = (x-\mu_{nc})\,r_{nc},\qquad
   y = \gamma_c\,\hat x + \beta_c ,

where :math:`\langle\cdot\rangle_A` is the mean over :math:`A`, ``weight`` is :math:`\gamma` and
``bias`` is :math:`\beta` (both per channel, shared by the samples). When running statistics are
given they are updated with the per-instance statistics **averaged over the batch**, the
variance made **unbiased** per instance (:math:`f` = ``momentum``):

.. math::

   \bar\mu_c \leftarrow (1-f)\,\bar\mu_c + f\,\tfrac1N\textstyle\sum_n \mu_{nc},\qquad
   \bar\sigma^2_c \leftarrow (1-f)\,\bar\sigma^2_c
        + f\,\tfrac1N\textstyle\sum_n \tfrac{m}{m-1}\,\sigma^2_{nc} .

With ``use_input_stats=False`` the running statistics are used,
:math:`\hat x = (x-\bar\mu_c)(\bar\sigma^2_c+\epsilon)^{-1/2}`: a fixed affine map of :math:`x`.

This is batch normalization (:mod:`refnorm.norms.batch_norm`) of the input viewed as
:math:`(1, NC, *)`, in training mode, with :math:`\gamma, \beta` and the running statistics
repeated :math:`N` times and the updated running statistics averaged back over :math:`n`: that
is how PyTorch computes it, and a test checks the identity.

Backward (derivation: ``docs/derivations/instance_norm.rst``). With input statistics,

.. math::

   \mathrm{d}x = \gamma_c\,r_{nc}\,\bigl(\mathrm{d}y - \langle \mathrm{d}y\rangle_A
                 - \hat x\,\langle \mathrm{d}y\odot\hat x\rangle_A\bigr),\qquad
   \mathrm{d}\gamma_c = \textstyle\sum_{n}\sum_A \mathrm{d}y\odot\hat x,\qquad
   \mathrm{d}\beta_c = \textstyle\sum_{n}\sum_A \mathrm{d}y ,

the per-instance sums :math:`\sum_A` being computed once for both. With running statistics,
:math:`\mathrm{d}x = \gamma_c\,r_c\,\mathrm{d}y`.

With input statistics this is also GroupNorm with one group per channel (Wu & He 2018), and
the code is GroupNorm's (:func:`refnorm.norms.group_norm.normalize_groups` and its backward):
the statistics of :mod:`refnorm.norms._stats` (two passes and a correction), ``x`` itself in
the cache rather than :math:`\hat x` (``cache.xhat`` is recomputed on access), and the passes
made a block of samples at a time, in the cache.

Conventions, as in ``torch.nn.functional.instance_norm``: biased variance in the forward,
per-instance unbiased variance in the running one, ``eps`` inside the square root,
``eps = 1e-5``, ``momentum = 0.1`` (weight of the new value). ``nn.InstanceNorm{1,2,3}d``'s
options map to arguments: ``affine=False`` (its default) is ``weight=bias=None``;
``track_running_stats=False`` (its default) is ``running_mean=running_var=None``; its
``training or not track_running_stats`` is ``use_input_stats``.

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, ``dweight`` that of ``weight`` and
``dbias`` that of ``bias``, also when they differ (PyTorch raises on mixed dtypes); Overflowing
or underflowing squares (float32 :math:`\sigma \gtrsim 1.8\cdot 10^{19}`) are detected per group
and those groups recomputed from :math:`d/2^e` (:func:`refnorm.norms._stats.rescaled_rstd`).

**State.** The result is always ``(y, InstanceNormState, cache)``: the state mirrors the two
state arguments, each field the updated array, or the given one when nothing is updated, or
None when None was given. So ``y, state = instance_norm(x, *state)`` threads it through steps
whether or not statistics are tracked, and there is one record for both uses. There is no
``num_batches_tracked``: ``F.instance_norm`` has no cumulative-average mode (``momentum`` must
be a number; ``nn.InstanceNorm`` turns ``momentum=None`` into 0, i.e. *no* update, unlike
``nn.BatchNorm``) and ``nn.InstanceNorm`` never increments its counter.

Paper vs code. The paper normalizes at test time with the instance statistics too (no running
statistics): PyTorch's default. Running statistics are an addition of the implementations.
PyTorch raises "Expected more than 1 spatial element when training" for :math:`m = 1` with input
statistics, as refnorm does. PyTorch accepts ``eps = 0``; refnorm requires ``eps > 0`` with
input statistics, as ``F.batch_norm`` does in training (a constant instance would give 0/0;
PyTorch's CPU kernel returns 0 there by defining :math:`r = 0`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (axis_count, check_array, check_eps, check_flag, check_momentum,
                                  check_param, check_running_stats, rsqrt, saved_mean,
                                  saved_xhat, update_running_stats, WideCache, narrow,
                                  out_of_range, wider_dtype, widen)
from refnorm.norms.group_norm import normalize_groups, normalize_groups_backward
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "instance_norm"


class InstanceNormState(NamedTuple):
    running_mean: np.ndarray | None    # \bar\mu, shape (C,), or None when not given
    running_var: np.ndarray | None     # \bar\sigma^2 (unbiased), shape (C,), or None


class InstanceNormCache(NamedTuple):
    x: np.ndarray                   # the input, not a copy (like PyTorch's saved tensors):
    #                                 it must not be modified before the backward
    shift: np.ndarray               # m0, the rounded mean: (N, C, 1, ...); running: (1, C, 1, ...)
    correction: np.ndarray          # c = <x - m0>: the mean is m0 + c (see _stats); 0 running
    rstd: np.ndarray                # the r used, same shape as shift
    weight: np.ndarray | None       # \gamma, or None
    has_bias: bool
    axes: tuple[int, ...]           # A: the spatial axes
    input_stats: bool               # whether \mu and r depend on x
    bias_dtype: np.dtype | None = None  # \beta's dtype (dbias gets it), None without bias

    mean = property(saved_mean)   # m0 + c, rounded to one float
    xhat = property(saved_xhat)   # recomputed from x on access, not stored


class InstanceNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _channel_shape(x):
    """``(1, C, 1, ...)``: a per-channel vector broadcast against ``x``."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def instance_norm_forward(x, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5):
    r"""Instance normalization over the spatial axes; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
    running_mean, running_var : ndarray of shape (C,), optional
        :math:`\bar\mu` and :math:`\bar\sigma^2` (unbiased), both or neither. Never modified.
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma` and :math:`\beta`. ``None`` means 1 and 0.
    use_input_stats : bool, default True
        Normalize with the per-instance statistics (and update the running ones, if given);
        else with the running statistics, which must then be given.
    momentum : float, default 0.1
        Weight of the new value in the running averages.
    eps : float, default 1e-5
        Added to the variance inside the square root; must be > 0 with input statistics.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : InstanceNormState
        The updated running statistics (new arrays), the given ones when ``use_input_stats`` is
        False, or None fields when none were given.
    cache : InstanceNormCache
    """
    x = check_array(x, "x", _OP, ndim_min=2)
    channels = x.shape[1]
    tracking = check_running_stats(running_mean, running_var, _OP, channels)
    weight = check_param(weight, "weight", _OP, (channels,))
    bias = check_param(bias, "bias", _OP, (channels,))
    use_input_stats = check_flag(use_input_stats, "use_input_stats", _OP)
    momentum = check_momentum(momentum, _OP)
    eps = check_eps(eps, _OP)
    wider = wider_dtype(x.dtype)
    if wider is not None and out_of_range(x):  # tiny or huge: the whole call, wider
        y, state, cache = instance_norm_forward(
            x.astype(wider), widen(running_mean, wider), widen(running_var, wider),
            widen(weight, wider), widen(bias, wider), use_input_stats, momentum, eps)
        if tracking:
            state = InstanceNormState(narrow(state.running_mean, running_mean.dtype),
                                      narrow(state.running_var, running_var.dtype))
        return narrow(y, x.dtype), state, WideCache(
            cache, [None if a is None else a.dtype for a in (x, weight, bias)], wider)
    axes = tuple(range(2, x.ndim))
    shape = _channel_shape(x)
    if use_input_stats:
        m = axis_count(x.shape, axes)
        if m <= 1:
            raise ValueError(f"{_OP}: Expected more than 1 spatial element when training, got "
                             f"`x` of shape {x.shape}")
        if eps <= 0:
            raise ValueError(f"{_OP}: `eps` must be > 0 with input statistics, got {eps!r}")
        y, (shift, c, var, rstd, _) = _group_norm(x, weight, bias, eps)
        if tracking:
            with np.errstate(invalid="ignore"):  # no instance (N = 0): NaN, as PyTorch
                n = x.shape[0]
                running_mean, running_var = update_running_stats(
                    running_mean, running_var, (shift + c).reshape(x.shape[:2]).sum(axis=0) / n,
                    var.reshape(x.shape[:2]).sum(axis=0) / n, m, momentum)
        keep = x.shape[:2] + (1,) * len(axes)
        shift, c, rstd = shift.reshape(keep), c.reshape(keep), rstd.reshape(keep)
    else:
        if not tracking:
            raise ValueError(f"{_OP}: `running_mean` and `running_var` must be given when "
                             f"`use_input_stats` is False")
        shift = running_mean.reshape(shape).astype(x.dtype, copy=False)
        c = np.zeros_like(shift)
        rstd = rsqrt(running_var.reshape(shape) + eps).astype(x.dtype, copy=False)
        y = x - shift
        y *= rstd
        if weight is not None:
            y = y * weight.reshape(shape)
        if bias is not None:
            y += bias.reshape(shape)
        y = y.astype(x.dtype, copy=False)  # y like x, whatever the parameters' dtypes
    return y, InstanceNormState(running_mean, running_var), \
        InstanceNormCache(x, shift, c, rstd, weight, bias is not None, axes, use_input_stats,
                          None if bias is None else bias.dtype)


def _group_norm(x, weight, bias, eps):
    """``(y, (shift, c, var, rstd, span))``: with input statistics, InstanceNorm is GroupNorm with
    one group per channel (Wu & He 2018, Fig. 2), so its forward is GroupNorm's
    (:func:`~refnorm.norms.group_norm.normalize_groups`), statistics of shape (N, C, 1)."""
    if not x.size:  # a size-0 axis: PyTorch's empty output (and zero gradients)
        stats = np.zeros(x.shape[:2] + (1,), x.dtype)
        acc = stats.astype(np.promote_types(x.dtype, np.float32))
        return np.empty(x.shape, x.dtype), (stats, stats.copy(), acc, acc.copy(), None)
    # inf - inf in an instance with an inf; and the statistics' own (row_moments)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return normalize_groups(x, x.shape[1], weight, bias, eps)


def instance_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`instance_norm_forward`: ``(dy, cache) -> InstanceNormGrads``.

    With input statistics, GroupNorm's backward with one group per channel
    (:func:`~refnorm.norms.group_norm.normalize_groups_backward`); with running statistics,
    :math:`\mathrm{d}x = \gamma_c r_c\,\mathrm{d}y` and the parameter gradients summed over
    every axis but 1."""
    if isinstance(cache, WideCache):
        return cache.narrow(instance_norm_backward(dy.astype(cache.wide_dtype), cache.inner))
    x, shift, c, rstd, weight, has_bias, axes, input_stats = cache[:8]
    if input_stats:
        stats = [v.reshape(x.shape[:2] + (1,)) for v in (shift, c, rstd)]
        dx, sum_dyx, sum_dy = normalize_groups_backward(dy, x, *stats, weight)
    else:
        shape = _channel_shape(dy)
        scale = rstd if weight is None else rstd * weight.reshape(shape)
        dx = (dy * scale).astype(x.dtype, copy=False)
        sum_axes = (0,) + axes
        sum_dy = dy.sum(axis=sum_axes).reshape(-1) if has_bias else None
        sum_dyx = (dy * cache.xhat).sum(axis=sum_axes).reshape(-1) if weight is not None \
            else None
    dweight = sum_dyx.astype(weight.dtype, copy=False) if weight is not None else None
    dbias = sum_dy.astype(cache.bias_dtype or dy.dtype, copy=False) if has_bias else None
    return InstanceNormGrads(dx, dweight, dbias)


instance_norm = custom_vjp(instance_norm_forward, instance_norm_backward, ("x", "weight", "bias"),
                           stateful=True)
instance_norm.__doc__ = """Differentiable instance normalization (engine op): returns
``(y, new_state)``; see :func:`instance_norm_forward`."""


def instance_norm_composite(x, running_mean=None, running_var=None, weight=None, bias=None,
                            use_input_stats=True, momentum=0.1, eps=1e-5):
    """The same math with engine primitives only: the engine derives its own gradient.

    The new state is computed independently too (per-instance unbiased variance by
    ``ag.var(correction=1)``, no gradient).
    """
    axes = tuple(range(2, x.ndim))
    shape = _channel_shape(x)
    if use_input_stats:
        xc = x - ag.mean(x, axes, keepdims=True)
        xhat = xc / ag.sqrt(ag.mean(xc * xc, axes, keepdims=True) + eps)
        if running_mean is not None:
            with ag.no_grad():
                mu = ag.mean(ag.mean(x, axes), 0).data
                unbiased = ag.mean(ag.var(x, axes, correction=1), 0).data
            running_mean = momentum * mu + (1.0 - momentum) * running_mean
            running_var = momentum * unbiased + (1.0 - momentum) * running_var
    else:
        xhat = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps)
    y = xhat * ag.reshape(weight, shape) if weight is not None else xhat
    y = y + ag.reshape(bias, shape) if bias is not None else y
    return y, InstanceNormState(running_mean, running_var)


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, use_input_stats=True, running=False, affine=True, bias=True,
          momentum=0.1, eps=1e-5, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    running_mean = rng.standard_normal(c) if running else None
    running_var = rng.uniform(0.5, 2.0, c) if running else None
    return SampleInput(name, (x, weight, b), dict(
        running_mean=running_mean, running_var=running_var, use_input_stats=use_input_stats,
        momentum=momentum, eps=eps))


def sample_inputs(rng):
    yield _case(rng, "(2,3,5)-(N,C,L)", (2, 3, 5))
    yield _case(rng, "(2,2,3,3)-2d", (2, 2, 3, 3))
    yield _case(rng, "(1,3,2,4)-N1", (1, 3, 2, 4))
    yield _case(rng, "(2,2,2,2,3)-3d", (2, 2, 2, 2, 3))
    yield _case(rng, "(3,1,4)-one-channel", (3, 1, 4))
    yield _case(rng, "(2,3,1,4)-size-1-spatial-axis", (2, 3, 1, 4))
    yield _case(rng, "(3,2,4)-running-stats", (3, 2, 4), running=True)
    yield _case(rng, "(2,2,2,3)-running-stats-momentum0.5", (2, 2, 2, 3), running=True,
                momentum=0.5)
    yield _case(rng, "(3,2,4)-use-running-stats", (3, 2, 4), running=True, use_input_stats=False)
    yield _case(rng, "(3,2)-2d-input-use-running-stats", (3, 2), running=True,
                use_input_stats=False)
    yield _case(rng, "(2,3,4)-no-affine", (2, 3, 4), affine=False)
    yield _case(rng, "(2,2,5)-weight-only", (2, 2, 5), bias=False)
    yield _case(rng, "(2,2,6)-eps0.1-no-affine", (2, 2, 6), eps=0.1, affine=False)
    constant = rng.standard_normal((2, 3, 4))
    constant[1, 2] = -0.3
    yield _case(rng, "(2,3,4)-constant-instance", (2, 3, 4), x=constant, running=True)
    yield _case(rng, "(2,2,5)-mean100", (2, 2, 5), x=100.0 + rng.standard_normal((2, 2, 5)))


def oracle_inputs(rng):
    yield _case(rng, "(8,37,13,11)", (8, 37, 13, 11))
    yield _case(rng, "(2,3,65536)-long-instances", (2, 3, 65536))
    yield _case(rng, "(1,5,17,19)-N1", (1, 5, 17, 19))
    yield _case(rng, "(3,5,3,7,11)-3d", (3, 5, 3, 7, 11))
    yield _case(rng, "(16,37,9,9)-running-stats", (16, 37, 9, 9), running=True)
    yield _case(rng, "(16,37,9,9)-use-running-stats", (16, 37, 9, 9), running=True,
                use_input_stats=False)
    yield _case(rng, "(8,5,129)-mean1e4-std1e-3", (8, 5, 129), running=True,
                x=1e4 + 1e-3 * rng.standard_normal((8, 5, 129)))
    constant = np.broadcast_to(rng.standard_normal((8, 6, 1, 1)), (8, 6, 5, 5)).copy()
    yield _case(rng, "(8,6,5,5)-constant-instances", (8, 6, 5, 5), x=constant, running=True)
    yield _case(rng, "(6,7,33)-tiny-scale", (6, 7, 33), x=1e-20 * rng.standard_normal((6, 7, 33)))
    yield _case(rng, "(6,7,33)-huge-scale", (6, 7, 33), x=1e20 * rng.standard_normal((6, 7, 33)))


def error_inputs():
    x = np.ones((2, 3, 4))

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias), kwargs)

    c = np.ones(3)
    yield ErrorInput(call("list x", x=[[[1.0, 2.0]]]), TypeError,
                     r"instance_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("int x", x=np.ones((2, 3, 4), dtype=int)), TypeError,
                     r"instance_norm: `x` must have a floating dtype")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"`x` must have at least 2 dimensions")
    yield ErrorInput(call("one spatial element", x=np.ones((2, 3, 1))), ValueError,
                     r"Expected more than 1 spatial element when training")
    yield ErrorInput(call("2-d x with input stats", x=np.ones((2, 3))), ValueError,
                     r"Expected more than 1 spatial element when training")
    yield ErrorInput(call("no running stats to use", use_input_stats=False), ValueError,
                     r"`running_mean` and `running_var` must be given when `use_input_stats` "
                     r"is False")
    yield ErrorInput(call("running_mean only", running_mean=c.copy()), ValueError,
                     r"`running_mean` and `running_var` must either both be None or neither")
    yield ErrorInput(call("running_var shape", running_mean=c.copy(), running_var=np.ones(2)),
                     ValueError, r"`running_var` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("bias", bias=np.ones((3, 1))), ValueError,
                     r"`bias` must have shape \(3,\)")
    yield ErrorInput(call("eps", eps=float("nan")), ValueError,
                     r"`eps` must be a finite number >= 0")
    yield ErrorInput(call("eps 0 with input stats", eps=0.0), ValueError,
                     r"`eps` must be > 0 with input statistics")
    yield ErrorInput(call("momentum None", running_mean=c.copy(), running_var=c.copy(),
                          momentum=None), ValueError, r"`momentum` must be a finite number, got")
    yield ErrorInput(call("use_input_stats", use_input_stats="yes"), TypeError,
                     r"`use_input_stats` must be a bool")


def _torch_call(torch, x, weight, bias, *, running_mean=None, running_var=None,
                use_input_stats=True, momentum=0.1, eps=1e-5):
    """``F.instance_norm`` on copies of the running statistics (NumPy arrays or tensors, any
    device and dtype); returns ``(y, new_state)``, the state as tensors."""
    tracking = running_mean is not None
    rm = torch.as_tensor(running_mean).clone() if tracking else None  # torch updates in place
    rv = torch.as_tensor(running_var).clone() if tracking else None
    y = torch.nn.functional.instance_norm(x, rm, rv, weight, bias, use_input_stats, momentum, eps)
    return y, (dict(running_mean=rm, running_var=rv) if tracking else {})


def _layer_init(features, *, eps=1e-5, momentum=0.1, affine=False,
                track_running_stats=False):
    """``torch.nn.InstanceNorm{1,2,3}d(features, eps, momentum, affine, track_running_stats)``
    (affine and running statistics off by default): weight 1, bias 0, running mean 0, running
    variance 1. Instance statistics in training, and in evaluation when not tracked."""
    from refnorm.registry import TRAINING

    check_eps(eps, "instance_norm")
    check_momentum(momentum, "instance_norm")
    params = dict(weight=np.ones(features), bias=np.zeros(features)) if affine else {}
    kwargs = dict(momentum=momentum, eps=eps)
    if not track_running_stats:
        return params, {}, dict(kwargs, use_input_stats=True)
    state = dict(running_mean=np.zeros(features), running_var=np.ones(features))
    return params, state, dict(kwargs, use_input_stats=TRAINING)


SPEC = NormSpec(
    name="instance_norm",
    title="Instance Normalization",
    paper=Paper("Instance Normalization: The Missing Ingredient for Fast Stylization",
                "Ulyanov, Vedaldi, Lempitsky", 2016, "arXiv:1607.08022"),
    forward=instance_norm_forward,
    backward=instance_norm_backward,
    op=instance_norm,
    composite=instance_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    invariances=("shift", "scale"),
    stats_axes=lambda s: tuple(range(2, s.arrays[0].ndim))
    if s.kwargs.get("use_input_stats", True) else None,
    torch_equivalent="torch.nn.functional.instance_norm",
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=_layer_init,
)

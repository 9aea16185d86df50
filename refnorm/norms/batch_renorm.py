r"""Batch Renormalization.

Ioffe, *Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
Models*, NeurIPS 2017, arXiv:1702.03275 (Algorithm 1).

The input has shape :math:`(N, C, *)`; channel :math:`c` is normalized over the set :math:`S` of
every axis but 1 (:math:`m` values), as in BatchNorm (:mod:`refnorm.norms.batch_norm`). In
training, with the batch statistics :math:`\mu_B = \langle x\rangle_S`,
:math:`\sigma_B = (\langle (x-\mu_B)^2\rangle_S + \epsilon)^{1/2}` and the running ones
:math:`\bar\mu`, :math:`\bar\sigma = (\bar\sigma^2 + \epsilon)^{1/2}`:

.. math::

   r = \mathrm{clip}_{[1/r_{\max},\, r_{\max}]}\Bigl(\frac{\sigma_B}{\bar\sigma}\Bigr),\qquad
   d = \mathrm{clip}_{[-d_{\max},\, d_{\max}]}\Bigl(\frac{\mu_B - \bar\mu}{\bar\sigma}\Bigr),
   \qquad
   \hat x = \frac{x-\mu_B}{\sigma_B},\qquad
   y = \gamma_c\,(r\,\hat x + d) + \beta_c ,

:math:`r` and :math:`d` per channel and treated as **constants** by the gradient (the paper's
``stop_gradient``). The running statistics are updated as BatchNorm's (momentum :math:`f`, the
weight of the new value; the running variance tracks the unbiased batch variance). In
evaluation :math:`y = \gamma\,(x-\bar\mu)/\bar\sigma + \beta`, BatchNorm's evaluation.

With :math:`r_{\max} = 1` and :math:`d_{\max} = 0`, :math:`r = 1` and :math:`d = 0`: Batch
Renormalization is then BatchNorm in training too (outputs, gradients and running statistics;
a test checks it to 1e-12).

Backward (derivation: ``docs/derivations/batch_renorm.rst``). Since :math:`r, d` are constants,
:math:`\partial L/\partial\hat x = \gamma\,r\,\mathrm{d}y`, and the standardization backward
gives

.. math::

   \mathrm{d}x = \gamma_c\,r_c\,\sigma_B^{-1}\bigl(\mathrm{d}y - \langle\mathrm{d}y\rangle_S
        - \hat x\,\langle\mathrm{d}y\,\hat x\rangle_S\bigr),\qquad
   \mathrm{d}\gamma_c = \textstyle\sum_S \mathrm{d}y\,(r_c\,\hat x + d_c),\qquad
   \mathrm{d}\beta_c = \textstyle\sum_S \mathrm{d}y .

In evaluation :math:`\mathrm{d}x = \gamma_c\,\mathrm{d}y/\bar\sigma_c`.

**The schedule.** The paper trains with :math:`r_{\max} = 1, d_{\max} = 0` (BatchNorm) for the
first 5,000 steps, then relaxes them "gradually" to :math:`r_{\max} = 3` (reached at 40k steps)
and :math:`d_{\max} = 5` (at 25k). The ramp's shape is not stated; :func:`renorm_limits` gives
the linear reading of it, :math:`r_{\max}(t) = 1 + 2\,\mathrm{clip}((t-5000)/35000, 0, 1)`,
:math:`d_{\max}(t) = 5\,\mathrm{clip}((t-5000)/20000, 0, 1)`. The forward takes ``rmax`` and
``dmax`` explicitly (defaults 3 and 5, the final values); a training loop passes
``renorm_limits(num_batches_tracked)``.

Conventions and discrepancies. There is no official code. The paper tracks the running
**standard deviation** :math:`\sigma \leftarrow \sigma + \alpha(\sigma_B - \sigma)` with
:math:`\epsilon` inside :math:`\sigma_B`; Chainer's ``F.batch_renormalization`` and torchrl's
``BatchRenorm1d`` track the (unbiased) running **variance**, and compute
:math:`\bar\sigma = (\bar\sigma^2 + \epsilon)^{1/2}`, as Keras-contrib does. refnorm follows
the implementations (the running state is BatchNorm's, which is what makes the BatchNorm
identity exact); ``eps = 1e-5``, ``momentum = 0.1`` (PyTorch's convention, the weight of the new
value; torchrl's default is 0.01). Running statistics are required: :math:`r` and :math:`d`
need them.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (_finite_float, check_array, check_flag, check_param,
                                  errors_as, row_sums)
from refnorm.norms.batch_norm import (_torch_call as _bn_torch_call,
                                      batch_norm_backward, batch_norm_composite,
                                      batch_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "batch_renorm"


def renorm_limits(step, *, warmup=5000, r_end=40000, d_end=25000, rmax=3.0, dmax=5.0):
    r"""``(rmax, dmax)`` at training step ``step``: the paper's schedule read as a linear ramp.

    :math:`r_{\max} = 1` and :math:`d_{\max} = 0` up to ``warmup``; then
    :math:`r_{\max}` rises linearly to ``rmax`` at step ``r_end`` and :math:`d_{\max}` to
    ``dmax`` at step ``d_end`` (the paper: 5000, 40000, 25000, 3, 5; the ramp's shape is an
    assumption, the paper says "gradually relaxed").
    """
    t = float(step)
    ramp_r = min(max((t - warmup) / (r_end - warmup), 0.0), 1.0)
    ramp_d = min(max((t - warmup) / (d_end - warmup), 0.0), 1.0)
    return 1.0 + (rmax - 1.0) * ramp_r, dmax * ramp_d


class BatchRenormCache(NamedTuple):
    bn: object                  # BatchNorm's cache (without affine in training, with it in eval)
    r: np.ndarray | None        # r per channel, (1, C, 1, ...), or None in evaluation
    d: np.ndarray | None        # d per channel, likewise
    weight: np.ndarray | None   # \gamma, or None
    has_bias: bool
    bias_dtype: np.dtype | None

    mean = property(lambda self: self.bn.mean)   # \mu_B (or the running mean in evaluation)
    rstd = property(lambda self: self.bn.rstd)   # 1/\sigma_B (or 1/\bar\sigma)
    xhat = property(lambda self: self.bn.xhat)

    @property
    def renorm(self):
        """``(r, d)`` per channel, flat, in training; None in evaluation (for the oracle)."""
        return None if self.r is None else (self.r.ravel(), self.d.ravel())


class BatchRenormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _check_limit(value, name, low):
    number = _finite_float(value) if isinstance(value, (int, float, np.floating, np.integer)) \
        and not isinstance(value, (bool, np.bool_)) else None
    if number is None or number < low:
        raise ValueError(f"{_OP}: `{name}` must be a finite number >= {low}, got {value!r}")
    return number


def batch_renorm_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5, *, rmax=3.0, dmax=5.0, num_batches_tracked=0,
                         fixed_rd=None):
    r"""Batch renormalization over every axis but 1; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
    running_mean, running_var : ndarray of shape (C,)
        :math:`\bar\mu` and :math:`\bar\sigma^2` (unbiased); required, never modified.
    weight, bias : ndarray of shape (C,), optional
        :math:`\gamma` and :math:`\beta`. ``None`` means 1 and 0.
    training : bool, default False
    momentum : float or None, default 0.1
        As in :func:`~refnorm.norms.batch_norm.batch_norm_forward`.
    eps : float, default 1e-5
        Inside both square roots, :math:`\sigma_B` and :math:`\bar\sigma`.
    rmax : float >= 1, keyword-only, default 3
    dmax : float >= 0, keyword-only, default 5
        The clipping limits (see :func:`renorm_limits` for the paper's schedule).
    num_batches_tracked : int, keyword-only, default 0
    fixed_rd : pair of arrays, keyword-only, optional
        :math:`(r, d)` per channel (shape ``(1, C, 1, ...)``) to use instead of the clipped
        ratios: the function whose exact derivative the backward is (the paper's
        ``stop_gradient``), which is how the tests check the backward by finite differences.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : BatchNormState
    cache : BatchRenormCache
    """
    with errors_as(_OP, "batch_norm"):
        x = check_array(x, "x", _OP, ndim_min=2)
        if running_mean is None or running_var is None:
            raise ValueError(f"{_OP}: `running_mean` and `running_var` must be given (r and d "
                             f"are computed from them)")
        weight = check_param(weight, "weight", _OP, (x.shape[1],))
        bias = check_param(bias, "bias", _OP, (x.shape[1],))
        rmax = _check_limit(rmax, "rmax", 1.0)
        dmax = _check_limit(dmax, "dmax", 0.0)
        training = check_flag(training, "training", _OP)
        if not training:  # BatchNorm's evaluation, affine included
            y, state, bn = batch_norm_forward(x, running_mean, running_var, weight, bias,
                                              training, momentum, eps,
                                              num_batches_tracked=num_batches_tracked)
            return y, state, BatchRenormCache(bn, None, None, weight, bias is not None,
                                              None if bias is None else bias.dtype)
        xhat, state, bn = batch_norm_forward(x, running_mean, running_var, None, None, training,
                                             momentum, eps,
                                             num_batches_tracked=num_batches_tracked)
    shape = bn.rstd.shape
    acc = bn.rstd.dtype  # the accumulation dtype (float32 for float16)
    if fixed_rd is not None:
        r, d = (np.broadcast_to(np.asarray(v, acc), shape) for v in fixed_rd)
    else:
        r, d = _ratios(bn, running_mean, running_var, eps, rmax, dmax)
    y = xhat.astype(acc, copy=True)
    y *= r
    y += d
    if weight is not None:
        y *= weight.reshape(shape)
    if bias is not None:
        y += bias.reshape(shape)
    return y.astype(x.dtype, copy=False), state, BatchRenormCache(
        bn, r, d, weight, bias is not None, None if bias is None else bias.dtype)


def _ratios(bn, running_mean, running_var, eps, rmax, dmax):
    """:math:`r` and :math:`d` per channel from BatchNorm's cache and the running statistics."""
    shape = bn.rstd.shape
    acc = bn.rstd.dtype
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rstd_run = 1.0 / np.sqrt(running_var.astype(acc).reshape(shape) + eps)
        r = np.clip(rstd_run / bn.rstd, 1.0 / rmax, rmax)   # sigma_B / sigma
        # mu_B - mu = (m0 - mu) + c: m0 - mu is exact where they are close (Sterbenz), which
        # the rounded mean m0 + c would not be (a channel at 1e4 with sigma = 1e-3)
        diff = (bn.shift.astype(acc) - running_mean.astype(acc).reshape(shape)) \
            + bn.correction.astype(acc)
        d = np.clip(diff * rstd_run, -dmax, dmax)
    return r, d


def batch_renorm_backward(dy, cache):
    """Hand-derived VJP of :func:`batch_renorm_forward`: ``(dy, cache) -> BatchRenormGrads``.

    In training, BatchNorm's backward (without affine) of :math:`\\gamma\\,r\\,\\mathrm{d}y`
    gives ``dx``; the parameter sums are per-channel BLAS sums over the (sample, channel) rows.
    """
    bn, r, d, weight, has_bias, bias_dtype = cache
    if r is None:  # evaluation: BatchNorm's backward
        return BatchRenormGrads(*batch_norm_backward(dy, bn))
    scale = r if weight is None else r * weight.reshape(r.shape)
    dx = batch_norm_backward((dy * scale).astype(dy.dtype, copy=False), bn).dx
    dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
    sum_dy = row_sums(dy3).sum(axis=0)                          # per channel
    dweight = dbias = None
    if weight is not None:
        xhat3 = bn.xhat.reshape(dy3.shape)
        sum_dyx = (dy3.astype(sum_dy.dtype) * xhat3).sum(axis=(0, 2))
        dweight = (r.ravel() * sum_dyx + d.ravel() * sum_dy).astype(weight.dtype, copy=False)
    if has_bias:
        dbias = sum_dy.astype(bias_dtype, copy=False)
    return BatchRenormGrads(dx, dweight, dbias)


batch_renorm = custom_vjp(batch_renorm_forward, batch_renorm_backward, ("x", "weight", "bias"),
                          stateful=True)
batch_renorm.__doc__ = """Differentiable batch renormalization (engine op): returns
``(y, new_state)``; see :func:`batch_renorm_forward`."""


def batch_renorm_composite(x, running_mean, running_var, weight=None, bias=None, training=False,
                           momentum=0.1, eps=1e-5, *, rmax=3.0, dmax=5.0,
                           num_batches_tracked=0, fixed_rd=None):
    """The same math with engine primitives: BatchNorm's composite without affine, and
    :math:`r, d` computed under ``no_grad`` (constants, as the paper's ``stop_gradient``)."""
    xhat, state = batch_norm_composite(x, running_mean, running_var, None, None, training,
                                       momentum, eps, num_batches_tracked=num_batches_tracked)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if training:
        axes = (0,) + tuple(range(2, x.ndim))
        with ag.no_grad():
            mu = ag.mean(x, axes, keepdims=True).data
            sigma_b = np.sqrt(ag.var(x, axes, keepdims=True).data + eps)
        sigma = np.sqrt(running_var.reshape(shape) + eps)
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((mu - running_mean.reshape(shape)) / sigma, -dmax, dmax)
        if fixed_rd is not None:
            r, d = fixed_rd
        xhat = xhat * r + d
    y = xhat * ag.reshape(weight, shape) if weight is not None else xhat
    return (y + ag.reshape(bias, shape) if bias is not None else y), state


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, *, training=True, affine=True, bias=True, momentum=0.1, eps=1e-5,
          rmax=3.0, dmax=5.0, num_batches_tracked=0, x=None, running=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    rm, rv = running if running is not None else (0.5 * rng.standard_normal(c),
                                                  rng.uniform(0.3, 3.0, c))
    return SampleInput(name, (x, weight, b), dict(
        running_mean=rm, running_var=rv, training=training, momentum=momentum, eps=eps,
        rmax=rmax, dmax=dmax, num_batches_tracked=num_batches_tracked))


def sample_inputs(rng):
    yield _case(rng, "(4,3)-1d", (4, 3))
    yield _case(rng, "(3,2,5)-(N,C,L)", (3, 2, 5))
    yield _case(rng, "(2,3,2,3)-2d", (2, 3, 2, 3))
    yield _case(rng, "(1,2,3,4)-N1", (1, 2, 3, 4))
    yield _case(rng, "(4,3,3)-r-and-d-clipped", (4, 3, 3), rmax=1.2, dmax=0.1,
                running=(rng.standard_normal(3) * 3, rng.uniform(4.0, 9.0, 3)))
    yield _case(rng, "(4,3,3)-rmax1-dmax0-batch-norm", (4, 3, 3), rmax=1.0, dmax=0.0)
    yield _case(rng, "(3,2,4)-eval", (3, 2, 4), training=False)
    yield _case(rng, "(3,2,4)-momentum-None-t3", (3, 2, 4), momentum=None, num_batches_tracked=3)
    yield _case(rng, "(4,2,3)-no-affine-eps0.1", (4, 2, 3), affine=False, eps=0.1)
    yield _case(rng, "(3,2,4)-weight-only", (3, 2, 4), bias=False)
    constant = rng.standard_normal((3, 2, 4))
    constant[:, 0] = 0.7
    yield _case(rng, "(3,2,4)-constant-channel", (3, 2, 4), x=constant)
    yield _case(rng, "(3,2,4)-mean100", (3, 2, 4), x=100.0 + rng.standard_normal((3, 2, 4)),
                running=(100.0 + rng.standard_normal(2), rng.uniform(0.5, 2.0, 2)))


def oracle_inputs(rng):
    yield _case(rng, "(16,37,13,11)", (16, 37, 13, 11))
    yield _case(rng, "(65536,3)-long-channels", (65536, 3))
    yield _case(rng, "(1,5,17,19)-N1", (1, 5, 17, 19))
    yield _case(rng, "(16,37,9,9)-eval", (16, 37, 9, 9), training=False)
    yield _case(rng, "(33,37)-momentum-None-t9", (33, 37), momentum=None, num_batches_tracked=9)
    yield _case(rng, "(8,5,7,9)-clipped", (8, 5, 7, 9), rmax=1.5, dmax=0.5,
                running=(2 * rng.standard_normal(5), rng.uniform(3.0, 9.0, 5)))
    yield _case(rng, "(8,5,7,9)-mean1e4-std1e-3", (8, 5, 7, 9),
                x=1e4 + 1e-3 * rng.standard_normal((8, 5, 7, 9)),
                running=(1e4 + 1e-3 * rng.standard_normal(5), np.full(5, 1e-6)))


def error_inputs():
    x = np.ones((2, 3, 4))
    c = np.ones(3)

    def call(name, x=x, weight=None, bias=None, **kwargs):
        return SampleInput(name, (x, weight, bias),
                           {"running_mean": c.copy(), "running_var": c.copy(), **kwargs})

    yield ErrorInput(call("list x", x=[[1.0, 2.0]]), TypeError,
                     r"batch_renorm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"batch_renorm: `x` must have at least 2 dimensions")
    yield ErrorInput(call("no running stats", running_mean=None, running_var=None), ValueError,
                     r"batch_renorm: `running_mean` and `running_var` must be given")
    yield ErrorInput(call("running_var shape", running_var=np.ones(4)), ValueError,
                     r"batch_renorm: `running_var` must have shape \(3,\), got \(4,\)")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"batch_renorm: `weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(call("rmax", rmax=0.5), ValueError,
                     r"batch_renorm: `rmax` must be a finite number >= 1")
    yield ErrorInput(call("dmax", dmax=-1.0), ValueError,
                     r"batch_renorm: `dmax` must be a finite number >= 0")
    yield ErrorInput(call("eps 0 training", training=True, eps=0.0), ValueError,
                     r"batch_renorm: `eps` must be > 0 when batch statistics are used")
    yield ErrorInput(call("one value per channel", x=np.ones((1, 3)), training=True), ValueError,
                     r"batch_renorm: Expected more than 1 value per channel when training")


def _torch_call(torch, x, weight, bias, *, running_mean, running_var, training=False,
                momentum=0.1, eps=1e-5, rmax=3.0, dmax=5.0, num_batches_tracked=0):
    """Batch Renormalization from torch ops (torch has none): statistics in float32 at least
    (as ``F.batch_norm`` keeps them), :math:`r, d` detached and clamped; the running state as
    ``nn.BatchNorm`` updates it (``F.batch_norm`` on copies, whose output is not used)."""
    if not training:
        return _bn_torch_call(torch, x, weight, bias, running_mean=running_mean,
                              running_var=running_var, training=False, momentum=momentum,
                              eps=eps, num_batches_tracked=num_batches_tracked)
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    axes = [0] + list(range(2, x.ndim))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    rm = torch.as_tensor(running_mean).to(device=x.device, dtype=acc).reshape(shape)
    rv = torch.as_tensor(running_var).to(device=x.device, dtype=acc).reshape(shape)
    mu = xf.mean(axes, keepdim=True)
    sigma_b = torch.sqrt(((xf - mu) ** 2).mean(axes, keepdim=True) + eps)
    sigma = torch.sqrt(rv + eps)
    r = (sigma_b / sigma).detach().clamp(1.0 / rmax, rmax)
    d = ((mu - rm) / sigma).detach().clamp(-dmax, dmax)
    y = (xf - mu) / sigma_b * r + d
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    _, state = _bn_torch_call(torch, x.detach(), None, None, running_mean=running_mean,
                              running_var=running_var, training=True, momentum=momentum,
                              eps=eps, num_batches_tracked=num_batches_tracked)
    return y.to(x.dtype), state


def _freeze(sample, cache):
    """The call with r and d fixed at the values the forward computed (training only)."""
    if cache.r is None:
        return sample
    return sample._replace(kwargs={**sample.kwargs, "fixed_rd": (cache.r, cache.d)})


def _layer_init(features, rmax=3.0, dmax=5.0):
    return ({"weight": np.ones(features), "bias": np.zeros(features)},
            {"running_mean": np.zeros(features), "running_var": np.ones(features),
             "num_batches_tracked": np.asarray(0, np.int64)},
            {"rmax": rmax, "dmax": dmax})


SPEC = NormSpec(
    name="batch_renorm",
    title="Batch Renormalization",
    paper=Paper("Batch Renormalization: Towards Reducing Minibatch Dependence in "
                "Batch-Normalized Models", "Ioffe", 2017, "arXiv:1702.03275"),
    forward=batch_renorm_forward,
    backward=batch_renorm_backward,
    op=batch_renorm,
    composite=batch_renorm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    # r x̂ + d is not standardized (unless r = 1, d = 0), and r depends on the scale of x
    invariances=(),
    stats_axes=None,
    gradient="surrogate",
    gradient_note="r and d are constants of the gradient (the paper's stop_gradient)",
    freeze=_freeze,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=_layer_init,
)

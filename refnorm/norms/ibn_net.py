r"""IBN-Net: Instance and Batch Normalization in one network (IBN-a and IBN-b).

Pan, Luo, Shi & Tang, *Two at Once: Enhancing Learning and Generalization Capacities via
IBN-Net*, ECCV 2018, arXiv:1807.09441. Official code: XingangPan/IBN-Net, ``ibnnet/modules.py``
(``IBN``) and ``ibnnet/resnet_ibn.py``.

**IBN-a** (``IBN(planes, ratio=0.5)``) splits the :math:`C` channels of an input of shape
:math:`(N, C, *)` at :math:`h = \lfloor C\rho\rfloor` (``int(planes * ratio)``): the first
:math:`h` channels are instance-normalized, the other :math:`C - h` batch-normalized, and the two
results are put back side by side in the original channel order:

.. math::

   y_{:, :h} = \mathrm{IN}(x_{:, :h};\ \gamma_{:h}, \beta_{:h}),\qquad
   y_{:, h:} = \mathrm{BN}(x_{:, h:};\ \bar\mu, \bar\sigma^2, \gamma_{h:}, \beta_{h:}) ,

with :math:`\mathrm{IN}` as in :mod:`refnorm.norms.instance_norm` (instance statistics in
training and evaluation, no running statistics: ``InstanceNorm2d(h, affine=True)``) and
:math:`\mathrm{BN}` as in :mod:`refnorm.norms.batch_norm` (``BatchNorm2d(C - h)``: running
statistics of shape :math:`(C - h,)`, batch statistics in training). ``weight`` and ``bias`` are
the two modules' :math:`\gamma` and :math:`\beta` concatenated, shape :math:`(C,)`.

**IBN-b** puts a plain ``InstanceNorm2d(C, affine=True)`` in the stem (in place of ``bn1``) and
after the residual addition of the last block of ``layer1`` and ``layer2``,
:math:`\mathrm{out} = \mathrm{ReLU}(\mathrm{IN}(F(x) + \mathrm{shortcut}))`. Its normalization
is therefore instance normalization with affine parameters and instance statistics in training
and evaluation; the record ``ibn_b`` is that layer (the residual sum and the ReLU belong to the
block, not to the normalization).

Backward (derivation: ``docs/derivations/ibn_net.rst``). The two parts share no statistic and no
parameter, so the VJP is InstanceNorm's backward on the first :math:`h` channels and
BatchNorm's on the rest, with ``dweight`` and ``dbias`` concatenated the same way:

.. math::

   \mathrm{d}x_{:, :h} = \gamma\,r\,(\mathrm{d}y - \langle\mathrm{d}y\rangle_A
        - \hat x\,\langle\mathrm{d}y\,\hat x\rangle_A),\qquad
   \mathrm{d}x_{:, h:} = \gamma\,r\,(\mathrm{d}y - \langle\mathrm{d}y\rangle_S
        - \hat x\,\langle\mathrm{d}y\,\hat x\rangle_S)

(:math:`A` the spatial axes, :math:`S` every axis but 1; in evaluation the BatchNorm part is
:math:`\gamma\,r\,\mathrm{d}y`).

Conventions, as the official code: ``ratio = 0.5``, ``eps = 1e-5`` and ``momentum = 0.1`` for
both parts, :math:`\gamma = 1`, :math:`\beta = 0` at initialization (``layer_init``), biased
variance in the forward and unbiased in the running variance (BatchNorm's conventions).
``ratio = 0`` is BatchNorm and ``ratio = 1`` InstanceNorm (a test checks both identities).

Paper vs code. The paper's models (``resnet*_ibn_a_old.py``, ``ConvBNIN``) put **BatchNorm
first** and IN on the second half of the channels; the current ``IBN`` module (the default
here) puts IN first. ``in_first=False`` selects the paper's order.
The official code splits with ``torch.split(x, half, 1)``, which makes chunks of ``half``
channels: where :math:`C \ne 2h` (an odd :math:`C`, a ratio other than 0.5) there are more than
two chunks, the second one does not hold :math:`C - h` channels, and the module fails. refnorm
slices ``x[:, :h]`` and ``x[:, h:]``, which is what the module means.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (check_array, check_flag, check_fraction, check_param,
                                  check_running_stats, errors_as)
from refnorm.norms.batch_norm import (BatchNormState, _check_num_batches_tracked,
                                      batch_norm_backward, batch_norm_composite,
                                      batch_norm_forward)
from refnorm.norms.instance_norm import (instance_norm_backward, instance_norm_composite,
                                         instance_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_PAPER = Paper("Two at Once: Enhancing Learning and Generalization Capacities via IBN-Net",
               "Pan, Luo, Shi, Tang", 2018, "arXiv:1807.09441 (ECCV 2018)")


class IBNCache(NamedTuple):
    in_cache: object          # InstanceNorm's cache for its channels, or None (h = 0)
    bn_cache: object          # BatchNorm's cache for its channels, or None (h = C)
    in_channels: slice        # which channels of x are instance-normalized
    bn_channels: slice        # and which are batch-normalized
    x_shape: tuple
    x_dtype: np.dtype
    weight: np.ndarray | None
    bias: np.ndarray | None

    def _per_group(self, field):
        """A statistic of both parts, flat, in the order of the record's groups: the BatchNorm
        channels, then the (sample, channel) instances of the IN part (for the oracle)."""
        parts = []
        if self.bn_cache is not None:
            parts.append(np.asarray(getattr(self.bn_cache, field)).ravel())
        if self.in_cache is not None:
            parts.append(np.asarray(getattr(self.in_cache, field)).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    mean = property(lambda self: self._per_group("mean"))
    rstd = property(lambda self: self._per_group("rstd"))


class IBNGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _split(channels, ratio, in_first):
    """``(in_channels, bn_channels)``: the slices of the channels each part normalizes."""
    h = int(channels * ratio)
    if in_first:
        return slice(0, h), slice(h, channels)
    return slice(channels - h, channels), slice(0, channels - h)


def _part(a, channels):
    return None if a is None else a[channels]


def ibn_a_forward(x, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-5, *, ratio=0.5, in_first=True, num_batches_tracked=0):
    r"""IBN-a: InstanceNorm on ``int(C * ratio)`` channels, BatchNorm on the others; returns
    ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``, at least one spatial axis
    running_mean, running_var : ndarray of shape ``(C - h,)``, or None
        The BatchNorm part's running statistics (unbiased variance); never modified.
    weight, bias : ndarray of shape ``(C,)``, optional
        :math:`\gamma` and :math:`\beta` of both parts, in channel order.
    training : bool, default False
        The BatchNorm part uses batch statistics (and updates the running ones); the IN part
        always uses instance statistics.
    momentum, eps : float, default 0.1 and 1e-5
        As in :func:`~refnorm.norms.batch_norm.batch_norm_forward` (``eps`` for both parts).
    ratio : float in [0, 1], keyword-only, default 0.5
        The fraction of channels that are instance-normalized, :math:`h = \lfloor C\rho\rfloor`.
    in_first : bool, keyword-only, default True
        The IN channels first (the official ``IBN`` module) or last (the paper's ``ConvBNIN``).
    num_batches_tracked : int, keyword-only, default 0
        BatchNorm's counter.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    new_state : BatchNormState
        The BatchNorm part's state.
    cache : IBNCache
    """
    op = "ibn_a"
    x = check_array(x, "x", op, ndim_min=3)
    channels = x.shape[1]
    weight = check_param(weight, "weight", op, (channels,))
    bias = check_param(bias, "bias", op, (channels,))
    ratio = check_fraction(ratio, "ratio", op)
    in_first = check_flag(in_first, "in_first", op)
    inc, bnc = _split(channels, ratio, in_first)
    y = np.empty(x.shape, dtype=x.dtype)
    in_cache = bn_cache = None
    with errors_as(op, "instance_norm", "batch_norm"):
        if bnc.stop > bnc.start:
            y[:, bnc], state, bn_cache = batch_norm_forward(
                x[:, bnc], running_mean, running_var, _part(weight, bnc), _part(bias, bnc),
                training, momentum, eps, num_batches_tracked=num_batches_tracked)
        else:  # no BatchNorm channels (ratio 1): the state passes through, checked
            check_running_stats(running_mean, running_var, "batch_norm", 0)
            check_flag(training, "training", "batch_norm")
            state = BatchNormState(running_mean, running_var, np.asarray(
                _check_num_batches_tracked(num_batches_tracked), np.int64))
        if inc.stop > inc.start:
            y[:, inc], _, in_cache = instance_norm_forward(
                x[:, inc], None, None, _part(weight, inc), _part(bias, inc), True, 0.1, eps)
    return y, state, IBNCache(in_cache, bn_cache, inc, bnc, x.shape, x.dtype, weight, bias)


def ibn_a_backward(dy, cache):
    """Hand-derived VJP of :func:`ibn_a_forward`: the two parts' backwards, side by side."""
    in_cache, bn_cache, inc, bnc, shape, dtype, weight, bias = cache
    dx = np.empty(shape, dtype=dtype)
    dweight = None if weight is None else np.empty(weight.shape, weight.dtype)
    dbias = None if bias is None else np.empty(bias.shape, bias.dtype)
    for part, channels, backward in ((in_cache, inc, instance_norm_backward),
                                     (bn_cache, bnc, batch_norm_backward)):
        if part is None:
            continue
        g = backward(dy[:, channels], part)
        dx[:, channels] = g.dx
        if weight is not None:
            dweight[channels] = g.dweight
        if bias is not None:
            dbias[channels] = g.dbias
    return IBNGrads(dx, dweight, dbias)


ibn_a = custom_vjp(ibn_a_forward, ibn_a_backward, ("x", "weight", "bias"), stateful=True)
ibn_a.__doc__ = """Differentiable IBN-a (engine op): returns ``(y, new_state)``; see
:func:`ibn_a_forward`."""


def ibn_a_composite(x, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, ratio=0.5, in_first=True, num_batches_tracked=0):
    """The same math with engine primitives: the two composites on their channels, joined by
    ``concatenate`` (whose VJP splits the gradient back)."""
    inc, bnc = _split(x.shape[1], ratio, in_first)
    parts = {}
    state = BatchNormState(running_mean, running_var, np.asarray(num_batches_tracked, np.int64))
    if bnc.stop > bnc.start:
        parts[bnc.start], state = batch_norm_composite(
            x[:, bnc], running_mean, running_var, _part(weight, bnc), _part(bias, bnc), training,
            momentum, eps, num_batches_tracked=num_batches_tracked)
    if inc.stop > inc.start:
        parts[inc.start], _ = instance_norm_composite(x[:, inc], None, None, _part(weight, inc),
                                                      _part(bias, inc), True, 0.1, eps)
    return ag.concatenate([parts[k] for k in sorted(parts)], axis=1), state


def ibn_b_forward(x, weight=None, bias=None, eps=1e-5):
    r"""IBN-b's normalization: InstanceNorm with affine parameters and instance statistics in
    training and evaluation (``nn.InstanceNorm2d(C, affine=True)``); returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``, at least one spatial axis
    weight, bias : ndarray of shape ``(C,)``, optional
        :math:`\gamma` (initialized to 1) and :math:`\beta` (to 0).
    eps : float, default 1e-5
        Added to the variance inside the square root; must be > 0.
    """
    with errors_as("ibn_b", "instance_norm"):
        x = check_array(x, "x", "instance_norm", ndim_min=3)
        y, _, cache = instance_norm_forward(x, None, None, weight, bias, True, 0.1, eps)
    return y, cache


def ibn_b_backward(dy, cache):
    """Hand-derived VJP of :func:`ibn_b_forward`: InstanceNorm's."""
    return IBNGrads(*instance_norm_backward(dy, cache))


ibn_b = custom_vjp(ibn_b_forward, ibn_b_backward, ("x", "weight", "bias"))
ibn_b.__doc__ = "Differentiable IBN-b normalization (engine op); see :func:`ibn_b_forward`."


def ibn_b_composite(x, weight=None, bias=None, eps=1e-5):
    """The same math with engine primitives (InstanceNorm's composite)."""
    return instance_norm_composite(x, None, None, weight, bias, True, 0.1, eps)[0]


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case_a(rng, name, shape, *, ratio=0.5, in_first=True, training=True, running=True,
            affine=True, momentum=0.1, eps=1e-5, num_batches_tracked=0, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    nbn = c - int(c * ratio)
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine else None
    return SampleInput(name, (x, weight, b), dict(
        running_mean=rng.standard_normal(nbn) if running else None,
        running_var=rng.uniform(0.5, 2.0, nbn) if running else None, training=training,
        momentum=momentum, eps=eps, ratio=ratio, in_first=in_first,
        num_batches_tracked=num_batches_tracked))


def sample_inputs_a(rng):
    yield _case_a(rng, "(3,4,2,3)-train", (3, 4, 2, 3))
    yield _case_a(rng, "(2,5,4)-odd-C-train", (2, 5, 4))
    yield _case_a(rng, "(3,4,2,2)-eval", (3, 4, 2, 2), training=False)
    yield _case_a(rng, "(1,4,2,3)-N1-train", (1, 4, 2, 3))
    yield _case_a(rng, "(2,6,3)-ratio0.25-paper-order", (2, 6, 3), ratio=0.25, in_first=False)
    yield _case_a(rng, "(3,3,4)-ratio0-batch-norm", (3, 3, 4), ratio=0.0)
    yield _case_a(rng, "(3,3,4)-ratio1-instance-norm", (3, 3, 4), ratio=1.0)
    yield _case_a(rng, "(3,4,5)-no-running-stats-no-affine", (3, 4, 5), running=False,
                  affine=False)
    yield _case_a(rng, "(3,4,3)-momentum-None-t2", (3, 4, 3), momentum=None,
                  num_batches_tracked=2)
    constant = rng.standard_normal((2, 4, 5))
    constant[1, 0] = 0.4     # a constant instance (IN part)
    constant[:, 3] = -1.5    # a constant channel (BN part)
    yield _case_a(rng, "(2,4,5)-constant-instance-and-channel", (2, 4, 5), x=constant)
    yield _case_a(rng, "(2,4,5)-mean100", (2, 4, 5), x=100.0 + rng.standard_normal((2, 4, 5)))


def oracle_inputs_a(rng):
    yield _case_a(rng, "(8,64,14,14)", (8, 64, 14, 14))
    yield _case_a(rng, "(4,37,9,11)-odd-C", (4, 37, 9, 11))
    yield _case_a(rng, "(8,37,9,9)-eval", (8, 37, 9, 9), training=False)
    yield _case_a(rng, "(1,6,17,19)-N1", (1, 6, 17, 19))
    yield _case_a(rng, "(6,10,33)-ratio0.3-paper-order", (6, 10, 33), ratio=0.3, in_first=False)
    yield _case_a(rng, "(8,6,129)-mean1e4-std1e-3", (8, 6, 129),
                  x=1e4 + 1e-3 * rng.standard_normal((8, 6, 129)))
    yield _case_a(rng, "(6,7,33)-huge-scale", (6, 7, 33), x=1e20 * rng.standard_normal((6, 7, 33)))


def error_inputs_a():
    x = np.ones((2, 4, 3))

    def call(name, x=x, weight=None, bias=None, **kwargs):
        kw = {"running_mean": np.zeros(2), "running_var": np.ones(2), **kwargs}
        return SampleInput(name, (x, weight, bias), kw)

    yield ErrorInput(call("list x", x=[[[1.0, 2.0]]]), TypeError,
                     r"ibn_a: `x` must be a numpy.ndarray")
    yield ErrorInput(call("2-d x", x=np.ones((2, 4))), ValueError,
                     r"ibn_a: `x` must have at least 3 dimensions")
    yield ErrorInput(call("weight", weight=np.ones(2)), ValueError,
                     r"ibn_a: `weight` must have shape \(4,\), got \(2,\)")
    yield ErrorInput(call("ratio", ratio=1.5), ValueError,
                     r"ibn_a: `ratio` must be a number in \[0, 1\]")
    yield ErrorInput(call("running_mean of all channels", running_mean=np.zeros(4),
                          running_var=np.ones(4)), ValueError,
                     r"ibn_a: `running_mean` must have shape \(2,\), got \(4,\)")
    yield ErrorInput(call("one spatial element", x=np.ones((2, 4, 1))), ValueError,
                     r"ibn_a: Expected more than 1 spatial element")
    yield ErrorInput(call("one value per channel", x=np.ones((1, 4, 1)), ratio=0.0,
                          running_mean=np.zeros(4), running_var=np.ones(4), training=True),
                     ValueError, r"ibn_a: Expected more than 1 value per channel")
    yield ErrorInput(call("eps", eps=0.0, training=True), ValueError, r"ibn_a: `eps` must be > 0")
    yield ErrorInput(call("in_first", in_first=1), TypeError, r"ibn_a: `in_first` must be a bool")


def _torch_call_a(torch, x, weight, bias, *, running_mean, running_var, training=False,
                  momentum=0.1, eps=1e-5, ratio=0.5, in_first=True, num_batches_tracked=0):
    """The official module's forward from torch ops: ``F.instance_norm`` on the IN channels,
    ``F.batch_norm`` (driven as ``nn.BatchNorm2d``, on copies of its state) on the others,
    ``torch.cat``."""
    from refnorm.norms.batch_norm import _torch_call as bn_call
    inc, bnc = _split(x.shape[1], ratio, in_first)
    parts, state = {}, {"num_batches_tracked": np.asarray(num_batches_tracked, np.int64)}
    if bnc.stop > bnc.start:
        parts[bnc.start], state = bn_call(
            torch, x[:, bnc], _part(weight, bnc), _part(bias, bnc), running_mean=running_mean,
            running_var=running_var, training=training, momentum=momentum, eps=eps,
            num_batches_tracked=num_batches_tracked)
    if inc.stop > inc.start:
        parts[inc.start] = torch.nn.functional.instance_norm(
            x[:, inc], None, None, _part(weight, inc), _part(bias, inc), True, 0.1, eps)
    return torch.cat([parts[k] for k in sorted(parts)], dim=1), state


def _groups_a(sample):
    """Per (sample, channel) on the IN channels, per channel on the BN channels (where they
    use batch statistics); None in evaluation with running statistics."""
    x, kw = sample.arrays[0], sample.kwargs
    if not kw.get("training", False) and kw.get("running_mean") is not None \
            and int(x.shape[1] * kw.get("ratio", 0.5)) < x.shape[1]:
        return None
    inc, _ = _split(x.shape[1], kw.get("ratio", 0.5), kw.get("in_first", True))
    n, c = np.indices(x.shape, sparse=True)[:2]
    n, c = np.broadcast_to(n, x.shape), np.broadcast_to(c, x.shape)
    is_in = (c >= inc.start) & (c < inc.stop)
    labels = np.where(is_in, x.shape[1] + n * x.shape[1] + c, c)
    _, labels = np.unique(labels, return_inverse=True)
    labels = labels.reshape(x.shape)
    return labels.astype(np.int64), int(labels.max()) + 1 if labels.size else 0


def _layer_init_a(features, ratio=0.5, in_first=True):
    nbn = features - int(features * ratio)
    return ({"weight": np.ones(features), "bias": np.zeros(features)},
            {"running_mean": np.zeros(nbn), "running_var": np.ones(nbn),
             "num_batches_tracked": np.asarray(0, np.int64)},
            {"ratio": ratio, "in_first": in_first})


SPEC_A = NormSpec(
    name="ibn_a",
    title="IBN-Net, IBN-a (InstanceNorm on part of the channels, BatchNorm on the rest)",
    paper=_PAPER,
    forward=ibn_a_forward,
    backward=ibn_a_backward,
    op=ibn_a,
    composite=ibn_a_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs_a,
    oracle_inputs=oracle_inputs_a,
    error_inputs=error_inputs_a,
    stateful=True,
    train_eval_differ=True,
    invariances=("shift", "scale"),
    # the groups are not one set of axes (IN per instance, BN per channel): stats_groups gives
    # them; stats_axes says None so that the axis-based reliability checks do not assume any
    stats_axes=lambda sample: None,
    stats_groups=_groups_a,
    torch_equivalent=None,
    torch_call=_torch_call_a,
    param_layout="channel",
    layer_init=_layer_init_a,
)


def _case_b(rng, name, shape, *, affine=True, bias=True, eps=1e-5, x=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    weight = rng.standard_normal(c) + 1.0 if affine else None
    b = rng.standard_normal(c) if affine and bias else None
    return SampleInput(name, (x, weight, b), dict(eps=eps))


def sample_inputs_b(rng):
    yield _case_b(rng, "(2,3,2,3)", (2, 3, 2, 3))
    yield _case_b(rng, "(1,2,5)-N1", (1, 2, 5))
    yield _case_b(rng, "(2,2,4)-no-affine-eps0.1", (2, 2, 4), affine=False, eps=0.1)
    yield _case_b(rng, "(2,3,4)-weight-only", (2, 3, 4), bias=False)
    constant = rng.standard_normal((2, 3, 4))
    constant[0, 1] = 2.5
    yield _case_b(rng, "(2,3,4)-constant-instance", (2, 3, 4), x=constant)
    yield _case_b(rng, "(2,2,5)-mean100", (2, 2, 5), x=100.0 + rng.standard_normal((2, 2, 5)))


def oracle_inputs_b(rng):
    yield _case_b(rng, "(8,64,14,14)", (8, 64, 14, 14))
    yield _case_b(rng, "(3,37,9,11)", (3, 37, 9, 11))
    yield _case_b(rng, "(8,5,129)-mean1e4-std1e-3", (8, 5, 129),
                  x=1e4 + 1e-3 * rng.standard_normal((8, 5, 129)))


def error_inputs_b():
    x = np.ones((2, 3, 4))
    yield ErrorInput(SampleInput("list x", ([[[1.0]]], None, None), {}), TypeError,
                     r"ibn_b: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("2-d x", (np.ones((2, 3)), None, None), {}), ValueError,
                     r"ibn_b: `x` must have at least 3 dimensions")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2), None), {}), ValueError,
                     r"ibn_b: `weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(SampleInput("eps", (x, None, None), dict(eps=0.0)), ValueError,
                     r"ibn_b: `eps` must be > 0")


def _torch_call_b(torch, x, weight, bias, *, eps=1e-5):
    return torch.nn.functional.instance_norm(x, None, None, weight, bias, True, 0.1, eps)


SPEC_B = NormSpec(
    name="ibn_b",
    title="IBN-Net, IBN-b (affine InstanceNorm in the stem and after residual additions)",
    paper=_PAPER,
    forward=ibn_b_forward,
    backward=ibn_b_backward,
    op=ibn_b,
    composite=ibn_b_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs_b,
    oracle_inputs=oracle_inputs_b,
    error_inputs=error_inputs_b,
    invariances=("shift", "scale"),
    stats_axes=lambda s: tuple(range(2, s.arrays[0].ndim)),
    torch_equivalent="torch.nn.functional.instance_norm",
    torch_call=_torch_call_b,
    param_layout="channel",
    layer_init=lambda features: ({"weight": np.ones(features), "bias": np.zeros(features)},
                                 {}, {}),
)

r"""Batch-Channel Normalization (BCN): batch normalization, then group normalization.

Qiao, Wang, Liu, Shen, Yuille, *Micro-Batch Training with Batch-Channel Normalization and
Weight Standardization*, arXiv:1903.10520 (2019).

The input has shape :math:`(N, C, *)`. Three stages, as the authors' ``imagenet/models/
layers.py`` builds it (its ``BatchNorm2d`` factory returns this layer):

.. math::

   u = \mathrm{BN}(x;\ \gamma^{b}, \beta^{b}, \bar\mu, \bar\sigma^2),\qquad
   z = \mathrm{GN}_G(u)\ \text{(no affine)},\qquad
   y = w_g\,z + b_g ,

where BN is :func:`refnorm.norms.batch_norm.batch_norm_forward` (per-channel affine
:math:`\gamma^b, \beta^b`, the **estimated statistics** :math:`\bar\mu, \bar\sigma^2` kept as
explicit state and used in evaluation; momentum 0.1, eps 1e-5), GN is
:func:`refnorm.norms.group_norm.group_norm_forward` with :math:`G` groups (default 32) and the
same eps (batch statistics over each (sample, group), in training and evaluation alike), and
:math:`w, b` are **per group**, shape ``(G,)``: one scale and shift shared by the
:math:`C/G` channels of a group (unlike GroupNorm's per-channel affine), initialized to 1 and 0.

Backward (derivation: ``docs/derivations/batch_channel_norm.rst``): the chain of the stages,

.. math::

   \mathrm{d}w_g = \sum_{n,\,c\in g,\,*} \mathrm{d}y\,z,\qquad
   \mathrm{d}b_g = \sum_{n,\,c\in g,\,*} \mathrm{d}y,\qquad
   \mathrm{d}u = \mathrm{GN}^{*}(w_g\,\mathrm{d}y),\qquad
   (\mathrm{d}x, \mathrm{d}\gamma^b, \mathrm{d}\beta^b) = \mathrm{BN}^{*}(\mathrm{d}u),

:math:`\mathrm{GN}^*` and :math:`\mathrm{BN}^*` the two variants' hand-derived backwards
(standardization backward over each group, then over each channel).

Conventions: the official code's (above); state as in ``nn.BatchNorm`` (``running_mean``,
``running_var`` unbiased, ``num_batches_tracked``; ``momentum=None`` is a cumulative average).
Not implemented: the README's micro-batch ``EstBN`` (estimates moved at a speed ``r`` whose
schedule the sources do not give; catalogue ``formulas_vision_optim.md`` §6b). Computed in
float64 (``np.longdouble`` for longdouble input), rounded once to each input's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import check_array, check_num_groups, check_param, work_dtype
from refnorm.norms.batch_norm import (BatchNormState, _torch_call as _bn_torch_call,
                                      batch_norm_backward, batch_norm_composite,
                                      batch_norm_forward)
from refnorm.norms.group_norm import (group_norm_backward, group_norm_composite,
                                      group_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "batch_channel_norm"


class BatchChannelNormCache(NamedTuple):
    bn: object                 # the BatchNorm stage's cache
    gn: object                 # the GroupNorm stage's cache
    z: np.ndarray              # GN(u), work dtype
    w: np.ndarray | None       # per-group scale spread to (1, C, 1, ...), or None
    num_groups: int
    dtypes: tuple              # dtypes of x, bn_weight, bn_bias, weight, bias


class BatchChannelNormGrads(NamedTuple):
    dx: np.ndarray
    dbn_weight: np.ndarray | None
    dbn_bias: np.ndarray | None
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def _relabel(exc):
    """An error of an inner stage, named as this variant's (the argument names are shared)."""
    text = str(exc).split(": ", 1)[-1]
    return type(exc)(f"{_OP}: {text}")


def _spread(p, channels, ndim, groups):
    """A per-group ``(G,)`` parameter as a per-channel view ``(1, C, 1, ...)``."""
    return np.repeat(p, channels // groups).reshape((1, channels) + (1,) * (ndim - 2))


def batch_channel_norm_forward(x, running_mean, running_var, bn_weight=None, bn_bias=None,
                               weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                               num_groups=32, *, num_batches_tracked=0):
    r"""BCN: per-group affine of GroupNorm of BatchNorm; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(N, C, *)``
    running_mean, running_var : ndarray of shape (C,), or None
        The estimated statistics of the BN stage (explicit state; never modified).
    bn_weight, bn_bias : ndarray of shape (C,), optional
        The BN stage's affine :math:`\gamma^b, \beta^b`.
    weight, bias : ndarray of shape (G,), optional
        The per-group affine :math:`w, b`.
    training, momentum, eps, num_batches_tracked
        As :func:`refnorm.norms.batch_norm.batch_norm_forward`; ``eps`` is also the GN stage's.
    num_groups : int, default 32
        :math:`G`, a divisor of C.

    Returns
    -------
    y : ndarray, the shape and dtype of ``x``
    new_state : BatchNormState
    cache : BatchChannelNormCache
    """
    x = check_array(x, "x", _OP, ndim_min=2)
    c = x.shape[1]
    groups = check_num_groups(num_groups, c, _OP)
    bn_weight = check_param(bn_weight, "bn_weight", _OP, (c,))
    bn_bias = check_param(bn_bias, "bn_bias", _OP, (c,))
    weight = check_param(weight, "weight", _OP, (groups,))
    bias = check_param(bias, "bias", _OP, (groups,))
    work = work_dtype(x, bn_weight, bn_bias, weight, bias)

    def cast(a):
        return a.astype(work) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a

    try:
        u, state, bn_cache = batch_norm_forward(cast(x), running_mean, running_var,
                                                cast(bn_weight), cast(bn_bias), training,
                                                momentum, eps,
                                                num_batches_tracked=num_batches_tracked)
        z, gn_cache = group_norm_forward(u, groups, None, None, eps)
    except (TypeError, ValueError) as exc:
        raise _relabel(exc) from exc
    w = _spread(weight.astype(work), c, x.ndim, groups) if weight is not None else None
    y = z * w if w is not None else z
    if bias is not None:
        y = y + _spread(bias.astype(work), c, x.ndim, groups)
    dtypes = tuple(None if a is None else a.dtype for a in (x, bn_weight, bn_bias, weight, bias))
    cache = BatchChannelNormCache(bn_cache, gn_cache, z, w, groups, dtypes)
    return y.astype(x.dtype, copy=False), state, cache


def batch_channel_norm_backward(dy, cache):
    """Hand-derived VJP: the per-group affine, then GroupNorm's and BatchNorm's backwards."""
    bn_cache, gn_cache, z, w, groups, (x_dt, bw_dt, bb_dt, w_dt, b_dt) = cache
    g = dy.astype(z.dtype)
    n, c = z.shape[:2]

    def group_sum(a):
        return np.sum(a.reshape(n, groups, -1), axis=(0, 2)) if a.size else np.zeros(groups)

    dweight = group_sum(g * z).astype(w_dt) if w_dt is not None else None
    dbias = group_sum(g).astype(b_dt) if b_dt is not None else None
    du = group_norm_backward(g * w if w is not None else g, gn_cache).dx
    dx, dbn_weight, dbn_bias = batch_norm_backward(du, bn_cache)
    return BatchChannelNormGrads(
        dx.astype(x_dt, copy=False),
        None if dbn_weight is None else dbn_weight.astype(bw_dt),
        None if dbn_bias is None else dbn_bias.astype(bb_dt), dweight, dbias)


batch_channel_norm = custom_vjp(batch_channel_norm_forward, batch_channel_norm_backward,
                                ("x", "bn_weight", "bn_bias", "weight", "bias"), stateful=True)
batch_channel_norm.__doc__ = ("Differentiable batch-channel normalization (engine op): returns "
                              "``(y, new_state)``; see :func:`batch_channel_norm_forward`.")


def batch_channel_norm_composite(x, running_mean, running_var, bn_weight=None, bn_bias=None,
                                 weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                                 num_groups=32, *, num_batches_tracked=0):
    """The same math with engine primitives only (the BN and GN composites, the per-group
    affine by broadcasting over a (N, G, C/G * prod *) view)."""
    u, state = batch_norm_composite(x, running_mean, running_var, bn_weight, bn_bias, training,
                                    momentum, eps, num_batches_tracked=num_batches_tracked)
    z = group_norm_composite(u, num_groups, None, None, eps)
    n = x.shape[0]
    zg = ag.reshape(z, (n, num_groups, -1))
    if weight is not None:
        zg = zg * ag.reshape(weight, (1, num_groups, 1))
    if bias is not None:
        zg = zg + ag.reshape(bias, (1, num_groups, 1))
    return ag.reshape(zg, x.shape), state


def batch_channel_norm_layer_init(features, *, num_groups=32, momentum=0.1, eps=1e-5):
    """``(params, state, kwargs)`` as the official layer: BN affine 1 and 0, per-group affine 1
    and 0, running mean 0, running variance 1, counter 0."""
    params = {"bn_weight": np.ones(features), "bn_bias": np.zeros(features),
              "weight": np.ones(num_groups), "bias": np.zeros(num_groups)}
    state = {"running_mean": np.zeros(features), "running_var": np.ones(features),
             "num_batches_tracked": np.asarray(0, dtype=np.int64)}
    return params, state, {"num_groups": num_groups, "momentum": momentum, "eps": eps}


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, groups, *, x=None, training=True, running=True, affine=True,
          bn_affine=True, **kwargs):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    bw = 1.0 + 0.3 * rng.standard_normal(c) if bn_affine else None
    bb = 0.3 * rng.standard_normal(c) if bn_affine else None
    w = 1.0 + 0.3 * rng.standard_normal(groups) if affine else None
    b = 0.3 * rng.standard_normal(groups) if affine else None
    rm = rng.standard_normal(c) if running else None
    rv = rng.uniform(0.5, 2.0, c) if running else None
    return SampleInput(name, (x, bw, bb, w, b), dict(running_mean=rm, running_var=rv,
                                                     training=training, num_groups=groups,
                                                     **kwargs))


def sample_inputs(rng):
    yield _case(rng, "(4,4,2,2)-G2", (4, 4, 2, 2), 2)
    yield _case(rng, "(3,6,5)-G3", (3, 6, 5), 3)
    yield _case(rng, "(3,4,2,3)-G2-eval", (3, 4, 2, 3), 2, training=False)
    yield _case(rng, "(1,4,3,3)-N1-eval-G2", (1, 4, 3, 3), 2, training=False)
    yield _case(rng, "(2,4,3)-G1-momentum-None-t3", (2, 4, 3), 1, momentum=None,
                num_batches_tracked=3)
    yield _case(rng, "(3,4,3)-no-running-stats", (3, 4, 3), 2, running=False)
    yield _case(rng, "(3,4,3)-no-affine", (3, 4, 3), 2, affine=False, bn_affine=False)
    constant = rng.standard_normal((3, 4, 3))
    constant[:, 0] = 0.7
    yield _case(rng, "(3,4,3)-constant-channel", (3, 4, 3), 2, x=constant)
    yield _case(rng, "(3,4,3)-mean100", (3, 4, 3), 2, x=100.0 + rng.standard_normal((3, 4, 3)))


def oracle_inputs(rng):
    yield _case(rng, "(8,64,13,11)-G32", (8, 64, 13, 11), 32)
    yield _case(rng, "(3,30,7,9)-G5", (3, 30, 7, 9), 5)
    yield _case(rng, "(8,64,9,9)-G32-eval", (8, 64, 9, 9), 32, training=False)
    yield _case(rng, "(4,6,9,9)-mean1e4-std1e-3", (4, 6, 9, 9), 3,
                x=1e4 + 1e-3 * rng.standard_normal((4, 6, 9, 9)))
    yield _case(rng, "(3,10,33)-tiny-scale", (3, 10, 33), 5,
                x=1e-20 * rng.standard_normal((3, 10, 33)))


def error_inputs():
    x, c = np.ones((2, 4, 3)), np.ones(4)

    def call(name, x=x, weight=None, **kwargs):
        return SampleInput(name, (x, None, None, weight, None),
                           {"running_mean": c.copy(), "running_var": c.copy(), "num_groups": 2,
                            **kwargs})

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError,
                     r"batch_channel_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(call("1-d x", x=np.ones(3)), ValueError,
                     r"`x` must have at least 2 dimensions")
    yield ErrorInput(call("groups", num_groups=3), ValueError,
                     r"`num_groups` must be a positive divisor")
    yield ErrorInput(call("per-channel weight", weight=np.ones(4)), ValueError,
                     r"`weight` must have shape \(2,\), got \(4,\)")
    yield ErrorInput(call("running_var shape", running_var=np.ones(3)), ValueError,
                     r"batch_channel_norm: `running_var` must have shape \(4,\)")
    yield ErrorInput(call("eps", eps=-1.0), ValueError,
                     r"batch_channel_norm: `eps` must be a finite number >= 0")
    yield ErrorInput(call("training", training="yes"), TypeError,
                     r"batch_channel_norm: `training` must be a bool")


def _torch_call(torch, x, bn_weight, bn_bias, weight, bias, *, running_mean, running_var,
                training=False, momentum=0.1, eps=1e-5, num_groups=32, num_batches_tracked=0):
    """The official layer's computation: ``nn.BatchNorm2d``'s ``F.batch_norm``, then
    ``F.group_norm`` without affine, then the per-group affine on a (N, G, -1) view."""
    u, state = _bn_torch_call(torch, x, bn_weight, bn_bias, running_mean=running_mean,
                              running_var=running_var, training=training, momentum=momentum,
                              eps=eps, num_batches_tracked=num_batches_tracked)
    z = torch.nn.functional.group_norm(u, num_groups, None, None, eps)
    zg = z.reshape(x.shape[0], num_groups, -1)
    if weight is not None:
        zg = zg * weight.reshape(1, -1, 1)
    if bias is not None:
        zg = zg + bias.reshape(1, -1, 1)
    return zg.reshape(x.shape), state


SPEC = NormSpec(
    name=_OP,
    title="Batch-Channel Normalization",
    paper=Paper("Micro-Batch Training with Batch-Channel Normalization and Weight "
                "Standardization", "Qiao, Wang, Liu, Shen, Yuille", 2019, "arXiv:1903.10520"),
    forward=batch_channel_norm_forward,
    backward=batch_channel_norm_backward,
    op=batch_channel_norm,
    composite=batch_channel_norm_composite,
    diff_argnames=("x", "bn_weight", "bn_bias", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    torch_call=_torch_call,
    layer_init=batch_channel_norm_layer_init,
)

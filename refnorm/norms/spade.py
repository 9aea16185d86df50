r"""SPADE: spatially-adaptive (de)normalization.

Park, Liu, Wang & Zhu, *Semantic Image Synthesis with Spatially-Adaptive Normalization*,
CVPR 2019, arXiv:1903.07291. Official code: NVlabs/SPADE, ``models/networks/normalization.py``
(``SPADE``).

An input of shape :math:`(N, C, H, W)` is normalized by a parameter-free BatchNorm and modulated
by per-pixel, per-channel maps computed from a segmentation map :math:`m` (``segmap``, shape
:math:`(N, L, H', W')`, nearest-resized to :math:`H \times W`) by a small convolutional network
(:math:`k \times k` convolutions with padding :math:`k // 2`, :math:`h` hidden channels):

.. math::

   \hat x = \mathrm{BN}(x)\ \ (\text{no affine}),\qquad
   a = \mathrm{ReLU}(W_s * m + b_s),\qquad
   \gamma = W_\gamma * a + b_\gamma,\qquad \beta = W_\beta * a + b_\beta,\\
   y = \hat x\,(1+\gamma) + \beta .

BatchNorm's conventions hold for :math:`\hat x` (batch statistics in training with an update of
the running ones, the running statistics in evaluation; :mod:`refnorm.norms.batch_norm`). The
segmentation map is not differentiated. With the six convolution parameters None there is no
modulation and SPADE is the parameter-free BatchNorm (a test checks it).

Backward (derivation: ``docs/derivations/spade.rst``):

.. math::

   \frac{\partial L}{\partial\hat x} = \mathrm{d}y\,(1+\gamma),\quad
   \bar\gamma = \mathrm{d}y\,\hat x,\quad \bar\beta = \mathrm{d}y,\quad
   \bar a = W_\gamma\star^\top\bar\gamma + W_\beta\star^\top\bar\beta,\quad
   \bar z = \bar a\,1[z > 0]\ \ (z = W_s * m + b_s),

then the convolutions' weight gradients (:func:`refnorm.norms._spatial.conv2d_backward`) and
BatchNorm's backward of :math:`\partial L/\partial\hat x` for :math:`\mathrm{d}x`.

Conventions, as the official code: the default ``spadesyncbatch3x3`` (SyncBatchNorm, identical
to BatchNorm on one process, ``eps = 1e-5``, ``momentum = 0.1``; :math:`k = 3`), ``nhidden =
128`` (here the shape of ``shared_weight``), ReLU after the shared convolution, biases in all
three convolutions; at initialization (``layer_init``) the convolution weights are
Xavier-normal with gain 0.02 and the biases 0 (``init_type='xavier'``,
``init_variance=0.02``). The official ``spadeinstance`` variant (InstanceNorm as the
parameter-free norm) is not implemented here. The modulation is computed in float64 at least.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._spatial import conv2d, conv2d_backward, nearest_resize
from refnorm.norms._stats import check_array, check_param, errors_as
from refnorm.norms.batch_norm import (_torch_call as _bn_torch_call,
                                      batch_norm_backward, batch_norm_composite,
                                      batch_norm_forward)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_OP = "spade"
_NAMES = ("shared_weight", "shared_bias", "gamma_weight", "gamma_bias", "beta_weight",
          "beta_bias")


class SpadeCache(NamedTuple):
    bn: object                      # BatchNorm's cache (no affine)
    nhat: np.ndarray | None         # \hat x in the modulation dtype, or None (no modulation)
    seg: np.ndarray | None          # the resized segmentation map
    pre: np.ndarray | None          # z = W_s * m + b_s
    act: np.ndarray | None          # a = ReLU(z)
    gamma: np.ndarray | None        # the gamma maps, (N, C, H, W)
    params: tuple                   # the six convolution parameters as given
    padding: int
    x_dtype: np.dtype

    mean = property(lambda self: self.bn.mean)
    rstd = property(lambda self: self.bn.rstd)
    xhat = property(lambda self: self.bn.xhat)

    def oracle_affine(self):
        """``(G, B)`` of ``y = G xhat + B`` per element (for the oracle's tolerance model)."""
        if self.gamma is None:
            return 1.0, 0.0
        pad = self.padding
        beta = conv2d(self.act, *(p.astype(np.float64) for p in self.params[4:]), pad)
        sw, sb, gw, gb, bw, bb = (np.abs(p.astype(np.float64)) for p in self.params)
        # magnitudes of the sums behind the maps, the shared layer's rounding carried through
        m_act = conv2d(np.abs(self.seg), sw, sb, pad)
        mg = conv2d(np.abs(self.act) + m_act, gw, gb, pad)
        mb = conv2d(np.abs(self.act) + m_act, bw, bb, pad)
        return 1 + self.gamma, beta, mg, mb, gw[0].size + sw[0].size

    def oracle_param_terms(self, ady, dxh, mid, u, growth):
        """First-order terms ``{dname: (A, I)}`` of the convolution parameters' gradients: the
        error ``dxh`` of xhat through gamma's map (dy xhat), the absolute transposed
        convolutions and the ReLU's mask, plus each convolution's own sums."""
        if self.gamma is None:
            return {}
        sw, _, gw, _, bw, _ = (np.abs(p.astype(np.float64)) for p in self.params)
        pad, act, seg = self.padding, np.abs(self.act), np.abs(self.seg)
        g = float(growth(ady.size // max(ady.shape[1], 1) * gw.shape[1]))
        a_gmap = ady * dxh
        m_gmap = ady * (np.abs(self.nhat) + mid)
        out = {}
        for name, amap, mmap, w in (("gamma", a_gmap, m_gmap, gw), ("beta", 0 * ady, ady, bw)):
            _, aw, ab = conv2d_backward(amap, act, w, pad, need_dx=False)
            _, mw, mb = conv2d_backward(mmap, act, w, pad, need_dx=False)
            out["d" + name + "_weight"] = (aw + u * g * mw, (g + 1) * mw)
            out["d" + name + "_bias"] = (ab + u * g * mb, (g + 1) * mb)
        on = (self.pre > 0).astype(np.float64)
        a_act = conv2d_backward(a_gmap, act, gw, pad)[0] * on
        m_act = (conv2d_backward(m_gmap, act, gw, pad)[0]
                 + conv2d_backward(ady, act, bw, pad)[0]) * on
        _, aw, ab = conv2d_backward(a_act + u * g * m_act, seg, sw, pad, need_dx=False)
        _, mw, mb = conv2d_backward(m_act, seg, sw, pad, need_dx=False)
        out["dshared_weight"] = (aw + u * g * mw, (g + 1) * mw)
        out["dshared_bias"] = (ab + u * g * mb, (g + 1) * mb)
        return out


class SpadeGrads(NamedTuple):
    dx: np.ndarray
    dshared_weight: np.ndarray | None
    dshared_bias: np.ndarray | None
    dgamma_weight: np.ndarray | None
    dgamma_bias: np.ndarray | None
    dbeta_weight: np.ndarray | None
    dbeta_bias: np.ndarray | None


def _check_params(x, segmap, params):
    """The six convolution parameters: all None, or all given with consistent shapes."""
    given = [p is not None for p in params]
    if not any(given):
        return params, None
    if not all(given):
        raise TypeError(f"{_OP}: the convolution parameters {', '.join(_NAMES)} must all be "
                        f"given, or all be None (no modulation)")
    sw = check_array(params[0], "shared_weight", _OP)
    labels = segmap.shape[1]
    if sw.ndim != 4 or sw.shape[1] != labels or sw.shape[2] != sw.shape[3] or sw.shape[2] % 2 \
            == 0:
        raise ValueError(f"{_OP}: `shared_weight` must have shape (nhidden, {labels}, k, k) "
                         f"with k odd ({labels} = the channels of `segmap`), got {sw.shape}")
    hidden, k, c = sw.shape[0], sw.shape[2], x.shape[1]
    out = (sw, check_param(params[1], "shared_bias", _OP, (hidden,)),
           check_param(params[2], "gamma_weight", _OP, (c, hidden, k, k)),
           check_param(params[3], "gamma_bias", _OP, (c,)),
           check_param(params[4], "beta_weight", _OP, (c, hidden, k, k)),
           check_param(params[5], "beta_bias", _OP, (c,)))
    for name, p in zip(_NAMES, out):
        if not np.isfinite(p).all():  # an infinite weight switches a ReLU on or off by a
            #                           limit: the modulation is then not a function of it
            raise ValueError(f"{_OP}: `{name}` must be finite (a convolution parameter of the "
                             f"modulation network), got a NaN or an infinity")
    return out, k // 2


def spade_forward(x, shared_weight=None, shared_bias=None, gamma_weight=None, gamma_bias=None,
                  beta_weight=None, beta_bias=None, running_mean=None, running_var=None,
                  training=False, momentum=0.1, eps=1e-5, *, segmap, num_batches_tracked=0):
    r"""SPADE; returns ``(y, new_state, cache)``.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    shared_weight, shared_bias : ndarray (h, L, k, k) and (h,), optional
        The shared convolution (followed by ReLU), :math:`W_s, b_s`.
    gamma_weight, gamma_bias, beta_weight, beta_bias : ndarray (C, h, k, k) and (C,), optional
        :math:`W_\gamma, b_\gamma, W_\beta, b_\beta`. All six None: no modulation.
    running_mean, running_var, training, momentum, eps, num_batches_tracked
        The parameter-free BatchNorm's (:func:`~refnorm.norms.batch_norm.batch_norm_forward`).
    segmap : ndarray of shape (N, L, H', W'), keyword-only
        The segmentation map (one-hot labels), not differentiated; resized (nearest) to H x W.
        It must be finite (a NaN label has no meaning; ValueError), and so must the six
        convolution parameters (an infinite weight turns a ReLU on or off by a limit).
    """
    with errors_as(_OP, "batch_norm"):
        x = check_array(x, "x", _OP)
        if x.ndim != 4:
            raise ValueError(f"{_OP}: `x` must be 4-D (N, C, H, W), got shape {x.shape}")
        segmap = check_array(segmap, "segmap", _OP)
        if segmap.ndim != 4 or segmap.shape[0] != x.shape[0] or 0 in segmap.shape[1:]:
            raise ValueError(f"{_OP}: `segmap` must have shape (N, L, H', W') with N = "
                             f"{x.shape[0]} and L, H', W' > 0, got {segmap.shape}")
        if not np.isfinite(segmap).all():
            raise ValueError(f"{_OP}: `segmap` must be finite (a label map), got a NaN or an "
                             f"infinity")
        params, pad = _check_params(x, segmap, (shared_weight, shared_bias, gamma_weight,
                                                gamma_bias, beta_weight, beta_bias))
        nhat, state, bn = batch_norm_forward(x, running_mean, running_var, None, None, training,
                                             momentum, eps,
                                             num_batches_tracked=num_batches_tracked)
    if pad is None:
        return nhat, state, SpadeCache(bn, None, None, None, None, None, params, 0, x.dtype)
    acc = np.promote_types(x.dtype, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        seg = nearest_resize(segmap, x.shape[2:]).astype(acc)
        sw, sb, gw, gb, bw, bb = (p.astype(acc) for p in params)
        pre = conv2d(seg, sw, sb, pad)
        act = np.maximum(pre, 0)           # NaN stays NaN
        gamma = conv2d(act, gw, gb, pad)
        beta = conv2d(act, bw, bb, pad)
        n64 = nhat.astype(acc)
        y = n64 * (1 + gamma) + beta
    return y.astype(x.dtype), state, SpadeCache(bn, n64, seg, pre, act, gamma, params, pad,
                                                x.dtype)


def spade_backward(dy, cache):
    """Hand-derived VJP of :func:`spade_forward`."""
    bn, nhat, seg, pre, act, gamma, params, pad, x_dtype = cache
    if gamma is None:
        return SpadeGrads(batch_norm_backward(dy, bn).dx, *(None,) * 6)
    sw, _, gw, _, bw, _ = (p.astype(act.dtype) for p in params)
    dy = dy.astype(act.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        dx = batch_norm_backward(dy * (1 + gamma), bn).dx
        da1, dgw, dgb = conv2d_backward(dy * nhat, act, gw, pad)
        da2, dbw, dbb = conv2d_backward(dy, act, bw, pad)
        # the ReLU's mask, as the engine's rule: a unit that is off (or NaN) passes nothing,
        # not even a NaN of the upstream (np.where, not a product)
        dpre = np.where(pre > 0, da1 + da2, 0.0)
        _, dsw, dsb = conv2d_backward(dpre, seg, sw, pad, need_dx=False)
    grads = (dsw, dsb, dgw, dgb, dbw, dbb)
    return SpadeGrads(dx.astype(x_dtype, copy=False),
                      *(g.astype(p.dtype) for g, p in zip(grads, params)))


spade = custom_vjp(spade_forward, spade_backward, ("x",) + _NAMES, stateful=True)
spade.__doc__ = """Differentiable SPADE (engine op): returns ``(y, new_state)``; see
:func:`spade_forward`."""


def spade_composite(x, shared_weight=None, shared_bias=None, gamma_weight=None, gamma_bias=None,
                    beta_weight=None, beta_bias=None, running_mean=None, running_var=None,
                    training=False, momentum=0.1, eps=1e-5, *, segmap, num_batches_tracked=0):
    """The same math with engine primitives: BatchNorm's composite and the engine's
    ``conv2d`` and ``relu``."""
    nhat, state = batch_norm_composite(x, running_mean, running_var, None, None, training,
                                       momentum, eps, num_batches_tracked=num_batches_tracked)
    if shared_weight is None:
        return nhat, state
    pad = shared_weight.shape[2] // 2
    seg = nearest_resize(segmap, x.shape[2:])
    act = ag.relu(ag.conv2d(seg, shared_weight, shared_bias, padding=pad))
    gamma = ag.conv2d(act, gamma_weight, gamma_bias, padding=pad)
    beta = ag.conv2d(act, beta_weight, beta_bias, padding=pad)
    return nhat * (1 + gamma) + beta, state


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _segmap(rng, n, labels, h, w):
    return np.eye(labels)[rng.integers(0, labels, (n, h, w))].transpose(0, 3, 1, 2).copy()


def _case(rng, name, shape, *, labels=3, hidden=4, k=3, seg_size=None, modulated=True,
          training=True, running=True, momentum=0.1, eps=1e-5, x=None):
    x = rng.standard_normal(shape) if x is None else x
    n, c, h, w = shape
    seg = _segmap(rng, n, labels, *(seg_size or (h, w)))
    if modulated:
        params = (0.5 * rng.standard_normal((hidden, labels, k, k)),
                  0.5 * rng.standard_normal(hidden),
                  0.3 * rng.standard_normal((c, hidden, k, k)), 0.3 * rng.standard_normal(c),
                  0.3 * rng.standard_normal((c, hidden, k, k)), 0.3 * rng.standard_normal(c))
    else:
        params = (None,) * 6
    return SampleInput(name, (x,) + params, dict(
        running_mean=rng.standard_normal(c) if running else None,
        running_var=rng.uniform(0.5, 2.0, c) if running else None, training=training,
        momentum=momentum, eps=eps, segmap=seg))


def sample_inputs(rng):
    yield _case(rng, "(2,3,4,4)-train", (2, 3, 4, 4))
    yield _case(rng, "(2,2,3,5)-eval", (2, 2, 3, 5), training=False)
    yield _case(rng, "(1,2,4,4)-N1-segmap-8x8", (1, 2, 4, 4), seg_size=(8, 8))
    yield _case(rng, "(2,2,5,5)-k5-no-running-stats", (2, 2, 5, 5), k=5, running=False)
    yield _case(rng, "(3,2,3,3)-no-modulation", (3, 2, 3, 3), modulated=False)
    constant = rng.standard_normal((2, 2, 3, 4))
    constant[:, 1] = 0.5
    yield _case(rng, "(2,2,3,4)-constant-channel", (2, 2, 3, 4), x=constant)
    yield _case(rng, "(2,2,3,4)-mean100", (2, 2, 3, 4),
                x=100.0 + rng.standard_normal((2, 2, 3, 4)))


def oracle_inputs(rng):
    yield _case(rng, "(4,16,16,16)-h32-segmap-32x32", (4, 16, 16, 16), labels=5, hidden=32,
                seg_size=(32, 32))
    yield _case(rng, "(3,7,9,11)-eval", (3, 7, 9, 11), training=False)
    yield _case(rng, "(2,5,9,9)-mean1e4-std1e-3", (2, 5, 9, 9),
                x=1e4 + 1e-3 * rng.standard_normal((2, 5, 9, 9)))


def error_inputs():
    rng = np.random.default_rng(0)
    base = _case(rng, "base", (2, 3, 4, 4))
    x, *params = base.arrays

    def call(name, arrays=None, **kwargs):
        return SampleInput(name, tuple(base.arrays if arrays is None else arrays),
                           {**base.kwargs, **kwargs})

    yield ErrorInput(call("list x", ([[1.0]],) + tuple(params)), TypeError,
                     r"spade: `x` must be a numpy.ndarray")
    yield ErrorInput(call("3-d x", (np.ones((2, 3, 4)),) + tuple(params)), ValueError,
                     r"spade: `x` must be 4-D")
    yield ErrorInput(call("segmap batch", segmap=np.ones((1, 3, 4, 4))), ValueError,
                     r"spade: `segmap` must have shape \(N, L, H', W'\) with N = 2")
    yield ErrorInput(call("segmap labels", segmap=np.ones((2, 2, 4, 4))), ValueError,
                     r"spade: `shared_weight` must have shape \(nhidden, 2, k, k\)")
    yield ErrorInput(call("some params", (x, params[0], None) + tuple(params[2:])), TypeError,
                     r"spade: the convolution parameters .* must all be given")
    bad = list(params)
    bad[2] = np.ones((3, 4, 5, 5))
    yield ErrorInput(call("gamma kernel", (x,) + tuple(bad)), ValueError,
                     r"spade: `gamma_weight` must have shape \(3, 4, 3, 3\)")
    nan_map = base.kwargs["segmap"].copy()
    nan_map[0, 0, 0, 0] = np.nan
    yield ErrorInput(call("segmap NaN", segmap=nan_map), ValueError,
                     r"spade: `segmap` must be finite")
    yield ErrorInput(call("eps 0", eps=0.0), ValueError,
                     r"spade: `eps` must be > 0 when batch statistics are used")


def _torch_call(torch, x, shared_weight, shared_bias, gamma_weight, gamma_bias, beta_weight,
                beta_bias, *, segmap, running_mean=None, running_var=None, training=False,
                momentum=0.1, eps=1e-5, num_batches_tracked=0):
    """The official ``SPADE.forward`` from torch ops: ``F.batch_norm`` (affine-free, driven as
    ``nn.BatchNorm2d``), ``F.interpolate(mode="nearest")``, ``F.conv2d``, ``F.relu``; the
    modulation in float32 at least."""
    F = torch.nn.functional
    nhat, state = _bn_torch_call(torch, x, None, None, running_mean=running_mean,
                                 running_var=running_var, training=training, momentum=momentum,
                                 eps=eps, num_batches_tracked=num_batches_tracked)
    if shared_weight is None:
        return nhat, state
    acc = torch.promote_types(x.dtype, torch.float32)
    pad = shared_weight.shape[2] // 2
    seg = torch.as_tensor(segmap).to(device=x.device, dtype=acc)
    seg = F.interpolate(seg, size=tuple(x.shape[2:]), mode="nearest")
    act = F.relu(F.conv2d(seg, shared_weight.to(acc), shared_bias.to(acc), padding=pad))
    gamma = F.conv2d(act, gamma_weight.to(acc), gamma_bias.to(acc), padding=pad)
    beta = F.conv2d(act, beta_weight.to(acc), beta_bias.to(acc), padding=pad)
    return (nhat.to(acc) * (1 + gamma) + beta).to(x.dtype), state


def _stats_axes(sample):
    """BatchNorm's axes where it uses batch statistics (the output without the modulation is
    standardized there); None in evaluation with running statistics."""
    kw = sample.kwargs
    if kw.get("training", False) or kw.get("running_mean") is None:
        return (0, 2, 3)
    return None


def _layer_init(features, label_nc, nhidden=128, kernel_size=3, rng=None):
    """The official initialization: Xavier-normal weights with gain 0.02, zero biases."""
    rng = np.random.default_rng() if rng is None else rng
    k = kernel_size

    def xavier(o, i):
        std = 0.02 * np.sqrt(2.0 / ((i + o) * k * k))
        return std * rng.standard_normal((o, i, k, k))

    return ({"shared_weight": xavier(nhidden, label_nc), "shared_bias": np.zeros(nhidden),
             "gamma_weight": xavier(features, nhidden), "gamma_bias": np.zeros(features),
             "beta_weight": xavier(features, nhidden), "beta_bias": np.zeros(features)},
            {"running_mean": np.zeros(features), "running_var": np.ones(features),
             "num_batches_tracked": np.asarray(0, np.int64)}, {})


SPEC = NormSpec(
    name="spade",
    title="SPADE: spatially-adaptive normalization",
    paper=Paper("Semantic Image Synthesis with Spatially-Adaptive Normalization",
                "Park, Liu, Wang, Zhu", 2019, "arXiv:1903.07291 (CVPR 2019)"),
    forward=spade_forward,
    backward=spade_backward,
    op=spade,
    composite=spade_composite,
    diff_argnames=("x",) + _NAMES,
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    stateful=True,
    train_eval_differ=True,
    nondiff_args=("segmap",),
    invariances=("shift", "scale"),
    stats_axes=_stats_axes,
    torch_equivalent=None,
    torch_call=_torch_call,
    param_layout=None,
    layer_init=_layer_init,
)

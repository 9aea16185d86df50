r"""Region Normalization: RN-B (a given mask) and RN-L (a learned mask).

Yu, Guo, Jin, Wu, Chen, Li, Zhang & Liu, *Region Normalization for Image Inpainting*, AAAI 2020,
arXiv:1911.10375. Official code: geekyutao/RN, ``rn.py`` (``RN_binarylabel``, ``RN_B``,
``SelfAware_Affine``, ``RN_L``).

**Region normalization.** An input of shape :math:`(N, C, H, W)` is split by a binary mask
:math:`m` (1 marks a hole, the *foreground*) into two regions, :math:`m` and :math:`1-m`. Each
region is normalized per channel :math:`c` over its own pixels (of all the samples),
:math:`S_r` of them among :math:`N_{tot} = NHW`:

.. math::

   \mu_{rc} = \frac{1}{S_r}\sum_{r} x,\qquad
   \sigma^2_{rc} = \frac{1}{S_r}\sum_{r}(x-\mu_{rc})^2,\qquad
   \hat x = (x-\mu_{rc})\,\bigl(\sigma^2_{rc} + \epsilon\,N_{tot}/S_r\bigr)^{-1/2}
   \ \text{ on region } r .

This is what the official code computes by filling the outside of a region with its mean,
applying a parameter-free BatchNorm with batch statistics (also in evaluation) and rescaling by
:math:`\sqrt{S_r/N_{tot}}`: hence the **effective epsilon** :math:`\epsilon N_{tot}/S_r`, larger
for smaller regions. An empty region contributes nothing (the code sets :math:`S_r := 1`).

**RN-B** normalizes with the (nearest-resized) input hole mask and adds a per-region affine:

.. math::

   y = \hat x\,m\,(1+\gamma^f_c) + \hat x\,(1-m)\,(1+\gamma^b_c) + \beta^f_c + \beta^b_c .

The parameters start at 0. **Code quirk, reproduced**: :math:`\beta^f` and :math:`\beta^b` are not
masked, so every pixel gets both (the paper has a per-region shift).

**RN-L** learns the mask from :math:`x` (``SelfAware_Affine``), with :math:`k \times k`
convolutions (:math:`k` = 7 by default, 3 allowed; padding :math:`k // 2`):

.. math::

   a = [\langle x\rangle_C;\ \max_C x],\qquad
   s = \mathrm{sigmoid}(w_s * a),\qquad
   \gamma = w_\gamma * s + b_\gamma,\qquad \beta = w_\beta * s + b_\beta,\\
   m = 1[s \ge \tau]\ \ (\text{no gradient}),\qquad y = \hat x(m)\,(1+\gamma) + \beta ,

:math:`\tau` = ``threshold`` (0.8), :math:`\gamma, \beta` maps of shape :math:`(N, 1, H, W)`
broadcast over the channels.

Backward (derivation: ``docs/derivations/region_norm.rst``). Within each region and channel the
standardization backward with the region's :math:`r_{rc}`:
:math:`\mathrm{d}x = r\,(g - \langle g\rangle_r - \hat x\,\langle g\,\hat x\rangle_r)`, with
:math:`g = (1+\gamma)\,\mathrm{d}y` (the region's :math:`1+\gamma^{f|b}_c` for RN-B, the map for
RN-L); the mask has no gradient. RN-B:
:math:`\mathrm{d}\gamma^f_c = \sum \mathrm{d}y\,\hat x\,m`,
:math:`\mathrm{d}\gamma^b_c = \sum\mathrm{d}y\,\hat x\,(1-m)`,
:math:`\mathrm{d}\beta^f_c = \mathrm{d}\beta^b_c = \sum\mathrm{d}y` (over all pixels). RN-L adds
the importance-map branch: :math:`\mathrm{d}\gamma = \sum_c \mathrm{d}y\,\hat x`,
:math:`\mathrm{d}\beta = \sum_c\mathrm{d}y`, back through the two convolutions, the sigmoid
(:math:`s(1-s)`), the first convolution, and into :math:`x` through the channel mean
(:math:`1/C` each) and the channel max (all to the first maximal channel, as ``torch.max``).
Where the importance map is NaN the region of that pixel, hence every region statistic, is
undefined: the output is then NaN everywhere (a NaN is never turned into a mask value).

Conventions, as the official code: ``eps = 1e-5``, biased region variance, the mask's 1 marks
the hole (foreground), ``threshold = 0.8``; the statistics are always those of the batch (the
code's BatchNorm has ``track_running_stats=False``). The mask is a **boolean** (or 0/1)
array of shape :math:`(N, 1, H', W')` or :math:`(N, C, H', W')`, resized to :math:`H \times W`
by PyTorch's nearest rule if it differs (as ``RN_B.forward`` does). Computations are in float64
at least (so that RN-L's mask, a threshold of a computed map, is decided as in the reference);
a float64 call whose values are tiny or huge (:func:`refnorm.norms._stats.out_of_range`: the
squares of values near :math:`10^{155}` overflow) is computed whole in the wider
``np.longdouble`` and rounded once (the module docstring of ``_stats``).
``eps`` must be > 0 (a constant region would divide 0 by 0).
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._spatial import conv2d, conv2d_backward, nearest_resize
from refnorm.norms._stats import (WideCache, _finite_float, check_array, check_eps, check_param,
                                  narrow, out_of_range, wider_dtype, widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

_PAPER = Paper("Region Normalization for Image Inpainting",
               "Yu, Guo, Jin, Wu, Chen, Li, Zhang, Liu", 2020, "arXiv:1911.10375 (AAAI 2020)")


# ----------------------------------------------------------------------------------------------
# the region normalization shared by RN-B and RN-L
# ----------------------------------------------------------------------------------------------
class RegionStats(NamedTuple):
    xhat: np.ndarray       # (N, C, H, W), 0 nowhere: every pixel is in one region
    fg: np.ndarray         # bool (N, 1|C, H, W): the foreground (mask = 1)
    mean: np.ndarray       # (2, C): foreground, background
    rstd: np.ndarray       # (2, C), with the effective epsilon
    count: np.ndarray      # (2, C): S_r (0 for an empty region)


def region_standardize(x, fg, eps):
    r"""Region statistics and :math:`\hat x` of ``x`` (N, C, H, W) for the boolean foreground
    ``fg`` (broadcastable to x), each region per channel with :math:`\epsilon N_{tot}/S_r`;
    two-pass with a correction pass (:mod:`refnorm.norms._stats`)."""
    n, c, h, w = x.shape
    total = n * h * w
    xhat = np.zeros_like(x)
    mean, rstd, count = (np.zeros((2, c), x.dtype) for _ in range(3))
    for k, region in enumerate((fg, ~fg)):
        region = np.broadcast_to(region, x.shape)
        s = region.sum(axis=(0, 2, 3)).astype(x.dtype)
        s1 = np.maximum(s, 1)
        m0 = np.where(region, x, 0).sum(axis=(0, 2, 3)) / s1
        d = np.where(region, x - m0.reshape(1, c, 1, 1), 0)
        corr = d.sum(axis=(0, 2, 3)) / s1
        d = np.where(region, d - corr.reshape(1, c, 1, 1), 0)
        var = np.square(d).sum(axis=(0, 2, 3)) / s1
        r = 1.0 / np.sqrt(var + eps * total / s1)
        xhat += d * r.reshape(1, c, 1, 1)
        mean[k], rstd[k], count[k] = m0 + corr, r, s
    return RegionStats(xhat, fg, mean, rstd, count)


def region_standardize_backward(g, stats):
    """``dx`` of :func:`region_standardize` for the upstream ``g`` (the mask is a constant)."""
    xhat, fg = stats.xhat, stats.fg
    dx = np.zeros_like(xhat)
    c = xhat.shape[1]
    for k, region in enumerate((fg, ~fg)):
        region = np.broadcast_to(region, xhat.shape)
        s1 = np.maximum(stats.count[k], 1).reshape(1, c, 1, 1)
        gr = np.where(region, g, 0)
        mean_g = gr.sum(axis=(0, 2, 3), keepdims=True) / s1
        mean_gx = (gr * xhat).sum(axis=(0, 2, 3), keepdims=True) / s1
        dx += np.where(region, stats.rstd[k].reshape(1, c, 1, 1)
                       * (g - mean_g - xhat * mean_gx), 0)
    return dx


def _region_composite(x, fg, eps):
    """Region normalization with engine primitives (the mask a constant)."""
    n, c, h, w = x.shape
    out = None
    for region in (fg, ~fg):
        r = np.broadcast_to(region, x.shape).astype(x.dtype)
        s = np.maximum(r.sum(axis=(0, 2, 3), keepdims=True), 1)
        mu = ag.sum(x * r, (0, 2, 3), keepdims=True) / s
        xc = (x - mu) * r
        var = ag.sum(xc * xc, (0, 2, 3), keepdims=True) / s
        part = xc / ag.sqrt(var + eps * n * h * w / s)
        out = part if out is None else out + part
    return out


def _check_mask(mask, x, op):
    """The mask as a boolean array broadcastable to x, resized to x's H x W."""
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "biuf":
        raise TypeError(f"{op}: `mask` must be a numpy.ndarray of bools (or 0 and 1), got "
                        f"{type(mask).__name__}")
    mask = np.asarray(mask)
    if mask.ndim != 4 or mask.shape[0] != x.shape[0] or mask.shape[1] not in (1, x.shape[1]) \
            or 0 in mask.shape[2:]:
        raise ValueError(f"{op}: `mask` must have shape (N, 1, H', W') or (N, C, H', W') with "
                         f"N, C of `x` {x.shape}, got {mask.shape}")
    if mask.dtype.kind != "b":
        with np.errstate(invalid="ignore"):
            if not np.all((mask == 0) | (mask == 1)):
                raise ValueError(f"{op}: `mask` must hold only 0 and 1")
        mask = mask == 1
    return nearest_resize(mask, x.shape[2:])


def _check_x(x, op):
    x = check_array(x, "x", op)
    if x.ndim != 4:
        raise ValueError(f"{op}: `x` must be 4-D (N, C, H, W), got shape {x.shape}")
    return x


def _acc(x):
    return np.promote_types(x.dtype, np.float64)


# ----------------------------------------------------------------------------------------------
# RN-B
# ----------------------------------------------------------------------------------------------
class RegionNormBCache(NamedTuple):
    stats: RegionStats
    scale: np.ndarray                 # 1 + gamma of each pixel's region, (N, C, H, W)
    params: tuple                     # the four parameters as given (None where absent)
    x_dtype: np.dtype

    mean = property(lambda self: self.stats.mean)
    rstd = property(lambda self: self.stats.rstd)
    xhat = property(lambda self: self.stats.xhat)
    # the official algorithm (fill with the region mean, BatchNorm, times a rounded
    # sqrt(S_r / N_tot)) rounds three more times per element than the textbook one, and
    # computes the statistics twice (the region mean, then BatchNorm's of the filled input)
    oracle_extra_roundings = 3
    oracle_statistics_passes = 2

    def oracle_affine(self):
        """``(G, B)`` of ``y = G xhat + B`` per element (for the oracle's tolerance model)."""
        beta = sum(np.zeros(1) if p is None else np.abs(p) for p in self.params[1::2])
        return self.scale, np.broadcast_to(np.reshape(beta, (1, -1, 1, 1)), self.scale.shape)

    def oracle_param_terms(self, ady, dxh, mid, u, growth):
        """First-order terms ``{dname: (A, I)}`` of the parameters' gradients, from the error
        ``dxh`` of xhat: dgamma = sum dy xhat over its region, dbeta = sum dy."""
        fg = np.broadcast_to(self.stats.fg, ady.shape).astype(np.float64)
        gm = float(growth(ady.size // max(ady.shape[1], 1)))
        adyx = ady * np.abs(self.stats.xhat)

        def s(a):
            return a.sum(axis=(0, 2, 3))
        out = {}
        for name, m in (("dforeground_gamma", fg), ("dbackground_gamma", 1 - fg)):
            out[name] = (s(ady * m * dxh) + u * s(adyx * m),
                         (gm + 1) * s(adyx * m) + s(ady * m * mid))
        for name in ("dforeground_beta", "dbackground_beta"):
            out[name] = (u * s(ady), (gm + 1) * s(ady))
        return out


class RegionNormBGrads(NamedTuple):
    dx: np.ndarray
    dforeground_gamma: np.ndarray | None
    dforeground_beta: np.ndarray | None
    dbackground_gamma: np.ndarray | None
    dbackground_beta: np.ndarray | None


def region_norm_b_forward(x, foreground_gamma=None, foreground_beta=None,
                          background_gamma=None, background_beta=None, eps=1e-5, *, mask):
    r"""RN-B: region normalization with a given mask and a per-region affine; returns
    ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    foreground_gamma, foreground_beta, background_gamma, background_beta : ndarray (C,), optional
        :math:`\gamma^f, \beta^f, \gamma^b, \beta^b` (the scale is :math:`1+\gamma`; all start at
        0; None means 0).
    eps : float, default 1e-5
    mask : ndarray of bool, keyword-only
        (N, 1, H', W') or (N, C, H', W'), True (1) on the hole; resized to H x W (nearest).
    """
    op = "region_norm_b"
    x = _check_x(x, op)
    c = x.shape[1]
    params = tuple(check_param(p, name, op, (c,)) for p, name in (
        (foreground_gamma, "foreground_gamma"), (foreground_beta, "foreground_beta"),
        (background_gamma, "background_gamma"), (background_beta, "background_beta")))
    eps = check_eps(eps, op)
    if eps <= 0:
        raise ValueError(f"{op}: `eps` must be > 0, got {eps!r}")
    fg = _check_mask(mask, x, op)
    acc = _acc(x)
    wider = wider_dtype(acc)
    if wider is not None and out_of_range(x.astype(acc, copy=False)):  # tiny or huge float64:
        y, cache = region_norm_b_forward(                                # the whole call wider
            x.astype(wider), *(widen(p, wider) for p in params), eps, mask=mask)
        return narrow(y, x.dtype), WideCache(cache, [x.dtype] + [None if p is None else p.dtype
                                                                 for p in params], wider)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        stats = region_standardize(x.astype(acc), fg, eps)
        gf, bf, gb, bb = (np.zeros(c, acc) if p is None else p.astype(acc) for p in params)
        scale = np.where(fg, 1 + gf.reshape(1, c, 1, 1), 1 + gb.reshape(1, c, 1, 1))
        y = stats.xhat * scale + (bf + bb).reshape(1, c, 1, 1)
    return y.astype(x.dtype), RegionNormBCache(stats, scale, params, x.dtype)


def region_norm_b_backward(dy, cache):
    """Hand-derived VJP of :func:`region_norm_b_forward`."""
    if isinstance(cache, WideCache):
        return cache.narrow(region_norm_b_backward(dy.astype(cache.wide_dtype), cache.inner))
    stats, scale, params, x_dtype = cache
    dy = dy.astype(stats.xhat.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        dx = region_standardize_backward(dy * scale, stats)
        fg = np.broadcast_to(stats.fg, dy.shape)
        dyx = dy * stats.xhat
        sums = (np.where(fg, dyx, 0).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3)),
                np.where(fg, 0, dyx).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3)))
    grads = [None if p is None else s.astype(p.dtype) for p, s in zip(params, sums)]
    return RegionNormBGrads(dx.astype(x_dtype), *grads)


region_norm_b = custom_vjp(region_norm_b_forward, region_norm_b_backward,
                           ("x", "foreground_gamma", "foreground_beta", "background_gamma",
                            "background_beta"))
region_norm_b.__doc__ = "Differentiable RN-B (engine op); see :func:`region_norm_b_forward`."


def region_norm_b_composite(x, foreground_gamma=None, foreground_beta=None,
                            background_gamma=None, background_beta=None, eps=1e-5, *, mask):
    """The same math with engine primitives."""
    fg = _check_mask(mask, x.data if hasattr(x, "data") else x, "region_norm_b")
    rn = _region_composite(x, fg, eps)
    c = x.shape[1]
    m = np.broadcast_to(fg, x.shape).astype(np.float64)
    y = rn
    if foreground_gamma is not None:
        y = y + rn * m * ag.reshape(foreground_gamma, (1, c, 1, 1))
    if background_gamma is not None:
        y = y + rn * (1 - m) * ag.reshape(background_gamma, (1, c, 1, 1))
    for beta in (foreground_beta, background_beta):
        if beta is not None:
            y = y + ag.reshape(beta, (1, c, 1, 1))
    return y


def _torch_region(torch, x, fg, eps):
    """The official ``RN_binarylabel``: fill the outside of each region with its mean, a
    parameter-free BatchNorm with batch statistics, rescale by sqrt(S_r / N_tot)."""
    out = 0
    n, _, h, w = x.shape
    for region in (fg, 1 - fg):
        s = region.expand_as(x).sum(dim=(0, 2, 3))
        s = torch.where(s == 0, torch.ones_like(s), s)
        mu = (x * region).sum(dim=(0, 2, 3)) / s
        filled = x * region + (1 - region) * mu[None, :, None, None]
        bn = torch.nn.functional.batch_norm(filled, None, None, None, None, True, 0.0, eps)
        out = out + bn * torch.sqrt(s / (n * h * w))[None, :, None, None]
    return out


def _torch_mask(torch, mask, x):
    m = torch.as_tensor(np.asarray(mask, np.float64) if isinstance(mask, np.ndarray) else mask)
    m = m.to(device=x.device, dtype=x.dtype)
    if tuple(m.shape[2:]) != tuple(x.shape[2:]):
        m = torch.nn.functional.interpolate(m, size=tuple(x.shape[2:]), mode="nearest")
    return m


def _torch_call_b(torch, x, foreground_gamma, foreground_beta, background_gamma,
                  background_beta, *, eps=1e-5, mask):
    """``RN_B.forward`` from torch ops (float32 at least)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    m = _torch_mask(torch, mask, xf)
    rn = _torch_region(torch, xf, m, eps)

    def p(t):
        return 0 if t is None else t.to(acc)[None, :, None, None]
    y = rn * m * (1 + p(foreground_gamma)) + p(foreground_beta) \
        + rn * (1 - m) * (1 + p(background_gamma)) + p(background_beta)
    return y.to(x.dtype)


def _mask(rng, shape, fraction=0.4, channels=1):
    n, _, h, w = shape
    return rng.uniform(size=(n, channels, h, w)) < fraction


def _case_b(rng, name, shape, *, params=True, eps=1e-5, x=None, mask=None):
    x = rng.standard_normal(shape) if x is None else x
    c = shape[1]
    ps = tuple(0.5 * rng.standard_normal(c) if params else None for _ in range(4))
    mask = _mask(rng, shape) if mask is None else mask
    return SampleInput(name, (x,) + ps, dict(eps=eps, mask=mask))


def sample_inputs_b(rng):
    yield _case_b(rng, "(2,3,4,4)", (2, 3, 4, 4))
    yield _case_b(rng, "(1,2,3,5)-N1", (1, 2, 3, 5))
    yield _case_b(rng, "(2,3,3,3)-per-channel-mask", (2, 3, 3, 3),
                  mask=_mask(np.random.default_rng(1), (2, 3, 3, 3), channels=3))
    yield _case_b(rng, "(2,2,4,4)-mask-8x8-resized", (2, 2, 4, 4),
                  mask=_mask(np.random.default_rng(2), (2, 2, 8, 8)))
    yield _case_b(rng, "(2,2,3,3)-empty-foreground", (2, 2, 3, 3),
                  mask=np.zeros((2, 1, 3, 3), bool))
    yield _case_b(rng, "(2,2,3,4)-no-params-eps0.1", (2, 2, 3, 4), params=False, eps=0.1)
    one = np.zeros((2, 1, 3, 3), bool)
    one[1, 0, 2, 1] = True
    yield _case_b(rng, "(2,2,3,3)-one-pixel-region", (2, 2, 3, 3), mask=one)
    yield _case_b(rng, "(2,2,3,4)-mean100", (2, 2, 3, 4),
                  x=100.0 + rng.standard_normal((2, 2, 3, 4)))


def oracle_inputs_b(rng):
    yield _case_b(rng, "(4,16,32,32)", (4, 16, 32, 32))
    yield _case_b(rng, "(3,7,13,11)-mask-26x22", (3, 7, 13, 11),
                  mask=_mask(np.random.default_rng(3), (3, 7, 26, 22), 0.2))
    yield _case_b(rng, "(2,5,9,9)-mean1e4-std1e-3", (2, 5, 9, 9),
                  x=1e4 + 1e-3 * rng.standard_normal((2, 5, 9, 9)))


def error_inputs_b():
    x = np.ones((2, 3, 4, 4))
    mask = np.zeros((2, 1, 4, 4), bool)

    def call(name, x=x, p=None, **kwargs):
        return SampleInput(name, (x, p, None, None, None), {"mask": mask, **kwargs})

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError,
                     r"region_norm_b: `x` must be a numpy.ndarray")
    yield ErrorInput(call("3-d x", x=np.ones((2, 3, 4))), ValueError,
                     r"region_norm_b: `x` must be 4-D")
    yield ErrorInput(call("param shape", p=np.ones(2)), ValueError,
                     r"region_norm_b: `foreground_gamma` must have shape \(3,\)")
    yield ErrorInput(call("mask shape", mask=np.zeros((1, 1, 4, 4), bool)), ValueError,
                     r"region_norm_b: `mask` must have shape")
    yield ErrorInput(call("mask values", mask=np.full((2, 1, 4, 4), 0.5)), ValueError,
                     r"region_norm_b: `mask` must hold only 0 and 1")
    yield ErrorInput(call("mask list", mask=[[0]]), TypeError,
                     r"region_norm_b: `mask` must be a numpy.ndarray")
    yield ErrorInput(call("eps 0", eps=0.0), ValueError, r"region_norm_b: `eps` must be > 0")


def oracle_groups_b(sample):
    """RN-B's (region, channel) groups, for the oracle (``structure.GROUPS``)."""
    x = sample.arrays[0]
    return _groups(sample, _check_mask(sample.kwargs["mask"], x, "region_norm_b"))


def oracle_groups_l(sample):
    """RN-L's (region, channel) groups: the mask its forward decides, for the oracle."""
    _, cache = region_norm_l_forward(*sample.arrays, **sample.kwargs)
    return _groups(sample, cache.stats.fg)


def _groups(sample, fg):
    """(region, channel) labels of x: foreground channels 0..C-1, background C..2C-1."""
    x = sample.arrays[0]
    c = x.shape[1]
    channel = np.broadcast_to(np.arange(c).reshape(1, c, 1, 1), x.shape)
    return np.where(np.broadcast_to(fg, x.shape), channel, c + channel).astype(np.int64), 2 * c


SPEC_B = NormSpec(
    name="region_norm_b",
    title="Region Normalization, RN-B (given mask)",
    paper=_PAPER,
    forward=region_norm_b_forward,
    backward=region_norm_b_backward,
    op=region_norm_b,
    composite=region_norm_b_composite,
    diff_argnames=("x", "foreground_gamma", "foreground_beta", "background_gamma",
                   "background_beta"),
    sample_inputs=sample_inputs_b,
    oracle_inputs=oracle_inputs_b,
    error_inputs=error_inputs_b,
    nondiff_args=("mask",),
    # a constant added to all of x, or x scaled with eps -> a^2 eps, changes nothing; the groups
    # are (region, channel), but the variance is s^2 / (s^2 + eps N/S_r), not s^2 / (s^2 + eps):
    # tests/norms/test_region_norm.py checks the statistics
    invariances=("shift", "scale"),
    torch_equivalent=None,
    torch_call=_torch_call_b,
    param_layout="channel",
    layer_init=lambda features: ({k: np.zeros(features) for k in (
        "foreground_gamma", "foreground_beta", "background_gamma", "background_beta")}, {}, {}),
)


# ----------------------------------------------------------------------------------------------
# RN-L
# ----------------------------------------------------------------------------------------------
class RegionNormLCache(NamedTuple):
    stats: RegionStats
    a: np.ndarray              # [mean_c x; max_c x], (N, 2, H, W)
    argmax: np.ndarray         # the channel of the max, (N, 1, H, W)
    sa: np.ndarray             # the importance map s, (N, 1, H, W)
    pre: np.ndarray            # its pre-activation w_s * a
    gamma: np.ndarray          # the gamma map, (N, 1, H, W)
    weights: tuple             # (sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
    padding: int
    x_dtype: np.dtype

    mean = property(lambda self: self.stats.mean)
    rstd = property(lambda self: self.stats.rstd)
    xhat = property(lambda self: self.stats.xhat)
    # the official algorithm (fill with the region mean, BatchNorm, times a rounded
    # sqrt(S_r / N_tot)) rounds three more times per element than the textbook one, and
    # computes the statistics twice (the region mean, then BatchNorm's of the filled input)
    oracle_extra_roundings = 3
    oracle_statistics_passes = 2

    def oracle_affine(self):
        """``(G, B)`` of ``y = G xhat + B`` per element: the maps (for the oracle)."""
        shape = self.stats.xhat.shape
        pad = self.padding
        beta = conv2d(self.sa, *(w.astype(np.float64) for w in self.weights[3:]), pad)
        sw, gw, gb, bw, bb = (np.abs(w.astype(np.float64)) for w in self.weights)
        # magnitudes of the sums behind the maps (the importance map's rounding carried through)
        m_sa = self.sa * (1 - self.sa) * conv2d(np.abs(self.a), sw, None, pad)
        mg = conv2d(self.sa + m_sa, gw, gb, pad)
        mb = conv2d(self.sa + m_sa, bw, bb, pad)
        return (np.broadcast_to(1 + self.gamma, shape), np.broadcast_to(beta, shape), mg, mb,
                sw.size)

    def oracle_param_terms(self, ady, dxh, mid, u, growth):
        """First-order terms ``{dname: (A, I)}`` of the convolution parameters' gradients:
        the error of dgamma_map = sum_c dy xhat propagated through the (absolute) transposed
        convolutions, the sigmoid's derivative and the first convolution; plus the rounding
        of each convolution's own sums."""
        sw, gw, _, bw, _ = (np.abs(w.astype(np.float64)) for w in self.weights)
        pad, sa, a = self.padding, self.sa, np.abs(self.a)
        k2 = gw.size
        g = float(growth(ady.size // max(ady.shape[1], 1) + k2))
        adyx = ady * np.abs(self.stats.xhat)
        a_gmap = (ady * dxh).sum(axis=1, keepdims=True)            # error of dgamma_map
        m_gmap = (adyx + ady * mid).sum(axis=1, keepdims=True)      # its magnitude
        m_bmap = ady.sum(axis=1, keepdims=True)
        ds = sa * (1 - sa)
        out = {}
        for name, amap, mmap, w in (("gamma", a_gmap, m_gmap, gw), ("beta", 0 * m_bmap, m_bmap,
                                                                     bw)):
            _, aw, ab = conv2d_backward(amap, sa, w, pad, need_dx=False)
            _, mw, mb = conv2d_backward(mmap, sa, w, pad, need_dx=False)
            out["d" + name + "_weight"] = (aw + u * g * mw, (g + 1) * mw)
            out["d" + name + "_bias"] = (ab + u * g * mb, (g + 1) * mb)
        a_ds = conv2d_backward(a_gmap, sa, gw, pad)[0]
        m_ds = conv2d_backward(m_gmap, sa, gw, pad)[0] + conv2d_backward(m_bmap, sa, bw, pad)[0]
        _, a_sw, _ = conv2d_backward(a_ds * ds + u * g * m_ds * ds, a, sw, pad, need_dx=False)
        _, m_sw, _ = conv2d_backward(m_ds * ds, a, sw, pad, need_dx=False)
        out["dsa_weight"] = (a_sw + u * g * m_sw, (g + 1) * m_sw)
        return out


class RegionNormLGrads(NamedTuple):
    dx: np.ndarray
    dsa_weight: np.ndarray
    dgamma_weight: np.ndarray
    dgamma_bias: np.ndarray
    dbeta_weight: np.ndarray
    dbeta_bias: np.ndarray


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))   # no overflow for large |z|


def region_norm_l_forward(x, sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias,
                          eps=1e-5, *, threshold=0.8):
    r"""RN-L: region normalization with a mask learned from ``x``; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    sa_weight : ndarray of shape (1, 2, k, k)
        The importance map's convolution (no bias), :math:`k` odd.
    gamma_weight, beta_weight : ndarray of shape (1, 1, k, k)
    gamma_bias, beta_bias : ndarray of shape (1,)
    eps : float, default 1e-5
    threshold : float, keyword-only, default 0.8
        :math:`\tau`: the mask is :math:`s \ge \tau`.
    """
    op = "region_norm_l"
    x = _check_x(x, op)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: `x` must have at least one channel (the importance map takes "
                         f"their max), got shape {x.shape}")
    sa_weight = check_array(sa_weight, "sa_weight", op)
    if sa_weight.ndim != 4 or sa_weight.shape[:2] != (1, 2) or sa_weight.shape[2] % 2 == 0 \
            or sa_weight.shape[2] != sa_weight.shape[3]:
        raise ValueError(f"{op}: `sa_weight` must have shape (1, 2, k, k) with k odd, got "
                         f"{sa_weight.shape}")
    k = sa_weight.shape[2]
    gamma_weight = check_param(gamma_weight, "gamma_weight", op, (1, 1, k, k))
    beta_weight = check_param(beta_weight, "beta_weight", op, (1, 1, k, k))
    gamma_bias = check_param(gamma_bias, "gamma_bias", op, (1,))
    beta_bias = check_param(beta_bias, "beta_bias", op, (1,))
    if any(p is None for p in (gamma_weight, beta_weight, gamma_bias, beta_bias)):
        raise TypeError(f"{op}: `gamma_weight`, `gamma_bias`, `beta_weight` and `beta_bias` "
                        f"must be given")
    eps = check_eps(eps, op)
    if eps <= 0:
        raise ValueError(f"{op}: `eps` must be > 0, got {eps!r}")
    tau = _finite_float(threshold) if isinstance(threshold, (numbers.Real, np.floating)) \
        and not isinstance(threshold, (bool, np.bool_)) else None
    if tau is None:
        raise ValueError(f"{op}: `threshold` must be a finite number, got {threshold!r}")
    acc = _acc(x)
    wider = wider_dtype(acc)
    if wider is not None and out_of_range(x.astype(acc, copy=False)):  # tiny or huge float64:
        weights = (sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
        y, cache = region_norm_l_forward(                                # the whole call wider
            x.astype(wider), *(widen(w, wider) for w in weights), eps, threshold=tau)
        return narrow(y, x.dtype), WideCache(cache, [x.dtype] + [w.dtype for w in weights],
                                             wider)
    pad = k // 2
    x64 = x.astype(acc)
    weights = (sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias)
    sw, gw, gb, bw, bb = (w.astype(acc) for w in weights)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if x.size:
            argmax = np.argmax(x64, axis=1)[:, None]
            a = np.concatenate([x64.mean(axis=1, keepdims=True), x64.max(axis=1, keepdims=True)],
                               axis=1)
        else:
            argmax = np.zeros((x.shape[0], 1) + x.shape[2:], np.int64)
            a = np.zeros((x.shape[0], 2) + x.shape[2:], acc)
        pre = conv2d(a, sw, None, pad)
        sa = _sigmoid(pre)
        gamma = conv2d(sa, gw, gb, pad)
        beta = conv2d(sa, bw, bb, pad)
        stats = region_standardize(x64, sa >= tau, eps)
        if np.isnan(sa).any():  # a pixel of undefined region: every region statistic is
            stats.xhat[...] = np.nan   # undefined (NaN in, NaN out)
            stats.mean[...], stats.rstd[...] = np.nan, np.nan
        y = stats.xhat * (1 + gamma) + beta
    return y.astype(x.dtype), RegionNormLCache(stats, a, argmax, sa, pre, gamma, weights, pad,
                                               x.dtype)


def region_norm_l_backward(dy, cache):
    """Hand-derived VJP of :func:`region_norm_l_forward`."""
    if isinstance(cache, WideCache):
        return cache.narrow(region_norm_l_backward(dy.astype(cache.wide_dtype), cache.inner))
    stats, a, argmax, sa, pre, gamma, weights, pad, x_dtype = cache
    sw, gw, _, bw, _ = (w.astype(sa.dtype) for w in weights)
    dy = dy.astype(sa.dtype)
    c = dy.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        dx = region_standardize_backward(dy * (1 + gamma), stats)
        dgamma_map = (dy * stats.xhat).sum(axis=1, keepdims=True)
        dbeta_map = dy.sum(axis=1, keepdims=True)
        ds1, dgw, dgb = conv2d_backward(dgamma_map, sa, gw, pad)
        ds2, dbw, dbb = conv2d_backward(dbeta_map, sa, bw, pad)
        # s (1 - s) = e / (1 + e)^2, e = exp(-|z|): accurate where s saturates; computed (with
        # the convolution it feeds) in long double for float64, whose wider exponent keeps
        # the products of tiny factors out of float64's subnormal range until the final sum
        wide = np.promote_types(pre.dtype, np.longdouble) if pre.dtype == np.float64 \
            else pre.dtype
        e = np.exp(-np.abs(pre.astype(wide)))
        dpre = (ds1 + ds2).astype(wide) * (e / (1 + e) ** 2)
        da, dsw, _ = conv2d_backward(dpre, a.astype(wide), sw.astype(wide), pad)
        da, dsw = da.astype(pre.dtype), dsw.astype(pre.dtype)
        dx += da[:, :1] / c
        np.put_along_axis(dx, argmax, np.take_along_axis(dx, argmax, axis=1) + da[:, 1:], axis=1)
    grads = (dsw, dgw, dgb, dbw, dbb)
    return RegionNormLGrads(dx.astype(x_dtype),
                            *(g.astype(w.dtype) for g, w in zip(grads, weights)))


region_norm_l = custom_vjp(region_norm_l_forward, region_norm_l_backward,
                           ("x", "sa_weight", "gamma_weight", "gamma_bias", "beta_weight",
                            "beta_bias"))
region_norm_l.__doc__ = "Differentiable RN-L (engine op); see :func:`region_norm_l_forward`."


def region_norm_l_composite(x, sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias,
                            eps=1e-5, *, threshold=0.8):
    """The same math with engine primitives (``conv2d``, ``sigmoid``, ``max``, ...); the mask
    from the map's values, without gradient."""
    pad = sa_weight.shape[2] // 2
    a = ag.concatenate([ag.mean(x, 1, keepdims=True), ag.max(x, 1, keepdims=True)], axis=1)
    sa = ag.sigmoid(ag.conv2d(a, sa_weight, None, padding=pad))
    gamma = ag.conv2d(sa, gamma_weight, gamma_bias, padding=pad)
    beta = ag.conv2d(sa, beta_weight, beta_bias, padding=pad)
    rn = _region_composite(x, sa.data >= threshold, eps)
    if np.isnan(sa.data).any():  # a pixel of undefined region: every statistic is undefined
        rn = rn * np.full(x.shape, np.nan)
    return rn * (1 + gamma) + beta


def _torch_call_l(torch, x, sa_weight, gamma_weight, gamma_bias, beta_weight, beta_bias, *,
                  eps=1e-5, threshold=0.8):
    """``RN_L.forward`` from torch ops (float32 at least). The mask ``s >= threshold`` is decided
    on the map computed in float64: a run in a lower precision flips it where :math:`s` lies
    within its rounding of the threshold, where the output jumps (no error bound covers a
    discontinuity), so a candidate is compared on the reference's branch."""
    acc = torch.promote_types(x.dtype, torch.float32)
    pad = sa_weight.shape[2] // 2
    F = torch.nn.functional

    def importance(xx, sw):
        a = torch.cat([xx.mean(1, keepdim=True), xx.max(1, keepdim=True)[0]], 1)
        return torch.sigmoid(F.conv2d(a, sw, None, padding=pad))

    xf = x.to(acc)
    sa = importance(xf, sa_weight.to(acc))
    with torch.no_grad():
        sa64 = importance(x.detach().double(), sa_weight.detach().double())
    mask = (sa64 >= threshold).to(acc)
    undefined = bool(torch.isnan(sa64).any())   # refnorm's rule: then every region is undefined
    gamma = F.conv2d(sa, gamma_weight.to(acc), gamma_bias.to(acc), padding=pad)
    beta = F.conv2d(sa, beta_weight.to(acc), beta_bias.to(acc), padding=pad)
    rn = _torch_region(torch, xf, mask, eps)
    if undefined:
        rn = rn * float("nan")
    return (rn * (1 + gamma) + beta).to(x.dtype)


def _case_l(rng, name, shape, *, k=3, threshold=0.6, eps=1e-5, x=None, sa_scale=1.0):
    x = rng.standard_normal(shape) if x is None else x
    return SampleInput(name, (x, sa_scale * rng.standard_normal((1, 2, k, k)),
                              0.3 * rng.standard_normal((1, 1, k, k)),
                              0.3 * rng.standard_normal(1),
                              0.3 * rng.standard_normal((1, 1, k, k)),
                              0.3 * rng.standard_normal(1)),
                       dict(eps=eps, threshold=threshold))


def sample_inputs_l(rng):
    yield _case_l(rng, "(2,3,4,4)-k3", (2, 3, 4, 4))
    yield _case_l(rng, "(1,2,5,5)-N1-k3", (1, 2, 5, 5))
    yield _case_l(rng, "(2,2,7,7)-k7-threshold0.8", (2, 2, 7, 7), k=7, threshold=0.8)
    yield _case_l(rng, "(2,3,3,4)-threshold-above-all", (2, 3, 3, 4), threshold=1.5)
    yield _case_l(rng, "(2,2,4,3)-eps0.1", (2, 2, 4, 3), eps=0.1)
    yield _case_l(rng, "(2,2,3,4)-mean100", (2, 2, 3, 4), threshold=0.55, sa_scale=0.005,
                  x=100.0 + rng.standard_normal((2, 2, 3, 4)))


def oracle_inputs_l(rng):
    yield _case_l(rng, "(4,16,24,24)-k7", (4, 16, 24, 24), k=7)
    yield _case_l(rng, "(3,7,13,11)-k3", (3, 7, 13, 11))


def error_inputs_l():
    x = np.ones((2, 3, 4, 4))
    w3, w1, b = np.ones((1, 2, 3, 3)), np.ones((1, 1, 3, 3)), np.ones(1)

    def call(name, x=x, sw=w3, gw=w1, **kwargs):
        return SampleInput(name, (x, sw, gw, b, w1, b), kwargs)

    yield ErrorInput(call("list x", x=[[1.0]]), TypeError,
                     r"region_norm_l: `x` must be a numpy.ndarray")
    yield ErrorInput(call("3-d x", x=np.ones((2, 3, 4))), ValueError,
                     r"region_norm_l: `x` must be 4-D")
    yield ErrorInput(call("even kernel", sw=np.ones((1, 2, 2, 2))), ValueError,
                     r"region_norm_l: `sa_weight` must have shape \(1, 2, k, k\) with k odd")
    yield ErrorInput(call("gamma_weight", gw=np.ones((1, 1, 5, 5))), ValueError,
                     r"region_norm_l: `gamma_weight` must have shape \(1, 1, 3, 3\)")
    yield ErrorInput(call("threshold", threshold="0.8"), ValueError,
                     r"region_norm_l: `threshold` must be a finite number")
    yield ErrorInput(call("eps 0", eps=0.0), ValueError, r"region_norm_l: `eps` must be > 0")


def _layer_init_l(features, kernel_size=7, threshold=0.8, rng=None):
    """PyTorch's default conv initialization (uniform in +-1/sqrt(fan_in)) for the three
    convolutions of ``SelfAware_Affine``; the official training script re-initializes."""
    rng = np.random.default_rng() if rng is None else rng
    k = kernel_size

    def uniform(shape, fan_in):
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    return ({"sa_weight": uniform((1, 2, k, k), 2 * k * k),
             "gamma_weight": uniform((1, 1, k, k), k * k), "gamma_bias": uniform(1, k * k),
             "beta_weight": uniform((1, 1, k, k), k * k), "beta_bias": uniform(1, k * k)},
            {}, {"threshold": threshold})


SPEC_L = NormSpec(
    name="region_norm_l",
    title="Region Normalization, RN-L (learned mask)",
    paper=_PAPER,
    forward=region_norm_l_forward,
    backward=region_norm_l_backward,
    op=region_norm_l,
    composite=region_norm_l_composite,
    diff_argnames=("x", "sa_weight", "gamma_weight", "gamma_bias", "beta_weight", "beta_bias"),
    sample_inputs=sample_inputs_l,
    oracle_inputs=oracle_inputs_l,
    error_inputs=error_inputs_l,
    torch_equivalent=None,
    torch_call=_torch_call_l,
    param_layout=None,
    layer_init=_layer_init_l,
)

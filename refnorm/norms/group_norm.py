r"""Group Normalization.

Wu & He, *Group Normalization*, ECCV 2018, arXiv:1803.08494.

The input has shape :math:`(N, C, *)`. Its :math:`C` channels are split into :math:`G` groups of
:math:`C/G` contiguous channels (group :math:`g` holds channels :math:`[gC/G, (g+1)C/G)`), and
each sample :math:`n` is normalized over each group's set :math:`S_{ng}`: its channels and all
their spatial positions, :math:`M = (C/G)\prod *` elements:

.. math::

   \mu_{ng} = \langle x\rangle_{S_{ng}},\qquad
   \sigma^2_{ng} = \langle (x-\mu_{ng})^2\rangle_{S_{ng}},\qquad
   r_{ng} = (\sigma^2_{ng}+\epsilon)^{-1/2},\qquad
   \hat x = (x-\mu_{ng})\,r_{ng},\qquad
   y_{nc\cdot} = \gamma_c\,\hat x_{nc\cdot} + \beta_c ,

with a **per-channel** affine (``weight`` :math:`\gamma` and ``bias`` :math:`\beta` of shape
:math:`(C,)`), not per group.

Backward (derivation: ``docs/derivations/group_norm.rst``). With :math:`g = \gamma_c\,
\mathrm{d}y` (:math:`\gamma` varies inside a group, so it is applied before the group means):

.. math::

   \mathrm{d}x = r_{ng}\bigl(g - \langle g\rangle_{S_{ng}}
                 - \hat x\,\langle g\odot\hat x\rangle_{S_{ng}}\bigr),\qquad
   \mathrm{d}\gamma_c = \textstyle\sum_{n,*} \mathrm{d}y\odot\hat x,\qquad
   \mathrm{d}\beta_c = \textstyle\sum_{n,*} \mathrm{d}y .

The code computes the group means from the per-(sample, channel) sums
:math:`A_{nc} = \sum_* \mathrm{d}y\,\hat x` and :math:`B_{nc} = \sum_* \mathrm{d}y` (which are also
the summands of :math:`\mathrm{d}\gamma` and :math:`\mathrm{d}\beta`):
:math:`\langle g\hat x\rangle_{S_{ng}} = \frac1M\sum_{c\in g}\gamma_c A_{nc}` and
:math:`\langle g\rangle_{S_{ng}} = \frac1M\sum_{c\in g}\gamma_c B_{nc}`, so no array of the size of
``x`` is formed for ``g`` or ``g * xhat``.

Conventions, as in ``torch.nn.functional.group_norm``: ``num_groups`` required and dividing
:math:`C`, biased variance (:math:`1/M`), ``eps`` inside the square root, default ``eps = 1e-5``,
no running statistics (train = eval). A single sample with one value per group
(:math:`N \cdot C/G \cdot L = 1`, e.g. a (1, 1) input) raises ``ValueError`` ("Expected more
than 1 value per channel"), as PyTorch does and as batch_norm and instance_norm do.
``weight``/``bias`` default to None here, as in
``F.group_norm`` (the ``nn.GroupNorm`` module holds them, initialised to 1 and 0). Statistics are
two-pass with a correction pass (:mod:`refnorm.norms._stats`), on the ``(N, G, M)`` view of ``x``
(no copy when ``x`` is C-contiguous).

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, ``dweight`` that of ``weight`` and
``dbias`` that of ``bias``, also when they differ (PyTorch raises on mixed dtypes); float16
statistics (and ``rstd``) are computed and kept in float32. Overflowing or underflowing squares
(float32 :math:`\sigma \gtrsim 1.8\cdot 10^{19}`; ``eps = 0`` with :math:`\sigma \lesssim
10^{-19}`) are detected per group and those groups recomputed from :math:`d/2^e`
(:func:`refnorm.norms._stats.rescaled_rstd`).

Special cases: :math:`G = C` is InstanceNorm with affine parameters; :math:`G = 1` is LayerNorm
over :math:`(C, *)` followed by the per-channel affine. Each group's output (before the affine)
is invariant to adding a constant to the group and to scaling it by :math:`a > 0` together with
:math:`\epsilon\to a^2\epsilon`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import (accumulation_dtype, by_row_blocks, check_array, check_eps,
                                  check_num_groups, check_param, correction_first,
                                  extreme_groups, group_view, inexact_products, joined, row_dots,
                                  row_moments, row_sums, saved_mean, summed, wider_dtype,
                                  widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput


class GroupNormCache(NamedTuple):
    x: np.ndarray                   # the input, not a copy (like PyTorch's saved tensors):
    #                                 it must not be modified before the backward
    shift: np.ndarray               # m0, the rounded group means, shape (N, G, 1)
    correction: np.ndarray          # c = <x - m0>: the mean is m0 + c (see _stats); (N, G, 1)
    rstd: np.ndarray                # r, shape (N, G, 1); float32 for float16 input
    weight: np.ndarray | None       # \gamma, shape (C,), or None
    has_bias: bool
    bias_dtype: np.dtype | None = None  # \beta's dtype (dbias gets it), None without bias
    wide: tuple | None = None       # ((group, samples, cache), ...): the groups the forward did
    #                                 in a wider dtype (subnormal or huge: _stats.extreme_groups)

    mean = property(saved_mean)   # m0 + c, rounded to one float, shape (N, G, 1)

    @property
    def xhat(self):
        """xhat = (x - m0 - c) r, same shape as x: recomputed on access, not stored."""
        groups = group_view(self.x, self.rstd.shape[1])
        with np.errstate(invalid="ignore", over="ignore"):
            xhat = (groups - self.shift - self.correction) * self.rstd
        return xhat.reshape(self.x.shape).astype(self.x.dtype, copy=False)


class GroupNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None
    dbias: np.ndarray | None


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5):
    r"""Group normalization of ``x`` of shape (N, C, \*); returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray, shape (N, C, \*)
    num_groups : int
        :math:`G`; must divide :math:`C`.
    weight, bias : ndarray of shape (C,), optional
        Per-channel :math:`\gamma` and :math:`\beta`. ``None`` means 1 and 0.
    eps : float, default 1e-5
        Added to each group's variance inside the square root.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : GroupNormCache
    """
    x = check_array(x, "x", "group_norm", ndim_min=2)
    channels = x.shape[1]
    num_groups = check_num_groups(num_groups, channels, "group_norm")
    weight = check_param(weight, "weight", "group_norm", (channels,))
    bias = check_param(bias, "bias", "group_norm", (channels,))
    eps = check_eps(eps, "group_norm")
    if x.shape[0] * (channels // num_groups) * math.prod(x.shape[2:]) == 1:
        # torch's test (_verify_batch_size on (N C/G, G, *spatial)): one value in each group
        # of a single sample, where the normalized output is just the bias
        raise ValueError(f"group_norm: Expected more than 1 value per channel when training, "
                         f"got `x` of shape {x.shape} with num_groups={num_groups} (one value "
                         f"per group)")
    n, groups = x.shape[0], num_groups
    if not x.size:  # a size-0 axis: PyTorch's empty output (and zero gradients)
        stats = np.zeros((n, groups, 1), x.dtype)
        return np.empty(x.shape, x.dtype), GroupNormCache(
            x, stats, stats.copy(), stats.astype(np.promote_types(x.dtype, np.float32)), weight,
            bias is not None, None if bias is None else bias.dtype)
    # inf - inf in a group with an inf: NaN; and the statistics' own (row_moments)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        y, (shift, c, var, rstd, span) = normalize_groups(x, groups, weight, bias, eps)
    wide = None
    extreme = extreme_groups(var, rstd, x.dtype, span)
    if extreme.size and (wider := wider_dtype(x.dtype)) is not None:
        # subnormal or huge groups: again in a wider dtype, one group at a time (as a
        # GroupNorm of one group over its channels), so that a group's result never depends
        # on another's
        samples, which = np.divmod(extreme, groups)
        wide = []
        for g in np.unique(which):
            sel, ch = samples[which == g], _channels(g, channels // groups)
            yw, sub = group_norm_forward(x[sel][:, ch].astype(wider), 1,
                                         widen(None if weight is None else weight[ch], wider),
                                         widen(None if bias is None else bias[ch], wider), eps)
            with np.errstate(over="ignore", under="ignore"):  # rounded to x's dtype, as exact
                y[sel, ch] = yw
                shift[sel, g], c[sel, g], rstd[sel, g] = \
                    sub.shift[:, 0], sub.correction[:, 0], sub.rstd[:, 0]
            wide.append((g, sel, sub))
        wide = tuple(wide)
    return y, GroupNormCache(x, shift, c, rstd, weight, bias is not None,
                             None if bias is None else bias.dtype, wide)


def normalize_groups(x, groups, weight, bias, eps):
    """``(y, (shift, c, var, rstd, span))`` of GroupNorm's math on a non-empty ``x`` of shape
    (N, C, ...) with ``groups`` groups, the statistics of shape (N, G, 1), without the input
    checks and the groups that need a wider dtype (:func:`group_norm_forward` adds them);
    InstanceNorm's forward with input statistics is this with one group per channel. A block
    of samples at a time (:func:`~refnorm.norms._stats.by_row_blocks`: the passes over a block
    find it in the cache)."""
    y = np.empty(x.shape, dtype=x.dtype)
    parts = by_row_blocks(lambda blk: _normalize(x[blk], groups, weight, bias, eps, y[blk]),
                          *_samples(x), live=2)
    return y, joined(parts)


def _samples(x):
    """``(N, bytes per sample, L)``: :func:`~refnorm.norms._stats.by_row_blocks`' arguments for
    blocks of samples of ``x`` (N, C, *), L the length of its (sample, channel) rows."""
    spatial = math.prod(x.shape[2:])
    return x.shape[0], x.itemsize * x.shape[1] * spatial, spatial


def _normalize(x, groups, weight, bias, eps, y):
    """``y = (x - mu) r gamma + beta`` on samples ``x``, in ``y``; returns their
    ``(shift, c, var, rstd)``, of shape (N, G, 1), and their ``span``
    (:func:`~refnorm.norms._stats.row_moments`)."""
    n, channels = x.shape[:2]
    per_channel = channels // groups
    xg, yg = group_view(x, groups), group_view(y, groups)  # (N, G, M)
    rows = (n * groups, xg.shape[2])  # the groups as rows, for row_moments
    # y holds d = x - m0 for now; rstd in the accumulation dtype (float32 for float16)
    *stats, span = row_moments(xg.reshape(rows), out=yg.reshape(rows), eps=eps)
    shift, c, var, rstd = (v.reshape(n, groups, 1) for v in stats)
    # y = (d - c) r gamma + beta = d * scale + offset with, per (sample, channel), scale = r gamma
    # and offset = beta - c scale: two passes over y, on its (N, C, L) view (a channel per row).
    # The fold is taken where |c scale| <= 1 everywhere (its rounding is then below an ULP of
    # y's magnitude); else c is subtracted first, in a third pass: on a constant group d - c is
    # exactly 0 and y must be beta, while beta - c scale would round off by an ULP of c scale
    # (float32 constant 1e11: c ~ 4e3, scale ~ 316 -> y off by ~1).
    # The per-channel coefficients are formed on the (N, G, C/G) view of the channels, where
    # each group's r and c broadcast over its channels; scale in r's dtype (float32 for float16)
    channel = (n, groups, per_channel)
    if weight is not None:
        scale = np.multiply(rstd, weight.reshape(groups, per_channel),
                            out=np.empty(channel, rstd.dtype))
    else:
        scale = rstd.repeat(per_channel, axis=2)
    # Per channel, so that a channel's y does not depend on the others' (NaN does not flag).
    unfold = correction_first(c, scale)  # None: no such channel
    offset = -c * scale
    if unfold is not None:
        offset[unfold] = 0.0
    if bias is not None:
        offset += bias.reshape(groups, per_channel)
    y3, per_row = _ncl(y), (n, channels, 1)  # a channel per row
    if unfold is not None:  # 0: subtracting it changes nothing
        y3 -= np.where(unfold, c, 0).reshape(per_row)
    y3 *= scale.reshape(per_row)
    y3 += offset.reshape(per_row)
    return shift, c, var, rstd, span


def group_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`group_norm_forward`: ``(dy, cache) -> GroupNormGrads``.

    :math:`\hat x` is not stored: with :math:`d = x - m_0` (recomputed, exact) and
    :math:`\hat x = (d - c)\,r`, the per-(sample, channel) sums :math:`A_{nc} = \sum_*
    \mathrm{d}y\,\hat x = r\,(\sum_* \mathrm{d}y\,d - c\,B_{nc})` and :math:`B_{nc} = \sum_*
    \mathrm{d}y` are BLAS dot products over each (sample, channel) row, and with
    :math:`k = r\,\langle g\hat x\rangle_{S_{ng}}`

    .. math::

       \mathrm{d}x = (r\gamma_c)\,\mathrm{d}y - d\,(r k)
                     + r\,(c\,k - \langle g\rangle_{S_{ng}}):

    four passes with per-(sample, channel) coefficients. The samples are independent but for
    the sums over the batch (``dweight``, ``dbias``), so they are done a block of samples at a
    time (:func:`~refnorm.norms._stats.by_row_blocks`, sized to the L2 cache): :math:`d` is
    then one block, not an array of the size of ``x``.
    """
    x, shift, c, r, weight, has_bias = cache[:6]
    if cache.wide is None:
        dx, sum_dyx, sum_dy = normalize_groups_backward(dy, x, shift, c, r, weight)
    else:  # the groups done in a wider dtype by the forward: their backward too. The others as
        # usual, with those groups' dy and rstd set to 0 (their terms of the sums are exactly 0)
        per_channel = x.shape[1] // r.shape[1]
        dy0, r0 = dy.copy(), r.copy()
        shift0, c0 = shift.copy(), c.copy()
        for g, sel, _ in cache.wide:
            dy0[sel, _channels(g, per_channel)] = 0
            r0[sel, g], shift0[sel, g], c0[sel, g] = 0, 0, 0
        dx, sum_dyx, sum_dy = normalize_groups_backward(dy0, x, shift0, c0, r0, weight)
        for g, sel, sub in cache.wide:
            ch = _channels(g, per_channel)
            grads = group_norm_backward(dy[sel][:, ch].astype(sub.x.dtype), sub)
            with np.errstate(over="ignore", under="ignore"):  # rounded to the dtypes, as exact
                dx[sel, ch] = grads.dx
                if weight is not None:
                    sum_dyx[ch] += grads.dweight
        if has_bias:  # summed as without the wider groups: it does not depend on x
            sum_dy = _sum_dy(dy, x)
    dweight = sum_dyx.astype(weight.dtype, copy=False) if weight is not None else None
    dbias = sum_dy.astype(cache.bias_dtype or dy.dtype, copy=False) if has_bias else None
    return GroupNormGrads(dx, dweight, dbias)


def _channels(g, per_channel):
    """The channels of group ``g``, as a slice."""
    return slice(g * per_channel, (g + 1) * per_channel)


def _sum_dy(dy, x):
    """Per channel, the sum of ``dy`` over all samples, in the blocks and order of
    :func:`_backward` (bit-identical to its ``sum_dy``)."""
    acc = accumulation_dtype(x.dtype)
    dt = acc if x.dtype == np.float16 else x.dtype
    parts = by_row_blocks(
        lambda blk: (row_sums(_ncl(dy[blk].astype(dt, copy=False))).sum(axis=0),),
        *_samples(x))
    return summed(parts)[0]


def normalize_groups_backward(dy, x, shift, c, r, weight):
    """The backward of :func:`normalize_groups`: ``(dx, sum_dyx, sum_dy)``, the per-channel
    sums (``dweight`` and ``dbias``) in the accumulation dtype, a block of samples at a time.
    float16 is worked in float32 (the terms of dx cancel: a float16 residue times r
    overflows)."""
    channels = x.shape[1]
    acc = accumulation_dtype(x.dtype)  # float16 sums in float32, as in _stats
    dx = np.empty(x.shape, dtype=acc if x.dtype == np.float16 else x.dtype)
    if not x.size:
        return dx.astype(x.dtype), np.zeros(channels, acc), np.zeros(channels, acc)
    # NaN in, NaN out; inf where exact; and the rare regimes of _backward_samples (r k)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        parts = by_row_blocks(
            lambda blk: _backward_samples(dy[blk].astype(dx.dtype, copy=False),
                                          x[blk].astype(dx.dtype, copy=False), shift[blk],
                                          c[blk], r[blk], weight, dx[blk]),
            *_samples(x))
    sum_dyx, sum_dy = summed(parts)
    return dx.astype(x.dtype, copy=False), sum_dyx, sum_dy


def _backward_samples(dy, x, shift, c, r, weight, dx):
    """The backward on a block of samples (``shift``, ``c``, ``r`` of shape (N, G, 1), ``weight``
    of shape (C,) or None): writes ``dx`` and returns the block's sums over its samples of
    :math:`A_{nc}` and :math:`B_{nc}` (its parts of ``dweight`` and ``dbias``)."""
    n, channels = x.shape[:2]
    groups = r.shape[1]
    per_channel = channels // groups
    spatial = math.prod(x.shape[2:])
    ncl = (n, channels, spatial)
    x3, dy3, dx3 = x.reshape(ncl), dy.reshape(ncl), dx.reshape(ncl)  # dx3: a view (contiguous)
    per_group = per_channel * spatial  # M
    channel = (n, groups, per_channel)  # the per-channel terms, each group's r and c broadcast

    d = np.subtract(group_view(x, groups), shift)  # x - m0 again: exact, as in the forward
    d3 = d.reshape(x3.shape)
    b = row_sums(dy3).reshape(channel)                          # B_nc = sum_* dy
    a = r * (row_dots(dy3, d3).reshape(channel) - c * b)        # A_nc = sum_* dy xhat
    sums = a.sum(axis=0).ravel(), b.sum(axis=0).ravel()
    if per_group == 1:  # a one-element group normalizes to 0 whatever x is: y = beta, dx = 0
        dx[...] = 0     # (exactly; the formula below rounds (r gamma) dy - r (gamma dy))
        return sums
    if weight is not None:
        w = weight.reshape(groups, per_channel)
        a *= w  # sum_* g xhat and sum_* g, with g = gamma dy
        b *= w
    # the group means <g xhat> and <g>: sums over the group's channels, / M; (N, G, 1)
    mean_gx = a.sum(axis=2, keepdims=True) / per_group
    mean_g = b.sum(axis=2, keepdims=True) / per_group
    k = r * mean_gx
    # Rare regimes, flagged per group (a group's dx does not depend on the others'), each
    # costing one more pass when it occurs: r k = r^2 <g xhat> overflows or underflows where r
    # and k do not (eps = 0 and tiny or huge groups): then (d r) k; and |c r| > 1 (a group
    # constant up to rounding): then (d - c) (r k), as d (r k) - c (r k) would cancel.
    # (Over- and underflows are silenced by the caller, normalize_groups_backward.)
    rk = r * k
    split = inexact_products(r, k, rk)  # None: no such group
    centre = correction_first(c, r)  # None: no such group
    if weight is not None:  # (r gamma) dy, per channel
        np.multiply(dy3, (r * w).reshape(n, channels, 1), out=dx3)
    else:  # r dy, per group
        np.multiply(group_view(dy, groups), r, out=group_view(dx, groups))
    # the per-group terms on the (N, G, M) views of d and dx, broadcast without a copy
    if centre is not None:
        d -= np.where(centre, c, 0)
    if split is not None and split.any():
        d *= np.where(split, r, rk)
        d *= np.where(split, k, 1)
    else:
        d *= rk
    dx3 -= d3
    dx_groups = group_view(dx, groups)  # a view too
    dx_groups += r * ((c if centre is None else np.where(centre, 0, c)) * k - mean_g)
    return sums


def _ncl(a):
    """``a`` of shape (N, C, *) as (N, C, L), L the product of the spatial axes."""
    return a.reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


group_norm = custom_vjp(group_norm_forward, group_norm_backward, ("x", "weight", "bias"))
group_norm.__doc__ = \
    """Differentiable group normalization (engine op); see :func:`group_norm_forward`."""


def group_norm_composite(x, num_groups, weight=None, bias=None, eps=1e-5):
    """The same math with engine primitives only: the engine derives its own gradient."""
    n, c = x.shape[:2]
    x3 = ag.reshape(x, (n, num_groups, -1))
    xc = x3 - ag.mean(x3, 2, keepdims=True)
    xc = xc - ag.mean(xc, 2, keepdims=True)  # the correction pass, as in the forward: 0 in exact
    # arithmetic, and it makes a constant group centre to exactly 0 (so dweight is exactly 0)
    xhat = ag.reshape(xc / ag.sqrt(ag.mean(xc * xc, 2, keepdims=True) + eps), x.shape)
    affine = (c,) + (1,) * (x.ndim - 2)
    y = xhat * ag.reshape(weight, affine) if weight is not None else xhat
    return y + ag.reshape(bias, affine) if bias is not None else y


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, groups, eps=1e-5, affine=True, bias=True, x=None, dtype=np.float64):
    x = rng.standard_normal(shape) if x is None else x
    weight = rng.standard_normal(shape[1]) + 1.0 if affine else None
    b = rng.standard_normal(shape[1]) if affine and bias else None
    arrays = tuple(None if a is None else a.astype(dtype) for a in (x, weight, b))
    return SampleInput(name, arrays, dict(num_groups=groups, eps=eps))


def _constant_groups(rng, shape, groups):
    """Each (sample, group) constant, a different constant per group."""
    n, c = shape[:2]
    levels = rng.standard_normal((n, groups, 1))
    return np.broadcast_to(levels, (n, groups, c // groups * int(np.prod(shape[2:])))) \
        .reshape(shape).copy()


def sample_inputs(rng):
    yield _case(rng, "(2,4,5)-G2", (2, 4, 5), 2)
    yield _case(rng, "(2,6,3,2)-G3", (2, 6, 3, 2), 3)
    yield _case(rng, "(1,4,2,2,2)-G2-5d", (1, 4, 2, 2, 2), 2)
    yield _case(rng, "(2,4,3)-G1", (2, 4, 3), 1)
    yield _case(rng, "(2,3,4)-G=C", (2, 3, 4), 3)
    yield _case(rng, "(3,4)-2d-G2", (3, 4), 2)
    yield _case(rng, "(3,4,1)-one-element-groups", (3, 4, 1), 4)
    yield _case(rng, "(2,6,2)-plain-eps0.1", (2, 6, 2), 3, eps=0.1, affine=False)
    yield _case(rng, "(2,4,3)-weight-only", (2, 4, 3), 2, bias=False)
    yield _case(rng, "(2,4,3)-constant-groups", (2, 4, 3), 2,
                x=_constant_groups(rng, (2, 4, 3), 2))
    yield _case(rng, "(2,4,3)-mean100", (2, 4, 3), 2, x=100.0 + rng.standard_normal((2, 4, 3)))


def oracle_inputs(rng):
    yield _case(rng, "(3,30,7,9)-G5", (3, 30, 7, 9), 5)
    yield _case(rng, "(4,32,15,15)-G32-eq-C", (4, 32, 15, 15), 32)
    yield _case(rng, "(2,12,5,7)-G1", (2, 12, 5, 7), 1)
    yield _case(rng, "(5,8,1)-one-element-groups", (5, 8, 1), 8)
    yield _case(rng, "(7,6)-2d-G3", (7, 6), 3)
    yield _case(rng, "(2,6,3,4,5)-G3-5d", (2, 6, 3, 4, 5), 3)
    yield _case(rng, "(2,4,16384)-G1-long-groups", (2, 4, 16384), 1)
    yield _case(rng, "(4,6,11,3)-G2-mean1e4-std1e-3", (4, 6, 11, 3), 2,
                x=1e4 + 1e-3 * rng.standard_normal((4, 6, 11, 3)))
    yield _case(rng, "(3,8,5,5)-G4-constant-groups", (3, 8, 5, 5), 4,
                x=_constant_groups(rng, (3, 8, 5, 5), 4))
    yield _case(rng, "(3,10,33)-G5-tiny-scale", (3, 10, 33), 5,
                x=1e-20 * rng.standard_normal((3, 10, 33)))
    yield _case(rng, "(3,10,33)-G5-huge-scale", (3, 10, 33), 5,
                x=1e20 * rng.standard_normal((3, 10, 33)))


def error_inputs():
    x = np.ones((2, 4, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], None, None), dict(num_groups=1)),
                     TypeError, r"group_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 4), dtype=int), None, None),
                                 dict(num_groups=2)), TypeError, r"floating dtype")
    yield ErrorInput(SampleInput("1d x", (np.ones(4), None, None), dict(num_groups=2)),
                     ValueError, r"`x` must have at least 2 dimensions, got shape \(4,\)")
    yield ErrorInput(SampleInput("groups do not divide C", (x, None, None), dict(num_groups=3)),
                     ValueError, r"`num_groups` must be a positive divisor of the number of "
                                 r"channels x.shape\[1\] = 4, got 3")
    yield ErrorInput(SampleInput("zero groups", (x, None, None), dict(num_groups=0)),
                     ValueError, r"`num_groups` must be a positive divisor")
    yield ErrorInput(SampleInput("float groups", (x, None, None), dict(num_groups=2.0)),
                     TypeError, r"`num_groups` must be an int, got float")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2), None), dict(num_groups=2)),
                     ValueError, r"`weight` must have shape \(4,\), got \(2,\)")
    yield ErrorInput(SampleInput("bias", (x, None, np.ones((4, 1))), dict(num_groups=2)),
                     ValueError, r"`bias` must have shape \(4,\), got \(4, 1\)")
    yield ErrorInput(SampleInput("eps", (x, None, None), dict(num_groups=2, eps=-1.0)),
                     ValueError, r"`eps` must be a finite number >= 0")
    for shape, groups in (((1, 1), 1), ((1, 4, 1), 4), ((1, 3, 1, 1), 3)):
        yield ErrorInput(SampleInput(f"one value per group {shape}", (np.ones(shape), None,
                                                                       np.ones(shape[1])),
                                     dict(num_groups=groups)),
                         ValueError, r"group_norm: Expected more than 1 value per channel")


def _stats_groups(sample):
    """``(labels, N * G)``: element (n, c, ...) of ``x`` belongs to group n G + c // (C / G)."""
    x, g = sample.arrays[0], sample.kwargs["num_groups"]
    n, c = x.shape[:2]
    idx = np.indices(x.shape, sparse=True)
    labels = np.broadcast_to(idx[0] * g + idx[1] // (c // g), x.shape)
    return labels.astype(np.int64), n * g


def _torch_call(torch, x, weight, bias, *, num_groups, eps):
    return torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)


def _layer_init(features, *, num_groups, eps=1e-5, affine=True):
    """``torch.nn.GroupNorm(num_groups, features, eps, affine)``: weight 1, bias 0."""
    check_num_groups(num_groups, features, "group_norm")
    check_eps(eps, "group_norm")
    params = dict(weight=np.ones(features), bias=np.zeros(features)) if affine else {}
    return params, {}, dict(num_groups=num_groups, eps=eps)


SPEC = NormSpec(
    name="group_norm",
    title="Group Normalization",
    paper=Paper("Group Normalization", "Wu, He", 2018, "arXiv:1803.08494"),
    forward=group_norm_forward,
    backward=group_norm_backward,
    op=group_norm,
    composite=group_norm_composite,
    diff_argnames=("x", "weight", "bias"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    # per (sample, group): shift by a constant per group, scale with eps -> a^2 eps; the groups
    # are not a set of axes, so stats_groups gives them to the generic tests and the oracle
    invariances=("shift", "scale"),
    stats_groups=_stats_groups,
    torch_equivalent="torch.nn.functional.group_norm",
    torch_call=_torch_call,
    param_layout="channel",
    layer_init=_layer_init,
)

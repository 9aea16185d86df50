r"""Root Mean Square Layer Normalization (RMSNorm).

Zhang & Sennrich, *Root Mean Square Layer Normalization*, NeurIPS 2019, arXiv:1910.07467.

Each sample is rescaled by the root mean square of its trailing axes :math:`A` (those of
``normalized_shape``, :math:`N = \prod_{a\in A} n_a` elements); it is **not** re-centred:

.. math::

   m = \langle x^2\rangle_A,\qquad
   r = (m+\epsilon)^{-1/2},\qquad
   \hat x = x\,r,\qquad
   y = \gamma\odot\hat x ,

where :math:`\langle\cdot\rangle_A` is the mean over :math:`A` and ``weight`` is :math:`\gamma`.
That is ``eps_placement="inside"``, the default. With ``eps_placement="outside"`` the
:math:`\epsilon` is added to the root mean square instead:

.. math::

   \rho = \sqrt{m},\qquad r = (\rho+\epsilon)^{-1},\qquad \hat x = x\,r,\qquad
   y = \gamma\odot\hat x .

Backward (derivation: ``docs/derivations/rms_norm.rst``). With :math:`g = \gamma\odot
\mathrm{d}y`:

.. math::

   \mathrm{d}x = r\,\bigl(g - \hat x\,k\bigr),\qquad
   k = \begin{cases} \langle g\odot\hat x\rangle_A & \text{inside} \\
                     \langle g\odot\hat x\rangle_A \,/\, q,\quad q = \rho\,r = \rho/(\rho+\epsilon)
                     & \text{outside}\end{cases}
   \qquad
   \mathrm{d}\gamma = \textstyle\sum_{\text{batch}} \mathrm{d}y\odot\hat x .

With the outside placement :math:`\rho` is not differentiable at a zero row; there
:math:`\hat x = 0`, the term :math:`\hat x\,k` is taken as 0 and :math:`\mathrm{d}x = g/\epsilon`,
which is the limit of the gradient as the row shrinks to zero along any direction.

Conventions, as in ``torch.nn.functional.rms_norm`` (``eps_placement="inside"``): no bias, the
mean square divides by :math:`N`, ``eps`` inside the square root, and ``eps=None`` (the default)
means the machine epsilon of the computation dtype: ``np.finfo(np.float64).eps`` (2.2e-16) for
float64 input, ``np.finfo(np.float32).eps`` (1.2e-7) for float32. PyTorch computes
float16/bfloat16 input in float32 and so uses float32's epsilon there too (its docstring says
``torch.finfo(x.dtype).eps``; the code does not). refnorm follows the code: ``eps=None`` resolves
to the epsilon of the input dtype promoted to at least float32 (:func:`default_eps`). So when a
low-precision candidate's inputs are cast up to float64 to be compared with this reference,
resolve ``eps`` from the candidate's dtype first.

**Dtypes**: ``y`` and ``dx`` have the dtype of ``x``, ``dweight`` that of ``weight``. The mean
square and ``rstd`` are computed and kept in float32 for float16 input (a zero float16 row has
``rstd = 1/eps`` beyond float16's range while ``y = 0``). Rows whose squares overflow (float32
:math:`|x| \gtrsim 10^{19}`) or underflow (``eps = 0``, :math:`|x| \lesssim 10^{-19}`) are
detected per row and recomputed from :math:`x/2^e`.

Where eps goes differs between the authors' own codes (``bzhangGo/rmsnorm``):
``rmsnorm_torch.py`` adds :math:`\epsilon` **outside** the square root, to
:math:`\|x\|_2/\sqrt N` (default ``eps=1e-8``); ``rmsnorm_tensorflow.py`` adds it **inside**
(default 1e-8), as PyTorch's ``F.rms_norm`` and the LLM code (HF ``LlamaRMSNorm``, eps 1e-6 or
1e-5) do. The two differ only when the root mean square is comparable to :math:`\epsilon`.
Inside is the default here (PyTorch's code); outside is ``eps_placement="outside"``. The authors'
optional bias and partial RMSNorm (statistic over the first :math:`pN` features) are not part of
this op.

RMSNorm is invariant to rescaling a row, :math:`x\to a x` with :math:`a>0`, exactly when
:math:`\epsilon` is rescaled along with it: by :math:`a^2` (inside) or by :math:`a` (outside). It
is not invariant to shifts :math:`x\to x+c\mathbf 1`, and on rows with zero mean it equals
LayerNorm (without bias) exactly, with the same :math:`\epsilon`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import custom_vjp
from refnorm.norms._stats import CASTING_MODES as _CASTING_MODES
from refnorm.norms._stats import (axis_count, check_array, check_casting_mode, check_eps,
                                  check_normalized_shape, check_offset, check_param,
                                  extreme_groups, needs_rescaling, offset_weight, rescaled_rstd,
                                  row_blocks, row_broadcasting, row_dots, row_sums, rsqrt,
                                  scaled_rows, trailing_axes, wider_dtype, widen)
from refnorm.registry import ErrorInput, NormSpec, Paper, SampleInput

EPS_PLACEMENTS = ("inside", "outside")
CASTING_MODES = _CASTING_MODES


class RMSNormCache(NamedTuple):
    x: np.ndarray                   # the input, not a copy (like PyTorch's saved tensors):
    #                                 it must not be modified before the backward
    rstd: np.ndarray                # r, keepdims over the normalized axes; float32 for float16
    q: np.ndarray | None            # outside only: \rho r = \rho / (\rho + eps); None inside
    weight: np.ndarray | None       # \gamma, or None
    axes: tuple[int, ...]           # the normalized axes A
    wide: tuple | None = None       # (rows, cache) of the rows the forward did in a wider
    #                                 dtype (subnormal or huge: _stats.extreme_groups), or None
    offset: float = 0.0             # o: the effective weight is o + \gamma

    @property
    def xhat(self):
        """xhat = x r: recomputed on access, not stored."""
        with np.errstate(over="ignore", invalid="ignore"):
            return (self.x * self.rstd).astype(self.x.dtype, copy=False)


class RMSNormGrads(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray | None


def default_eps(dtype):
    """The ``eps`` that ``eps=None`` stands for: the machine epsilon of ``dtype`` promoted to at
    least float32 (PyTorch's computation dtype: float16 input is computed in float32)."""
    # a Python float, so that it does not promote float16 arithmetic to float32
    return float(np.finfo(np.promote_types(dtype, np.float32)).eps)


def _check_placement(eps_placement):
    if not isinstance(eps_placement, str) or eps_placement not in EPS_PLACEMENTS:
        raise ValueError(f"rms_norm: `eps_placement` must be 'inside' or 'outside', got "
                         f"{eps_placement!r}")
    return eps_placement


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, eps_placement="inside",
                     offset=0.0, casting_mode=None):
    r"""RMS normalization over the trailing ``normalized_shape`` axes; returns ``(y, cache)``.

    Parameters
    ----------
    x : ndarray of shape ``(..., *normalized_shape)``
    normalized_shape : int or tuple of int
    weight : ndarray of shape ``normalized_shape``, optional
        :math:`\gamma`. ``None`` means 1.
    eps : float or None, default None
        ``None`` means :func:`default_eps` of ``x.dtype`` (float64: 2.2e-16, float32: 1.2e-7).
    eps_placement : {"inside", "outside"}, keyword-only, default "inside"
        ``"inside"``: :math:`x/\sqrt{\langle x^2\rangle+\epsilon}` (PyTorch, the authors' TF code,
        LLaMA). ``"outside"``: :math:`x/(\sqrt{\langle x^2\rangle}+\epsilon)` (the authors'
        PyTorch code).
    offset : float, keyword-only, default 0.0
        :math:`o` in :math:`y = \hat x\,(o + \gamma)`: Gemma's RMSNorm (``1 + weight``,
        HF ``GemmaRMSNorm``), Transformer Engine's ``zero_centered_gamma`` (:math:`o = 1`),
        Liger-Kernel's ``offset``. ``dweight`` keeps its form, :math:`\sum \mathrm{d}y\,
        \hat x`; ``dx`` uses :math:`o + \gamma`. :math:`o + \gamma` is formed first, so
        that it is exact where :math:`\gamma \approx -o`
        (:func:`~refnorm.norms._stats.offset_weight`). No effect without a ``weight`` (no
        affine part, as Liger-Kernel's ``elementwise_affine=False``).
    casting_mode : {None, "llama", "gemma", "none"}, keyword-only, default None
        Where a low-precision kernel rounds (Liger-Kernel's names, ``liger_kernel/ops/
        rms_norm.py``): ``"llama"`` (HF ``LlamaRMSNorm``) the statistics in float32,
        :math:`\hat x` rounded to the input dtype, then multiplied by :math:`o + \gamma` in
        the input dtype; ``"gemma"`` (HF ``GemmaRMSNorm``) everything in float32,
        :math:`o + \gamma` too, rounded once at the end; ``"none"`` everything in the input
        dtype. For float64 and float32 input every mode is the same computation here (all in
        the input dtype, the statistics included); for float16 ``None`` (refnorm's
        behaviour before the option existed), ``"llama"`` and ``"none"`` round like llama and
        ``"gemma"`` rounds once (:func:`~refnorm.norms._stats.scaled_rows` says why ``"none"``
        keeps float32 statistics). The backward is the same in every mode (float16 worked in
        float32). The mode is a *claim* for the oracle: it judges a candidate by the
        roundings of its claimed mode (:mod:`refnorm.oracle.tolerance`).

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``
    cache : RMSNormCache
    """
    x = check_array(x, "x", "rms_norm")
    shape = check_normalized_shape(normalized_shape, x, "rms_norm")
    weight = check_param(weight, "weight", "rms_norm", shape)
    eps = default_eps(x.dtype) if eps is None else check_eps(eps, "rms_norm")
    outside = _check_placement(eps_placement) == "outside"
    offset = check_offset(offset, "rms_norm")
    casting_mode = check_casting_mode(casting_mode, "rms_norm")
    axes = trailing_axes(x.ndim, len(shape))
    rows = _rows(x, axes)  # (rows, N): a view when x is contiguous
    keep = x.shape[:x.ndim - len(axes)] + (1,) * len(axes)  # keepdims over A
    with np.errstate(invalid="ignore", over="ignore"):
        y, ms, rstd, q = _forward_rows(rows, weight, eps, outside, offset, casting_mode)
    wide = None
    extreme = extreme_groups(ms, rstd)
    wider = wider_dtype(x.dtype)
    if extreme.size and wider is not None and rows.shape[1]:  # subnormal or huge rows:
        # again in a wider dtype
        yw, sub = rms_norm_forward(rows[extreme].astype(wider), rows.shape[1],
                                   widen(weight, wider, flat=True), eps,
                                   eps_placement=eps_placement, offset=offset,
                                   casting_mode=casting_mode)
        with np.errstate(over="ignore", under="ignore"):  # rounded to x's dtype, as exact
            y[extreme], rstd[extreme] = yw, sub.rstd
            if q is not None:
                q[extreme] = sub.q
        wide = (extreme, sub)
    cache = RMSNormCache(x, rstd.reshape(keep), None if q is None else q.reshape(keep), weight,
                         axes, wide, offset)
    return y.reshape(x.shape), cache


def _forward_rows(rows, weight, eps, outside, offset=0.0, casting_mode=None):
    """``(y, ms, rstd, q)`` of rows (rows, N): output, mean square, r, and q (None inside)."""
    if not rows.size:  # no rows, or rows of no element (PyTorch: an empty output)
        col = np.zeros((rows.shape[0], 1), np.promote_types(rows.dtype, np.float32))
        return np.empty(rows.shape, rows.dtype), col, col.copy(), \
            col.copy() if outside else None
    # the mean square, a BLAS dot product per row; no cancellation: a sum of squares. It and
    # rstd stay in the accumulation dtype (float32 for float16): a zero float16 row has
    # rstd = 1/eps = 1e5 beyond float16's range, while y = x rstd = 0
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, per row
        ms = row_dots(rows, rows)[:, None] / rows.shape[1]
    bad = needs_rescaling(ms, eps)
    if bad.any():  # overflowed or underflowed squares: recompute those rows from x / 2^e
        flagged = np.flatnonzero(bad)
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            ms64, _ = rescaled_rstd(rows[None, flagged, :], np.zeros(flagged.size), 0.0,
                                    axes=(0, 2))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if outside:
            rms = np.sqrt(ms)
            rstd = 1.0 / (rms + eps)
            q = rms * rstd
        else:
            rstd, q = rsqrt(ms + eps), None
    if bad.any():  # in float64: rms = 2^e sqrt(ms') and 1 / (rms + eps), or the scaled rsqrt
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            if outside:
                rms64 = np.sqrt(ms64)
                rstd[flagged, 0] = 1.0 / (rms64 + eps)
                q[flagged, 0] = rms64 / (rms64 + eps)
            else:
                _, rstd[flagged, 0] = rescaled_rstd(rows[None, flagged, :],
                                                    np.zeros(flagged.size), eps, axes=(0, 2))
    def xhat_into(out):
        with row_broadcasting(rows.shape[1], rows.size):
            np.multiply(rows, rstd, out=out, casting="same_kind")

    y = scaled_rows(xhat_into, rows, weight, None, offset, casting_mode)
    return y, ms, rstd, q


def rms_norm_backward(dy, cache):
    r"""Hand-derived VJP of :func:`rms_norm_forward`: ``(dy, cache) -> RMSNormGrads``.

    :math:`\hat x = x\,r` is not stored: the sums over the batch and over each row are formed
    from :math:`\mathrm{d}y\odot x` and the per-row :math:`r`, and
    :math:`\mathrm{d}x = r\,(g - x\,(r k))`. As in LayerNorm's backward, the rows are done a
    block at a time (:func:`~refnorm.norms._stats.row_blocks`), so that the passes over a block
    find it in the CPU cache, and the one temporary is the size of a block.
    """
    x, rstd, q, weight, axes = cache[:5]
    rows = _rows(x, axes)
    dy2 = dy.reshape(rows.shape)
    r = rstd.reshape(-1, 1)
    q = q.reshape(-1, 1) if q is not None else None
    # the effective weight o + gamma (in the accumulation dtype: float32 for float16)
    w = offset_weight(weight.reshape(-1), cache.offset,
                      np.promote_types(weight.dtype, np.float32) if cache.offset else None) \
        if weight is not None else None
    if cache.wide is None:
        dx, dweight = _backward(dy2, rows, r, q, w)
    else:  # the rows done in a wider dtype by the forward: their backward too. The others as
        # usual, in place (a row's sums must not depend on where it sits in the matrix), with
        # those rows' dy and r set to 0 (their terms of the sums are exactly 0)
        extreme, sub = cache.wide
        dy0, r0 = dy2.copy(), r.copy()
        dy0[extreme], r0[extreme] = 0, 0
        q0 = None if q is None else q.copy()
        if q0 is not None:
            q0[extreme] = 1
        dx, dweight = _backward(dy0, rows, r0, q0, w)
        grads = rms_norm_backward(dy2[extreme].astype(sub.x.dtype), sub)
        with np.errstate(over="ignore", under="ignore"):  # rounded to the dtypes, as exact
            dx[extreme] = grads.dx
            if weight is not None:
                dweight += grads.dweight
    if weight is not None:
        dweight = dweight.reshape(weight.shape).astype(weight.dtype, copy=False)
    return RMSNormGrads(dx.reshape(dy.shape), dweight)


def _backward(dy2, rows, r, q, w):
    """``(dx, dweight)`` of rows (rows, N), ``dweight`` in the accumulation dtype. float16 is
    worked in float32 (the terms of dx cancel: a float16 residue times r overflows)."""
    acc = np.promote_types(rows.dtype, np.float32)
    dx = np.empty(rows.shape, dtype=acc if rows.dtype == np.float16 else rows.dtype)
    dweight = np.zeros(rows.shape[1], acc) if w is not None else None
    with np.errstate(invalid="ignore", over="ignore"):  # NaN in, NaN out; inf where exact
        for blk in row_blocks(rows.shape[0], rows.shape[1] * rows.itemsize):
            part = _backward_rows(dy2[blk].astype(dx.dtype, copy=False),
                                  rows[blk].astype(dx.dtype, copy=False), r[blk],
                                  None if q is None else q[blk], w, dx[blk])
            if w is not None:
                dweight += part
    return dx.astype(rows.dtype, copy=False), dweight


def _backward_rows(dy, x, r, q, w, dx):
    """The backward on a block of rows: ``dy``, ``x``, ``dx`` of shape (rows, N), the columns
    ``r`` and ``q`` (None inside), and ``w`` the flat weight or None. Writes ``dx`` and returns
    the block's part of ``dweight``, the sum of ``dy * xhat`` over its rows (None without
    weight)."""
    n = x.shape[1]
    np.multiply(dy, x, out=dx)  # dy * x for the sums below; later dx itself
    sum_dyx = row_sums(dx.T, r[:, 0]) if w is not None else None  # dy xhat = dy x r
    k = r * row_sums(dx, w)[:, None] / n  # <g xhat>, g = gamma dy
    if q is not None:  # outside: k / q, and 0 on zero rows (where xhat = 0, so k = 0 too)
        k = np.divide(k, q, out=np.zeros_like(k), where=q > 0)
    with row_broadcasting(n, x.size):
        xk = np.multiply(x, r * k)          # xhat k
        if w is not None:
            np.multiply(dy, w, out=dx)      # g
            dx -= xk
        else:
            np.subtract(dy, xk, out=dx)
        dx *= r
    return sum_dyx


def _rows(x, axes):
    """``x`` as a 2-D array (rows, N), N the product of the normalized axes."""
    n = axis_count(x.shape, axes)
    return x.reshape(axis_count(x.shape, range(x.ndim - len(axes))), n)


rms_norm = custom_vjp(rms_norm_forward, rms_norm_backward, ("x", "weight"))
rms_norm.__doc__ = \
    """Differentiable RMS normalization (engine op); see :func:`rms_norm_forward`."""


def rms_norm_composite(x, normalized_shape, weight=None, eps=None, *, eps_placement="inside",
                       offset=0.0, casting_mode=None):
    """The same math with engine primitives only: the engine derives its own gradient
    (``casting_mode`` changes nothing in float64)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    axes = trailing_axes(x.ndim, len(shape))
    eps = default_eps(x.dtype) if eps is None else eps
    ms = ag.mean(x * x, axes, keepdims=True)
    if eps_placement == "outside":
        xhat = x / (ag.sqrt(ms) + eps)
    else:
        xhat = x / ag.sqrt(ms + eps)
    if weight is None:
        return xhat
    return xhat * (weight + offset) if offset else xhat * weight


# ----------------------------------------------------------------------------------------------
# Inputs for the tests, the goldens and the CLI
# ----------------------------------------------------------------------------------------------
def _case(rng, name, shape, nd, eps=None, affine=True, x=None, outside=False, dtype=np.float64,
          offset=0.0, casting_mode=None, weight=None):
    x = rng.standard_normal(shape) if x is None else x
    p = shape[len(shape) - nd:]
    if weight is None and affine:  # zero-centred (small) with an offset: Gemma's weights
        weight = 0.3 * rng.standard_normal(p) if offset else rng.standard_normal(p) + 1.0
    arrays = tuple(None if a is None else a.astype(dtype) for a in (x, weight))
    kwargs = dict(normalized_shape=p, eps=eps)
    if outside:
        kwargs["eps_placement"] = "outside"
    if offset:
        kwargs["offset"] = offset
    if casting_mode is not None:
        kwargs["casting_mode"] = casting_mode
    return SampleInput(name, arrays, kwargs)


def _near_minus(rng, p, offset):
    """A weight within a few ULPs of -offset in places (o + weight tiny: where forming the
    product as xhat weight + xhat offset would cancel)."""
    w = 0.3 * rng.standard_normal(p)
    w.flat[::2] = -offset * (1 + np.ldexp(rng.integers(-8, 9, w.flat[::2].shape), -50))
    return w


def sample_inputs(rng):
    yield _case(rng, "(4,6)-eps-None", (4, 6), 1)
    yield _case(rng, "(2,3,5)-nd2-eps1e-6", (2, 3, 5), 2, eps=1e-6)
    yield _case(rng, "(3,7)-plain-eps0.1", (3, 7), 1, eps=0.1, affine=False)
    yield _case(rng, "(5,1)-one-element-rows-eps0.5", (5, 1), 1, eps=0.5)
    yield _case(rng, "(2,2,3)-nd3", (2, 2, 3), 3, eps=1e-5)
    constant = np.repeat(rng.standard_normal((3, 1)), 6, axis=1)
    yield _case(rng, "(3,6)-constant-rows", (3, 6), 1, eps=1e-5, x=constant)
    yield _case(rng, "(3,5)-mean100", (3, 5), 1, x=100.0 + rng.standard_normal((3, 5)))
    zero_row = rng.standard_normal((3, 4))
    zero_row[1] = 0.0
    yield _case(rng, "(3,4)-zero-row-eps1e-3", (3, 4), 1, eps=1e-3, x=zero_row)
    yield _case(rng, "(2,8)-small-rows-eps1", (2, 8), 1, eps=1.0,
                x=0.3 * rng.standard_normal((2, 8)))
    # eps outside the square root (the authors' PyTorch code); no zero rows: sqrt(m) has a cone
    # there, which central differences cannot resolve (tested in tests/norms/test_rms_norm.py)
    yield _case(rng, "(4,6)-outside-eps1e-8", (4, 6), 1, eps=1e-8, outside=True)
    yield _case(rng, "(3,7)-outside-plain-eps0.1", (3, 7), 1, eps=0.1, affine=False, outside=True)
    yield _case(rng, "(2,3,4)-outside-nd2-eps-None", (2, 3, 4), 2, outside=True)
    yield _case(rng, "(2,8)-outside-small-rows-eps1", (2, 8), 1, eps=1.0, outside=True,
                x=0.3 * rng.standard_normal((2, 8)))
    yield _case(rng, "(3,5)-outside-mean100", (3, 5), 1, eps=1e-5, outside=True,
                x=100.0 + rng.standard_normal((3, 5)))
    # kernel conventions: a weight offset (Gemma, TE's zero-centred gamma), casting modes
    yield _case(rng, "(4,6)-offset1", (4, 6), 1, eps=1e-6, offset=1.0)
    yield _case(rng, "(3,8)-offset1-weight-near-minus-offset", (3, 8), 1, eps=1e-6, offset=1.0,
                weight=_near_minus(rng, (8,), 1.0))
    yield _case(rng, "(2,3,4)-outside-nd2-offset-0.5", (2, 3, 4), 2, eps=1e-5, outside=True,
                offset=-0.5)
    for mode in CASTING_MODES:
        yield _case(rng, f"(4,6)-{mode}", (4, 6), 1, eps=1e-6, casting_mode=mode)
        yield _case(rng, f"(3,5)-{mode}-offset1", (3, 5), 1, eps=1e-6, casting_mode=mode,
                    offset=1.0)


def oracle_inputs(rng):
    yield _case(rng, "(37,1000)", (37, 1000), 1)
    yield _case(rng, "(37,1000)-eps1e-6", (37, 1000), 1, eps=1e-6)
    yield _case(rng, "(3,1)-one-element-rows", (3, 1), 1, eps=1e-5)
    yield _case(rng, "(4,7,13)-nd2", (4, 7, 13), 2)
    yield _case(rng, "(2,65536)-long-rows", (2, 65536), 1, eps=1e-5)
    yield _case(rng, "(8,129)-mean1e4-std1e-3", (8, 129), 1,
                x=1e4 + 1e-3 * rng.standard_normal((8, 129)))
    zeros = rng.standard_normal((8, 100))
    zeros[::3] = 0.0
    yield _case(rng, "(8,100)-zero-rows", (8, 100), 1, x=zeros)
    yield _case(rng, "(8,100)-constant-rows", (8, 100), 1,
                x=np.repeat(rng.standard_normal((8, 1)), 100, axis=1))
    # eps dominates: y ~ x / sqrt(eps)
    yield _case(rng, "(6,33)-tiny-scale", (6, 33), 1, x=1e-20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(6,33)-huge-scale", (6, 33), 1, x=1e20 * rng.standard_normal((6, 33)))
    yield _case(rng, "(37,1000)-outside-eps1e-8", (37, 1000), 1, eps=1e-8, outside=True)
    yield _case(rng, "(6,33)-outside-tiny-scale", (6, 33), 1, eps=1e-8, outside=True,
                x=1e-10 * rng.standard_normal((6, 33)))
    # kernel conventions (a candidate may also claim one for every case: check(...,
    # conventions=...)); eps 1e-6 as in Llama and Gemma
    yield _case(rng, "(37,1000)-offset1", (37, 1000), 1, eps=1e-6, offset=1.0)
    yield _case(rng, "(8,257)-offset1-weight-near-minus-offset", (8, 257), 1, eps=1e-6,
                offset=1.0, weight=_near_minus(rng, (257,), 1.0))
    for mode in CASTING_MODES:
        yield _case(rng, f"(37,1000)-{mode}", (37, 1000), 1, eps=1e-6, casting_mode=mode)
        yield _case(rng, f"(19,515)-{mode}-offset1", (19, 515), 1, eps=1e-6, casting_mode=mode,
                    offset=1.0)


def error_inputs():
    x = np.ones((2, 3))
    yield ErrorInput(SampleInput("list x", ([[1.0, 2.0]], None), dict(normalized_shape=2)),
                     TypeError, r"rms_norm: `x` must be a numpy.ndarray")
    yield ErrorInput(SampleInput("int x", (np.ones((2, 3), dtype=int), None),
                                 dict(normalized_shape=3)), TypeError, r"floating dtype")
    yield ErrorInput(SampleInput("shape", (x, None), dict(normalized_shape=(2,))),
                     ValueError, r"`normalized_shape` \(2,\) must equal the trailing dimensions")
    yield ErrorInput(SampleInput("shape too long", (x, None), dict(normalized_shape=(1, 2, 3))),
                     ValueError, r"`normalized_shape` \(1, 2, 3\) must equal the trailing")
    yield ErrorInput(SampleInput("shape empty", (x, None), dict(normalized_shape=())),
                     ValueError, r"`normalized_shape` must be an int or a non-empty tuple")
    yield ErrorInput(SampleInput("weight", (x, np.ones(2)), dict(normalized_shape=3)),
                     ValueError, r"`weight` must have shape \(3,\), got \(2,\)")
    yield ErrorInput(SampleInput("int weight", (x, np.ones(3, dtype=int)),
                                 dict(normalized_shape=3)),
                     TypeError, r"`weight` must have a floating dtype")
    yield ErrorInput(SampleInput("eps", (x, None), dict(normalized_shape=3, eps=-1.0)),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("eps nan", (x, None), dict(normalized_shape=3, eps=float("nan"))),
                     ValueError, r"`eps` must be a finite number >= 0")
    yield ErrorInput(SampleInput("placement", (x, None),
                                 dict(normalized_shape=3, eps_placement="both")),
                     ValueError, r"`eps_placement` must be 'inside' or 'outside', got 'both'")
    yield ErrorInput(SampleInput("casting mode", (x, np.ones(3)),
                                 dict(normalized_shape=3, casting_mode="bf16")),
                     ValueError, r"`casting_mode` must be None, 'llama', 'gemma' or 'none'")
    yield ErrorInput(SampleInput("offset nan", (x, np.ones(3)),
                                 dict(normalized_shape=3, offset=float("nan"))),
                     ValueError, r"`offset` must be a finite number")


def _torch_call(torch, x, weight, *, normalized_shape, eps=None, eps_placement="inside",
                offset=0.0, casting_mode=None):
    if casting_mode is None and eps_placement == "inside":
        w = weight if not offset else offset + weight   # o + gamma formed first, in its dtype
        return torch.nn.functional.rms_norm(x, normalized_shape, w, eps)
    # the outside placement and the casting modes, which PyTorch has not: with torch ops, in
    # the dtypes each mode names (HF LlamaRMSNorm, GemmaRMSNorm; Liger-Kernel's modes)
    nd = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-nd, 0))
    if eps is None:
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    t = x if casting_mode == "none" else x.float() if x.dtype in (torch.float16,
                                                                     torch.bfloat16) else x
    ms = torch.mean(t * t, dim=dims, keepdim=True)
    xhat = t / (torch.sqrt(ms) + eps) if eps_placement == "outside" else \
        t * torch.rsqrt(ms + eps)
    if casting_mode != "gemma":
        xhat = xhat.to(x.dtype)                 # llama: rounded before the weight multiply
    if weight is not None:
        w = weight.to(xhat.dtype)               # gemma: the weight in float32
        xhat = xhat * (offset + w if offset else w)
    return xhat.to(x.dtype)


def _layer_init(features, *, eps=None, elementwise_affine=True, eps_placement="inside",
                offset=0.0, casting_mode=None):
    """``torch.nn.RMSNorm(features, eps, elementwise_affine)``: weight 1 (eps None: the dtype's
    machine epsilon, as PyTorch); ``eps_placement``, ``offset``, ``casting_mode`` as in
    :func:`rms_norm_forward`. With an offset the weight starts at ``1 - offset`` (zeros for
    Gemma's 1, as Gemma and TE's ``zero_centered_gamma`` do): the effective weight is 1."""
    if eps is not None:
        check_eps(eps, "rms_norm")
    offset = check_offset(offset, "rms_norm")
    check_casting_mode(casting_mode, "rms_norm")
    params = dict(weight=np.full(features, 1.0 - offset)) if elementwise_affine else {}
    kwargs = dict(normalized_shape=(features,), eps=eps, eps_placement=eps_placement)
    if offset:
        kwargs["offset"] = offset
    if casting_mode is not None:
        kwargs["casting_mode"] = casting_mode
    return params, {}, kwargs


SPEC = NormSpec(
    name="rms_norm",
    title="Root Mean Square Layer Normalization",
    paper=Paper("Root Mean Square Layer Normalization", "Zhang, Sennrich", 2019,
                "arXiv:1910.07467"),
    forward=rms_norm_forward,
    backward=rms_norm_backward,
    op=rms_norm,
    composite=rms_norm_composite,
    diff_argnames=("x", "weight"),
    sample_inputs=sample_inputs,
    oracle_inputs=oracle_inputs,
    error_inputs=error_inputs,
    # "scale" holds with eps scaled by a^2 (inside) or by a (outside), and not at all when
    # eps=None (eps is then fixed by the dtype): no declaration covers every sample, so the
    # invariance is tested per placement in tests/norms/test_rms_norm.py.
    invariances=(),
    stats_axes=None,  # not standardizing: no zero mean, unit variance
    torch_equivalent="torch.nn.functional.rms_norm",
    torch_call=_torch_call,
    param_layout="trailing",
    layer_init=_layer_init,
)

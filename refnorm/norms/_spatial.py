r"""Shared spatial helpers for the variants with a convolutional branch (SPADE, RN-L) or a
spatial mask (RN-B): a 2-D convolution with its hand-derived backward, and PyTorch's nearest
resize.

The convolution is a cross-correlation with PyTorch's conventions (``F.conv2d``: NCHW input,
OIHW weight, stride 1, zero padding ``padding`` on each side):

.. math::

   y_{n,o,i,j} = b_o + \sum_{c,p,q} w_{o,c,p,q}\;x^{\rm pad}_{n,c,i+p,j+q},

and its VJP, for an upstream :math:`g = \partial L/\partial y`,

.. math::

   \frac{\partial L}{\partial w_{o,c,p,q}} = \sum_{n,i,j} g_{n,o,i,j}\,x^{\rm pad}_{n,c,i+p,j+q},
   \qquad
   \frac{\partial L}{\partial b_o} = \sum_{n,i,j} g_{n,o,i,j},\qquad
   \frac{\partial L}{\partial x^{\rm pad}_{n,c,i+p,j+q}} \mathrel{+}= w_{o,c,p,q}\,g_{n,o,i,j},

the last one scattered tap by tap (:math:`K_h K_w` products of size :math:`N\,O\,H\,W`) and cropped
back to the unpadded input. The engine's ``conv2d`` primitive (:mod:`refnorm.autograd`) is the
independent implementation the composites use; this one works on NumPy arrays, for the
hand-derived backwards.
"""
from __future__ import annotations

import numpy as np


def _padded(x, padding):
    """``x`` (N, C, H, W) with ``padding`` zeros on each side of its spatial axes: the values of
    ``np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))``, without its
    per-call cost (tens of microseconds, most of a small convolution's); ``x`` itself, not a
    copy, without padding (it is only read)."""
    if not padding:
        return x
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * padding, w + 2 * padding), x.dtype)
    xp[:, :, padding:padding + h, padding:padding + w] = x
    return xp


def _windows(xp, kh, kw):
    """View of shape (N, C, OH, OW, KH, KW): the padded input under each output position."""
    return np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))


def conv2d(x, weight, bias=None, padding=0):
    """``F.conv2d(x, weight, bias, stride=1, padding=padding)`` on NumPy arrays."""
    kh, kw = weight.shape[2:]
    if 0 in x.shape[2:]:  # an empty image: an empty output ("same" padding keeps the size)
        return np.zeros((x.shape[0], weight.shape[0]) + x.shape[2:], np.result_type(x, weight))
    xp = _padded(x, padding)
    y = np.tensordot(_windows(xp, kh, kw), weight, axes=([1, 4, 5], [1, 2, 3]))  # (N,OH,OW,O)
    y = np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


def conv2d_backward(g, x, weight, padding=0, *, need_dx=True):
    """``(dx, dweight, dbias)`` of :func:`conv2d` for the upstream ``g`` (``dx`` None unless
    ``need_dx``)."""
    kh, kw = weight.shape[2:]
    if 0 in x.shape[2:]:
        return (np.zeros(x.shape, g.dtype) if need_dx else None, np.zeros(weight.shape, g.dtype),
                np.zeros(weight.shape[0], g.dtype))
    xp = _padded(x, padding)
    windows = _windows(xp, kh, kw)
    finite = np.isfinite(xp)
    if finite.all():
        dweight = np.tensordot(g, windows, axes=([0, 2, 3], [0, 2, 3]))  # (O, C, KH, KW)
    else:  # a non-finite input reaches a weight only through a non-zero upstream: an exact
        #     zero of g (a ReLU that is off) does not turn it into a NaN (0 * NaN)
        clean = _windows(np.where(finite, xp, 0), kh, kw)
        dweight = np.tensordot(g, clean, axes=([0, 2, 3], [0, 2, 3]))
        hit = np.tensordot((g != 0).astype(float), _windows((~finite).astype(float), kh, kw),
                           axes=([0, 2, 3], [0, 2, 3]))
        dweight = np.where(hit > 0, np.nan, dweight)
    dbias = g.sum(axis=(0, 2, 3))
    dx = None
    if need_dx:
        dxp = np.zeros(xp.shape, dtype=np.result_type(g, weight))
        oh, ow = g.shape[2:]
        for p in range(kh):
            for q in range(kw):
                tap = np.tensordot(g, weight[:, :, p, q], axes=([1], [0]))   # (N, OH, OW, C)
                dxp[:, :, p:p + oh, q:q + ow] += tap.transpose(0, 3, 1, 2)
        dx = dxp[:, :, padding:padding + x.shape[2], padding:padding + x.shape[3]]
    return dx, dweight, dbias


def nearest_resize(a, size):
    """``F.interpolate(a, size=size, mode="nearest")`` for an (N, C, H, W) array: output pixel
    ``i`` reads input pixel ``floor(i * in / out)`` along each axis (PyTorch's legacy nearest,
    with its float scale ``in / out``)."""
    (h, w), (oh, ow) = a.shape[2:], tuple(size)
    if (h, w) == (oh, ow):
        return a
    if oh == 0 or ow == 0:
        return np.zeros(a.shape[:2] + (oh, ow), a.dtype)
    rows = _nearest_index(h, oh)
    cols = _nearest_index(w, ow)
    return a[:, :, rows[:, None], cols[None, :]]


def _nearest_index(n_in, n_out):
    """The source index of each output index, computed in float32 as PyTorch's CPU kernel."""
    scale = np.float32(n_in / n_out)
    index = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, n_in - 1)

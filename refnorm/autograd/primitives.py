"""The primitives: the forward computation of every op the engine can differentiate.

Each primitive computes its result with NumPy and records a node with :meth:`Tensor._make`:
the op's name (the key of its rule in :mod:`refnorm.autograd.vjp_rules`), its Tensor parents,
and the non-Tensor arguments its rule needs. Ops built from other primitives (``mean``,
``var``, ``conv2d`` with bias, ...) need no rule of their own.

Arguments may be Tensors, arrays or Python numbers; non-Tensors become constants. A Python
number takes the dtype of the Tensor it meets, so ``x32 * 2.0`` stays float32.
"""
from __future__ import annotations

import builtins
import numbers

import numpy as np

from .tensor import Tensor

_make = Tensor._make


def as_tensor(x, like=None):
    """``x`` as a Tensor; a Python number takes the dtype of ``like`` (a Tensor) if given."""
    if isinstance(x, Tensor):
        return x
    if like is not None and isinstance(x, numbers.Number) and not isinstance(x, bool):
        return _make(np.asarray(x, dtype=like.data.dtype), None, ())
    return Tensor(x)


def _pair(a, b):
    if isinstance(a, Tensor):
        return a, as_tensor(b, a)
    b = as_tensor(b)
    return as_tensor(a, b), b


def _check_axis(axis, ndim, op):
    """Normalise ``axis`` (None, int or tuple) to a tuple of non-negative ints, or raise."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    for a in axes:
        if not isinstance(a, numbers.Integral) or not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"{op}: axis {axis!r} is out of range for an array of {ndim} dims")
    return tuple(sorted(a % builtins.max(ndim, 1) for a in axes))


# ----------------------------------------------------------------------------------------------
# Elementwise arithmetic (broadcasting; the graph walk unbroadcasts the gradients)
# ----------------------------------------------------------------------------------------------
def add(a, b):
    a, b = _pair(a, b)
    return _make(a.data + b.data, "add", (a, b))


def subtract(a, b):
    a, b = _pair(a, b)
    return _make(a.data - b.data, "subtract", (a, b))


def multiply(a, b):
    a, b = _pair(a, b)
    return _make(a.data * b.data, "multiply", (a, b))


def divide(a, b):
    a, b = _pair(a, b)
    return _make(a.data / b.data, "divide", (a, b))


def negative(a):
    a = as_tensor(a)
    return _make(-a.data, "negative", (a,))


def power(a, b):
    """``a ** b``. A constant exponent (a number) is an argument of the node, not a parent."""
    if isinstance(b, numbers.Number) and not isinstance(b, bool):
        a = as_tensor(a)
        return _make(a.data ** b, "power_const", (a,), (b,))
    a, b = _pair(a, b)
    return _make(a.data ** b.data, "power", (a, b))


# ----------------------------------------------------------------------------------------------
# Elementwise functions
# ----------------------------------------------------------------------------------------------
def exp(a):
    a = as_tensor(a)
    return _make(np.exp(a.data), "exp", (a,))


def log(a):
    a = as_tensor(a)
    return _make(np.log(a.data), "log", (a,))


def sqrt(a):
    a = as_tensor(a)
    return _make(np.sqrt(a.data), "sqrt", (a,))


def tanh(a):
    a = as_tensor(a)
    return _make(np.tanh(a.data), "tanh", (a,))


def arctan(a):
    a = as_tensor(a)
    return _make(np.arctan(a.data), "arctan", (a,))


def sigmoid(a):
    a = as_tensor(a)
    # 1 / (1 + exp(-x)) overflows exp for x << 0; this form is exact in both tails.
    x = a.data
    e = np.exp(-np.abs(x))
    return _make(np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False),
                 "sigmoid", (a,))


def abs(a):  # noqa: A001 (mirrors numpy's name)
    a = as_tensor(a)
    return _make(np.abs(a.data), "abs", (a,))


def maximum(a, b):
    a, b = _pair(a, b)
    return _make(np.maximum(a.data, b.data), "maximum", (a, b))


def minimum(a, b):
    a, b = _pair(a, b)
    return _make(np.minimum(a.data, b.data), "minimum", (a, b))


def clip(a, a_min=None, a_max=None):
    """Clamp to ``[a_min, a_max]`` (constants).

    The gradient passes where a bound holds with equality too (as in PyTorch).
    """
    a = as_tensor(a)
    return _make(np.clip(a.data, a_min, a_max), "clip", (a,), (a_min, a_max))


def relu(a):
    return maximum(a, 0.0)


def where(condition, a, b):
    """``a`` where ``condition`` else ``b``; ``condition`` is a constant boolean mask."""
    condition = np.asarray(condition.data if isinstance(condition, Tensor) else condition,
                           dtype=bool)
    a, b = _pair(a, b)
    return _make(np.where(condition, a.data, b.data), "where", (a, b), (condition,))


# ----------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------
def sum(a, axis=None, keepdims=False):  # noqa: A001
    a = as_tensor(a)
    axes = _check_axis(axis, a.ndim, "sum")
    return _make(a.data.sum(axis=axes, keepdims=keepdims), "sum", (a,), (axes, keepdims))


def mean(a, axis=None, keepdims=False):
    a = as_tensor(a)
    axes = _check_axis(axis, a.ndim, "mean")
    count = int(np.prod([a.shape[i] for i in axes]))
    if count == 0:
        raise ValueError(f"mean: the reduced axes {axes} of shape {a.shape} are empty")
    return sum(a, axes, keepdims) / count


def var(a, axis=None, keepdims=False, correction=0):
    """Two-pass variance ``sum((a - mean)**2) / (n - correction)``, from primitives."""
    a = as_tensor(a)
    axes = _check_axis(axis, a.ndim, "var")
    count = int(np.prod([a.shape[i] for i in axes]))
    centred = a - mean(a, axes, keepdims=True)
    return sum(centred * centred, axes, keepdims) / (count - correction)


def max(a, axis=None, keepdims=False):  # noqa: A001
    """Maximum over ``axis``; ties share the gradient equally (as ``torch.amax``)."""
    a = as_tensor(a)
    axes = _check_axis(axis, a.ndim, "max")
    if builtins.any(a.shape[i] == 0 for i in axes):
        raise ValueError(f"max: cannot reduce over an empty axis (shape {a.shape}, axis {axis})")
    return _make(a.data.max(axis=axes, keepdims=keepdims), "max", (a,), (axes, keepdims))


def softmax(a, axis=-1):
    a = as_tensor(a)
    x = a.data - a.data.max(axis=axis, keepdims=True)  # shift: exp cannot overflow
    e = np.exp(x)
    return _make(e / e.sum(axis=axis, keepdims=True), "softmax", (a,), (axis,))


def log_softmax(a, axis=-1):
    a = as_tensor(a)
    x = a.data - a.data.max(axis=axis, keepdims=True)
    return _make(x - np.log(np.exp(x).sum(axis=axis, keepdims=True)), "log_softmax", (a,), (axis,))


# ----------------------------------------------------------------------------------------------
# Shape ops
# ----------------------------------------------------------------------------------------------
def reshape(a, shape):
    a = as_tensor(a)
    try:
        data = a.data.reshape(shape)
    except ValueError as exc:
        raise ValueError(f"reshape: cannot reshape shape {a.shape} to {shape}: {exc}") from None
    return _make(data, "reshape", (a,))


def transpose(a, axes=None):
    a = as_tensor(a)
    axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(ax % a.ndim for ax in axes)
    if sorted(axes) != list(range(a.ndim)):
        raise ValueError(f"transpose: axes {axes} is not a permutation of {a.ndim} axes")
    return _make(a.data.transpose(axes), "transpose", (a,), (axes,))


def swapaxes(a, axis1, axis2):
    a = as_tensor(a)
    axes = list(range(a.ndim))
    axes[axis1], axes[axis2] = axes[axis2], axes[axis1]
    return transpose(a, axes)


def broadcast_to(a, shape):
    a = as_tensor(a)
    try:
        data = np.broadcast_to(a.data, shape)
    except ValueError:
        raise ValueError(f"broadcast_to: shape {a.shape} cannot be broadcast to {shape}") from None
    return _make(data, "broadcast_to", (a,))


def getitem(a, index):
    """``a[index]`` for basic and advanced indices; repeated indices add up in the gradient."""
    a = as_tensor(a)
    if isinstance(index, Tensor):
        index = index.data
    return _make(a.data[index], "getitem", (a,), (index,))


def concatenate(tensors, axis=0):
    tensors = tuple(as_tensor(t) for t in tensors)
    if not tensors:
        raise ValueError("concatenate: `tensors` must hold at least one array")
    data = np.concatenate([t.data for t in tensors], axis=axis)
    sizes = np.cumsum([t.shape[axis] for t in tensors])[:-1]
    return _make(data, "concatenate", tensors, (axis % data.ndim, tuple(sizes)))


def stack(tensors, axis=0):
    tensors = tuple(as_tensor(t) for t in tensors)
    if not tensors:
        raise ValueError("stack: `tensors` must hold at least one array")
    data = np.stack([t.data for t in tensors], axis=axis)
    return _make(data, "stack", tensors, (axis % data.ndim,))


def pad(a, pad_width, value=0.0):
    """Constant padding with NumPy's ``pad_width`` convention: ``((before, after), ...)``."""
    a = as_tensor(a)
    widths = np.broadcast_to(np.asarray(pad_width, dtype=int), (a.ndim, 2))
    if (widths < 0).any():
        raise ValueError(f"pad: pad_width must be non-negative, got {pad_width!r}")
    data = np.pad(a.data, widths, mode="constant", constant_values=value)
    return _make(data, "pad", (a,), (tuple(map(tuple, widths)),))


# ----------------------------------------------------------------------------------------------
# Linear algebra and convolution
# ----------------------------------------------------------------------------------------------
def matmul(a, b):
    """Matrix product with NumPy's rules (batch axes broadcast; 1-D operands are promoted)."""
    a, b = _pair(a, b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got shapes "
                         f"{a.shape} and {b.shape}")
    k_a, k_b = a.shape[-1], b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned: a.shape[-1] "
                         f"= {k_a} but b's contracted axis has {k_b}")
    if a.ndim == 1:  # promote (k,) to (1, k), then drop the new axis
        r = matmul(reshape(a, (1, k_a)), b)  # (..., 1, n), or (1,) when b is 1-D too
        return reshape(r, r.shape[:-2] + r.shape[-1:] if b.ndim > 1 else ())
    if b.ndim == 1:
        return reshape(matmul(a, reshape(b, (k_b, 1))), a.shape[:-1])
    return _make(a.data @ b.data, "matmul", (a, b))


def _conv_windows(x, kernel, stride, dilation):
    """View of shape (N, C, OH, OW, KH, KW): the input patch under each output position."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    windows = np.lib.stride_tricks.sliding_window_view(x, (span_h, span_w), axis=(2, 3))
    return windows[:, :, ::sh, ::sw, ::dh, ::dw]


def _pair_arg(value, name):
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or not builtins.all(isinstance(v, numbers.Integral) for v in pair):
        raise ValueError(f"conv2d: `{name}` must be an int or a pair of ints, got {value!r}")
    return pair


def _conv2d_valid(x, weight, stride, dilation):
    windows = _conv_windows(x.data, weight.shape[2:], stride, dilation)
    out = np.tensordot(windows, weight.data, axes=([1, 4, 5], [1, 2, 3]))  # (N, OH, OW, O)
    return _make(np.ascontiguousarray(out.transpose(0, 3, 1, 2)), "conv2d", (x, weight),
                 (stride, dilation))


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation with PyTorch's ``conv2d`` signature and NCHW layout.

    ``x``: (N, C, H, W); ``weight``: (O, C // groups, KH, KW); ``bias``: (O,) or None.
    """
    x, weight = as_tensor(x), as_tensor(weight)
    if x.ndim != 4:
        raise ValueError(f"conv2d: `x` must be 4-D (N, C, H, W), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d: `weight` must be 4-D (O, C/groups, KH, KW), got shape "
                         f"{weight.shape}")
    if not isinstance(groups, numbers.Integral) or groups < 1 or x.shape[1] % groups \
            or weight.shape[0] % groups:
        raise ValueError(f"conv2d: `groups` must be a positive int dividing the {x.shape[1]} "
                         f"input and {weight.shape[0]} output channels, got {groups!r}")
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(f"conv2d: `weight` expects {weight.shape[1] * groups} input channels "
                         f"(shape {weight.shape}, groups={groups}) but `x` has {x.shape[1]}")
    stride, padding, dilation = (_pair_arg(value, name) for value, name in (
        (stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    if builtins.min(stride) < 1 or builtins.min(dilation) < 1 or builtins.min(padding) < 0:
        raise ValueError("conv2d: `stride` and `dilation` must be >= 1 and `padding` >= 0")
    (ph, pw) = padding
    if ph or pw:
        x = pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    for size, k, d, name in zip(x.shape[2:], weight.shape[2:], dilation, ("height", "width")):
        if d * (k - 1) + 1 > size:
            raise ValueError(f"conv2d: the kernel {name} {k} (dilation {d}) is larger than the "
                             f"padded input {name} {size}")
    if groups == 1:
        y = _conv2d_valid(x, weight, stride, dilation)
    else:  # each group is an independent convolution on its slice of channels
        ci, co = x.shape[1] // groups, weight.shape[0] // groups
        y = concatenate([_conv2d_valid(x[:, g * ci:(g + 1) * ci], weight[g * co:(g + 1) * co],
                                       stride, dilation) for g in range(groups)], axis=1)
    if bias is not None:
        y = y + reshape(as_tensor(bias), (1, -1, 1, 1))
    return y

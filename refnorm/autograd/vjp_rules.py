r"""The derivative table: one named vector-Jacobian-product rule per primitive.

For a primitive :math:`y = f(a, b, \dots)` and the gradient :math:`g = \partial L/\partial y`
flowing into it, a rule returns :math:`(\partial L/\partial a, \partial L/\partial b, \dots)`,
each before unbroadcasting (the graph walk sums over broadcast axes, once, for every rule).

Every rule has the signature ``rule(g, out, inputs, *args)``: ``out`` is the primitive's result,
``inputs`` its parents' values, ``args`` the non-Tensor arguments the primitive recorded.
During an ordinary backward pass these are NumPy arrays. With ``create_graph=True`` they are
Tensors and the rule's own operations are recorded, so the result can be differentiated again.
That is why the rules below use only operators, ``.sum``/``.reshape``/``.transpose`` and the
small helpers at the top of this file, which work on both. Rules in :data:`ARRAY_ONLY_RULES`
(indexing, convolution, hand-derived ``custom_vjp`` nodes) are written on arrays only.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import primitives as P
from .tensor import Tensor

VJP_RULES = {}
ARRAY_ONLY_RULES = {"getitem", "conv2d", "custom_vjp", "custom_vjp_output"}


def rule(name):
    """Register the decorated function as the VJP rule of primitive ``name``."""
    def register(fn):
        VJP_RULES[name] = fn
        return fn
    return register


# ----- helpers that work on NumPy arrays and on Tensors --------------------------------------
def _value(x):
    """The raw array (masks and signs are constants, never graph nodes)."""
    return x.data if isinstance(x, Tensor) else x


def _as_mask(condition, like):
    """A boolean array as a float mask of ``like``'s dtype."""
    return condition.astype(_value(like).dtype)


def _broadcast(g, shape):
    return P.broadcast_to(g, shape) if isinstance(g, Tensor) else np.broadcast_to(g, shape)


def _where(condition, a, b):
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return P.where(condition, a, b)
    return np.where(condition, a, b)


def _log(x):
    return P.log(x) if isinstance(x, Tensor) else np.log(x)


def _exp(x):
    return P.exp(x) if isinstance(x, Tensor) else np.exp(x)


def _swap_last(x):
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return x.transpose(axes)


def _expand(g, axes, keepdims, shape):
    """Undo a reduction over ``axes``: put the reduced axes back and broadcast to ``shape``."""
    if not keepdims:
        g = g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape)))
    return _broadcast(g, shape)


# ----- elementwise arithmetic ------------------------------------------------------------------
@rule("add")
def add_vjp(g, out, inputs):
    return g, g


@rule("subtract")
def subtract_vjp(g, out, inputs):
    return g, -g


@rule("multiply")
def multiply_vjp(g, out, inputs):
    a, b = inputs
    return g * b, g * a


@rule("divide")
def divide_vjp(g, out, inputs):
    # d(a/b)/da = 1/b and d(a/b)/db = -a/b^2 = -(1/b) * (a/b)
    ga = g / inputs[1]
    return ga, -ga * out


@rule("negative")
def negative_vjp(g, out, inputs):
    return (-g,)


@rule("power_const")
def power_const_vjp(g, out, inputs, exponent):
    (a,) = inputs
    return (g * exponent * a ** (exponent - 1),)


@rule("power")
def power_vjp(g, out, inputs):
    a, b = inputs
    # d(a^b)/db = a^b log a, defined for a > 0; elsewhere a^b is real only for integer b,
    # where the exponent cannot vary continuously, and we return 0.
    log_a = _log(_where(_value(a) > 0, a, 1.0))
    return g * b * a ** (b - 1), g * out * log_a


# ----- elementwise functions -------------------------------------------------------------------
@rule("exp")
def exp_vjp(g, out, inputs):
    return (g * out,)


@rule("log")
def log_vjp(g, out, inputs):
    return (g / inputs[0],)


@rule("sqrt")
def sqrt_vjp(g, out, inputs):
    return (g / (2 * out),)


@rule("tanh")
def tanh_vjp(g, out, inputs):
    return (g * (1 - out * out),)


@rule("arctan")
def arctan_vjp(g, out, inputs):
    a = inputs[0]
    return (g / (1 + a * a),)


@rule("sigmoid")
def sigmoid_vjp(g, out, inputs):
    return (g * out * (1 - out),)


@rule("abs")
def abs_vjp(g, out, inputs):
    # sign(0) = 0: the subgradient of |x| at the kink that PyTorch and JAX also pick
    return (g * np.sign(_value(inputs[0])),)


@rule("maximum")
def maximum_vjp(g, out, inputs):
    a, b = _value(inputs[0]), _value(inputs[1])
    share_a = _as_mask(a > b, g) + 0.5 * _as_mask(a == b, g)  # a tie splits the gradient
    return g * share_a, g * (1 - share_a)


@rule("minimum")
def minimum_vjp(g, out, inputs):
    a, b = _value(inputs[0]), _value(inputs[1])
    share_a = _as_mask(a < b, g) + 0.5 * _as_mask(a == b, g)
    return g * share_a, g * (1 - share_a)


@rule("clip")
def clip_vjp(g, out, inputs, a_min, a_max):
    a = _value(inputs[0])
    inside = np.ones(a.shape, dtype=bool)
    if a_min is not None:
        inside &= a >= a_min
    if a_max is not None:
        inside &= a <= a_max
    return (g * _as_mask(inside, g),)


@rule("where")
def where_vjp(g, out, inputs, condition):
    return _where(condition, g, 0.0), _where(condition, 0.0, g)


# ----- reductions ------------------------------------------------------------------------------
@rule("sum")
def sum_vjp(g, out, inputs, axes, keepdims):
    return (_expand(g, axes, keepdims, inputs[0].shape),)


@rule("max")
def max_vjp(g, out, inputs, axes, keepdims):
    a = _value(inputs[0])
    winners = _as_mask(a == a.max(axis=axes, keepdims=True), g)
    share = winners / winners.sum(axis=axes, keepdims=True)  # ties share equally
    return (_expand(g, axes, keepdims, a.shape) * share,)


@rule("softmax")
def softmax_vjp(g, out, inputs, axis):
    return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)


@rule("log_softmax")
def log_softmax_vjp(g, out, inputs, axis):
    return (g - _exp(out) * g.sum(axis=axis, keepdims=True),)


# ----- shape ops -------------------------------------------------------------------------------
@rule("reshape")
def reshape_vjp(g, out, inputs):
    return (g.reshape(inputs[0].shape),)


@rule("transpose")
def transpose_vjp(g, out, inputs, axes):
    return (g.transpose(tuple(np.argsort(axes))),)


@rule("broadcast_to")
def broadcast_to_vjp(g, out, inputs):
    return (g,)  # the graph walk's unbroadcast sums g back to the input's shape


def _basic_index(index):
    """Whether ``index`` is basic indexing (ints, slices, None, Ellipsis): it selects every
    element at most once."""
    for i in index if isinstance(index, tuple) else (index,):
        if not (i is None or i is Ellipsis or isinstance(i, slice)
                or isinstance(i, numbers.Integral) and not isinstance(i, (bool, np.bool_))):
            return False
    return True


@rule("getitem")
def getitem_vjp(g, out, inputs, index):
    a = inputs[0]
    ga = np.zeros(a.shape, dtype=g.dtype)
    if _basic_index(index):
        ga[index] = g  # no element is selected twice: a plain (much faster) assignment
    else:
        np.add.at(ga, index, g)  # add.at, not ga[index] = g: a repeated index must accumulate
    return (ga,)


@rule("concatenate")
def concatenate_vjp(g, out, inputs, axis, sizes):
    bounds = (0,) + sizes + (g.shape[axis],)
    lead = (slice(None),) * axis
    return tuple(g[lead + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:]))


@rule("stack")
def stack_vjp(g, out, inputs, axis):
    lead = (slice(None),) * axis
    return tuple(g[lead + (i,)] for i in range(len(inputs)))


@rule("pad")
def pad_vjp(g, out, inputs, widths):
    return (g[tuple(slice(lo, n - hi) for (lo, hi), n in zip(widths, g.shape))],)


# ----- linear algebra and convolution ----------------------------------------------------------
@rule("matmul")
def matmul_vjp(g, out, inputs):
    # Y = A B  =>  dA = G B^T, dB = A^T G; batch axes are summed by the central unbroadcast.
    a, b = inputs
    return g @ _swap_last(b), _swap_last(a) @ g


@rule("conv2d")
def conv2d_vjp(g, out, inputs, stride, dilation):
    # y[n,o,i,j] = sum_{c,p,q} x[n, c, i*sh + p*dh, j*sw + q*dw] * w[o,c,p,q]
    x, w = inputs
    (kh, kw), (sh, sw), (dh, dw) = w.shape[2:], stride, dilation
    windows = P._conv_windows(x, (kh, kw), stride, dilation)       # (N, C, OH, OW, KH, KW)
    dweight = np.tensordot(g, windows, axes=([0, 2, 3], [0, 2, 3]))  # (O, C, KH, KW)
    # Each kernel tap (p, q) reads a strided sub-grid of x; scatter its share back there.
    dx = np.zeros(x.shape, dtype=g.dtype)
    oh, ow = g.shape[2:]
    for p in range(kh):
        for q in range(kw):
            tap = np.tensordot(g, w[:, :, p, q], axes=([1], [0]))   # (N, OH, OW, C)
            rows = slice(p * dh, p * dh + sh * (oh - 1) + 1, sh)
            cols = slice(q * dw, q * dw + sw * (ow - 1) + 1, sw)
            dx[:, :, rows, cols] += tap.transpose(0, 3, 1, 2)
    return dx, dweight


# ----- hand-derived ops ------------------------------------------------------------------------
@rule("custom_vjp")
def custom_vjp_vjp(g, out, inputs, backward, cache, positions, n_grads, on_backward_state):
    grads = backward(g, cache)
    if on_backward_state is not None and len(grads) > n_grads:   # the backward's new state
        on_backward_state(dict(zip(grads._fields[n_grads:], grads[n_grads:])))
    return tuple(grads[i] for i in positions)


@rule("custom_vjp_output")
def custom_vjp_output_vjp(g, out, inputs, offset):
    # one output of a node with several (custom_vjp._several): its gradient, at its offset in
    # the flat gradient of the hub, zeros elsewhere
    hub = inputs[0]
    flat = np.zeros(hub.shape, np.result_type(hub.dtype, g.dtype))
    flat[offset:offset + g.size] = np.ravel(g)
    return (flat,)

"""The Tensor: an ndarray, an optional gradient, and the edge back to the op that made it.

A Tensor made by the user is a *leaf*. A Tensor made by a primitive (``a + b``, ``exp(a)``) is
a *node*: when recording is on and a parent requires a gradient, it keeps its parents, the
primitive's name and the primitive's non-Tensor arguments, which is all the backward pass needs.

Only floating-point data is differentiated. Integer and boolean input is converted to float64
(the default dtype); float16, float32 and float64 are kept as given.
"""
from __future__ import annotations

import numpy as np

from . import graph

DEFAULT_DTYPE = np.float64
_mode = graph._GradMode  # read on every recorded op: bind it once


def _as_float_array(data, dtype, what="data"):
    """Convert ``data`` to a floating ndarray, or raise a TypeError that says what was wrong."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as exc:  # ragged nested lists, for instance
        raise TypeError(f"Tensor: {what} must be a numeric array; could not convert it: {exc}")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"Tensor: dtype must be a floating dtype, got {dtype}")
    if array.dtype.kind == "f":
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)
    if array.dtype.kind in "biu":
        return array.astype(dtype or DEFAULT_DTYPE)
    raise TypeError(
        f"Tensor: {what} must be a numeric (bool, int or float) array, got dtype {array.dtype}")


class Tensor:
    """An n-dimensional array that can record the operations applied to it.

    Parameters
    ----------
    data : array_like
        Numeric data. Integer and bool data become float64; float data keeps its dtype.
    requires_grad : bool
        Whether gradients with respect to this Tensor are wanted.
    dtype : numpy dtype, optional
        A floating dtype to convert to.
    """

    # Operations with NumPy arrays must come to Tensor's reflected operators, not to NumPy.
    __array_ufunc__ = None
    __slots__ = ("data", "grad", "requires_grad", "_parents", "_op", "_args", "__weakref__")

    def __init__(self, data, requires_grad=False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        self.data = _as_float_array(data, dtype)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._op = None
        self._args = ()

    # ----- construction by primitives (fast path: no conversion, no checks) -----
    @classmethod
    def _make(cls, data, op, parents, args=()):
        out = cls.__new__(cls)
        out.data = data
        out.grad = None
        if _mode.enabled:
            for p in parents:  # a plain loop: any() with a generator costs more here
                if p.requires_grad:
                    out.requires_grad = True
                    out._parents, out._op, out._args = parents, op, args
                    return out
        out.requires_grad = False
        out._parents, out._op, out._args = (), None, ()
        return out

    # ----- array-like properties -----
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    T = property(lambda self: P.transpose(self))
    mT = property(lambda self: P.swapaxes(self, -1, -2))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = np.array2string(self.data, separator=", ", prefix="Tensor(")
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({body}{flag})"

    def numpy(self):
        """The data as an ndarray (no copy)."""
        return self.data

    def item(self):
        return self.data.item()

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor._make(self.data, None, ())

    @property
    def is_leaf(self):
        return not self._parents

    # ----- backward -----
    def backward(self, gradient=None, *, create_graph=False):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires a gradient.

        ``gradient`` is the upstream gradient (same shape as ``self``); it may be omitted only
        when ``self`` holds one element. Gradients add up over repeated calls, as in PyTorch.
        """
        if not self.requires_grad:
            raise ValueError("backward: this Tensor does not require a gradient (no input "
                             "with requires_grad=True reaches it, or it was made under no_grad)")
        g = _upstream(self, gradient, create_graph)
        for leaf, g_leaf in graph.backprop(self, g, create_graph=create_graph).values():
            leaf.grad = g_leaf if leaf.grad is None else leaf.grad + g_leaf

    # ----- operators: thin aliases of the primitives -----
    def __add__(self, other): return P.add(self, other)
    def __radd__(self, other): return P.add(other, self)
    def __sub__(self, other): return P.subtract(self, other)
    def __rsub__(self, other): return P.subtract(other, self)
    def __mul__(self, other): return P.multiply(self, other)
    def __rmul__(self, other): return P.multiply(other, self)
    def __truediv__(self, other): return P.divide(self, other)
    def __rtruediv__(self, other): return P.divide(other, self)
    def __pow__(self, other): return P.power(self, other)
    def __rpow__(self, other): return P.power(other, self)
    def __matmul__(self, other): return P.matmul(self, other)
    def __rmatmul__(self, other): return P.matmul(other, self)
    def __neg__(self): return P.negative(self)
    def __pos__(self): return self
    def __abs__(self): return P.abs(self)
    def __getitem__(self, index): return P.getitem(self, index)

    # Comparisons give plain boolean arrays: masks are constants, not graph nodes.
    def __lt__(self, other): return self.data < _data(other)
    def __le__(self, other): return self.data <= _data(other)
    def __gt__(self, other): return self.data > _data(other)
    def __ge__(self, other): return self.data >= _data(other)
    __hash__ = object.__hash__

    # ----- methods mirroring ndarray's -----
    def sum(self, axis=None, keepdims=False): return P.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return P.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return P.max(self, axis, keepdims)

    def var(self, axis=None, keepdims=False, correction=0):
        return P.var(self, axis, keepdims, correction)

    def reshape(self, *shape):
        return P.reshape(self, shape[0] if len(shape) == 1 else shape)

    def transpose(self, *axes):
        return P.transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    def exp(self): return P.exp(self)
    def log(self): return P.log(self)
    def sqrt(self): return P.sqrt(self)
    def tanh(self): return P.tanh(self)


def _data(x):
    return x.data if isinstance(x, Tensor) else x


def _upstream(out, gradient, create_graph):
    """Check and convert the upstream gradient given to ``backward``."""
    if gradient is None:
        if out.data.size != 1:
            raise ValueError(
                f"backward: `gradient` is required for a non-scalar output (shape "
                f"{out.data.shape}); pass dL/d(output) with that shape")
        return Tensor(np.ones_like(out.data)) if create_graph else np.ones_like(out.data)
    g = gradient if isinstance(gradient, Tensor) else Tensor(gradient, dtype=out.dtype)
    if g.shape != out.shape:
        raise ValueError(f"backward: `gradient` must have the output's shape {out.shape}, "
                         f"got {g.shape}")
    return g if create_graph else g.data


from . import primitives as P  # noqa: E402  (the primitives need Tensor, defined above)

r"""Assignment 1: autograd primitives (mul, matmul, sum) with broadcasting.

STARTER

A reverse-mode autograd engine needs, for each primitive, its *vector-Jacobian product*: given
the upstream gradient ``dout`` of the output, the gradient of each input. Fill in the four
functions below with NumPy. Then run ``python autograd_primitives.py`` for a quick
self-check, and ``refnorm grade autograd_primitives autograd_primitives.py`` for the grade.

Broadcasting and its adjoint
----------------------------
NumPy broadcasts operands to a common shape: missing leading axes are added, and axes of size
1 are stretched. Every element of a broadcast operand is used several times, so its gradient
is the **sum** of the gradients of all its copies. ``unbroadcast(grad, shape)`` does that:
sum ``grad`` over the added leading axes and, keeping them, over the axes where ``shape`` has
a 1 and ``grad`` does not; the result has exactly ``shape``. It is the adjoint of
``np.broadcast_to(a, grad.shape)``.

The rules
---------
* ``out = a * b`` (broadcasting): ``da = unbroadcast(dout * b, a.shape)``,
  ``db = unbroadcast(dout * a, b.shape)``.
* ``out = a @ b`` (``np.matmul``; ``a`` and ``b`` have 2 or more axes, the leading ones are
  batch axes that broadcast): :math:`dA = dOut\, B^T`, :math:`dB = A^T dOut` with the
  transpose of the last two axes (``np.swapaxes(b, -1, -2)``), each unbroadcast to its
  operand's shape.
* ``out = np.sum(a, axis, keepdims)`` (``axis`` None, an int, possibly negative, or a tuple):
  every element of ``a`` contributes once to one output, so ``da`` is ``dout`` copied back
  along the summed axes (re-insert them first when ``keepdims`` is False).

All gradients are new arrays with the input's shape; never modify the inputs in place.
"""
import numpy as np


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape`` (a tuple); returns an array of that shape."""
    raise NotImplementedError("your code here")


def mul_backward(dout, a, b):
    """Gradients of ``a * b``: returns ``(da, db)``."""
    raise NotImplementedError("your code here")


def matmul_backward(dout, a, b):
    """Gradients of ``a @ b`` (both with 2 or more axes): returns ``(da, db)``."""
    raise NotImplementedError("your code here")


def sum_backward(dout, shape, axis=None, keepdims=False):
    """Gradient of ``np.sum(a, axis=axis, keepdims=keepdims)`` for ``a`` of ``shape``."""
    raise NotImplementedError("your code here")


def _numerical(f, a, dout, h=1e-6):
    """The gradient of sum(dout * f(a)) by central differences."""
    grad = np.zeros_like(a)
    for i in range(a.size):
        ap, am = a.copy(), a.copy()
        ap.flat[i] += h
        am.flat[i] -= h
        grad.flat[i] = np.sum(dout * (f(ap) - f(am))) / (2 * h)
    return grad


def _self_check(seed=0):
    rng = np.random.default_rng(seed)
    print("unbroadcast (2, 3, 4) -> (3, 1):",
          unbroadcast(np.ones((2, 3, 4)), (3, 1)).ravel(), "(expect [8. 8. 8.])")
    a, b = rng.standard_normal((3, 1)), rng.standard_normal((2, 1, 4))
    dout = rng.standard_normal((2, 3, 4))
    da, db = mul_backward(dout, a, b)
    print("mul da:", np.allclose(da, _numerical(lambda t: t * b, a, dout)),
          " db:", np.allclose(db, _numerical(lambda t: a * t, b, dout)))
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5))
    dout = rng.standard_normal((2, 3, 5))
    da, db = matmul_backward(dout, a, b)
    print("matmul da:", np.allclose(da, _numerical(lambda t: t @ b, a, dout)),
          " db:", np.allclose(db, _numerical(lambda t: a @ t, b, dout)))
    a = rng.standard_normal((2, 3, 4))
    dout = rng.standard_normal((2, 4))
    print("sum da:", np.allclose(sum_backward(dout, a.shape, axis=1),
                                 _numerical(lambda t: t.sum(axis=1), a, dout)))


if __name__ == "__main__":
    _self_check()

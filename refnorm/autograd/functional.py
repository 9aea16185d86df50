"""Functional front ends to the backward pass: ``gradients``, ``grad`` and ``value_and_grad``."""
from __future__ import annotations

from . import graph
from .tensor import Tensor, _upstream


def gradients(output, inputs, gradient=None, *, create_graph=False):
    """``d(output)/d(inputs)``, without touching any ``.grad`` (like ``torch.autograd.grad``).

    Returns a tuple with one gradient per input: NumPy arrays, or Tensors that can be
    differentiated again when ``create_graph`` is true. An input that does not reach
    ``output`` gets zeros.
    """
    inputs = tuple(inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor) or not t.requires_grad:
            raise TypeError(f"gradients: `inputs[{i}]` must be a Tensor with requires_grad=True")
    if not output.requires_grad:
        raise ValueError("gradients: `output` does not depend on any input that requires a grad")
    found = graph.backprop(output, _upstream(output, gradient, create_graph),
                           create_graph=create_graph)
    result = []
    for t in inputs:
        g = found.get(id(t), (None, None))[1]
        if g is None:
            g = t.data * 0
            g = Tensor(g) if create_graph else g
        result.append(g)
    return tuple(result)


def value_and_grad(fun, argnums=0):
    """``fun``'s value and its gradient with respect to the positional arguments ``argnums``.

    ``fun`` takes arrays or Tensors and returns a one-element Tensor. The gradients are NumPy
    arrays (HIPS autograd's and JAX's ``grad`` convention).
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

    def wrapped(*args, **kwargs):
        args = list(args)
        for i in nums:
            args[i] = Tensor(args[i], requires_grad=True)
        value = fun(*args, **kwargs)
        if not isinstance(value, Tensor) or value.size != 1:
            raise TypeError("value_and_grad: `fun` must return a one-element Tensor, got "
                            f"{type(value).__name__}")
        grads = gradients(value, [args[i] for i in nums])
        return value.data.reshape(()), grads[0] if single else grads

    return wrapped


def grad(fun, argnums=0):
    """The gradient of a scalar function, as a function (see :func:`value_and_grad`)."""
    vg = value_and_grad(fun, argnums)
    return lambda *args, **kwargs: vg(*args, **kwargs)[1]

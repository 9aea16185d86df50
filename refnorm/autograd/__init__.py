"""``refnorm.autograd``: a minimal reverse-mode automatic differentiation engine in NumPy.

It imports only NumPy. The pieces, each in its own file:

* :mod:`.tensor`: the ``Tensor`` class (data, grad, the edge to the op that made it);
* :mod:`.primitives`: the forward of every primitive op;
* :mod:`.vjp_rules`: the derivative table, one rule per primitive;
* :mod:`.broadcasting`: ``unbroadcast``, the single place that sums over broadcast axes;
* :mod:`.graph`: the iterative topological sort and the accumulating backward pass;
* :mod:`.custom_vjp`: wires a hand-derived ``(forward, backward)`` pair in as one node.

>>> from refnorm.autograd import Tensor, tanh
>>> x = Tensor([0.5, -1.0], requires_grad=True)
>>> (tanh(x) * x).sum().backward()
>>> x.grad.round(6)
array([ 0.855341, -1.181569])
"""
from .custom_vjp import custom_vjp
from .graph import backprop, enable_grad, is_grad_enabled, no_grad
from .primitives import (abs, add, arctan, as_tensor, broadcast_to, clip, concatenate, conv2d,
                         divide, exp, getitem, log, log_softmax, matmul, max, maximum, mean,
                         minimum, multiply, negative, pad, power, relu, reshape, sigmoid, softmax,
                         sqrt, stack, subtract, sum, swapaxes, tanh, transpose, var, where)
from .tensor import Tensor
from .vjp_rules import VJP_RULES
from .functional import grad, gradients, value_and_grad

__all__ = [
    "Tensor", "custom_vjp", "no_grad", "enable_grad", "is_grad_enabled", "backprop", "grad",
    "gradients", "value_and_grad", "VJP_RULES", "as_tensor",
    "add", "subtract", "multiply", "divide", "negative", "power", "exp", "log", "sqrt", "tanh",
    "arctan", "sigmoid", "abs", "maximum", "minimum", "clip", "relu", "where", "sum", "mean",
    "var", "max", "softmax", "log_softmax", "reshape", "transpose", "swapaxes", "broadcast_to",
    "getitem", "concatenate", "stack", "pad", "matmul", "conv2d",
]

"""``custom_vjp``: a hand-derived ``(forward, backward)`` pair as one node of the graph.

Every normalization variant in refnorm is written twice: as a NumPy ``forward`` that returns
``(y, cache)`` and a hand-derived ``backward(dy, cache)`` that returns a NamedTuple of gradients,
one field per differentiable argument (``dx``, ``dweight``, ``dbias``). ``custom_vjp`` turns the
pair into an engine op: the forward runs on the arrays, and the backward pass of the graph calls
the hand-derived ``backward`` instead of differentiating the forward's NumPy code (which the
engine cannot see). This is JAX's ``custom_vjp`` contract, in its simplest form.
"""
from __future__ import annotations

import functools
import inspect

from .tensor import Tensor


def custom_vjp(forward, backward, diff_argnames, *, stateful=False):
    """Make a differentiable op from a forward and its hand-derived backward.

    Parameters
    ----------
    forward : callable
        ``forward(*args, **kwargs) -> (y, cache)``, or ``(y, new_state, cache)`` when
        ``stateful``. Works on NumPy arrays.
    backward : callable
        ``backward(dy, cache) -> grads``, a sequence whose i-th entry is the gradient with
        respect to ``diff_argnames[i]`` (``None`` where that argument was not given).
    diff_argnames : tuple of str
        The names of ``forward``'s differentiable parameters, in the order ``backward``
        returns their gradients.
    stateful : bool
        Whether ``forward`` returns new state, which the op passes through as ``(y, state)``.
        Some backwards update state too (PowerNorm's moving average of the gradient
        statistics): their ``grads`` NamedTuple has fields after the gradients. The op then
        takes a keyword ``on_backward_state``, a callable that the graph's backward pass calls
        with those fields as a dict (``{"ema_gz": ...}``); without it they are dropped.

    Returns
    -------
    op : callable
        Same signature as ``forward``; Tensor arguments are unwrapped, and the result ``y`` is a
        Tensor whose gradient flows to every differentiable Tensor argument.
    """
    signature = inspect.signature(forward)
    missing = [n for n in diff_argnames if n not in signature.parameters]
    if missing:
        raise ValueError(f"custom_vjp: diff_argnames {missing} are not parameters of "
                         f"{forward.__name__}{signature}")

    @functools.wraps(forward)
    def op(*args, on_backward_state=None, **kwargs):
        bound = signature.bind(*args, **kwargs)
        parents, positions = [], []
        for i, name in enumerate(diff_argnames):
            value = bound.arguments.get(name)
            if isinstance(value, Tensor):
                bound.arguments[name] = value.data
                parents.append(value)
                positions.append(i)
        result = forward(*bound.args, **bound.kwargs)
        y, cache = result[0], result[-1]
        out = Tensor._make(y, "custom_vjp", tuple(parents),
                           (backward, cache, tuple(positions), len(diff_argnames),
                            on_backward_state))
        return (out, result[1]) if stateful else out

    op.forward, op.backward, op.diff_argnames = forward, backward, tuple(diff_argnames)
    return op

"""The backward pass: an iterative topological sort and a walk that accumulates.

Every Tensor that requires a gradient and was produced by a primitive remembers its parents, the
primitive's name and the few non-Tensor arguments the VJP rule needs. :func:`backprop` walks that
graph from the output back to the leaves:

1. sort the nodes topologically with an explicit stack (no recursion: a chain of 100,000 ops
   must not hit Python's recursion limit);
2. visit them from the output backwards; each node's gradient is complete when it is visited,
   because every consumer of the node comes after it in the sorted order;
3. apply the node's rule from the derivative table, unbroadcast each parent's share to the
   parent's shape (the one central place, :mod:`refnorm.autograd.broadcasting`), and add it to
   the parent's running total, so a node used twice gets the sum of both uses;
4. drop each node's gradient once it has been passed on.

With ``create_graph=True`` the rules run on Tensors with recording switched on, so the
gradient is itself differentiable (a Hessian-vector product is the gradient of a gradient).
"""
from __future__ import annotations

from contextlib import contextmanager

from .broadcasting import unbroadcast


class _GradMode:
    enabled = True


def is_grad_enabled() -> bool:
    return _GradMode.enabled


@contextmanager
def no_grad():
    """Within this block, operations are not recorded (like ``torch.no_grad``)."""
    previous = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = previous


@contextmanager
def enable_grad(enabled: bool = True):
    previous = _GradMode.enabled
    _GradMode.enabled = enabled
    try:
        yield
    finally:
        _GradMode.enabled = previous


def toposort(root):
    """Nodes that require a gradient and reach ``root``, parents before children."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for parent in node._parents:
            if parent.requires_grad and id(parent) not in seen:
                stack.append((parent, False))
    return order


def backprop(root, g, *, create_graph=False):
    """Propagate ``g`` (the gradient at ``root``) back to the leaves.

    Returns ``{id(leaf): (leaf, gradient)}`` for every leaf that requires a gradient. Gradients
    are NumPy arrays, or Tensors when ``create_graph`` is true.
    """
    from .vjp_rules import ARRAY_ONLY_RULES, VJP_RULES  # (imports primitives: import late)

    order = toposort(root)
    pending = {id(root): g}
    leaves = {}
    with enable_grad(create_graph):
        for node in reversed(order):
            g = pending.pop(id(node), None)
            if g is None:  # the node does not reach root through differentiable edges
                continue
            parents = node._parents
            if not parents:
                leaves[id(node)] = (node, g)
                continue
            if create_graph:
                if node._op in ARRAY_ONLY_RULES:
                    raise NotImplementedError(
                        f"create_graph=True: the VJP rule of {node._op!r} is written on arrays "
                        "only, so its gradient cannot be differentiated again")
                values, out = parents, node
            else:
                values, out = tuple([p.data for p in parents]), node.data
            grads = VJP_RULES[node._op](g, out, values, *node._args)
            for parent, gp in zip(parents, grads):
                if gp is None or not parent.requires_grad:
                    continue
                if gp.shape != parent.data.shape:
                    gp = unbroadcast(gp, parent.data.shape)
                key = id(parent)
                previous = pending.get(key)
                pending[key] = gp if previous is None else previous + gp
    return leaves

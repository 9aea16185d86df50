"""Unbroadcasting: the one place that sums gradients over broadcast axes.

The adjoint of broadcasting is summation. If ``a`` of shape ``(3, 1)`` was broadcast to
``(2, 3, 4)`` in the forward pass, every element of ``a`` was used ``2 * 4`` times, so its
gradient is the incoming gradient summed over the new leading axis and over the stretched axis.

The graph walk (:mod:`refnorm.autograd.graph`) calls :func:`unbroadcast` once per edge, so no
rule in the derivative table has to remember it. It only uses ``.sum`` and ``.reshape``, so it
works on NumPy arrays and on Tensors alike (the latter when differentiating twice).
"""


def unbroadcast(g, shape):
    """Sum ``g`` down to ``shape``: the VJP of ``broadcast_to(x, g.shape)`` (x of ``shape``)."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return g.sum(axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)

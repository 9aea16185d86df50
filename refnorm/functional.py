"""The differentiable op of every registered variant, by its record's name.

>>> from refnorm.functional import layer_norm, batch_norm   # doctest: +SKIP

Each is the variant's ``custom_vjp`` op: it takes NumPy arrays or :class:`refnorm.autograd.Tensor`
and follows the ``torch.nn.functional`` signature. The names come from the registry, so a new
variant appears here without an edit.
"""
from refnorm.norms import ALL_SPECS

globals().update({spec.name: spec.op for spec in ALL_SPECS})
__all__ = sorted(spec.name for spec in ALL_SPECS)

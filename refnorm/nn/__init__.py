"""``refnorm.nn``: models built on the engine, with any registered norm as a layer.

* :mod:`.module`: :class:`Module`, :class:`Parameter` (NumPy arrays you can read), explicit state,
  ``state_dict`` / ``load_state_dict``, ``train`` / ``eval``, :func:`functional_call`, and
  :class:`Optimizer` (a loop around :mod:`refnorm.optim`'s pure functions);
* :mod:`.layers`: ``Linear``, ``Embedding``, the generic :class:`Norm` (``Norm("group_norm", 16,
  num_groups=4)``: any record with a ``layer_init``), ``cross_entropy``, ``entropy``;
* :mod:`.transformer`: causal self-attention, MLP, and a Transformer whose norm placement is
  ``post``, ``pre``, ``peri`` or ``mix``, with optional LayerNorm Scaling;
* :mod:`.convert`: a Pre-LN model into its Pre-RMSNorm and Pre-CRMSNorm forms;
* :mod:`.conv`: ``Conv2d``, pooling, a ResNet basic block and a small conv net;
* :mod:`.tent`: TENT test-time adaptation of the norm layers' affine parameters.
"""
from .module import (Module, ModuleList, Optimizer, Parameter, Sequential, functional_call,
                     substituted)
from .layers import (Embedding, Flatten, Linear, Norm, ReLU, cross_entropy, entropy, gelu_tanh,
                     layers_with_init, relu)
from .transformer import (CausalSelfAttention, MLP, PLACEMENTS, Transformer, TransformerBlock,
                          causal_mask)

__all__ = [
    "Module", "ModuleList", "Sequential", "Parameter", "Optimizer", "functional_call",
    "substituted", "Linear", "Embedding", "Norm", "ReLU", "Flatten", "relu", "gelu_tanh",
    "cross_entropy", "entropy", "layers_with_init", "CausalSelfAttention", "MLP",
    "TransformerBlock", "Transformer", "PLACEMENTS", "causal_mask",
]
from .conv import (AvgPool2d, BasicBlock, Conv2d, GlobalAvgPool2d, MaxPool2d, SmallConvNet,
                   avg_pool2d, global_avg_pool2d, max_pool2d)
from .tent import Tent
from . import convert  # noqa: F401  (the submodule, for users)
from .convert import to_pre_crmsnorm, to_pre_rmsnorm

__all__ += [
    "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "max_pool2d", "avg_pool2d",
    "global_avg_pool2d", "BasicBlock", "SmallConvNet", "Tent", "to_pre_rmsnorm",
    "to_pre_crmsnorm",
]

r"""Layers: ``Linear``, ``Embedding``, the generic ``Norm``, activations and losses.

Every layer computes with engine ops, so its gradient is the engine's. Initialization follows
``torch.nn`` (each layer says how), drawn from a ``numpy.random.Generator`` given as ``rng``
(default: ``np.random.default_rng(0)``), so that a model is reproducible from its seed.
"""
from __future__ import annotations

import inspect
import math
import numbers

import numpy as np

from refnorm import autograd as ag
from refnorm.autograd import Tensor, custom_vjp
from refnorm.nn.module import Module, Parameter
from refnorm.registry import TRAINING


def as_rng(rng):
    """``rng`` as a Generator: None -> seed 0, an int -> that seed, a Generator as is."""
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.default_rng(0 if rng is None else int(rng))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"`rng` must be a numpy.random.Generator, an int seed or None, got "
                        f"{type(rng).__name__}")
    return rng


def check_positive_int(value, name, where):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: `{name}` must be a positive int, got {value!r}")
    return int(value)


class Linear(Module):
    r""":math:`y = x W^T + b`, ``weight`` of shape (out_features, in_features), as
    ``torch.nn.Linear``.

    Initialization (PyTorch's): :math:`W, b \sim U(-k, k)`, :math:`k = 1/\sqrt{\text{in}}`
    (``kaiming_uniform_(a=sqrt(5))`` reduces to that bound).
    """

    def __init__(self, in_features, out_features, bias=True, *, rng=None):
        super().__init__()
        self.in_features = check_positive_int(in_features, "in_features", "Linear")
        self.out_features = check_positive_int(out_features, "out_features", "Linear")
        rng, k = as_rng(rng), 1.0 / math.sqrt(in_features)
        self.weight = Parameter(rng.uniform(-k, k, (out_features, in_features)))
        self.bias = Parameter(rng.uniform(-k, k, out_features)) if bias else None

    def forward(self, x):
        x = ag.as_tensor(x)
        lead = x.shape[:-1]
        if len(lead) > 1:  # one (rows, in) @ (in, out) product instead of a batch of them
            x = ag.reshape(x, (-1, x.shape[-1]))
        y = ag.matmul(x, self.weight.mT)
        y = y if self.bias is None else y + self.bias
        return ag.reshape(y, lead + (self.out_features,)) if len(lead) > 1 else y

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    r"""A lookup table ``weight[tokens]``, as ``torch.nn.Embedding``; init :math:`N(0, 1)`
    (PyTorch's), or :math:`N(0, \text{std}^2)`. Repeated tokens add up in the gradient."""

    def __init__(self, num_embeddings, embedding_dim, *, std=1.0, rng=None):
        super().__init__()
        self.num_embeddings = check_positive_int(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = check_positive_int(embedding_dim, "embedding_dim", "Embedding")
        self.weight = Parameter(std * as_rng(rng).standard_normal((num_embeddings,
                                                                   embedding_dim)))

    def forward(self, tokens):
        tokens = np.asarray(tokens.data if isinstance(tokens, Tensor) else tokens)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"Embedding: `tokens` must be an integer array, got dtype "
                            f"{tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.num_embeddings):
            raise ValueError(f"Embedding: `tokens` must lie in [0, {self.num_embeddings}), got "
                             f"values in [{tokens.min()}, {tokens.max()}]")
        return ag.getitem(self.weight, tokens)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Norm(Module):
    """Any registered normalization variant as a layer: ``Norm("group_norm", 32, num_groups=8)``.

    The record's ``layer_init(features, **options)`` gives the parameters (initialized as the
    official code does), the explicit state and the hyper-parameters; the forward calls the
    record's ``op`` (its hand-derived backward, through ``custom_vjp``). A stateful variant
    returns new state; in training mode the layer replaces its state arrays with the new ones
    (unless :attr:`freeze_state` is set, as :class:`~refnorm.nn.tent.Tent` does), and with the
    state the record's backward computes (PowerNorm's ``ema_gz``) when the backward runs.

    Parameters
    ----------
    name : str
        A name in ``refnorm.norms.BY_NAME`` whose record has a ``layer_init``.
    features : int
        The size of the feature axis (channels, or the model width).
    feature_axis : int, optional
        The axis of the input that holds the features. Default: the record's own, the last
        axis for a ``"trailing"`` layout, axis 1 (NCHW) for a ``"channel"`` one. When it
        differs, the layer moves the axis there and back (e.g. BatchNorm on (batch, tokens,
        features), or LayerNorm over the channels of an NCHW image, as ConvNeXt's
        channels-first LayerNorm). A record without a ``param_layout`` (no weight or bias:
        LocalResponseNorm, CRMSNorm) is applied to the input as it is, whatever this says.
    **options
        Passed to ``layer_init`` (``eps``, ``num_groups``, ``affine``, ...).
    """

    def __init__(self, name, features, *, feature_axis=None, **options):
        super().__init__()
        from refnorm.norms import BY_NAME
        if name not in BY_NAME:
            raise ValueError(f"Norm: unknown variant {name!r}; registered: {sorted(BY_NAME)}")
        spec = BY_NAME[name]
        if spec.layer_init is None:
            usable = sorted(s.name for s in BY_NAME.values() if s.layer_init is not None)
            raise ValueError(f"Norm: {name!r} is not a layer on activations (its record has no "
                             f"layer_init); layers: {usable}")
        self.spec = spec
        self.features = check_positive_int(features, "features", f"Norm({name!r})")
        if feature_axis is not None and not isinstance(feature_axis, numbers.Integral):
            raise TypeError(f"Norm: `feature_axis` must be an int or None, got {feature_axis!r}")
        own = {"trailing": -1, "channel": 1}.get(spec.param_layout)
        default = 1 if own is None else own
        self.feature_axis = default if feature_axis is None else int(feature_axis)
        # a variant without a declared layout (no weight/bias) is applied to the input as is
        self.own_axis = self.feature_axis if own is None else own
        params, state, kwargs = spec.layer_init(self.features, **options)
        unknown = set(params) - set(spec.diff_argnames[1:])
        if unknown:
            raise ValueError(f"Norm: layer_init of {name!r} returned parameters {sorted(unknown)} "
                             f"that are not differentiable arguments {spec.diff_argnames[1:]}")
        for key, value in params.items():
            setattr(self, key, Parameter(value))
        for key, value in state.items():
            self.register_state(key, value)
        self.param_names, self.state_names = tuple(params), tuple(state)
        self.kwargs = dict(kwargs)
        self.options = dict(options)
        self.freeze_state = False
        parameters = inspect.signature(spec.forward).parameters
        self._pass_training = "training" in parameters and "training" not in kwargs

    def _call_kwargs(self):
        kwargs = {k: (self.training if v is TRAINING else v) for k, v in self.kwargs.items()}
        if self._pass_training:
            kwargs["training"] = self.training
        for key in self.param_names:
            kwargs[key] = getattr(self, key)
        for key in self.state_names:
            kwargs[key] = self._state[key]
        return kwargs

    def forward(self, x, **inputs):
        """``y`` for ``x``. ``inputs`` are the record's per-call non-differentiable arrays
        (its ``nondiff_args``: RegionNorm's ``mask``, SPADE's ``segmap``), in the layout the
        record expects; nothing else is accepted."""
        unknown = set(inputs) - set(self.spec.nondiff_args)
        if unknown:
            raise TypeError(f"Norm({self.spec.name!r}): unexpected input(s) {sorted(unknown)}; "
                            f"a call takes x and {list(self.spec.nondiff_args) or 'nothing else'}")
        x = ag.as_tensor(x)
        axis = self.feature_axis % max(x.ndim, 1)
        own = self.own_axis % max(x.ndim, 1)
        moved = axis != own
        if moved:
            x = ag.transpose(x, _move(x.ndim, axis, own))
        updating = self.spec.stateful and self.training and not self.freeze_state
        hook = {"on_backward_state": self._backward_state} if updating else {}
        result = self.spec.op(x, **self._call_kwargs(), **inputs, **hook)
        if self.spec.stateful:
            y, new_state = result
            if self.training and not self.freeze_state:
                for key in self.state_names:  # replaced, never written in place
                    self._state[key] = getattr(new_state, key)
        else:
            y = result
        if moved:
            y = ag.transpose(y, tuple(np.argsort(_move(x.ndim, axis, own))))
        return y

    def _backward_state(self, fields):
        """Take the state that the record's backward computes (PowerNorm's and Unified
        Normalization's ``ema_gz``, UN's ``buffer_gz``) when the graph's backward runs, as the
        official modules do; the next forward then uses it."""
        for key, value in fields.items():
            if key in self.state_names:
                self._state[key] = value

    def extra_repr(self):
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.spec.name!r}, {self.features}{options}"


def _move(ndim, source, destination):
    """The permutation that moves axis ``source`` to position ``destination``."""
    order = [a for a in range(ndim) if a != source]
    order.insert(destination, source)
    return tuple(order)


def layers_with_init():
    """The names of the registered variants that can be a :class:`Norm` layer."""
    from refnorm.norms import ALL_SPECS
    return [spec.name for spec in ALL_SPECS if spec.layer_init is not None]


# ----- activations ----------------------------------------------------------------------------
def _relu_forward(x):
    return np.maximum(x, 0), x > 0


def _relu_backward(dy, mask):
    return (dy * mask,)


_relu = custom_vjp(_relu_forward, _relu_backward, ("x",))


def relu(x):
    r""":math:`\max(x, 0)`, with :math:`\mathrm{d}x = \mathrm{d}y \odot [x > 0]` (0 at the kink,
    as PyTorch). One ``custom_vjp`` node: a single product in the backward, where the engine's
    ``maximum`` rule (which splits ties) takes several passes over the array."""
    x = ag.as_tensor(x)
    return _relu(x)


def gelu_tanh(x):
    r"""GELU, tanh form: :math:`\tfrac12 x (1 + \tanh(\sqrt{2/\pi}(x + 0.044715 x^3)))`
    (``torch.nn.functional.gelu(x, approximate="tanh")``)."""
    return 0.5 * x * (1.0 + ag.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


ACTIVATIONS = {"relu": relu, "gelu_tanh": gelu_tanh}


class ReLU(Module):
    def forward(self, x):
        return relu(x)


class Flatten(Module):
    """Flatten every axis after the first."""

    def forward(self, x):
        return ag.reshape(x, (x.shape[0], -1))


# ----- losses ---------------------------------------------------------------------------------
def cross_entropy(logits, target):
    r"""Mean cross-entropy of integer ``target`` under ``softmax(logits)`` over the last axis,
    as ``torch.nn.functional.cross_entropy`` on logits reshaped to (-1, classes):

    .. math:: L = -\frac1M \sum_m \log \mathrm{softmax}(z_m)_{t_m},\qquad
              \frac{\partial L}{\partial z_m} = \frac1M(\mathrm{softmax}(z_m) - e_{t_m}).
    """
    logits = ag.as_tensor(logits)
    target = np.asarray(target)
    if target.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: `target` must be an integer array, got {target.dtype}")
    classes = logits.shape[-1]
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: `target` must have shape {logits.shape[:-1]}, got "
                         f"{target.shape}")
    if target.size and (target.min() < 0 or target.max() >= classes):
        raise ValueError(f"cross_entropy: `target` must lie in [0, {classes})")
    if target.size == 0:
        raise ValueError("cross_entropy: `target` is empty: the mean is undefined")
    one_hot = (target[..., None] == np.arange(classes)).astype(logits.dtype)
    return -(ag.log_softmax(logits, axis=-1) * one_hot).sum() / target.size


def entropy(logits):
    r"""Mean prediction entropy :math:`\frac1M\sum_m -\sum_k p_{mk}\log p_{mk}`,
    :math:`p_m = \mathrm{softmax}(z_m)` over the last axis (TENT's loss)."""
    logits = ag.as_tensor(logits)
    log_p = ag.log_softmax(logits, axis=-1)
    rows = logits.size // logits.shape[-1]
    return -(ag.exp(log_p) * log_p).sum() / rows

"""The record types: one frozen record per primitive, normalization variant and optimizer.

A record holds everything the generic machinery needs to know about one item: how to run it,
how to check it, and where it comes from. The tests, ``refnorm verify``, the golden oracle and the
docs all iterate the registries (``refnorm.autograd.PRIMITIVES``, ``refnorm.norms.ALL_SPECS``,
``refnorm.optim.ALL_OPTIMIZERS``) instead of naming items by hand.

Three record types share the same shape:

* :class:`PrimitiveSpec` for the autograd engine's primitives;
* :class:`NormSpec` for normalization variants;
* :class:`OptimizerSpec` for optimizers.

Each has ``name``, a way to produce small sample inputs, and (for ``refnorm verify``) a check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np


def labels_from_axes(shape, axes):
    """``(labels, count)``: elements of an array of ``shape`` that differ only along ``axes``
    share a label; labels run over ``range(count)``."""
    axes = tuple(int(a) % len(shape) for a in axes) if shape else ()
    keep = tuple(a for a in range(len(shape)) if a not in axes)
    kshape = tuple(shape[a] for a in keep)
    if not keep:
        return np.zeros(shape, dtype=np.int64), 1
    idx = np.indices(shape, sparse=True)
    labels = np.ravel_multi_index(tuple(np.broadcast_to(idx[a], shape) for a in keep), kshape)
    return labels.astype(np.int64), int(np.prod(kshape, dtype=np.int64))


class _Training:
    """The type of :data:`TRAINING`."""

    def __repr__(self):
        return "TRAINING"


#: In the ``kwargs`` of a record's ``layer_init``: "the layer's train/eval mode, at call time"
#: (``refnorm.nn.Norm`` passes ``True`` in training mode, ``False`` in evaluation mode).
TRAINING = _Training()


@dataclass(frozen=True)
class Paper:
    """A citation: ``Paper(title, authors, year, ref)``, ``ref`` an arXiv id, DOI or URL."""

    title: str
    authors: str
    year: int
    ref: str  # arXiv id, DOI or URL

    def __str__(self) -> str:
        return f"{self.authors} ({self.year}). {self.title}. {self.ref}"


class SampleInput(NamedTuple):
    """One call of a record's function.

    ``arrays`` are the differentiable inputs, in the order of the record's ``diff_argnames``
    (``None`` where an optional input such as ``bias`` is absent); ``kwargs`` are everything
    else (hyper-parameters, state, masks). ``name`` becomes the pytest id.
    """

    name: str
    arrays: tuple
    kwargs: Mapping[str, Any] = {}


class ErrorInput(NamedTuple):
    """A bad call and the exception it must raise: ``error_type`` and a regex ``match``."""

    sample: SampleInput
    error_type: type
    match: str


@dataclass(frozen=True)
class PrimitiveSpec:
    """One primitive of the autograd engine.

    ``op`` takes Tensors (the first ``len(sample.arrays)`` arguments) plus keyword options and
    returns a Tensor. ``sample_inputs(rng)`` yields :class:`SampleInput` s whose arrays are
    float64; they cover broadcasting, scalars, size-0 and size-1 axes. ``twice`` says whether
    the VJP rule is written with engine ops, so that gradients of gradients work.
    ``kinks`` marks ops with non-differentiable points (relu-like, max ties), for gradcheck.
    """

    name: str
    op: Callable
    sample_inputs: Callable[[np.random.Generator], Iterator[SampleInput]]
    twice: bool = False
    kinks: bool = False
    doc: str = ""


@dataclass(frozen=True)
class NormSpec:
    """One normalization variant (see ``DESIGN.md``).

    * ``forward(**arguments) -> (y, cache)``, or ``(y, new_state, cache)`` when ``stateful``;
    * ``backward(dy, cache) -> Grads``, a NamedTuple with a field ``d<name>`` per
      ``diff_argnames`` entry;
    * ``op``: the engine op built with ``custom_vjp(forward, backward)``;
    * ``composite``: the same math with engine primitives only (same signature as ``op``).

    A record with several ``outputs`` (the fused residual-add norms return ``("y", "s")``)
    has ``y`` a tuple of arrays in that order wherever the above says ``y`` (the forward's,
    the op's and the composite's results, a tuple of Tensors for the last two), and ``dy`` a
    tuple of their upstream gradients. The generic machinery goes through
    :meth:`output_values`, :meth:`output_shapes` and :meth:`upstream`, which hold for one
    output and for several.
    """

    # identity and citation
    name: str
    title: str
    paper: Paper
    # the hand-derived pair, the engine op, the engine composite
    forward: Callable
    backward: Callable
    op: Callable
    composite: Callable | None
    # names of the differentiable positional inputs, e.g. ("x", "weight", "bias")
    diff_argnames: tuple[str, ...]
    # small cases for the expensive checks; realistic cases for golden files; bad calls
    sample_inputs: Callable[[np.random.Generator], Iterator[SampleInput]]
    oracle_inputs: Callable[[np.random.Generator], Iterator[SampleInput]] | None = None
    error_inputs: Callable[[], Iterator[ErrorInput]] | None = None
    # "exact", or "surrogate" (with gradient_note) for documented approximate backwards
    gradient: str = "exact"
    gradient_note: str = ""
    # for a "surrogate" gradient of the stop-gradient kind (Batch Renorm's r and d): (sample,
    # cache) -> the same call with those quantities passed in, fixed at the values the forward
    # computed. The exact derivative of that call's forward is the surrogate, which the finite
    # differences then check; the distance to the derivative of the plain forward is reported
    freeze: Callable[[SampleInput, Any], SampleInput] | None = None
    # for gradient="surrogate": the surrogate backward written a second, independent way,
    # ``surrogate(dy, **arguments) -> Grads`` (the forward's arguments, not its cache; the same
    # fields as ``backward``'s). The hand ``backward`` is checked against it; the engine
    # gradient of ``composite`` (the exact gradient of the forward) against finite
    # differences; and the distance between the surrogate and the exact gradient is reported
    surrogate: Callable | None = None
    # stateful variants return (y, new_state, cache); train/eval may differ
    stateful: bool = False
    train_eval_differ: bool = False
    # non-differentiable array arguments (masks, segmentation maps), passed in kwargs
    nondiff_args: tuple[str, ...] = ()
    # "shift", "scale", ...: transforms of x that leave y unchanged (drive property tests)
    invariances: tuple[str, ...] = ()
    # axes (of the un-affine output) over which mean 0 / var s^2/(s^2+eps) hold, as a callable
    # (sample) -> tuple of axes, or None when the variant does not standardize
    stats_axes: Callable[[SampleInput], tuple[int, ...]] | None = None
    # for variants whose standardized groups are not a set of axes (GroupNorm): (sample) ->
    # (labels, count), labels an int array of x's shape with values in range(count), or None
    stats_groups: Callable[[SampleInput], tuple[np.ndarray, int] | None] | None = None
    # dotted name of the PyTorch equivalent, and torch_call(torch, *tensors, **kwargs) -> y (or
    # (y, new_state) when stateful): tensors in diff_argnames order; state kwargs may be NumPy
    # arrays or tensors of any device and dtype, and new state comes back as tensors, so that the
    # parity tests (CPU float64) and the oracle (CUDA, bfloat16) call the same function
    torch_equivalent: str | None = None
    torch_call: Callable | None = None
    # what the variant normalizes: "activations" or "weights"
    normalizes: str = "activations"
    # how weight and bias broadcast against x: "channel" (a (C,) vector along axis 1, NCHW) or
    # "trailing" (the shape of the normalized trailing axes); None: no such parameters
    param_layout: str | None = None
    # how ``refnorm.nn`` builds a layer of this variant: ``layer_init(features, **options) ->
    # (params, state, kwargs)``, ``features`` an int (the channels of a "channel" layout, the last
    # dimension of a "trailing" one). ``params``: {argname: ndarray} for the learned entries of
    # ``diff_argnames`` after ``x``, initialized as the official code does; ``state``: {kwarg:
    # ndarray} for a stateful variant's explicit state (named as the fields of its new_state);
    # ``kwargs``: the hyper-parameters the forward needs besides those (e.g. normalized_shape).
    # The layer passes its train/eval mode to a forward parameter named ``training`` that
    # ``kwargs`` does not set, and to any kwarg whose value is :data:`TRAINING` (InstanceNorm's
    # ``use_input_stats``). A stateful layer stores ``new_state``'s fields named in ``state``
    # after a training forward. ``features`` is checked by the layer (a positive int).
    # None: the variant is not a layer on activations (weight reparametrizations, ...)
    layer_init: Callable | None = None
    # the shape of ``y`` when it is not that of ``x``: ``(sample) -> shape`` (l2_norm's
    # Matryoshka truncation returns the first ``truncate_dim`` coordinates); None: x's shape.
    # The upstream gradient ``dy`` has this shape; every gradient keeps its input's shape
    output_shape: Callable[[SampleInput], tuple[int, ...]] | None = None
    # the names of the outputs, ``y`` first. With more than one, ``forward`` returns them as a
    # tuple in this order in place of ``y``, and ``backward`` takes the tuple of their upstream
    # gradients in place of ``dy`` (the oracle's candidates return each by its name)
    outputs: tuple[str, ...] = ("y",)

    # ----- calling conventions shared by the tests, the CLI and the oracle -----
    def arguments(self, sample: SampleInput, arrays=None) -> dict:
        """Keyword arguments of ``forward``/``op`` for ``sample`` (``arrays`` replaces its own)."""
        arrays = sample.arrays if arrays is None else arrays
        return {**dict(zip(self.diff_argnames, arrays)), **sample.kwargs}

    def run(self, sample: SampleInput, arrays=None):
        """``(y, new_state, cache)``; ``new_state`` is None for a stateless variant."""
        result = self.forward(**self.arguments(sample, arrays))
        return (result[0], result[1], result[2]) if self.stateful else (result[0], None, result[1])

    def standardized_groups(self, sample: SampleInput):
        """``(labels, count)``: the groups of ``x`` over which the un-affine output has mean 0
        and variance s^2/(s^2+eps) (from ``stats_groups``, else ``stats_axes``), or None."""
        if self.stats_groups is not None:
            return self.stats_groups(sample)
        axes = self.stats_axes(sample) if self.stats_axes is not None else None
        if axes is None:
            return None
        return labels_from_axes(sample.arrays[0].shape, axes)

    def y_shape(self, sample: SampleInput) -> tuple[int, ...]:
        """The shape of ``y`` (and of ``dy``) for ``sample``: ``output_shape``, else x's."""
        if self.output_shape is not None:
            return tuple(self.output_shape(sample))
        return tuple(np.shape(sample.arrays[0]))

    def output(self, sample: SampleInput, arrays=None) -> np.ndarray:
        """Just ``y`` (the tuple of outputs when there are several): the function that finite
        differences differentiate."""
        return self.run(sample, arrays)[0]

    def output_values(self, y) -> tuple:
        """The outputs in a forward's (or op's) first result, as a tuple in ``outputs`` order:
        ``(y,)`` for a record with one output."""
        return tuple(y) if len(self.outputs) > 1 else (y,)

    def output_shapes(self, sample: SampleInput) -> tuple[tuple[int, ...], ...]:
        """The shape of every output (and of its upstream gradient), in ``outputs`` order."""
        if len(self.outputs) == 1:
            return (self.y_shape(sample),)
        with np.errstate(all="ignore"):  # only the shapes are wanted
            return tuple(np.shape(v) for v in self.output_values(self.output(sample)))

    def upstream(self, douts):
        """What ``backward`` takes for the upstream gradients ``douts`` (one per output, in
        ``outputs`` order): the array itself for a record with one output, else the tuple."""
        douts = tuple(douts)
        return douts if len(self.outputs) > 1 else douts[0]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer.

    ``init(params, **hyper) -> state`` and ``step(params, grads, state, **hyper) -> (params,
    state)`` are pure functions on lists of NumPy arrays; nothing is mutated. ``check(rng)``
    returns the max relative error of the implementation against the optimizer's equations
    written independently (used by ``refnorm verify``). ``torch_equivalent`` names the
    ``torch.optim`` class, where there is one.
    """

    name: str
    title: str
    paper: Paper | None
    init: Callable
    step: Callable
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[np.random.Generator], float] | None = None
    torch_equivalent: str | None = None

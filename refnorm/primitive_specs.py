"""One :class:`~refnorm.registry.PrimitiveSpec` per primitive of the autograd engine.

The records live outside :mod:`refnorm.autograd` because the engine imports only NumPy. Each
record names the op and yields sample inputs that cover the shapes where gradients go wrong:
broadcasting ``(3, 1)`` with ``(1, 4)``, a scalar with a matrix, and size-0 and size-1 axes.
Inputs are kept inside the op's smooth domain (positive for ``log``, away from ties for
``maximum``); the kinks themselves are tested separately.
"""
from __future__ import annotations

import numpy as np

from refnorm import autograd as ag
from refnorm.registry import PrimitiveSpec, SampleInput

BINARY_SHAPES = (((3, 4), (3, 4)), ((3, 1), (1, 4)), ((), (2, 3)), ((2, 3), ()),
                 ((0, 3), (1, 3)), ((1, 1), (5,)))
UNARY_SHAPES = ((3, 4), (), (1,), (2, 1, 3), (0, 4))


def _unary(domain=lambda a: a):
    def samples(rng):
        for shape in UNARY_SHAPES:
            yield SampleInput(f"{shape}", (domain(rng.standard_normal(shape)),))
    return samples


def _binary(domain_a=lambda a: a, domain_b=lambda b: b):
    def samples(rng):
        for sa, sb in BINARY_SHAPES:
            yield SampleInput(f"{sa}x{sb}", (domain_a(rng.standard_normal(sa)),
                                             domain_b(rng.standard_normal(sb))))
    return samples


def _positive(a):
    return np.abs(a) + 0.5


def _away_from_zero(a):
    return np.sign(a + 1e-300) * (np.abs(a) + 0.5)


def _reduction(rng):
    x = rng.standard_normal((3, 4, 5))
    for axis, keepdims in ((None, False), (1, False), ((0, 2), True), (-1, True), ((), False)):
        yield SampleInput(f"axis={axis}-keepdims={keepdims}", (x,),
                          dict(axis=axis, keepdims=keepdims))
    yield SampleInput("size-1 axis", (rng.standard_normal((4, 1)),), dict(axis=1))
    yield SampleInput("0-d", (np.array(rng.standard_normal()),), {})


def _sum_samples(rng):
    yield from _reduction(rng)
    yield SampleInput("size-0 axis", (np.zeros((0, 3)),), dict(axis=0))


def _softmax_samples(rng):
    for shape, axis in (((3, 5), -1), ((2, 3, 4), 1), ((4, 1), -1), ((1, 6), 0)):
        yield SampleInput(f"{shape}-axis{axis}", (rng.standard_normal(shape),), dict(axis=axis))


def _shape_samples(rng):
    x = rng.standard_normal((2, 3, 4))
    yield SampleInput("(2,3,4)->(6,4)", (x,), dict(shape=(6, 4)))
    yield SampleInput("(2,3,4)->(-1,)", (x,), dict(shape=(-1,)))
    yield SampleInput("size-0", (np.zeros((0, 3)),), dict(shape=(3, 0)))


def _transpose_samples(rng):
    x = rng.standard_normal((2, 3, 4))
    yield SampleInput("reverse", (x,), dict(axes=None))
    yield SampleInput("(1,2,0)", (x,), dict(axes=(1, 2, 0)))
    yield SampleInput("size-1", (rng.standard_normal((1, 5)),), dict(axes=(1, 0)))


def _broadcast_samples(rng):
    yield SampleInput("(3,1)->(2,3,4)", (rng.standard_normal((3, 1)),), dict(shape=(2, 3, 4)))
    yield SampleInput("()->(2,3)", (np.array(rng.standard_normal()),), dict(shape=(2, 3)))
    yield SampleInput("(1,4)->(0,4)", (rng.standard_normal((1, 4)),), dict(shape=(0, 4)))


def _getitem_samples(rng):
    x = rng.standard_normal((4, 5))
    yield SampleInput("slice", (x,), dict(index=(slice(1, 3), slice(None, None, 2))))
    yield SampleInput("int", (x,), dict(index=2))
    yield SampleInput("repeated fancy", (x,),
                      dict(index=(np.array([0, 2, 0]), np.array([1, 1, 1]))))
    yield SampleInput("bool mask", (x,), dict(index=x > 0))
    yield SampleInput("None and ellipsis", (x,), dict(index=(Ellipsis, None, 1)))


def _concat_samples(rng):
    yield SampleInput("axis0", (rng.standard_normal((2, 3)), rng.standard_normal((4, 3))),
                      dict(axis=0))
    yield SampleInput("axis-1 with size 0", (rng.standard_normal((2, 3)), np.zeros((2, 0)),
                                             rng.standard_normal((2, 1))), dict(axis=-1))


def _stack_samples(rng):
    yield SampleInput("axis0", (rng.standard_normal((2, 3)), rng.standard_normal((2, 3))),
                      dict(axis=0))
    yield SampleInput("axis-1", tuple(rng.standard_normal((1, 4)) for _ in range(3)),
                      dict(axis=-1))


def _pad_samples(rng):
    yield SampleInput("2d", (rng.standard_normal((3, 4)),), dict(pad_width=((1, 2), (0, 3))))
    yield SampleInput("value", (rng.standard_normal((2, 2)),), dict(pad_width=1, value=7.0))


def _matmul_samples(rng):
    r = rng.standard_normal
    for sa, sb in (((3, 4), (4, 5)), ((2, 3, 4), (4, 2)), ((2, 1, 3, 4), (5, 4, 2)),
                   ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,)), ((0, 4), (4, 2)),
                   ((1, 1), (1, 1))):
        yield SampleInput(f"{sa}@{sb}", (r(sa), r(sb)))


def _conv_samples(rng):
    r = rng.standard_normal
    yield SampleInput("3x3 pad1", (r((2, 3, 5, 6)), r((4, 3, 3, 3)), r(4)), dict(padding=1))
    yield SampleInput("stride2 dilation2", (r((1, 2, 7, 8)), r((3, 2, 2, 3)), None),
                      dict(stride=2, dilation=(2, 1), padding=(1, 0)))
    yield SampleInput("1x1", (r((2, 4, 3, 3)), r((2, 4, 1, 1)), r(2)), {})
    yield SampleInput("groups2", (r((1, 4, 4, 4)), r((6, 2, 3, 3)), None),
                      dict(groups=2, padding=1))


def _where_samples(rng):
    mask = rng.standard_normal((3, 4)) > 0
    yield SampleInput("(3,4)", (rng.standard_normal((3, 4)), rng.standard_normal((3, 4))),
                      dict(condition=mask))
    yield SampleInput("broadcast", (rng.standard_normal((3, 1)), rng.standard_normal((1, 4))),
                      dict(condition=mask))


def _clip_samples(rng):
    x = rng.standard_normal((4, 5))
    x = np.where(np.abs(np.abs(x) - 0.5) < 0.05, x + 0.2, x)  # keep away from the bounds
    yield SampleInput("both bounds", (x,), dict(a_min=-0.5, a_max=0.5))
    yield SampleInput("lower only", (x,), dict(a_min=0.0 + 1e-3, a_max=None))


def _power_const_samples(rng):
    for exponent in (2, 3.5, -1.5, 0.5, 0):
        yield SampleInput(f"exponent {exponent}", (_positive(rng.standard_normal((3, 4))),),
                          dict(exponent=exponent))


def _separated(a, b):
    """Move b away from a where they nearly tie, so maximum/minimum stay differentiable."""
    return np.where(np.abs(a - b) < 0.1, b + 0.3, b)


def _max_samples(rng):
    for sample in _reduction(rng):
        yield sample  # Gaussian entries: ties have probability zero


def _maxmin_samples(rng):
    for sample in _binary()(rng):
        a, b = sample.arrays
        yield sample._replace(arrays=(a, _separated(a, b)))


PRIMITIVES = (
    PrimitiveSpec("add", ag.add, _binary(), twice=True),
    PrimitiveSpec("subtract", ag.subtract, _binary(), twice=True),
    PrimitiveSpec("multiply", ag.multiply, _binary(), twice=True),
    PrimitiveSpec("divide", ag.divide, _binary(domain_b=_away_from_zero), twice=True),
    PrimitiveSpec("negative", ag.negative, _unary(), twice=True),
    PrimitiveSpec("power", ag.power, _binary(domain_a=_positive), twice=True),
    PrimitiveSpec("power_const", lambda a, exponent: ag.power(a, exponent),
                  _power_const_samples, twice=True),
    PrimitiveSpec("exp", ag.exp, _unary(), twice=True),
    PrimitiveSpec("log", ag.log, _unary(_positive), twice=True),
    PrimitiveSpec("sqrt", ag.sqrt, _unary(_positive), twice=True),
    PrimitiveSpec("tanh", ag.tanh, _unary(), twice=True),
    PrimitiveSpec("arctan", ag.arctan, _unary(), twice=True),
    PrimitiveSpec("sigmoid", ag.sigmoid, _unary(), twice=True),
    PrimitiveSpec("abs", ag.abs, _unary(_away_from_zero), twice=True, kinks=True),
    PrimitiveSpec("maximum", ag.maximum, _maxmin_samples, twice=True, kinks=True),
    PrimitiveSpec("minimum", ag.minimum, _maxmin_samples, twice=True, kinks=True),
    PrimitiveSpec("clip", ag.clip, _clip_samples, twice=True, kinks=True),
    PrimitiveSpec("where", lambda a, b, condition: ag.where(condition, a, b), _where_samples,
                  twice=True),
    PrimitiveSpec("sum", ag.sum, _sum_samples, twice=True),
    PrimitiveSpec("mean", ag.mean, _reduction, twice=True),
    PrimitiveSpec("max", ag.max, _max_samples, twice=True, kinks=True),
    PrimitiveSpec("softmax", ag.softmax, _softmax_samples, twice=True),
    PrimitiveSpec("log_softmax", ag.log_softmax, _softmax_samples, twice=True),
    PrimitiveSpec("reshape", ag.reshape, _shape_samples, twice=True),
    PrimitiveSpec("transpose", ag.transpose, _transpose_samples, twice=True),
    PrimitiveSpec("broadcast_to", ag.broadcast_to, _broadcast_samples, twice=True),
    PrimitiveSpec("getitem", ag.getitem, _getitem_samples),
    PrimitiveSpec("concatenate", lambda *arrays, axis: ag.concatenate(arrays, axis),
                  _concat_samples, twice=True),
    PrimitiveSpec("stack", lambda *arrays, axis: ag.stack(arrays, axis), _stack_samples,
                  twice=True),
    PrimitiveSpec("pad", ag.pad, _pad_samples, twice=True),
    PrimitiveSpec("matmul", ag.matmul, _matmul_samples, twice=True),
    PrimitiveSpec("conv2d", ag.conv2d, _conv_samples),
)

BY_NAME = {spec.name: spec for spec in PRIMITIVES}

"""The generic checks, run on every registered variant and every one of its sample inputs.

Everything here iterates ``refnorm.norms.ALL_SPECS``; a new variant gets all of it for free.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from refnorm import autograd as ag
from refnorm.autograd import Tensor
from refnorm.norms import ALL_SPECS
from refnorm.verify import check_norm_sample, normwise

SEED = 1234


def _samples(kind="sample_inputs", filter_=None):
    params = []
    for spec in ALL_SPECS:
        make = getattr(spec, kind)
        if make is None:
            continue
        for sample in make(np.random.default_rng(SEED)):
            if filter_ is None or filter_(spec, sample):
                params.append(pytest.param(spec, sample, id=f"{spec.name}-{sample.name}"))
    return params


SAMPLES = _samples()


def _copies(sample):
    return [None if a is None else a.copy() for a in sample.arrays], \
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sample.kwargs.items()}


def _assert_unchanged(sample, copies):
    arrays, kwargs = copies
    for a, c in zip(sample.arrays, arrays):
        if a is not None:
            np.testing.assert_array_equal(a, c)
    for k, v in sample.kwargs.items():
        if isinstance(v, np.ndarray):
            np.testing.assert_array_equal(v, kwargs[k])


def _dy(spec, sample, shape, output="y"):
    # Seeded by the case, random (never ones: an all-ones dy makes BatchNorm's dx vanish).
    key = f"{spec.name}/{sample.name}" + ("" if output == "y" else f"/{output}")
    return np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape)


def _upstream(spec, sample, shapes, scale=None):
    """Random upstream gradients of every output (``shapes``, in ``spec.outputs`` order), as
    ``spec.backward`` takes them; each multiplied by ``scale(k, c)`` if given."""
    douts = [_dy(spec, sample, shape, name) for name, shape in zip(spec.outputs, shapes)]
    if scale is not None:
        douts = [scale(k, c) for k, c in enumerate(douts)]
    return spec.upstream(douts)


@pytest.mark.parametrize("spec,sample", SAMPLES)
def test_forward_finite_shape_and_inputs_not_mutated(spec, sample):
    copies = _copies(sample)
    y, state, cache = spec.run(sample)
    x = sample.arrays[0]
    outs = spec.output_values(y)
    assert len(outs) == len(spec.outputs)
    assert outs[0].shape == spec.y_shape(sample) and outs[0].dtype == x.dtype
    assert all(np.isfinite(o).all() for o in outs)
    grads = spec.backward(_upstream(spec, sample, [o.shape for o in outs]), cache)
    for g, a in zip(grads, sample.arrays):
        assert (g is None) == (a is None)
        if g is not None:
            assert g.shape == a.shape and np.isfinite(g).all()
    _assert_unchanged(sample, copies)


@pytest.mark.parametrize("spec,sample", SAMPLES)
def test_hand_backward_matches_engine_and_finite_differences(spec, sample):
    """The three answers (what ``refnorm verify`` runs, at tighter tolerances): hand = engine
    composite to 1e-10, hand = central finite differences (slow mode, every element).

    For a surrogate gradient (``gradient="surrogate"``): hand = the record's independent
    ``surrogate`` formulation to 1e-10, and the engine gradient of ``composite`` (the exact
    gradient) = finite differences; the distance between the two is reported by verify."""
    dy = _upstream(spec, sample, spec.output_shapes(sample))
    check = check_norm_sample(spec, sample, np.random.default_rng(SEED), rtol=1e-10, dy=dy)
    if spec.gradient == "surrogate" and spec.freeze is None:
        assert spec.surrogate is not None and spec.composite is not None, spec.name
        assert check.hand_second < 1e-10, f"hand vs surrogate: {check.hand_second:.3g}"
    elif spec.composite is not None:
        assert check.hand_second < 1e-10, f"hand vs engine composite: {check.hand_second:.3g}"
    assert check.report, str(check.report)
    assert check.report.normwise_error < 1e-9, str(check.report)


def test_gradient_kind_is_known():
    for spec in ALL_SPECS:
        assert spec.gradient in ("exact", "surrogate"), spec.name
        if spec.gradient == "surrogate":  # written independently, or a stop-gradient call
            assert spec.gradient_note, spec.name
            assert (spec.surrogate is not None) != (spec.freeze is not None), spec.name


@pytest.mark.parametrize("spec,sample", SAMPLES)
def test_op_inside_a_graph(spec, sample):
    """custom_vjp wiring: the op composes with other primitives and with accumulation."""
    y, _, cache = spec.run(sample)
    ys = spec.output_values(y)
    cs = spec.output_values(_upstream(spec, sample, [v.shape for v in ys]))
    tensors = [None if a is None else Tensor(a, requires_grad=True) for a in sample.arrays]
    out = spec.op(**spec.arguments(sample, tensors))
    out = out[0] if spec.stateful else out
    loss = None
    for o, c in zip(spec.output_values(out), cs):  # every output, each used twice
        term = (ag.tanh(o) * c).sum() + (o * c).sum()
        loss = term if loss is None else loss + term
    loss.backward()
    expected = spec.backward(spec.upstream((1 - np.tanh(v) ** 2) * c + c
                                           for v, c in zip(ys, cs)), cache)
    for t, e in zip(tensors, expected):
        if t is not None:
            assert normwise(t.grad, e) < 1e-12


def _stats_samples(spec, sample):
    # None where the variant, or this sample (running statistics), does not standardize
    return spec.standardized_groups(sample) is not None


def _group_moments(a, labels, count):
    """Per-group mean and biased variance of ``a``, two-pass, in extended precision."""
    order = np.argsort(labels.ravel(), kind="stable")  # group by group (bincount is float64)
    a, labels = a.astype(np.longdouble).ravel()[order], labels.ravel()[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    assert len(starts) == count, "every group holds at least one element"
    sizes = np.diff(np.r_[starts, labels.size])
    mean = np.add.reduceat(a, starts) / sizes
    var = np.add.reduceat((a - np.repeat(mean, sizes)) ** 2, starts) / sizes
    return mean, var


@pytest.mark.parametrize("spec,sample", _samples(filter_=_stats_samples))
def test_normalized_statistics_are_exact(spec, sample):
    """Without affine parameters: mean 0 and variance s^2 / (s^2 + eps), not just "about 1"."""
    x = sample.arrays[0]
    arrays = (x,) + (None,) * (len(sample.arrays) - 1)
    y = spec.output(sample, arrays)
    labels, count = spec.standardized_groups(sample)
    _, s2 = _group_moments(x, labels, count)
    eps = sample.kwargs.get("eps", 1e-5)
    expected_var = (s2 / (s2 + eps)).astype(np.float64)
    mean_y, var_y = _group_moments(y, labels, count)
    np.testing.assert_allclose(mean_y.astype(np.float64), 0.0, atol=1e-14)
    np.testing.assert_allclose(var_y.astype(np.float64), expected_var, rtol=1e-12, atol=1e-15)


def _invariance_samples(spec, sample):
    return bool(spec.invariances) and _stats_samples(spec, sample)


@pytest.mark.parametrize("spec,sample", _samples(filter_=_invariance_samples))
def test_declared_invariances(spec, sample):
    x = sample.arrays[0]
    y = spec.output(sample)
    labels, count = spec.standardized_groups(sample)
    rng = np.random.default_rng(SEED)
    if "shift" in spec.invariances:  # a random constant per group
        shifted = (x + rng.standard_normal(count)[labels],) + tuple(sample.arrays[1:])
        assert normwise(spec.output(sample, shifted), y) < 1e-10
    if "scale" in spec.invariances:
        a = 3.7
        scaled = sample._replace(kwargs={**sample.kwargs, "eps": sample.kwargs["eps"] * a * a})
        out = spec.output(scaled, (x * a,) + tuple(sample.arrays[1:]))
        assert normwise(out, y) < 1e-12


@pytest.mark.parametrize("spec,sample", SAMPLES)
def test_float32_path_agrees_with_float64(spec, sample):
    def cast(v):
        return v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v

    s32 = sample._replace(arrays=tuple(None if a is None else cast(a) for a in sample.arrays),
                          kwargs={k: cast(v) for k, v in sample.kwargs.items()})
    y64, _, c64 = spec.run(sample, [None if a is None else a.astype(np.float64)
                                    for a in s32.arrays])
    y32, _, c32 = spec.run(s32)
    for o32, o64 in zip(spec.output_values(y32), spec.output_values(y64)):
        assert o32.dtype == np.float32
        assert normwise(o32, o64) < 2e-5
    dy = spec.output_values(_upstream(spec, sample, [np.shape(v) for v in
                                                     spec.output_values(y64)]))
    for g32, g64 in zip(spec.backward(spec.upstream(d.astype(np.float32) for d in dy), c32),
                        spec.backward(spec.upstream(dy), c64)):
        if g64 is not None:
            assert g32.dtype == np.float32
            assert normwise(g32, g64) < 1e-4


def _error_params():
    return [pytest.param(spec, e, id=f"{spec.name}-{e.sample.name}") for spec in ALL_SPECS
            if spec.error_inputs for e in spec.error_inputs()]


@pytest.mark.parametrize("spec,error", _error_params())
def test_error_inputs_raise(spec, error):
    copies = _copies(error.sample)
    with pytest.raises(error.error_type, match=error.match):
        spec.run(error.sample)
    _assert_unchanged(error.sample, copies)


def test_every_spec_has_error_inputs_and_sample_inputs():
    for spec in ALL_SPECS:
        assert spec.error_inputs is not None and list(spec.error_inputs()), spec.name
        assert list(spec.sample_inputs(np.random.default_rng(0))), spec.name

"""Every registered variant under bad and adversarial input (``docs/notes/reliability.rst``).

For each input, refnorm gives one of two things: a finite output that agrees with an
extended-precision reference (and the invariants), or the documented exception. It never
crashes, never gives an unexplained NaN, and never mutates an input.

* property tests (hypothesis, profile ``ci`` by default, ``REFNORM_HYPOTHESIS_PROFILE=long``
  locally; ``EXAMPLES`` calls per variant and dtype): random shapes with size-1 and size-0 axes
  (in any position), three dtypes, scales over each dtype's whole range (subnormals to near
  its maximum), constant groups, cancellation-prone offsets, and NaN/inf put into any floating
  input; no warning may escape (the file runs under ``-W error::RuntimeWarning``);
* deterministic adversarial tests: bad keyword arguments, bad arrays (lists, integer, complex,
  ndarray subclasses), mixed dtypes, memory layouts (Fortran order, strides, negative strides,
  read-only, big-endian);
* the known, reported bugs (``tests/reliability/known_bugs.py``), each a strict xfail.

Everything iterates ``refnorm.norms.ALL_SPECS``: a new variant is covered without edits here.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from refnorm.norms import ALL_SPECS
from reliability.calls import (assert_unchanged, copy_inputs, describe, execute, float_slots,
                               free_axes, get_slot, is_documented_error, replace_slots,
                               with_x)
from reliability.contract import check_call, check_nonfinite
from reliability.known_bugs import (API_BUGS, ARRAY_BUGS, KNOWN_BUGS, explaining,
                                    marker_reason, xfail_params)
from reliability.strategies import DTYPES, Call, calls, injections, samples_of

SPEC_IDS = [s.name for s in ALL_SPECS]

# No NumPy warning may escape a public function for an input the contract covers (issue 17):
# the variants' calls are recorded by ``execute`` (a "warning" failure), and anything else
# raises here.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# The example budget per variant (and dtype, for the finite-input test): at most 30 in the "ci"
# profile, so that the suite stays within minutes as the registry grows (8 variants: 720 + 240
# calls); the "long" profile's own count locally; REFNORM_RELIABILITY_EXAMPLES overrides both.
EXAMPLES = int(os.environ.get("REFNORM_RELIABILITY_EXAMPLES", 0)) or (
    settings.default.max_examples if settings.default.max_examples > 100
    else min(settings.default.max_examples, 30))


def _dtype_id(dtype):
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------------------
# Property tests
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_finite_input_gives_the_reference_or_a_documented_error(spec, dtype, data):
    call = data.draw(calls(spec, dtype), label="call")
    failures = check_call(call)
    event(f"regime {call.regime}")
    bug = explaining(call, failures)
    if bug is not None:
        event(f"known bug {bug.id}")
        return
    for f in failures:
        note(str(f))
    assert not failures, "\n".join(map(str, failures))


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_nan_and_inf_stay_in_their_group_and_never_vanish(spec, data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    call = data.draw(calls(spec, dtype), label="call")
    if call.sample.arrays[0].size == 0:
        event("empty")
        return
    injected = data.draw(injections(spec, call.sample), label="injected")
    failures = check_nonfinite(call, injected)
    for f in failures:
        note(str(f))
    assert not failures, "\n".join(map(str, failures))


def _check_known_bug(bug, variant):
    """A concrete call for each reported bug: fails until the bug is fixed (then delete the
    entry in ``tests/reliability/known_bugs.py``)."""
    call = bug.example(variant)
    failures = check_call(call)
    assert not failures, "\n".join(map(str, failures))


# Collected only while the table has entries: pytest reports an empty parameter set as a skip.
if xfail_params():
    test_known_bug = pytest.mark.parametrize(
        "bug,variant",
        [pytest.param(b, v, id=f"{b.id}-{v}", marks=pytest.mark.xfail(
            strict=True, reason=f"known bug {b.id} (see tests/reliability/known_bugs.py)"))
         for b, v in xfail_params()])(_check_known_bug)


def test_known_bug_examples_are_explained_by_their_entry():
    """Each example really shows its bug, and only that one (the property tests rely on it)."""
    for bug, variant in xfail_params():
        call = bug.example(variant)
        failures = check_call(call)
        assert failures, f"{bug.id}/{variant}: the example passes: is the bug fixed?"
        assert explaining(call, failures) is not None, (bug.id, variant, failures)


# Variants whose first sample has an axis that can grow (spectral_norm has none: its u and v fix
# the weight's shape, and its backward has no row blocks to exercise).
RESIZABLE = [s for s in ALL_SPECS if free_axes(s, samples_of(s)[0])]


@pytest.mark.parametrize("spec", RESIZABLE, ids=[s.name for s in RESIZABLE])
def test_a_large_input_agrees_with_the_reference(spec):
    """2 MiB of float64 (2^18 elements) along a free axis of the first sample: more than one of
    the 1 MiB row blocks the fast code paths work in (``_stats.row_blocks``), so a block that is
    skipped, overlapped or summed twice shows; same contract and tolerance as the property
    tests."""
    sample = samples_of(spec)[0]
    free = free_axes(spec, sample)
    shape = list(sample.arrays[0].shape)
    shape[free[0]] = max(1, (1 << 18) // (int(np.prod(shape)) // shape[free[0]]))
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape)
    large = with_x(spec, sample, x)
    dy = spec.upstream(rng.standard_normal(shape) for shape in spec.output_shapes(large))
    call = Call(spec, large, dy, np.float64, "normal", 0, sample.name)
    failures = check_call(call)
    assert not failures, "\n".join(map(str, failures))


# ------------------------------------------------------------------------------------------
# Bad keyword arguments
# ------------------------------------------------------------------------------------------
BAD_VALUES = {
    "None": None, "True": True, "-1": -1, "0": 0, "2.5": 2.5, "nan": float("nan"),
    "inf": float("inf"), "-0.0": -0.0, "1e308": 1e308, "2**70": 2 ** 70, "str": "1",
    "list": [], "tuple": (1,), "np.float32": np.float32(0.5), "np.int64": np.int64(2),
    "0-d array": np.array(1.0), "array": np.array([1.0, 2.0]), "object": object(),
}


def _kwarg_params():
    params = []
    for spec in ALL_SPECS:
        samples = samples_of(spec)
        for key in sorted({k for s in samples for k in s.kwargs}):
            for label in BAD_VALUES:
                note = API_BUGS.get((spec.name, key, label))
                marks = pytest.mark.xfail(strict=True, reason=marker_reason(note)) if note else ()
                params.append(pytest.param(spec, key, label, id=f"{spec.name}-{key}={label}",
                                           marks=marks))
    return params


@pytest.mark.parametrize("spec,key,label", _kwarg_params())
def test_bad_keyword_argument_gives_a_result_or_the_documented_error(spec, key, label):
    """Any value of any keyword argument: a result, or a ValueError/TypeError from refnorm
    naming the argument; never a NumPy or Python error from deep inside; never a mutation."""
    sample = next(s for s in samples_of(spec) if key in s.kwargs)
    bad = sample._replace(kwargs={**sample.kwargs, key: BAD_VALUES[label]})
    snap = copy_inputs(bad)
    out = execute(spec, bad)
    assert_unchanged(bad, snap)
    if not out.ok:
        assert is_documented_error(spec, out.error), describe(out.error)
    else:
        assert out.y.shape == spec.y_shape(bad)


# ------------------------------------------------------------------------------------------
# Bad arrays
# ------------------------------------------------------------------------------------------
class _Subclass(np.ndarray):
    """A trivial ndarray subclass."""


def _bad_arrays(a):
    out = {"list": a.tolist(), "int": a.astype(np.int64), "bool": a > 0,
           "complex": a.astype(np.complex128), "object": a.astype(object), "str": "x",
           "scalar": 1.5}
    return out


def _subclass_arrays(a):
    mask = np.zeros(a.shape, bool)
    if a.size:
        mask.flat[0] = True
    out = {"masked": np.ma.masked_array(a, mask=mask), "subclass": a.view(_Subclass)}
    if a.ndim == 2:
        out["matrix"] = np.asmatrix(a)
    return out


def _array_params(kinds):
    params = []
    for spec in ALL_SPECS:
        sample = samples_of(spec)[0]
        for i, a in enumerate(sample.arrays):
            if a is None:
                continue
            name = spec.diff_argnames[i]
            for label in kinds(a):
                note = ARRAY_BUGS.get((spec.name, name, label))
                marks = pytest.mark.xfail(strict=True, reason=marker_reason(note)) if note else ()
                params.append(pytest.param(spec, i, label, id=f"{spec.name}-{name}-{label}",
                                           marks=marks))
    return params


@pytest.mark.parametrize("spec,index,label", _array_params(_bad_arrays))
def test_array_of_the_wrong_type_raises_the_documented_error(spec, index, label):
    sample = samples_of(spec)[0]
    arrays = list(sample.arrays)
    arrays[index] = _bad_arrays(arrays[index])[label]
    out = execute(spec, sample._replace(arrays=tuple(arrays)))
    assert not out.ok, f"{label} {spec.diff_argnames[index]} accepted"
    assert is_documented_error(spec, out.error), describe(out.error)


@pytest.mark.parametrize("spec,index,label", _array_params(_subclass_arrays))
def test_ndarray_subclass_is_rejected_or_treated_as_its_data(spec, index, label):
    """np.matrix (``*`` is a matrix product, reductions keep 2 dimensions), masked arrays
    (reductions skip masked elements) and other subclasses: a documented TypeError, or exactly
    the result of the plain array, as a plain array."""
    sample = samples_of(spec)[0]
    arrays = list(sample.arrays)
    arrays[index] = _subclass_arrays(arrays[index])[label]
    out = execute(spec, sample._replace(arrays=tuple(arrays)))
    if not out.ok:
        assert is_documented_error(spec, out.error), describe(out.error)
        return
    plain = execute(spec, sample)
    for key, want in plain.outputs.items():
        got = out.outputs[key]
        assert np.array_equal(np.asarray(got), want, equal_nan=True), f"{key} differs"


def _mixed_params():
    params = []
    for spec in ALL_SPECS:
        for first, rest in ((np.float32, np.float64), (np.float64, np.float32)):
            name = f"{spec.name}-x_{np.dtype(first).name}-others_{np.dtype(rest).name}"
            note = ARRAY_BUGS.get((spec.name, "mixed", np.dtype(first).name))
            marks = pytest.mark.xfail(strict=True, reason=marker_reason(note)) if note else ()
            params.append(pytest.param(spec, first, rest, id=name, marks=marks))
    return params


@pytest.mark.parametrize("spec,first,rest", _mixed_params())
def test_mixed_dtypes_are_rejected_or_each_gradient_keeps_its_input_dtype(spec, first, rest):
    """The first array in one dtype, every other floating array in another. PyTorch raises;
    refnorm may raise the documented TypeError, or compute, and then ``y`` has the dtype of
    the first array or the promoted one, and every gradient the dtype of its own input (what
    an optimizer step or the engine's accumulation expects)."""
    for sample in samples_of(spec):
        slots = float_slots(spec, sample)
        if len(slots) < 2:
            continue
        mixed = replace_slots(sample, {
            s: get_slot(sample, s).astype(first if s == ("arg", 0) else rest) for s in slots})
        out = execute(spec, mixed)
        if not out.ok:
            assert is_documented_error(spec, out.error), describe(out.error)
            continue
        assert out.y.dtype in (np.dtype(first), np.result_type(first, rest)), out.y.dtype
        for name, g, a in zip(spec.diff_argnames, out.grads, mixed.arrays):
            if g is not None:
                assert g.dtype == a.dtype, f"{sample.name}: d{name} is {g.dtype}, {name} {a.dtype}"


# ------------------------------------------------------------------------------------------
# Memory layouts
# ------------------------------------------------------------------------------------------
def _layouts(a):
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    strided = big[tuple(slice(None, None, 2) for _ in a.shape)]
    strided[...] = a
    flipped = np.flip(np.flip(a).copy())  # negative strides, same values
    readonly = a.copy()
    readonly.flags.writeable = False
    return {"fortran": np.asfortranarray(a), "strided": strided, "negative-strides": flipped,
            "read-only": readonly, "big-endian": a.astype(a.dtype.newbyteorder(">"))}


LAYOUTS = ("fortran", "strided", "negative-strides", "read-only", "big-endian")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
def test_memory_layout_does_not_change_the_result(spec, layout):
    """Every array of every sample in another layout: the same result (to a few roundings: a
    strided reduction may sum in another order), no input written (read-only inputs would
    raise), no input mutated."""
    for sample in samples_of(spec):
        plain = execute(spec, sample)
        changed = replace_slots(sample, {s: _layouts(get_slot(sample, s))[layout]
                                         for s in float_slots(spec, sample)
                                         if get_slot(sample, s).ndim})
        snap = copy_inputs(changed)
        out = execute(spec, changed)  # the same dy: seeded, of the same shape and dtype
        assert_unchanged(changed, snap)
        assert out.ok, f"{sample.name}: {describe(out.error)}"
        for key, want in plain.outputs.items():
            got = np.asarray(out.outputs[key], dtype=want.dtype)
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            err = float(np.max(np.abs(got - want))) if want.size else 0.0
            assert err <= 64 * np.finfo(np.float64).eps * max(scale, 1e-300), \
                f"{sample.name}: {key} off by {err:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------
# The registry itself
# ------------------------------------------------------------------------------------------
def test_every_known_bug_names_registered_variants_and_failure_kinds():
    kinds = {"crash", "undocumented-error", "value-error", "precision-error", "mutation",
             "structure", "inaccurate", "constant", "scale", "statistics", "nonfinite",
             "warning"}
    for bug in KNOWN_BUGS:
        assert set(bug.kinds) <= kinds, bug.id
        assert bug.reason and bug.id

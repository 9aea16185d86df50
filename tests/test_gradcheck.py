"""Tests of refnorm.gradcheck: right gradients pass, wrong ones fail and are diagnosed, kinks are
reported as kinks, and bad arguments raise clear errors."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refnorm.gradcheck import (GradcheckError, GradcheckInconclusive, GradcheckReport, check_vjp,
                               directional_derivative, numerical_jacobian)
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward

MODES = ("fast", "slow")


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_vjp(cts, x):
    y = softmax(x)
    return (y * (cts[0] - np.sum(cts[0] * y, axis=-1, keepdims=True)),)


def tanh_vjp(cts, x):
    return (cts[0] * (1 - np.tanh(x) ** 2),)


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


# name: (f, vjp, one maker per input)
CORRECT = {
    "sin": (np.sin, lambda c, x: (c[0] * np.cos(x),), [normal(3, 4)]),
    "exp": (np.exp, lambda c, x: (c[0] * np.exp(x),), [normal(3, 4)]),
    "tanh": (np.tanh, tanh_vjp, [normal(2, 3, 4)]),
    "matmul": (lambda a, b: a @ b, lambda c, a, b: (c[0] @ b.T, a.T @ c[0]),
               [normal(3, 4), normal(4, 2)]),
    "two_outputs": (lambda x: (np.sin(x), np.sum(x ** 2, axis=0)),
                    lambda c, x: (c[0] * np.cos(x) + 2 * x * c[1],), [normal(3, 2)]),
    "softmax": (softmax, softmax_vjp, [normal(3, 5)]),
    "logsumexp": (lambda x: np.log(np.sum(np.exp(x), axis=-1)),
                  lambda c, x: (c[0][..., None] * softmax(x),), [normal(2, 5)]),
    "broadcast": (lambda a, b: a * b,
                  lambda c, a, b: (np.sum(c[0] * b, axis=1, keepdims=True),
                                   np.sum(c[0] * a, axis=0, keepdims=True)),
                  [normal(3, 1), normal(1, 4)]),
    "scalar_times_matrix": (lambda s, m: s * m, lambda c, s, m: (np.sum(c[0] * m), c[0] * s),
                            [lambda rng: np.array(1.3), normal(3, 4)]),
    "size0_axis": (np.tanh, tanh_vjp, [normal(0, 3)]),
    "size1_axis": (softmax, softmax_vjp, [normal(4, 1)]),
    "size1_leading": (np.tanh, tanh_vjp, [normal(1, 3)]),
    "zero_d": (np.sin, lambda c, x: (c[0] * np.cos(x),), [lambda rng: np.array(0.7)]),
    "integer_input": (lambda x, i: 2 * x[i],
                      lambda c, x, i: (np.bincount(i, 2 * c[0], minlength=x.size), None),
                      [normal(5), lambda rng: np.array([0, 3, 3, 1])]),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_gradients_pass(name, mode, rng):
    f, vjp, makers = CORRECT[name]
    report = check_vjp(f, vjp, [make(rng) for make in makers], mode=mode)
    assert report.passed and bool(report), str(report)
    assert report.kinks == [] and report.pattern == ""
    assert report.max_rel_error < 1e-7


def test_size0_input_is_not_evaluated_along(rng):
    report = check_vjp(np.tanh, tanh_vjp, (np.zeros((0, 3)),), mode="slow")
    assert report.passed and report.n_evals == 1 and report.worst is None
    assert "empty" in str(report)


# --------------------------------------------------------------------------- wrong gradients

def corrupted_tanh_vjp(corrupt):
    def vjp(cts, x):
        return (corrupt(cts[0] * (1 - np.tanh(x) ** 2)),)
    return vjp


def _scale_channel(g):
    g = g.copy()
    g[:, 1] *= 3.0
    return g


def _scale_row(g):
    g = g.copy()
    g[2] *= 1.5
    return g


def _bump_one(g):
    g = g.copy()
    g[1, 2, 3] += 0.5
    return g


WRONG = {  # name: (corruption, expected start of the pattern or None)
    "factor_2": (lambda g: 2 * g, "off by a constant factor 2.0"),
    "sign": (lambda g: -g, "sign flipped"),
    "relative_1e-4": (lambda g: g * (1 + 1e-4), "off by a constant factor 1.0001"),
    "one_element": (_bump_one, "one element wrong: (1, 2, 3)"),
    "one_channel": (_scale_channel, "one channel off: index 1 of axis 1"),
    "one_row": (_scale_row, "whole row off: index 2 of axis 0"),
    "zero": (np.zeros_like, "the analytic gradient is zero"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_gradients_fail_with_pattern(name, mode, rng):
    corrupt, pattern = WRONG[name]
    x = rng.standard_normal((4, 3, 5))
    report = check_vjp(np.tanh, corrupted_tanh_vjp(corrupt), (x,), mode=mode)
    assert not report.passed and not report, str(report)
    assert report.pattern.startswith(pattern), str(report)
    assert report.kinks == []
    assert report.worst.index is not None and report.worst.input == 0


@pytest.mark.parametrize("mode", MODES)
def test_missing_term_fails(mode, rng):
    # d/dx (x sin x) = sin x + x cos x; the vjp forgets sin x.
    report = check_vjp(lambda x: x * np.sin(x), lambda c, x: (c[0] * x * np.cos(x),),
                       (rng.standard_normal((3, 4)),), mode=mode)
    assert not report.passed
    assert report.max_rel_error > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_worst_element_is_named_with_its_values(mode, rng):
    x = rng.standard_normal((4, 3, 5))
    seen = []

    def vjp(cts, x):
        seen.append(cts[0])
        return (_bump_one(cts[0] * (1 - np.tanh(x) ** 2)),)

    report = check_vjp(np.tanh, vjp, (x,), mode=mode)
    w = report.worst
    assert (w.input, w.output, w.index) == (0, 0, (1, 2, 3))
    assert w.analytic - w.numerical == pytest.approx(0.5, abs=1e-8)
    # Element checks use the cotangent of the first (failing) draw: numerical = (J^T u)[j].
    expected = seen[0][1, 2, 3] * (1 - np.tanh(x[1, 2, 3]) ** 2)
    assert w.numerical == pytest.approx(expected, rel=1e-9)
    assert w.rel_error == pytest.approx(0.5 / max(abs(w.analytic), abs(w.numerical)))
    text = str(report)
    assert "FAILED" in text and "element (1, 2, 3) of input 0" in text
    assert f"relative error {w.rel_error:.3e}" in text


@pytest.mark.parametrize("mode", MODES)
def test_wrong_input_and_output_are_located(mode, rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    report = check_vjp(lambda a, b: a @ b, lambda c, a, b: (c[0] @ b.T, 1.01 * a.T @ c[0]),
                       (a, b), mode=mode)
    assert not report.passed and report.worst.input == 1
    assert report.pattern == "off by a constant factor 1.01"
    if mode == "fast":
        assert any("input 1" in note and "one by one" in note for note in report.notes)

    def f(x):
        return np.sin(x), x ** 2

    report = check_vjp(f, lambda c, x: (c[0] * np.cos(x) + 3 * x * c[1],), (a,), mode=mode)
    assert not report.passed and report.worst.output == 1


def test_large_input_fails_by_projection_and_names_the_factor(rng):
    x = rng.standard_normal(3000)  # above max_fallback_size: no element-by-element fallback
    report = check_vjp(np.tanh, corrupted_tanh_vjp(lambda g: 2 * g), (x,))
    assert not report.passed and report.worst.index is None
    assert report.pattern == "off by a constant factor 2.0"
    # one projection (6 evaluations) finds the failure; two more, drawn only after it, name the
    # factor; + 1: f again at x, to be sure it is deterministic
    assert report.n_evals == 1 + 3 * 6 + 1


# --------------------------------------------------------------------------- evaluation counts

def test_fast_mode_cost_does_not_depend_on_size(rng):
    small = check_vjp(np.tanh, tanh_vjp, (rng.standard_normal(10),))
    large = check_vjp(np.tanh, tanh_vjp, (rng.standard_normal(10_000),))
    assert small.passed and large.passed
    assert small.n_evals == large.n_evals == 1 + 6 <= 8  # issue 16: at most 8 by default
    assert check_vjp(np.tanh, tanh_vjp, (rng.standard_normal(10),), n_projections=5).n_evals == 31


def test_slow_mode_moves_every_element(rng):
    report = check_vjp(np.tanh, tanh_vjp, (rng.standard_normal((2, 3)),), mode="slow")
    # smooth f: two steps per element settle every one of them (issue 16: at most 4 each)
    assert report.n_evals == 1 + 6 * 4 and report.n_vjp_calls == 1


# --------------------------------------------------------------------------- kinks

def relu(x):
    return np.maximum(x, 0.0)


def relu_vjp(cts, x):
    return (cts[0] * (x > 0),)


def max_vjp(cts, x):
    g = np.zeros_like(x)
    g[np.argmax(x)] = cts[0]
    return (g,)


KINKS = {  # name: (f, vjp, x, indices of the kinks)
    "relu_at_0": (relu, relu_vjp, np.array([[0.0, 1.5, -2.0], [0.7, 0.0, -0.3]]),
                  {(0, 0), (1, 1)}),
    "abs_at_0": (np.abs, lambda c, x: (c[0] * np.sign(x),), np.array([0.0, 1.0, -2.0, 0.0]),
                 {(0,), (3,)}),
    "max_tie": (np.max, max_vjp, np.array([1.0, 3.0, 3.0, 2.0]), {(1,), (2,)}),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(KINKS))
def test_kinks_are_reported_not_failed(name, mode):
    f, vjp, x, where = KINKS[name]
    report = check_vjp(f, vjp, (x,), mode=mode)
    assert report.passed, str(report)
    assert {k.index for k in report.kinks} == where
    assert all(k.left != k.right for k in report.kinks)
    assert "non-differentiable" in str(report)


def test_kinks_of_a_large_input_are_inconclusive_not_failures(rng):
    x = relu(rng.standard_normal(3000))  # half the elements sit exactly on the kink
    report = check_vjp(relu, relu_vjp, (x,))
    # a random projection across kinks compares no slope: never a pass, never a failure
    assert not report and report.verdict == "INCONCLUSIVE" and report.inconclusive
    assert report.kinks and report.kinks[0].index is None
    assert any("inconclusive" in note for note in report.notes)
    assert any("mode='slow'" in note for note in report.notes), str(report)
    assert report.n_evals == 1 + 6  # no step search on a kink


@pytest.mark.parametrize("mode", MODES)
def test_relu_away_from_zero_has_no_kinks(mode, rng):
    x = rng.standard_normal((4, 5))
    x = np.where(np.abs(x) < 0.1, 0.5, x)
    report = check_vjp(relu, relu_vjp, (x,), mode=mode)
    assert report.passed and report.kinks == []


@pytest.mark.parametrize("mode", MODES)
def test_wrong_gradient_at_a_kink_still_fails(mode):
    x = np.array([0.0, 1.5, -2.0])
    report = check_vjp(relu, lambda c, x: (3 * c[0] * (x >= 0),), (x,), mode=mode)
    assert not report.passed


# --------------------------------------------------------------------------- the report

def test_raise_on_failure_carries_the_report(rng):
    x = rng.standard_normal((3, 4))
    with pytest.raises(GradcheckError, match="FAILED") as info:
        check_vjp(np.tanh, corrupted_tanh_vjp(lambda g: -g), (x,), raise_on_failure=True)
    assert isinstance(info.value, AssertionError)
    assert str(info.value) == str(info.value.report)
    assert "sign flipped" in str(info.value) and "worst: element" in str(info.value)
    assert check_vjp(np.tanh, tanh_vjp, (x,), raise_on_failure=True)  # passing: no raise


def test_report_is_bool_like_and_printable(rng):
    report = check_vjp(np.tanh, tanh_vjp, (rng.standard_normal(4),))
    assert isinstance(report, GradcheckReport) and report
    text = str(report)
    assert text.startswith("gradcheck passed (fast mode, 7 evaluations of f")
    assert "max relative error" in text and "worst" in text


def test_inputs_are_never_mutated(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal(4)
    x32 = rng.standard_normal(5).astype(np.float32)
    originals = [x.copy(), w.copy(), x32.copy()]
    for a in (x, w, x32):
        a.setflags(write=False)

    def f(x, w, z):  # a careless f that overwrites its arguments
        y = np.tanh(x * w), np.sum(z ** 2)
        x[...], w[...], z[...] = 0.0, 0.0, 0.0
        return y

    def vjp(c, x, w, z):
        g = c[0] * (1 - np.tanh(x * w) ** 2)
        return g * w, np.sum(g * x, axis=0), 2 * z * c[1]

    for mode in MODES:
        assert check_vjp(f, vjp, (x, w, x32), mode=mode), mode
    for a, original in zip((x, w, x32), originals):
        np.testing.assert_array_equal(a, original)
        assert a.dtype == original.dtype


def test_float32_inputs_are_checked_in_float64(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    dtypes = []

    def vjp(c, x):
        dtypes.append(x.dtype)
        return tanh_vjp(c, x)

    report = check_vjp(np.tanh, vjp, (x,))
    assert report.passed and dtypes == [np.float64]
    assert any("float32" in note and "float64" in note for note in report.notes)


def test_low_precision_f_is_noted(rng):
    report = check_vjp(lambda x: np.tanh(x.astype(np.float32)), tanh_vjp,
                       (rng.standard_normal(10),))
    assert any("not float64" in note for note in report.notes), str(report)
    assert any("could not resolve" in note for note in report.notes), str(report)


@settings(max_examples=25)
@given(shape=st.lists(st.integers(0, 3), max_size=3), mode=st.sampled_from(MODES),
       seed=st.integers(0, 2**16))
def test_property_any_shape(shape, mode, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    assert check_vjp(np.tanh, tanh_vjp, (x,), mode=mode, rng=seed)
    wrong = check_vjp(np.tanh, corrupted_tanh_vjp(lambda g: 1.001 * g), (x,), mode=mode)
    assert bool(wrong) == (x.size == 0)


# --------------------------------------------------------------------------- bad arguments

def ok_f(x):
    return np.tanh(x)


BAD = {  # name: (f, vjp, inputs, kwargs, exception, message)
    "f_returns_strings": (lambda x: ["a", "b"], tanh_vjp, None, {}, TypeError,
                          r"f must return .* list \['a', 'b'\]"),
    "f_returns_dict": (lambda x: {"y": x}, tanh_vjp, None, {}, TypeError,
                       r"f must return .* it returned dict"),
    "f_returns_none": (lambda x: None, tanh_vjp, None, {}, TypeError,
                       r"f must return .* NoneType"),
    "f_not_callable": ("tanh", tanh_vjp, None, {}, TypeError, "f must be callable"),
    "vjp_count": (ok_f, lambda c, x: (tanh_vjp(c, x)[0], None), None, {}, ValueError,
                  r"vjp returned 2 gradient\(s\) but f has 1 input"),
    "vjp_not_tuple": (ok_f, lambda c, x: tanh_vjp(c, x)[0], None, {}, TypeError,
                      "vjp must return a tuple"),
    "vjp_shape": (ok_f, lambda c, x: (np.zeros(4),), None, {}, ValueError,
                  r"vjp returned a gradient of shape \(4,\) for input 0, which has shape "
                  r"\(3, 4\)"),
    "inputs_strings": (ok_f, tanh_vjp, (np.array(["a", "b"]),), {}, TypeError,
                       r"inputs\[0\] has dtype <U1"),
    "inputs_none": (ok_f, tanh_vjp, (None,), {}, TypeError, r"inputs\[0\] has dtype object"),
    "inputs_bare_array": (ok_f, tanh_vjp, np.ones(3), {}, TypeError,
                          r"inputs must be a tuple .*wrap a single array"),
    "inputs_nan": (ok_f, tanh_vjp, (np.array([1.0, np.nan]),), {}, ValueError,
                   r"inputs\[0\] contains NaN"),
    "diff_int": (ok_f, tanh_vjp, (np.arange(3),), {"diff_argnums": [0]}, TypeError,
                 r"inputs\[0\] has dtype int64 and cannot be differentiated"),
    "diff_range": (ok_f, tanh_vjp, None, {"diff_argnums": [2]}, ValueError,
                   "diff_argnums contains 2"),
    "mode": (ok_f, tanh_vjp, None, {"mode": "medium"}, ValueError,
             "mode must be 'fast' or 'slow'; got 'medium'"),
    "n_projections": (ok_f, tanh_vjp, None, {"n_projections": 0}, ValueError,
                      "n_projections must be at least 1"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_arguments_raise_clear_errors(name, rng):
    f, vjp, inputs, kwargs, exception, message = BAD[name]
    inputs = (rng.standard_normal((3, 4)),) if inputs is None else inputs
    with pytest.raises(exception, match=message):
        check_vjp(f, vjp, inputs, **kwargs)


def test_f_changing_shape_is_reported(rng):
    calls = []

    def f(x):
        calls.append(1)
        return x[: 3 if len(calls) == 1 else 2]

    with pytest.raises(ValueError, match="f returned outputs of shapes"):
        check_vjp(f, lambda c, x: (np.zeros_like(x),), (rng.standard_normal(4),))


# --------------------------------------------------------------------------- the helpers

def test_numerical_jacobian_of_matmul(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    jac_a = numerical_jacobian(lambda a, b: a @ b, (a, b), argnum=0)
    np.testing.assert_allclose(jac_a, np.einsum("ik,lj->ijkl", np.eye(3), b), atol=1e-10)
    jac_b = numerical_jacobian(lambda a, b: a @ b, (a, b), argnum=1)
    np.testing.assert_allclose(jac_b, np.einsum("ik,jl->ijkl", a, np.eye(2)), atol=1e-10)
    jac_sin, jac_sq = numerical_jacobian(lambda x: (np.sin(x), x ** 2), (np.array(0.3),))
    assert jac_sin == pytest.approx(np.cos(0.3), rel=1e-10)
    assert jac_sq == pytest.approx(0.6, rel=1e-10)


def test_directional_derivative_value_error_and_kink(rng):
    x, v = rng.standard_normal(6), rng.standard_normal(6)
    value, error, kink = directional_derivative(np.sin, (x,), (v,))
    np.testing.assert_allclose(value, np.cos(x) * v, rtol=1e-9, atol=1e-12)
    assert not kink and np.all(error < 1e-8)
    assert np.all(np.abs(value - np.cos(x) * v) <= 4 * error + 1e-12)
    _, _, kink = directional_derivative(relu, (np.array([0.0, 2.0]),), (np.ones(2),))
    assert kink
    value, _, _ = directional_derivative(lambda a, b: a * b, (x, v), (None, np.ones(6)))
    np.testing.assert_allclose(value, x, rtol=1e-10)


# --------------------------------------------------------------------------- other libraries

def test_checks_a_torch_function_through_a_two_line_wrapper(torch, rng):
    # The wrapper of the module docstring.
    f = lambda x: torch.tanh(torch.tensor(x)).numpy()  # noqa: E731
    vjp = lambda cts, x: [g.numpy() for g in  # noqa: E731
                          torch.func.vjp(torch.tanh, torch.tensor(x))[1](torch.tensor(cts[0]))]
    x = rng.standard_normal((3, 4))
    assert check_vjp(f, vjp, (x,)) and check_vjp(f, vjp, (x,), mode="slow")
    wrong = lambda cts, x: (2 * vjp(cts, x)[0],)  # noqa: E731
    assert check_vjp(f, wrong, (x,)).pattern == "off by a constant factor 2.0"


# --------------------------------------------------------------------------- noisy forwards
# A forward that is not the exact function whose VJP is given: it accumulates in float16 or
# float32, or adds relative noise. Whatever its noise, the checker either resolves the
# comparison (and then judges it) or says INCONCLUSIVE; it never says "passed" beside an
# error it could not see (issue 17: "passed" next to a 135% error).

def _layer_norm_accumulating_in(dtype):
    def f(x, w, b):
        xs = x.astype(dtype)
        d = xs - xs.mean(axis=-1, keepdims=True, dtype=dtype)
        var = (d * d).mean(axis=-1, keepdims=True, dtype=dtype)
        return (d / np.sqrt(var + dtype(1e-5))).astype(np.float64) * w + b
    return f


def _layer_norm_with_noise(relative):
    rng = np.random.default_rng(99)  # fresh noise at every call: f is not even deterministic

    def f(x, w, b):
        y = layer_norm_forward(x, x.shape[-1:], w, b)[0]
        return y * (1 + relative * rng.standard_normal(y.shape))
    return f


def _layer_norm_vjp(cts, x, w, b):
    g = layer_norm_backward(cts[0], layer_norm_forward(x, x.shape[-1:], w, b)[1])
    return g.dx, g.dweight, g.dbias


NOISY = {"float16-accumulation": _layer_norm_accumulating_in(np.float16),
         "float32-accumulation": _layer_norm_accumulating_in(np.float32),
         **{f"noise-{r:g}": _layer_norm_with_noise(r) for r in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)}}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NOISY)
def test_a_noisy_forward_is_never_passed_beside_an_error_it_could_not_resolve(name, mode, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((6, 9)), rng.standard_normal(9) + 1, rng.standard_normal(9)
    report = check_vjp(NOISY[name], _layer_norm_vjp, [x, w, b], mode=mode, rng=seed)
    assert report.verdict in ("passed", "FAILED", "INCONCLUSIVE")
    assert bool(report) == (report.verdict == "passed")
    if report.passed:  # then every error it shows is within what it could resolve
        assert report.normwise_error <= 2e-4, str(report)
        assert report.n_unresolved == 0
    else:
        assert "passed" not in str(report).splitlines()[0]
    if report.inconclusive:
        text = str(report)
        assert "could not resolve" in text and "what to do" in text and "float64" in text


def test_the_float16_layer_norm_of_issue_17_is_not_passed():
    """The exact report of the issue: float16 accumulation, exact float64 backward, fast mode,
    shape (6, 9) with weight and bias: torch.autograd.gradcheck fails it in both modes."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x, w, b = rng.standard_normal((6, 9)), rng.standard_normal(9) + 1, rng.standard_normal(9)
        for mode in MODES:
            report = check_vjp(NOISY["float16-accumulation"], _layer_norm_vjp, [x, w, b],
                               mode=mode, rng=seed)
            assert not report, str(report)


def test_the_exact_forward_still_passes_and_noise_below_the_resolution_passes_too(rng):
    x, w, b = rng.standard_normal((6, 9)), rng.standard_normal(9) + 1, rng.standard_normal(9)

    def exact(x, w, b):
        return layer_norm_forward(x, x.shape[-1:], w, b)[0]

    for mode in MODES:
        report = check_vjp(exact, _layer_norm_vjp, [x, w, b], mode=mode)
        assert report.verdict == "passed", str(report)
    # noise of 1e-12 relative is far below the 1e-4 resolution once the step search widens
    report = check_vjp(_layer_norm_with_noise(1e-12), _layer_norm_vjp, [x, w, b])
    assert report.verdict == "passed", str(report)


def test_inconclusive_raises_its_own_error_and_names_what_to_do(rng):
    x = rng.standard_normal(10)
    noisy = _layer_norm_with_noise(1e-3)

    def f(x):
        return noisy(x[None], np.ones(10), np.zeros(10))[0]

    def vjp(c, x):
        return (_layer_norm_vjp((c[0][None],), x[None], np.ones(10), np.zeros(10))[0][0],)

    report = check_vjp(f, vjp, (x,), mode="slow")
    assert report.verdict == "INCONCLUSIVE" and not report and report.inconclusive
    assert report.n_unresolved > 0
    with pytest.raises(GradcheckInconclusive, match="INCONCLUSIVE") as info:
        check_vjp(f, vjp, (x,), mode="slow", raise_on_failure=True)
    assert isinstance(info.value, GradcheckError) and info.value.report.inconclusive
    assert "what to do" in str(info.value) and "slow mode" in str(info.value)


def test_refnorm_verify_shows_inconclusive_as_its_own_status(monkeypatch, capsys):
    """A variant whose finite differences cannot decide is neither "pass" nor "FAIL"."""
    import refnorm.verify as verify
    from refnorm.cli import main

    def noisy_verifier(spec):
        x = np.random.default_rng(0).standard_normal((3, 5))
        f = NOISY["noise-0.001"]
        report = check_vjp(lambda x: f(x, np.ones(5), np.zeros(5)),
                           lambda c, x: _layer_norm_vjp(c, x, np.ones(5), np.zeros(5))[:1],
                           [x], mode="slow")
        assert report.inconclusive, str(report)
        return verify.Result("norm", "noisy_norm", 1, float("nan"), report.normwise_error,
                             bool(report), "noisy forward", inconclusive=report.inconclusive)

    monkeypatch.setattr(verify, "registered",
                        lambda: [("norm", "noisy_norm", None, noisy_verifier)])
    assert main(["verify"]) == 1  # not a pass: the exit code says so
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "noisy_norm" in line)
    assert "INCONCLUSIVE" in row.split()
    assert "pass" not in row.split() and "FAIL" not in row.split()
    assert "0 passed, 0 failed, 1 inconclusive" in out


@pytest.mark.parametrize("mode", MODES)
def test_a_nondeterministic_f_is_never_failed_nor_passed(mode, rng):
    """Two calls of f at the same point differ: a disagreement proves nothing either way."""
    x, w, b = rng.standard_normal((6, 9)), rng.standard_normal(9) + 1, rng.standard_normal(9)
    report = check_vjp(_layer_norm_with_noise(1e-3), _layer_norm_vjp, [x, w, b], mode=mode)
    assert report.verdict == "INCONCLUSIVE", str(report)
    assert any("not deterministic" in note for note in report.notes)
    # deterministic and wrong still FAILS (the re-evaluation costs one call of f)
    wrong = check_vjp(lambda x: np.tanh(x), corrupted_tanh_vjp(lambda g: 1.01 * g), (x,),
                      mode=mode)
    assert wrong.verdict == "FAILED", str(wrong)


@pytest.mark.parametrize("mode", MODES)
def test_a_gradient_hidden_in_the_rounding_of_f_is_not_passed(mode, rng):
    """Issue 16: at inputs of scale 1e-20 the step moves a layer norm's outputs (about 1, the
    bias) by less than their rounding; the estimate is 0 within an error larger than the
    gradient. Neither the right gradient nor a wrong one may pass there."""
    x = 1e-20 * rng.standard_normal((2, 7))
    w, b = np.ones(7), np.ones(7)

    def f(x):
        return layer_norm_forward(x, (7,), w, b)[0]

    def vjp(cts, x):
        return (_layer_norm_vjp(cts, x, w, b)[0],)

    for scale in (1.0, 2.0):
        report = check_vjp(f, lambda c, x: (scale * vjp(c, x)[0],), (x,), mode=mode)
        assert not report and report.verdict == "INCONCLUSIVE", str(report)


# --------------------------------------------------------------------------- the mistake catalogue
# Every wrong backward of the oracle's catalogue (refnorm.oracle.mistakes), as a wrong vjp of
# the variant's own float64 forward, is rejected by fast mode within its default budget of
# evaluations (issue 16). A new mistake is covered automatically.

#: kinds whose mistake is in the running statistics only: dx, dweight and dbias are right
FORWARD_ONLY = {"running-variance-biased", "running-momentum-convention"}


def _catalogue_cases(variant):
    from refnorm.norms import BY_NAME
    from refnorm.oracle import generate
    cases, _ = generate(BY_NAME[variant], "float64", size="ci")
    return [c for c in cases if "oracle" in c.tags and not c.nonfinite]


def _catalogue_problem(variant, case, flags):
    """``f`` (the record's forward), the student's vjp with ``flags``, and the inputs."""
    from refnorm.norms import BY_NAME
    from refnorm.oracle import student
    spec = BY_NAME[variant]
    present = [i for i, a in enumerate(case.arrays) if a is not None]
    names = [case.argnames[i] for i in present]

    def f(*arrays):
        full = list(case.arrays)
        for i, a in zip(present, arrays):
            full[i] = a
        return spec.run(case.sample._replace(arrays=tuple(full)))[0]

    def vjp(cts, *arrays):
        out = student(variant, dict(zip(names, arrays)), cts[0], case.kwargs, dtype="float64",
                      **flags)
        return tuple(out["d" + n] for n in names)

    return f, vjp, [case.arrays[i] for i in present]


def _backward_changed(mistake, case):
    """Whether the mistake changes dx/dweight/dbias on the case (normwise, beyond 1e-6)."""
    from refnorm.oracle import student
    right = student(mistake.variant, case.inputs, case.dy, case.kwargs, dtype="float64")
    try:  # (instance_norm's wrong axis cannot update running statistics: not this case)
        wrong = mistake(mistake.variant, case.inputs, case.dy, case.kwargs, dtype="float64")
    except ValueError:
        return False
    for n in case.inputs:
        a, b = np.asarray(right["d" + n]), np.asarray(wrong["d" + n])
        if a.shape != b.shape or not np.max(np.abs(a - b), initial=0.0) <= \
                1e-6 * np.max(np.abs(a), initial=0.0):
            return True
    return False


_CONTROLS: dict = {}


def _control_passes(variant, case):
    """The correct student's vjp passes fast mode on the case: gradcheck can judge there."""
    key = (variant, case.name)
    if key not in _CONTROLS:
        f, vjp, inputs = _catalogue_problem(variant, case, {})
        _CONTROLS[key] = check_vjp(f, vjp, inputs, max_fallback_size=0)
    return _CONTROLS[key]


def _mistake_ids():
    from refnorm.oracle.mistakes import MISTAKES
    return [m.id for m in MISTAKES]


@pytest.mark.parametrize("mistake_id", _mistake_ids())
def test_fast_mode_rejects_every_wrong_backward_of_the_mistake_catalogue(mistake_id):
    from refnorm.oracle.mistakes import MISTAKES
    mistake = next(m for m in MISTAKES if m.id == mistake_id)
    cases = _catalogue_cases(mistake.variant)
    changed = [c for c in cases if _backward_changed(mistake, c)]
    if mistake.kind in FORWARD_ONLY:  # the list cannot hide a wrong backward
        assert not changed, f"{mistake.id} changes the backward on {changed[0].name}"
        return
    if not changed and "float64" in mistake.invisible_in:
        return  # roundings to a low-precision dtype (casting modes): nothing to see in float64
    assert changed, f"{mistake.id}: no oracle case where its backward differs"
    # the first such case where the right backward passes (tiny-scale or zero-row cases can
    # leave gradcheck unable to decide: it then says INCONCLUSIVE, not passed)
    case = next((c for c in changed if _control_passes(mistake.variant, c)), None)
    assert case is not None, f"{mistake.id}: the right backward passes on none of {changed}"
    control = _control_passes(mistake.variant, case)
    assert control.n_evals <= 8, str(control)
    f, vjp, inputs = _catalogue_problem(mistake.variant, case, mistake.flags)
    if mistake.kind == "dweight-not-reduced":  # dweight shaped like x: rejected by its shape
        with pytest.raises(ValueError, match="vjp returned a gradient of shape"):
            check_vjp(f, vjp, inputs, max_fallback_size=0)
        return
    # the verdict alone (diagnose=False: no localisation after the failure, the same verdict)
    report = check_vjp(f, vjp, inputs, max_fallback_size=0, diagnose=False)
    assert report.verdict == "FAILED", f"{mistake.id} on {case.name}:\n{report}"
    # found by the default budget (one projection)
    assert report.n_evals_to_failure <= 8, str(report)


# ------------------------------------------------------------------------------------------
# The mutant catalogue (scripts/mutation_test.py: every small change of the core variants'
# hand backward code) against fast mode: every mutant that changes a gradient on a small input
# is rejected within the default budget (issue 16). The script runs the whole test suite
# against each mutant (12 minutes); here only fast-mode gradcheck judges, in process.
# ------------------------------------------------------------------------------------------
def _mutation_script():
    import importlib.util
    import sys
    name = "_refnorm_mutation_script"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / "mutation_test.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (its dataclass looks its module up)
        spec.loader.exec_module(module)
    return sys.modules[name]


def _mutant_cases(spec):
    """The record's sample inputs and its oracle inputs up to 5000 elements, float64."""
    cases = list(spec.sample_inputs(np.random.default_rng(0)))
    cases += [s for s in spec.oracle_inputs(np.random.default_rng(0))
              if s.arrays[0].size <= 5000]
    return cases


def _mutant_problem(spec, sample, backward, original=None, wrong=None):
    """``f`` (the record's forward: y), the vjp of ``backward`` on a fresh cache, the inputs.
    With ``original`` and a list ``wrong``, each vjp call also appends whether ``backward``'s
    gradients differed from ``original``'s in that very call (beyond the resolvable change)."""
    present = [i for i, a in enumerate(sample.arrays) if a is not None]

    def full(arrays):
        out = list(sample.arrays)
        for i, a in zip(present, arrays):
            out[i] = a
        return sample._replace(arrays=tuple(out))

    def f(*arrays):
        return spec.run(full(arrays))[0]

    def vjp(cts, *arrays):
        _, _, cache = spec.run(full(arrays))
        grads = tuple(backward(np.array(cts[0]), cache)[i] for i in present)
        if wrong is not None:
            _, _, cache = spec.run(full(arrays))
            right = tuple(original(np.array(cts[0]), cache)[i] for i in present)
            rel, gap = _difference(right, grads)
            wrong.append(rel > _RESOLVED_CHANGE[0] and gap > _RESOLVED_CHANGE[1])
        return grads

    return f, vjp, [sample.arrays[i] for i in present]


def _gradient_change(spec, sample, original, mutated):
    """How much the mutated backward changes the gradients on ``sample``, with a random upstream
    gradient: ``(relative, absolute)``, the largest normwise relative change and the largest
    absolute one (inf for a shape, None-ness or NaN change), or None where it raises (a
    raising backward is caught by any check)."""
    import warnings
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        y, _, cache = spec.run(sample)
        dy = np.random.default_rng(7).standard_normal(np.shape(y))
        want = original(dy.copy(), cache)
        _, _, cache = spec.run(sample)
        try:
            got = mutated(dy.copy(), cache)
        except Exception:  # noqa: BLE001
            return None
    present = [i for i, a in enumerate(sample.arrays) if a is not None]
    return _difference([want[i] for i in present], [got[i] for i in present])


def _difference(want, got):
    """``(relative, absolute)``: the largest normwise relative and absolute differences."""
    with np.errstate(all="ignore"):
        rel = gap = 0.0
        for a, b in zip(want, got):
            if (a is None) != (b is None):
                return np.inf, np.inf
            if a is None:
                continue
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if a.shape != b.shape:
                return np.inf, np.inf
            g = np.max(np.abs(b - a), initial=0.0)
            if not np.isfinite(g):
                return np.inf, np.inf
            gap = max(gap, g)
            rel = max(rel, g / max(np.max(np.abs(a), initial=0.0), 1e-300))
    return rel, gap


#: a change of the gradient that finite differences resolve: 100 times check_vjp's rtol
#: relatively and 1000 times its atol absolutely. Smaller changes (rounding-level mutants of
#: the accuracy corrections; gradients below atol on tiny- or huge-scale inputs) are the
#: accuracy and reliability tests' to catch (docs/notes/mutation_testing.rst)
_RESOLVED_CHANGE = (1e-5, 1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the mutants' overflows and 0/0
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "batch_norm", "group_norm"])
def test_fast_mode_rejects_every_gradient_changing_mutant_of_the_core_backwards(variant):
    """Every mutant is either rejected where its change is resolvable (passed on none of those
    inputs, and FAILED, or its gradient's shape refused, within the default 7-evaluation
    budget on at least one; INCONCLUSIVE, never passed, where f does not move at all, as on
    one-element groups), or raises, or changes the gradients by less than finite differences
    resolve on every input. A mutant that reads uninitialized memory may be right in the calls
    that gradcheck makes: a pass counts as a miss only where the gradients it was given were
    wrong."""
    from refnorm.norms import BY_NAME
    script = _mutation_script()
    spec = BY_NAME[variant]
    source, mutants = script.mutants(variant)
    assert len(mutants) >= 40, len(mutants)
    original = getattr(script._load(variant, source, "orig"), f"{variant}_backward")
    cases = _mutant_cases(spec)
    controls = {}

    def control(k):  # the right backward passes fast mode there: gradcheck can judge
        if k not in controls:
            controls[k] = check_vjp(*_mutant_problem(spec, cases[k], original),
                                    max_fallback_size=0).verdict == "passed"
        return controls[k]

    rejected, raised, below, missed = 0, 0, [], []
    for m in mutants:
        mutated = getattr(script._load(variant, script.apply(source, m.start, m.end,
                                                             m.replacement), f"m{m.index}"),
                          f"{variant}_backward")
        change = [_gradient_change(spec, c, original, mutated) for c in cases]
        if any(g is None for g in change):
            raised += 1
            continue
        judged = [k for k, (rel, gap) in enumerate(change)
                  if rel > _RESOLVED_CHANGE[0] and gap > _RESOLVED_CHANGE[1] and control(k)]
        if not judged:
            below.append(f"{m.label}: {max(rel for rel, _ in change):.1e}")
            continue
        passed, caught, doubted, given_wrong = [], 0, 0, 0
        for k in judged:
            wrong: list = []
            try:  # the verdict alone (diagnose=False: the same verdict, not localised)
                r = check_vjp(*_mutant_problem(spec, cases[k], mutated, original, wrong),
                              max_fallback_size=0, diagnose=False)
            except ValueError as exc:  # a gradient of the wrong shape: refused before f runs
                assert "vjp returned a gradient of shape" in str(exc), exc
                caught += 1
                continue
            if not any(wrong):  # right in gradcheck's own calls (uninitialized memory)
                continue
            given_wrong += 1
            passed += [cases[k].name] if r.verdict == "passed" else []
            caught += r.verdict == "FAILED" and r.n_evals_to_failure <= 8
            # f did not move at all (a constant f, as one-element groups give): not passed
            doubted += r.verdict == "INCONCLUSIVE"
        if passed or (given_wrong and not caught and not doubted):
            missed.append(f"{m.label}: passed on {passed}; failed within 8 evaluations on "
                          f"{caught} of the {given_wrong} inputs where gradcheck was given "
                          f"wrong gradients")
        else:
            rejected += 1
    assert not missed, "\n".join(missed)
    # most mutants are judged here; the others change nothing resolvable on small float64
    # inputs: code for float16, for the rescaling of extreme values, for several row blocks,
    # or the accuracy corrections (the mutation script's full runs judge those)
    assert rejected + raised >= 0.6 * len(mutants), (rejected, raised, below)


def test_diagnose_false_gives_the_same_verdict_without_localising():
    """diagnose=False stops at the first failed projection: FAILED at 8 evaluations (7 and the
    determinism check) where the default localises the culprit with many more; a right vjp
    passes at 7 either way; a non-deterministic f is still INCONCLUSIVE."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))

    def f(x, w):
        return np.tanh(x) * w

    def vjp(cts, x, w, factor=1.0):
        u = cts[0]
        return (1 - np.tanh(x) ** 2) * w * u, factor * np.tanh(x) * u

    wrong = functools.partial(vjp, factor=1.01)
    full = check_vjp(f, wrong, [x, w])
    quick = check_vjp(f, wrong, [x, w], diagnose=False)
    assert full.verdict == quick.verdict == "FAILED"
    assert quick.n_evals == 8 and quick.n_evals_to_failure == 7 < full.n_evals
    assert full.localised and not quick.localised
    assert "not localised" in quick.pattern and "one more checked" in str(quick)
    right = check_vjp(f, vjp, [x, w], diagnose=False)
    assert right.verdict == "passed" and right.n_evals == 7 and right.localised
    noisy = np.random.default_rng(6)

    def jittery(x, w):
        return f(x, w) + 1e-3 * noisy.standard_normal(x.shape)

    assert check_vjp(jittery, wrong, [x, w], diagnose=False).verdict == "INCONCLUSIVE"


def test_an_input_too_light_in_the_joint_projection_is_projected_on_its_own():
    """x's gradient is 1e12 times w's: a sign error in w's is far below the tolerance of the
    projection over both inputs, so w gets its own projection and the error is found."""
    def f(x, w):
        return np.concatenate([1e12 * np.sin(x), w ** 2])

    def vjp(cts, x, w, sign=-1.0):
        u = cts[0]
        return 1e12 * np.cos(x) * u[:x.size], sign * 2 * w * u[x.size:]

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(5), rng.standard_normal(4)
    report = check_vjp(f, vjp, [x, w], max_fallback_size=0)
    assert report.verdict == "FAILED" and report.n_evals_to_failure <= 13, report
    assert any("projected on its own" in n for n in report.notes), report.notes
    right = check_vjp(f, lambda cts, x, w: vjp(cts, x, w, 1.0), [x, w], max_fallback_size=0)
    assert right.verdict == "passed" and right.n_evals == 13, right
    # inputs of comparable weight: one projection, 7 evaluations
    balanced = check_vjp(lambda x, w: np.concatenate([np.sin(x), w ** 2]),
                         lambda cts, x, w: (np.cos(x) * cts[0][:5], 2 * w * cts[0][5:]), [x, w])
    assert balanced.verdict == "passed" and balanced.n_evals == 7, balanced

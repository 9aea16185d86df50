"""The fused residual-add norms (add_rms_norm, add_layer_norm): their two outputs in the engine,
and the oracle on NumPy kernels of each convention (``norm_kernels.kernel``), correct and with
one deliberate mismatch.
"""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.autograd import Tensor
from refnorm.norms import BY_NAME
from refnorm.norms.fused_add_norm import add_layer_norm, add_rms_norm
from refnorm.oracle import check

from norm_kernels import flagged, kernel

VARIANTS = ("add_rms_norm", "add_layer_norm")


no_s = flagged(return_s=False)
s_rounded = flagged(round_s=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_correct_numpy_kernel_passes(variant, dtype):
    report = check(kernel, variant, dtype=dtype, size="ci")
    assert report.passed, report.format()
    ran = [r for r in report.results if r.status == "pass"]
    assert len(ran) >= 15
    for r in ran:  # both outputs and every gradient compared
        assert {"y", "s", "dx", "dresidual"} <= set(r.outputs), r


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_kernel_that_does_not_return_s_fails_and_is_named(variant, dtype):
    report = check(no_s, variant, dtype=dtype, size="ci")
    assert not report.passed
    assert "the residual sum s (prenorm output) is not returned" in \
        report.diagnoses[variant], report.format()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_s_rounded_to_the_input_dtype_under_residual_in_fp32_fails_and_is_named(variant, dtype):
    report = check(s_rounded, variant, dtype=dtype, size="ci")
    assert not report.passed
    failing = report.failures()
    names = {r.case for r in failing}
    assert names and all("in-fp32" in n for n in names), names
    assert report.diagnoses[variant].startswith(
        "matches: the residual sum s rounded to the input dtype"), report.format()
    # the same kernel is right where residual_in_fp32 is not set: only those cases pass
    assert any(r.status == "pass" and "in-fp32" not in r.case for r in report.results)


def test_the_mistake_is_invisible_in_float32():
    """float32 input: s is float32 with or without residual_in_fp32."""
    assert check(s_rounded, "add_rms_norm", dtype="float32", size="ci").passed


@pytest.mark.parametrize("op,spec_name", [(add_rms_norm, "add_rms_norm"),
                                          (add_layer_norm, "add_layer_norm")])
def test_the_op_returns_two_tensors_and_an_unused_output_gets_a_zero_gradient(op, spec_name):
    spec = BY_NAME[spec_name]
    sample = next(spec.sample_inputs(np.random.default_rng(0)))
    tensors = [None if a is None else Tensor(a, requires_grad=True) for a in sample.arrays]
    y, s = op(**spec.arguments(sample, tensors))
    assert isinstance(y, Tensor) and isinstance(s, Tensor)
    np.testing.assert_array_equal(s.data, sample.arrays[0] + sample.arrays[1])
    dy = np.random.default_rng(1).standard_normal(y.shape)
    (y * dy).sum().backward()               # only y used: ds = 0
    _, cache = spec.forward(**spec.arguments(sample))
    expected = spec.backward((dy, np.zeros(s.shape)), cache)
    np.testing.assert_allclose(tensors[0].grad, expected.dx, rtol=0, atol=0)
    np.testing.assert_allclose(tensors[1].grad, expected.dresidual, rtol=0, atol=0)


def test_residual_in_fp32_keeps_s_in_float32_and_y_in_the_input_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8)).astype(np.float16)
    res = (100 * rng.standard_normal((3, 8))).astype(np.float16)
    (y, s), cache = BY_NAME["add_rms_norm"].forward(x, res, 8, residual_in_fp32=True)
    assert s.dtype == np.float32 and y.dtype == np.float16
    np.testing.assert_array_equal(s, x.astype(np.float32) + res.astype(np.float32))
    (y16, s16), _ = BY_NAME["add_rms_norm"].forward(x, res, 8)
    assert s16.dtype == np.float16
    grads = BY_NAME["add_rms_norm"].backward((np.ones_like(y), np.ones_like(s)), cache)
    assert grads.dx.dtype == np.float16 and grads.dresidual.dtype == np.float16
    # float64: the option changes nothing
    (y64, s64), _ = BY_NAME["add_layer_norm"].forward(x.astype(float), res.astype(float), 8,
                                                      residual_in_fp32=True)
    assert s64.dtype == np.float64 and y64.dtype == np.float64

"""The fused residual-add norms (add_rms_norm, add_layer_norm): their two outputs in the engine,
and the oracle on NumPy kernels of each convention, correct and with one deliberate mismatch.

The kernels are written here from the formulas (not from refnorm's code): float32 arithmetic
(float64 for float64 candidates), s = x + residual rounded once to its storage format (float32
with ``residual_in_fp32``, else the candidate dtype), the norm of the stored s (FlashAttention's
``layer_norm_ref``), every output rounded once to its format.
"""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.autograd import Tensor
from refnorm.norms import BY_NAME
from refnorm.norms.fused_add_norm import add_layer_norm, add_rms_norm
from refnorm.oracle import check
from refnorm.oracle.formats import FORMATS, get_format, round_to

VARIANTS = ("add_rms_norm", "add_layer_norm")


def kernel(variant, inputs, dy, kwargs, *, dtype, return_s=True, round_s=False):
    """A fused add-norm kernel in NumPy; ``return_s=False`` forgets the prenorm output,
    ``round_s=True`` stores s in the input dtype even under ``residual_in_fp32``."""
    if kwargs.get("eps_placement", "inside") != "inside":
        raise NotImplementedError("eps outside the square root")
    fmt = get_format(dtype)
    T = np.float64 if fmt.name == "float64" else np.float32
    s_fmt = FORMATS["float32"] if kwargs.get("residual_in_fp32") and fmt.p < 24 \
        and not round_s else fmt
    s = round_to(inputs["x"].astype(T) + inputs["residual"].astype(T), s_fmt).astype(T)
    nd = len(np.atleast_1d(kwargs["normalized_shape"]))
    n = int(np.prod(s.shape[s.ndim - nd:]))
    rows = s.reshape(-1, n)
    eps = T(kwargs["eps"])
    w = inputs.get("weight")
    w = np.ones(n, T) if w is None else w.astype(T).reshape(-1)
    if variant == "add_layer_norm":
        centred = rows - rows.mean(axis=1, keepdims=True, dtype=T)
        r = 1 / np.sqrt(np.mean(centred * centred, axis=1, keepdims=True, dtype=T) + eps)
        xhat = centred * r
    else:
        r = 1 / np.sqrt(np.mean(rows * rows, axis=1, keepdims=True, dtype=T) + eps)
        xhat = rows * r
    b = inputs.get("bias")
    y = xhat * w + (0 if b is None else b.astype(T).reshape(-1))
    dyr = dy["y"].astype(T).reshape(rows.shape)
    g = dyr * w
    k = np.mean(g * xhat, axis=1, keepdims=True, dtype=T)
    dxn = r * (g - xhat * k - (np.mean(g, axis=1, keepdims=True, dtype=T)
                                if variant == "add_layer_norm" else 0))
    dsum = dxn + dy["s"].astype(T).reshape(rows.shape)
    out = {"y": y.reshape(s.shape), "dx": dsum.reshape(s.shape),
           "dresidual": dsum.reshape(s.shape)}
    if "weight" in inputs:
        out["dweight"] = np.sum(dyr * xhat, axis=0, dtype=T).reshape(inputs["weight"].shape)
    if "bias" in inputs:
        out["dbias"] = np.sum(dyr, axis=0, dtype=T).reshape(inputs["bias"].shape)
    out = {k: round_to(v.astype(np.float64), fmt) for k, v in out.items()}
    if return_s:
        out["s"] = round_to(s.astype(np.float64), s_fmt)
    return out


kernel.variants = VARIANTS


def no_s(variant, inputs, dy, kwargs, *, dtype):
    return kernel(variant, inputs, dy, kwargs, dtype=dtype, return_s=False)


def s_rounded(variant, inputs, dy, kwargs, *, dtype):
    return kernel(variant, inputs, dy, kwargs, dtype=dtype, round_s=True)


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
    no_s.variants = VARIANTS
    report = check(no_s, variant, dtype=dtype, size="ci")
    assert not report.passed
    assert "the residual sum s (prenorm output) is not returned" in \
        report.diagnoses[variant], report.format()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_s_rounded_to_the_input_dtype_under_residual_in_fp32_fails_and_is_named(variant, dtype):
    s_rounded.variants = VARIANTS
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
    s_rounded.variants = VARIANTS
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

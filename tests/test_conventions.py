"""Kernel conventions of the LLM norms (issue 14): the weight offset and Liger-Kernel's casting
modes, in refnorm's records and in the oracle.

* The reference keeps full accuracy where the weight cancels its offset (checked against
  mpmath, not against the same formula).
* refnorm's own float16 forward rounds where its casting mode says.
* Fixture kernels written in torch, one per convention (llama, gemma, none; offset 0 and 1),
  pass the oracle in float32, float16 and bfloat16 when they claim their own convention; the
  same kernels with one mismatch (a wrong casting mode, an offset applied twice) fail, and the
  diagnosis names the mismatch.
* The records' torch_call of each mode, run through the oracle with the mode claimed: no false
  alarm on torch CPU float32 or bfloat16.
"""
from __future__ import annotations

import numpy as np
import pytest

from refnorm.norms.layer_norm import layer_norm_forward
from refnorm.norms.rms_norm import rms_norm_backward, rms_norm_forward
from refnorm.oracle import check, student, torch_function

MODES = ("llama", "gemma", "none")


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # one per xdist worker, a worker per core (conftest.py)
    return torch


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------
def test_offset_near_minus_offset_is_accurate_against_mpmath():
    """o + w formed first is exact near w = -o (Sterbenz): y keeps its full relative accuracy
    where o + w is 1e-15 of o. Expanding xhat w + xhat o would not (shown: the test can fail)."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16))
    w = -1.0 + np.ldexp(rng.integers(1, 64, 16).astype(float), -52)   # o + w ~ 1e-15
    eps = 1e-6
    y, cache = rms_norm_forward(x, 16, w, eps, offset=1.0)
    mpmath.mp.dps = 60
    exact = np.empty_like(x)
    for i in range(3):
        ms = mpmath.fsum(mpmath.mpf(v) ** 2 for v in x[i]) / 16
        r = 1 / mpmath.sqrt(ms + mpmath.mpf(eps))
        for j in range(16):
            exact[i, j] = float(mpmath.mpf(x[i, j]) * r * (1 + mpmath.mpf(w[j])))
    rel = np.abs(y - exact) / np.abs(exact)
    assert rel.max() < 8 * 2.0 ** -53, rel.max()
    xhat = x * cache.rstd
    expanded = xhat * w + xhat * 1.0
    assert (np.abs(expanded - exact) / np.abs(exact)).max() > 1e-3   # the cancellation
    # the backward uses o + w as well: dx of the offset weight equals dx of the weight o + w
    # (exact in float64 here), dweight keeps its form sum dy xhat
    dy = rng.standard_normal(x.shape)
    g = rms_norm_backward(dy, cache)
    y2, c2 = rms_norm_forward(x, 16, 1.0 + w, eps)
    g2 = rms_norm_backward(dy, c2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(g.dx, g2.dx)
    np.testing.assert_allclose(g.dweight, np.sum(dy * xhat, axis=0), rtol=1e-13)


def test_float16_forward_rounds_where_the_mode_says():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 40)).astype(np.float16)
    w = (0.3 * rng.standard_normal(40)).astype(np.float16)
    b = rng.standard_normal(40).astype(np.float16)
    eps = 1e-6
    x32 = x.astype(np.float32)
    r = 1 / np.sqrt(np.mean(x32 * x32, axis=1, keepdims=True) + np.float32(eps))
    xhat32 = x32 * r
    # gemma: everything in float32, o + w too, rounded once
    y, _ = rms_norm_forward(x, 40, w, eps, offset=1.0, casting_mode="gemma")
    want = (xhat32 * (np.float32(1) + w.astype(np.float32))).astype(np.float16)
    np.testing.assert_array_equal(y, want)
    # llama (and None, and none: see scaled_rows): xhat rounded, o + w in float16, product
    for mode in ("llama", None, "none"):
        y, _ = rms_norm_forward(x, 40, w, eps, offset=1.0, casting_mode=mode)
        want = xhat32.astype(np.float16) * (np.float16(1) + w)
        np.testing.assert_array_equal(y, want)
    # the modes differ somewhere (else this test would prove nothing)
    ya, _ = rms_norm_forward(x, 40, w, eps, offset=1.0, casting_mode="gemma")
    yb, _ = rms_norm_forward(x, 40, w, eps, offset=1.0, casting_mode="llama")
    assert np.any(ya != yb)
    # LayerNorm, gemma: (x - mu) r (o + w) + b in float32, rounded once
    y, c = layer_norm_forward(x, 40, w, b, 1e-5, offset=1.0, casting_mode="gemma")
    xh = ((x32 - c.mean.astype(np.float32)) * c.rstd.astype(np.float32))
    want = (xh * (1 + w.astype(np.float32)) + b.astype(np.float32)).astype(np.float16)
    assert np.max(np.abs(y.astype(np.float64) - want)) <= 2 * np.spacing(np.abs(want)).max()
    # float32 and float64: every mode is the same computation
    x64 = rng.standard_normal((4, 9))
    w64 = rng.standard_normal(9)
    outs = [rms_norm_forward(x64.astype(t), 9, w64.astype(t), 1e-6, offset=1.0,
                             casting_mode=m)[0] for t in (np.float32, np.float64)
            for m in (None,) + MODES]
    for t in range(2):
        for o in outs[4 * t:4 * t + 4]:
            np.testing.assert_array_equal(o, outs[4 * t])


# ----------------------------------------------------------------------------------------------
# Fixture kernels: one per convention, in torch
# ----------------------------------------------------------------------------------------------
def _rms_kernel(torch, mode, *, offset_times=1):
    """An RMSNorm kernel that computes in casting ``mode`` whatever it is told (the claim is
    its ``conventions`` attribute), adding the offset ``offset_times`` times."""

    def kernel(x, weight=None, *, normalized_shape, eps=None, eps_placement="inside",
               offset=0.0, casting_mode=None):
        if eps_placement != "inside":   # (no casting mode knows the authors' outside form)
            raise NotImplementedError("eps outside the square root")
        if eps is None:
            eps = torch.finfo(torch.float32).eps
        nd = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
        dims = tuple(range(-nd, 0))
        wide = x.dtype in (torch.float16, torch.bfloat16)
        t = x.float() if mode != "none" and wide else x
        ms = torch.mean(t * t, dim=dims, keepdim=True)
        xhat = t * torch.rsqrt(ms + eps)
        if mode != "gemma":
            xhat = xhat.to(x.dtype)
        if weight is None:
            return xhat.to(x.dtype)
        w = weight.to(xhat.dtype)
        for _ in range(offset_times):
            w = offset + w
        return (xhat * w).to(x.dtype)

    kernel.variants = ("rms_norm",)
    return kernel


def _claiming(kernel, **conventions):
    kernel.conventions = conventions
    return torch_function(kernel)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_each_convention_kernel_passes_with_its_claim(torch, mode, offset, dtype):
    report = check(_claiming(_rms_kernel(torch, mode), casting_mode=mode, offset=offset),
                   "rms_norm", dtype=dtype, size="ci")
    assert report.passed, report.format()
    assert report.conventions == {"casting_mode": mode, "offset": offset}
    ran = [r for r in report.results if r.status == "pass"]
    assert len(ran) >= 20
    # every case ran in the claimed convention
    assert all("convention the candidate does not claim" not in s.reason
               for s in report.skipped)


MISMATCHES = [
    # (computes, claims, dtypes, the name the diagnosis must give)
    ("llama", "gemma", ("bfloat16", "float16"), "llama casting where gemma is claimed"),
    ("none", "gemma", ("bfloat16", "float16"),
     "statistics in the input dtype where float32 is claimed"),
]


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("computes, claims, dtypes, name", MISMATCHES)
def test_a_wrong_casting_mode_fails_and_is_named(torch, computes, claims, dtypes, name, offset):
    for dtype in dtypes:
        report = check(_claiming(_rms_kernel(torch, computes), casting_mode=claims,
                                 offset=offset), "rms_norm", dtype=dtype, size="ci")
        assert not report.passed, f"{computes} claiming {claims} passed in {dtype}"
        diagnosis = report.diagnoses.get("rms_norm", "")
        assert diagnosis.startswith(f"matches: {name}"), (dtype, report.format())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_an_offset_applied_twice_fails_and_is_named(torch, mode, dtype):
    report = check(_claiming(_rms_kernel(torch, mode, offset_times=2), casting_mode=mode,
                             offset=1.0), "rms_norm", dtype=dtype, size="ci")
    assert not report.passed
    assert report.diagnoses["rms_norm"].startswith("matches: weight offset applied twice"), \
        report.format()


def test_the_numpy_student_passes_every_claim_in_every_dtype():
    """The catalogue's correct NumPy kernel follows any claimed convention."""
    for mode in MODES:
        for dtype in ("float32", "float16", "bfloat16"):
            r = check(student, ["rms_norm", "layer_norm"], dtype=dtype, size="ci",
                      conventions={"casting_mode": mode, "offset": 1.0})
            assert r.passed, r.format()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_no_false_alarm_for_the_torch_call_of_each_mode(torch, mode, dtype):
    """The records' torch_call written from torch ops in each mode (a fourth implementation),
    judged under the claimed mode and offset on every case."""
    r = check("torch", ["rms_norm", "layer_norm"], dtype=dtype, size="ci",
              conventions={"casting_mode": mode, "offset": 1.0})
    assert r.passed, r.format()


# ----------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------
def test_claims_are_validated_and_unclaimed_convention_cases_are_skipped_with_a_reason():
    def plain(variant, inputs, dy, kwargs, *, dtype):
        kw = {k: v for k, v in kwargs.items() if k not in ("offset", "casting_mode")}
        return student(variant, inputs, dy, kw, dtype=dtype)

    plain.variants = ("rms_norm",)
    report = check(plain, "rms_norm", dtype="bfloat16", size="ci")
    assert report.passed, report.format()
    reasons = [s.reason for s in report.skipped if "does not claim" in s.reason]
    assert reasons and "candidate.conventions" in reasons[0]
    with pytest.raises(ValueError, match="unknown convention 'residual'"):
        check(student, "rms_norm", conventions={"residual": True})
    with pytest.raises(ValueError, match="`casting_mode` must be None, 'llama'"):
        check(student, "rms_norm", conventions={"casting_mode": "bf16"})
    with pytest.raises(ValueError, match="'casting_mode' is not an option of group_norm"):
        check(student, "group_norm", conventions={"casting_mode": "llama"})


def test_none_mode_skips_cases_outside_its_range():
    """float16's squares overflow beyond |x| = 256: a correct mode-none kernel cannot be held
    to the bound there, so those cases are skipped with the reason."""
    r = check(student, "rms_norm", dtype="float16", size="ci",
              conventions={"casting_mode": "none"})
    assert r.passed, r.format()
    assert any("casting mode 'none''s range" in s.reason for s in r.skipped)


def test_cli_convention_option(tmp_path, monkeypatch, capsys):
    from refnorm.cli import main

    mod = tmp_path / "conv_kernels.py"
    mod.write_text(
        "from refnorm.oracle.mistakes import MISTAKES\n"
        "llama = next(m for m in MISTAKES if m.id == 'rms_norm:llama casting where gemma is "
        "claimed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["compare", "--impl", "conv_kernels:llama", "--variant", "rms_norm", "--dtype",
            "bfloat16", "--size", "ci", "--brief"]
    assert main(base + ["--convention", "casting_mode=llama", "--convention", "offset=1"]) == 0
    assert main(base + ["--convention", "casting_mode=gemma"]) == 1
    out = capsys.readouterr().out
    assert "llama casting where gemma is claimed" in out
    assert main(base + ["--convention", "casting_mode"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


"""Accuracy against exact arithmetic, and determinism.

**Accuracy.** The forward and backward of LayerNorm, RMSNorm, BatchNorm (training) and
GroupNorm (and InstanceNorm), on cancellation-prone inputs (mean 1e4, 1e6, 1e8; standard
deviation 1e-3, 0.1, 1), against references written in mpmath at 50 digits
(``tests/reliability/exact.py``, independent of refnorm: the staged chain rule of Ioffe &
Szegedy, itself checked against mpmath's numerical differentiation). The goal: at most 4 ULP of
float64 at the output's magnitude, for y and for every gradient. ``python
benchmarks/accuracy.py`` prints the table, with PyTorch float64 for comparison.

**Determinism.** The same seed gives bit-identical results and reports on repeated runs: the
forward/backward of every variant on all its sample and oracle inputs (in this process, and in a
fresh one under another PYTHONHASHSEED), the ULP table, the oracle's report and its golden
files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refnorm import oracle
from refnorm.norms import BY_NAME
from refnorm.oracle import goldens
from reliability import exact

TESTS = Path(__file__).resolve().parent


def _variant_params():
    return [pytest.param(v, id=v, marks=() if v in BY_NAME else
                         pytest.mark.skip(reason=f"{v} is not registered yet"))
            for v in exact.VARIANTS]


@pytest.mark.parametrize("variant", _variant_params())
def test_the_mpmath_reference_agrees_with_numerical_differentiation(variant):
    layout = exact.layouts()[variant]
    assert exact.check_reference_by_mp_diff(layout) < 1e-30


def test_the_reference_check_detects_a_wrong_reference(monkeypatch):
    """The check above is not vacuous: a reference whose dx is off by 1e-30 fails it."""
    good = exact.exact

    def wrong(layout, x, weight, bias, dy, eps=exact.EPS):
        out = good(layout, x, weight, bias, dy, eps)
        out["dx"] = [v * (1 + exact.mp.mpf(10) ** -25) for v in out["dx"]]
        return out

    monkeypatch.setattr(exact, "exact", wrong)
    assert exact.check_reference_by_mp_diff(exact.layouts()["layer_norm"]) > 1e-30


def _regime_params():
    params = []
    for v in exact.VARIANTS:
        for mean, std in exact.REGIMES:
            marks = () if v in BY_NAME else pytest.mark.skip(reason=f"{v} is not registered yet")
            params.append(pytest.param(v, mean, std, id=f"{v}-mean{mean:.0e}-std{std:.0e}",
                                       marks=marks))
    return params


@pytest.mark.parametrize("variant,mean,std", _regime_params())
def test_forward_and_backward_within_4_ulp_of_exact(variant, mean, std):
    row = exact.measure(variant, mean, std)
    worst = {k: round(v, 2) for k, v in row.errors.items()}
    assert set(worst) >= {"y", "dx", "dweight"}, worst
    assert max(worst.values()) <= exact.TARGET_ULP, worst


@pytest.mark.parametrize("variant,mean,std", _regime_params())
def test_without_affine_parameters_within_4_ulp_of_exact(variant, mean, std):
    """The same without weight and bias: the variants take another branch there (no g = gamma
    dy), with its own handling of the mean correction."""
    row = exact.measure(variant, mean, std, affine=False)
    worst = {k: round(v, 2) for k, v in row.errors.items()}
    assert set(worst) == {"y", "dx"}, worst
    assert max(worst.values()) <= exact.TARGET_ULP, worst


def test_the_measure_separates_the_three_classic_variances():
    """The measurement is not vacuous. A LayerNorm written here with E[x^2] - E[x]^2 is far off
    on mean-1e4 rows; with a plain two-pass variance it is still ~2,000 ULP off (the rounded
    mean is off by half an ULP of 1e4 and every centred value inherits it); with the correction
    pass refnorm uses, it is within the goal."""
    layout = exact.layouts()["layer_norm"]
    x, weight, bias, dy = exact.case_inputs(layout, 1e4, 1.0)
    ex = exact.exact(layout, x, weight, bias, dy)

    def ulp(xc, var):
        return exact.ulp_error(xc / np.sqrt(var + exact.EPS) * weight + bias, ex["y"])

    m0 = x.mean(axis=1, keepdims=True)
    one_pass = ulp(x - m0, np.mean(x * x, axis=1, keepdims=True) - m0 * m0)
    two_pass = ulp(x - m0, np.mean((x - m0) ** 2, axis=1, keepdims=True))
    d = x - m0
    xc = d - d.mean(axis=1, keepdims=True)
    corrected = ulp(xc, np.mean(xc ** 2, axis=1, keepdims=True))
    assert one_pass > 1e6 and 300 < two_pass < 1e5 and corrected <= exact.TARGET_ULP, \
        (one_pass, two_pass, corrected)


def test_the_table_compares_with_pytorch_float64(torch):
    rows = exact.table(["layer_norm"], torch=torch)
    text = exact.format_table(rows)
    assert "torch fwd" in text and "layer_norm" in text
    assert all(r.torch_errors for r in rows)
    assert max(r.forward for r in rows) <= exact.TARGET_ULP


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------
def test_forward_backward_are_bit_identical_on_repeated_runs():
    from reliability.determinism import fingerprint

    first = fingerprint(seed=1234)
    assert first == fingerprint(seed=1234)
    assert len(first) >= len(BY_NAME)


def test_forward_backward_are_bit_identical_in_a_fresh_process_with_another_hash_seed():
    from reliability.determinism import fingerprint

    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(TESTS / "reliability" / "determinism.py"),
                             "1234"], capture_output=True, text=True, env=env, timeout=300,
                            check=True)
    assert json.loads(result.stdout) == fingerprint(seed=1234)


def test_the_ulp_report_is_bit_identical_on_repeated_runs():
    variants = ["layer_norm", "batch_norm"]
    assert exact.format_table(exact.table(variants)) == exact.format_table(exact.table(variants))


def test_the_oracle_report_is_bit_identical_on_repeated_runs(torch):
    first = oracle.check("torch", "layer_norm", dtype="float32", seed=3, size="ci")
    second = oracle.check("torch", "layer_norm", dtype="float32", seed=3, size="ci")
    assert first.to_json() == second.to_json()
    assert str(first) == str(second)


def test_golden_files_are_byte_identical_on_repeated_exports(tmp_path):
    """Two exports with the same seed write the same bytes: every .npz and the manifest (whose
    SHA-256 entries a GPU test suite checks)."""
    first, second = tmp_path / "a", tmp_path / "b"
    for directory in (first, second):
        goldens.export(directory, ["layer_norm", "batch_norm"], dtypes=("float32",), seed=5,
                       size="ci")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and len(names) > 2
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

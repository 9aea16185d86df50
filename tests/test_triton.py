"""A Triton LayerNorm kernel of the project's own, checked through the oracle on the CPU.

``refnorm.oracle.examples.triton_layer_norm`` holds the kernels (forward; dx; dweight and
dbias) and their wrong twin (eps outside the square root). Under ``TRITON_INTERPRET=1``
Triton runs them on the CPU, so this checks a GPU kernel with no GPU:

* the kernel passes the oracle in float32 and float16 on every ``size="ci"`` case (the
  65536-long rows included), through ``check`` and through ``refnorm compare``;
* the wrong twin fails, the report names the bug, and the outputs it leaves right (the mean,
  dbias) pass;
* what the interpreter cannot do like a GPU (bfloat16) is declined with the reason, not
  failed or passed silently.

``TRITON_INTERPRET`` is set to 1 during these tests only (Triton and the kernels are defined
at their first import, under it); set ``TRITON_INTERPRET=0`` on a machine with a GPU to run the
same tests on the compiled kernels.
"""
from __future__ import annotations

import importlib
import os

import pytest

from refnorm.cli import main
from refnorm.oracle import check

MODULE = "refnorm.oracle.examples.triton_layer_norm"
RIGHT, WRONG = f"{MODULE}:candidate", f"{MODULE}:candidate_eps_outside"
ALL_OUTPUTS = {"y", "dx", "dweight", "dbias", "mean", "rstd"}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """``TRITON_INTERPRET=1`` (unless set) during each test of this file, and only then.

    Autouse fixtures run first, so it is set before the ``triton`` fixture's import: Triton
    reads it when it defines its own jitted helpers, at its first import in the process."""
    if "TRITON_INTERPRET" not in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def kernels(triton, torch):
    """The example module (its kernels are defined at its first import)."""
    torch.set_num_threads(1)  # one per xdist worker, a worker per core (conftest.py)
    return importlib.import_module(MODULE)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_layer_norm_passes_the_oracle(kernels, dtype):
    report = check(RIGHT, "layer_norm", dtype=dtype, size="ci")
    assert report.passed, report.format()
    assert report.device == "cpu" or not kernels.INTERPRET
    # every case ran (none declined), forward, backward and the saved statistics compared
    assert report.results and all(r.status == "pass" for r in report.results), report.format()
    for r in report.results:
        expected = {"y", "dx", "mean", "rstd"} | {
            "d" + n for n in ("weight", "bias") if f"d{n}" in r.outputs}
        assert set(r.outputs) == expected, (r.case, set(r.outputs))
    assert any(set(r.outputs) == ALL_OUTPUTS for r in report.results)
    names = {r.case for r in report.results}
    assert "oracle:(2,65536)-long-rows" in names and "oracle:(37,1000)" in names
    assert any(n.startswith("regime:mean1e4-std1e-3") for n in names)
    assert any(n.startswith("regime:nan") for n in names)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_wrong_twin_is_caught_and_named(kernels, dtype):
    report = check(WRONG, "layer_norm", dtype=dtype, size="ci")
    assert not report.passed
    assert "eps outside the sqrt" in report.diagnoses["layer_norm"], report.format()
    failing = {o.name for r in report.failures() for o in r.failing()}
    assert {"rstd", "dx"} <= failing, failing
    # the bug is in r alone: the mean and dbias (which do not depend on r) stay right
    for r in report.results:
        assert r.outputs["mean"].passed, (r.case, r.outputs["mean"].describe())
        if "dbias" in r.outputs:
            assert r.outputs["dbias"].passed, r.case
    text = report.format()
    assert "eps outside the sqrt" in text and "FAIL" in text


def test_triton_cli_compare(kernels, capsys):
    rc = main(["compare", "--impl", RIGHT, "--variant", "layer_norm", "--dtype", "float16",
               "--size", "ci", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ALL PASSED: float16 pass" in out and "oracle:(2,65536)-long-rows" in out
    rc = main(["compare", "--impl", WRONG, "--variant", "layer_norm", "--dtype", "float16",
               "--size", "ci", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "eps outside the sqrt" in out and "FAILED: float16 FAIL" in out


def test_triton_autograd_function_through_torch_function(kernels):
    from refnorm.oracle import torch_function

    report = check(torch_function(kernels.layer_norm, device=kernels.DEVICE), "layer_norm",
                   dtype="float32", size="ci")
    assert report.passed and report.results, report.format()


def test_triton_declines_what_it_cannot_check_with_the_reason(kernels):
    report = check(RIGHT, "layer_norm", dtype="float64", size="ci")
    assert report.results and all(r.status == "skipped" for r in report.results)
    assert all("accumulate in float32" in r.message for r in report.results)
    if kernels.INTERPRET:
        # the interpreter's bfloat16 conversions are not a GPU's (truncation, subnormals)
        report = check(RIGHT, "layer_norm", dtype="bfloat16", size="ci")
        assert report.results and all(r.status == "skipped" for r in report.results)
        assert all("interpreter" in r.message for r in report.results)


# ----------------------------------------------------------------------------------------------
# The Llama-style RMSNorm (casting mode "llama"), and its twin that claims "gemma"
# ----------------------------------------------------------------------------------------------
RMS = "refnorm.oracle.examples.triton_rms_norm"


@pytest.fixture
def rms_kernels(triton, torch):
    torch.set_num_threads(1)  # one per xdist worker, a worker per core (conftest.py)
    return importlib.import_module(RMS)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_rms_norm_llama_passes_with_its_claim(rms_kernels, dtype):
    report = check(f"{RMS}:candidate", "rms_norm", dtype=dtype, size="ci")
    assert report.passed, report.format()
    assert report.conventions == {"casting_mode": "llama"}
    ran = {r.case for r in report.results if r.status == "pass"}
    assert {"oracle:(37,1000)-offset1", "oracle:(2,65536)-long-rows",
            "oracle:(8,257)-offset1-weight-near-minus-offset"} <= ran
    # declined: only the eps-outside form, which no Llama kernel has
    declined = [r for r in report.results if r.status == "skipped"]
    assert all("outside the square root" in r.message for r in declined)


def test_triton_rms_norm_claiming_gemma_is_caught_and_named(rms_kernels):
    report = check(f"{RMS}:candidate_claims_gemma", "rms_norm", dtype="float16", size="ci")
    assert not report.passed
    assert report.diagnoses["rms_norm"].startswith(
        "matches: llama casting where gemma is claimed"), report.format()
    assert report.matched["rms_norm"] == ["rms_norm:llama casting where gemma is claimed"]

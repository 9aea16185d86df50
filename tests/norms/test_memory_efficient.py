"""The oracle and a memory-saving backward (xhat recomputed from y, as Apex's
``memory_efficient=True``): declared, it passes within the derived extra tolerance, and its
ill-conditioned cases (a weight near 0) are reported as such; undeclared, it fails where the
difference shows, and the diagnosis names it."""
from __future__ import annotations

import dataclasses
import os

import pytest

from refnorm.oracle import check
from refnorm.oracle.cases import generate
from refnorm.norms import BY_NAME

from norm_kernels import flagged

ME_VARIANTS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
recomputing = flagged(recompute=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", ME_VARIANTS)
def test_a_declared_memory_saving_backward_passes(variant, dtype):
    report = check(recomputing, variant, dtype=dtype, size="ci", memory_efficient=True)
    assert report.passed, report.format()
    assert report.memory_efficient
    compared = [r for r in report.results if r.status == "pass"]
    assert len(compared) >= len(report.results) / 2, report.format()
    for r in report.results:  # (the kernel has no eps outside the square root)
        if r.status == "skipped":
            assert r.message.startswith(("ill-conditioned for a memory-saving backward",
                                         "not implemented by the candidate: eps outside")), r


@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm"])
def test_an_undeclared_memory_saving_backward_fails_and_is_named(variant):
    """bfloat16 LayerNorm with bias: (y - bias) / weight loses |bias| / |weight| ULPs of y."""
    report = check(recomputing, variant, dtype="bfloat16", size="ci")
    assert not report.passed
    assert report.diagnoses[variant].startswith(
        "matches: xhat recomputed from y in the backward without declaring it"), \
        report.format()


def test_the_declaration_is_an_attribute_an_option_or_a_flag(tmp_path, monkeypatch, capsys):
    from refnorm.cli import main

    attr = flagged(recompute=True)
    attr.memory_efficient = True
    assert check(attr, "layer_norm", dtype="bfloat16", size="ci").passed
    mod = tmp_path / "me_kernels.py"
    mod.write_text("import sys\nsys.path.insert(0, %r)\nfrom norm_kernels import flagged\n"
                   "kernel = flagged(recompute=True)\n" % os.path.dirname(__file__))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["compare", "--impl", "me_kernels:kernel", "--variant", "layer_norm", "--dtype",
            "bfloat16", "--size", "ci", "--brief"]
    assert main(args) != 0
    assert main(args + ["--memory-efficient"]) == 0
    assert "memory-efficient" in capsys.readouterr().out


def test_a_zero_weight_is_reported_ill_conditioned_not_failed():
    spec = BY_NAME["layer_norm"]
    cases, _ = generate(spec, "bfloat16", size="ci")
    case = next(c for c in cases if c.name == "sample:(4,6)")
    weight = case.arrays[1].copy()
    weight[2] = 0.0
    zero = dataclasses.replace(case, arrays=(case.arrays[0], weight, case.arrays[2]))
    report = check(recomputing, "layer_norm", cases=[zero], memory_efficient=True)
    (result,) = report.results
    assert result.status == "skipped", report.format()
    assert result.message.startswith(
        "ill-conditioned for a memory-saving backward: weight[2] = 0"), result.message
    # the same kernel, undeclared, fails on it
    assert not check(recomputing, "layer_norm", cases=[zero]).passed

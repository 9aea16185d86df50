"""The course assignments and the autograder (refnorm.assignments).

Every reference solution scores 100%, every untouched starter 0; each deliberately wrong
solution of tests/fixtures/assignments scores less and its feedback names its mistake; hostile
files (an infinite loop, sys.exit, an exception, endless printing, a crash, an exit at import)
cost their checks only, within the time limits. The grader never imports a student file: the
tests check that it stays out of ``sys.modules``.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from importlib import resources

import jsonschema
import numpy as np
import pytest

from refnorm import assignments as A
from refnorm.assignments.grader import GRADESCOPE_SCHEMA, grade, ws_reference
from refnorm.cli import main

HERE = os.path.dirname(__file__)
FIX = os.path.join(HERE, "fixtures", "assignments")
SRC = os.path.join(os.path.dirname(HERE), "refnorm", "assignments")
NAMES = [a.name for a in A.ASSIGNMENTS]


def _fixture(name):
    return os.path.join(FIX, name + ".py")


@pytest.fixture(scope="module")
def solution_grades(tmp_path_factory):
    d = tmp_path_factory.mktemp("solutions")
    return {n: grade(n, A.write_solution(n, str(d))) for n in NAMES}


# ----------------------------------------------------------------------------------------------
# The assignments as files
# ----------------------------------------------------------------------------------------------
def test_six_assignments_are_shipped_as_package_data():
    assert len(A.ASSIGNMENTS) >= 6
    root = resources.files("refnorm.assignments")
    for folder in ("starters", "solutions"):
        shipped = {p.name for p in root.joinpath(folder).iterdir() if p.name.endswith(".py")}
        assert {a.filename for a in A.ASSIGNMENTS} <= shipped, (folder, shipped)
    # and declared so that `pip install .` ships them (setup.cfg package data, MANIFEST.in)
    setup = open(os.path.join(os.path.dirname(HERE), "setup.cfg")).read()
    assert "refnorm.assignments = starters/*.py, solutions/*.py" in setup
    manifest = open(os.path.join(os.path.dirname(HERE), "MANIFEST.in")).read()
    assert "recursive-include refnorm/assignments/starters *.py" in manifest
    assert "recursive-include refnorm/assignments/solutions *.py" in manifest


@pytest.mark.parametrize("name", NAMES)
def test_the_starter_is_the_solution_without_its_bodies(name):
    starter, solution = A.starter_text(name), A.solution_text(name)
    assert starter == A.derive_starter(solution), "regenerate starters/ with derive_starter"
    tree_s, tree_r = ast.parse(starter), ast.parse(solution)
    public = [f for f in tree_s.body if isinstance(f, ast.FunctionDef)
              and not f.name.startswith("_")]
    assert public and ast.get_docstring(tree_s) and "math:" in ast.get_docstring(tree_s)
    sigs = {f.name: ast.dump(f.args) for f in tree_r.body if isinstance(f, ast.FunctionDef)}
    for f in public:
        assert ast.get_docstring(f), f.name                       # documented
        assert ast.dump(f.args) == sigs[f.name]                   # the solution's signature
        body = [s for s in f.body if not (isinstance(s, ast.Expr)
                                          and isinstance(s.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.Raise), f.name
        assert "NotImplementedError" in ast.unparse(body[0])
    assert any(isinstance(f, ast.FunctionDef) and f.name == "_self_check" for f in tree_s.body)
    assert "if __name__ == \"__main__\":" in starter


@pytest.mark.parametrize("name", NAMES)
def test_the_solution_passes_its_own_self_check(name, tmp_path):
    import subprocess

    path = A.write_solution(name, str(tmp_path))
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "WRONG" not in out.stdout and not re.search(r":\s*False\b", out.stdout), out.stdout


# ----------------------------------------------------------------------------------------------
# Grading the references and the starters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_reference_solution_scores_100(name, solution_grades):
    g = solution_grades[name]
    assert g.percent == 100.0, g.text()
    assert not g.mistakes
    assert all(c.total > 0 for c in g.checks)          # no check passes vacuously
    assert "student_submission" not in sys.modules     # never imported here


@pytest.mark.parametrize("name", NAMES)
def test_an_untouched_starter_scores_0(name, tmp_path):
    g = grade(name, A.write_starter(name, str(tmp_path)))
    assert g.score == 0, g.text()
    assert "NotImplementedError" in g.text()


# ----------------------------------------------------------------------------------------------
# Classic mistakes: each fixture loses points and its feedback names it
# ----------------------------------------------------------------------------------------------
MISTAKEN = [
    ("batch_norm", "bn_unbiased_variance", "unbiased-variance", "unbiased variance"),
    ("layer_group_norm", "ln_eps_outside_sqrt", "eps-outside-sqrt", "eps outside the sqrt"),
    ("layer_group_norm", "ln_missing_mean_term", "missing-mean-term", "missing mean term"),
    ("layer_group_norm", "ln_wrong_axis", "wrong-axis", "wrong reduction axis"),
    ("batch_norm", "bn_dweight_not_summed", "dweight-not-summed",
     "dweight not summed over the batch"),
    ("layer_group_norm", "ln_dweight_not_reduced", "dweight-not-reduced", "dweight not reduced"),
    ("batch_norm", "bn_momentum_reversed", "running-momentum-convention", "momentum reversed"),
    ("autograd_primitives", "ag_missing_unbroadcast", "missing-unbroadcast", "unbroadcast"),
    ("gradient_checker", "gc_forward_difference", "forward-difference", "one-sided"),
    ("ws_adamp", "ws_unbiased_std", "ws-unbiased-std", "unbiased std"),
    ("ws_adamp", "adamp_no_projection", "adamp-no-projection", "without the projection"),
]


@pytest.mark.parametrize("name, fixture, kind, words", MISTAKEN,
                         ids=[m[1] for m in MISTAKEN])
def test_a_classic_mistake_loses_points_and_is_named(name, fixture, kind, words):
    g = grade(name, _fixture(fixture))
    assert g.percent < 100, g.text()
    assert g.mistake_kinds() == [kind], g.text()
    text = g.text()
    assert f"[{kind}]" in text and words in text, text
    # the failing checks carry the name too (the Gradescope output a student sees)
    failing = [t for t in g.gradescope()["tests"] if t["status"] == "failed"]
    assert failing and any(kind in t["output"] for t in failing)
    # and the feedback names a case, an output and an element with its values
    if name in ("batch_norm", "layer_group_norm") and kind != "dweight-not-reduced":
        assert "expected" in text and "got" in text and " at [" in text
    if kind == "dweight-not-reduced":
        assert "dweight: shape (" in text


def test_mutating_x_in_the_gradient_checker_is_caught():
    g = grade("gradient_checker", _fixture("gc_mutates_x"))
    mut = next(c for c in g.checks if c.name.startswith("no mutation"))
    assert mut.score == 0 and "modified its input in place" in mut.output()
    assert g.percent < 100


# ----------------------------------------------------------------------------------------------
# Containment
# ----------------------------------------------------------------------------------------------
def test_an_infinite_loop_fails_its_checks_within_the_time_limit():
    t0 = time.monotonic()
    g = grade("batch_norm", _fixture("hostile_loop"), time_limit=1.0)
    elapsed = time.monotonic() - t0
    assert g.score == 0
    text = g.text()
    assert "timed out" in text and "not run: 2 earlier calls timed out" in text
    # two timed-out calls, two process start-ups and the oracle's own work: bounded
    assert elapsed < 60, elapsed


def test_sys_exit_and_exceptions_cost_their_checks_only():
    g = grade("batch_norm", _fixture("hostile_exit"))
    assert g.score == 0 and "called sys.exit(3)" in g.text()
    g = grade("batch_norm", _fixture("hostile_raise"))
    assert g.score == 0 and "ZeroDivisionError" in g.text() and "line 5" in g.text()


def test_endless_printing_and_a_crash_are_contained():
    g = grade("gradient_checker", _fixture("hostile_print"), time_limit=5.0)
    text = g.text()
    assert g.score == 0
    assert "printed more than" in text                     # the printing call was stopped
    assert "exited with status 7" in text                  # os._exit in gradcheck


def test_an_exit_at_import_fails_every_check_with_the_reason():
    g = grade("batch_norm", _fixture("hostile_import"))
    assert g.score == 0 and "importing the file failed: called sys.exit('bye')" in g.text()


# ----------------------------------------------------------------------------------------------
# Output formats and the command line
# ----------------------------------------------------------------------------------------------
def test_gradescope_output_validates_against_the_documented_schema(solution_grades):
    for g in list(solution_grades.values()) + [grade("batch_norm",
                                                     _fixture("bn_momentum_reversed"))]:
        doc = json.loads(json.dumps(g.gradescope()))
        jsonschema.validate(doc, GRADESCOPE_SCHEMA)
        assert doc["score"] == pytest.approx(sum(t["score"] for t in doc["tests"]))
        for t in doc["tests"]:
            assert 0 <= t["score"] <= t["max_score"]
    # the schema is not vacuous: a test without max_score, or a bad visibility, is rejected
    bad = json.loads(json.dumps(g.gradescope()))
    del bad["tests"][0]["max_score"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, GRADESCOPE_SCHEMA)
    bad = json.loads(json.dumps(g.gradescope()))
    bad["tests"][0]["visibility"] = "sometimes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, GRADESCOPE_SCHEMA)


def test_partial_credit_is_per_check():
    """A checker that fails on the two matrix cases (of 10) loses a fifth of that check only."""
    g = grade("gradient_checker", _fixture("gc_vectors_only"))
    jac = g.checks[0]
    assert (jac.passed, jac.total) == (8, 10) and jac.score == pytest.approx(0.8 * 50)
    assert "case sin_prod, h=0.001" in jac.output() and "only vectors" in jac.output()
    assert g.checks[2].score == g.checks[2].max_score          # gradcheck: vectors only
    assert g.percent == pytest.approx(100 * g.score / g.max_score)


def test_cli_assignment_and_grade(tmp_path, capsys):
    assert main(["assignment", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in NAMES)
    assert main(["assignment", "new", "rms_norm", str(tmp_path / "s")]) == 0
    assert main(["assignment", "solution", "rms_norm", str(tmp_path / "r")]) == 0
    assert main(["assignment", "new", "rms_norm", str(tmp_path / "s")]) == 2    # no overwrite
    assert main(["assignment", "new", "nope", str(tmp_path)]) == 2
    capsys.readouterr()
    starter = open(tmp_path / "s" / "rms_norm.py").read()
    assert starter == A.starter_text("rms_norm")
    out = tmp_path / "results.json"
    assert main(["grade", "rms_norm", str(tmp_path / "r" / "rms_norm.py"), "--format",
                 "gradescope", "-o", str(out)]) == 0
    jsonschema.validate(json.loads(out.read_text()), GRADESCOPE_SCHEMA)
    assert json.loads(out.read_text())["score"] == 100
    assert main(["grade", "4", str(tmp_path / "s" / "rms_norm.py"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["score"] == 0 and doc["assignment"] == "rms_norm"
    assert main(["grade", "rms_norm", str(tmp_path / "missing.py")]) == 2


# ----------------------------------------------------------------------------------------------
# The references the grader uses
# ----------------------------------------------------------------------------------------------
def test_weight_standardization_reference_against_torch_autograd(torch):
    """The grader's WS reference (biased std, eps outside) against torch's autograd of the
    same formula, written with torch ops."""
    rng = np.random.default_rng(0)
    for shape in [(8, 4, 3, 3), (5, 7), (3, 2, 1, 1)]:
        w = rng.standard_normal(shape)
        dy = rng.standard_normal(shape)
        t = torch.tensor(w, requires_grad=True)
        flat = t.reshape(shape[0], -1)
        mu = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, unbiased=False, keepdim=True)
        y = ((flat - mu) / (std + 1e-5)).reshape(shape)
        y.backward(torch.tensor(dy))
        ref_y, ref_dw = ws_reference(w, dy, 1e-5)
        np.testing.assert_allclose(ref_y, y.detach().numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(ref_dw, t.grad.numpy(), rtol=1e-10, atol=1e-12)

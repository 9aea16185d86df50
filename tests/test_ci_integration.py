"""The oracle inside a kernel project's test suite and CI: ``refnorm.testing.cases`` (one pytest
test per oracle case) and ``refnorm compare --junit FILE`` (one JUnit test case per oracle case).

Both are held to the judgement of :func:`refnorm.oracle.check` itself: the per-case verdicts,
diagnoses and bounds are compared with a full ``check`` of the same candidate, and the JUnit
file with the JSON report of the same ``refnorm compare`` run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import refnorm
from refnorm.cli import main
from refnorm.oracle import MISTAKES, check, student
from refnorm.oracle.cases import case_ids, format_shape
from refnorm.oracle.junit import junit_tree
from refnorm.testing import CaseSkipped, OracleCase, assert_case, cases

ROOT = Path(refnorm.__file__).resolve().parents[1]


def _mistake(mistake_id):
    return next(m for m in MISTAKES if m.id == mistake_id)


def _torch_layer_norm(torch):
    import torch.nn.functional as F

    from refnorm.oracle import torch_function

    def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    return torch_function(layer_norm, name="F.layer_norm")


# ----------------------------------------------------------------------------------------------
# cases(): ids, the case object
# ----------------------------------------------------------------------------------------------
def test_case_ids_are_readable_unique_and_order_free():
    params = cases("layer_norm", ["bfloat16", "float32"])
    ids = [p.id for p in params]
    assert len(ids) == len(set(ids))
    assert "layer_norm-bfloat16-(37,1000)" in ids and "layer_norm-float32-(2,65536)" in ids
    # cases sharing variant, dtype and shape carry the case's name, without the shape again
    assert "layer_norm-float32-(4,6)-regime:nan" in ids
    assert "layer_norm-float32-(4,6)-sample" in ids
    case = params[ids.index("layer_norm-bfloat16-(37,1000)")].values[0]
    assert isinstance(case, OracleCase) and case.name == "oracle:(37,1000)"
    assert case.shape == (37, 1000) and str(case) == case.id
    assert repr(case) == ("OracleCase('layer_norm-bfloat16-(37,1000)', case='oracle:(37,1000)', "
                          "seed=0, size='ci')")
    assert not any(hasattr(case, a) for a in ("arrays", "dy", "inputs"))   # a handle only
    # the same ids whatever the order of the cases; a repeat beyond the name gets #k
    entries = [("sample:(6,33)", (6, 33)), ("oracle:(6,33)-tiny", (6, 33)), ("a b", (5,)),
               ("a  b", (5,)), ("solo", ())]
    ids1, ids2 = case_ids("v", "float16", entries), case_ids("v", "float16", entries[::-1])
    assert ids1 == ids2
    assert ids1 == {"sample:(6,33)": "v-float16-(6,33)-sample",
                    "oracle:(6,33)-tiny": "v-float16-(6,33)-oracle:tiny",
                    "a b": "v-float16-(5,)-a-b-#2", "a  b": "v-float16-(5,)-a-b-#1",
                    "solo": "v-float16-()"}
    assert format_shape((5,)) == "(5,)" and format_shape(None) == "?"


def test_case_ids_are_unique_for_every_registered_variant():
    from refnorm.norms import ALL_SPECS
    from refnorm.oracle.cases import case_shape, generate

    for spec in ALL_SPECS:
        made, skipped = generate(spec, "bfloat16", 0, "ci")
        entries = [(c.name, case_shape(c)) for c in made] + [(s.name, s.shape) for s in skipped]
        assert all(shape is not None for _, shape in entries), spec.name
        ids = case_ids(spec.name, "bfloat16", entries)
        assert len(set(ids.values())) == len(entries), spec.name
        assert all(i.startswith(f"{spec.name}-bfloat16-(") for i in ids.values()), spec.name


def test_cases_and_assert_case_refuse_what_the_case_fixes():
    case = cases("group_norm", size="ci")[0].values[0]
    with pytest.raises(TypeError, match="seed is fixed by the case; pass it to cases"):
        assert_case(student, case, seed=3)
    with pytest.raises(TypeError, match="dtype, size are fixed by the case"):
        assert_case(student, case, dtype="float16", size="full")
    with pytest.raises(TypeError, match="an OracleCase from refnorm.testing.cases"):
        assert_case(student, "group_norm-float32-(2,4,5)")
    with pytest.raises(TypeError, match="'only'"):
        cases("group_norm", only="x")
    with pytest.raises(ValueError, match="only: no case named 'no such case'"):
        check(student, "group_norm", size="ci", only="no such case")


# ----------------------------------------------------------------------------------------------
# assert_case is check's judgement, case by case
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mistake_id, dtype", [("group_norm:off-by-one group split", "float32"),
                                               ("layer_norm:eps outside the sqrt", "bfloat16")])
def test_assert_case_agrees_with_check_on_every_case(mistake_id, dtype):
    """The verdict, the bounds, the errors and the per-case diagnosis of every case are those
    of the full check; a failure's message is the oracle's report of that case."""
    mistake = _mistake(mistake_id)
    full = check(mistake, mistake.variant, dtype=dtype, size="ci")
    by_name = {r.case: r for r in full.results}
    skipped = {s.name: s.reason for s in full.skipped}
    verdicts = {"pass": 0, "FAIL": 0, "skipped": 0}
    for param in cases(mistake.variant, dtype):
        case = param.values[0]
        if case.name in skipped:
            with pytest.raises(CaseSkipped) as info:
                assert_case(mistake, case)
            assert str(info.value) == f"{case.id}: {skipped[case.name]}"
            verdicts["skipped"] += 1
            continue
        want = by_name[case.name]
        try:
            report = assert_case(mistake, case)
        except AssertionError as exc:
            text = str(exc)
            assert want.status == "FAIL", (case.id, text)
            assert text.startswith(f"{case.id}: the candidate does not match")
            assert f"-> {want.diagnosis}" in text and want.diagnosis.startswith("matches: ")
            assert mistake.name in want.diagnosis
            assert "1 cases, 0 pass, 1 fail" in text
            report = check(mistake, mistake.variant, dtype=dtype, size="ci", only=case.name)
            verdicts["FAIL"] += 1
        else:
            assert want.status == "pass", case.id
            verdicts["pass"] += 1
        (got,) = report.results
        assert got.case == want.case and got.status == want.status
        assert got.diagnosis == want.diagnosis
        assert got.outputs.keys() == want.outputs.keys()
        for k, o in want.outputs.items():            # the same bounds, the same errors
            assert (got.outputs[k].budget, got.outputs[k].tol_ulp, got.outputs[k].worst_ulp) \
                == (o.budget, o.tol_ulp, o.worst_ulp), (case.id, k)
    assert verdicts["FAIL"] >= 2 and verdicts["pass"] >= 2, verdicts   # the test can tell
    assert verdicts["FAIL"] == sum(r.status == "FAIL" for r in full.results)


def test_cases_pass_check_keywords_through():
    """``frozen`` given to cases() reaches check(); without it the missing gradient fails."""
    def lora_rms(variant, inputs, dy, kwargs, *, dtype):
        out = student(variant, inputs, dy, kwargs, dtype=dtype)
        out.pop("dweight", None)
        return out

    frozen = [p.values[0] for p in cases("rms_norm", "float32", frozen=("weight",))]
    plain = {p.values[0].name: p.values[0] for p in cases("rms_norm", "float32")}
    case = next(c for c in frozen if c.name.startswith("oracle:"))
    assert case.check_kwargs == {"frozen": ("weight",)} and "frozen=('weight',)" in repr(case)
    report = assert_case(lora_rms, case)
    assert report.results[0].outputs["dweight"].status == "frozen"
    with pytest.raises(AssertionError, match="dweight not computed by the candidate"):
        assert_case(lora_rms, plain[case.name])
    assert assert_case(lora_rms, plain[case.name], frozen="weight")      # over cases()'s
    seeded = cases("rms_norm", "float32", seed=7, diagnose=False)[0].values[0]
    assert seeded.seed == 7 and "seed=7" in repr(seeded)
    assert assert_case(student, seeded).seed == 7


def test_a_declined_case_is_a_skip():
    def picky(variant, inputs, dy, kwargs, *, dtype):
        if inputs["x"].ndim > 2:
            raise NotImplementedError("rows only")
        return student(variant, inputs, dy, kwargs, dtype=dtype)

    case = next(p.values[0] for p in cases("layer_norm") if len(p.values[0].shape) == 3)
    with pytest.raises(CaseSkipped, match=r"^layer_norm-float32-\(4,7,13\): not implemented "
                       r"by the candidate: rows only$"):
        assert_case(picky, case)


@pytest.mark.parametrize("case", cases("layer_norm", ["float32", "bfloat16"]))
def test_torch_layer_norm_case_by_case(case, torch):
    """torch.nn.functional.layer_norm on the CPU passes every case the oracle judges; the
    cases it does not judge are the ones the full check lists as skipped."""
    candidate = _torch_layer_norm(torch)
    try:
        report = assert_case(candidate, case)
    except CaseSkipped as exc:
        full = check(candidate, "layer_norm", dtype=case.dtype, size=case.size)
        assert case.name in {s.name for s in full.skipped}, str(exc)
        return
    assert report.passed and report.results[0].status == "pass"
    if case.name == "oracle:(37,1000)":       # the variant's first case: the residual block too
        assert report.residual["layer_norm"][0] == case.name


# ----------------------------------------------------------------------------------------------
# A kernel suite: a wrong candidate, run by pytest, fails on exactly check's failing cases
# ----------------------------------------------------------------------------------------------
KERNEL_SUITE = '''
import pytest
import torch

from refnorm.oracle import torch_function
from refnorm.testing import assert_case, cases


def unbiased_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.float()
    mu = xf.mean(dims, keepdim=True)
    var = xf.var(dims, keepdim=True, correction=1)     # the mistake: N - 1
    y = (xf - mu) * torch.rsqrt(var + eps)
    y = y * weight.float() if weight is not None else y
    y = y + bias.float() if bias is not None else y
    return y.to(x.dtype)


CANDIDATE = torch_function(unbiased_layer_norm)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", cases("layer_norm", "bfloat16"))
def test_kernel(case):
    assert_case(CANDIDATE, case)
'''


def test_a_wrong_kernel_fails_on_checks_cases_with_the_diagnosis(tmp_path, torch):
    (tmp_path / "test_kernel_suite.py").write_text(KERNEL_SUITE)
    xml = tmp_path / "pytest.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-p", "no:randomly", f"--junitxml={xml}",
                           "-o", "junit_family=xunit2", "test_kernel_suite.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    outcome = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        name = tc.get("name")
        assert name.startswith("test_kernel[") and name.endswith("]")
        case_id = name[len("test_kernel["):-1]
        failure, skipped = tc.find("failure"), tc.find("skipped")
        outcome[case_id] = "FAIL" if failure is not None else \
            "skipped" if skipped is not None else "pass"
        if failure is not None:       # pytest shows the oracle's message for the case
            text = failure.text or ""
            assert f"{case_id}: the candidate does not match" in text, text[:400]
            assert "-> matches: unbiased variance" in text, text[-2000:]
    # the same candidate under one full check, named through the JUnit ids
    import importlib.util

    spec = importlib.util.spec_from_file_location("k14c_suite", tmp_path / "test_kernel_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.warns(UserWarning):
        full = check(module.CANDIDATE, "layer_norm", dtype="bfloat16", size="ci")
    expected = {}
    for tc in junit_tree(full).getroot().iter("testcase"):
        expected[tc.get("name")] = "FAIL" if tc.find("failure") is not None else \
            "skipped" if tc.find("skipped") is not None else "pass"
    assert outcome == expected
    assert sum(v == "FAIL" for v in outcome.values()) >= 5
    assert sum(v == "pass" for v in outcome.values()) >= 5
    assert f"{sum(v == 'FAIL' for v in outcome.values())} failed" in proc.stdout


def test_refnorm_imports_and_runs_assert_case_without_pytest():
    code = textwrap.dedent("""
        import sys
        sys.modules["pytest"] = None                  # pytest cannot be imported
        import refnorm.testing, refnorm.oracle.junit, refnorm.cli
        from refnorm.oracle import student
        from refnorm.testing import OracleCase, assert_case, cases
        case = OracleCase("group_norm", "float32", "regime:nan (2,4,5)-G2", (2, 4, 5),
                          "group_norm-float32-(2,4,5)-regime:nan-G2")
        assert assert_case(student, case).passed
        try:
            cases("group_norm")
        except ImportError:
            print("cases needs pytest")
    """)
    from refnorm.oracle.cases import generate
    from refnorm.norms import BY_NAME

    names = [c.name for c in generate(BY_NAME["group_norm"], "float32", 0, "ci")[0]]
    assert "regime:nan (2,4,5)-G2" in names
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cases needs pytest"


# ----------------------------------------------------------------------------------------------
# refnorm compare --junit
# ----------------------------------------------------------------------------------------------
#: The common JUnit XML shape (Ant's format, as Jenkins' junit-10.xsd describes it and pytest,
#: GitLab and GitHub's reporters read it): element -> (required attributes, optional
#: attributes, allowed children). The totals are required here, though the schema lets them be.
JUNIT_SHAPE = {
    "testsuites": ({"tests", "failures", "errors", "skipped", "time"},
                   {"name", "disabled", "timestamp"}, {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "skipped", "time"},
                  {"timestamp", "hostname", "id", "package", "disabled", "file", "log", "url",
                   "version"}, {"properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, set(), set()),
    "testcase": ({"name", "classname", "time"}, {"assertions", "status", "file", "line"},
                 {"skipped", "failure", "error", "system-out", "system-err"}),
    "failure": ({"message", "type"}, set(), set()),
    "error": ({"message", "type"}, set(), set()),
    "skipped": ({"message"}, {"type"}, set()),
}
COUNTS = ("tests", "failures", "errors", "skipped")


def junit_shape_errors(root):
    """What departs from :data:`JUNIT_SHAPE` and from totals that add up ([] when none)."""
    errors = []

    def walk(el, path):
        if el.tag not in JUNIT_SHAPE:
            errors.append(f"{path}: unknown element <{el.tag}>")
            return
        required, optional, children = JUNIT_SHAPE[el.tag]
        for a in sorted(required - set(el.attrib)):
            errors.append(f"{path}: <{el.tag}> lacks {a}")
        for a in sorted(set(el.attrib) - required - optional):
            errors.append(f"{path}: <{el.tag}> has unknown attribute {a}")
        for a in COUNTS:
            if a in el.attrib and not (el.get(a).isdigit()):
                errors.append(f"{path}: {a}={el.get(a)!r} is not a count")
        if "time" in el.attrib:
            try:
                ok = math.isfinite(float(el.get("time"))) and float(el.get("time")) >= 0
            except ValueError:
                ok = False
            if not ok:
                errors.append(f"{path}: time={el.get('time')!r} is not a duration")
        for child in el:
            if child.tag not in children:
                errors.append(f"{path}: <{child.tag}> not allowed in <{el.tag}>")
            walk(child, f"{path}/{child.tag}")
        if el.tag == "testcase" and sum(el.find(t) is not None
                                        for t in ("failure", "error", "skipped")) > 1:
            errors.append(f"{path}: more than one outcome")
        if el.tag == "testsuite" and el.find("properties") is not None and \
                el[0].tag != "properties":
            errors.append(f"{path}: <properties> must come first")

    if root.tag != "testsuites":
        return [f"root is <{root.tag}>, not <testsuites>"]
    walk(root, "testsuites")
    if errors:
        return errors
    sums = dict.fromkeys(COUNTS, 0)
    for i, suite in enumerate(root.iter("testsuite")):
        tcs = suite.findall("testcase")
        have = {"tests": len(tcs),
                **{k: sum(tc.find(t) is not None for tc in tcs)
                   for k, t in (("failures", "failure"), ("errors", "error"),
                                ("skipped", "skipped"))}}
        for k in COUNTS:
            if int(suite.get(k)) != have[k]:
                errors.append(f"testsuite {i}: {k}={suite.get(k)} but {have[k]} found")
            sums[k] += have[k]
        if abs(float(suite.get("time")) - sum(float(tc.get("time")) for tc in tcs)) > 1e-4:
            errors.append(f"testsuite {i}: time is not the sum of its test cases'")
    for k in COUNTS:
        if int(root.get(k)) != sums[k]:
            errors.append(f"testsuites: {k}={root.get(k)} but the suites hold {sums[k]}")
    return errors


KERNELS = '''
from refnorm.oracle.mistakes import student


def layer_norm(variant, inputs, dy, kwargs, *, dtype):
    shape = inputs["x"].shape
    if shape == (3, 7):
        raise RuntimeError("this kernel has no path for rows of 7")
    if shape == (2, 2, 3):
        raise NotImplementedError("no 3-d normalized_shape")
    return student(variant, inputs, dy, kwargs, dtype=dtype, drop_mean_term=True)


layer_norm.variants = ("layer_norm",)
'''


def test_cli_compare_junit(tmp_path, capsys, monkeypatch):
    (tmp_path / "k14c_kernels.py").write_text(KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, js = tmp_path / "ci" / "junit.xml", tmp_path / "report.json"
    rc = main(["compare", "--impl", "k14c_kernels:layer_norm", "--dtype", "float32", "bfloat16",
               "--size", "ci", "--no-progress", "--brief", "--junit", str(out),
               "--json", str(js)])
    capsys.readouterr()
    assert rc == 1
    root = ET.parse(out).getroot()          # well-formed, and of the common JUnit shape
    assert junit_shape_errors(root) == []
    suites = root.findall("testsuite")
    assert [s.find("properties/property[@name='dtype']").get("value") for s in suites] == \
        ["float32", "bfloat16"]
    # one test case per oracle case, named as cases() names it, classname the variant
    ids = {p.id for p in cases("layer_norm", ["float32", "bfloat16"])}
    tcs = list(root.iter("testcase"))
    assert {tc.get("name") for tc in tcs} == ids and len(tcs) == len(ids)
    assert {tc.get("classname") for tc in tcs} == {"layer_norm"}
    # each outcome is the JSON report's status of that case (cases() maps names to ids)
    reports = json.loads(js.read_text())
    status = {"FAIL": "failure", "error": "error", "skipped": "skipped", "pass": None}
    for rep, suite in zip(reports, suites):
        id_of = {p.values[0].name: p.id for p in cases("layer_norm", rep["dtype"])}
        by_id = {tc.get("name"): tc for tc in suite.findall("testcase")}
        assert len(by_id) == len(rep["results"]) + len(rep["skipped"]) == len(id_of)
        for r in rep["results"]:
            tag = status[r["status"]]
            assert [c.tag for c in by_id[id_of[r["case"]]]] == ([tag] if tag else []), r["case"]
            if tag == "failure":
                assert f"    {r['case']}: " in by_id[id_of[r["case"]]].find("failure").text
        for sk in rep["skipped"]:
            assert by_id[id_of[sk["name"]]].find("skipped").get("message") == sk["reason"]
        assert int(suite.get("failures")) == sum(r["status"] == "FAIL" for r in rep["results"])
    for suite in suites:
        fails = suite.findall("testcase/failure")
        assert len(fails) >= 5
        for f in fails:                       # the oracle's text and its diagnosis
            assert "matches: missing mean term in dx" in f.get("message")
            assert "1 cases, 0 pass, 1 fail" in f.text and "-> matches:" in f.text
        (err,) = suite.findall("testcase/error")
        assert err.get("type") == "RuntimeError" and "no path for rows of 7" in err.text
        msgs = [s.get("message") for s in suite.findall("testcase/skipped")]
        assert "not implemented by the candidate: no 3-d normalized_shape" in msgs
    bf16 = suites[1].findall("testcase/skipped")
    assert any("overflows the float32 accumulator" in s.get("message") for s in bf16)


def test_junit_shape_check_can_fail():
    """A negative control: the shape check sees a missing total, a wrong count, an unknown
    attribute, a test case with two outcomes and a misplaced element."""
    report = check(_mistake("layer_norm:sign error in dx"), "layer_norm", size="ci")
    good = junit_tree(report).getroot()
    assert junit_shape_errors(good) == []
    assert int(good.get("failures")) == sum(not r.passed for r in report.results) > 0

    def broken(edit):
        root = ET.fromstring(ET.tostring(good))
        edit(root)
        return junit_shape_errors(root)

    assert "testsuites/testsuite: <testsuite> lacks tests" in broken(
        lambda r: r.find("testsuite").attrib.pop("tests"))
    assert any("failures=" in e for e in broken(lambda r: r.set("failures", "0")))
    assert any("unknown attribute" in e for e in broken(
        lambda r: r.find("testsuite/testcase").set("verdict", "ok")))
    assert any("more than one outcome" in e for e in broken(
        lambda r: ET.SubElement(r.find("testsuite/testcase[failure]"), "skipped", message="x")))
    assert any("not allowed" in e for e in broken(
        lambda r: ET.SubElement(r, "testcase", name="x", classname="y", time="0")))
    assert any("not a duration" in e for e in broken(
        lambda r: r.find("testsuite/testcase").set("time", "soon")))

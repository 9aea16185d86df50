"""The autograder: the oracle with a student adapter.

:func:`grade` runs a student's file, check by check, in a separate process
(:mod:`refnorm.assignments.sandbox`), and compares what it returns with refnorm's reference.

For the normalization assignments (BatchNorm, LayerNorm and GroupNorm, RMSNorm) this is the
oracle itself: the cases are :func:`refnorm.oracle.cases.generate`'s (seeded, float64, the
edge cases of each record: one-element groups, constant rows, a batch of 1), the comparison and
the per-element bounds are :func:`refnorm.oracle.check`'s, and a failure is named from the
catalogue of :mod:`refnorm.oracle.mistakes` (``Report.matched``). Only the adapter is new: it
replays the outputs that the student's process returned. For the other assignments (autograd
primitives, Weight Standardization and AdamP, the gradient checker) the reference is
refnorm's engine, its Weight Standardization math and :func:`refnorm.optim.adamp.adamp_step`,
compared with :func:`refnorm.oracle.report.compare_outputs` under per-element bounds derived
from the computation (the number of terms summed and their magnitudes), and the mistakes these
assignments add are named by patterns listed in :data:`HINTS`.

Every check has points; a check's score is its points times the fraction of its cases that
pass (partial credit). The feedback of a failing case names the case, the output and the
element, with the expected and obtained values.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from refnorm.assignments import functions as _functions
from refnorm.assignments.sandbox import DEFAULT_TIME_LIMIT, Task, run_tasks

__all__ = ["grade", "Grade", "CheckResult", "HINTS", "ws_reference", "GRADESCOPE_SCHEMA"]

U64 = float(np.finfo(np.float64).eps) / 2
TINY = float(np.finfo(np.float64).tiny)

#: Mistakes named by a pattern where an assignment goes beyond the oracle's catalogue
#: (kind -> what it means). The normalization mistakes are :data:`refnorm.oracle.mistakes.KINDS`.
HINTS = {
    "missing-unbroadcast": "the gradient of a broadcast operand is not summed back to its shape",
    "matmul-no-transpose": "the matmul gradient multiplies by B (or A) where B^T (or A^T) is "
                           "needed",
    "forward-difference": "(f(x+h) - f(x))/h, a one-sided difference, instead of the central "
                          "(f(x+h) - f(x-h))/(2h)",
    "central-difference-over-h": "the central difference divided by h instead of 2h",
    "ws-unbiased-std": "Weight Standardization with the unbiased std (1/(N-1)) instead of the "
                       "biased one (1/N)",
    "ws-eps-inside-sqrt": "Weight Standardization with sqrt(var + eps) instead of std + eps",
    "adamp-no-projection": "AdamP without the projection: the update keeps its radial part",
    "adamp-no-bias-correction": "AdamP without the bias corrections of the moments",
    "adamp-decay-not-scaled": "AdamP weight decay not multiplied by wd_ratio when projected",
}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
@dataclass
class CheckResult:
    """One check: its points, its score, and what went wrong."""

    name: str
    max_score: float
    passed: int = 0
    total: int = 0
    lines: list = field(default_factory=list)
    mistakes: list = field(default_factory=list)   # sentences naming a known mistake
    status_override: str = ""

    @property
    def score(self) -> float:
        if self.total == 0:
            return 0.0
        return round(self.max_score * self.passed / self.total, 2)

    @property
    def status(self) -> str:
        if self.status_override:
            return self.status_override
        if self.total and self.passed == self.total:
            return "pass"
        return "partial" if self.passed else "FAIL"

    def add(self, ok, message=""):
        self.total += 1
        self.passed += bool(ok)
        if not ok and message:
            self.lines.append(message)

    def output(self, limit=8) -> str:
        """The feedback: the named mistakes, then the failures, identical messages merged."""
        head = f"{self.passed}/{self.total} cases pass"
        groups = {}
        for line in self.lines:
            label, _, msg = line.partition(": ")
            groups.setdefault(msg, []).append(label)
        shown = []
        for msg, labels in groups.items():
            if len(labels) == 1:
                shown.append(f"- {labels[0]}: {msg}")
            else:
                shown.append(f"- {len(labels)} cases ({labels[0]}, {labels[1]}"
                             f"{', ...' if len(labels) > 2 else ''}): {msg}")
        more = len(shown) - limit
        body = [head] + [f"  {m}" for m in self.mistakes] + shown[:limit]
        if more > 0:
            body.append(f"- ... and {more} more")
        return "\n".join(body)


@dataclass
class Grade:
    """The result of grading one file: checks, named mistakes, and the three output formats."""

    assignment: str
    title: str
    file: str
    checks: list = field(default_factory=list)
    #: the named mistakes: dicts with ``id``, ``kind``, ``name``, ``description``
    mistakes: list = field(default_factory=list)
    diagnoses: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def score(self):
        return round(sum(c.score for c in self.checks), 2)

    @property
    def max_score(self):
        return round(sum(c.max_score for c in self.checks), 2)

    @property
    def percent(self):
        return 100.0 * self.score / self.max_score if self.max_score else 0.0

    def mistake_kinds(self):
        return sorted({m["kind"] for m in self.mistakes})

    def text(self) -> str:
        out = [f"{self.title}", f"file: {self.file}",
               f"score: {self.score:g} / {self.max_score:g} ({self.percent:.0f}%)", ""]
        for c in self.checks:
            out.append(f"[{c.status:>7}] {c.score:5.2f}/{c.max_score:<5g} {c.name}")
            if c.status != "pass":
                out += ["          " + line for line in c.output().splitlines()]
        if self.mistakes or self.diagnoses:
            out += ["", "Diagnosis:"]
            out += [f"  {d}" for d in self.diagnoses]
            for m in self.mistakes:
                out.append(f"  classic mistake [{m['kind']}]: {m['name']} -- "
                           f"{m['description']}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"assignment": self.assignment, "title": self.title, "file": self.file,
                "score": self.score, "max_score": self.max_score,
                "percent": round(self.percent, 2),
                "checks": [{"name": c.name, "status": c.status, "score": c.score,
                            "max_score": c.max_score, "passed": c.passed, "total": c.total,
                            "failures": c.lines, "mistakes": c.mistakes} for c in self.checks],
                "mistakes": self.mistakes, "diagnoses": self.diagnoses, "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def gradescope(self) -> dict:
        """Gradescope's autograder ``results.json``: ``score`` and one test per check."""
        tests = [{"name": c.name, "score": c.score, "max_score": c.max_score,
                  "output": c.output(), "visibility": "visible", "status":
                  "passed" if c.status == "pass" else "failed"} for c in self.checks]
        summary = [f"{self.title}: {self.score:g} / {self.max_score:g}"]
        summary += self.diagnoses
        summary += [f"classic mistake [{m['kind']}]: {m['name']} -- {m['description']}"
                    for m in self.mistakes]
        return {"score": self.score, "output": "\n".join(summary), "visibility": "visible",
                "stdout_visibility": "hidden", "tests": tests}


#: The part of Gradescope's documented ``results.json`` format the grader writes (JSON Schema):
#: https://gradescope-autograders.readthedocs.io/en/latest/specs/
GRADESCOPE_SCHEMA = {
    "type": "object",
    "required": ["tests"],
    "properties": {
        "score": {"type": "number"},
        "execution_time": {"type": "number"},
        "output": {"type": "string"},
        "output_format": {"enum": ["text", "html", "simple_format", "md", "ansi"]},
        "test_output_format": {"enum": ["text", "html", "simple_format", "md", "ansi"]},
        "test_name_format": {"enum": ["text", "html", "simple_format", "md", "ansi"]},
        "leaderboard": {"type": "array"},
        "visibility": {"enum": ["hidden", "after_due_date", "after_published", "visible"]},
        "stdout_visibility": {"enum": ["hidden", "after_due_date", "after_published",
                                       "visible"]},
        "extra_data": {"type": "object"},
        "tests": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "score", "max_score", "output", "visibility"],
            "properties": {
                "score": {"type": "number"}, "max_score": {"type": "number"},
                "status": {"enum": ["passed", "failed"]},
                "name": {"type": "string"}, "name_format": {"type": "string"},
                "number": {"type": "string"}, "output": {"type": "string"},
                "output_format": {"type": "string"}, "tags": {"type": "array"},
                "visibility": {"enum": ["hidden", "after_due_date", "after_published",
                                        "visible"]},
                "extra_data": {"type": "object"}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _key(*arrays):
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _compare(name, ref, got, bound):
    """An :class:`refnorm.oracle.report.OutputResult` (the oracle's comparison), or a shape
    mismatch."""
    from refnorm.oracle.report import OutputResult, compare_outputs

    ref = np.asarray(ref, dtype=np.float64)
    if got is None:
        return OutputResult(name, "missing")
    got = np.asarray(got)
    if got.shape != ref.shape:
        return OutputResult(name, "shape", note=f"shape {tuple(got.shape)}, expected "
                            f"{tuple(ref.shape)}")
    bound = np.broadcast_to(np.asarray(bound, np.float64), ref.shape) + 4 * TINY
    return compare_outputs(name, ref, got.astype(np.float64), bound, "float64", None)


def _task_note(res, names=None):
    """What went wrong in a task, for the feedback."""
    if res is None:
        return "not run"
    if res.fatal:
        return res.fatal
    msgs = [m for s, m in res.errors.items() if names is None or s in names]
    return "; ".join(msgs)


def _dtype_check(check, label, res, expected_shapes):
    """Each returned output is float64 with the reference's shape."""
    if res is None or res.fatal:
        check.add(False, f"{label}: {_task_note(res)}")
        return
    bad = []
    for name, shape in expected_shapes.items():
        m = res.meta.get(name)
        if m is None:
            bad.append(f"{name} missing")
            continue
        if tuple(m["shape"]) != tuple(shape):
            bad.append(f"{name} has shape {tuple(m['shape'])}, expected {tuple(shape)}")
        if name == "num_batches_tracked":
            if np.dtype(m["dtype"]).kind not in "iu":
                bad.append(f"{name} has dtype {m['dtype']}, expected an integer")
        elif m["dtype"] != "float64":
            bad.append(f"{name} has dtype {m['dtype']}, expected float64")
    check.add(not bad, f"{label}: " + "; ".join(bad))


def _mutation_check(check, label, res):
    """Credit only for a call that completed (an untouched starter earns nothing here)."""
    if res is None or res.fatal or res.errors or not res.outputs:
        check.add(False, f"{label}: the call did not complete: {_task_note(res) or 'no output'}")
        return
    check.add(not res.mutated, f"{label}: modified its input in place: "
              + ", ".join(res.mutated))


# ----------------------------------------------------------------------------------------------
# The normalization assignments: the oracle with a replaying adapter
# ----------------------------------------------------------------------------------------------
#: regimes left out: a float64 NumPy solution written from the math is not expected to handle
#: non-finite inputs or scales near the ends of float64's range
_LEFT_OUT = ("regime:tiny-scale", "regime:huge-scale", "regime:subnormal", "regime:nan",
             "regime:inf")
_EDGE = ("N1", "one-element", "one-value", "constant", "size-1", "zero-row")


def _is_edge(case):
    return any(e in case.name for e in _EDGE)


class _Replay:
    """A candidate (the oracle's protocol) that replays the student process's outputs."""

    name = "student"
    device = "cpu"
    ftz = False

    def __init__(self, variant, results, keys):
        self.variants = (variant,)
        self.results, self.keys = results, keys

    def supports(self, spec):
        return spec.name in self.variants

    def __call__(self, variant, inputs, dy, kwargs, *, dtype):
        res = self.results.get(self.keys.get(_key(inputs["x"], dy)))
        if res is None:
            raise RuntimeError("no result for this case")
        if res.fatal:
            raise RuntimeError(res.fatal)
        if not res.outputs and res.errors:
            raise RuntimeError(_task_note(res))
        return dict(res.outputs)


def _expected_outputs(case):
    names = ["y"] + ["d" + n for n in case.inputs]
    if case.variant == "batch_norm" and case.kwargs.get("running_mean") is not None:
        names += ["running_mean", "running_var", "num_batches_tracked"]
    return names


def _norm_cases(variant, seed):
    from refnorm.norms import BY_NAME
    from refnorm.oracle.cases import generate
    from refnorm.oracle.core import CONVENTIONS, _is_default

    # The assignments teach torch.nn.functional's conventions: the kernel conventions
    # (offset, casting modes) are the oracle's, not the course's.
    cases, _ = generate(BY_NAME[variant], "float64", seed, "ci")
    return [c for c in cases if not c.name.startswith(_LEFT_OUT)
            and all(_is_default(k, v) for k, v in c.kwargs.items() if k in CONVENTIONS)]


def _run_norm(path, variants, seed, time_limit):
    """Run every case of each variant in the student's process (one process for them all,
    restarted only after a timeout or a crash) and check each variant with the oracle;
    returns ``{variant: (cases, results, report)}``."""
    from refnorm.oracle.core import check

    tasks, keys, all_cases = [], {}, {}
    for variant in variants:
        cases = all_cases[variant] = _norm_cases(variant, seed)
        for c in cases:
            tid = f"{variant}|{c.name}"
            keys[_key(c.inputs["x"], c.dy)] = tid
            args = {"inputs": dict(c.inputs), "dy": c.dy, "kwargs": dict(c.kwargs)}
            tasks.append(Task(tid, variant, args))
    results = run_tasks(path, tasks, time_limit)
    out = {}
    for variant in variants:
        cases = all_cases[variant]
        report = check(_Replay(variant, results, keys), variant, "float64", cases=cases)
        out[variant] = (cases, results, report)
    return out


#: cases where two implementations of the same mistake differ by their rounding, amplified
#: (a mean 1e4 times the std, a variance far below eps): left out of a second diagnosis
_ILL_CONDITIONED = ("mean1e4", "constant", "tiny-scale")


def _diagnose_again(variant, cases, results, report):
    """The oracle's diagnosis on the well-conditioned failing cases only, when the diagnosis
    of all of them matched no mistake: ``(summary, matched ids)``."""
    from refnorm.norms import BY_NAME
    from refnorm.oracle.core import prepare
    from refnorm.oracle.mistakes import diagnose

    spec = BY_NAME[variant]
    by_name = {c.name: c for c in cases}
    failing = []
    for r in report.results:
        c = by_name.get(r.case)
        if r.status != "FAIL" or c is None or any(t in c.name for t in _ILL_CONDITIONED):
            continue
        res = results.get(f"{variant}|{c.name}")
        failing.append((prepare(spec, c), r, dict(res.outputs) if res else {}))
    if not failing:
        return "", []
    summary, _, matched = diagnose(spec, failing, "float64", n_cases=len(cases), detail=True)
    if not summary.startswith("matches"):
        return "", []
    return summary + " (on the well-conditioned cases)", matched


def _name_mistakes(grade, report, variant, checks, cases, results):
    from refnorm.oracle.mistakes import MISTAKES

    by_id = {m.id: m for m in MISTAKES}
    diag = report.diagnoses.get(variant, "")
    matched = report.matched.get(variant, [])
    if diag and not matched:
        again, ids = _diagnose_again(variant, cases, results, report)
        if ids:
            diag, matched = again, ids
    if diag and diag != "no known mistake matches":
        grade.diagnoses.append(f"{variant}: {diag}")
    for mid in matched:
        m = by_id.get(mid)
        if m is None:
            continue
        grade.mistakes.append({"id": m.id, "kind": m.kind, "name": m.name,
                               "description": m.description, "variant": variant})
        for c in checks:
            if c.status != "pass":
                c.mistakes.append(f"looks like the classic mistake [{m.kind}] {m.name} "
                                  f"({variant}): {m.description}")


def _fill_norm_checks(variant, cases, results, report, spec_checks):
    """``spec_checks``: (CheckResult, case filter, output names) triples."""
    by_case = {r.case: r for r in report.results}
    for check, keep, names in spec_checks:
        for c in cases:
            if not keep(c):
                continue
            res = by_case.get(c.name)
            task = results.get(f"{variant}|{c.name}")
            wanted = [n for n in names if n in _expected_outputs(c)]
            if not wanted:
                continue
            label = f"{variant} case {c.name}"
            if res is None or res.status == "error":
                msg = res.message if res else "not run"
                check.add(False, f"{label}: {msg.replace('RuntimeError: ', '', 1)}")
                continue
            bad = []
            for n in wanted:
                o = res.outputs.get(n)
                if o is None:
                    why = _task_note(task)
                    bad.append(f"{n} not returned" + (f" ({why})" if why else ""))
                elif not o.passed:
                    bad.append(o.describe())
            check.add(not bad, f"{label}: " + "; ".join(bad))


def _shape_and_mutation_checks(variant, cases, results, shapes_check, mutation_check):
    for c in cases:
        res = results.get(f"{variant}|{c.name}")
        label = f"{variant} case {c.name}"
        known = {"y": c.inputs["x"].shape, "num_batches_tracked": (),
                 "running_mean": np.shape(c.kwargs.get("running_mean")),
                 "running_var": np.shape(c.kwargs.get("running_var"))}
        known.update({"d" + n: a.shape for n, a in c.inputs.items()})
        shapes = {n: known[n] for n in _expected_outputs(c)}
        _dtype_check(shapes_check, label, res, shapes)
        _mutation_check(mutation_check, label, res)


def _grade_batch_norm(grade, path, seed, time_limit):
    def training(c):
        return bool(c.kwargs["training"])

    cases, results, report = _run_norm(path, ["batch_norm"], seed, time_limit)["batch_norm"]
    fwd = CheckResult("forward, training mode (batch statistics)", 20)
    bwd = CheckResult("backward, training mode (random upstream gradients)", 25)
    run = CheckResult("running statistics (momentum, unbiased variance, num_batches_tracked)",
                      15)
    ev = CheckResult("evaluation mode (running statistics, forward and backward)", 15)
    edge = CheckResult("edge cases (a batch of 1, constant channels, size-1 axes)", 10)
    shp = CheckResult("shapes and dtypes of every output", 5)
    mut = CheckResult("no mutation of the inputs (x, weight, bias, running statistics)", 10)
    grads = ["dx", "dweight", "dbias"]
    _fill_norm_checks("batch_norm", cases, results, report, [
        (fwd, lambda c: training(c) and not _is_edge(c), ["y"]),
        (bwd, lambda c: training(c) and not _is_edge(c), grads),
        (run, training, ["running_mean", "running_var", "num_batches_tracked"]),
        (ev, lambda c: not training(c), ["y"] + grads + ["running_mean", "running_var"]),
        (edge, lambda c: training(c) and _is_edge(c), ["y"] + grads)])
    _shape_and_mutation_checks("batch_norm", cases, results, shp, mut)
    grade.checks += [fwd, bwd, run, ev, edge, shp, mut]
    _name_mistakes(grade, report, "batch_norm", grade.checks, cases, results)


def _grade_stateless(grade, path, seed, time_limit, variants, extra=None, share=90):
    checks = []
    shp = CheckResult("shapes and dtypes of every output", 5)
    mut = CheckResult("no mutation of the inputs", 5)
    runs = _run_norm(path, [v for v, _ in variants], seed, time_limit)
    for variant, title in variants:
        cases, results, report = runs[variant]
        pts = share / len(variants)
        fwd = CheckResult(f"{title} forward", round(pts * 0.3, 2))
        bwd = CheckResult(f"{title} backward (random upstream gradients)", round(pts * 0.5, 2))
        edge = CheckResult(f"{title} edge cases (one-element groups, constant rows, a batch of "
                           f"1)", round(pts * 0.2, 2))
        specs = [(fwd, lambda c: not _is_edge(c) and _placement(c) == "inside", ["y"]),
                 (bwd, lambda c: not _is_edge(c) and _placement(c) == "inside",
                  ["dx", "dweight", "dbias"]),
                 (edge, _is_edge, ["y", "dx", "dweight", "dbias"])]
        mine = [fwd, bwd, edge]
        if extra and variant in extra:
            more = extra[variant]
            specs.append(more)
            mine.append(more[0])
        _fill_norm_checks(variant, cases, results, report, specs)
        _shape_and_mutation_checks(variant, cases, results, shp, mut)
        checks += mine
        _name_mistakes(grade, report, variant, mine, cases, results)
    grade.checks += checks + [shp, mut]


def _placement(c):
    return c.kwargs.get("eps_placement", "inside")


def _grade_layer_group(grade, path, seed, time_limit):
    _grade_stateless(grade, path, seed, time_limit,
                     [("layer_norm", "LayerNorm"), ("group_norm", "GroupNorm")])


def _grade_rms(grade, path, seed, time_limit):
    outside = CheckResult("RMSNorm with eps outside the square root (eps_placement='outside')",
                          20)
    extra = {"rms_norm": (outside, lambda c: _placement(c) == "outside" and not _is_edge(c),
                          ["y", "dx", "dweight"])}
    _grade_stateless(grade, path, seed, time_limit, [("rms_norm", "RMSNorm")], extra, share=70)


# ----------------------------------------------------------------------------------------------
# Assignment 1: autograd primitives
# ----------------------------------------------------------------------------------------------
def _engine_grads(op, dout, *arrays, **kw):
    """The reference: refnorm's engine differentiating ``op`` (sum of ``dout * op(...)``)."""
    from refnorm import autograd as ag

    ts = [ag.Tensor(a, requires_grad=True) for a in arrays]
    out = op(*ts, **kw)
    return ag.gradients(ag.sum(ag.multiply(out, ag.Tensor(dout))), ts)


def _autograd_cases(rng):
    def r(*s):
        return rng.standard_normal(s)

    unb = [("same shape", (3, 4), (3, 4)), ("new leading axes", (2, 5, 3, 4), (3, 4)),
           ("stretched axis", (3, 4), (3, 1)), ("leading and stretched", (2, 3, 4), (1, 4)),
           ("to a scalar", (2, 3), ()), ("to (1, 1)", (4, 5), (1, 1)),
           ("stretched middle", (2, 3, 4), (2, 1, 4))]
    mul = [("same shape", (3, 4), (3, 4)), ("row vector", (3, 4), (4,)),
           ("column", (3, 1), (1, 4)), ("scalar", (2, 3), ()),
           ("batch broadcast", (2, 1, 3), (4, 3))]
    mm = [("matrix", (3, 4), (4, 5)), ("batched", (2, 3, 4), (2, 4, 5)),
          ("broadcast batch of B", (2, 3, 4), (4, 5)), ("broadcast batch of A", (3, 4),
                                                        (2, 4, 5)),
          ("stretched batch", (2, 1, 3, 4), (1, 5, 4, 2)), ("inner size 1", (3, 1), (1, 2))]
    sums = [("all", (3, 4), None, False), ("axis 0", (3, 4), 0, False),
            ("axis -1 keepdims", (2, 3, 4), -1, True), ("axes (0, 2)", (2, 3, 4), (0, 2), False),
            ("axes (0, 2) keepdims", (2, 3, 4), (0, 2), True), ("all keepdims", (2, 3), None,
                                                                 True),
            ("size-1 axis", (3, 1, 2), 1, False)]
    out = {"unbroadcast": [], "mul": [], "matmul": [], "sum": []}
    for name, g, s in unb:
        out["unbroadcast"].append((name, r(*g), s))
    for name, sa, sb in mul:
        out["mul"].append((name, r(*sa), r(*sb)))
    for name, sa, sb in mm:
        out["matmul"].append((name, r(*sa), r(*sb)))
    for name, s, axis, keep in sums:
        out["sum"].append((name, r(*s), axis, keep))
    return out


def _grade_autograd(grade, path, seed, time_limit):
    from refnorm import autograd as ag
    from refnorm.autograd.broadcasting import unbroadcast

    cases = _autograd_cases(np.random.default_rng([seed, 1]))
    tasks, refs = [], {}
    rng = np.random.default_rng([seed, 2])
    for name, g, shape in cases["unbroadcast"]:
        tid = f"unbroadcast|{name}"
        tasks.append(Task(tid, "call", {"fname": "unbroadcast", "args": [g, tuple(shape)],
                                        "names": ["grad"]}))
        n = g.size // max(int(np.prod(shape, dtype=np.int64)), 1)
        ref = unbroadcast(g, tuple(shape))
        refs[tid] = {"grad": (ref, 2 * n * U64 * unbroadcast(np.abs(g), tuple(shape)), g.shape)}
    for name, a, b in cases["mul"]:
        tid = f"mul|{name}"
        out = a * b
        dout = rng.standard_normal(out.shape)
        da, db = _engine_grads(ag.multiply, dout, a, b)
        aa, ab = _engine_grads(ag.multiply, np.abs(dout), np.abs(a), np.abs(b))
        na, nb = out.size // max(a.size, 1), out.size // max(b.size, 1)
        tasks.append(Task(tid, "call", {"fname": "mul_backward", "args": [dout, a, b],
                                        "names": ["da", "db"]}))
        refs[tid] = {"da": (da, 4 * (na + 1) * U64 * aa, out.shape),
                     "db": (db, 4 * (nb + 1) * U64 * ab, out.shape)}
    for name, a, b in cases["matmul"]:
        tid = f"matmul|{name}"
        out = a @ b
        dout = rng.standard_normal(out.shape)
        da, db = _engine_grads(ag.matmul, dout, a, b)
        aa, ab = _engine_grads(ag.matmul, np.abs(dout), np.abs(a), np.abs(b))
        n = out.size * a.shape[-1] // max(min(a.size, b.size), 1) + out.shape[-1] + \
            out.shape[-2]
        tasks.append(Task(tid, "call", {"fname": "matmul_backward", "args": [dout, a, b],
                                        "names": ["da", "db"]}))
        refs[tid] = {"da": (da, 4 * (n + 1) * U64 * aa, out.shape),
                     "db": (db, 4 * (n + 1) * U64 * ab, out.shape)}
    for name, a, axis, keep in cases["sum"]:
        tid = f"sum|{name}"
        out = np.sum(a, axis=axis, keepdims=keep)
        dout = rng.standard_normal(np.shape(out))
        (da,) = _engine_grads(lambda t: ag.sum(t, axis=axis, keepdims=keep), dout, a)
        tasks.append(Task(tid, "call", {"fname": "sum_backward",
                                        "args": [dout, tuple(a.shape)],
                                        "kwargs": {"axis": axis, "keepdims": keep},
                                        "names": ["da"]}))
        refs[tid] = {"da": (da, 0.0, np.shape(out))}
    results = run_tasks(path, tasks, time_limit)
    checks = {"unbroadcast": CheckResult("unbroadcast: summing a gradient back to a shape", 20),
              "mul": CheckResult("mul backward with broadcasting", 20),
              "matmul": CheckResult("matmul backward (batched, broadcast batch axes)", 25),
              "sum": CheckResult("sum backward (axis, tuple of axes, keepdims)", 15)}
    shp = CheckResult("shapes and dtypes of every gradient", 10)
    mut = CheckResult("no mutation of the inputs", 10)
    hinted = set()
    for t in tasks:
        kind, case = t.id.split("|")
        res = results.get(t.id)
        label = f"{t.args['fname']} case {case!r}"
        _mutation_check(mut, label, res)
        _dtype_check(shp, label, res, {n: np.shape(v[0]) for n, v in refs[t.id].items()})
        if res is None or res.fatal or res.errors:
            checks[kind].add(False, f"{label}: {_task_note(res)}")
            continue
        bad = []
        for n, (ref, bound, out_shape) in refs[t.id].items():
            o = _compare(n, ref, res.outputs.get(n), bound)
            if o.passed:
                continue
            bad.append(o.describe())
            got = res.outputs.get(n)
            if got is not None and got.shape == tuple(out_shape) and got.shape != ref.shape:
                if np.allclose(unbroadcast(np.asarray(got, np.float64), ref.shape), ref,
                               rtol=1e-9, atol=1e-12):
                    hinted.add("missing-unbroadcast")
            if kind == "matmul" and got is not None:
                a, b = t.args["args"][1], t.args["args"][2]
                dout = t.args["args"][0]
                try:
                    wrong = (dout @ b, a @ dout) if n == "da" else (a @ dout, dout @ b)
                except ValueError:
                    wrong = ()
                for w in wrong:
                    w = w if w.shape == ref.shape else None
                    if w is not None and got.shape == w.shape and np.allclose(got, w):
                        hinted.add("matmul-no-transpose")
        checks[kind].add(not bad, f"{label}: " + "; ".join(bad))
    grade.checks += list(checks.values()) + [shp, mut]
    _add_hints(grade, hinted)


def _add_hints(grade, kinds):
    for kind in sorted(kinds):
        grade.mistakes.append({"id": f"{grade.assignment}:{kind}", "kind": kind,
                               "name": kind.replace("-", " "), "description": HINTS[kind]})
        for c in grade.checks:
            if c.status != "pass":
                c.mistakes.append(f"looks like the classic mistake [{kind}]: {HINTS[kind]}")
                break


# ----------------------------------------------------------------------------------------------
# Assignment 5: Weight Standardization and one AdamP step
# ----------------------------------------------------------------------------------------------
def ws_reference(weight, dy, eps=1e-5, *, unbiased=False, inside=False):
    r"""Weight Standardization (Qiao et al., 2019), forward and backward, per output channel.

    With the :math:`N` weights of output channel :math:`o` (its fan-in),
    :math:`\mu = \frac1N\sum W`, :math:`\sigma = \sqrt{\frac1N\sum (W-\mu)^2}` (biased),
    :math:`s = \sigma + \epsilon` (eps outside the square root, as the official TF snippet),
    :math:`\hat W = (W-\mu)/s`, and

    .. math:: \frac{\partial L}{\partial W} = \frac{G - \bar G}{s}
              - \frac{d}{N\sigma s^2}\sum G\odot d, \qquad d = W - \mu

    (the second term taken as 0 where :math:`\sigma = 0`). ``unbiased`` and ``inside`` give
    the other codebases' forms (for naming a mistake). Returns ``(w_hat, dweight)``.
    """
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    g = np.asarray(dy, np.float64).reshape(w.shape)
    n = w.shape[1]
    d = w - w.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):   # unbiased with n = 1: NaN
        var = (d * d).sum(axis=1, keepdims=True) / (n - 1 if unbiased else n)
    if inside:
        s = np.sqrt(var + eps)
        xhat = d / s
        dw = (g - g.mean(1, keepdims=True) - xhat * (g * xhat).sum(1, keepdims=True)
              / (n - 1 if unbiased else n)) / s
        return xhat.reshape(weight.shape), dw.reshape(weight.shape)
    sigma = np.sqrt(var)
    s = sigma + eps
    m = n - 1 if unbiased else n
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = np.where(sigma > 0, (g * d).sum(1, keepdims=True) / (m * sigma * s * s), 0.0)
    dw = (g - g.mean(1, keepdims=True)) / s - d * coef
    return (d / s).reshape(weight.shape), dw.reshape(weight.shape)


def _ws_record():
    """The registered ``weight_standardization`` record, when this refnorm has one."""
    try:
        from refnorm.norms import BY_NAME
    except ImportError:  # pragma: no cover
        return None
    return BY_NAME.get("weight_standardization")


def _ws_cases(rng):
    return [("conv 3x3 (8, 4, 3, 3)", rng.standard_normal((8, 4, 3, 3)), 1e-5),
            ("linear (5, 7)", rng.standard_normal((5, 7)), 1e-5),
            ("1x1 conv, mean 3 (6, 10, 1, 1)", 3 + rng.standard_normal((6, 10, 1, 1)), 1e-5),
            ("constant filter (edge)", np.concatenate(
                [np.full((1, 2, 3, 3), 0.7), rng.standard_normal((2, 2, 3, 3))]), 1e-5),
            ("two weights per filter, eps 1e-2", rng.standard_normal((4, 2)), 1e-2),
            ("fan-in 1 (edge)", rng.standard_normal((3, 1, 1, 1)), 1e-5)]


def _adamp_cases(rng):
    from refnorm.optim.adamp import layer_only_gradient, orthogonal_rows

    w = rng.standard_normal((6, 4, 3, 3))
    out = []
    for name, grad, kw, t in [
            ("channel projection", orthogonal_rows(w, rng.standard_normal(w.shape)), {}, 1),
            ("layer projection only", layer_only_gradient(w, rng.standard_normal(w.shape)),
             {}, 3),
            ("no projection (aligned gradient)", w + 0.1 * rng.standard_normal(w.shape), {}, 2),
            ("projection with weight decay", orthogonal_rows(w, rng.standard_normal(w.shape)),
             {"weight_decay": 0.05}, 5),
            ("nesterov", orthogonal_rows(w, rng.standard_normal(w.shape)),
             {"nesterov": True}, 4),
            ("1-D parameter (never projected)", rng.standard_normal(6), {"weight_decay": 0.1},
             7)]:
        p = w if grad.ndim == 4 else rng.standard_normal(6)
        m = 0.1 * rng.standard_normal(p.shape) if t > 1 else np.zeros(p.shape)
        v = 0.01 * rng.random(p.shape) if t > 1 else np.zeros(p.shape)
        out.append((name, p, grad, m, v, t, {"lr": 0.01, **kw}))
    return out


def _adamp_reference(p, g, m, v, t, kw):
    from refnorm.optim.adamp import AdamPState, adamp_step

    state = AdamPState(t - 1, (m,), (v,), (None,), (1.0,))
    new, st = adamp_step([p], [g], state, **kw)
    return new[0], st.exp_avg[0], st.exp_avg_sq[0]


def _grade_ws_adamp(grade, path, seed, time_limit):
    rng = np.random.default_rng([seed, 5])
    tasks, refs, hints = [], {}, set()
    for name, w, eps in _ws_cases(rng):
        dy = rng.standard_normal(w.shape)
        y, dw = ws_reference(w, dy, eps)
        n = w[0].size
        gsum = np.abs(dy).reshape(w.shape[0], -1).sum(1)
        scale = np.repeat(gsum / max(n, 1), n).reshape(w.shape) + np.abs(dy)
        s = np.repeat(np.abs(y).reshape(w.shape[0], -1).max(1) + 1, n).reshape(w.shape)
        s_inv = np.repeat(1 / (ws_std(w) + eps), n).reshape(w.shape)
        tid = f"ws|{name}"
        tasks.append(Task(tid, "ws", {"weight": w, "dy": dy, "eps": eps}))
        refs[tid] = {"y": (y, 16 * (n + 4) * U64 * s),
                     "dweight": (dw, 32 * (n + 4) * U64 * s * scale * s_inv),
                     "_forms": (w, dy, eps)}
    for name, p, g, m, v, t, kw in _adamp_cases(rng):
        tid = f"adamp|{name}"
        new_p, new_m, new_v = _adamp_reference(p, g, m, v, t, kw)
        lr = kw["lr"]
        bound_p = 64 * p[0].size * U64 * (np.abs(p) + 10 * lr / (1 - 0.9 ** t))
        tasks.append(Task(tid, "call", {"fname": "adamp_step", "args": [p, g, m, v, t],
                                        "kwargs": kw, "names": ["param", "exp_avg",
                                                                "exp_avg_sq"]}))
        refs[tid] = {"param": (new_p, bound_p),
                     "exp_avg": (new_m, 4 * U64 * (np.abs(m) + np.abs(g))),
                     "exp_avg_sq": (new_v, 4 * U64 * (np.abs(v) + g * g))}
    results = run_tasks(path, tasks, time_limit)
    wsf = CheckResult("Weight Standardization forward (biased std, eps outside the sqrt)", 20)
    wsb = CheckResult("Weight Standardization backward (random upstream gradients)", 25)
    wse = CheckResult("Weight Standardization edge cases (constant filter, fan-in 1)", 10)
    ada = CheckResult("AdamP step (projection in the channel or layer view, decay, nesterov)",
                      30)
    shp = CheckResult("shapes and dtypes of every output", 5)
    mut = CheckResult("no mutation of the inputs", 10)
    for t in tasks:
        kind, case = t.id.split("|")
        res = results.get(t.id)
        label = f"{'weight_standardization' if kind == 'ws' else 'adamp_step'} case {case!r}"
        _mutation_check(mut, label, res)
        outs = {k: v for k, v in refs[t.id].items() if not k.startswith("_")}
        _dtype_check(shp, label, res, {n: np.shape(v[0]) for n, v in outs.items()})
        targets = [(ada, list(outs))] if kind == "adamp" else \
            ([(wse, ["y", "dweight"])] if "edge" in case else [(wsf, ["y"]),
                                                                (wsb, ["dweight"])])
        for check, names in targets:
            if res is None or res.fatal:
                check.add(False, f"{label}: {_task_note(res)}")
                continue
            bad = []
            for n in names:
                o = _compare(n, outs[n][0], res.outputs.get(n), outs[n][1])
                if not o.passed:
                    note = _task_note(res)
                    bad.append(o.describe() + (f" ({note})" if note and o.status == "missing"
                                               else ""))
            check.add(not bad, f"{label}: " + "; ".join(bad))
            if bad and kind == "ws" and res.outputs.get("y") is not None:
                w, dy, eps = refs[t.id]["_forms"]
                for form, kw in (("ws-unbiased-std", {"unbiased": True}),
                                 ("ws-eps-inside-sqrt", {"inside": True})):
                    alt = ws_reference(w, dy, eps, **kw)[0]
                    if np.shape(res.outputs["y"]) == alt.shape and \
                            np.allclose(res.outputs["y"], alt, rtol=1e-9, atol=1e-12):
                        hints.add(form)
            if bad and kind == "adamp" and res.outputs.get("param") is not None:
                hints |= _adamp_hints(t, res)
    grade.checks += [wsf, wsb, wse, ada, shp, mut]
    rec = _ws_record()
    grade.notes.append("Weight Standardization reference: " + (
        "refnorm's weight_standardization record is registered; the grader's formula "
        "(biased std, eps outside) is the one documented in the starter" if rec is not None
        else "the biased-std, eps-outside form (refnorm has no weight_standardization record "
        "yet)"))
    _add_hints(grade, hints)


def ws_std(w):
    w = np.asarray(w, np.float64).reshape(w.shape[0], -1)
    return w.std(axis=1)


def _adamp_hints(task, res):
    p, g, m, v, t = task.args["args"]
    kw = dict(task.args["kwargs"])
    got = res.outputs["param"]
    found = set()
    lr, wd = kw["lr"], kw.get("weight_decay", 0.0)
    b1, b2 = 0.9, 0.999
    mm = b1 * m + (1 - b1) * g
    vv = b2 * v + (1 - b2) * g * g
    # no projection: the plain AdamW-style update
    upd = (b1 * mm + (1 - b1) * g if kw.get("nesterov") else mm) / \
        (np.sqrt(vv) / math.sqrt(1 - b2 ** t) + 1e-8)
    plain = p * (1 - lr * wd) - lr / (1 - b1 ** t) * upd
    if got.shape == plain.shape and np.allclose(got, plain, rtol=1e-9, atol=1e-12):
        found.add("adamp-no-projection")
    nobc = _adamp_reference(p, g, m, v, t, kw)
    # without bias correction: lr applied directly, v not rescaled (t = "infinity")
    from refnorm.optim.adamp import project_update

    raw = (b1 * mm + (1 - b1) * g if kw.get("nesterov") else mm) / (np.sqrt(vv) + 1e-8)
    pu = project_update(p, g, raw, delta=kw.get("delta", 0.1), wd_ratio=kw.get("wd_ratio", 0.1),
                        eps=1e-8)
    alt = p * (1 - lr * wd * pu.wd_ratio) - lr * pu.update
    if got.shape == alt.shape and np.allclose(got, alt, rtol=1e-9, atol=1e-12) and \
            not np.allclose(alt, nobc[0]):
        found.add("adamp-no-bias-correction")
    pu = project_update(p, g, upd, delta=kw.get("delta", 0.1), wd_ratio=kw.get("wd_ratio", 0.1),
                        eps=1e-8)
    alt = p * (1 - lr * wd) - lr / (1 - b1 ** t) * pu.update
    if wd and pu.view is not None and got.shape == alt.shape and \
            np.allclose(got, alt, rtol=1e-9, atol=1e-12):
        found.add("adamp-decay-not-scaled")
    return found


# ----------------------------------------------------------------------------------------------
# Assignment 6: a gradient checker
# ----------------------------------------------------------------------------------------------
def _central(f, x, h):
    y0 = np.asarray(f(x))
    jac = np.zeros((y0.size, x.size))
    for j in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[j] += h
        xm.flat[j] -= h
        jac[:, j] = (np.asarray(f(xp)) - np.asarray(f(xm))).ravel() / (2 * h)
    return jac


def _grade_gradient_checker(grade, path, seed, time_limit):
    rng = np.random.default_rng([seed, 6])
    F = _functions.FUNCTIONS
    points = {"linear": rng.standard_normal(3), "cubic": rng.standard_normal(4),
              "sin_prod": rng.standard_normal((2, 2)), "softmax": rng.standard_normal(5),
              "tanh_outer": rng.standard_normal(3)}
    tasks, refs = [], {}
    for name, x in points.items():
        for h in (1e-3, 1e-5):
            tid = f"jac|{name}, h={h:g}"
            tasks.append(Task(tid, "jacobian", {"function": name, "x": x, "h": h}))
            exact = F[name].jacobian(x)
            fx = np.abs(np.asarray(F[name].f(x))).max() + np.abs(x).max() + 1
            bound = h * h / 6 * F[name].m3 * 1.5 + 16 * U64 * fx / h
            refs[tid] = (exact, bound, x, h)
    verdicts = []
    for name in ("cubic", "softmax", "tanh_outer"):
        x = points[name]
        exact = F[name].jacobian(x)
        wrong = exact.copy()
        wrong.flat[int(rng.integers(wrong.size))] += 0.05
        for label, claimed, truth in (("correct Jacobian", exact, True),
                                      ("one wrong entry", wrong, False),
                                      ("transposed", exact.T.copy() if exact.shape[0] ==
                                       exact.shape[1] and not np.allclose(exact, exact.T)
                                       else 2 * exact, False)):
            tid = f"gc|{name} ({label})"
            tasks.append(Task(tid, "jacobian", {"function": name, "x": x, "h": 1e-5,
                                                "claimed": claimed}))
            verdicts.append((tid, truth))
    results = run_tasks(path, tasks, time_limit)
    jac = CheckResult("numerical_jacobian: central differences, known Jacobians", 50)
    steps = CheckResult("numerical_jacobian: the chosen step h is used", 15)
    gc = CheckResult("gradcheck: accepts a right Jacobian, rejects wrong ones", 20)
    mut = CheckResult("no mutation of x (perturb a copy, or restore it)", 15)
    hints = set()
    for tid, (exact, bound, x, h) in refs.items():
        res = results.get(tid)
        label = f"case {tid.split('|')[1]}"
        _mutation_check(mut, label, res)
        if res is None or res.fatal or res.errors:
            jac.add(False, f"{label}: {_task_note(res)}")
            continue
        o = _compare("jacobian", exact, res.outputs.get("jacobian"), bound)
        jac.add(o.passed, f"{label}: {o.describe()}")
        got = res.outputs.get("jacobian")
        if not o.passed and got is not None and got.shape == exact.shape:
            name = tid.split("|")[1].split(",")[0]
            f = F[name].f
            fwd = np.zeros_like(exact)
            y0 = np.asarray(f(x)).ravel()
            for j in range(x.size):
                xp = x.copy()
                xp.flat[j] += h
                fwd[:, j] = (np.asarray(f(xp)).ravel() - y0) / h
            if np.allclose(got, fwd, rtol=1e-7, atol=1e-9):
                hints.add("forward-difference")
            elif np.allclose(got, 2 * _central(f, x, h), rtol=1e-7, atol=1e-9):
                hints.add("central-difference-over-h")
    # the step: at h = 1e-3 the truncation error of a central difference is visible; a
    # checker that ignores h (a fixed step of its own) gives the h = 1e-5 answer there
    for name in points:
        big, small = f"jac|{name}, h=0.001", f"jac|{name}, h=1e-05"
        rb, rs = results.get(big), results.get(small)
        if F[name].m3 == 0:
            continue
        ok = rb is not None and rs is not None and not rb.fatal and not rs.fatal and \
            "jacobian" in rb.outputs and "jacobian" in rs.outputs
        if ok:
            x = refs[big][2]
            want = _central(F[name].f, x, 1e-3)
            got = rb.outputs["jacobian"]
            ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-6, atol=1e-9)
        steps.add(ok, f"case {name}: with h=1e-3 the result is not the central difference "
                  f"with step 1e-3 (is h ignored?)")
    for tid, truth in verdicts:
        res = results.get(tid)
        label = f"case {tid.split('|')[1]}"
        if res is None or res.fatal or res.errors:
            gc.add(False, f"{label}: {_task_note(res)}")
            continue
        got = bool(res.outputs["verdict"]) if "verdict" in res.outputs else None
        gc.add(got is truth, f"{label}: gradcheck returned {got}, expected {truth}")
    grade.checks += [jac, steps, gc, mut]
    _add_hints(grade, hints)


_GRADERS = {"autograd_primitives": _grade_autograd, "batch_norm": _grade_batch_norm,
            "layer_group_norm": _grade_layer_group, "rms_norm": _grade_rms,
            "ws_adamp": _grade_ws_adamp, "gradient_checker": _grade_gradient_checker}


def grade(name, path, *, seed=0, time_limit=DEFAULT_TIME_LIMIT) -> Grade:
    """Grade the student's file ``path`` for assignment ``name``; returns a :class:`Grade`.

    The file runs in separate processes (never in this one), each call with ``time_limit``
    seconds. ``seed`` picks the cases (the same seed, the same cases).
    """
    from refnorm.assignments import get

    a = get(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"grade: no such file {path!r}")
    g = Grade(a.name, a.title, os.path.abspath(path))
    _GRADERS[a.name](g, path, seed, time_limit)
    return g

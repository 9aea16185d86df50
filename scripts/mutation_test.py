#!/usr/bin/env python
"""Mutation testing of the hand-derived backward functions (a small, self-written AST mutator).

For each target variant (default: layer_norm, rms_norm, batch_norm, group_norm, the "core"
variants) it takes the backward code in ``refnorm/norms/<variant>.py`` (``<variant>_backward``
and the helpers only it calls, such as ``_backward_rows``), makes one small change at a time (a
*mutant*), and runs the variant's tests against it. A mutant the tests
reject is *killed*; one they accept *survives*. The score is killed / total.

Mutation operators (each applied at every place it fits inside the backward):

* ``swap-op``     ``+`` <-> ``-``, ``*`` <-> ``/`` (binary and augmented assignment)
* ``drop-term``   ``a + b``, ``a - b``, ``a * b``, ``a / b`` -> ``a`` (and -> ``b`` for + and *)
* ``drop-stmt``   an augmented assignment (``dx -= ...``, ``gx *= weight``) removed
* ``reduce``      ``.sum(`` <-> ``.mean(`` ; ``np.sum`` <-> ``np.mean``
* ``ufunc``       ``np.subtract`` <-> ``np.add``, ``np.multiply`` <-> ``np.divide``
* ``axis``        ``axis=...`` -> ``axis=None`` ; ``keepdims=True`` -> ``keepdims=False``
* ``const``       a number ``c`` -> ``c + 1`` (``-1`` -> ``0``)
* ``cond``        ``is None`` <-> ``is not None``, ``if c`` -> ``if not c``, ``a if c else b``
                  -> ``b if c else a``
* ``neg``         a unary minus removed
* ``swap-grads``  two adjacent fields of the returned ``...Grads(...)`` swapped

Each mutant runs in a private copy of the working tree (the real files are never touched,
so it is safe while others edit them), with ``pytest -x -k <variant>`` on (``--tests``):

    tests/test_norms_generic.py, tests/norms/test_<variant>.py, tests/test_accuracy.py,
    tests/test_reliability.py

A survivor is then classified: it *changes a gradient* when, on the variant's sample and
oracle inputs (the small ones), the same with a mean of 1e4 added (cancellation), and one tall
input (2 MiB, several row blocks) with random upstream gradients, the mutated backward returns a
gradient that differs from the original's by more than 1e-13 relative (or raises, or gives a
NaN); otherwise it is a candidate *equivalent* mutant, to be argued in
``docs/notes/mutation_testing.rst``.

Usage::

    python scripts/mutation_test.py                      # all four, 2 workers
    python scripts/mutation_test.py --variants layer_norm --jobs 4
    python scripts/mutation_test.py --list               # print the mutants, run nothing
    python scripts/mutation_test.py --json results.json  # also write the results
    # the suite before tests/test_accuracy.py and tests/test_reliability.py:
    python scripts/mutation_test.py \\
        --tests tests/test_norms_generic.py,tests/norms/test_{variant}.py

Exit status 0 when no survivor changes a gradient, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as futures
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORE = ("layer_norm", "rms_norm", "batch_norm", "group_norm")


# ------------------------------------------------------------------------------------------
# Mutants
# ------------------------------------------------------------------------------------------
@dataclass
class Mutant:
    variant: str
    index: int
    operator: str
    line: int
    original: str        # the source line before
    mutated: str         # the source line after
    start: tuple         # (line, col) of the replaced text, 1-based lines
    end: tuple
    replacement: str
    status: str = ""     # "killed", "survived", "timeout"
    seconds: float = 0.0
    changes_gradient: bool | None = None
    gradient_note: str = ""

    @property
    def label(self):
        return f"{self.variant}#{self.index} L{self.line} {self.operator}: " \
               f"{self.original.strip()}  ->  {self.mutated.strip()}"


_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_REDUCE = {"sum": "mean", "mean": "sum"}
_UFUNC = {"subtract": "add", "add": "subtract", "multiply": "divide", "divide": "multiply"}


def _segment(source_lines, node):
    """The exact source text of ``node``."""
    (l0, c0), (l1, c1) = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
    return _slice(source_lines, (l0, c0), (l1, c1))


def _slice(lines, start, end):
    (l0, c0), (l1, c1) = start, end
    if l0 == l1:
        return lines[l0 - 1].encode()[c0:c1].decode()
    parts = [lines[l0 - 1].encode()[c0:].decode()]
    parts += lines[l0:l1 - 1]
    parts.append(lines[l1 - 1].encode()[:c1].decode())
    return "\n".join(parts)


def _edits(fn: ast.FunctionDef, lines):
    """Yield (operator, node_for_span, replacement_text) for every mutation inside ``fn``."""
    seg = lambda n: _segment(lines, n)  # noqa: E731
    # a negative literal (-1 in reshape(-1, 1)) is one constant: -1 -> 0, not -1 -> -2 (NumPy
    # reads any negative size as "the rest", so that mutant would always be equivalent)
    negative_literals = {id(n.operand) for n in ast.walk(fn) if isinstance(n, ast.UnaryOp)
                         and isinstance(n.op, ast.USub) and isinstance(n.operand, ast.Constant)}
    for node in ast.walk(fn):
        if node is fn or id(node) in negative_literals:
            continue
        if isinstance(node, ast.UnaryOp) and id(node.operand) in negative_literals \
                and isinstance(node.operand.value, (int, float)):
            yield "const", node, repr(-node.operand.value + 1)
        if isinstance(node, ast.BinOp) and type(node.op) in _SWAP:
            swapped = ast.BinOp(node.left, _SWAP[type(node.op)](), node.right)
            yield "swap-op", node, f"({seg(node.left)}) {_op(swapped.op)} ({seg(node.right)})"
            yield "drop-term", node, f"({seg(node.left)})"
            if isinstance(node.op, (ast.Add, ast.Mult)):
                yield "drop-term", node, f"({seg(node.right)})"
        elif isinstance(node, ast.AugAssign) and type(node.op) in _SWAP:
            yield "swap-op", node, f"{seg(node.target)} {_op(_SWAP[type(node.op)]())}= " \
                                   f"{seg(node.value)}"
            yield "drop-stmt", node, "pass"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            value = node.func.value
            if attr in _REDUCE:
                yield "reduce", node, seg(node).replace(f".{attr}(", f".{_REDUCE[attr]}(", 1) \
                    if f".{attr}(" in seg(node) else None
            if isinstance(value, ast.Name) and value.id == "np" and attr in _UFUNC:
                yield "ufunc", node, seg(node).replace(f"np.{attr}(", f"np.{_UFUNC[attr]}(", 1)
            for kw in node.keywords:
                if kw.arg == "axis" and not (isinstance(kw.value, ast.Constant)
                                             and kw.value.value is None):
                    yield "axis", kw.value, "None"
                if kw.arg == "keepdims" and isinstance(kw.value, ast.Constant) \
                        and kw.value.value is True:
                    yield "axis", kw.value, "False"
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            yield "const", node, repr(node.value + 1)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 \
                and isinstance(node.ops[0], (ast.Is, ast.IsNot)):
            op = "is not" if isinstance(node.ops[0], ast.Is) else "is"
            yield "cond", node, f"{seg(node.left)} {op} {seg(node.comparators[0])}"
        elif isinstance(node, ast.If) and not _is_none_test(node.test):
            yield "cond", node.test, f"not ({seg(node.test)})"
        elif isinstance(node, ast.IfExp):
            yield "cond", node, f"({seg(node.orelse)}) if {seg(node.test)} else ({seg(node.body)})"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            yield "neg", node, f"({seg(node.operand)})"
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Call) \
                and getattr(node.value.func, "id", "").endswith("Grads"):
            args = node.value.args
            for i in range(len(args) - 1):
                new = [seg(a) for a in args]
                new[i], new[i + 1] = new[i + 1], new[i]
                yield "swap-grads", node.value, f"{seg(node.value.func)}({', '.join(new)})"


def _is_none_test(test):
    """``a is None`` / ``a is not None``: the ``cond`` operator flips those already."""
    return isinstance(test, ast.Compare) and isinstance(test.ops[0], (ast.Is, ast.IsNot))


def _op(op):
    return {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(op)]


def _called(fn, defs):
    """Names of the module-level functions ``fn`` calls, directly or through each other."""
    seen, todo = set(), [fn]
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in defs and node.func.id not in seen:
                seen.add(node.func.id)
                todo.append(defs[node.func.id])
    return seen


def backward_functions(tree, variant):
    """``<variant>_backward`` and the module's helpers that only the backward uses
    (``_backward_rows``...): the backward code. Helpers the forward calls too (``_rows``) are
    left out: they are the forward's as much as the backward's."""
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    backward = defs[f"{variant}_backward"]
    forward = defs.get(f"{variant}_forward")
    shared = _called(forward, defs) | {forward.name} if forward is not None else set()
    return [backward] + [defs[name] for name in sorted(_called(backward, defs) - shared)]


def mutants(variant: str) -> tuple[str, list[Mutant]]:
    """The source of ``refnorm/norms/<variant>.py`` and every mutant of its backward code."""
    path = ROOT / "refnorm" / "norms" / f"{variant}.py"
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    edits = [e for fn in backward_functions(tree, variant) for e in _edits(fn, lines)]
    out, seen = [], set()
    for operator, node, replacement in edits:
        if replacement is None:
            continue
        start = (node.lineno, node.col_offset)
        end = (node.end_lineno, node.end_col_offset)
        key = (start, end, replacement)
        if key in seen or replacement == _slice(lines, start, end):
            continue
        seen.add(key)
        new_source = apply(source, start, end, replacement)
        try:
            ast.parse(new_source)
        except SyntaxError:
            continue
        new_lines = new_source.splitlines()
        out.append(Mutant(variant, len(out), operator, node.lineno, lines[node.lineno - 1],
                          new_lines[node.lineno - 1] if node.lineno - 1 < len(new_lines) else "",
                          start, end, replacement))
    return source, out


def apply(source: str, start, end, replacement: str) -> str:
    lines = source.splitlines(keepends=True)
    offsets = np.cumsum([0] + [len(line.encode()) for line in lines])
    data = source.encode()
    a = offsets[start[0] - 1] + start[1]
    b = offsets[end[0] - 1] + end[1]
    return (data[:a] + replacement.encode() + data[b:]).decode()


# ------------------------------------------------------------------------------------------
# Running the tests against a mutant, in a private copy of the tree
# ------------------------------------------------------------------------------------------
DEFAULT_TESTS = ("tests/test_norms_generic.py", "tests/norms/test_{variant}.py",
                 "tests/test_accuracy.py", "tests/test_reliability.py")
TESTS = list(DEFAULT_TESTS)


def test_command(variant: str, copy: Path) -> list[str]:
    """pytest -x on the test files (those that exist), keeping the variant's own cases."""
    files = [t.format(variant=variant) for t in TESTS]
    files = [f for f in files if (copy / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "--no-header", "-W", "ignore"]
    return cmd + files + ["-k", variant]


def make_copy() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="refnorm-mutants-"))
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis",
                                    "*.egg-info", "docs", "benchmarks", "tutorials", ".venv*")
    for name in ("refnorm", "tests"):
        shutil.copytree(ROOT / name, tmp / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, tmp / name)
    return tmp


def _env(copy: Path):
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1",
            "REFNORM_HYPOTHESIS_PROFILE": os.environ.get("REFNORM_HYPOTHESIS_PROFILE", "ci")}


def check_copy_imports_itself(copy: Path):
    probe = subprocess.run([sys.executable, "-c", "import refnorm; print(refnorm.__file__)"],
                           cwd=copy, env=_env(copy), capture_output=True, text=True)
    where = Path(probe.stdout.strip()).resolve()
    if copy.resolve() not in where.parents:
        raise SystemExit(f"the copy imports refnorm from {where}, not from {copy}")


def run_tests(variant, copy: Path, timeout) -> tuple[str, float]:
    t0 = time.time()
    try:
        proc = subprocess.run(test_command(variant, copy), cwd=copy, env=_env(copy),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    # exit 5: nothing collected (cannot happen with the selection above)
    return ("survived" if proc.returncode == 0 else "killed"), time.time() - t0


def _worker(args):
    copy, source, mutant, timeout = args
    path = copy / "refnorm" / "norms" / f"{mutant.variant}.py"
    path.write_text(apply(source, mutant.start, mutant.end, mutant.replacement))
    try:
        mutant.status, mutant.seconds = run_tests(mutant.variant, copy, timeout)
    finally:
        path.write_text(source)
    return mutant


# ------------------------------------------------------------------------------------------
# Does a survivor change a gradient?
# ------------------------------------------------------------------------------------------
def _load(variant, source, tag):
    name = f"_mutation_{variant}_{tag}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(ROOT / "refnorm" / "norms" / f"{variant}.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module


def gradient_change(variant, source, mutant: Mutant, max_elements=5000) -> tuple[bool, str]:
    """Compare the mutated backward with the original on the sample and oracle inputs."""
    sys.path.insert(0, str(ROOT))
    from refnorm.norms import BY_NAME

    spec = BY_NAME[variant]
    original = getattr(_load(variant, source, "orig"), f"{variant}_backward")
    mutated = getattr(_load(variant, apply(source, mutant.start, mutant.end, mutant.replacement),
                            f"m{mutant.index}"), f"{variant}_backward")
    worst, where = 0.0, ""
    cases = list(spec.sample_inputs(np.random.default_rng(0)))
    if spec.oracle_inputs is not None:
        cases += [s for s in spec.oracle_inputs(np.random.default_rng(0))
                  if s.arrays[0].size <= max_elements]
    # cancellation-prone copies (mean 1e4 times the spread): where the mean-correction terms
    # of the fast backwards matter, with and without affine parameters
    cases += [s._replace(name=f"{s.name}-mean1e4", arrays=(1e4 * (1 + np.abs(s.arrays[0]).max())
                                                           + s.arrays[0],) + tuple(s.arrays[1:]))
              for s in list(cases) if s.arrays[0].size]
    cases += _tall(spec, cases[0])
    for k, sample in enumerate(cases):
        for trial in range(2):
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                y, _, cache = spec.run(sample)
                dy = np.random.default_rng(1000 * k + trial).standard_normal(y.shape)
                want = original(dy, cache)
                _, _, cache = spec.run(sample)
                try:
                    got = mutated(dy.copy(), cache)
                except Exception as exc:  # noqa: BLE001
                    return True, f"raises {type(exc).__name__} on {sample.name}"
            for name, a, b in zip(spec.diff_argnames, want, got):
                if (a is None) != (b is None):
                    return True, f"d{name} None-ness differs on {sample.name}"
                if a is None:
                    continue
                b = np.asarray(b)
                if a.shape != b.shape:
                    return True, f"d{name} shape {b.shape} != {a.shape} on {sample.name}"
                if np.isnan(b).any() and not np.isnan(a).any():
                    return True, f"d{name} NaN on {sample.name}"
                scale = float(np.max(np.abs(a))) if a.size else 0.0
                err = float(np.max(np.abs(b - a))) if a.size else 0.0
                rel = err / scale if scale > 0 else err
                if rel > worst:
                    worst, where = rel, f"d{name} on {sample.name}"
    return worst > 1e-13, f"max relative change {worst:.2e} ({where})" if where else \
        "bit-identical gradients"


def _tall(spec, sample, elements=1 << 18):
    """``sample`` with its batch axis grown to about 2 MiB of float64 (several of the 1 MiB row
    blocks the fast code paths work in), when the variant accepts it."""
    x = sample.arrays[0]
    if x.ndim < 2:
        return []
    shape = list(x.shape)
    shape[0] = max(1, elements // (x.size // shape[0]))
    big = np.random.default_rng(5).standard_normal(shape)
    tall = sample._replace(name=f"{sample.name}-tall", arrays=(big,) + tuple(sample.arrays[1:]))
    try:
        spec.run(tall)
    except Exception:  # noqa: BLE001 - the batch axis is not free for this variant
        return []
    return [tall]


# ------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(CORE))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--tests", default=",".join(DEFAULT_TESTS),
                        help="comma-separated test files ({variant} is replaced); default: "
                             "%(default)s")
    args = parser.parse_args(argv)
    TESTS[:] = [t for t in args.tests.split(",") if t]

    variants = [v for v in args.variants.split(",") if v]
    sources, todo = {}, []
    for v in variants:
        path = ROOT / "refnorm" / "norms" / f"{v}.py"
        if not path.exists():
            print(f"skip {v}: {path} does not exist")
            continue
        sources[v], ms = mutants(v)
        todo += ms
    if args.list:
        for m in todo:
            print(m.label)
        print(f"{len(todo)} mutants")
        return 0

    copies = [make_copy() for _ in range(max(1, args.jobs))]
    try:
        check_copy_imports_itself(copies[0])
        for v in variants:  # the unmutated tree must pass
            status, secs = run_tests(v, copies[0], args.timeout)
            if status != "survived":
                raise SystemExit(f"the tests of {v} fail on the unmutated tree: fix that first")
            print(f"baseline {v}: tests pass in {secs:.1f} s", flush=True)
        done = []
        with futures.ThreadPoolExecutor(len(copies)) as pool:
            pending = {}
            queue = list(todo)
            free = list(copies)
            while queue or pending:
                while queue and free:
                    m, c = queue.pop(0), free.pop()
                    pending[pool.submit(_worker, (c, sources[m.variant], m, args.timeout))] = c
                finished, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for f in finished:
                    free.append(pending.pop(f))
                    m = f.result()
                    done.append(m)
                    print(f"[{len(done)}/{len(todo)}] {m.status:8} {m.seconds:5.1f}s {m.label}",
                          flush=True)
    finally:
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)

    done.sort(key=lambda m: (m.variant, m.index))
    survivors = [m for m in done if m.status == "survived"]
    for m in survivors:
        m.changes_gradient, m.gradient_note = gradient_change(m.variant, sources[m.variant], m)
    print()
    print(f"{'variant':<14} {'mutants':>7} {'killed':>7} {'survived':>8} {'score':>7}")
    for v in variants:
        ms = [m for m in done if m.variant == v]
        if ms:
            killed = sum(m.status != "survived" for m in ms)
            print(f"{v:<14} {len(ms):>7} {killed:>7} {len(ms) - killed:>8} "
                  f"{killed / len(ms):>7.1%}")
    total = len(done)
    killed = sum(m.status != "survived" for m in done)
    if total:
        print(f"{'all':<14} {total:>7} {killed:>7} {total - killed:>8} {killed / total:>7.1%}")
    print()
    for m in survivors:
        tag = "CHANGES A GRADIENT" if m.changes_gradient else "equivalent?"
        print(f"survivor [{tag}] {m.label}\n    {m.gradient_note}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(m) for m in done], indent=1))
    return 1 if any(m.changes_gradient for m in survivors) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README, followed verbatim, works: every command of its ``bash`` blocks and its Python tour.

Each fenced ``bash`` block of ``README.md`` is read line by line (a trailing ``\\`` continues a
line; ``&&`` chains commands; ``VAR=value`` before a command sets its environment). What
happens to a command:

* **run**: ``refnorm ...`` runs as ``python -m refnorm.cli ...`` with the same arguments (the
  installed script may belong to another checkout; ``python -m`` with this checkout on
  ``PYTHONPATH`` runs the code under test), in a fresh temporary directory (so ``goldens/``
  lands there), with only the environment variables the line sets on top of this process's
  (``TRITON_INTERPRET`` is removed unless the line sets it). It must exit 0, and its output
  must say so where the command prints a verdict (``0 failed``, ``ALL PASSED``); the full
  ``refnorm verify`` must list every registered item as passed (the suite's one full run of
  it: ``tests/test_cli.py`` runs it on a few items). A command
  that needs PyTorch or Triton takes the optional fixture of that name (a skip, or a failure
  under ``REFNORM_REQUIRE_OPTIONAL=1``). The ``python`` tour block runs as a script.
* **setup steps, checked but not run**: ``pip install ...`` and ``python -m pip install ...``
  would reinstall packages into the environment running this test. They are checked
  syntactically instead: ``.`` or ``-e .`` installs this project, ``.[extras]`` names extras
  that ``setup.cfg`` defines, ``torch`` is pinned, a package pinned in ``setup.cfg`` carries
  the same pin in the README, and a pinned package that is installed here has that version.
* **covered elsewhere, checked but not run**: ``python -m pytest`` is the command running this
  test (running the suite again from inside it would recurse); the check is that it is that
  command. ``python -m sphinx ...`` is the documentation build that ``tests/test_docs.py``
  runs with the same options (``-W -b html docs``): building twice would double the cost.
* **placeholders, not run**: a line whose comment starts with ``# placeholder`` stands for the
  reader's own code (``mypackage.kernels:...``), as ``CONTRIBUTING.md`` documents.

Time: about 30 s of CPU (the full ``refnorm verify`` and the Triton kernel in the interpreter
are most of it), one test per block so that ``pytest -n`` spreads them.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import optional_import, verify_rows

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PLACEHOLDER = re.compile(r"(^|\s)#\s*placeholder\b")
TIMEOUT = 300          # per command, seconds: generous for a loaded shared machine


# ----------------------------------------------------------------------------------------------
# reading the README
# ----------------------------------------------------------------------------------------------
def blocks(text=None):
    """``[(language, first line number, body)]`` of the fenced code blocks of the README."""
    text = README.read_text() if text is None else text
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        out.append((m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)))
    return out


def shell_lines(body):
    """The logical lines of a bash block: continuations joined, blank and comment lines gone."""
    lines, current = [], ""
    for raw in body.splitlines():
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip() and not current.strip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def commands(line):
    """``[(env, argv)]`` of the ``&&``-chained commands of one shell line."""
    tokens = shlex.split(line, comments=True)
    out, argv = [], []
    for tok in tokens + ["&&"]:
        if tok != "&&":
            argv.append(tok)
            continue
        env = {}
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
        assert argv, f"an empty command in {line!r}"
        out.append((env, argv))
        argv = []
    return out


def kind(argv):
    """``"setup"``, ``"pytest"``, ``"sphinx"`` or ``"run"``."""
    if argv[:2] == ["pip", "install"] or argv[:4] == ["python", "-m", "pip", "install"]:
        return "setup"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if argv[:3] == ["python", "-m", "sphinx"]:
        return "sphinx"
    return "run"


def bash_blocks():
    return [(line, body) for lang, line, body in blocks() if lang == "bash"]


# ----------------------------------------------------------------------------------------------
# the parser itself, and what the README must contain
# ----------------------------------------------------------------------------------------------
def test_the_parser_reads_chains_continuations_env_and_placeholders():
    body = ("# a comment\npip install . && refnorm verify\n"
            "A=1 refnorm compare --impl m:f \\\n    --size ci   # trailing\n"
            "refnorm compare --impl mine:f   # placeholder: your own module\n")
    lines = shell_lines(body)
    assert len(lines) == 3
    assert commands(lines[0]) == [({}, ["pip", "install", "."]), ({}, ["refnorm", "verify"])]
    assert commands(lines[1]) == [({"A": "1"}, ["refnorm", "compare", "--impl", "m:f",
                                                "--size", "ci"])]
    assert [bool(PLACEHOLDER.search(line)) for line in lines] == [False, False, True]
    assert kind(["python", "-m", "pip", "install", "-e", ".[test]"]) == "setup"


def test_the_readme_starts_with_install_and_verify_and_has_runnable_commands():
    first = shell_lines(bash_blocks()[0][1])[0]
    assert commands(first) == [({}, ["pip", "install", "."]), ({}, ["refnorm", "verify"])]
    runnable = [argv for _, body in bash_blocks() for line in shell_lines(body)
                if not PLACEHOLDER.search(line)
                for _, argv in commands(line) if kind(argv) == "run"]
    assert len(runnable) >= 6, runnable
    assert [lang for lang, _, _ in blocks()].count("python") == 1
    # the only placeholder is the reader's own module, and a runnable module:function
    # candidate stands next to it
    placeholders = [line for _, body in bash_blocks() for line in shell_lines(body)
                    if PLACEHOLDER.search(line)]
    assert placeholders and all("mypackage" in line for line in placeholders), placeholders
    assert any(a[:2] == ["refnorm", "compare"] and ":" in a[a.index("--impl") + 1]
               for a in runnable if "--impl" in a)


# ----------------------------------------------------------------------------------------------
# setup steps and commands covered elsewhere
# ----------------------------------------------------------------------------------------------
def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _pins():
    """``{package: version}`` pinned with ``==`` anywhere in setup.cfg's extras."""
    pins = {}
    for _, value in _setup_cfg()["options.extras_require"].items():
        for req in value.split():
            name, sep, version = req.partition("==")
            if sep:
                pins[name.lower()] = version
    return pins


def check_setup(argv):
    args = argv[argv.index("install") + 1:]
    extras_defined = set(_setup_cfg()["options.extras_require"])
    pins = _pins()
    assert args, f"{argv}: installs nothing"
    for arg in args:
        if arg == "-e":
            continue
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg)
        if m:  # this project, maybe with extras
            extras = set(m.group(1).split(",")) if m.group(1) else set()
            assert extras <= extras_defined, (arg, sorted(extras_defined))
            continue
        assert not arg.startswith("-"), f"{argv}: unexpected option {arg}"
        name, sep, version = arg.partition("==")
        name = name.lower()
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name), arg
        if name == "torch":
            assert sep, "an unpinned torch downloads a CUDA build: pin it"
        if name in pins:
            assert version == pins[name], f"{arg}: setup.cfg pins {name}=={pins[name]}"
        if sep:
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            assert installed.split("+")[0] == version, (
                f"the README pins {arg}; the tests here run with {name} {installed}")


def test_setup_steps_are_well_formed():
    setups = [argv for _, body in bash_blocks() for line in shell_lines(body)
              for _, argv in commands(line) if kind(argv) == "setup"]
    assert len(setups) >= 3, setups
    for argv in setups:
        check_setup(argv)
    named = {a.partition("==")[0] for argv in setups for a in argv}
    assert {"torch", "jax", "jaxlib", "triton"} <= named, named
    assert any(".[test]" in argv for argv in setups)


def test_covered_elsewhere_commands_match_what_the_suite_runs():
    cmds = [argv for _, body in bash_blocks() for line in shell_lines(body)
            for _, argv in commands(line) if kind(argv) in ("pytest", "sphinx")]
    pytest_cmds = [a for a in cmds if kind(a) == "pytest"]
    sphinx_cmds = [a for a in cmds if kind(a) == "sphinx"]
    assert pytest_cmds and sphinx_cmds
    # `python -m pytest [-q]`: the command running this very test
    assert all(set(a[3:]) <= {"-q", "-x"} for a in pytest_cmds), pytest_cmds
    assert "pytest" in sys.modules
    # `python -m sphinx -W -b html docs OUT`: what tests/test_docs.py runs
    for a in sphinx_cmds:
        assert a[3:7] == ["-W", "-b", "html", "docs"] and len(a) == 8, a
    source = (ROOT / "tests" / "test_docs.py").read_text()
    assert '"-m", "sphinx", "-W"' in source and '"-b", "html"' in source
    # it builds a fresh copy of docs/ (and tutorials/), so the README's source folder is docs/
    assert "shutil.copytree(DOCS" in source and 'str(work / "docs")' in source


# ----------------------------------------------------------------------------------------------
# running the README
# ----------------------------------------------------------------------------------------------
def _needs(argv):
    """The optional packages a command needs."""
    text = " ".join(argv)
    needs = []
    if "triton" in text:
        needs += ["torch", "triton"]
    elif re.search(r"--impl torch\b", text):
        needs += ["torch"]
    elif re.search(r"--impl jax\b", text):
        needs += ["jax"]
    return needs


def _env(extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


def _run(argv, env, cwd):
    if argv[0] == "refnorm":
        argv = [sys.executable, "-m", "refnorm.cli"] + argv[1:]
    elif argv[0] in ("python", "python3"):
        argv = [sys.executable] + argv[1:]
    out = subprocess.run(argv, cwd=cwd, env=_env(env), capture_output=True, text=True,
                         timeout=TIMEOUT)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"{' '.join(argv)} exited {out.returncode}:\n{text[-4000:]}"
    return out.stdout


def _verdict(argv, stdout):
    """Where a command prints a verdict, it must be a pass."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if argv[:2] == ["refnorm", "verify"]:
        assert re.fullmatch(r"\d+ passed, 0 failed", last), last
        if len(argv) == 2:  # the main job: every registered item listed, and passed
            _every_item_passed(stdout)
    if argv[:2] == ["refnorm", "compare"]:
        assert last.startswith("ALL PASSED"), last
    if argv[:3] == ["refnorm", "goldens", "verify"]:
        assert last == "OK", last
    if argv[:2] == ["refnorm", "list"]:
        assert "layer_norm" in stdout and "registered" in last, last


def _every_item_passed(stdout):
    """The table of ``refnorm verify`` (all items) lists every registered item under its kind,
    with the verdict "pass", and its last line counts them all. (The only full run of verify in
    the suite: tests/test_cli.py runs it on a few items.)"""
    from refnorm.verify import registered

    rows = verify_rows(stdout, {kind for kind, _, _, _ in registered()})
    for kind, name, _, _ in registered():
        assert name in rows and rows[name].split()[0] == kind, name
        assert rows[name].split()[5] == "pass", rows[name]
    assert stdout.strip().splitlines()[-1] == f"{len(registered())} passed, 0 failed"


def _block_ids():
    return [f"line{line}" for line, _ in bash_blocks()]


@pytest.mark.parametrize("index", range(len(bash_blocks())), ids=_block_ids())
def test_readme_bash_block_runs(index, tmp_path):
    line_no, body = bash_blocks()[index]
    ran = 0
    for line in shell_lines(body):
        if PLACEHOLDER.search(line):
            continue
        for env, argv in commands(line):
            if kind(argv) == "setup":
                check_setup(argv)
                continue
            if kind(argv) != "run":
                continue        # covered elsewhere: see the module docstring
            for name in _needs(argv):
                optional_import(name)
            _verdict(argv, _run(argv, env, tmp_path))
            ran += 1
    if any(kind(a) == "run" for line in shell_lines(body) if not PLACEHOLDER.search(line)
           for _, a in commands(line)):
        assert ran, f"README block at line {line_no}: nothing ran"


def test_readme_python_tour_runs(tmp_path):
    (body,) = [body for lang, _, body in blocks() if lang == "python"]
    script = tmp_path / "tour.py"
    script.write_text(body)
    stdout = _run(["python", str(script)], {}, tmp_path)
    assert stdout.startswith("gradcheck passed"), stdout


def test_exported_goldens_in_the_repository_root_are_ignored_by_git():
    # `refnorm goldens export goldens/` run from a checkout must not leave untracked files
    lines = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "/goldens/" in lines or "goldens/" in lines
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        def ignored(path):
            out = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", "--no-index",
                                  path], capture_output=True, text=True)
            assert out.returncode in (0, 1), out.stderr
            return out.returncode == 0

        assert ignored("goldens/manifest.json") and ignored("goldens/layer_norm-float32-000.npz")
        assert not ignored("refnorm/oracle/goldens.py") and not ignored("tests/test_readme.py")

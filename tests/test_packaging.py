"""Packaging: only ``refnorm`` and ``refnorm.*`` ship, and HIPS autograd is never shadowed."""
import configparser
import pathlib
import subprocess
import sys

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_only_refnorm_packages_are_shipped():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(where=str(ROOT), include=include)
    assert "refnorm" in packages and "refnorm.autograd" in packages
    assert all(p == "refnorm" or p.startswith("refnorm.") for p in packages), packages
    assert not (ROOT / "autograd").exists(), "a top-level autograd/ would shadow HIPS autograd"


def test_import_autograd_gives_hips_autograd_from_the_repo_root():
    # The repo root is first on sys.path here (python -c from cwd), the worst case for shadowing.
    code = ("import autograd, autograd.numpy, refnorm.autograd as ra; "
            "print(autograd.__file__); print(ra.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    hips, ours = out.stdout.split()
    assert "refnorm" not in hips and "site-packages" in hips
    assert pathlib.Path(ours).parent == ROOT / "refnorm" / "autograd"


def test_engine_imports_only_numpy():
    code = ("import sys; import refnorm.autograd; "
            "bad = [m for m in sys.modules if m.startswith('refnorm') and not "
            "m.startswith('refnorm.autograd') and m != 'refnorm']; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------
# dependencies: what setup.cfg declares is what refnorm/ imports
# ----------------------------------------------------------------------------------------------
#: Optional backends: imported only inside functions, under ``try/except ImportError``, or by the
#: example kernels in ``refnorm/oracle/examples/`` (which document that they need them).
OPTIONAL_MODULES = {"torch", "jax", "jaxlib", "triton"}
#: Test tools, in the test extras only: imported inside the functions of ``refnorm/testing.py``
#: that need them (``refnorm.testing.cases`` builds pytest parameters), nowhere else.
TEST_TOOL_MODULES = {"pytest"}


def _requirement_name(line):
    """``numpy>=1.23 ; python_version>'3'`` -> ``numpy`` (PEP 508, normalized)."""
    import re

    name = re.split(r"[\s<>=!~;\[(]", line.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _install_requires():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [_requirement_name(line) for line in cfg["options"]["install_requires"].splitlines()
            if line.strip()]


def _test_requires():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [_requirement_name(line)
            for line in cfg["options.extras_require"]["test"].splitlines() if line.strip()]


def _imports(path):
    """``[(top-level module, guarded)]`` of every absolute import in ``path``: ``guarded`` when
    the import sits inside a function or a ``try`` whose handlers catch ImportError."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, guarded):
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], guarded) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], guarded))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            guarded = True
        if isinstance(node, ast.Try) and any(
                h.type is None or "ImportError" in ast.dump(h.type) or
                "ModuleNotFoundError" in ast.dump(h.type) for h in node.handlers):
            for child in node.body:
                visit(child, True)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def _third_party_imports():
    """``{module: [(file, guarded)]}``: every non-stdlib, non-refnorm module refnorm/ imports."""
    out = {}
    for path in sorted((ROOT / "refnorm").rglob("*.py")):
        for module, guarded in _imports(path):
            if module in sys.stdlib_module_names or module in ("refnorm", "__future__"):
                continue
            out.setdefault(module, []).append((path.relative_to(ROOT).as_posix(), guarded))
    return out


def _distribution_of(module):
    """The normalized distribution name that installs the import name ``module``."""
    import importlib.metadata
    import re

    dists = importlib.metadata.packages_distributions().get(module) or [module]
    return re.sub(r"[-_.]+", "-", dists[0]).lower()


def test_the_import_scanner_sees_guarded_and_unguarded_imports(tmp_path):
    # the scanner itself, on a file whose answer is known, so the two tests below cannot pass
    # by seeing nothing
    f = tmp_path / "m.py"
    f.write_text("import numpy as np\nfrom scipy import linalg\ntry:\n    import torch\n"
                 "except ImportError:\n    torch = None\ndef g():\n    import jax.numpy\n"
                 "from . import sibling\n")
    assert _imports(f) == [("numpy", False), ("scipy", False), ("torch", True), ("jax", True)]
    assert _requirement_name("NumPy_Stuff >= 1.2 ; python_version > '3'") == "numpy-stuff"
    assert "numpy" in _third_party_imports()


def test_every_runtime_dependency_is_imported_by_refnorm():
    # a declared runtime dependency that nothing imports (scipy was one) costs every user an
    # install for nothing
    imported = {_distribution_of(m) for m in _third_party_imports()}
    unused = [d for d in _install_requires() if d not in imported]
    assert not unused, f"install_requires lists {unused}, which nothing in refnorm/ imports"


def test_every_third_party_import_of_refnorm_is_declared():
    # a module that refnorm/ imports unguarded must be a runtime dependency; torch, jax and
    # triton are optional: guarded (in a function or a try/except ImportError), or imported by
    # the example kernels only
    declared = set(_install_requires())
    for module, where in _third_party_imports().items():
        if module in OPTIONAL_MODULES:
            bare = [f for f, guarded in where
                    if not guarded and not f.startswith("refnorm/oracle/examples/")]
            assert not bare, f"optional {module!r} imported unguarded in {bare}"
        elif module in TEST_TOOL_MODULES:
            assert _distribution_of(module) in _test_requires(), module
            bad = [f for f, guarded in where if not guarded or f != "refnorm/testing.py"]
            assert not bad, f"test tool {module!r} imported outside a function of " \
                f"refnorm/testing.py: {bad}"
        else:
            assert _distribution_of(module) in declared, (
                f"refnorm/ imports {module!r} ({where[0][0]}) but setup.cfg's install_requires "
                f"does not declare it")


def test_importing_refnorm_loads_no_optional_backend():
    # every module of the package imports with numpy alone (the examples excepted)
    code = ("import importlib, pkgutil, sys, refnorm\n"
            "for m in pkgutil.walk_packages(refnorm.__path__, 'refnorm.'):\n"
            "    if '.examples' not in m.name:\n"
            "        importlib.import_module(m.name)\n"
            "print(sorted(m for m in ('torch', 'jax', 'triton', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_optional_backends_are_imported_only_by_the_oracle():
    # the messages for a missing PyTorch, JAX or Triton live in refnorm/oracle (its adapters,
    # trajectories and example kernels); a module elsewhere that imports one must raise its own
    # message naming the pinned install command (`pip install torch==2.13.0`), and be added here
    outside = {module: [f for f, _ in where if not f.startswith("refnorm/oracle/")]
               for module, where in _third_party_imports().items() if module in OPTIONAL_MODULES}
    assert outside and all(not files for files in outside.values()), outside

"""The documentation builds with warnings as errors, executes every tutorial, and documents
every registered variant and every public name.

One Sphinx build per test run (the ``built_docs`` fixture), from a fresh copy of ``docs/`` and
``tutorials/``: sphinx-gallery executes every tutorial in it (no cached outputs), and the source
tree is left untouched. Each tutorial is also run once as a plain ``python`` script in a
subprocess, because the gallery's execution is not the same thing: it runs the cells in its own
namespace, with its own working directory and matplotlib backend, inside the Sphinx process.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import pkgutil
import posixpath
import re
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = ROOT / "tutorials"
TUTORIAL_FILES = sorted(TUTORIALS.glob("*/plot_*.py"))
GALLERY = "auto_tutorials"  # sphinx_gallery_conf["gallery_dirs"] in docs/conf.py

# one worker builds the docs once for every test here (setup.cfg: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("docs")


def _env():
    """The environment of the subprocesses: this checkout's refnorm first, and no display."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                                      env.get("PYTHONPATH", "").split(os.pathsep)
                                                      if p])
    env.setdefault("MPLBACKEND", "Agg")
    return env


class Build(NamedTuple):
    work: pathlib.Path       # the copy: work/docs, work/tutorials
    html: pathlib.Path
    returncode: int
    log: str
    seconds: float


@pytest.fixture(scope="session")
def built_docs(tmp_path_factory) -> Build:
    """``sphinx -W -b html`` on a fresh copy of docs/ and tutorials/, once per test run.
    (Session scope: xdist may run another module's tests on this worker between two of these,
    which tears a module-scoped fixture down and would build the docs a second time.)"""
    work = tmp_path_factory.mktemp("docs_build")
    shutil.copytree(DOCS, work / "docs", ignore=shutil.ignore_patterns(
        "_build", GALLERY, "variants.rst", "sg_execution_times.rst"))
    shutil.copytree(TUTORIALS, work / "tutorials",
                    ignore=shutil.ignore_patterns("__pycache__", "*.png"))
    html = work / "html"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q",
                          "-b", "html", str(work / "docs"), str(html)],
                         capture_output=True, text=True, env=_env(), cwd=str(work))
    return Build(work, html, out.returncode, out.stdout + out.stderr,
                 time.perf_counter() - start)


def test_docs_build_without_warnings(built_docs):
    assert built_docs.returncode == 0, built_docs.log
    assert (built_docs.html / "derivations" / "layer_norm.html").exists()
    assert (built_docs.html / GALLERY / "index.html").exists()


def test_the_docs_tests_share_one_worker(request):
    """Under xdist's ``--dist loadgroup`` (setup.cfg) every test here is in the "docs" group, so
    one worker builds the docs once. pytest 9.2 broke the grouping silently
    (pytest-dev/pytest-xdist#1386; hence ``pytest<9.2`` in the test extras)."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@docs"), request.node.nodeid


def test_there_are_tutorials_and_they_are_numbered():
    assert len(TUTORIAL_FILES) >= 6
    numbers = []
    for path in TUTORIAL_FILES:
        match = re.fullmatch(r"plot_(\d\d)_[a-z0-9_]+\.py", path.name)
        assert match, f"{path}: expected tutorials/<chapter>/plot_<nn>_<topic>.py"
        assert (path.parent / "GALLERY_HEADER.rst").exists(), path.parent
        numbers.append(match.group(1))
    assert len(set(numbers)) == len(numbers), f"two tutorials share a number: {numbers}"


@pytest.mark.parametrize("path", TUTORIAL_FILES, ids=[p.stem for p in TUTORIAL_FILES])
def test_tutorial_executed_by_the_build_with_a_figure_and_thumbnail(built_docs, path):
    """The gallery ran the tutorial, scraped at least one figure it drew, and made the thumbnail
    from it; the gallery index shows that thumbnail."""
    assert built_docs.returncode == 0, built_docs.log
    chapter, stem = path.parent.name, path.stem
    gallery = built_docs.work / "docs" / GALLERY / chapter
    rst = (gallery / f"{stem}.rst").read_text()
    assert ".. rst-class:: sphx-glr-script-out" in rst, "no output captured: was it executed?"
    first_figure = gallery / "images" / f"sphx_glr_{stem}_001.png"
    thumb = gallery / "images" / "thumb" / f"sphx_glr_{stem}_thumb.png"
    assert first_figure.exists(), f"{path.name} drew no figure"
    assert thumb.exists() and thumb.stat().st_size > 0
    assert (built_docs.html / GALLERY / chapter / f"{stem}.html").exists()
    index = (built_docs.html / GALLERY / "index.html").read_text()
    assert f"sphx_glr_{stem}_thumb.png" in index


@pytest.mark.parametrize("path", TUTORIAL_FILES, ids=[p.stem for p in TUTORIAL_FILES])
def test_tutorial_runs_as_a_plain_script(tmp_path, path):
    """``python tutorials/<chapter>/plot_<nn>_<topic>.py`` exits 0 (in an empty directory)."""
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         env=_env(), cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


def test_math_is_rendered_offline(built_docs):
    """MathJax comes from _static/mathjax in the output; no page loads a script from the web."""
    assert built_docs.returncode == 0, built_docs.log
    mathjax = built_docs.html / "_static" / "mathjax"
    assert (mathjax / "tex-chtml.js").exists()
    assert any((mathjax / "output" / "chtml" / "fonts").rglob("*.woff"))
    pages = list(built_docs.html.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        text = page.read_text()
        remote = re.findall(r"<(?:script|link)[^>]*(?:src|href)=\"(?:https?:)?//[^\"]*\"", text)
        assert not remote, f"{page.relative_to(built_docs.html)} loads {remote}"
    page = (built_docs.html / "derivations" / "layer_norm.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in page and "\\(" in page


# ------------------------------------------------------------------ what the docs must cover

def _documented_objects(html: pathlib.Path) -> tuple[set, set]:
    """The Python objects the build documented: (their dotted names, the ids of the objects)."""
    from sphinx.util.inventory import InventoryFile

    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", posixpath.join)
    names = {name for kind, entries in inventory.items() if kind.startswith("py:")
             for name in entries}
    ids = set()
    for name in names:
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attr in parts[split:]:
                obj = getattr(obj, attr, None)
            if obj is not None:
                ids.add(id(obj))
            break
    return names, ids


def _public_names():
    """(module, name) for the public surface of refnorm: for each module or subpackage directly
    under ``refnorm`` (not ``_private``), the names of its ``__all__``, or else the functions and
    classes it defines under a public name."""
    import refnorm

    for info in pkgutil.iter_modules(refnorm.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"refnorm.{info.name}")
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, obj in vars(module).items() if not n.startswith("_")
                     and (inspect.isfunction(obj) or inspect.isclass(obj))
                     and obj.__module__ == module.__name__]
        for name in names:
            yield module, name


def test_every_registered_variant_has_a_derivation_page_and_an_api_entry(built_docs):
    from refnorm.norms import ALL_SPECS
    from refnorm.optim import ALL_OPTIMIZERS

    assert built_docs.returncode == 0, built_docs.log
    names, _ = _documented_objects(built_docs.html)
    index = (built_docs.html / "derivations" / "index.html").read_text()
    missing = []
    for spec in ALL_SPECS:
        # the variant's own page, or its family's (named as its file: ibn_net for ibn_a/ibn_b)
        family = spec.forward.__module__.rsplit(".", 1)[-1]
        pages = [n for n in (spec.name, family) if (DOCS / "derivations" / f"{n}.rst").exists()]
        if not pages:
            missing.append(f"{spec.name}: no docs/derivations/{spec.name}.rst "
                           f"(or {family}.rst)")
        elif f'href="{pages[0]}.html' not in index:
            missing.append(f"{spec.name}: docs/derivations/index.rst does not link its page")
        for fn in (spec.forward, spec.backward):
            if f"{fn.__module__}.{fn.__name__}" not in names:
                missing.append(f"{spec.name}: {fn.__module__}.{fn.__name__} is not in "
                               "docs/api.rst")
    for spec in ALL_OPTIMIZERS:
        for fn in (spec.init, spec.step):
            if f"{fn.__module__}.{fn.__name__}" not in names:
                missing.append(f"{spec.name}: {fn.__module__}.{fn.__name__} is not in "
                               "docs/api.rst")
    assert not missing, "\n".join(missing)


def test_every_public_name_is_documented(built_docs):
    assert built_docs.returncode == 0, built_docs.log
    names, ids = _documented_objects(built_docs.html)
    missing = [f"{module.__name__}.{name}" for module, name in _public_names()
               if f"{module.__name__}.{name}" not in names
               and id(getattr(module, name)) not in ids]
    assert not missing, ("public names with no entry in the API reference (docs/api.rst):\n  "
                         + "\n  ".join(missing))

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

"""The Sphinx documentation builds with warnings as errors (derivation pages, notes, API)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                          str(ROOT / "docs"), str(tmp_path / "html")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "html" / "derivations" / "layer_norm.html").exists()

"""Sphinx configuration for refnorm's documentation.

The variant table (``variants.rst``) is written at build time from the registry, so a new
variant appears in the docs without an edit here.

The tutorials (``../tutorials/<chapter>/plot_<nn>_<topic>.py``) are executed by sphinx-gallery
on every build from scratch, and their figures scraped; the generated pages go to
``auto_tutorials/`` (not committed). The build needs no network: the theme is furo, and MathJax
is loaded from the copy that the ``sphinx-mathjax-offline`` package installs (copied into
``_static/mathjax`` of the output), never from a CDN.

Build locally with ``python -m sphinx -W -b html docs docs/_build/html``.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

# Matplotlib draws into files only; Triton (tutorial 10, when installed) runs in its CPU
# interpreter. Both must be set before the first import of either, and a value set by the user
# wins.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TRITON_INTERPRET", "1")

import refnorm  # noqa: E402

project = "refnorm"
author = "the refnorm developers"
copyright = "the refnorm developers"
release = version = refnorm.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx-mathjax-offline",
              "sphinx.ext.napoleon", "sphinx.ext.viewcode", "sphinx_gallery.gen_gallery"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "furo"
html_title = f"refnorm {release}"
suppress_warnings = ["toc.not_included"]

# MathJax from the local copy that sphinx-mathjax-offline copies into _static/mathjax
mathjax_path = "mathjax/tex-chtml.js"

sphinx_gallery_conf = {
    "examples_dirs": ["../tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r"[\\/]plot_",              # execute every plot_*.py
    "within_subsection_order": "FileNameSortKey",  # plot_01_, plot_02_, ... in order
    "abort_on_example_error": True,                # a failing tutorial fails the build
    "run_stale_examples": True,                    # execute every tutorial on every build
    "download_all_examples": False,
    "remove_config_comments": True,
    "reset_modules": ("matplotlib",),
    "image_scrapers": ("matplotlib",),
    "min_reported_time": 0,
    "show_signature": False,
    "write_computation_times": False,  # those pages load jQuery from a CDN
}


def _write_variant_table(app):
    from refnorm.norms import ALL_SPECS
    from refnorm.optim import ALL_OPTIMIZERS

    lines = ["Registered variants and optimizers", "=" * 34, "",
             "Generated from the registry (``refnorm.norms.ALL_SPECS``, "
             "``refnorm.optim.ALL_OPTIMIZERS``) at build time.", "",
             ".. list-table::", "   :header-rows: 1", "",
             "   * - name", "     - title", "     - paper", "     - gradient",
             "     - PyTorch equivalent"]
    for s in ALL_SPECS:
        lines += [f"   * - ``{s.name}``", f"     - {s.title}", f"     - {s.paper}",
                  f"     - {s.gradient}", f"     - ``{s.torch_equivalent or '-'}``"]
    for s in ALL_OPTIMIZERS:
        lines += [f"   * - ``{s.name}``", f"     - {s.title}", f"     - {s.paper or '-'}",
                  "     - (optimizer)", f"     - ``{s.torch_equivalent or '-'}``"]
    path = os.path.join(app.srcdir, "variants.rst")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def setup(app):
    app.connect("builder-inited", _write_variant_table)

"""Sphinx configuration for refnorm's documentation.

The variant table (``variants.rst``) is written at build time from the registry, so a new
variant appears in the docs without an edit here.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import refnorm  # noqa: E402

project = "refnorm"
author = "the refnorm developers"
release = version = refnorm.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.mathjax", "sphinx.ext.napoleon",
              "sphinx.ext.viewcode"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
suppress_warnings = ["toc.not_included"]


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

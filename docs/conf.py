"""Sphinx configuration of the API reference (built from the docstrings; ``sphinx-build -W docs docs/_build``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

project = "scHashFormer"
author = "scHashFormer authors"
copyright = "2026, scHashFormer authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "*.md", "*.ipynb"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_custom_sections = [("Writes", "params_style"), ("Writes (into ``query``)", "params_style"),
                            ("Attributes after ``fit``", "params_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings describe the types
html_theme = "alabaster"
nitpicky = False

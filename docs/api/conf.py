"""Sphinx configuration of the API reference, built from the docstrings, offline.

Build: ``sphinx-build -W -b html docs/api <output dir>`` (``pip install 'deconflict[docs]'``).
No extension fetches anything: autodoc imports the package from ``src``, napoleon reads the
Google-style "Args:" sections, and the theme is Sphinx's own.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

project = "deconflict"
author = "the deconflict authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "plain_math"]
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_default_options = {"member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The optional extras are documented even where they are not installed.
autodoc_mock_imports = [name for name in ("lightning",) if importlib.util.find_spec(name) is None]
# Type hints name classes of other packages (torch, numpy) that this offline build cannot link.
nitpicky = False

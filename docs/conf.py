"""Sphinx configuration for the batchframework documentation.

Build with ``sphinx-build -W --keep-going -q -b html docs docs/_build/html`` from the
repository root (``make docs``). Autodoc imports the library, so Django is set up here with the
test suite's settings; nothing touches a database.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

import django  # noqa: E402

django.setup()

import batchframework  # noqa: E402

# -- Project information -------------------------------------------------------------------------
project = "batchframework"
author = "batchframework developers"
copyright = "batchframework developers"
release = batchframework.__version__
version = ".".join(release.split(".")[:2])

# -- General configuration -----------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build"]
nitpicky = False
default_role = "literal"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {
    "members": True,
}

# -- HTML output ---------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"batchframework {release}"
html_theme_options = {
    "description": "Tracked background and bulk operations for Django",
    "fixed_sidebar": True,
}

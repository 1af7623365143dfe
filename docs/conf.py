"""Sphinx configuration of the mlbfgs_optax documentation.

Build with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` from the
repository root (``pip install -e '.[docs]'`` first). The notebooks are rendered by
myst-nb as committed, without executing them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import mlbfgs_optax  # noqa: E402

# -- Project ---------------------------------------------------------------------------

project = "mlbfgs_optax"
author = "mlbfgs_optax developers"
copyright = "mlbfgs_optax developers"
release = mlbfgs_optax.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions ------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",  # MyST Markdown pages and the notebooks
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path: list[str] = []

# autodoc / autosummary: the API page documents everything in ``mlbfgs_optax.__all__``.
autosummary_generate = False  # the API page lists its entries explicitly
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_preserve_defaults = True
autodoc_default_options = {"exclude-members": "__init__, __new__"}
# Show the aliases the signatures are written with, not their expanded unions.
autodoc_type_aliases = {
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "_layout.BlockSpec": "BlockSpec",
    "BlockSpec": "BlockSpec",
    "jax.Array": "jax.Array",
}
try:  # Sphinx prints an alias inside ``Optional[...]`` by its repr; print its name.
    from sphinx.util.inspect import TypeAliasForwardRef

    TypeAliasForwardRef.__repr__ = lambda self: self.name
except ImportError:  # pragma: no cover - other Sphinx versions
    pass

# napoleon: Google-style docstrings (Args:, Returns:, Raises:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
# The state's attributes describe their shapes and dtypes in words; their annotations
# would print as jax's private array class.
napoleon_attr_annotations = False

# MyST (Markdown) and myst-nb (notebooks, rendered as committed, never executed).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"
nb_merge_streams = True

# The type annotations of the package refer to private aliases and to jax / optax types
# that Sphinx cannot resolve without network inventories (none are fetched: the build is
# offline). Unresolved references render as plain text; they are not errors.
nitpicky = False

# -- HTML ------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"mlbfgs_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []

# -- The notebooks ---------------------------------------------------------------------
# The notebooks live in notebooks/ at the repository root (where users open them); the
# build renders copies of them from docs/notebooks/ (git-ignored), refreshed every build.

_NB_SRC = ROOT / "notebooks"
_NB_DST = DOCS / "notebooks"
_NB_DST.mkdir(exist_ok=True)
for _nb in sorted(_NB_SRC.glob("*.ipynb")):
    _dst = _NB_DST / _nb.name
    if not _dst.exists() or _dst.read_bytes() != _nb.read_bytes():
        shutil.copyfile(_nb, _dst)


# -- Every public name is documented ---------------------------------------------------


def _check_api_coverage(app):
    """Warn (an error under -W) when a name of ``__all__`` is missing from api.rst."""
    from sphinx.util import logging

    text = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|data):: (\w+)", text, re.M))
    logger = logging.getLogger(__name__)
    for name in sorted(set(mlbfgs_optax.__all__) - documented):
        logger.warning("mlbfgs_optax.%s is in __all__ but not documented in api.rst", name)
    for name in sorted(documented - set(mlbfgs_optax.__all__)):
        logger.warning("api.rst documents %s, which is not in mlbfgs_optax.__all__", name)


# -- Module-level data re-exported by the package --------------------------------------
# autodoc looks for a ``#:`` doc comment in the module that documents the name
# (``mlbfgs_optax/__init__.py``), but ``paper_defaults`` is commented where it is defined.
# Take the comment from there, and list the mapping's items below it.


def _data_docstring(app, what, name, obj, options, lines):
    if what != "data" or lines or not name.startswith("mlbfgs_optax."):
        return
    from sphinx.pycode import ModuleAnalyzer

    short = name.rsplit(".", 1)[1]
    for modname in sorted(m for m in sys.modules if m.startswith("mlbfgs_optax._")):
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        if ("", short) in docs:
            lines.extend(line.rstrip("\n") for line in docs[("", short)])
            break
    if hasattr(obj, "items"):
        lines.extend(["", "Its items:", ""])
        lines.extend(f"* ``{k}={v!r}``" for k, v in obj.items())
        lines.append("")


def setup(app):
    app.connect("builder-inited", _check_api_coverage)
    app.connect("autodoc-process-docstring", _data_docstring)

"""The package stays small-moduled: no function's code over 80 lines, no module over 500.

Code lines count from a function's ``def`` to its last line, its docstring excluded (the
public functions' docstrings are their API reference). Pure Python: no jax.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlbfgs_optax"
MODULES = sorted(PACKAGE.glob("*.py"))
#: The per-block modules, one job each (which leaves form which buffers; the pytree <->
#: buffer moves; the per-block algebra), hold to a tighter bound.
BLOCK_MODULES = ("_layout.py", "_packing.py", "_block_ops.py")


def _code_lines(fn: ast.FunctionDef) -> int:
    total = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
            first.value.value, str):
        total -= first.end_lineno - first.lineno + 1
    return total


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_has_more_than_80_lines_of_code(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = {n.name: _code_lines(n) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(n) > 80}
    assert not long, f"{path.name}: {long}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_are_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= (400 if path.name in BLOCK_MODULES else 500), (path.name, lines)


def test_code_lines_leave_out_the_docstring():
    fn = ast.parse('def f():\n    """One.\n\n    Two.\n    """\n    return 1\n').body[0]
    assert _code_lines(fn) == 2

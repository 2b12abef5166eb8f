"""The house rules that a tool can check: arrows point down (import-linter's layers contract, through
tools/lint_imports.py), no quantization format is named outside its registry and the CLI, and no
product file or function grows past a screenful's budget."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from moepress.compress import formats

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("compress", "calib", "exporters", "moepress")
LINT = [sys.executable, str(ROOT / "tools" / "lint_imports.py")]


def _product_files():
    for top in PRODUCT:
        for f in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in f.parts:
                yield f


def test_import_contract_is_kept():
    r = subprocess.run(LINT, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_import_contract_fails_on_an_upward_import():
    # the format registry (low) importing the CLI (top): the contract must name that arrow
    r = subprocess.run([*LINT, "--inject", "compress/formats/base.py", "import moepress.cli"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1, r.stdout[-3000:]
    assert "moepress.compress.formats is not allowed to import moepress.cli" in r.stdout


def _names_a_format(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in names
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_format(e, names) for e in node.elts)
    return False


def test_no_format_name_comparisons_outside_the_registry_and_cli():
    """``fmt == "fp8"``, ``fmt in ("int4-awq", ...)``, ``{"fp8": ...}[fmt]``: only compress/formats/
    and moepress/cli/ may branch on a format's name; everything else asks the registry."""
    names = set(formats.FORMATS)
    found = []
    for f in _product_files():
        rel = f.relative_to(ROOT).as_posix()
        if rel.startswith(("compress/formats/", "moepress/cli/")):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(_names_a_format(x, names)
                                                     for x in [node.left, *node.comparators]):
                found.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Dict) and any(k is not None and _names_a_format(k, names) for k in node.keys):
                found.append(f"{rel}:{node.lineno}")
    assert not found, found


@pytest.mark.parametrize("limit_file,limit_fn", [(420, 60)])
def test_files_and_functions_stay_small(limit_file, limit_fn):
    long_files, long_fns = [], []
    for f in _product_files():
        text = f.read_text()
        rel = f.relative_to(ROOT).as_posix()
        if text.count("\n") > limit_file:
            long_files.append(f"{rel} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit_fn:
                    long_fns.append(f"{rel}:{node.name} ({n} lines)")
    assert not long_files and not long_fns, (long_files, long_fns)

#!/usr/bin/env python3
"""Run import-linter's contracts (pyproject ``[tool.importlinter]``) on moepress.

import-linter (grimp) finds a package's modules by walking the package's folder, but moepress maps
``moepress.compress`` to ``compress/`` etc. (pyproject ``package-dir``), so the walk from ``moepress/``
misses them. This script stages the package as one tree in a temporary directory, each mapped
folder's ``.py`` files copied under the import path it maps to, and runs the contracts there.

    python tools/lint_imports.py                      # exit 0: every contract kept
    python tools/lint_imports.py --inject compress/formats/base.py "import moepress.cli"
        # the same, with a line appended to one file of the staged copy (to show a broken contract)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(dest: Path) -> Path:
    """Copy the package's Python files into ``dest/<import path>``; returns ``dest``."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for pkg, folder in sorted(mapping.items(), key=lambda kv: len(kv[0])):
        src = ROOT / folder
        for f in src.rglob("*.py"):
            rel = f.relative_to(src)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            out = dest.joinpath(*pkg.split("."), rel)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inject", nargs=2, metavar=("FILE", "LINE"),
                    help="append LINE to FILE (repository path) in the staged copy")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="moepress-lint-") as tmp:
        stage(Path(tmp))
        if a.inject:
            mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
            folder, _, rest = a.inject[0].partition("/")
            pkg = next(p for p, d in mapping.items() if d == folder)
            target = Path(tmp).joinpath(*pkg.split("."), rest)
            target.write_text(target.read_text() + "\n" + a.inject[1] + "\n")
        env = {**os.environ, "PYTHONPATH": tmp}
        # a fresh process: its import system must find the staged copy, not the installed package
        return subprocess.call([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                                " sys.exit(lint_imports_command())", str(ROOT / "pyproject.toml"),
                                "--no-cache"], env=env, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())

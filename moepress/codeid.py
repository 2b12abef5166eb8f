"""Which moepress code is running: its version and a digest of its own source files.

``moepress.__version__`` names a release; between releases, and always under an editable install, it stays the
same while the code changes. What a stage's output depends on therefore names the code by its digest
too: a run's stage keys (moepress/pipeline/runner.py), a quantize partial's resume key
(compress/checkpoint/resume.py) and the calibration cache's key (calib/cache.py, over the code that
draws the samples: ``SAMPLING_CODE``). After an upgrade, or any edit, a run re-runs its stages, a ``--resume`` refuses a
partial another moepress started and the cache draws its samples again, instead of reusing what other
code wrote as if this code had.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import moepress

# every package of moepress (pyproject's package map), by import name
PACKAGES = ("moepress", "moepress.compress", "moepress.calib", "moepress.exporters", "moepress.models")


@functools.cache
def package_digest(*packages: str) -> str:
    """sha256 (16 hex digits) of the modules of ``packages``: each one's dotted name and bytes. The folders come
    from the import system without importing anything; a module is named once whichever folder holds it (a wheel
    nests compress/ inside moepress/, an editable install maps it apart: the same code, the same digest). Only
    importable ``*.py`` files count (not an editor's ``.#name.py`` lock link); one that cannot be read is named as
    unreadable. ``"no-source"`` where no module file is found (a zip or ``.pyc``-only install): the version alone."""
    modules: dict[str, Path] = {}
    for name in packages:
        spec = importlib.util.find_spec(name)
        for root in sorted(spec.submodule_search_locations or ()) if spec else ():
            for p in Path(root).rglob("*.py"):
                rel = p.relative_to(root).with_suffix("").parts
                if "__pycache__" not in rel and all(part.isidentifier() for part in rel) and p.is_file():
                    modules.setdefault(".".join((name, *rel)), p)
    h = hashlib.sha256()
    for module, p in sorted(modules.items()):
        try:
            data = p.read_bytes()
        except OSError as e:
            data = f"unreadable: {e.strerror}".encode()
        h.update(f"{module}\0".encode() + data + b"\0")
    return h.hexdigest()[:16] if modules else "no-source"


def code_id() -> str:
    """``VERSION+DIGEST``: this moepress, as the keys of what it writes name it."""
    return f"{moepress.__version__}+{package_digest(*PACKAGES)}"

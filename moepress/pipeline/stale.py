"""Stage outputs of an earlier run in the same directory that this run's recipe does not produce.

`moepress run -o D` reuses D; a recipe that drops an export, a check or a build left that stage's earlier output
in D, complete and manifest-valid, naming inputs (D/quantize) that this run has since replaced: it looked finished
and was not what run.json describes. They are removed with their partials and state files: when a run starts,
those its recipe cannot produce; when it ends, those it did not produce (a check or build decided while it ran).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# the run directory's stage outputs (moepress/pipeline/runner.py's layout)
LAYOUT = ("prune", "quantize", "export/*", "check/*", "build/*")
SUFFIXES = (".partial.lock", ".partial")


def planned(out: Path, recipe: dict) -> set[Path]:
    """The stage outputs ``recipe`` may write in ``out``, builds aside (their names are decided as they run)."""
    keep = {out / s for s in ("prune", "quantize") if recipe[s] is not None}
    formats = list((recipe["export"] or {}).get("formats", ()))
    keep |= {out / "export" / f for f in formats}
    if recipe["check"] is not None:
        last = "quantized" if recipe["quantize"] is not None else "pruned" if recipe["prune"] is not None else None
        keep |= {out / "check" / n for n in [last, *formats] if n}
    keep |= set(out.glob("build/*")) if recipe["build"] is not None else set()
    return {p.with_name(_base(p.name)) for p in keep}


def _base(name: str) -> str:
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def withdraw(out: Path, keep: set[Path], state_dir: Path, say=None) -> list[str]:
    """Remove every stage output under ``out`` not in ``keep`` (with its ``.partial`` and lock) and the state files
    that name it, each said through ``say``; returns what was removed, relative to ``out``."""
    gone: list[str] = []
    for pattern in LAYOUT:
        for p in sorted(out.glob(pattern)):
            if p.with_name(_base(p.name)) in keep:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            gone.append(p.relative_to(out).as_posix())
    removed = {str(out / g) for g in gone}
    for st in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else ():
        try:
            named = json.loads(st.read_text()).get("output")
        except (OSError, ValueError, AttributeError):
            continue
        if named in removed:
            st.unlink(missing_ok=True)
    for parent in ("export", "check", "build"):  # an emptied stage folder goes too
        d = out / parent
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    gone = [g for g in gone if not g.endswith(SUFFIXES)]
    for g in gone if say is not None else ():
        say(f"run: removed {g}, an earlier run's output this recipe does not produce")
    return gone

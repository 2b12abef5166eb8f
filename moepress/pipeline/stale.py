"""Stage outputs of an earlier run in the same directory that this run's recipe does not produce.

`moepress run -o D` reuses D; a recipe that drops an export, a check or a build left that stage's earlier output
in D, complete and manifest-valid, naming inputs (D/quantize) that this run has since replaced: it looked finished
and was not what run.json describes. The stages an earlier run recorded in D/.state are removed, with their
partials and state files: when a run starts, those its recipe cannot produce; when it ends, those it did not
produce (a check or build decided while it ran). Nothing a run did not record there is touched.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from moepress.errors import MoepressError
from moepress.outputs import write_text_atomic
from moepress.pipeline.keys import stage_key

SUFFIXES = (".partial.lock", ".partial")
FOLDERS = ("export", "check", "build", ".state")  # a run directory's folders of stage outputs and state
# what a run writes at the top of its directory, and their .partial, .partial.lock and .tmp siblings
RUN_NAMES = {f"{n}{s}" for n in ("prune", "quantize", "export", "check", "build", "recipe.yaml", "run.json", ".state")
             for s in ("", ".tmp", *SUFFIXES)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a format, check, target or builder name: one path part


def stage_path(out: Path, sid: str) -> Path:
    """Where stage ``sid`` writes in run directory ``out``: the run directory's layout, for the runner and for
    what an earlier run left."""
    kind, _, rest = sid.partition(":")
    if kind in ("prune", "quantize"):
        return out / kind
    if kind == "build":
        target, _, builder = rest.partition(":")
        return out / "build" / f"{target}-{builder}"
    return out / kind / rest


def state_file(state_dir: Path, sid: str) -> Path:
    """Stage ``sid``'s key and result (what skipping and resuming read)."""
    return state_dir / (sid.replace(":", "__") + ".json")


def well_formed(sid: str) -> bool:
    """A stage id a run writes: ``prune``, ``quantize``, ``export:F``, ``check:N``, ``build:T:B``, each name one
    path part (not ``..``): an id read back from a directory that came from elsewhere names no path outside its
    stage folder."""
    kind, _, rest = sid.partition(":")
    names = {"prune": 0, "quantize": 0, "export": 1, "check": 1, "build": 2}.get(kind)
    parts = rest.split(":") if rest else []
    return names is not None and len(parts) == names and all(_NAME.fullmatch(n) for n in parts)


def recorded(state_dir: Path) -> dict[str, Path]:
    """The stage ids an earlier run recorded in ``state_dir`` and their state files (:func:`state_file` read back);
    a file that names no stage a run writes is not one of them."""
    files = sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []
    return {sid: p for p in files if well_formed(sid := p.stem.replace("__", ":"))}


def refuse_links(out: Path) -> None:
    """Refuse a run directory holding a symbolic link where the run writes or removes (its stage outputs, their
    partials, recipe.yaml, run.json, .state/ and the stage folders' entries): the run would write through it or
    remove what it points to, outside the directory. ``out`` itself may be a link (the user's choice of where the
    run goes), and so may a file of the user's beside the run's."""
    entries = [p for p in out.iterdir() if p.name in RUN_NAMES] if out.is_dir() else []
    for d in FOLDERS:
        if (out / d).is_dir() and not (out / d).is_symlink():
            entries += (out / d).iterdir()
    for p in entries:
        if p.is_symlink():
            raise MoepressError(f"-o {out}: {p.relative_to(out)} is a symbolic link (to {p.readlink()}); a run "
                                "writes and removes its own files there, not through links: remove it")


def claim_for_model(out: Path, state_dir: Path, model: Path, digest: dict) -> None:
    """Refuse a run directory an earlier run made of another model (``.state/model``: the resolved directory it ran
    on and its files' digest): one at another path with other files; the same model moved or copied, or edited
    where it was, is this model. Record this model there otherwise. The run replaces or removes every earlier
    stage output, so another model's run (hours of quantize) went with a mistyped ``-o``, where every stage
    command asks ``--force`` to replace a non-empty output."""
    p = state_dir / "model"
    this = {"path": str(model.resolve()), "sha256": stage_key(digest)}
    said = p if p.is_file() else out / "run.json"  # a run directory made before .state/model: its run.json's model
    try:
        earlier = json.loads(said.read_text()) if said.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        earlier = {}
    path = earlier.get("path" if said == p else "model") if isinstance(earlier, dict) else None
    # a relative path named the directory that run started in, unknown here
    if isinstance(path, str) and Path(path).is_absolute() and path != this["path"] and \
            earlier.get("sha256") != this["sha256"]:
        raise MoepressError(f"-o {out}: holds an earlier run of {path} ({said}), not of {this['path']}; expected a "
                            "new or empty directory, or an earlier run of the same model (remove that run to replace "
                            "it)")
    write_text_atomic(p, json.dumps(this) + "\n")


def planned(out: Path, recipe: dict, state_dir: Path) -> set[Path]:
    """The stage outputs ``recipe`` may write in ``out``; every recorded build, where it builds (their names are
    decided as it runs)."""
    keep = {out / s for s in ("prune", "quantize") if recipe[s] is not None}
    formats = list((recipe["export"] or {}).get("formats", ()))
    keep |= {out / "export" / f for f in formats}
    if recipe["check"] is not None:
        last = "quantized" if recipe["quantize"] is not None else "pruned" if recipe["prune"] is not None else None
        keep |= {out / "check" / n for n in [last, *formats] if n}
    if recipe["build"] is not None:
        keep |= {stage_path(out, sid) for sid in recorded(state_dir) if sid.startswith("build:")}
    return keep


def withdraw_stage(out: Path, sid: str, state_dir: Path) -> bool:
    """Remove stage ``sid``'s output, its ``.partial`` and lock and its state file (True: an output was there): an
    earlier run's output the recipe no longer produces (:func:`withdraw`), or a check whose candidate is about to be
    rewritten, whose verdict would otherwise stand beside bytes it never read (and after a kill there)."""
    p = stage_path(out, sid)
    gone = _remove(p)
    for s in SUFFIXES:
        _remove(p.with_name(p.name + s))
    state_file(state_dir, sid).unlink(missing_ok=True)
    return gone


def _remove(p: Path) -> bool:
    """``p`` gone (a symbolic link: the link, never what it points to); True if there was something."""
    if p.is_symlink() or p.is_file():
        p.unlink()
        return True
    if p.is_dir():
        shutil.rmtree(p)
        return True
    return False


def withdraw(out: Path, keep: set[Path], state_dir: Path, say=None) -> list[str]:
    """Remove each stage an earlier run recorded in ``state_dir`` whose output is not in ``keep``: its output, its
    ``.partial`` and lock, and its state file, each said through ``say``; returns the outputs removed, relative to
    ``out``."""
    gone = []
    for sid in recorded(state_dir):
        p = stage_path(out, sid)
        if p not in keep and withdraw_stage(out, sid, state_dir):
            gone.append(p.relative_to(out).as_posix())
    for parent in ("export", "check", "build"):  # a stage folder this left empty goes too (not a link to one)
        d = out / parent
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    for g in gone if say is not None else ():
        say(f"run: removed {g}, an earlier run's output this recipe does not produce")
    return gone

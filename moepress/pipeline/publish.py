"""`moepress publish`: copy (or upload) an artifact only if it is what its manifest says and passed its checks.

Nothing recorded is believed that can be recomputed: every listed file's sha256 and size is
computed again; the accuracy section's verdict is recomputed from its recorded metrics and gates,
its checked files' digests compared with the files now, and its seal verified with this user's
key when there is one (moepress/checks/verify.py, moepress/checks/seal.py). ``force`` publishes
anyway and says what it overrode; a destination that overlaps the artifact, or is a file, is
refused even then.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from moepress.checks import verify_section
from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, read_manifest, sha256_file
from moepress.outputs import OutputLock, absolute, install, is_cwd, overlap
from moepress.pipeline.card import card_differs


def _digests(artifact: Path, files: dict) -> tuple[dict[str, dict], list[str]]:
    """(sha256 and size now of every listed file present, problems: changed, missing or unlisted files)."""
    problems, now = [], {}
    for rel, info in sorted(files.items()):
        p = artifact / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:  # never read: a manifest names only its own files
            problems.append(f"{artifact / MANIFEST_NAME}: lists '{rel}', outside the artifact")
            continue
        if _linked(artifact, p):
            problems.append(f"{p}: a link; an artifact holds its own files, and publish copies no file a link "
                            "points to")
            continue
        if not p.is_file():
            problems.append(f"{p}: listed in the manifest but missing")
            continue
        now[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        if not isinstance(info, dict) or (now[rel]["size"], now[rel]["sha256"]) != (info.get("size"),
                                                                                   info.get("sha256")):
            problems.append(f"{p}: sha256 differs from the manifest (modified after it was written)")
    for p in sorted(artifact.rglob("*")):
        rel = p.relative_to(artifact).as_posix()
        if p.is_symlink() and rel not in files:
            problems.append(f"{p}: a link; an artifact holds its own files, and publish copies no file a link "
                            "points to")
        elif p.is_file() and p.name != MANIFEST_NAME and rel not in files:
            problems.append(f"{p}: not listed in the manifest")
    return now, problems


def _linked(artifact: Path, p: Path) -> bool:
    """Whether ``p`` or a folder between it and ``artifact`` is a symbolic link."""
    while p != artifact and p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def verify(artifact: Path) -> list[str]:
    """Problems with ``artifact`` against its manifest: changed, missing or unlisted files."""
    files = read_manifest(artifact).get("files")
    if not files or not isinstance(files, dict):
        return [f"{artifact / MANIFEST_NAME}: missing or lists no files"]
    return _digests(artifact, files)[1]


def _destination(src: Path, to: str) -> Path:
    """``--to`` as a directory that is new or empty and apart from the artifact, absolute (``--to .``: the
    current directory, its copy staged beside it) and a symbolic link at ``--to`` followed (the copy lands in
    the directory it names); its staging directory ``TO.partial`` must not be, hold or sit in the artifact."""
    dst = absolute(to)
    if dst.is_symlink():
        dst = dst.resolve()
    if dst.exists() and not dst.is_dir():
        raise MoepressError(f"--to {dst}: exists and is not a directory; expected a new or empty directory")
    how = overlap(dst, src)
    if how is not None:
        raise MoepressError(f"--to {dst}: the destination {how} the artifact {src}; expected a directory outside it")
    if dst.exists() and any(dst.iterdir()):
        raise MoepressError(f"--to {dst}: exists and is not empty")
    how = overlap(_staging(dst), src)
    if how is not None:
        raise MoepressError(f"--to {dst}: the copy is staged in {_staging(dst)}, which {how} the artifact {src}; "
                            "expected a destination whose .partial sibling is not the artifact")
    return dst


def _staging(dst: Path) -> Path:
    return dst.with_name(dst.name + ".partial")


def _problems(src: Path) -> tuple[list[str], dict]:
    """Every reason not to publish ``src`` (first the file problems), and what the result reports of its check."""
    m = read_manifest(src)
    files = m.get("files")
    if not files or not isinstance(files, dict):  # no finished artifact: refused even with --force
        raise MoepressError(f"{src / MANIFEST_NAME}: missing or lists no files; expected a finished moepress output "
                            "(--force publishes one whose check failed or whose files changed, not a partial or "
                            "foreign directory)")
    digests, problems = _digests(src, files)
    acc = m.get("accuracy")
    if not isinstance(acc, dict):
        problems.append(f"{src}: no accuracy check recorded in its manifest; run `moepress check {src} "
                        f"--reference ORIGINAL` first")
        return problems, {"accuracy_passed": None}
    v = verify_section(acc, digests, src)
    card = src / "README.md"
    stale = card_differs(card, acc) if card.is_file() else None
    return problems + v.problems + ([stale] if stale else []), {"accuracy_passed": v.passed, "seal": v.seal}


def publish(artifact: str | Path, to: str, force: bool = False) -> dict:
    src = Path(artifact)
    if not src.is_dir():
        raise MoepressError(f"{src}: no such artifact directory")
    dst = None if to.startswith("hf://") else _destination(src, to)
    problems, info = _problems(src)
    if problems and not force:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MoepressError(f"{problems[0]}{more}; refusing to publish (--force to publish anyway)")
    extra = {"verified": not problems, **info, **({"forced": problems} if problems else {})}
    if dst is None:
        return {**_upload_hf(src, to[len("hf://"):]), **extra}
    tmp = _staging(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoepressError(f"--to {dst}: cannot create its directory ({e.strerror or e})") from None
    # the lock every moepress writer of ``dst`` takes: a live writer's partial is never removed as stale
    lock = OutputLock(tmp.with_name(tmp.name + ".lock"), f"--to {dst}: {tmp} is being written by another process")
    lock.acquire()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(src, tmp, symlinks=True)  # --force: a link stays a link, its target is not copied
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MoepressError(f"--to {dst}: cannot copy the artifact ({e.strerror or e})") from None
        # the copy is checked against the manifest too before it gets its final name
        copy_problems = verify(tmp) if not problems else []
        if copy_problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MoepressError(f"{copy_problems[0]} (while copying)")
        _place(tmp, dst)
    finally:
        lock.release()
    return {"published": str(Path(to)), "files": len(read_manifest(dst).get("files", {})), **extra}


def _place(tmp: Path, dst: Path) -> None:
    """The verified copy ``tmp`` renamed to ``dst``, which must still be absent or an empty directory: what was
    put there while the artifact was copied is never replaced (rename(2) replaces only an empty directory, so
    the test and the rename leave no gap that would lose it); the current directory is filled in place."""
    try:
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise MoepressError(f"--to {dst}: no longer empty (written while the artifact was copied); nothing "
                                "published")
        if dst.exists() and is_cwd(dst):
            install(tmp, dst)
            return
        try:
            os.rename(tmp, dst)
        except OSError as e:  # ENOTEMPTY / EEXIST: filled between the test and the rename
            why = "written while the artifact was copied" if e.errno in (errno.ENOTEMPTY, errno.EEXIST) else \
                "a mount point or not writable?"
            raise MoepressError(f"--to {dst}: cannot take the copy ({e.strerror or e}: {why}); nothing "
                                "published") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload_hf(src: Path, repo: str) -> dict:
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise MoepressError(f"--to hf://{repo}: expected hf://ORG/NAME")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MoepressError("--to hf://...: huggingface_hub is not installed (pip install huggingface_hub)") from None
    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(src), commit_message=f"moepress publish {src.name}")
    except Exception as e:  # network, auth: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoepressError(f"--to hf://{repo}: upload failed ({first})") from None
    return {"published": f"hf://{repo}", "commit": str(getattr(info, "oid", info))}

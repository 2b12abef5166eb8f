"""`moepress publish`: copy (or upload) an artifact only if it is what its manifest says and passed its checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, read_manifest, sha256_file


def verify(artifact: Path) -> list[str]:
    """Problems with ``artifact`` against its manifest: changed, missing or unlisted files."""
    m = read_manifest(artifact)
    files = m.get("files")
    if not files:
        return [f"{artifact / MANIFEST_NAME}: missing or lists no files"]
    problems = []
    for rel, info in sorted(files.items()):
        p = artifact / rel
        if not p.is_file():
            problems.append(f"{p}: listed in the manifest but missing")
        elif p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest (modified after it was written)")
    for p in sorted(artifact.rglob("*")):
        rel = p.relative_to(artifact).as_posix()
        if p.is_file() and p.name != MANIFEST_NAME and rel not in files:
            problems.append(f"{p}: not listed in the manifest")
    return problems


def publish(artifact: str | Path, to: str, force: bool = False) -> dict:
    src = Path(artifact)
    if not src.is_dir():
        raise MoepressError(f"{src}: no such artifact directory")
    problems = verify(src)
    acc = read_manifest(src).get("accuracy")
    if not force:
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise MoepressError(f"{problems[0]}{more}; refusing to publish (--force to publish anyway)")
        if acc is None:
            raise MoepressError(f"{src}: no accuracy check recorded in its manifest; run `moepress check "
                                f"{src} --reference ORIGINAL` first (or --force)")
        if not acc.get("passed"):
            raise MoepressError(f"{src}: its accuracy check failed ({', '.join(acc.get('failed') or [])}); "
                                f"refusing to publish (--force to publish anyway)")
    if to.startswith("hf://"):
        return _upload_hf(src, to[len("hf://"):], problems)
    dst = Path(to)
    if dst.exists() and any(dst.iterdir()):
        raise MoepressError(f"--to {dst}: exists and is not empty")
    tmp = dst.parent / (dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    # the copy is checked against the manifest too before it gets its final name
    copy_problems = verify(tmp) if not problems else []
    if copy_problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoepressError(f"{copy_problems[0]} (while copying)")
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return {"published": str(dst), "files": len(read_manifest(dst).get("files", {})),
            "verified": not problems, "accuracy_passed": (acc or {}).get("passed")}


def _upload_hf(src: Path, repo: str, problems: list[str]) -> dict:
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
    return {"published": f"hf://{repo}", "commit": str(getattr(info, "oid", info)), "verified": not problems}

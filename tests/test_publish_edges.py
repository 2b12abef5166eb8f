"""`moepress publish` (moepress/pipeline/publish.py) at its edges, on hand-made artifact directories and the
CLI's exit code, one-line message and --json result: properties no other test pinned (a mutation audit
planted each bug and the suite passed). No stage runs: each test takes milliseconds."""

import json
import os
import shutil
import sys
import types

from helpers import assert_one_line_error as _one_line
from moepress.manifest import MANIFEST_NAME, file_digests, write_manifest


def _artifact(tmp_path, files=None):
    """A directory with its manifest (every file's sha256 and size, as the stages write it) and no check."""
    art = tmp_path / "art"
    (art / "sub").mkdir(parents=True)
    for rel, data in (files or {"config.json": b"{}", "sub/model.onnx": b"onnx", "w.bin": b"x" * 10}).items():
        (art / rel).write_bytes(data)
    write_manifest(art, {"files": file_digests(art)})
    return art


def _manifest(art):
    return json.loads((art / MANIFEST_NAME).read_text())


def test_publish_refuses_an_unchecked_artifact_and_force_says_what_it_overrode(tmp_path, cli_run):
    art = _artifact(tmp_path)
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), "no accuracy check recorded",
              f"moepress check {art} --reference")
    assert not (tmp_path / "pub").exists()
    r = cli_run("publish", art, "--to", tmp_path / "pub", "--force", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["verified"] is False and res["accuracy_passed"] is None
    assert len(res["forced"]) == 1 and "no accuracy check recorded" in res["forced"][0]
    # the files the manifest lists, each copied as it is
    assert res["files"] == len(_manifest(art)["files"]) == 3
    for rel in _manifest(art)["files"]:
        assert (tmp_path / "pub" / rel).read_bytes() == (art / rel).read_bytes(), rel


def test_publish_checks_files_in_subdirectories_by_their_path(tmp_path, cli_run):
    """An unlisted file in a subdirectory is refused, also when a listed top-level file has its name; the
    message names the first problem and counts the others."""
    art = _artifact(tmp_path)
    (art / "sub" / "config.json").write_text("{}")
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), f"{art / 'sub' / 'config.json'}: not listed",
              "(and 1 more)")  # and: no accuracy check recorded
    (art / "sub" / "config.json").unlink()
    (art / "sub" / "model.onnx").write_bytes(b"ONNX")  # same size, other bytes
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), f"{art / 'sub' / 'model.onnx'}: sha256 differs")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_refuses_a_manifest_whose_size_disagrees(tmp_path, cli_run):
    art = _artifact(tmp_path)
    m = _manifest(art)
    m["files"]["w.bin"]["size"] += 1  # the sha256 still matches the file
    (art / MANIFEST_NAME).write_text(json.dumps(m))
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), f"{art / 'w.bin'}: sha256 differs")


def test_publish_refuses_a_manifest_listing_no_files_and_a_missing_artifact(tmp_path, cli_run):
    art = _artifact(tmp_path)
    (art / MANIFEST_NAME).write_text(json.dumps({"files": {}}))
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub"), f"{art / MANIFEST_NAME}: missing or lists no files")
    _one_line(cli_run("publish", tmp_path / "nope", "--to", tmp_path / "pub"), "nope: no such artifact directory")
    assert not (tmp_path / "pub").exists()


def test_force_does_not_publish_a_directory_with_no_manifest(tmp_path, cli_run):
    """--force published an interrupted quantize's OUT.partial (shards and a writer journal, no config, no manifest)
    and exited 0: it overrides a failed check or changed files, not the absence of a finished artifact."""
    art = _artifact(tmp_path)
    (art / MANIFEST_NAME).unlink()
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub", "--force"),
              f"{art / MANIFEST_NAME}: missing or lists no files; expected a finished moepress output")
    assert not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()


def test_publish_replaces_a_partial_copy_left_by_a_killed_publish(tmp_path, cli_run):
    art = _artifact(tmp_path)
    (tmp_path / "pub.partial").mkdir()
    (tmp_path / "pub.partial" / "stale.bin").write_bytes(b"old")
    r = cli_run("publish", art, "--to", tmp_path / "pub", "--force")
    assert r.exit_code == 0, r.output
    assert sorted(p.relative_to(tmp_path / "pub").as_posix() for p in (tmp_path / "pub").rglob("*") if p.is_file()) \
        == sorted([*_manifest(art)["files"], MANIFEST_NAME])
    assert not (tmp_path / "pub.partial").exists()


def test_publish_into_a_non_empty_directory_is_refused_before_copying(tmp_path, cli_run):
    art = _artifact(tmp_path)
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "mine.txt").write_text("keep")
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub", "--force"),
              f"--to {tmp_path / 'pub'}: exists and is not empty")
    assert [p.name for p in (tmp_path / "pub").iterdir()] == ["mine.txt"] and not (tmp_path / "pub.partial").exists()


class _FakeHub:
    """huggingface_hub.HfApi's two calls publish makes, recorded (no network)."""
    calls: list = []

    def create_repo(self, repo, exist_ok=False):
        self.calls.append(("create_repo", repo, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message):
        self.calls.append(("upload_folder", repo_id, folder_path))
        return types.SimpleNamespace(oid="abc123")


def test_publish_to_the_hub_uploads_the_folder_and_refuses_a_bad_repo(tmp_path, cli_run, monkeypatch):
    art = _artifact(tmp_path)
    _FakeHub.calls = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=_FakeHub))
    monkeypatch.chdir(tmp_path)
    r = cli_run("publish", art, "--to", "hf://org/name", "--force", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["published"] == "hf://org/name" and res["commit"] == "abc123" and res["verified"] is False
    assert _FakeHub.calls == [("create_repo", "org/name", True), ("upload_folder", "org/name", str(art))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # nothing written locally
    _FakeHub.calls = []
    for bad in ("hf://name", "hf://org/", "hf://a/b/c"):
        _one_line(cli_run("publish", art, "--to", bad, "--force"), f"--to {bad}: expected hf://ORG/NAME")
    assert _FakeHub.calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_publish_never_removes_an_artifact_that_sits_where_its_copy_is_staged(tmp_path, cli_run):
    """The copy is staged in ``TO.partial``; an artifact at that path (``publish X.partial --to X``) was removed
    as a stale partial before the copy started, and the publish then failed with nothing left."""
    art = _artifact(tmp_path)
    staged = art.rename(tmp_path / "pub.partial")
    before = {p.name for p in staged.iterdir()}
    r = cli_run("publish", staged, "--to", tmp_path / "pub", "--force")
    assert staged.is_dir() and {p.name for p in staged.iterdir()} == before, r.output
    if r.exit_code == 0:
        assert sorted(p.name for p in (tmp_path / "pub").iterdir()) == sorted(before)
    else:
        _one_line(r, "--to")


def test_publish_into_the_current_directory_and_through_a_symlink(tmp_path, cli_run, monkeypatch):
    """``--to .`` (an empty current directory) and ``--to LINK`` (a symbolic link to an empty directory) are new or
    empty directories: the copy lands there, with no ``.partial`` copy left inside or beside them."""
    art = _artifact(tmp_path)
    listed = sorted([*_manifest(art)["files"], MANIFEST_NAME])

    def tree(d):
        return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    r = cli_run("publish", art, "--to", ".", "--force")
    assert r.exit_code == 0, r.output
    assert tree(here) == listed
    # filled in place: the process's current directory is still `here` (a directory renamed over it would leave
    # the shell in a removed one, which lists nothing)
    assert os.path.samefile(os.getcwd(), here) and sorted(os.listdir(".")) == sorted(p.name for p in here.iterdir())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    r = cli_run("publish", art, "--to", tmp_path / "link", "--force")
    assert r.exit_code == 0, r.output
    assert tree(tmp_path / "link") == listed and not (tmp_path / "link.partial").exists()
    # the copy is in the directory the link names, the link left a link (not replaced by a directory)
    assert (tmp_path / "link").is_symlink() and tree(tmp_path / "target") == listed


def test_publish_refuses_a_manifest_that_is_not_a_json_object_in_one_line(tmp_path, cli_run):
    """A hand-edited or truncated moepress-manifest.json is bad input (exit 2, one line naming it), not a
    traceback and exit 1 (which says an accuracy check failed)."""
    art = _artifact(tmp_path)
    text = (art / MANIFEST_NAME).read_text()
    for bad in (text[:-5].encode(), b"[]", b"null", b"\xff\xfe{}"):  # the last: not UTF-8
        (art / MANIFEST_NAME).write_bytes(bad)
        _one_line(cli_run("publish", art, "--to", tmp_path / "pub", "--force"), str(art / MANIFEST_NAME))
    assert not (tmp_path / "pub").exists()


def test_publish_refuses_while_another_process_writes_the_destination(tmp_path, cli_run):
    """Every moepress writer of OUT holds OUT.partial.lock (DEVELOPING.md); a publish --to OUT meanwhile is refused
    in one line and leaves that writer's OUT.partial as it is (it was removed as a stale partial)."""
    from moepress.outputs import OutputLock

    art = _artifact(tmp_path)
    (tmp_path / "pub.partial").mkdir()
    (tmp_path / "pub.partial" / "model-00001-of-00002.safetensors").write_bytes(b"being written")
    lock = OutputLock(tmp_path / "pub.partial.lock", "busy")
    lock.acquire()  # flock: held against any other open of the file, this process's included
    try:
        _one_line(cli_run("publish", art, "--to", tmp_path / "pub", "--force"), f"--to {tmp_path / 'pub'}",
                  "another process")
    finally:
        lock.release()
    assert [p.name for p in (tmp_path / "pub.partial").iterdir()] == ["model-00001-of-00002.safetensors"]
    assert not (tmp_path / "pub").exists()


def test_publish_whose_copy_fails_leaves_no_partial_copy(tmp_path, cli_run, monkeypatch):
    """The disk fills up during the copy: one line naming --to, and neither TO nor a half-written TO.partial."""
    art = _artifact(tmp_path)
    real, done = shutil.copyfile, []

    def full(src, dst, *a, **k):
        if done:
            raise OSError(28, "No space left on device")
        done.append(dst)
        return real(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", full)
    _one_line(cli_run("publish", art, "--to", tmp_path / "pub", "--force"), f"--to {tmp_path / 'pub'}",
              "No space left on device")
    assert done and not (tmp_path / "pub").exists() and not (tmp_path / "pub.partial").exists()

"""What `moepress publish` must not take on trust: files changed while their check ran, a check against another
model than the candidate was made from, a destination filled while the copy ran, a key others could swap, a
malformed section (one line, not a traceback). End-to-end publish refusals: tests/test_faults.py."""

import os

import pytest

from moepress.checks import prepare_record, record_in_manifest
from moepress.checks import seal as sealing
from moepress.checks.verify import verify_section
from moepress.errors import MoepressError
from moepress.manifest import file_digests, write_manifest
from moepress.pipeline.publish import _place


@pytest.fixture
def key(tmp_path, monkeypatch):
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    monkeypatch.setenv(sealing.KEY_ENV, str(d / "manifest.key"))
    return sealing.load_key(create=True)


def _artifact(d):
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 64)
    write_manifest(d, {"files": file_digests(d, None)})
    return d


@pytest.mark.parametrize("how", ["rewritten", "replaced", "added"])
def test_files_changed_while_the_check_ran_are_not_sealed(tmp_path, key, how):
    """A check hashed the files after it ran: an artifact replaced meanwhile (`export -o X --force`) got the seal of
    bytes nobody measured, and publish took it."""
    art = _artifact(tmp_path / "a")
    before = prepare_record(art)
    if how == "rewritten":
        (art / "model.safetensors").write_bytes(b"y" * 64)
    elif how == "replaced":
        os.replace(art, tmp_path / "old")
        _artifact(art)
    else:
        (art / "extra.safetensors").write_bytes(b"z")
        write_manifest(art, {"files": file_digests(art, None)})
    with pytest.raises(MoepressError, match="changed while the check ran"):
        record_in_manifest(art, {}, before)
    assert "accuracy" not in __import__("json").loads((art / "moepress-manifest.json").read_text())


def _section(key, **over):
    acc = {"passed": True, "failed": [], "reference": "/m", "data": {}, "metrics": {"kl_mean": 0.01},
           "gates": [{"metric": "kl_mean", "value": 0.01, "op": "<=", "threshold": 0.05, "passed": True}],
           "files": {}, **over}
    acc["seal"] = sealing.seal(acc, key)
    return acc


def test_a_check_against_another_model_than_the_origin_is_refused(tmp_path, key):
    acc = _section(key, data={"made_from": "/models/original"})
    v = verify_section(acc, {}, tmp_path)
    assert any("not with /models/original, the model it was made from" in p for p in v.problems), v.problems


@pytest.mark.parametrize("mac", ["é" * 64, "ABC", 7])
def test_a_malformed_mac_is_a_problem_not_a_traceback(tmp_path, key, mac):
    acc = _section(key)
    acc["seal"]["mac"] = mac
    v = verify_section(acc, {}, tmp_path)
    assert v.seal == "does not match" and v.problems


def test_gates_not_a_list_is_a_problem_not_a_traceback(tmp_path, key):
    acc = _section(key, gates=5)
    v = verify_section(acc, {}, tmp_path)
    assert any("expected a list of gates" in p for p in v.problems), v.problems


def test_without_the_key_publish_cannot_verify_and_says_so_last(tmp_path, monkeypatch, key):
    acc = _section(key)
    monkeypatch.setenv(sealing.KEY_ENV, str(tmp_path / "elsewhere.key"))
    v = verify_section(acc, {}, tmp_path)
    assert v.seal.startswith("not verified") and "cannot verify the accuracy section's seal" in v.problems[-1]


def test_a_key_in_a_directory_others_may_write_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    monkeypatch.setenv(sealing.KEY_ENV, str(d / "k"))
    with pytest.raises(MoepressError, match="others may write the directory"):
        sealing.load_key(create=True)


def test_a_destination_filled_while_copying_is_kept_not_replaced(tmp_path):
    """publish checked --to before hashing and copying (minutes to hours), then moved whatever was there aside and
    deleted it: a file written there meanwhile was lost."""
    tmp, dst = tmp_path / "d.partial", tmp_path / "d"
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    dst.mkdir()
    (dst / "user_file.txt").write_text("mine")
    with pytest.raises(MoepressError, match="no longer empty"):
        _place(tmp, dst)
    assert (dst / "user_file.txt").read_text() == "mine" and not tmp.exists()
    os.remove(dst / "user_file.txt")
    tmp.mkdir()
    (tmp / "config.json").write_text("{}")
    _place(tmp, dst)  # an empty one takes the copy
    assert (dst / "config.json").is_file() and not tmp.exists()


def test_a_refused_record_still_reports_the_check(cli_run, tmp_path, monkeypatch):
    """A record refused (files changed while the check ran) keeps the whole check's figures: the report and the
    --json result are written, and the refusal is the exit code and the last line; stdout holds one JSON document,
    the result with the refusal's ``error`` and ``exit``."""
    import json

    import moepress.checks.report as report

    monkeypatch.setenv(sealing.KEY_ENV, str(tmp_path / "keys" / "k"))
    (tmp_path / "keys").mkdir(mode=0o700)
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q, "--quiet").exit_code == 0
    real = report._identity
    calls = []

    def changing(d):  # the second snapshot (after the check) differs, as a rewritten shard's would
        calls.append(d)
        out = real(d)
        return out if len(calls) == 1 else {**out, "model.safetensors": (0, 0)}

    monkeypatch.setattr(report, "_identity", changing)
    r = cli_run("check", q, "--reference", "tiny-qwen3-moe", "--max-samples", "2", "--seq-len", "32", "--json",
                "--report", tmp_path / "rep")
    assert r.exit_code == 2 and "changed while the check ran" in r.stderr, r.output
    res = json.loads(r.stdout)  # one document: the result, carrying the refusal and the exit code
    assert res["manifest_updated"] is False and "changed while the check ran" in res["manifest_refused"]
    assert res["exit"] == 2 and "changed while the check ran" in res["error"]
    assert (tmp_path / "rep" / "report.md").is_file()
    assert "accuracy" not in json.loads((q / "moepress-manifest.json").read_text())


def test_null_for_a_list_or_mapping_key_is_its_empty_default(tmp_path):
    """``rules:`` with every entry commented out reads as null: the empty mapping, not a refusal."""
    from moepress.pipeline.recipe import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("model: tiny-qwen3-moe\nquantize:\n  format: fp8\n  rules:\n    # 'self_attn.*': none\n"
                 "export:\n  formats: [hf-modelopt]\n  options:\n")
    r, _ = load_recipe(p)
    assert r["quantize"]["rules"] == {} and r["export"]["options"] == {}

"""The accuracy section's seal (``moepress/checks/seal.py``): an edit that stays self-consistent (a threshold
raised with its gate's verdict, a checked file's digest replaced) is caught by the seal alone, not by the
recomputed gates; the oracle is the documented MAC, computed here with hmac / hashlib. A key others can read
is refused; so is one shorter than 32 characters."""

import copy
import hashlib
import hmac
import json
import os

import pytest

from moepress.checks import seal as sealing
from moepress.checks.verify import verify_section
from moepress.errors import MoepressError


def _section():
    d = {"sha256": "1" * 64, "size": 10}
    return {"passed": True, "failed": [], "metrics": {"kl_mean": 0.04, "top1_agreement": 0.95},
            "gates": [{"metric": "kl_mean", "value": 0.04, "op": "<=", "threshold": 0.05, "passed": True},
                      {"metric": "top1_agreement", "value": 0.95, "op": ">=", "threshold": 0.9, "passed": True}],
            "files": {"model.safetensors": d}}


def _documented_mac(section, key):
    body = {k: v for k, v in section.items() if k != "seal"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hmac.new(key, blob, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("edit", ["threshold", "metric", "gate_removed", "file_digest"])
def test_a_self_consistent_edit_of_a_sealed_section_is_refused(tmp_path, monkeypatch, edit):
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "k" / "manifest.key"))
    key = sealing.load_key(create=True)
    acc = _section()
    acc["seal"] = sealing.seal(acc, key)
    assert acc["seal"]["mac"] == _documented_mac(acc, key)  # the MAC is the documented one
    digests = {"model.safetensors": dict(acc["files"]["model.safetensors"])}
    v = verify_section(json.loads(json.dumps(acc)), digests, tmp_path)
    assert v.seal == "verified" and not v.problems and v.passed is True

    bad = copy.deepcopy(acc)
    if edit == "threshold":  # gate still passes, verdict still consistent: only the seal tells
        bad["gates"][0]["threshold"] = 10.0
    elif edit == "metric":
        bad["metrics"]["kl_mean"] = bad["gates"][0]["value"] = 0.01
    elif edit == "gate_removed":  # a failing gate dropped: the rest still pass, consistently
        bad["metrics"]["kl_mean"] = 0.2
        del bad["gates"][0]
    else:  # the shard replaced and its digest updated in both the manifest and the section
        bad["files"]["model.safetensors"] = {"sha256": "2" * 64, "size": 10}
        digests = {"model.safetensors": dict(bad["files"]["model.safetensors"])}
    assert sealing.check_seal(bad, key) == "accuracy section edited after the check (its seal does not match)"
    v = verify_section(bad, digests, tmp_path)
    assert v.seal == "does not match" and any("seal does not match" in p for p in v.problems)


def test_a_key_others_can_read_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "manifest.key"
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(p))
    sealing.load_key(create=True)
    assert p.stat().st_mode & 0o777 == 0o600
    for mode in (0o640, 0o620, 0o604):
        os.chmod(p, mode)
        with pytest.raises(MoepressError, match="read or written by others"):
            sealing.load_key()


def test_a_key_shorter_than_32_characters_is_refused_and_one_of_32_is_used(tmp_path, monkeypatch):
    p = tmp_path / "manifest.key"
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(p))
    p.write_text("x" * 31 + "\n")
    os.chmod(p, 0o600)
    with pytest.raises(MoepressError, match="at least 32 ASCII characters"):
        sealing.load_key()
    p.write_text("y" * 32 + "\n")
    assert sealing.load_key() == b"y" * 32


def test_a_key_of_raw_bytes_is_refused_saying_what_a_key_is(tmp_path, monkeypatch):
    """`head -c 64 /dev/urandom > KEY` was refused as "cannot read the manifest key ('ascii' codec can't decode
    ...)": a key file is text, which the line now says."""
    p = tmp_path / "manifest.key"
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(p))
    p.write_bytes(bytes(range(128, 192)))
    os.chmod(p, 0o600)
    with pytest.raises(MoepressError, match="not a manifest key \\(not ASCII text\\); expected at least 32 ASCII"):
        sealing.load_key()

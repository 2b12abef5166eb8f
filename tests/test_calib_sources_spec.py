"""``--calib`` values parsed, their documents read and their contents hashed (``calib/sources/``), against
the files written and hashlib: a path holding ',' is a path, ``weight=`` is the weight, options that apply to
no such source are refused, a bare ``owner/name.jsonl`` that is missing is a missing file, hidden folders
are not read nor hashed, a Hub dataset at a moving revision has no content hash, JSON arrays and both-field
records, and HF_DATASETS_OFFLINE alone counts as offline."""

import hashlib
import json
import re

import pytest

from moepress.calib.sources import (
    JsonlDocuments,
    TextDocuments,
    content_hash,
    open_documents,
    parse_source,
    parse_sources,
)
from moepress.calib.sources.hub import _hub_reachable
from moepress.errors import MoepressError


def test_a_path_holding_a_comma_and_an_at_sign_is_that_path(tmp_path):
    p = tmp_path / "a,b@2.txt"
    p.write_text("hello")
    s = parse_source(str(p))
    assert (s.location, s.type, s.weight) == (str(p), "text", 1.0)


def test_weight_option_sets_the_weight(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    assert parse_source(f"{tmp_path / 'd.txt'},weight=2.5").weight == 2.5
    assert parse_source(f"{tmp_path / 'd.txt'}@3").weight == 3.0


@pytest.mark.parametrize("opts,needle", [
    (",config=en", "config= applies to Hub datasets only"),
    (",revision=main", "revision= applies to Hub datasets only"),
])
def test_hub_options_on_a_local_file_are_refused(tmp_path, opts, needle):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(MoepressError, match=needle):
        parse_source(f"{tmp_path / 'd.txt'}{opts}")


def test_field_on_a_token_file_and_a_folder_as_jsonl_are_refused(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"x")
    with pytest.raises(MoepressError, match="field= applies to JSON lines, Parquet and datasets, not a tokens file"):
        parse_source(f"{tmp_path / 't.safetensors'},field=text")
    (tmp_path / "dir").mkdir()
    with pytest.raises(MoepressError, match="type jsonl needs a file, got a folder"):
        parse_source(f"{tmp_path / 'dir'},type=jsonl")


@pytest.mark.parametrize("opts,needle", [
    # taken silently: the last value won, or the key was ignored (config= on a text file was refused)
    (",weight=0.5,weight=2", "weight= given twice ('0.5', '2'); expected one value"),
    ("@2,weight=3", "weight given twice (@2, weight=3); expected one value"),
    (",field=body", "field= applies to JSON lines, Parquet and datasets, not a text file"),
    (",split=train", "split= applies to saved and Hub datasets only"),
])
def test_an_option_given_twice_or_applying_to_no_such_source_is_refused(tmp_path, opts, needle):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(MoepressError, match=re.escape(needle)):
        parse_source(f"{tmp_path / 'd.txt'}{opts}")
    assert parse_source(f"{tmp_path / 'd.txt'},weight=2,weight=2").weight == 2.0  # the same value again is taken


def test_a_source_named_twice_is_refused(tmp_path):
    """Its samples were drawn twice, overlapping (7 distinct of 8); the weight sets a source's share."""
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(MoepressError, match="the same source as --calib"):
        parse_sources([f"{tmp_path / 'd.txt'}@0.5", f"{tmp_path / 'd.txt'}@0.5"])
    assert len(parse_sources([str(tmp_path / "d.txt"), f"{tmp_path / 'd.txt'},mode=truncate"])) == 2


def test_a_bad_jsonl_line_is_refused_whichever_lines_a_seed_samples(tmp_path):
    """Lines were parsed when sampled: a malformed line 600 of 659 passed seeds 0-19 and stopped seed 20."""
    for name, bad, needle in [("syntax", '{"text": "oops",,}', ":600: not a JSON object"),
                              ("key", '{"body": "x"}', ":600: no field 'text' (fields: body)"),
                              ("type", '{"text": 42}', ":600: field 'text' is a int")]:
        lines = [json.dumps({"text": f"line {i}"}) for i in range(659)]
        lines[599] = bad
        p = tmp_path / f"{name}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        with pytest.raises(MoepressError, match=re.escape(str(p) + needle)):
            JsonlDocuments(parse_source(str(p)))


def test_a_missing_owner_slash_file_with_a_known_suffix_is_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoepressError, match="no such file or directory"):
        parse_source("data/train.jsonl")
    assert parse_source("allenai/c4").type == "hub"  # no suffix: a Hub dataset name


def test_hidden_folders_are_not_read_nor_hashed(tmp_path):
    (tmp_path / "a.txt").write_text("visible")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden")
    src = parse_source(str(tmp_path))
    assert [str(f) for f in TextDocuments(src).files] == [str(tmp_path / "a.txt")]
    h = content_hash(src)
    (tmp_path / ".git" / "notes.txt").write_text("hidden, edited")
    assert content_hash(src) == h
    # the oracle: the file's name and hashlib's digest of its bytes, nothing else
    want = hashlib.sha256(f"a.txt\0{hashlib.sha256(b'visible').hexdigest()}\0".encode()).hexdigest()
    assert h == want


def test_a_hub_dataset_has_a_content_hash_only_at_a_commit():
    assert content_hash(parse_source("hf:owner/data,revision=main")) is None
    assert content_hash(parse_source("hf:owner/data")) is None
    pinned = parse_source("hf:owner/data,revision=" + "a" * 40)
    assert content_hash(pinned) == hashlib.sha256(f"hub:owner/data:None:{'a' * 40}".encode()).hexdigest()


def test_a_json_array_is_refused_as_such(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    with pytest.raises(MoepressError, match="a JSON array; expected JSON lines"):
        open_documents(parse_source(str(p)))


def test_text_is_picked_before_messages(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "text": "plain"}) + "\n")
    docs = JsonlDocuments(parse_source(str(p)))
    assert docs.field == "text" and docs[0] == "plain"


def test_hf_datasets_offline_alone_is_offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert "offline mode is set" in (_hub_reachable() or "")

"""Calibration sources (calib/sources/): which documents a source yields and which --calib values are
refused, against the files and datasets written here (the expected documents are the ones written, in
order), so that calibration data never differs silently from what the user named."""

from __future__ import annotations

import json

import pytest

from moepress.calib.sources import JsonlDocuments, TextDocuments, open_documents, parse_source, parse_sources
from moepress.errors import MoepressError


def test_one_jsonl_file_read_through_two_fields_is_two_sources(tmp_path):
    """Different fields of one file are different documents: not 'the same source' twice."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    got = parse_sources([f"{p},field=prompt", f"{p},field=answer"])
    assert [s.field for s in got] == ["prompt", "answer"]
    with pytest.raises(MoepressError, match="the same source as --calib"):
        parse_sources([f"{p},field=prompt", f"{p}@2,field=prompt"])


def test_blank_lines_in_jsonl_do_not_shift_the_documents(tmp_path):
    p = tmp_path / "d.jsonl"
    texts = ["alpha", "beta", "gamma", "delta"]
    p.write_text("\n\n".join(json.dumps({"text": t}) for t in texts) + "\n\n  \n")
    docs = JsonlDocuments(parse_source(str(p)))
    assert len(docs) == 4 and [docs[i] for i in range(4)] == texts
    assert docs.where(2) == f"{p}:5"  # line 5 of the file (1-based), as an editor counts it


@pytest.mark.parametrize("second,what", [([{"text": "no role"}], "element 0 has no role key"),
                                         ([{"role": "user", "content": "a"}, {"role": "user"}],
                                          "element 1 has no content key"),
                                         ([1], "element 0 is a int")])
def test_chat_messages_without_role_or_content_are_refused(tmp_path, second, what):
    """Naming the element and what it lacks: the message said the field "is a list", which it is."""
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                 + json.dumps({"messages": second}) + "\n")
    with pytest.raises(MoepressError, match=rf":2: field 'messages' {what}; expected text or chat messages"):
        JsonlDocuments(parse_source(str(p)))


def test_a_whitespace_only_text_file_is_refused(tmp_path):
    p = tmp_path / "blank.txt"
    p.write_text("  \n\t\n")
    with pytest.raises(MoepressError, match="empty file"):
        TextDocuments(parse_source(str(p)))[0]


def test_a_dataset_dict_without_train_and_no_split_named_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
                          "validation": datasets.Dataset.from_dict({"text": ["v0"]})}).save_to_disk(str(d))
    with pytest.raises(MoepressError, match="pick a split with ,split=NAME"):
        open_documents(parse_source(str(d)))
    docs = open_documents(parse_source(f"{d},split=validation"))
    assert len(docs) == 1 and docs[0] == "v0"


def test_a_relative_path_is_located_absolutely_and_is_the_same_source_as_its_absolute_path(tmp_path, monkeypatch):
    """SourceSpec.location is 'absolute path, or the Hub dataset name' (calib/sources/spec.py)."""
    (tmp_path / "d.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    assert parse_source("d.txt").location == str((tmp_path / "d.txt").resolve())
    with pytest.raises(MoepressError, match="the same source as --calib"):
        parse_sources(["d.txt", str(tmp_path / "d.txt")])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_split_on_a_jsonl_or_parquet_file_is_refused_not_ignored(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    p.write_text("")
    with pytest.raises(MoepressError, match="split= applies to saved and Hub datasets only"):
        parse_source(f"{p},split=test")

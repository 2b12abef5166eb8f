"""A source of one document longer than LONG_CHARS is tokenized by parts; pack reads as many of its parts as the
samples need ("a source of one document gives random windows of it whole", calib/data.py's docstring), so a
3000-token document in ten parts gives 8 samples of 128 tokens, not a refusal after two parts (600 tokens)."""

from __future__ import annotations

import random

from test_calib_pack_spread import MODEL, _jsonl, _samples, words  # noqa: F401  (words: a module fixture)

from moepress.calib import sampling
from moepress.calib.tokenizer import load_tokenizer


def test_one_document_of_many_parts_fills_samples_that_need_several_of_its_parts(tmp_path, words, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sampling, "LONG_CHARS", 1500)  # parts of ~1500 characters, ~300 tokens
    rng = random.Random(0)
    short = [i for i in words if len(words[i]) == 4]
    text = "".join(" " + words[i] for i in rng.choices(short, k=3000))
    tok = load_tokenizer(MODEL)
    doc = tok(text, add_special_tokens=False)["input_ids"]
    assert len(doc) == 3000 and len(text) > 8 * 1500  # one token a word; ten parts or so
    path = _jsonl(tmp_path / "one.jsonl", [text])
    rows = _samples(path, 0, 8, 128).tolist()  # 1024 tokens: more than three parts' worth
    assert len(rows) == 8 and all(len(r) == 128 for r in rows)
    assert len({tuple(r) for r in rows}) == 8  # eight different windows
    # all of them the document's text (a part's first word may lose its leading space: parts are tokenized apart)
    assert all(tok.eos_token_id not in r for r in rows)

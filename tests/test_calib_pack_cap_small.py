"""Below 16 samples, pack caps a document at one sample's worth (README, --calib help: "one document giving at
most 1/16 of the tokens (one sample's worth below 16 samples)"), not at 1/16 of a set that small: 4 samples of 64
tokens from 40 long documents come from about 4 documents, each giving a whole window's worth.

Each document is one word repeated (one token each time), so the tokenizer says where every sample token came
from (the helpers of tests/test_calib_pack_spread.py)."""

from __future__ import annotations

from collections import Counter

from test_calib_pack_spread import _jsonl, _samples, words  # noqa: F401  (words: a module fixture)


def test_pack_below_16_samples_takes_one_samples_worth_from_each_document(tmp_path, words):  # noqa: F811
    n, seq = 4, 64  # need 256 tokens; 1/16 of it (16) is below one sample: the cap is seq, 64
    ids = list(words)[:40]
    path = _jsonl(tmp_path / "books.jsonl", [(" " + words[i]) * 3000 for i in ids])
    per_doc = Counter(t for t in _samples(path, 0, n, seq).flatten().tolist() if t in words)
    # 64 + EOS + 64 + EOS + 64 + EOS + 61 = 256: four documents, three of them a full sample's worth
    assert len(per_doc) <= n and max(per_doc.values()) == seq, per_doc

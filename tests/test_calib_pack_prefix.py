"""pack tokenizes a long document from a prefix of its text (PREFIX_CHARS characters a token of the cap, cut after
a space) and trusts only the prefix's tokens up to CUT_MARGIN before its end: the last ones may be split at the cut
(a trailing " " where the whole text has " Message"). When the cap doubles (a source of few long documents), a
document's tokens must still be those of its text tokenized whole.

8 documents of one 7-letter word repeated (" Message": one token, 8 characters), 16 samples of 64: the cap is 64,
its prefix 1024 characters, cut after the space at 1016: 127 words and a lone " ". 8 x 65 tokens do not fill 1024,
so the cap doubles to 128 and each document gives its first 128 tokens: 128 of its word."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from moepress import models
from moepress.calib.data import calibration_batches
from moepress.calib.sources import BUNDLED_CALIB
from moepress.calib.tokenizer import load_tokenizer

MODEL = models.resolve("tiny-mixtral")


def test_a_doubled_cap_takes_a_documents_own_tokens_not_a_prefix_cut_mid_text(tmp_path):
    tok = load_tokenizer(MODEL)
    words = {}
    for w in sorted({w.strip(".,;:!?\"'()") for w in Path(BUNDLED_CALIB).read_text().split()}):
        if w.isalpha() and len(w) == 7:
            ids = tok((" " + w) * 5, add_special_tokens=False)["input_ids"]
            if len(set(ids)) == 1 and len(ids) == 5:
                words[ids[0]] = w
        if len(words) == 8:
            break
    assert len(words) == 8
    path = tmp_path / "eight.jsonl"
    path.write_text("".join(json.dumps({"text": (" " + w) * 3000}) + "\n" for w in words.values()))
    rows = calibration_batches(MODEL, (str(path),), 16, 64, 0, cache=False)
    counts = Counter(t for b in rows for t in b.flatten().tolist())
    strays = {t: c for t, c in counts.items() if t not in words and t != tok.eos_token_id}
    assert not strays, strays  # every token is a document's word (or the EOS after one)
    assert sum(counts[t] for t in words) == 1024 - 7  # 7 EOS between the 8 documents

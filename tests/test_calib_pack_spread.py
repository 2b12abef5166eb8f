"""mode=pack spreads a calibration set over documents: one document gives at most 1/PACK_DOCS of the tokens
(doubled until the source fills the set), so a corpus of long documents is not calibrated on the one or two drawn
first; a source of one document still gives random windows of all of it.

Each document is made of one word repeated (a word that the tokenizer encodes as one token, the same token every
time), so the tokenizer itself says which document every sample token came from."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from moepress import models
from moepress.calib.data import calibration_batches
from moepress.calib.sampling import PACK_DOCS
from moepress.calib.sources import BUNDLED_CALIB
from moepress.calib.tokenizer import load_tokenizer

MODEL = models.resolve("tiny-mixtral")
N, SEQ = 16, 64  # 1024 tokens: the cap is max(SEQ, 1024 // PACK_DOCS) = 64


@pytest.fixture(scope="module")
def words() -> dict[int, str]:
    """Token id -> a word that " word" repeated encodes as that one id, again and again."""
    tok = load_tokenizer(MODEL)
    out = {}
    for w in sorted({w.strip(".,;:!?\"'()") for w in Path(BUNDLED_CALIB).read_text().split()}):
        if w.isalpha() and len(w) > 3:
            ids = tok((" " + w) * 5, add_special_tokens=False)["input_ids"]
            if len(set(ids)) == 1 and len(ids) == 5 and ids[0] not in out:
                out[ids[0]] = w
        if len(out) == 60:
            break
    assert len(out) == 60
    return out


def _jsonl(path, docs: list[str]):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _samples(path, seed: int = 0, n: int = N, seq: int = SEQ) -> torch.Tensor:
    return torch.cat(calibration_batches(MODEL, (str(path),), n, seq, seed, cache=False))


@pytest.mark.parametrize("seed", [0, 1])
def test_pack_takes_at_most_a_sixteenth_of_the_tokens_from_one_long_document(tmp_path, words, seed):
    ids = list(words)[:40]
    path = _jsonl(tmp_path / "books.jsonl", [(" " + words[i]) * 3000 for i in ids])
    per_doc = Counter(t for t in _samples(path, seed).flatten().tolist() if t in words)
    assert len(per_doc) >= PACK_DOCS, per_doc
    assert max(per_doc.values()) <= max(SEQ, N * SEQ // PACK_DOCS), per_doc


def test_pack_spreads_a_source_of_few_long_documents_over_several(tmp_path, words):
    """6 documents of 3000 tokens, 1024 to fill: the cap doubles from 64 to 256, so 4 documents give 256 each."""
    ids = list(words)[:6]
    path = _jsonl(tmp_path / "few.jsonl", [(" " + words[i]) * 3000 for i in ids])
    per_doc = Counter(t for t in _samples(path).flatten().tolist() if t in words)
    assert len(per_doc) >= 4 and max(per_doc.values()) <= 256, per_doc


@pytest.mark.parametrize("n,seq", [(N, SEQ), (2, SEQ), (1, 16)])  # the cap at a sixteenth, at SEQ, none
def test_pack_of_one_document_draws_windows_from_all_of_it(tmp_path, words, n, seq):
    rng = random.Random(0)
    # 5 characters a token: the prefix of PREFIX_CHARS a token of the cap holds both samples of (2, SEQ)
    short = [i for i in words if len(words[i]) == 4]
    assert len(short) >= 5
    text = "".join(" " + words[i] for i in rng.choices(short, k=3000))
    path = _jsonl(tmp_path / "one.jsonl", [text])
    doc = load_tokenizer(MODEL)(text, add_special_tokens=False)["input_ids"]
    starts = []
    for seed in range(3):
        for row in _samples(path, seed, n, seq).tolist():
            at = [k for k in range(len(doc) - seq + 1) if doc[k:k + seq] == row]
            assert len(at) == 1  # every sample is a window of the document
            starts.append(at[0])
    assert max(starts) >= max(2 * n * seq, len(doc) // 4)  # not only its first tokens: windows of all of it


def test_pack_keeps_short_documents_whole(tmp_path, words):
    """Documents shorter than the cap are packed whole: every word of a drawn document is in the samples."""
    ids = list(words)[:60]
    path = _jsonl(tmp_path / "short.jsonl", [(" " + words[i]) * 40 for i in ids])
    per_doc = Counter(t for t in _samples(path).flatten().tolist() if t in words)
    # 1024 tokens of 41-token documents (40 words and EOS): whole documents, but for the first window's
    # cut and the last document, which completes the set
    assert sum(1 for c in per_doc.values() if c == 40) >= len(per_doc) - 2, per_doc

"""What a calibration sample holds (mode=pack's sample count, mode=truncate's special
tokens on a long document)."""

from __future__ import annotations

import json
import random

import pytest

from moepress import models
from moepress.calib import data as data_mod
from moepress.calib import sampling
from moepress.calib.tokenizer import load_tokenizer
from moepress.errors import MoepressError

MODEL = models.resolve("tiny-mixtral")


def test_pack_refuses_a_source_one_sample_short_of_num_samples(tmp_path):
    """A text giving nwin windows: --num-samples nwin gives nwin samples, nwin + 1 is refused (never nwin
    samples handed on silently as if nwin + 1)."""
    tok = load_tokenizer(MODEL)
    text = " ".join(random.Random(0).choices(["alpha", "beta", "gamma", "delta", "river"], k=300)) + "\n"
    p = tmp_path / "small.txt"
    p.write_text(text, encoding="utf-8")
    total = len(tok(text, add_special_tokens=False, verbose=False)["input_ids"]) + (tok.eos_token_id is not None)
    seq_len = 32
    nwin = total // seq_len
    assert nwin >= 3
    cs = data_mod.calibration_set(MODEL, (str(p),), num_samples=nwin, seq_len=seq_len, seed=0, cache=False)
    assert tuple(cs.input_ids.shape) == (nwin, seq_len)
    with pytest.raises(MoepressError, match=f"give {nwin} samples of --seq-len {seq_len}, fewer than the "
                                            f"{nwin + 1} asked"):
        data_mod.calibration_set(MODEL, (str(p),), num_samples=nwin + 1, seq_len=seq_len, seed=0, cache=False)


def _bos_model(tmp_path):
    """A copy of tiny-qwen3-moe whose tokenizer prepends a BOS (id 1), as Llama's / Mixtral's / DeepSeek-V3's do
    (the bundled tokenizers add none): tests/test_calib_special_tokens.py's fixture."""
    import shutil

    d = shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / "bos")
    tj = json.loads((d / "tokenizer.json").read_text())
    tpl = {"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], tpl]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


def _long_record(tmp_path, seed: int):
    """(text, JSONL path) of one record of 1000 lines of 9 words (~60k characters)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "x", "river", "stone"]
    text = "\n".join(" ".join(rng.choices(words, k=9)) for _ in range(1000)) + "\n"
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    return text, p


def test_a_long_record_tokenized_whole_in_truncate_mode_keeps_its_special_tokens(tmp_path, monkeypatch):
    """mode=truncate takes a document's first seq-len tokens with the tokenizer's special tokens (BOS); a long
    document whose first part holds too few tokens is tokenized whole, and must keep them too."""
    monkeypatch.setattr(sampling, "LONG_CHARS", 1500)
    d = _bos_model(tmp_path)
    text, p = _long_record(tmp_path, seed=1)
    tok = load_tokenizer(d)
    ids = tok(text, verbose=False)["input_ids"]
    assert ids[0] == 1 and tok(text, add_special_tokens=False, verbose=False)["input_ids"][0] != 1
    first = len(tok(text[:1500], verbose=False)["input_ids"])
    seq_len = 900
    assert first < seq_len < len(ids)  # the first part holds less than a sample: the record is tokenized whole
    cs = data_mod.calibration_set(d, (f"{p},mode=truncate",), num_samples=1, seq_len=seq_len, seed=0, cache=False)
    assert cs.input_ids[0].tolist() == ids[:seq_len]


def test_a_long_record_in_pack_mode_is_drawn_from_other_parts_at_other_seeds(tmp_path, monkeypatch):
    """One record of ~60k characters, parts of ~1500: the part a seed's samples come from is drawn by the seed,
    so four seeds' samples lie far apart in the record (not all within one part's ~1500 characters)."""
    monkeypatch.setattr(sampling, "LONG_CHARS", 1500)
    text, p = _long_record(tmp_path, seed=0)
    tok = load_tokenizer(MODEL)
    at = []
    for seed in range(4):
        cs = data_mod.calibration_set(MODEL, (str(p),), num_samples=2, seq_len=64, seed=seed, cache=False)
        s = tok.decode(cs.input_ids[0].tolist())
        assert s in text
        at.append(text.index(s))
    assert max(at) - min(at) > 2 * 1500, at


def test_a_zstd_compressed_jsonl_is_refused_in_one_line(tmp_path):
    """gzip is tested; a zstd frame (magic 28 b5 2f fd) must be named as compressed as well, not reported as an
    invalid byte of line 1."""
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(60)) + b"\n")
    with pytest.raises(MoepressError, match=r"d\.jsonl: gzip / zstd compressed; expected JSON lines as text"):
        data_mod.calibration_set(MODEL, (str(p),), num_samples=1, seq_len=16, cache=False)


@pytest.mark.parametrize("max_windows", [5, 20, 40, 60, 80, 100, 130, 160, 200, 250])
def test_eval_windows_of_a_large_file_are_exactly_the_first_max_windows(tmp_path, monkeypatch, max_windows):
    """check's evaluation text over PIECE_BYTES is tokenized as growing prefixes: whatever prefix it stops at,
    it gives max_windows windows, the whole text's first tokens (never fewer)."""
    monkeypatch.setattr(data_mod, "PIECE_BYTES", 1024)
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "déjà", "naïve", "東京", "omega", "x"]
    text = "\n".join(" ".join(rng.choices(words, k=rng.randint(1, 8))) for _ in range(2500)) + "\n"
    p = tmp_path / "eval.txt"
    p.write_text(text, encoding="utf-8")
    ids = load_tokenizer(MODEL)(text, verbose=False)["input_ids"]
    seq_len = 32
    assert len(ids) > 250 * seq_len + 1000
    rows = [r.tolist() for b in data_mod.eval_batches(MODEL, p, seq_len=seq_len, max_windows=max_windows) for r in b]
    assert rows == [ids[i * seq_len:(i + 1) * seq_len] for i in range(max_windows)]


@pytest.mark.parametrize("max_windows,seq_len", [(16, 256), (1, 8), (128, 512)])
def test_eval_windows_of_a_text_under_a_piece_are_taken_from_a_prefix_as_the_whole_texts(monkeypatch, max_windows,
                                                                                        seq_len):
    """The check's own evaluation text (150 KB, under PIECE_BYTES) is tokenized from a prefix of about 8 bytes per
    token needed, not whole, and its windows are still the whole text's first tokens; 128 x 512 tokens is more
    than the text holds (all of its windows, from the whole text)."""
    tok = load_tokenizer(MODEL)
    ids = tok(data_mod.read_text(data_mod.DEFAULT_EVAL), verbose=False)["input_ids"]
    lengths = []

    def spy(*args, **kw):
        lengths.append(len(args[0]))
        return tok(*args, **kw)

    monkeypatch.setattr(data_mod, "load_tokenizer", lambda *a: spy)
    rows = [r.tolist() for b in data_mod.eval_batches(MODEL, data_mod.DEFAULT_EVAL, seq_len, max_windows) for r in b]
    n = min(max_windows, len(ids) // seq_len)
    assert rows == [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    whole = len(data_mod.read_text(data_mod.DEFAULT_EVAL))
    assert lengths[0] < whole / 4 if n == max_windows else lengths[-1] == whole


@pytest.mark.parametrize("bad", [b"\xff", b"\x00"])
def test_an_evaluation_text_under_a_piece_with_a_bad_byte_past_its_prefix_is_refused(tmp_path, bad):
    """Only a prefix of a text under PIECE_BYTES is tokenized for a few windows; the text is still read whole, so
    an invalid UTF-8 or NUL byte past that prefix is refused as in a text tokenized whole."""
    text = data_mod.DEFAULT_EVAL.read_bytes()
    p = tmp_path / "eval.txt"
    p.write_bytes(text[:100_000] + bad + text[100_000:])
    with pytest.raises(MoepressError, match=r"eval\.txt: .*100000"):
        data_mod.eval_batches(MODEL, p, seq_len=16, max_windows=2)

"""Pack mode over documents with no text (null or "" fields): they are not calibration data. A source
whose every document is empty gave samples made only of EOS ids, and prune / quantize / calib stats
calibrated on them with exit 0 (mode=truncate refused the same file)."""

import json

import pytest
import torch

from moepress import models
from moepress.calib.data import calibration_set
from moepress.errors import MoepressError

QWEN = models.path("tiny-qwen3-moe")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("value", [None, ""])
def test_a_source_of_empty_documents_is_refused_in_pack_mode(tmp_path, value, cli_run):
    p = tmp_path / "empty_text.jsonl"
    p.write_text("".join(json.dumps({"text": value, "body": f"real text {i}"}) + "\n" for i in range(200)))
    # the refusal says why (every one of the file's 200 records is empty), not "0 tokens, fewer than one sample"
    with pytest.raises(MoepressError, match=r"empty_text\.jsonl.*: all 200 documents are empty"):
        calibration_set(QWEN, (str(p),), num_samples=4, seq_len=16, cache=False)
    r = cli_run("calib", "prepare", "tiny-qwen3-moe", "--calib", p, "--num-samples", 4, "--seq-len", 16,
                "-o", tmp_path / "t.safetensors")
    assert r.exit_code == 2 and "empty_text.jsonl" in r.stderr and not (tmp_path / "t.safetensors").exists()
    assert "documents are empty" in r.stderr, r.stderr


def test_empty_documents_add_no_eos_between_documents(tmp_path):
    """A null record is no document: the packed stream equals the one without it (no EOS EOS runs)."""
    docs = [f"x = {i}" for i in range(100)]
    with_nulls = [d for doc in docs for d in (doc, None, None, None)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in with_nulls))
    b = calibration_set(QWEN, (str(tmp_path / "b.jsonl"),), num_samples=8, seq_len=16, cache=False).input_ids
    eos = 0  # the tiny tokenizer's <|endoftext|>
    assert not ((b[:, 1:] == eos) & (b[:, :-1] == eos)).any()


def test_check_data_from_a_token_file_does_not_claim_the_seed(tmp_path, cli_run):
    """check --data TOKENS.safetensors --seed 1: the report said "sampled (seed 1)" while the samples were
    the token file's first ones whatever the seed (seeds 0 and 1 measured the same windows)."""
    from moepress.checks import CheckConfig
    from moepress.checks.runner import eval_data

    tf = tmp_path / "t.safetensors"
    r = cli_run("calib", "prepare", "tiny-qwen3-moe", "--num-samples", 6, "--seq-len", 16, "-o", tf, "-q")
    assert r.exit_code == 0, r.stderr
    a, _ = eval_data(QWEN, CheckConfig(data=str(tf), seq_len=16, max_samples=4, seed=0))
    b, info = eval_data(QWEN, CheckConfig(data=str(tf), seq_len=16, max_samples=4, seed=1))
    assert not torch.equal(torch.cat(a), torch.cat(b)) or "seed" not in info["windows"], info


def test_a_token_file_prepared_from_a_token_file_keeps_its_text_as_calibration_data(tmp_path, cli_run):
    """calib prepare --calib big.safetensors -o small.safetensors (a subset): a stage calibrated on small
    recorded big's hash but not the text big was sampled from, so check --data TEXT gave no in-sample note."""
    from moepress.calib.data import calibration_inputs, source_hashes
    from moepress.calib.sources import BUNDLED_CALIB

    big, small, tiny = tmp_path / "big.safetensors", tmp_path / "small.safetensors", tmp_path / "tiny.safetensors"
    for args in (("-o", big, "--num-samples", 6), ("--calib", big, "-o", small, "--num-samples", 3),
                 ("--calib", small, "-o", tiny, "--num-samples", 2)):  # tiny: a subset of a subset
        r = cli_run("calib", "prepare", "tiny-qwen3-moe", "--seq-len", 16, "-q", *args)
        assert r.exit_code == 0, r.stderr
    text = source_hashes((str(BUNDLED_CALIB),))[str(BUNDLED_CALIB)]
    for f in (big, small, tiny):  # transitively: however many token files lie between the text and this one
        assert text in calibration_inputs((str(f),))["calibration_sha256"], f.name

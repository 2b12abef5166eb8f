"""`moepress check` does not pass a candidate whose own tokenizer encodes the text to other token ids than the
reference's (its consumers tokenize with the candidate's tokenizer.json; the figures are measured on the
reference's ids), while a tokenizer.json that differs only in its bytes is a note; and an empty gate value does
not silently turn a gate off (`--max-ppl-increase "$UNSET_VAR"` in CI)."""

import json
import random
import shutil

import pytest

from helpers import assert_one_line_error
from moepress import models

MODEL = "tiny-qwen3-moe"
SMALL = ["--seq-len", "32", "--max-samples", "4"]


def test_candidate_with_remapped_tokenizer_does_not_pass(cli_run, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(models.path(MODEL), cand)
    p = cand / "tokenizer.json"
    tok = json.loads(p.read_text())
    vocab = tok["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)[100:]
    ids = [vocab[n] for n in names]
    random.Random(0).shuffle(ids)
    vocab.update(zip(names, ids, strict=True))  # same weights, same vocabulary size: text now maps to other ids
    p.write_text(json.dumps(tok))
    r = cli_run("check", cand, "--reference", MODEL, *SMALL)
    # it passed (exit 0) with only a note that the tokenizer.json differs
    assert_one_line_error(r, "tokenizer.json", "other token ids than the reference's")


def test_candidate_tokenizer_differing_only_in_bytes_passes_with_a_note(cli_run, tmp_path):
    cand = shutil.copytree(models.path(MODEL), tmp_path / "cand")
    p = cand / "tokenizer.json"
    p.write_text(json.dumps(json.loads(p.read_text()), indent=1))  # same tokenizer, other bytes
    r = cli_run("check", cand, "--reference", MODEL, *SMALL)
    assert r.exit_code == 0 and "tokenizer.json differs from the reference's" in r.output, r.output


def test_empty_gate_value_is_refused(cli_run, tmp_path):
    cand = shutil.copytree(models.path(MODEL), tmp_path / "cand")
    r = cli_run("check", cand, "--reference", MODEL, "--max-ppl-increase", "", *SMALL)
    # it was accepted, the perplexity gate silently off
    assert_one_line_error(r, "--max-ppl-increase")


def test_a_percentage_over_100_is_a_gate_and_a_bare_number_over_1_names_the_option(cli_run, tmp_path):
    """--max-ppl-increase 150% was refused as a bare 1.5 (the option parsed it, the config parsed the number again),
    with a hint to write 150%: a pruned model's gate above 2x could not be written."""
    cand = shutil.copytree(models.path(MODEL), tmp_path / "cand")
    r = cli_run("check", cand, "--reference", MODEL, "--max-ppl-increase", "150%", "--min-top1", "100%", *SMALL,
                "--json", "--quiet")
    gates = {g["option"]: g["threshold"] for g in json.loads(r.stdout)["gates"]}
    assert r.exit_code == 0 and (gates["--max-ppl-increase"], gates["--min-top1"]) == (1.5, 1.0), r.output
    assert_one_line_error(cli_run("check", cand, "--reference", MODEL, "--max-ppl-increase", "1.5", *SMALL),
                          "--max-ppl-increase 1.5", "write 150%")


@pytest.mark.parametrize("option", ["--max-kl", "--max-layer-error", "--max-expert-error"])
def test_a_percentage_of_a_gate_that_is_not_a_share_is_refused(cli_run, tmp_path, option):
    """--max-kl 5% was 0.05 nats: a KL divergence or a relative error is no share of anything."""
    r = cli_run("check", models.path(MODEL), "--reference", MODEL, option, "5%", *SMALL)
    assert_one_line_error(r, f"{option} 5%", "not a share")

"""Special tokens per calibration mode (``calib/data.py``) with a tokenizer that adds a BOS, as Llama's,
Mixtral's and DeepSeek-V3's do (the bundled ones add none, so they cannot tell): a copy of
tiny-qwen3-moe whose post-processor prepends id 1. Truncated documents start with one BOS, chat
documents get the template and no added BOS, packed documents none; transformers' tokenizer called
directly is the oracle."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from moepress import models
from moepress.calib.data import calibration_set

QWEN = models.path("tiny-qwen3-moe")
BOS = 1  # <|im_start|>


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    d = shutil.copytree(QWEN, tmp_path_factory.mktemp("bos") / "m")
    tj = json.loads((d / "tokenizer.json").read_text())
    tpl = {"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [BOS], "tokens": ["<|im_start|>"]}}}
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], tpl]}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok("x")["input_ids"][0] == BOS and tok("x", add_special_tokens=False)["input_ids"][0] != BOS
    return d, tok


TEXT = (QWEN.parent.parent / "calib" / "data" / "eval.txt").read_text()
DOCS = [TEXT[i * 600:(i + 1) * 600] for i in range(12)]


def test_truncate_samples_start_with_the_tokenizers_bos(bos_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    d, tok = bos_model
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    cs = calibration_set(d, (f"{p},mode=truncate",), num_samples=4, seq_len=24, seed=0)
    want = {tuple(tok(t)["input_ids"][:24]) for t in DOCS}
    assert all(r[0] == BOS and r[1] != BOS for r in cs.input_ids.tolist())
    assert all(tuple(r) in want for r in cs.input_ids.tolist())


def test_chat_documents_get_the_template_and_no_added_bos(bos_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    d, tok = bos_model
    msgs = [[{"role": "user", "content": f"Explain {k}."}, {"role": "assistant", "content": t}]
            for k, t in enumerate(DOCS)]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps({"messages": m}) + "\n" for m in msgs))
    cs = calibration_set(d, (f"{p},mode=truncate",), num_samples=4, seq_len=24, seed=0)
    want = {tuple(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"][:24])
            for m in msgs}
    assert all(tuple(r) in want for r in cs.input_ids.tolist())
    assert all(r[:2] != [BOS, BOS] for r in cs.input_ids.tolist())


def test_packed_documents_carry_no_bos(bos_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    d, tok = bos_model
    (tmp_path / "one.txt").write_text(TEXT[:6000])
    cs = calibration_set(d, (str(tmp_path / "one.txt"),), num_samples=4, seq_len=32, seed=0)
    ids = tok(TEXT[:6000], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = {tuple(ids[k * 32:(k + 1) * 32]) for k in range(len(ids) // 32)}
    assert all(tuple(r) in rows for r in cs.input_ids.tolist()) and not (cs.input_ids == BOS).any()

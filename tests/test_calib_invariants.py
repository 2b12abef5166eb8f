"""Calibration sampling, the cache, routing statistics and perplexity against hand calculations or the
tokenizer called directly: properties no other test pinned (a mutation audit planted each bug and the
suite passed)."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from moepress import models
from moepress.calib.cache import load_token_file, save_token_file
from moepress.calib.data import calibration_set, windows
from moepress.calib.metrics import perplexity
from moepress.calib.observers import LayerRouting
from moepress.calib.stats import layer_summary
from moepress.errors import MoepressError

QWEN = models.path("tiny-qwen3-moe")
DATA = Path(__file__).resolve().parent.parent / "calib" / "data"
TEXT = (DATA / "eval.txt").read_text()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def hf_tok():
    return AutoTokenizer.from_pretrained(str(QWEN))


def _prefix_with(tok, n_tokens, special):
    """A prefix of TEXT that the tokenizer turns into exactly n_tokens ids."""
    for k in range(1, 4000):
        ids = tok(TEXT[:k], add_special_tokens=special)["input_ids"]
        if len(ids) == n_tokens and len(tok(TEXT[:k + 1], add_special_tokens=special)["input_ids"]) > n_tokens:
            return TEXT[:k], ids
    raise AssertionError("no prefix found")


def test_pack_uses_the_last_window_when_the_stream_divides_exactly(tmp_path, hf_tok):
    """One document of 31 tokens + EOS = exactly 2 windows of 16: both are samples."""
    text, ids = _prefix_with(hf_tok, 31, special=False)
    (tmp_path / "d.txt").write_text(text)
    stream = ids + [hf_tok.eos_token_id]
    cs = calibration_set(QWEN, (str(tmp_path / "d.txt"),), num_samples=2, seq_len=16, seed=0, cache=False)
    assert sorted(cs.input_ids.tolist()) == sorted([stream[:16], stream[16:32]])


def test_truncate_takes_a_document_of_exactly_seq_len_tokens(tmp_path, hf_tok):
    text, ids = _prefix_with(hf_tok, 24, special=True)
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n")
    cs = calibration_set(QWEN, (f"{tmp_path / 'd.jsonl'},mode=truncate",), num_samples=1, seq_len=24, seed=0,
                         cache=False)
    assert cs.input_ids.tolist() == [ids]


def test_eval_windows_keep_the_last_full_window():
    assert torch.cat(windows(list(range(64)), 32)).tolist() == [list(range(32)), list(range(32, 64))]
    assert torch.cat(windows(list(range(32)), 32)).tolist() == [list(range(32))]


def test_cached_set_follows_seq_len():
    calibration_set(QWEN, num_samples=4, seq_len=32, seed=0)
    assert calibration_set(QWEN, num_samples=4, seq_len=48, seed=0).input_ids.shape == (4, 48)


def test_cache_is_not_shared_between_tokenizers(tmp_path):
    """A second model whose tokenizer swaps the ids of two frequent tokens gets its own ids from the cache."""
    other = shutil.copytree(QWEN, tmp_path / "other")
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    base = AutoTokenizer.from_pretrained(str(QWEN))
    common = torch.bincount(torch.tensor(base(TEXT[:20000])["input_ids"])).topk(2).indices.tolist()
    inv = {v: k for k, v in vocab.items()}
    a, b = inv[common[0]], inv[common[1]]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    calibration_set(QWEN, num_samples=8, seq_len=32, seed=5)
    cs = calibration_set(other, num_samples=8, seq_len=32, seed=5)
    tok_b = AutoTokenizer.from_pretrained(str(other))
    ids = tok_b((DATA / "calib.txt").read_text(), add_special_tokens=False)["input_ids"] + [tok_b.eos_token_id]
    rows = {tuple(ids[k * 32:(k + 1) * 32]) for k in range(len(ids) // 32)}
    assert all(tuple(r) in rows for r in cs.input_ids.tolist())


def test_mixed_sources_are_interleaved_by_the_seed(tmp_path):
    text = (DATA / "calib.txt").read_text()
    (tmp_path / "a.txt").write_text(text[:30000])
    (tmp_path / "b.txt").write_text(text[30000:60000])
    srcs = (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    pats = [calibration_set(QWEN, srcs, num_samples=16, seq_len=32, seed=s, cache=False).source.tolist()
            for s in (0, 1, 2)]
    assert len({tuple(p) for p in pats}) > 1


def test_a_token_file_edited_after_prepare_is_refused(tmp_path):
    p = tmp_path / "t.safetensors"
    save_token_file(p, torch.arange(12).view(3, 4), torch.zeros(3, dtype=torch.long), {"num_samples": 3, "seq_len": 4})
    edited = {"input_ids": torch.arange(100, 112, dtype=torch.int32).view(3, 4),
              "source": torch.zeros(3, dtype=torch.int32)}
    save_file(edited, str(p), metadata={"format": "moepress-calib", "version": "1"})
    side = json.loads((tmp_path / "t.safetensors.json").read_text())
    assert hashlib.sha256(p.read_bytes()).hexdigest() != side["file"]["sha256"]  # the premise
    with pytest.raises(MoepressError, match="sha256"):
        load_token_file(p)


def _routing(counts):
    lr = LayerRouting(len(counts), 1)
    lr.counts = torch.tensor(counts, dtype=torch.int64)
    lr.tokens = sum(counts)
    return lr


def test_mean_gate_and_norm_are_per_routed_token():
    lr = LayerRouting(2, 1)
    lr.tokens = 4
    lr.on_expert(None, 0, torch.tensor([0, 2]), None, torch.tensor([0.5, 0.7]), None,
                 torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    lr.on_expert(None, 1, torch.tensor([1, 3]), None, torch.tensor([1.0, 0.2]), None,
                 torch.tensor([[0.0, 2.0], [6.0, 8.0]]))
    assert torch.allclose(lr.mean_gate, torch.tensor([0.6, 0.6], dtype=torch.float64))
    assert torch.allclose(lr.mean_norm, torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert lr.norm_sum.tolist() == [6.0, 12.0]


def test_effective_experts_is_exp_of_the_entropy_in_nats():
    # shares 1/2, 1/4, 1/4: entropy 1.5 bits, 2 ** 1.5 effective experts
    assert math.isclose(layer_summary(_routing([2, 1, 1]))["effective_experts"], 2 ** 1.5, rel_tol=1e-12)


def test_rare_is_below_a_fraction_of_the_uniform_share():
    assert layer_summary(_routing([100, 100, 100, 20]))["rare"] == []  # 0.0625 >= 0.1 x 1/4
    assert layer_summary(_routing([100, 100, 100, 5]))["rare"] == [3]  # 0.0164 < 0.025


def test_cv_is_the_population_coefficient_of_variation():
    s = layer_summary(_routing([1, 3]))
    assert math.isclose(s["cv"], 0.5, rel_tol=1e-12)  # the sample std would give 0.707
    assert s["max_over_mean"] == 1.5 and s["min_over_mean"] == 0.5


def test_perplexity_weights_every_predicted_token_equally():
    lg1, ids1 = torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long)  # 2 predicted tokens at p = 1/2
    lg2 = torch.tensor([math.log(3.0), 0.0]).expand(2, 3, 2).clone()  # 4 at p = 3/4
    ids2 = torch.zeros(2, 3, dtype=torch.long)
    want = 2 ** (1 / 3) * (4 / 3) ** (2 / 3)  # exp((2 ln 2 + 4 ln 4/3) / 6)
    assert math.isclose(perplexity([lg1, lg2], [ids1, ids2]), want, rel_tol=1e-6)


def test_another_seed_is_not_served_from_the_cache():
    """The cache key holds the seed: a second --seed gets its own samples, not the first seed's cached ones."""
    a = calibration_set(QWEN, num_samples=8, seq_len=32, seed=0)
    b = calibration_set(QWEN, num_samples=8, seq_len=32, seed=1)
    assert not b.cached and not torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(b.input_ids, calibration_set(QWEN, num_samples=8, seq_len=32, seed=1, cache=False).input_ids)


def test_truncate_samples_depend_on_the_seed(tmp_path):
    """mode=truncate takes documents in an order drawn with the seed (one window per document, no other draw)."""
    docs = [TEXT[i * 400:(i + 1) * 400] for i in range(40)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sets = [calibration_set(QWEN, (f"{p},mode=truncate",), num_samples=4, seq_len=16, seed=s, cache=False).input_ids
            for s in (0, 1)]
    assert not torch.equal(sets[0], sets[1])


def test_sampled_check_data_follows_the_checks_seed(tmp_path):
    """check --data FILE.jsonl --seed N samples its windows with N (the report said the seed; the draw ignored it)."""
    from moepress.checks import CheckConfig
    from moepress.checks.runner import eval_data

    docs = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 30} for i in range(40)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    ref = models.path("tiny-mixtral")
    a, _ = eval_data(ref, CheckConfig(data=str(data), seq_len=32, max_samples=4, seed=0))
    b, info = eval_data(ref, CheckConfig(data=str(data), seq_len=32, max_samples=4, seed=1))
    assert info["windows"] == "sampled (seed 1)" and not torch.equal(torch.cat(a), torch.cat(b))

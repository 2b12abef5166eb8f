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
from moepress.calib.data import CalibSet, calibration_set, check_positions, windows
from moepress.calib.metrics import perplexity
from moepress.calib.observers import InputAbsMax, LayerRouting, RoutingStats
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


def test_eval_windows_are_grouped_in_batches_of_batch_size():
    assert [tuple(b.shape) for b in windows(list(range(10 * 4)), 4, batch_size=3)] == [(3, 4)] * 3 + [(1, 4)]
    assert [tuple(b.shape) for b in windows(list(range(20 * 4)), 4)] == [(8, 4), (8, 4), (4, 4)]  # default 8


def test_no_samples_and_empty_batches_are_refused():
    with pytest.raises(MoepressError, match="--num-samples 0: expected a positive number"):
        calibration_set(QWEN, num_samples=0, seq_len=32)
    with pytest.raises(MoepressError, match="--batch-size 0: expected a positive number"):
        CalibSet(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long)).batches(0)


def test_seq_len_up_to_max_position_embeddings_is_taken(tmp_path):
    """Equal is allowed (positions 0..m-1 were trained); one more is refused, also where the limit sits in
    a multimodal config's text_config."""
    for cfg in ({"max_position_embeddings": 32}, {"text_config": {"max_position_embeddings": 32}}):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        check_positions(tmp_path, 32)
        with pytest.raises(MoepressError, match="--seq-len 33: .* has max_position_embeddings 32"):
            check_positions(tmp_path, 33)


def test_chat_documents_without_a_template_are_role_colon_content_lines(tmp_path, hf_tok):
    """A tokenizer without a chat template: each message is rendered as "role: content" on its own line."""
    d = tmp_path / "m"
    d.mkdir()
    for f in ("tokenizer.json", "config.json"):
        shutil.copy(QWEN / f, d / f)
    tc = json.loads((QWEN / "tokenizer_config.json").read_text())
    tc.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    msgs = [{"role": "user", "content": "Explain this."}, {"role": "assistant", "content": TEXT[:600]}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    cs = calibration_set(d, (f"{tmp_path / 'c.jsonl'},mode=truncate",), num_samples=1, seq_len=24, cache=False)
    want = hf_tok(f"user: Explain this.\nassistant: {TEXT[:600]}\n")["input_ids"][:24]  # a text: special tokens
    assert cs.input_ids.tolist() == [want]


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


def test_the_same_source_given_twice_is_refused(tmp_path):
    """It was drawn once per copy with its own seed: other documents with mode=truncate, but overlapping windows
    with mode=pack (7 distinct samples of 8); its weight sets its share (test_calib_sources_spec.py)."""
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": TEXT[i * 400:(i + 1) * 400]}) + "\n" for i in range(40)))
    for spec in (f"{p},mode=truncate", str(p)):
        with pytest.raises(MoepressError, match="the same source as --calib"):
            calibration_set(QWEN, (spec, spec), num_samples=6, seq_len=16, seed=0, cache=False)


def test_a_source_allotted_no_samples_is_not_read(tmp_path):
    """Weights 100:1 over 2 samples give [2, 0] (largest remainder); the second source, too short for one
    sample, is not read, nor refused."""
    (tmp_path / "big.txt").write_text(TEXT[:4000])
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    cs = calibration_set(QWEN, (f"{tmp_path / 'big.txt'}@100", f"{tmp_path / 'short.txt'}@1"), num_samples=2,
                         seq_len=16, cache=False)
    assert cs.source.tolist() == [0, 0]
    assert [(s["samples"], s["documents_used"]) for s in cs.meta["sources"]] == [(2, 1), (0, 0)]


def test_truncate_without_one_long_enough_document_names_the_longest(tmp_path, hf_tok):
    docs = [TEXT[:40], TEXT[100:220], TEXT[300:360]]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    longest = max(len(hf_tok(d)["input_ids"]) for d in docs)
    with pytest.raises(MoepressError, match=f"no document has the 64 tokens one sample needs \\(longest: {longest} "):
        calibration_set(QWEN, (f"{p},mode=truncate",), num_samples=2, seq_len=64, cache=False)


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


def test_rare_is_strictly_below_and_leaves_out_never_routed_experts():
    """"Rarely routed" is 0 < share < rare / E: a never-routed expert is listed as never routed only, and a
    share exactly at the threshold (1/40 = 0.1 x 1/4) is not rare."""
    s = layer_summary(_routing([100, 100, 100, 0]))
    assert s["never_routed"] == [3] and s["rare"] == []
    assert 1 / 40 == 0.1 / 4 and layer_summary(_routing([13, 13, 13, 1]))["rare"] == []


def test_summary_over_layers_against_numpy():
    """The summary's busiest expert, worst layer, totals and mean CV, from the counts with numpy."""
    import numpy as np

    from moepress.calib.stats import summarize

    counts = {1: [6, 1, 0, 1], 3: [1, 2, 3, 2], 4: [40, 30, 1, 0]}
    s = summarize(RoutingStats({i: _routing(c) for i, c in counts.items()}))
    max_over_mean = {i: max(c) / np.mean(c) for i, c in counts.items()}
    assert [s["layers"][str(i)]["busiest"] for i in counts] == [int(np.argmax(c)) for c in counts.values()]
    assert s["worst_layer"] == 1 and s["worst_max_over_mean"] == max(max_over_mean.values()) == 3.0
    assert s["never_routed_total"] == 2 and s["rare_total"] == 1  # layer 4: expert 2 (1/71 < 0.025)
    assert math.isclose(s["mean_cv"], np.mean([np.std(c) / np.mean(c) for c in counts.values()]), rel_tol=1e-12)


def test_per_expert_means_divide_each_sum_by_its_own_count():
    """stats.json's mean gate / mean norm per routed token, and REAP per token the reference counted
    (``reap_count``, not the routed count: they differ on DeepSeek); 0 where the divisor is 0."""
    from moepress.calib.stats import per_expert

    lr = _routing([2, 0, 4])
    lr.gate_sum = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    lr.norm_sum = torch.tensor([3.0, 0.0, 8.0], dtype=torch.float64)
    lr.reap_sum = torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64)
    lr.reap_count = torch.tensor([3, 1, 0])
    d = per_expert(RoutingStats({2: lr}))["2"]
    assert d["mean_gate"] == [0.5, 0.0, 0.5] and d["mean_norm"] == [1.5, 0.0, 2.0]
    assert d["reap"] == pytest.approx([0.3, 0.5, 0.0], abs=1e-15) and d["share"] == [1 / 3, 0.0, 2 / 3]


def test_render_lists_experts_as_ranges():
    from moepress.calib.stats import render, summarize

    counts = [0, 0, 0, 100, 100, 0, 100, 0, 0, 100, 1, 100]
    facts = {"family": "f", "moe_layers": [0], "num_experts": 12, "top_k": 1}
    text = render(summarize(RoutingStats({0: _routing(counts)})), facts, 500)
    assert text.splitlines()[2].endswith("0-2,5,7-8 / 10")


def test_routing_file_round_trips_every_sum_and_the_token_count(tmp_path):
    """routing.safetensors holds the six per-layer tensors under their names (read back with safetensors)
    and the token count; RoutingStats.load gives every one back, so REAP from the file equals REAP before."""
    from safetensors import safe_open

    names = ("counts", "gate_sum", "norm_sum", "reap_sum", "reap_count", "coselect")
    g = torch.Generator().manual_seed(0)
    lr = LayerRouting(6, 2)
    lr.tokens = 37
    for n in names:
        t = getattr(lr, n)
        setattr(lr, n, torch.randint(1, 50, t.shape, generator=g) if t.dtype == torch.int64
                else torch.rand(t.shape, generator=g, dtype=torch.float64))
    RoutingStats({5: lr}).save(tmp_path / "r.safetensors")
    with safe_open(str(tmp_path / "r.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"layers.5.{n}" for n in names)
        assert json.loads(f.metadata()["layers"])["5"]["tokens"] == 37
        stored = {n: f.get_tensor(f"layers.5.{n}") for n in names}
    back = RoutingStats.load(tmp_path / "r.safetensors").layers[5]
    assert back.tokens == 37 and (back.num_experts, back.top_k) == (6, 2)
    for n in names:
        assert torch.equal(getattr(back, n), getattr(lr, n)) and torch.equal(stored[n], getattr(lr, n)), n
    assert torch.equal(back.reap, lr.reap_sum / lr.reap_count)


def test_routing_stats_merge_adds_shared_layers_and_keeps_the_others():
    a, b = RoutingStats({1: _routing([1, 2]), 2: _routing([3, 0])}), RoutingStats({2: _routing([5, 7]),
                                                                                   4: _routing([0, 9])})
    a.merge(b)
    assert {i: lr.counts.tolist() for i, lr in a.layers.items()} == {1: [1, 2], 2: [8, 7], 4: [0, 9]}
    assert a.layers[2].tokens == 15


def test_input_absmax_is_the_max_over_every_batch_and_every_merged_observer():
    """Per channel, the max |x| over all batches a linear saw and over the observers merged, whichever
    holds it (each channel's max here lies in another of the three batches)."""
    lin = torch.nn.Linear(3, 2)
    xs = [torch.tensor([[-9.0, 1.0, 0.5]]), torch.tensor([[1.0, 8.0, -0.5]]), torch.tensor([[0.25, -2.0, -7.0]])]
    one, two = InputAbsMax(), InputAbsMax()
    one.attach(lin)
    lin(xs[0])
    lin(xs[1])
    one.detach()
    two.attach(lin)
    lin(xs[2])
    two.detach()
    assert one.amax[""].tolist() == [9.0, 8.0, 0.5]
    one.merge(two)
    assert torch.equal(one.amax[""], torch.cat(xs).abs().amax(0))
    other = InputAbsMax()
    other.amax = {"": torch.tensor([0.5, 0.0, 0.0])}
    two.merge(other)  # channel by channel: a larger value is taken, smaller ones do not replace larger
    assert two.amax[""].tolist() == [0.5, 2.0, 7.0]


def test_attach_again_adds_to_the_layers_statistics_and_detach_removes_only_them():
    """A second stream over more batches adds to the statistics ``attach`` returned before; ``detach``
    leaves the layer's other observers in place."""
    from types import SimpleNamespace

    moe = SimpleNamespace(num_experts=4, top_k=2, observers=["other"])
    layer = SimpleNamespace(moe=moe)
    stats = RoutingStats()
    first = stats.attach(7, layer)
    first.counts += torch.tensor([1, 0, 2, 0])
    RoutingStats.detach(layer)
    assert moe.observers == ["other"]
    assert stats.attach(7, layer) is first and moe.observers == ["other", first]
    assert stats.layers[7].counts.tolist() == [1, 0, 2, 0]

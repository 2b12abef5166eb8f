"""Layer-streamed forward == transformers' full-model forward (issue #2 acceptance)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import make_random_checkpoint, to_block_fp8
from moepress.calib.data import eval_batches
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.compress.quant.fp8 import dequantize_block, quantize_block
from moepress.compress.stream import StreamedModel
from moepress.models import path as bundled_path


def transformers_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_bundled_streamed_forward_matches_transformers(bundled):
    ids = torch.cat(eval_batches(bundled, seq_len=96, max_windows=3))
    want = transformers_logits(bundled, ids)
    got = StreamedModel(str(bundled)).forward([ids[:2], ids[2:]])
    diff = (torch.cat(got) - want).abs().max().item()
    assert diff <= 3e-5, f"streamed logits differ from transformers by {diff}"


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_random_checkpoint_streamed_matches_transformers(tmp_path, family):
    ckpt = make_random_checkpoint(family, tmp_path / family)
    assert (ckpt / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    want = transformers_logits(ckpt, ids)
    for prefetch in (True, False):
        got = StreamedModel(str(ckpt), prefetch=prefetch).forward([ids])[0]
        assert (got - want).abs().max().item() <= 1e-6  # measured 0.0


@pytest.mark.parametrize("family,overrides", [
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("deepseek_v3", {"norm_topk_prob": False}),
    ("deepseek_v3", {"n_shared_experts": 2}),
    ("deepseek_v3", {"routed_scaling_factor": 1.0, "n_group": 2, "topk_group": 1}),
    ("qwen3_moe", {"hidden_act": "gelu"}),
    ("mixtral", {"hidden_act": "gelu"}),
    ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": []}),
    ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]})])
def test_less_common_configs_stream_as_transformers_runs_them(tmp_path, family, overrides):
    """Config values no bundled or default random checkpoint has: unnormalised top-k weights (Qwen3-MoE,
    DeepSeek), two shared experts, one of two expert groups chosen per token, a gelu MLP, MoE every other layer,
    a dense layer named by mlp_only_layers."""
    ckpt = make_random_checkpoint(family, tmp_path / family, **overrides)
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    got = StreamedModel(str(ckpt)).forward([ids])[0]
    assert (got - transformers_logits(ckpt, ids)).abs().max().item() <= 1e-6  # measured <= 1.8e-7


def _dequant_128(q, scale_inv):
    """DeepSeek-V3's block FP8 rule written here, not moepress's: each 128 x 128 tile (the last ones partial)
    times its weight_scale_inv (DeepSeek-V3 inference/kernel.py weight_dequant)."""
    rows, cols = q.shape
    s = scale_inv.float().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return q.float() * s


def test_block_fp8_deepseek_streamed_equals_transformers_on_dequantized(tmp_path):
    src = bundled_path("tiny-deepseek-v3")
    fp8 = tmp_path / "fp8"
    to_block_fp8(src, fp8)
    reader = CheckpointReader(fp8)
    n_fp8 = sum(1 for n in reader.names() if reader.info(n).dtype == "F8_E4M3")
    assert n_fp8 > 100 and any(n.endswith("weight_scale_inv") for n in reader.names())
    # transformers on the dequantized weights (dequantized independently of the stream's decoder path)
    # (written as a plain fp32 checkpoint so transformers' own loader maps per-expert names to its fused experts)
    deq_dir = tmp_path / "dequantized"
    with CheckpointWriter(deq_dir) as w:
        for n in reader.names():
            if n.endswith(".weight_scale_inv"):
                continue
            s = n[: -len(".weight")] + ".weight_scale_inv"
            w.add(n, _dequant_128(reader.get(n), reader.get(s)) if s in reader else reader.get(n).float())
        w.write_json("config.json", CheckpointReader(src).config)
    ids = torch.cat(eval_batches(src, seq_len=64, max_windows=2))
    want = transformers_logits(deq_dir, ids)
    got = StreamedModel(str(fp8)).forward([ids])[0]
    assert (got - want).abs().max().item() <= 1.5e-5  # measured 5.7e-6
    # and FP8 really changed the weights (the comparison is not against the bf16 original)
    orig = transformers_logits(src, ids)
    assert (orig - want).abs().max().item() > 1e-3


def test_block_quantize_roundtrip_partial_blocks():
    w = torch.randn(200, 130) * torch.linspace(0.1, 10, 130)
    q, s = quantize_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2) and s.dtype == torch.float32
    rel = (dequantize_block(q, s) - w).norm() / w.norm()
    assert rel < 0.05


def test_sliding_window_attention_matches_transformers(tmp_path):
    """A config with sliding_window (Mixtral; Qwen3-MoE with use_sliding_window) shorter than the sequence:
    transformers masks keys further back than the window, the stream attended to all of them (logits off
    by up to 4 at 20 tokens with a window of 6)."""
    import json
    import shutil

    d = tmp_path / "sw"
    shutil.copytree(bundled_path("tiny-mixtral"), d, symlinks=False)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "sliding_window": 6}))
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
    assert (StreamedModel(str(d)).forward([ids])[0] - want).abs().max() < 1.5e-5  # measured 0.0; 6e-6 elsewhere


@pytest.mark.parametrize("read_ahead_bytes", [None, 1 << 20])
def test_prefetch_reads_every_layer_tensor_in_the_background(read_ahead_bytes):
    """Every decoder-layer tensor is read once, by the read-ahead thread: a read-ahead of the wrong layer gave the
    same numbers (the layer view falls back to a synchronous read) and overlapped nothing."""
    import threading

    r = CheckpointReader(bundled_path("tiny-qwen3-moe"))
    sm = StreamedModel(r, read_ahead_bytes=read_ahead_bytes)
    seen, get = [], r.get

    def spy(name, *a, **k):
        if ".layers." in name:
            seen.append((name, threading.current_thread() is threading.main_thread()))
        return get(name, *a, **k)

    r.get = spy
    assert sum(1 for _ in sm.layers()) == sm.num_layers and seen
    assert not [nm for nm, main in seen if main]
    assert len(seen) == len({nm for nm, _ in seen})  # each tensor read once


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_a_config_without_tie_word_embeddings_is_untied_as_in_transformers(tmp_path, model):
    """Every bundled config states tie_word_embeddings; one that omits it is untied in transformers, and read
    as tied the trtllm-ckpt export would declare the embedding as the head."""
    import json

    from transformers import AutoConfig

    from moepress.compress.arch import get_adapter

    cfg = json.loads((bundled_path(model) / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert AutoConfig.from_pretrained(str(tmp_path)).tie_word_embeddings is False
    assert get_adapter(cfg).tie_word_embeddings is False


def test_tied_checkpoint_streamed_matches_transformers(tmp_path):
    """tie_word_embeddings: true: transformers writes no lm_head.weight and projects with the embedding."""
    ckpt = make_random_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in CheckpointReader(ckpt).names()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    got = StreamedModel(str(ckpt)).forward([ids])[0]
    assert (got - transformers_logits(ckpt, ids)).abs().max().item() <= 1e-6  # measured <= 1.8e-7


def test_a_tied_checkpoint_that_stores_a_head_projects_as_transformers(tmp_path):
    """tie_word_embeddings: true beside a stored lm_head.weight unlike the embedding: the stream projects with
    the table transformers does."""
    from safetensors.torch import load_file, save_file

    ckpt = make_random_checkpoint("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True, max_shard_size="100GB")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(2))
    got = StreamedModel(str(ckpt)).forward([ids])[0]
    assert (got - transformers_logits(ckpt, ids)).abs().max().item() <= 1e-6  # measured <= 1.8e-7


def test_batches_of_different_lengths_each_match_transformers(tmp_path):
    """One stream over batches of 9 and 17 tokens: each gets the rotary positions of its own length."""
    ckpt = make_random_checkpoint("qwen3_moe", tmp_path / "q")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2, 9), generator=g), torch.randint(0, 256, (1, 17), generator=g)]
    got = StreamedModel(str(ckpt)).forward(batches)
    for ids, logits in zip(batches, got, strict=True):
        assert (logits - transformers_logits(ckpt, ids)).abs().max().item() <= 1e-6  # measured 0.0

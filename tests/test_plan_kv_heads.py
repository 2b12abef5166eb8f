"""Tensor parallelism over GQA KV heads. Every runtime splits them or, at a TP that is a multiple of them, replicates
them (TensorRT-LLM's PyTorch backend: qwen3_moe_weight_mapper.py _duplicate_kv; vLLM 0.33.0 QKVParallelLinear; an
engine from a trtllm-ckpt, whose ranks hold each KV head tp / kv times as TensorRT-LLM's converters write them:
convert_utils.py dup_kv_weight), and asserts otherwise. Qwen3-235B-A22B (4 KV heads) in bf16 on H100 needs TP 8."""

import json

import pytest

from moepress.compress.arch import get_adapter
from moepress.errors import MoepressError
from moepress.exporters.plan import plan
from moepress.exporters.runtime_formats import TRTLLM_CKPT_FORMATS
from moepress.exporters.targets import TARGETS
from moepress.exporters.trtllm_ckpt import check_mapping

# Qwen/Qwen3-235B-A22B config.json: 94 layers, hidden 4096, 64 query / 4 KV heads of 128, 128 experts of 1536, top-8
QWEN3_235B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 4096,
              "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
              "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
              "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "vocab_size": 151936, "max_position_embeddings": 40960, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu", "torch_dtype": "bfloat16"}


def test_an_engine_plan_suggests_no_tp_the_trtllm_ckpt_export_refuses():
    """Every plan of an engine (runtime trtllm-engine) on every target, in each format a trtllm-ckpt holds, is a
    split check_mapping takes; where only TP 8 holds the model (bf16 on 80 GB GPUs), TP 8 replicates the 4 KV heads
    (it was refused while a trtllm-ckpt split them only). TP 4 neither divides 6 KV heads nor is a multiple of them."""
    adapter = get_adapter(QWEN3_235B)
    planned = 0
    for t in TARGETS.values():
        for fmt in TRTLLM_CKPT_FORMATS:
            if not t.supports(fmt):
                continue
            try:
                p = plan(dict(QWEN3_235B), t, fmt, runtime="trtllm-engine")
            except MoepressError as e:
                assert "KV heads" not in str(e), (t.name, fmt, str(e))
                continue
            check_mapping(adapter, p.tp, p.ep)
            planned += 1
    assert planned
    p = plan(dict(QWEN3_235B), "h100", "bf16", runtime="trtllm-engine", max_batch=1, max_seq_len=1024)
    assert (p.tp, p.ep) == (8, 8) and p.bytes_per_gpu["kv_cache"] == 1024 * 94 * 2 * 128 * 2  # one KV head a rank
    check_mapping(adapter, 8, 8)
    # tp 4 divides the 48 heads, not the 6 KV heads (64 heads over 6 KV heads: refused as a config, no GQA)
    six = get_adapter({**QWEN3_235B, "num_attention_heads": 48, "num_key_value_heads": 6})
    with pytest.raises(MoepressError, match="--tp 4: must divide num_attention_heads=48, and divide "
                                            "num_key_value_heads=6 or be a multiple of it"):
        check_mapping(six, 4, 4)


def test_the_pytorch_backend_plan_replicates_kv_heads():
    """Runtime trtllm (TensorRT-LLM's PyTorch backend on an HF export) replicates the 4 KV heads at TP 8: the plan
    keeps TP 8, and each rank caches one KV head (2 x 128 values a token a layer, bf16), not half of one."""
    p = plan(dict(QWEN3_235B), "h100", "bf16", max_batch=1, max_seq_len=1024)
    assert (p.tp, p.ep) == (8, 8)
    assert p.bytes_per_gpu["kv_cache"] == 1024 * 94 * 2 * 128 * 2


def test_a_tp_neither_dividing_nor_a_multiple_of_the_kv_heads_is_refused():
    """48 query / 6 KV heads at TP 4: the runtimes neither split 6 heads 4 ways nor replicate them (4 is not a
    multiple of 6); TP 2 splits them."""
    cfg = json.loads(json.dumps(QWEN3_235B))
    cfg.update(num_attention_heads=48, num_key_value_heads=6)
    with pytest.raises(MoepressError, match="tp 4 neither divides the 6 KV heads nor is a multiple of them"):
        plan(cfg, "h200", "fp8", gpus=4)
    assert plan(cfg, "h200", "fp8", gpus=2).tp == 2
    # above the KV heads TP must be a multiple of them (vLLM's QKVParallelLinear replicates whole heads)
    with pytest.raises(MoepressError, match="tp 8 neither divides the 6 KV heads nor is a multiple of them"):
        plan(cfg, "h200", "fp8", gpus=8)


@pytest.mark.parametrize("target,kv,per_value", [("h200", "bf16", 2.0), ("h200", "fp8", 1.0),
                                                  ("b200", "nvfp4", 0.5625)])
def test_the_kv_cache_budget_is_in_the_cache_dtype(target, kv, per_value):
    """Each rank caches one of the 4 KV heads at TP 8 (2 x 128 values a token a layer) in the chosen dtype: 2 bytes
    a value in bf16, 1 in FP8, 4 bits plus one E4M3 scale per 16 values in NVFP4 (0.5625), by hand."""
    p = plan(dict(QWEN3_235B), target, "fp8", gpus=8, max_batch=1, max_seq_len=1024, kv_cache_dtype=kv)
    assert p.bytes_per_gpu["kv_cache"] == 1024 * 94 * 2 * 128 * per_value


def test_an_nvfp4_kv_cache_is_refused_before_blackwell():
    """NVFP4 KV caching is a Blackwell recipe (exporters/kv_cache.py's source); Hopper caches bf16 or FP8."""
    with pytest.raises(MoepressError, match="--kv-cache-dtype nvfp4: .*sm90"):
        plan(dict(QWEN3_235B), "h200", "fp8", kv_cache_dtype="nvfp4")


def test_expert_parallelism_never_exceeds_the_experts_and_moe_tp_splits_only_the_rest():
    """8 routed experts on 16 GPUs: EP 8 (whole experts per rank: moe_tp x moe_ep = tp, tensorrt_llm/mapping.py),
    moe_tp 2; with EP 8 on 8 GPUs no rank cuts an expert (moe_tp 1), so a width 8 does not divide still plans."""
    few = {**QWEN3_235B, "num_experts": 8}
    p = plan(few, "h100", "bf16", gpus=16)
    assert (p.ep, p.moe_tp, p.experts_per_rank) == (8, 2, 1)
    odd = {**QWEN3_235B, "moe_intermediate_size": 1500}
    assert plan(odd, "h200", "fp8", gpus=8, ep=8).moe_tp == 1


def _kv_heads(n: int) -> dict:
    cfg = json.loads(json.dumps(QWEN3_235B))
    cfg["num_key_value_heads"] = n
    return cfg


@pytest.mark.parametrize("target,fmt", [("h200", "bf16"), ("h200", "fp8"), ("h200", "fp8-block"),
                                        ("h200", "int4-awq"), ("b200", "nvfp4")])
def test_replicated_kv_heads_count_a_whole_kv_head_of_weights_per_gpu(target, fmt):
    """At TP 8 the 4 KV heads of Qwen3-235B-A22B are replicated (vLLM QKVParallelLinear: num_kv_heads = 1 per rank,
    num_kv_head_replicas = 2; TensorRT-LLM's PyTorch backend: ceil(4 / 8) = 1 head per rank after _duplicate_kv), so
    each GPU holds k_proj and v_proj rows of one whole head (128 rows of 4096, with their scales): exactly what a
    model of 8 KV heads split 8 ways holds. The plan counted 4 heads / 8 GPUs = half a head (98.6 MB short in bf16)."""
    four, eight = (plan(_kv_heads(n), target, fmt, gpus=8) for n in (4, 8))
    assert (four.tp, four.ep) == (eight.tp, eight.ep) == (8, 8)
    assert four.bytes_per_gpu["weights"] == eight.bytes_per_gpu["weights"]
    assert four.bytes_per_gpu["kv_cache"] == eight.bytes_per_gpu["kv_cache"]  # one cached KV head a rank, both


@pytest.mark.parametrize("target,fmt,per_value", [("h200", "bf16", 2), ("b200", "nvfp4", 1 / 2 + 1 / 16)])
def test_kv_head_weights_per_gpu_by_hand(target, fmt, per_value):
    """16 KV heads at TP 8 put two heads on each GPU, 4 heads (replicated) one: the difference is one head of k_proj
    and one of v_proj, [128, 4096] each, in 94 layers (bf16: 2 B a value; NVFP4: 0.5 B + an E4M3 scale per 16 values,
    the F32 scalars each rank holds once for either). Before: 2 heads - 0.5 head."""
    four, sixteen = (plan(_kv_heads(n), target, fmt, gpus=8).bytes_per_gpu["weights"] for n in (4, 16))
    assert sixteen - four == 94 * 2 * 128 * 4096 * per_value

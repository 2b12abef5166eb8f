"""Planner details beyond tests/test_plan.py: the ONNX engine's memory, GPU counts per node shape,
INT4 edge cases, and the trtllm-ckpt export whose fixed split cannot hold the model."""

import json

import pytest
import torch
from safetensors.torch import save_file

from moepress import models
from moepress.errors import MoepressError
from moepress.exporters.build import build
from moepress.exporters.plan import gpu_counts, plan
from moepress.exporters.shape import linear_bytes, model_shape
from moepress.exporters.targets import get_target


@pytest.fixture(scope="module")
def qwen():
    return model_shape(models.path("tiny-qwen3-moe"))


def test_gpu_counts_follow_the_node():
    # 8-GPU nodes: powers of two inside the node, then whole nodes
    assert gpu_counts(get_target("h100")) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # GB200 NVL72: one NVLink domain of 72, then 2 domains
    assert gpu_counts(get_target("gb200")) == [1, 2, 4, 8, 16, 32, 64, 72, 144]
    # GH200: one GPU per superchip
    assert gpu_counts(get_target("gh200"))[:4] == [1, 2, 4, 8]


def test_int4_edge_cases():
    # in_features 192 > group 128 and not a multiple of it: `moepress quantize` leaves it bf16
    assert linear_bytes(256, 192, "int4-awq") == 2 * 256 * 192
    # in_features 64 < 128: one group per row (group clamped): 64 x 64 / 2 + 4 x 64 scales
    assert linear_bytes(64, 64, "int4-gptq") == 64 * 64 // 2 + 4 * 64
    # nvfp4: 4 bits + one E4M3 scale per 16 + two F32 scalars
    assert linear_bytes(128, 128, "nvfp4") == 128 * 128 / 2 + 128 * 128 / 16 + 8


def test_onnx_engine_memory(qwen):
    # tiny-qwen3-moe: 16 experts, moe_intermediate 128, hidden 128; B 2 x S 64 = 128 tokens
    # dense experts in float32: 128 x (16 x 128 x 3 + 128 x 6) x 4 B = 128 x 6,912 x 4 = 3,538,944 B; no KV
    assert qwen.moe_intermediate == 128
    p = plan(qwen, "l4", "bf16", max_batch=2, max_seq_len=64, runtime="onnx")
    assert (p.gpus, p.runtime, p.bytes_per_gpu["kv_cache"]) == (1, "onnx", 0)
    assert p.bytes_per_gpu["activations"] == 3_538_944
    assert p.bytes_per_gpu["weights"] == plan(qwen, "l4", "bf16", gpus=1).bytes_per_gpu["weights"]
    with pytest.raises(MoepressError, match=r"--gpus 2: a TensorRT engine from the ONNX export runs on one GPU"):
        plan(qwen, "l4", "bf16", gpus=2, runtime="onnx")
    with pytest.raises(MoepressError, match=r"--ep 2: a TensorRT engine from the ONNX export runs on one GPU"):
        plan(qwen, "l4", "bf16", ep=2, runtime="onnx")  # was a ZeroDivisionError
    # 8192 x 1024 tokens: 8,388,608 x 6,912 x 4 B = 231.9 GB of activations
    with pytest.raises(MoepressError, match=r"the ONNX engine needs .* dense-expert activations 231.9 GB"):
        plan(qwen, "h100", "bf16", max_batch=8192, max_seq_len=1024, runtime="onnx")


def _big_mixtral(tmp_path, kv_algo=None):
    """A Mixtral-8x22B-shaped config (about 141 B parameters, 281 GB in bf16) and a world-size-1 trtllm-ckpt."""
    cfg = json.loads((models.path("tiny-mixtral") / "config.json").read_text())
    cfg.update(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
               num_key_value_heads=8, vocab_size=32768, head_dim=128, max_position_embeddings=65536)
    src = tmp_path / "m8x22"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architecture": "MixtralForCausalLM", "dtype": "bfloat16",
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1, "moe_tp_size": 1, "moe_ep_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv_algo}, "moe": {"num_experts": 8, "top_k": 2}}))
    save_file({"transformer.ln_f.weight": torch.ones(4)}, str(d / "rank0.safetensors"))
    (d / "export.json").write_text(json.dumps({"format": "trtllm-ckpt", "source": str(src)}))
    return src, d


def test_fixed_split_suggests_reexport(tmp_path):
    src, ckpt = _big_mixtral(tmp_path, kv_algo="FP8")
    p = plan(src, "h100", "bf16")
    assert (p.gpus, p.ep) == (8, 8)
    with pytest.raises(MoepressError, match=r"exported for world_size 1, which cannot hold it on H100 SXM .* "
                                            r"re-export with `moepress export --format trtllm-ckpt --tp 8 --ep 8`"):
        build(ckpt, "h100", tmp_path / "out")
    # the checkpoint's FP8 KV cache is what the plan budgets; a conflicting request is refused
    with pytest.raises(MoepressError, match=r"--kv-cache-dtype nvfp4: .* has kv_cache_quant_algo FP8"):
        build(ckpt, "b200", tmp_path / "out", kv_cache_dtype="nvfp4")
    # on B200 (180 GB) two GPUs hold it once re-exported; one does not
    assert plan(src, "b200", "bf16", kv_cache_dtype="fp8").gpus == 2


def test_real_pruned_checkpoint(cli_run, tmp_path, qwen):
    """`moepress prune --keep 8` on tiny-qwen3-moe: the planner reads 8 experts from the pruned config."""
    out = tmp_path / "pruned"
    r = cli_run("prune", "tiny-qwen3-moe", "--keep", "8", "--method", "frequency", "--num-samples", "2",
                "--seq-len", "32", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    p, full = plan(out, "l4", "bf16"), plan(qwen, "l4", "bf16")
    assert p.experts_per_rank == 8 and full.experts_per_rank == 16
    # dropped: 4 layers x 8 experts x 3 x (128 x 128) x 2 B = 3,145,728 B of expert weights
    #        + 4 routers x 8 rows x 128 x 2 B                =     8,192 B
    assert full.weights_total - p.weights_total == 3_145_728 + 8_192


@pytest.mark.parametrize("runtime,export,fmt", [("trtllm-engine", None, "nvfp4"), ("trtllm-engine", None, "mxfp4"),
                                                ("trtllm-engine", None, "int4-awq"), ("onnx", "onnx", "nvfp4")])
def test_a_format_the_engines_export_cannot_hold_is_refused(runtime, export, fmt):
    """A trtllm-ckpt holds bf16 and FP8 only (trtllm_ckpt.py _quant_algo), an onnx export what onnx_graph.py
    writes: a plan of an engine in another format, on a target that runs the format (B200), describes an
    engine no export could feed."""
    kind = "trtllm-ckpt" if runtime == "trtllm-engine" else "onnx"
    with pytest.raises(MoepressError, match=f"^{kind} holds .*, not {fmt}: "):
        plan(models.path("tiny-mixtral"), "b200", fmt, runtime=runtime, export=export)
    assert plan(models.path("tiny-mixtral"), "b200", "fp8", runtime=runtime, export=export).gpus >= 1


"""``trtllm-engine``: ``trtllm-build`` on a ``trtllm-ckpt`` export (TensorRT-LLM engine, one per rank).

Flags read from ``tensorrt_llm/commands/build.py`` (NVIDIA/TensorRT-LLM at 008b2b8d):
``--checkpoint_dir --output_dir --max_batch_size --max_input_len --max_seq_len --max_num_tokens
--workers --gather_context_logits --output_timing_cache``, and the plugin flags of
``tensorrt_llm/plugin/plugin.py: add_plugin_argument`` (``--gemm_plugin --moe_plugin
--gpt_attention_plugin --remove_input_padding --use_paged_context_fmha --use_fp8_context_fmha``).
``--gather_context_logits`` because the accuracy check reads the prompt's logits
(moepress/checks/candidates/engine.py).

``trtllm-build`` belongs to TensorRT-LLM's TensorRT engine backend, which newer releases removed
(``docs/source/legacy/tensorrt-backend-removal.md``: "trtllm-build / trtllm-refit / trtllm-prune"
removed, HF checkpoints load directly); a real build therefore checks that ``trtllm-build`` is on
PATH and otherwise says to pin a release that ships it or use the trtllm-pytorch builder.
"""

from __future__ import annotations

from moepress.exporters.builders.base import Builder, Context
from moepress.exporters.targets import FP8_FMHA_MIN_SM


def commands(ctx: Context) -> list[list[str]]:
    p, t = ctx.plan, ctx.target
    world = int((ctx.config.get("mapping") or {}).get("world_size", 1))
    # plugin dtype = the checkpoint's "dtype", spelled out: releases with the pydantic PluginConfig
    # (tensorrt_llm/plugin/plugin.py) also take "auto" (= that dtype), the early 0.x trees (e.g.
    # 035b99e0) only float16 / float32 / bfloat16 / disable. Quantized GEMMs (FP8, INT4) follow the
    # checkpoint's quantization, not the plugin dtype ("only effective for non-quantized gemm").
    plugin = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(
        str(ctx.config.get("dtype")), "auto")
    cmd = ["trtllm-build", "--checkpoint_dir", str(ctx.artifact), "--output_dir", str(ctx.out / "engine"),
           "--max_batch_size", str(p.max_batch), "--max_input_len", str(p.max_seq_len),
           "--max_seq_len", str(p.max_seq_len), "--max_num_tokens", str(p.max_num_tokens),
           "--gemm_plugin", plugin, "--gpt_attention_plugin", plugin, "--remove_input_padding", "enable",
           "--use_paged_context_fmha", "enable", "--gather_context_logits", "--workers", str(world),
           "--output_timing_cache", str(ctx.out / "timing.cache")]
    if (ctx.config.get("moe") or {}).get("num_experts") or ctx.config.get("moe_num_experts"):
        # the MoE plugin (layers/moe.py); checkpoint config.json "moe": {num_experts, top_k, ...}
        cmd[cmd.index("--remove_input_padding"):cmd.index("--remove_input_padding")] = ["--moe_plugin", plugin]
    quant = ctx.config.get("quantization") or {}
    if quant.get("quant_algo") == "FP8" and quant.get("kv_cache_quant_algo") == "FP8" and t.sm >= FP8_FMHA_MIN_SM:
        # FP8 context FMHA: for a checkpoint with FP8 Q/DQ (QuantAlgo FP8); Ada/Hopper/Blackwell kernels. With paged
        # context FMHA it needs an FP8 KV cache: without one trtllm-build turns it off with a warning (TensorRT-LLM
        # builder.py build(), 008b2b8d: "FP8 Paged Context FMHA is disabled because it must be used together with
        # fp8 KV Cache")
        cmd += ["--use_fp8_context_fmha", "enable"]
    return [cmd]


BUILDER = Builder(
    "trtllm-engine", "trtllm-ckpt", commands, requires=("tensorrt_llm",),
    install="tensorrt_llm is not installed: pip install moepress[trtllm] on a GPU machine",
    description="trtllm-build on a trtllm-ckpt export (TensorRT-LLM engine, one per rank)",
    executables=("trtllm-build",), runtime="trtllm-engine",  # the plan replicates its embedding per rank
)

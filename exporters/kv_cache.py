"""KV-cache dtypes a deployment plan budgets: bytes per cached value, the name checkpoints give
them (``kv_cache_quant_algo``) and the GPU architectures whose kernels run them; and the tensor-parallel
sizes each runtime splits a model's KV heads over (:func:`kv_split_problem`).

Sources: TensorRT-LLM ``docs/source/features/quantization.md``, "Hardware Support Matrix" (its "FP8 KV
Cache" column at 09d4c79b, quoted in exporters/targets.py; that table has no NVFP4 KV column: the NVFP4 KV
cache is a recipe of the 1.3 / 1.4 docs, nvidia.github.io/TensorRT-LLM/1.3.0rc27/features/quantization.html
"NVFP4 KV Cache", made offline with Model-Optimizer, and is budgeted on Blackwell, where NVFP4 runs);
``kv_cache_quant_algo`` takes TensorRT-LLM's QuantAlgo names (tensorrt_llm/quantization/mode.py),
in a TensorRT-LLM checkpoint's config.json (docs/source/architecture/checkpoint.md) and in
Model-Optimizer's hf_quant_config.json. NVFP4 stores 4 bits plus one E4M3 scale per 16 values.

Kept apart from the weight-format registry (moepress.compress.formats) because the CLI lists
these names when it starts, and that registry imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCache:
    """One KV-cache dtype.

    trtllm_ckpt: whether ``moepress build`` reads it from a trtllm-ckpt export's
    ``quantization.kv_cache_quant_algo`` (moepress's trtllm-ckpt exporter writes an FP8 cache only;
    any other value there is planned as the model's own dtype)."""

    name: str
    bytes: float  # per cached value
    quant_algo: str | None  # None: the model's own dtype (no KV quantization)
    archs: tuple[int, ...]
    trtllm_ckpt: bool = True
    # the architectures that run it for an MLA model's latent cache (None: the same as ``archs``): an FP8 latent
    # needs an FP8 MLA kernel, which TensorRT-LLM has on Hopper (FlashMLA's FP8 kernel) and Blackwell
    # (trtllm-gen) only: examples/models/core/deepseek_v3/README.md "FP8 KV Cache and MLA" (NVIDIA/TensorRT-LLM
    # main, 2026-11)
    mla_archs: tuple[int, ...] | None = None


KV_CACHE: dict[str, KVCache] = {k.name: k for k in (
    KVCache("bf16", 2, None, (80, 86, 89, 90, 100, 120)),
    KVCache("fp8", 1, "FP8", (80, 86, 89, 90, 100, 120), mla_archs=(90, 100)),
    KVCache("nvfp4", 0.5625, "NVFP4", (100,), trtllm_ckpt=False),
)}

# the unquantized cache: what a plan budgets unless told otherwise
DEFAULT = next(k.name for k in KV_CACHE.values() if k.quant_algo is None)


def by_quant_algo(algo: str | None) -> KVCache | None:
    """The quantized KV-cache dtype a checkpoint's ``kv_cache_quant_algo`` names; None for none or
    an unknown one."""
    return next((k for k in KV_CACHE.values() if algo is not None and k.quant_algo == algo), None)


def for_sm(sm: int, mla: bool = False) -> tuple[str, ...]:
    """The KV-cache dtypes TensorRT-LLM runs on compute capability ``sm`` (``mla``: for an MLA model's latent)."""
    return tuple(k.name for k in KV_CACHE.values() if sm in ((k.mla_archs or k.archs) if mla else k.archs))




def kv_split_problem(kv_heads: int, tp: int) -> str | None:
    """Why no runtime can run ``kv_heads`` GQA KV heads at tensor-parallel size ``tp`` (None: it can; MLA, 0
    KV heads here, caches one latent every rank holds). Every runtime splits them, or replicates them when tp is a
    multiple of them, asserting one or the other: TensorRT-LLM's PyTorch backend and vLLM (NVIDIA/TensorRT-LLM
    4dfeee6c _torch/models/checkpoints/hf/qwen3_moe_weight_mapper.py _duplicate_kv; vLLM 0.33.0 layers/linear.py
    QKVParallelLinear num_kv_head_replicas, models/qwen3_moe.py and mixtral.py), and an engine built from a
    trtllm-ckpt, whose ranks trtllm_ckpt.kv_rows writes as TensorRT-LLM's own converters do (NVIDIA/TensorRT-LLM
    0428c188 tensorrt_llm/models/convert_utils.py dup_kv_weight)."""
    if not kv_heads or kv_heads % tp == 0 or tp % kv_heads == 0:
        return None
    return f"tp {tp} neither divides the {kv_heads} KV heads nor is a multiple of them"


__all__ = ["DEFAULT", "KVCache", "KV_CACHE", "by_quant_algo", "for_sm", "kv_split_problem"]

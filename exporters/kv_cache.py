"""KV-cache dtypes a deployment plan budgets: bytes per cached value, the name checkpoints give
them (``kv_cache_quant_algo``) and the GPU architectures whose kernels run them.

Sources: TensorRT-LLM ``docs/source/features/quantization.md``, "Hardware Support Matrix" ("FP8 KV
Cache" and "NVFP4 KV Cache" columns; the table is quoted in exporters/targets.py);
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


KV_CACHE: dict[str, KVCache] = {k.name: k for k in (
    KVCache("bf16", 2, None, (80, 86, 89, 90, 100, 120)),
    KVCache("fp8", 1, "FP8", (80, 86, 89, 90, 100, 120)),
    KVCache("nvfp4", 0.5625, "NVFP4", (100,), trtllm_ckpt=False),
)}

# the unquantized cache: what a plan budgets unless told otherwise
DEFAULT = next(k.name for k in KV_CACHE.values() if k.quant_algo is None)


def by_quant_algo(algo: str | None) -> KVCache | None:
    """The quantized KV-cache dtype a checkpoint's ``kv_cache_quant_algo`` names; None for none or
    an unknown one."""
    return next((k for k in KV_CACHE.values() if algo is not None and k.quant_algo == algo), None)


def for_sm(sm: int) -> tuple[str, ...]:
    """The KV-cache dtypes TensorRT-LLM runs on compute capability ``sm``."""
    return tuple(k.name for k in KV_CACHE.values() if sm in k.archs)


__all__ = ["DEFAULT", "KVCache", "KV_CACHE", "by_quant_algo", "for_sm"]

"""FP8 KV-cache scales (``--kv-cache fp8``; modelopt's ``kv_cache_quant_algo: FP8``).

The quantize output stores per attention layer ``model.layers.N.self_attn.k_scale`` and ``v_scale``,
F32 scalars = amax / 448 of the keys / values the cache holds (modelopt 0.47,
modelopt/torch/export/quant_utils.py: get_kv_cache_scaling_factor and postprocess_state_dict divide
the k/v bmm quantizers' amax by 448). Model-Optimizer exports them as ``self_attn.k_proj.k_scale`` /
``self_attn.v_proj.v_scale`` (``_KV_CACHE_REPLACEMENTS``), which the hf-modelopt exporter writes;
vLLM reads either. The amax is taken
during calibration on the key and value states the attention hands its attention function
(compress/moe.py: AttentionObserver), the tensors modelopt's ``k_bmm_quantizer`` /
``v_bmm_quantizer`` observe (modelopt/torch/quantization/plugins/huggingface.py:
``_QuantAttention._quantized_attention``):

- Qwen3-MoE: keys after ``k_norm`` and RoPE, values = v_proj's output: what ``cache.update``
  stores (transformers 5.24, models/qwen3_moe/modeling_qwen3_moe.py).
- Mixtral: keys after RoPE, values = v_proj's output, likewise what the cache stores.
- DeepSeek-V3 (MLA), following modelopt: the keys and values decompressed by ``kv_b_proj`` (keys
  = [k_nope | k_pe after RoPE], values = kv_b_proj's value half). They are not the cache's scales, and
  hf-modelopt does not write them (SGLang 0.5.23 would read them as its latent cache's scale:
  exporters/hf_modelopt.py ``written``); every runtime runs an MLA model's FP8 cache at scale 1.0:
  the runtimes cache the latent [kv_c_normed | k_pe] instead (vLLM main, 2026:
  vllm/model_executor/layers/attention/mla_attention.py, ``ops.concat_and_cache_mla(...,
  scale=layer._k_scale)``), and vLLM's DeepSeek loader (models/deepseek_v2.py ``load_weights`` ->
  model_loader/weight_utils.py ``maybe_remap_kv_scale_name``) maps a checkpoint's k_scale to
  ``self_attn.attn.k_scale``, a parameter its MLA attention (``self_attn.mla_attn``) does not have,
  so it skips the tensor and keeps 1.0. TensorRT-LLM's PyTorch backend keeps its FP8 KV scale at 1.0
  and overrides it only for an NVFP4 cache (TensorRT-LLM main, 2026:
  tensorrt_llm/_torch/attention_backend/trtllm.py, ``kv_cache_scaling_factor = torch.ones(1)``),
  which is what modelopt's get_kv_cache_scaling_factor recommends by clamping the scales to >= 1.
"""

from __future__ import annotations

import torch

from moepress.compress.quant import fp8

NAMES = ("k_scale", "v_scale")


def observe(amax: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Running amax of the keys or values an attention caches."""
    a = out.detach().abs().amax().float()
    return a if amax is None else torch.maximum(amax, a)


def quantize(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K or V tensor -> (fp8 values, F32 [] scale); dequantized = q * scale."""
    s = kv_scale(t.detach().abs().amax()) if scale is None else scale
    return (t.float() / s).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def kv_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax -> the stored F32 scalar (amax / 448, never zero)."""
    return fp8.scale_from_amax(amax).reshape(())

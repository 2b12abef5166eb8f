"""Qwen3-MoE: softmax top-k over `num_experts`, renormalised when `norm_topk_prob`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from moepress.compress.arch.base import Adapter, is_count
from moepress.errors import MoepressError


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32, top-k, optional renormalisation (transformers' Qwen3MoeTopKRouter)."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


class Qwen3MoeAdapter(Adapter):
    family = "qwen3_moe"
    qk_norm = True
    model_types = ("qwen3_moe",)
    layer_kind_keys = ("decoder_sparse_step", "mlp_only_layers")
    architectures = ("Qwen3MoeForCausalLM",)
    # Hub configs say num_experts; transformers 5 writes num_local_experts.
    experts_keys = ("num_experts", "num_local_experts")

    def make_hf_config(self, config):
        return Qwen3MoeConfig(**{k: v for k, v in config.items() if k != "model_type"})

    def build_attention(self, i):
        return hf.Qwen3MoeAttention(self.hf_config, i)

    def build_norm(self, size):
        return hf.Qwen3MoeRMSNorm(size, eps=self.hf_config.rms_norm_eps)

    def build_rotary(self):
        return hf.Qwen3MoeRotaryEmbedding(self.hf_config)

    def check_config(self, where):
        step = self.hf_config.decoder_sparse_step
        if not is_count(step):
            raise MoepressError(f"{where}: decoder_sparse_step={step!r}: expected a whole number >= 1 "
                                "(every step-th layer is sparse)")

    def is_moe_layer(self, i):
        c = self.hf_config
        return i not in (c.mlp_only_layers or []) and (i + 1) % c.decoder_sparse_step == 0

    def route(self, moe, x):
        logits = F.linear(x, moe.gate.weight)
        weights, indices = softmax_topk(logits, moe.top_k, bool(self.hf_config.norm_topk_prob))
        return logits, weights.to(logits.dtype), indices

    def routing(self):
        return {"scoring": "softmax", "top_k": self.top_k, "renormalize": bool(self.hf_config.norm_topk_prob),
                "n_group": 1, "topk_group": 1, "correction_bias": False, "routed_scaling_factor": 1.0}

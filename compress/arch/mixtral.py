"""Mixtral: softmax top-k over `num_local_experts`, always renormalised; experts w1/w3/w2."""

from __future__ import annotations

import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral import modeling_mixtral as hf

from moepress.compress.arch.base import Adapter
from moepress.compress.arch.qwen3_moe import softmax_topk


class MixtralAdapter(Adapter):
    family = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    experts_keys = ("num_local_experts", "num_experts")
    # Hub checkpoints: model.layers.N.block_sparse_moe.{gate,experts.E.w1|w2|w3}.weight
    ffn_attr = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")  # gate, up, down

    def make_hf_config(self, config):
        return MixtralConfig(**{k: v for k, v in config.items() if k != "model_type"})

    def build_attention(self, i):
        return hf.MixtralAttention(self.hf_config, i)

    def build_norm(self, size):
        return hf.MixtralRMSNorm(size, eps=self.hf_config.rms_norm_eps)

    def build_rotary(self):
        return hf.MixtralRotaryEmbedding(self.hf_config)

    def is_moe_layer(self, i):
        return True

    def moe_intermediate_size(self):
        return int(self.hf_config.intermediate_size)

    def route(self, moe, x):
        logits = F.linear(x, moe.gate.weight)
        # transformers' MixtralTopKRouter keeps the renormalised weights in float32.
        weights, indices = softmax_topk(logits.float(), moe.top_k, True)
        return logits, weights, indices

    def routing(self):
        return {"scoring": "softmax", "top_k": self.top_k, "renormalize": True,
                "n_group": 1, "topk_group": 1, "correction_bias": False, "routed_scaling_factor": 1.0}

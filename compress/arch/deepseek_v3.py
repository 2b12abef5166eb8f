"""DeepSeek-V3 and Kimi K2: MLA attention, sigmoid scores with noaux_tc correction bias,
group-limited top-k, shared experts, routed scaling, dense first layers.

Kimi K2's config says ``model_type: kimi_k2`` with an ``auto_map`` to remote code; it is the
DeepseekV3ForCausalLM architecture, so it is recognised here natively and no remote code runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

from moepress.compress.arch.base import Adapter, is_count
from moepress.errors import MoepressError


def sigmoid_group_topk(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int,
                       renormalize: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 noaux_tc routing (transformers' DeepseekV3TopkRouter, the reference's MoEGate).

    Choice uses sigmoid(logits) + bias; groups are ranked by the sum of their two best
    biased scores and only the best ``topk_group`` groups compete; the weights are the
    unbiased sigmoid scores of the chosen experts, renormalised, times ``scale``.
    """
    scores = logits.sigmoid()
    choice = scores + bias
    t, e = choice.shape
    group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, indices


class DeepseekV3Adapter(Adapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3", "kimi_k2")
    architectures = ("DeepseekV3ForCausalLM",)
    # num_local_experts: an alias transformers' config class maps onto n_routed_experts (configuration_deepseek_v3.py
    # attribute_map, 5.25): a pruned config rewrites both
    experts_keys = ("n_routed_experts", "num_local_experts")
    nextn_by_default = True  # configuration_deepseek_v3.py 5.24: num_mtp_layers = 1, alias num_nextn_predict_layers
    # moe_layer_freq as vLLM's deepseek_v2.py and DeepSeek's reference code read it (layer i % freq == 0);
    # transformers 5.24's modeling_deepseek_v3.py ignores it (every layer past first_k_dense_replace is MoE)
    layer_kind_keys = ("first_k_dense_replace", "moe_layer_freq")
    scoring = "sigmoid"
    latent_kv_cache = True
    identity_dequantized = ("self_attn.kv_b_proj",)

    def make_hf_config(self, config):
        cfg = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
        return DeepseekV3Config(**cfg)

    def build_attention(self, i):
        return hf.DeepseekV3Attention(self.hf_config, i)

    def build_norm(self, size):
        return hf.DeepseekV3RMSNorm(size, eps=self.hf_config.rms_norm_eps)

    def build_rotary(self):
        return hf.DeepseekV3RotaryEmbedding(self.hf_config)

    def check_config(self, where):
        """Group-limited routing needs n_group groups of >= 2 experts (each group is ranked by its two
        best scores), 1..n_group of them competing, enough experts among them for top-k."""
        c, n, k = self.hf_config, self.num_experts, self.top_k
        for key in ("moe_layer_freq", "num_nextn_predict_layers", "first_k_dense_replace"):
            v = self.config.get(key)
            if (v is not None or key == "first_k_dense_replace" and key in self.config) and not (is_count(v) or v == 0):
                raise MoepressError(f"{where}: {key}={v!r}: expected a whole number")
        if self.config.get("moe_layer_freq") == 0:  # vLLM's deepseek_v2.py: layer_idx % moe_layer_freq
            raise MoepressError(f"{where}: moe_layer_freq=0: expected 1 or more (every moe_layer_freq-th layer past "
                                "first_k_dense_replace is MoE; vLLM divides by it)")
        # transformers 5.24 routes every DeepSeek-V3 config by sigmoid + correction bias (noaux_tc); vLLM's
        # deepseek_v2.py follows the config's scoring_func / topk_method instead, so a config naming another
        # routing would be served unlike the model moepress measured
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            v = self.config.get(key)
            if v is not None and v != want:
                raise MoepressError(f"{where}: {key}={v!r}: expected {want!r} (DeepSeek-V3 / Kimi K2 routing)")
        g, tg = c.n_group, c.topk_group
        if not (is_count(g) and n % g == 0 and n // g >= 2):
            raise MoepressError(f"{where}: n_group={g!r} with n_routed_experts={n}: expected the experts in "
                                f"n_group={g!r} equal groups of at least 2")
        if not (is_count(tg) and tg <= g and tg * (n // g) >= k):
            raise MoepressError(f"{where}: topk_group={tg!r} with n_group={g} and {k} experts per token: expected "
                                f"1..{g} groups holding at least {k} experts")

    def is_moe_layer(self, i):
        freq = int(self.config.get("moe_layer_freq", 1) or 1)
        return i >= int(self.hf_config.first_k_dense_replace) and i % freq == 0

    def transformers_misreads(self):
        freq = int(self.config.get("moe_layer_freq", 1) or 1)
        if freq == 1 or all(self.is_moe_layer(i) for i in range(self.num_layers)
                            if i >= int(self.hf_config.first_k_dense_replace)):
            return None
        return (f"builds every layer from first_k_dense_replace on as MoE: it does not read moe_layer_freq {freq} "
                "(the dense layers' MLPs are not loaded and their experts are random)")

    def n_shared_experts(self):
        return int(self.hf_config.n_shared_experts or 0)

    def zero_width_linears(self, i):
        # transformers 5.24 modeling_deepseek_v3.py DeepseekV3MoE: shared_experts = DeepseekV3MLP(
        # intermediate_size=moe_intermediate_size * n_shared_experts), built also for n_shared_experts 0
        if not self.is_moe_layer(i) or self.n_shared_experts():
            return []
        return [f"{self.layer_prefix(i)}mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj", "down_proj")]

    def keep_fp32(self, name):
        # transformers keeps DeepSeek's router weight and bias in float32 (_keep_in_fp32_modules_strict).
        return ".gate." in name

    def route(self, moe, x):
        c = self.hf_config
        logits = F.linear(x.float(), moe.gate.weight.float())
        weights, indices = sigmoid_group_topk(logits, moe.gate.e_score_correction_bias, moe.top_k,
                                              int(c.n_group), int(c.topk_group), bool(c.norm_topk_prob),
                                              float(c.routed_scaling_factor))
        return logits, weights, indices

    def routing(self):
        c = self.hf_config
        return {"scoring": "sigmoid", "top_k": self.top_k, "renormalize": bool(c.norm_topk_prob),
                "n_group": int(c.n_group), "topk_group": int(c.topk_group), "correction_bias": True,
                "routed_scaling_factor": float(c.routed_scaling_factor),
                "topk_method": "noaux_tc"}

    def __init__(self, config: dict, names: Iterable[str] | None = None, where: str = "config.json"):
        super().__init__(config, names, where)
        # the layer numbers the checkpoint stores tensors of, read only where MTP layers are declared (Kimi K2: none);
        # empty: none declared, no names given, or a config-only directory
        declared = int(self.config.get("num_nextn_predict_layers", 0) or 0)
        self._stored_layers = {int(i) for n in (names or ()) if declared and n.startswith("model.layers.")
                               and (i := n.split(".", 3)[2]).isdigit()}

    def mtp_layers(self) -> list[int]:
        """Multi-token-prediction layers stored after the trunk (DeepSeek-V3: model.layers.61): those
        ``num_nextn_predict_layers`` declares, less those a checkpoint with weights does not hold (one saved
        by transformers keeps the config's count, 1 by default, and drops the layer's tensors)."""
        n = int(self.config.get("num_nextn_predict_layers", 0) or 0)
        declared = range(self.num_layers, self.num_layers + n)
        return [i for i in declared if not self._stored_layers or i in self._stored_layers]

    def mtp_extra_params(self) -> tuple[int, int]:
        """(other, embedding) parameters an MTP layer stores beside its decoder layer: enorm, hnorm,
        shared_head.norm [H] and eh_proj [H, 2H]; its own embed_tokens and shared_head.head [V, H]
        (deepseek-ai/DeepSeek-V3 README_WEIGHTS.md)."""
        h, v = self.hidden_size, self.vocab_size
        return 3 * h + 2 * h * h, 2 * v * h

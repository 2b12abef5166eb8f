"""Routing agreement: does the candidate's router send the reference's tokens to the experts the
reference's router sends them to?

At each MoE layer the candidate's router (its weights, correction bias, top-k, groups and scaling:
its tensors and its config.json) is given the reference's router input, so whatever else the
candidate quantizes in the layer changes nothing here: a correct quantized or exported checkpoint
routes exactly as the reference (moepress never quantizes a router), while a dropped or permuted
correction bias, permuted router rows or another top-k show at once. Such breaks can move the
whole-model metrics by under 1% (a dropped DeepSeek-V3 correction bias: +0.3% perplexity on the
bundled tiny-deepseek-v3), which perplexity, KL and top-1 gates cannot tell from quantization noise.

Measured for streamed candidates with the reference's expert count (not for pruned ones, whose
experts are others).
"""

from __future__ import annotations

import torch

from moepress.compress.moe import SparseMoE


def moe_of(layer) -> SparseMoE | None:
    """The layer's sparse MoE block, or None for a dense layer."""
    block = getattr(layer, getattr(layer, "ffn_attr", "mlp"), None)
    return block if isinstance(block, SparseMoE) else None


class RouteCapture:
    """Observer on the reference's MoE block: each batch's router input and the experts chosen."""

    def __init__(self, moe: SparseMoE):
        self.num_experts = moe.num_experts
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        moe.observers.append(self)

    def on_route(self, moe, x, logits, weights, indices) -> None:
        self.seen.append((x, indices))

    @torch.no_grad()
    def overlap(self, moe: SparseMoE) -> float | None:
        """Share of the reference's (token, expert) choices the candidate's router ``moe`` also makes on
        the same inputs; None when its experts are not the reference's (another count)."""
        if moe.num_experts != self.num_experts or not self.seen:
            return None
        hits = total = 0
        for x, ref_idx in self.seen:
            _, _, idx = moe.route(moe, x.to(moe.gate.weight.device))
            idx = idx.to(ref_idx.device)
            hits += int((ref_idx[:, :, None] == idx[:, None, :]).any(-1).sum())
            total += ref_idx.numel()
        return hits / total

"""What a pruning method sees for one MoE layer (``LayerEvidence``) and what it returns (``Selection``).

``RouteRecorder`` is the observer that keeps, for a seeded subsample of calibration tokens, what
the reroute search replays: MoE inputs, router logits, the chosen experts and the hidden state
after the block (the residual stream plus the block's output).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moepress.calib.observers import LayerRouting
from moepress.compress.moe import DecoderLayer, SparseMoE


class RouteRecorder:
    """Observer keeping what the reroute search needs for a fixed subsample of calibration tokens:
    the MoE input, the router logits, the chosen experts with their weights and (``attach``) the
    hidden state after the block: the residual stream entering it plus its whole output (shared
    experts included), which the next layer normalises and reads. The sum is kept, not its two
    terms (a token's hidden-size row less)."""

    def __init__(self, n_tokens: int, keep: int, seed: int):
        self.pick = torch.zeros(n_tokens, dtype=torch.bool)  # over all calibration tokens, in stream order
        self.pick[torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed), device="cpu")[:keep]] = True
        self.offset = 0
        self.last = torch.zeros(0, dtype=torch.bool)
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.state: list[torch.Tensor] = []  # residual + block output, a part per forward

    def attach(self, layer: DecoderLayer) -> Callable[[], None]:
        """Observe ``layer``'s MoE block; returns a function that removes the hooks."""
        def pre(mod, args):  # the input of post_attention_layernorm: the residual stream
            h = args[0].reshape(-1, args[0].shape[-1])
            m = self.pick[self.offset: self.offset + h.shape[0]]
            if m.any():
                self.state.append(h[m].detach().float())  # a copy (masked): the block output is added into it

        def post(mod, args, out):  # runs after on_route of the same tokens: self.last is their mask
            if self.last.any():
                self.state[-1] += out.reshape(-1, out.shape[-1])[self.last].detach().float()

        layer.moe.observers.append(self)
        hooks = [layer.post_attention_layernorm.register_forward_pre_hook(pre),
                 layer.moe.register_forward_hook(post)]
        return lambda: [h.remove() for h in hooks]

    def on_route(self, moe, x, logits, weights, indices) -> None:
        m = self.pick[self.offset: self.offset + x.shape[0]]
        self.offset += x.shape[0]
        self.last = m
        if m.any():
            self.parts.append((x[m].detach().float(), logits[m].detach().float(), indices[m], weights[m].float()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(MoE input, router logits, chosen experts, their weights) of the picked tokens, in stream
        order; concatenated once, the per-forward parts dropped (no second copy kept)."""
        if len(self.parts) != 1:
            self.parts = [tuple(torch.cat(p) for p in zip(*self.parts, strict=True))]
        return self.parts[0]

    def states(self) -> torch.Tensor | None:
        """The post-block hidden states of the picked tokens [T, hidden], in stream order (concatenated
        once, like ``tensors``); None without ``attach``."""
        if len(self.state) > 1:
            self.state = [torch.cat(self.state)]
        return self.state[0] if self.state else None


@dataclass
class LayerEvidence:
    """What a method sees for one MoE layer."""

    layer: int
    moe: SparseMoE
    stats: LayerRouting
    routing: dict
    recorder: RouteRecorder | None = None
    chunks: list[LayerRouting] | None = None  # per group of calibration samples (stability.ChunkedRouting)
    # results computed from this evidence that do not depend on the selection (merge: the routed output)
    memo: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Selection:
    kept: list[int]  # ascending: new expert j is old expert kept[j]
    scores: torch.Tensor  # [E] float64, higher = more important (NaN where not scored)
    extra: dict = field(default_factory=dict)

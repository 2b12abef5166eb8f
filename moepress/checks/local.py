"""Each decoder layer's blocks held to the reference's on the reference's input (teacher-forced).

The hidden-state rows compare the candidate run on its own states, so a layer's error carries every error
before it, and a fault in one attention block reads as a slightly larger step among the rest. Here, on the
first eval samples (2048 tokens), the candidate's attention block gets the reference's input to the layer and its
feed-forward block the reference's input to that block; each is compared with the reference's block on the
same input: the block's own error, relative to the smaller of the two outputs. AWQ scales folded into a
norm, v_proj or up_proj stay inside a block, so a folded candidate compares as an unfolded one.

The attention errors are gated against their peers (``peers``): each layer's against the median over the
layers whose attention is stored alike. The feed-forward error is reported (a pruned layer's shows what the
pruning cost that layer), not gated: its experts are (``routing``). The weights of the layer's linears other than
the routed experts' (attention, shared experts, a dense MLP) are held to their own rounding's error (``weights``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepress.checks.peers import relative_error, stored_form
from moepress.checks.weights import Sketches, linears
from moepress.compress.moe import DecoderLayer


@dataclass
class BlockErrors:
    """One layer's blocks against the reference's: errors and how its attention is stored."""

    attention: float
    ffn: float
    attention_form: tuple
    weight_ratio: float | None = None  # the largest weight error over its rounding's (checks/weights.py)
    weight_module: str | None = None  # the linear with it
    weighed: bool = False  # were its weights compared (a moepress quantize output made from the reference)


# the blocks are compared on the first eval samples holding this many tokens (8 samples of 256; one sample at
# least), whatever --batch-size splits them into: three such tensors are kept a layer
PROBE_TOKENS = 2048


class BlockProbe:
    """The reference's layer run in its parts on the first samples of its input states ``hs`` that hold
    PROBE_TOKENS tokens (one tensor, however the batches split them, so the errors do not move with
    --batch-size): the layer's input, the attention block's output, the feed-forward block's output."""

    @torch.no_grad()
    def __init__(self, sm, layer: DecoderLayer, hs: list[torch.Tensor], formats: dict[str, str] | None = None,
                 skip: str | None = None):
        """``formats``: the candidate's format of each linear in the layer (checks/weights.py), whose linears but
        those under ``skip`` (the routed experts, which :class:`~moepress.checks.routing.RouteCapture` compares) are
        sketched to be compared; None: not compared."""
        self.skip = skip
        self.weights = None if formats is None else Sketches(linears(layer, skip), formats)
        want = max(1, PROBE_TOKENS // hs[0].shape[1])
        h, n = [], 0
        for b in hs:
            if n < want:
                h.append(b[:want - n])
                n += h[-1].shape[0]
        self.h = h = torch.cat(h)
        self.attn, self.ffn, _ = layer.parts(h, sm.position_embeddings(h), sm.attention_mask(h))

    @torch.no_grad()
    def compare(self, sm, layer: DecoderLayer) -> BlockErrors:
        """The candidate's ``layer`` (streamed by ``sm``) on the reference's inputs to each block."""
        h = self.h
        attn = layer.attention(h, sm.position_embeddings(h), sm.attention_mask(h))
        ffn = layer.ffn(layer.post_attention_layernorm(h + self.attn))

        def err(c, r):
            c, r = c.float().reshape(1, -1), r.float().reshape(1, -1)
            return float(relative_error(c - r, c, r)[0])

        wr, wm = (None, None) if self.weights is None else self.weights.ratio(linears(layer, self.skip))
        return BlockErrors(err(attn, self.attn), err(ffn, self.ffn), stored_form(layer.self_attn), wr, wm,
                           self.weights is not None)


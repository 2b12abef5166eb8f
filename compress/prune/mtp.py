"""Multi-token prediction (MTP) layers: found in the checkpoint, loaded, and fed their own input.

Each MTP layer is pruned like a trunk layer, on its own forward over the calibration text, and
keeps the trunk's expert count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError

MTP_SCORING = ("each MTP layer is scored by its own forward on the calibration text (input: the trunk's final "
               "hidden state and the next token, as vLLM's DeepSeek MTP runs it) and keeps the trunk's expert count")


def mtp_layers_present(adapter, reader: CheckpointReader) -> list[int]:
    declared = adapter.mtp_layers()
    return [i for i in declared if reader.layer_names(i)]


def read_decoder_state(sm: StreamedModel, i: int) -> dict[str, torch.Tensor]:
    """The decoder-layer tensors of layer i (an MTP layer stores more beside them: left out here)."""
    a, ck = sm.adapter, sm.ckpt
    prefix = a.layer_prefix(i)
    state = {}
    for key, shape in sm.expected_layer_shapes(i).items():
        name = prefix + key
        if name not in ck:
            raise MoepressError(f"{ck.path}: tensor '{name}' is missing from the checkpoint")
        dtype = torch.float32 if a.keep_fp32(name) else sm.dtype
        t = ck.weight(name, dtype) if name.endswith(".weight") else ck.get(name).to(dtype)
        if tuple(t.shape) != shape:
            raise MoepressError(f"{ck.path}: tensor '{name}' has shape {list(t.shape)}, config.json implies "
                                f"{list(shape)}")
        state[key] = t
    return state


class MTPInput:
    """DeepSeek-V3 multi-token prediction layer k's input (vLLM model_executor/models/deepseek_mtp.py):
    eh_proj(cat(enorm(embed(t_{i+k+1})), hnorm(h_i))), h being the main model's final hidden state
    (after its final norm, as vLLM passes it) for k = 0 and the previous MTP layer's output after."""

    def __init__(self, sm: StreamedModel, i: int):
        a, ck = sm.adapter, sm.ckpt
        p = a.layer_prefix(i)

        def w(name):
            return ck.weight(name, sm.dtype)

        self.embed = w(p + "embed_tokens.weight") if p + "embed_tokens.weight" in ck else w(a.embed_name)
        self.enorm, self.hnorm = a.build_norm(a.hidden_size), a.build_norm(a.hidden_size)
        self.enorm.weight.data = w(p + "enorm.weight")
        self.hnorm.weight.data = w(p + "hnorm.weight")
        self.eh_proj = w(p + "eh_proj.weight")

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, prev: torch.Tensor, depth: int) -> torch.Tensor:
        e = F.embedding(ids[:, depth + 1:], self.embed)
        h = prev[:, : e.shape[1]]
        return F.linear(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1), self.eh_proj)

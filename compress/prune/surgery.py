"""Surgery: slice a loaded MoE block (``prune_moe_module``) or a stored layer (``pruned_layer_tensors``).

A pruned layer keeps its router rows, correction bias and experts for the kept experts only,
renumbered 0..K-1; every other tensor is copied exactly as stored, so a block-FP8 checkpoint
stays block-FP8. Experts the ``merge`` method rewrote are written from the loaded layer, encoded in
the input's stored form (``merge.encode_like``).
"""

from __future__ import annotations

import torch
from torch import nn

from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, LayerView, read_later
from moepress.compress.checkpoint.writer import Deferred
from moepress.compress.moe import DecoderLayer, SparseMoE, StoredLinear
from moepress.compress.prune.merge import encode_like, form_label
from moepress.errors import MoepressError


@torch.no_grad()
def prune_moe_module(moe: SparseMoE, kept: list[int]) -> SparseMoE:
    """Slice a loaded MoE block in place: router rows, correction bias, experts renumbered 0..K-1."""
    idx = torch.tensor(kept, dtype=torch.long)
    moe.gate.weight = nn.Parameter(moe.gate.weight.data[idx].clone(), requires_grad=False)
    if moe.gate.e_score_correction_bias is not None:
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias[idx].clone()
    moe.experts = nn.ModuleList([moe.experts[e] for e in kept])
    return moe


def pruned_layer_tensors(reader: CheckpointReader, adapter, i: int, kept: list[int], deferred: bool = False):
    """Yield (name, stored tensor) of layer i with only the kept routed experts.

    Expert tensors (weights and whatever is stored beside them: FP8 ``weight_scale_inv``,
    scales) are renamed to the dense new index and copied as stored; tensors under the
    router prefix are sliced along their expert dimension (``gate.weight`` [E, H],
    ``e_score_correction_bias`` [E], any router bias); everything else is copied as is.
    ``deferred``: a tensor copied as stored comes as a :class:`Deferred` read, which the writer
    reads when it writes the shard (one tensor in memory at a time, not the pruned layer).
    """
    E = adapter.num_experts
    new_of = {e: j for j, e in enumerate(kept)}
    router = adapter.router_prefix(i)
    idx = torch.tensor(kept, dtype=torch.long)

    def stored(name: str) -> torch.Tensor | Deferred:
        return read_later(reader, name) if deferred else reader.get(name)

    for name in sorted(reader.layer_names(i)):
        hit = adapter.expert_index(name)
        if hit is not None and hit[0] == i:
            e = hit[1]
            if e in new_of:
                old = adapter.expert_prefix(i, e)
                yield adapter.expert_prefix(i, new_of[e]) + name[len(old):], stored(name)
            continue
        if not name.startswith(router):
            yield name, stored(name)
            continue
        t = reader.get(name)
        if t.ndim >= 1 and t.shape[0] == E:
            t = t[idx].clone()
        elif t.numel() != 1:
            raise MoepressError(f"{reader.path}: router tensor '{name}' has shape {list(t.shape)}; expected "
                                f"its first dimension to be the {E} routed experts (or a scalar)")
        yield name, t


def write_from_layer(w: CheckpointWriter, reader: CheckpointReader, adapter, i: int, layer: DecoderLayer,
                     kept: list[int], merged: dict | None = None) -> None:
    """Layer i pruned to ``kept``, written from the loaded layer where it holds a tensor exactly as stored
    (bf16 kept as stored): no second read of the layer, no second copy in memory. ``merged``: the
    ``merge`` method's ``{str(old expert): {"rewritten": ["down", ...], ...}}``; those linears are encoded
    from the layer (``encode_like``) and the stored form is recorded in ``merged[...]["stored_as"]``."""
    prefix = adapter.layer_prefix(i)
    held = {prefix + k: v for k, v in layer.state_dict().items()
            if prefix + k in reader and not v.is_meta and v.dtype == reader.get_dtype(prefix + k)}
    for m in layer.modules():  # weights kept quantized: their stored bytes and scales, as read
        if isinstance(m, StoredLinear):
            held.update((n, t) for n, t in m.kept_tensors().items() if not t.is_meta)
    names = reader.layer_names(i) if merged else ()
    for c, info in (merged or {}).items():
        for role, lin_name, lin in zip(("gate", "up", "down"), adapter.expert_names,
                                       layer.moe.experts[int(c)].linears(), strict=True):
            if role not in info["rewritten"]:
                continue
            base = adapter.expert_prefix(i, int(c)) + lin_name
            info["stored_as"] = form_label(reader, base, names)
            if isinstance(lin, StoredLinear) and lin.kept:
                continue  # kept quantized: re-encoded by the fold (merge._refit_down), held above
            tensors, _ = encode_like(reader, base, lin.weight.detach(), names)
            held.update(tensors)
            # the layer now holds what was written (re-quantized where stored quantized): --sequential runs it
            # to gather the next layer's statistics on the pruned layers as written
            lin.weight.data.copy_(LayerView(reader, tensors).weight(base + ".weight", lin.weight.dtype))
    for name, t in pruned_layer_tensors(LayerView(reader, held), adapter, i, kept):
        w.add(name, t)
    del held
    w.end_shard()


def write_from_checkpoint(w: CheckpointWriter, reader: CheckpointReader, adapter, i: int,
                          kept: list[int] | None) -> None:
    """Layer i read again as stored, each tensor when the writer writes it: pruned to ``kept``, or
    copied (dense)."""
    if kept is None:
        for name in sorted(reader.layer_names(i)):
            w.add(name, read_later(reader, name))
    else:
        for name, t in pruned_layer_tensors(reader, adapter, i, kept, deferred=True):
            w.add(name, t)
    w.end_shard()

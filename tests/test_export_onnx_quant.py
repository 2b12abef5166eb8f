"""Quantized checkpoints for the export tests, and their fake-quant reference forward.

Until ``moepress quantize`` (issue #5) lands, the exporters are tested on checkpoints written
here following the quantized-checkpoint contract (Model-Optimizer's unified HF layout):
``fp8``: ``P.weight`` F8_E4M3, ``P.weight_scale`` F32 [] (amax / 448), ``P.input_scale`` F32 [];
``int4-awq``: ``P.weight`` U8 [out, in/2] (two signed int4 per byte, low nibble first),
``P.weight_scale`` [out, in/group], ``P.pre_quant_scale`` [in]. The reference is the streamed
forward over a float32 copy holding the dequantized weights, with FP8 input fake-quant hooks
(x / s, clamp +-448, round to FP8, * s) — what StreamedModel(qdir) computes once the quantize
stage registers its decoders and preparer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.compress.stream import StreamedModel

FP8 = torch.float8_e4m3fn
INPUT_AMAX = 6.0  # a static activation range; values beyond it saturate in both forwards


def is_quantizable(name: str, t_shape) -> bool:
    return name.startswith("model.layers.") and name.endswith(".weight") and len(t_shape) == 2 \
        and not name.endswith(".gate.weight")


def quantize_fp8(w: torch.Tensor):
    s = (w.float().abs().amax() / 448.0).clamp(min=1e-12)
    return (w.float() / s).clamp(-448, 448).to(FP8), s.reshape(())


def quantize_int4(w: torch.Tensor, group: int, pqs: torch.Tensor):
    wf = w.float() / pqs[None, :]  # AWQ: the weight absorbs 1/pre_quant_scale, the input is multiplied by it
    g = wf.view(w.shape[0], -1, group)
    s = (g.abs().amax(-1) / 7.0).clamp(min=1e-8)
    q = (g / s[..., None]).round().clamp(-8, 7).to(torch.int8).view(w.shape)
    u = q.to(torch.int16) & 0xF
    packed = (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)
    return q, packed, s


def make_quantized(src: Path, qdir: Path, ref: Path, fmt: str, group: int = 32) -> tuple[Path, Path]:
    """Write ``qdir`` (quantized per the contract) and ``ref`` (float32 dequantized weights)."""
    r = CheckpointReader(src)
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(qdir, force=True) as wq, CheckpointWriter(ref, force=True) as wr:
        for name in r.names():
            t = r.get(name)
            if not is_quantizable(name, t.shape):
                wq.add(name, t)
                wr.add(name, t.float())
                continue
            p = name[: -len(".weight")]
            if fmt == "fp8":
                q, s = quantize_fp8(t)
                wq.add(name, q)
                wq.add(p + ".weight_scale", s)
                wq.add(p + ".input_scale", torch.tensor(INPUT_AMAX / 448.0))
                wr.add(name, q.float() * s)
            else:
                pqs = 0.5 + torch.rand(t.shape[1], generator=gen)
                q, packed, s = quantize_int4(t, group, pqs)
                wq.add(name, packed)
                wq.add(p + ".weight_scale", s.to(torch.bfloat16))
                wq.add(p + ".pre_quant_scale", pqs.to(torch.bfloat16))
                s, pqs = s.to(torch.bfloat16).float(), pqs.to(torch.bfloat16).float()
                wr.add(name, q.float() * s.repeat_interleave(group, 1) * pqs[None, :])
        for w in (wq, wr):
            w.write_json("config.json", r.config)
            w.copy_aux_files(src)
    return qdir, ref


def reference_forward(qdir: Path, ref: Path, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fake-quant forward: dequantized weights + FP8 input fake-quant where input_scale is stored."""
    qr = CheckpointReader(qdir)
    stream = StreamedModel(ref)
    a = get_adapter(qr.config)

    def hooks(i, layer):
        for mod_name, mod in layer.named_modules():
            key = a.layer_prefix(i) + mod_name + ".input_scale"
            if isinstance(mod, torch.nn.Linear) and key in qr:
                s = float(qr.get(key))
                mod.register_forward_pre_hook(
                    lambda m, args, s=s: ((args[0] / s).clamp(-448, 448).to(FP8).float() * s,))

    return stream.forward(batches, before_layer=hooks)

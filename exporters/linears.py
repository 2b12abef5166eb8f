"""One stored linear read back from a checkpoint, whatever wrote it: bf16, a ``moepress quantize``
output (Model-Optimizer's layout: ``weight`` + ``weight_scale`` [+ ``input_scale``,
``pre_quant_scale``]) or a DeepSeek / Kimi native block-FP8 checkpoint (``weight_scale_inv``).

What each stored tensor means is the format's (compress/formats/: one module per format); the
exporters that rewrite weights tensor by tensor (trtllm-ckpt, onnx) only need the weight's scale
granularity, the values of ``Format.scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepress.compress import formats
from moepress.compress.checkpoint import DTYPE_NAMES, CheckpointReader
from moepress.compress.quant import int4
from moepress.compress.quant.fp8 import DEFAULT_BLOCK, block_grid, block_size_of, dequantize_block
from moepress.compress.quantize.config import GROUP_SIZES
from moepress.errors import MoepressError
from moepress.exporters.hints import fp4_routes

# the weight-scale granularities of an E4M3 weight (per tensor, per output channel, per 128x128 block)
FP8_SCALES = ("tensor", "channel", "block")
# the scale dtypes of a packed (uint8) weight that holds FP4 elements: NVFP4's E4M3, MXFP4's E8M0 bytes
FP4_SCALE_DTYPES = (torch.float8_e4m3fn, torch.uint8)


def stored_name(scheme: str) -> str:
    """How export summaries and messages name a linear stored with ``scheme``: the one format that
    stores its weight at that granularity in Model-Optimizer's layout (per tensor, channel, block:
    the three FP8 formats), else the element the formats sharing it store (group: int4)."""
    if scheme == "none":
        return scheme
    same = [f for f in formats.FORMATS.values() if f.scale == scheme and f.decode is not None]
    return same[0].name if len(same) == 1 else same[0].element


@dataclass
class Linear:
    """One stored linear. ``scheme``: its weight-scale granularity — ``none`` (unquantized),
    ``tensor`` / ``channel`` / ``block`` (E4M3 weight), ``group`` (INT4 weight, unpacked here)."""

    scheme: str
    weight: torch.Tensor  # float (none), float8 (tensor, channel, block), int8 unpacked [out, in] (group)
    scale: torch.Tensor | None = None  # tensor: []; channel: [out, 1]; block: [ro, ci]; group: [out, in/g]
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None

    @property
    def stored_as(self) -> str:
        return stored_name(self.scheme)

    def dequantize(self) -> torch.Tensor:
        """The float weight of an unquantized or E4M3 linear (trtllm-ckpt's inputs; the ONNX graph dequantizes
        INT4 groups and AWQ's pre_quant_scale itself)."""
        if self.scheme == "none":
            return self.weight.float()
        if self.scheme in ("tensor", "channel"):
            return self.weight.float() * self.scale.float()
        if self.scheme == "block":
            return dequantize_block(self.weight, self.scale)
        raise ValueError(f"Linear.dequantize: scheme {self.scheme!r} has no float form here")


def _fp8_scheme(reader: CheckpointReader, prefix: str, s: torch.Tensor) -> str:
    """The granularity of an E4M3 weight's ``weight_scale``: the quantize stage's sidecar says which
    (shapes alone are ambiguous: [2, 1] blocks vs per-channel), else the scale's shape."""
    fmt = formats.FORMATS.get(((formats.layout_of(reader) or {}).get("modules", {}).get(prefix) or {}).get("format"))
    if fmt is not None and fmt.scale in FP8_SCALES:
        return fmt.scale
    rows = reader.info(prefix + ".weight").shape[0]
    return "tensor" if s.numel() == 1 else "channel" if tuple(s.shape) in ((rows, 1), (rows,)) else "block"


def read_linear(reader: CheckpointReader, prefix: str, flag: str = "", accepts: str = "bf16, FP8 or INT4") -> Linear:
    """The linear stored under ``prefix`` (``...q_proj``) as the quantized-checkpoint contract says. ``flag``
    (``--format trtllm-ckpt``) and ``accepts`` (what that exporter writes) word the refusal of FP4 weights."""
    name = prefix + ".weight"
    if name not in reader:
        raise MoepressError(f"{reader.path}: tensor '{name}' is missing from the checkpoint")
    code = reader.info(name).dtype

    def opt(suffix):
        return reader.get(prefix + suffix) if prefix + suffix in reader else None

    if code == "F8_E4M3":
        if prefix + ".weight_scale_inv" in reader:
            block = block_size_of(reader.config)
            if block != DEFAULT_BLOCK:  # Linear.dequantize and the ONNX graph: 128 x 128
                raise MoepressError(f"{reader.path}: config.json quantization_config.weight_block_size is "
                                    f"{list(block)}; expected {list(DEFAULT_BLOCK)} "
                                    "(DeepSeek-V3's block-FP8 blocks, the only ones this exporter writes)")
            return Linear("block", reader.get(name), reader.get(prefix + ".weight_scale_inv"))
        s = opt(".weight_scale")
        if s is None:
            raise MoepressError(f"{reader.path}: FP8 tensor '{name}' has no weight_scale")
        scheme = _fp8_scheme(reader, prefix, s)
        # a channel scale stored [out] (Model-Optimizer's) or [out, 1]; a block grid [ro, ci] (ours) or
        # [ro, 1, ci, 1] (Model-Optimizer's, which the hf-modelopt export writes)
        shaped = {"tensor": (), "channel": (-1, 1)}
        s = s.float().reshape(shaped[scheme]) if scheme in shaped else block_grid(s.float())
        return Linear(scheme, reader.get(name), s, opt(".input_scale"))
    if code == "U8":
        s = opt(".weight_scale")
        if s is None:
            raise MoepressError(f"{reader.path}: packed tensor '{name}' has no weight_scale")
        if s.dtype in FP4_SCALE_DTYPES:  # E4M3 (NVFP4) / E8M0 (MXFP4) scales: FP4 elements, not INT4
            fp4 = "MXFP4" if s.dtype == torch.uint8 else "NVFP4"
            raise MoepressError(f"{flag + ': ' if flag else ''}{reader.path}: '{name}' is {fp4}, which this exporter "
                                f"cannot write; expected {accepts}{fp4_routes(reader, fp4)}")
        if s.dtype != torch.float32:
            raise MoepressError(f"{reader.path}: packed tensor '{name}' has a {str(s.dtype).removeprefix('torch.')} "
                                "weight_scale; expected float32 (INT4), float8_e4m3fn (NVFP4) or uint8 (MXFP4's E8M0)")
        w = int4.unpack_int4(reader.get(name))
        cols, width = s.shape[-1], w.shape[-1]
        if width % cols or (cols > 1 and width // cols not in GROUP_SIZES):
            # a partial last group would be read as groups of width // cols: other numbers than the checkpoint's
            raise MoepressError(f"{reader.path}: INT4 tensor '{name}' has {cols} scale groups over in_features "
                                f"{width}; expected whole groups of {', '.join(map(str, GROUP_SIZES))} (or one group)")
        return Linear("group", w, s.float(), opt(".input_scale"), opt(".pre_quant_scale"))
    t = reader.get(name)
    if not t.dtype.is_floating_point:  # int8 / int32 / bool values with no scales: not weights
        raise MoepressError(f"{reader.path}: tensor '{name}' is stored as {str(t.dtype).removeprefix('torch.')} with "
                            "no quantization scales beside it; expected bf16, fp16 or fp32, FP8 or INT4 with scales")
    return Linear("none", t)


__all__ = ["FP8_SCALES", "Linear", "read_linear", "stored_name"]


_FP4_SCALE_NAMES = {DTYPE_NAMES[d] for d in FP4_SCALE_DTYPES}  # as the shard headers spell them


def refuse_fp4(reader: CheckpointReader, adapter, flag: str, accepts: str) -> None:
    """The refusal :func:`read_linear` gives the first decoder-layer linear stored in FP4 (a U8 weight whose
    weight_scale is E4M3, NVFP4, or E8M0, MXFP4), found from the headers: an exporter that rewrites linears one by
    one (onnx, trtllm-ckpt) reaches it mid-export; asked first, it refuses before anything is written (and run's
    preflight, before the prune that keeps the stored bytes). The trunk's layers only (``adapter.num_layers``): the
    exporters write no MTP layer and no layer stored past the trunk. A compressed-tensors packed weight is read
    under its ``.weight`` name, as the exporters read it."""
    for i in range(adapter.num_layers):
        for n in reader.layer_names(i):
            base = n.removesuffix("_packed").removesuffix(".weight") if n.endswith((".weight", ".weight_packed")) \
                else None
            if base is not None and reader.info(base + ".weight").dtype == "U8" and base + ".weight_scale" in reader \
                    and reader.info(base + ".weight_scale").dtype in _FP4_SCALE_NAMES:
                read_linear(reader, base, flag, accepts)
                return


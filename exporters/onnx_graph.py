"""The ONNX graph the onnx exporter assembles (exporters/onnx_export.py): initializers written
straight to the external data file as they are made, and the weight forms with Q/DQ.

External data: location / offset / length in each TensorProto (onnx/onnx ``docs/ExternalData.md``);
tensors smaller than ``external_min_bytes`` stay inline. Weight forms (ONNX operator spec,
DequantizeLinear / QuantizeLinear, opset 21), by the stored weight-scale granularity
(exporters/linears.py):

* ``none``: stored in the checkpoint's dtype (bf16) + ``Cast`` to float32;
* ``tensor`` (FP8): FLOAT8E4M3FN initializer + DequantizeLinear (scalar scale); a static input
  scale adds QuantizeLinear/DequantizeLinear (FLOAT8E4M3FN, saturating) on the activation,
  which is what the fake-quant forward computes (x / s, clamp to +-448, round, * s);
* ``channel`` (FP8): DequantizeLinear with a per-axis scale (axis 0);
* ``block`` (FP8 128x128): the block scale repeated over rows -> DequantizeLinear with
  ``block_size=128`` on axis 1 (same values; DQ blocks one axis only);
* ``group`` (INT4): INT4 initializer (two per byte, low nibble first, ONNX's INT4 packing)
  + DequantizeLinear ``axis=1, block_size=group``; AWQ's ``pre_quant_scale`` multiplies the input.

Stacked quantized experts are dequantized one 2-D weight per DequantizeLinear and concatenated to
[E, out, in] (TensorRT's DQ takes scales of rank <= 2); activation Q/DQ is per tensor: one shared
scale, or one per expert on that expert's slice.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quant import fp4
from moepress.errors import MoepressError
from moepress.exporters.kernel_widths import TENSORRT_INT4_BLOCKS
from moepress.exporters.linears import Linear, read_linear, stored_name

FLOAT = TensorProto.FLOAT
# what the graph holds (onnx_export.refuse_dynamic_inputs says the same): the words of read_linear's FP4 refusal
WRITES = "fp8 (static input scales), int4-awq, int4-gptq, w4a8-awq or bf16"
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16,
               torch.float16: TensorProto.FLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
               torch.int64: TensorProto.INT64, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8}


# ---- pure tensor functions -------------------------------------------------------------------
def pack_int4_onnx(q: torch.Tensor) -> bytes:
    """int8 values in [-8, 7] -> ONNX INT4 raw data (element 2i in the low nibble of byte i)."""
    return fp4.pack(q.reshape(-1).to(torch.int16) & 0xF).numpy().tobytes()


# ---- a graph written as it is built ----------------------------------------------------------
class Graph:
    """Nodes and initializers; initializer data goes straight to the external data file."""

    def __init__(self, data_path: Path, external_min_bytes: int = 1024):
        self.nodes: list = []
        self.inits: list = []
        self.data_path = data_path
        self.data = open(data_path, "wb")
        self.offset = 0
        self.min_bytes = external_min_bytes
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def init(self, name: str, t: torch.Tensor, onnx_type: int | None = None, dims=None,
             raw: bytes | None = None) -> str:
        t = t.detach().contiguous()
        tp = TensorProto()
        tp.name = name
        tp.data_type = onnx_type if onnx_type is not None else _ONNX_DTYPE[t.dtype]
        tp.dims.extend(list(dims if dims is not None else t.shape))
        if raw is None:
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        if len(raw) >= self.min_bytes:
            self.data.write(raw)
            for k, v in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
                e = tp.external_data.add()
                e.key, e.value = k, v
            tp.data_location = TensorProto.EXTERNAL
            self.offset += len(raw)
        else:
            tp.raw_data = raw
        self.inits.append(tp)
        return name

    def const(self, values, dtype=np.int64) -> str:
        name = self.name("c")
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, out: list[str] | None = None, **attrs):
        outs = out or [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def close(self) -> None:
        self.data.close()


# TensorRT's Q/DQ rules (kernel_widths.TENSORRT_INT4_BLOCKS: INT4 weights only, per-block scales of 64 or 128;
# operators/docs/Dequantize.html: a 2-D scale is "block quantization (supported for DataType::kINT4 only)").
# TensorRT reads the block as in_features // scale columns (``_block_dq``).
TENSORRT_CHECKED = "11.3"


# ---- weights as graph pieces -------------------------------------------------------------------
class GraphBuilder:
    """Graph pieces that read the checkpoint: weights (with their Q/DQ), linears, RMSNorm."""

    def __init__(self, g: Graph, reader: CheckpointReader, adapter):
        self.g, self.reader, self.a = g, reader, adapter
        self.schemes: set[str] = set()  # how the weights are stored (linears.stored_name), for export.json
        # (why TensorRT refuses a weight's DQ, what to do) -> the weights
        self.tensorrt_rejects: dict[tuple[str, str], list[str]] = {}
        self.weight_only_int4: list[str] = []  # INT4 linears behind an FP8 activation Q/DQ (w4a8-awq)

    def plain(self, name: str, t: torch.Tensor) -> str:
        """An unquantized tensor kept in its stored dtype, cast to float32 in the graph."""
        if t.dtype == torch.float32:
            return self.g.init(name, t)
        return self.g.op("Cast", [self.g.init(name, t)], to=FLOAT)

    def weight(self, name: str, lins: list[Linear], names: list[str] | None = None) -> str:
        """Float weight [out, in] (one linear) or [E, out, in] (stacked experts, ``names`` = each
        expert's tensor name; one expert too, E = 1: the experts' MatMul takes a 3-D weight) as graph value.

        Every DequantizeLinear is of one 2-D weight, as TensorRT's IDequantizeLayer takes them (NvInfer.h,
        TensorRT 10.x: scale "a rank that is lower or equal to 2", a block scale "the same rank as the
        input"): stacked quantized experts are dequantized one by one and concatenated."""
        g, stacked = self.g, names is not None
        scheme = lins[0].scheme
        odd = next((i for i, x in enumerate(lins) if x.scheme != scheme), None)
        if odd is not None:  # a layer's experts are one stacked weight: one scheme for all of them
            each = names or [name] * len(lins)
            how = [stored_name(s) if s != "none" else "unquantized" for s in (lins[odd].scheme, scheme)]
            raise MoepressError(f"{self.reader.path}: {each[odd]} is stored {how[0]} and {each[0]} {how[1]}; "
                                "the onnx export stacks a layer's experts, which takes one format for every expert: "
                                "quantize them alike (one format, or rules that give every expert of a layer the same)")
        self.schemes.add(stored_name(scheme))
        if stacked and scheme != "none":
            ws = [g.op("Unsqueeze", [self.weight(n, [x]), g.const([0])]) for n, x in zip(names, lins, strict=True)]
            return g.op("Concat", ws, axis=0)
        w = torch.stack([x.weight for x in lins]) if stacked else lins[0].weight
        if scheme == "none":
            return self.plain(name, w)
        lin = lins[0]
        if scheme == "tensor":
            return g.op("DequantizeLinear", [g.init(name, w), g.init(name + ".scale", lin.scale.reshape(()).float())])
        if scheme == "channel":
            return g.op("DequantizeLinear", [g.init(name, w), g.init(name + ".scale", lin.scale.reshape(-1).float())],
                        axis=0)
        if scheme == "block":
            self.tensorrt_rejects.setdefault(("FP8 weights with 2-D block scales (TensorRT dequantizes block-wise "
                                              "INT4 only)", "quantize to fp8 and export that"), []).append(name)
            return self._block_dq(name, w, lin.scale)
        # group (INT4): ONNX INT4 initializer, blocked DQ along the input axis (whole groups: read_linear)
        s = lin.scale.float()
        if (block := w.shape[-1] // s.shape[-1]) not in TENSORRT_INT4_BLOCKS:
            ok = " or ".join(map(str, TENSORRT_INT4_BLOCKS))
            self.tensorrt_rejects.setdefault((f"INT4 weights in blocks of {block} (TensorRT takes blocks of {ok})",
                                              f"quantize with --group-size {ok} (linears of fewer input features "
                                              f"than that: --rule PATTERN=none) and export that"), []).append(name)
        q = g.init(name, w, onnx_type=TensorProto.INT4, raw=pack_int4_onnx(w))
        return g.op("DequantizeLinear", [q, g.init(name + ".scale", s)], axis=1, block_size=w.shape[-1] // s.shape[-1])

    def _block_dq(self, name: str, w: torch.Tensor, scale: torch.Tensor) -> str:
        """128x128 block FP8 as a DequantizeLinear blocked along the input axis, one scale row per weight row.

        TensorRT's ONNX parser ignores ``block_size`` and takes the block as in_features // scale columns
        (onnx/onnx-tensorrt onnxOpImporters.cpp ``QuantDequantLinearHelper``, at 96e78110 and 0137504e),
        while ONNX (and onnxruntime) reads the last block as partial: with in_features 192 and two scale
        columns TensorRT would use blocks of 96. So the block is gcd(in_features, 128), each 128-column
        scale repeated over its blocks: whole blocks that both read alike, the same numbers."""
        b = math.gcd(w.shape[1], 128)
        s = scale.float().repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128 // b, 1)[:, : w.shape[1] // b]
        return self.g.op("DequantizeLinear", [self.g.init(name, w), self.g.init(name + ".scale", s.contiguous())],
                         axis=1, block_size=b)

    def act_qdq(self, x: str, name: str, lins: list[Linear], flat: bool = False) -> str:
        """Static FP8 input fake-quant (and AWQ pre-quant scaling) in front of a linear."""
        g = self.g
        if lins[0].pre_quant_scale is not None:
            pqs = torch.stack([x_.pre_quant_scale.float() for x_ in lins])
            x = g.op("Mul", [x, g.init(name + ".pre_quant_scale", pqs[:, None, :] if len(lins) > 1 else pqs[0])])
        if lins[0].input_scale is None:  # static FP8 input: fp8 (E4M3 weights) and w4a8-awq (INT4 weights)
            return x
        # per-tensor: TensorRT quantizes activations per tensor only (a scalar scale), so experts with
        # one input scale (every `moepress quantize` output) share one Q/DQ, others get one each
        if lins[0].scheme == "group":
            self.weight_only_int4.append(name)
        scales = [x_.input_scale.float().reshape(()) for x_ in lins]
        if all(torch.equal(v, scales[0]) for v in scales):
            return self.qdq(x, name, scales[0])
        if flat and lins[0].pre_quant_scale is None:  # x is [T, H]: every expert gets its copy [E, T, H]
            x = g.op("Expand", [g.op("Unsqueeze", [x, g.const([0])]), g.const([len(lins), 1, 1])])
        parts = g.op("Split", [x], n_out=len(lins), axis=0, num_outputs=len(lins))
        return g.op("Concat", [self.qdq(p, f"{name}.{e}", v)
                               for e, (p, v) in enumerate(zip(parts, scales, strict=True))], axis=0)

    def qdq(self, x: str, name: str, scale: torch.Tensor) -> str:
        """FP8 E4M3 Q/DQ of ``x`` with one scalar scale."""
        g = self.g
        s = g.init(name + ".input_scale", scale)
        zp = g.init(name + ".input_zp", torch.zeros((), dtype=torch.float8_e4m3fn))
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, zp]), s])

    def read(self, prefix: str) -> Linear:
        """The linear under ``prefix``; an FP4 one is refused as this export's (``--format onnx: ...``)."""
        return read_linear(self.reader, prefix, "--format onnx", WRITES)

    def linear(self, x: str, prefix: str) -> str:
        lin = self.read(prefix)
        x = self.act_qdq(x, prefix, [lin])
        w = self.weight(prefix + ".weight", [lin])
        y = self.g.op("MatMul", [x, self.g.op("Transpose", [w], perm=[1, 0])])
        b = prefix + ".bias"  # e.g. Qwen3-MoE's q/k/v/o under attention_bias: true
        return self.g.op("Add", [y, self.plain(b, self.reader.get(b))]) if b in self.reader else y

    def rmsnorm(self, x: str, wname: str, eps: float) -> str:
        g = self.g
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        y = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [self.plain(wname, self.reader.get(wname)), y])


__all__ = ["FLOAT", "TENSORRT_CHECKED", "TENSORRT_INT4_BLOCKS", "WRITES", "Graph", "GraphBuilder", "pack_int4_onnx"]

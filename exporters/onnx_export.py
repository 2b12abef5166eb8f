"""ONNX export for TensorRT (and onnxruntime): the whole (pruned, quantized) model with Q/DQ.

The graph is assembled by hand, one decoder layer at a time from the layer stream: each
layer's weights are read, appended to ``model.onnx.data`` (ONNX external data: location /
offset / length in each TensorProto, onnx/onnx ``docs/ExternalData.md``) and dropped, so the
exporter holds one layer's tensors whatever the model's size; ``model.onnx`` keeps only the
graph. Tensors smaller than ``--option external_min_bytes`` (default 1024) stay inline.

Contract (calib/checks/candidates.py): input ``input_ids`` int64 [B, S] -> ``logits`` [B, S, V]
and ``hidden_states.{i}`` [B, S, H] (decoder layer i's output, before the final norm).

Weights (ONNX operator spec, DequantizeLinear / QuantizeLinear, opset 21):
* unquantized: stored in the checkpoint's dtype (bf16) + ``Cast`` to float32;
* FP8 per-tensor: FLOAT8E4M3FN initializer + DequantizeLinear (scalar scale); a static input
  scale adds QuantizeLinear/DequantizeLinear (FLOAT8E4M3FN, saturating) on the activation,
  which is what the fake-quant forward computes (x / s, clamp to +-448, round, * s);
* FP8 per-channel (fp8-dynamic weights): DequantizeLinear with a per-axis scale (axis 0);
* FP8 128x128 blocks: the block scale repeated over rows -> DequantizeLinear with
  ``block_size=128`` on axis 1 (same values; DQ blocks one axis only);
* INT4 (AWQ/GPTQ groups): INT4 initializer (two per byte, low nibble first, ONNX's INT4 packing)
  + DequantizeLinear ``axis=1, block_size=group``; AWQ's ``pre_quant_scale`` multiplies the input.
Stacked experts ([E, out, in]) use the same forms with a leading expert axis.

MoE routing is in the graph: router logits (float32) -> the family's routing (softmax top-k,
renormalised for Qwen3-MoE/Mixtral; DeepSeek-V3 sigmoid + correction bias + group top-k +
renormalise x routed_scaling_factor) -> a dense gate matrix [T, E] (ScatterElements of the top-k
weights, zeros elsewhere) -> every expert computed densely as batched MatMuls over the stacked
expert weights, weighted by the gate matrix and summed. Why dense: static shapes (no
data-dependent token gather/NonZero), which TensorRT builds and fuses well, and exactly the
routing math; the cost is E/top_k times the expert FLOPs and an [E, T, I] activation, fine for
validation and small batches; a TopK+Gather of per-token expert weights would need
[T, k, I, H] weight copies instead, worse in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader
from moepress.errors import MoepressError
from moepress.exporters import register_exporter
from moepress.exporters.trtllm_ckpt import Linear, read_linear

FLOAT = TensorProto.FLOAT
_ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16,
               torch.float16: TensorProto.FLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
               torch.int64: TensorProto.INT64, torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8}


# ---- pure tensor functions -------------------------------------------------------------------
def pack_int4_onnx(q: torch.Tensor) -> bytes:
    """int8 values in [-8, 7] -> ONNX INT4 raw data (element 2i in the low nibble of byte i)."""
    flat = q.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8).numpy().tobytes()


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


# ---- layers as graph pieces ------------------------------------------------------------------
class Builder:
    def __init__(self, g: Graph, reader: CheckpointReader, adapter):
        self.g, self.reader, self.a = g, reader, adapter
        self.schemes: set[str] = set()

    # weights --------------------------------------------------------------------------------
    def plain(self, name: str, t: torch.Tensor) -> str:
        """An unquantized tensor kept in its stored dtype, cast to float32 in the graph."""
        if t.dtype == torch.float32:
            return self.g.init(name, t)
        return self.g.op("Cast", [self.g.init(name, t)], to=FLOAT)

    def weight(self, name: str, lins: list[Linear]) -> str:
        """Float weight [out, in] (one linear) or [E, out, in] (stacked experts) as graph value."""
        g, stacked = self.g, len(lins) > 1
        scheme = lins[0].scheme
        if any(x.scheme != scheme for x in lins):
            raise MoepressError(f"{self.reader.path}: '{name}' mixes quantization schemes across experts")
        self.schemes.add(scheme)
        cat = (lambda ts: torch.stack(ts)) if stacked else (lambda ts: ts[0])  # noqa: E731
        w = cat([x.weight for x in lins])
        axis = w.dim() - 1
        if scheme == "none":
            return self.plain(name, w)
        if scheme == "fp8":
            q = g.init(name, w)
            s = g.init(name + ".scale", torch.stack([x.scale.reshape(()) for x in lins]) if stacked
                       else lins[0].scale.reshape(()).float())
            return g.op("DequantizeLinear", [q, s], axis=0) if stacked else g.op("DequantizeLinear", [q, s])
        if scheme == "fp8-dynamic":
            s = cat([x.scale.reshape(-1) for x in lins])
            if stacked:  # per (expert, row) scale: blocked DQ with block 1 on the row axis
                return g.op("DequantizeLinear", [g.init(name, w), g.init(name + ".scale", s[..., None].float())],
                            axis=axis, block_size=w.shape[-1])
            return g.op("DequantizeLinear", [g.init(name, w), g.init(name + ".scale", s.float())], axis=0)
        if scheme == "fp8-block":
            s = cat([x.scale.float().repeat_interleave(128, 0)[: x.weight.shape[0]] for x in lins])
            return g.op("DequantizeLinear", [g.init(name, w), g.init(name + ".scale", s)], axis=axis, block_size=128)
        # int4: ONNX INT4 initializer, blocked DQ along the input axis
        s = cat([x.scale for x in lins]).float()
        group = w.shape[-1] // s.shape[-1]
        q = g.init(name, w, onnx_type=TensorProto.INT4, raw=pack_int4_onnx(w))
        return g.op("DequantizeLinear", [q, g.init(name + ".scale", s)], axis=axis, block_size=group)

    def act_qdq(self, x: str, name: str, lins: list[Linear], flat: bool = False) -> str:
        """Static FP8 input fake-quant (and AWQ pre-quant scaling) in front of a linear."""
        g = self.g
        if lins[0].pre_quant_scale is not None:
            pqs = torch.stack([x_.pre_quant_scale.float() for x_ in lins])
            x = g.op("Mul", [x, g.init(name + ".pre_quant_scale", pqs[:, None, :] if len(lins) > 1 else pqs[0])])
        if lins[0].scheme != "fp8" or lins[0].input_scale is None:
            return x
        zp_t = torch.zeros((len(lins),) if len(lins) > 1 else (), dtype=torch.float8_e4m3fn)
        if len(lins) > 1:
            s = g.init(name + ".input_scale", torch.stack([x_.input_scale.float().reshape(()) for x_ in lins]))
            if flat and lins[0].pre_quant_scale is None:  # x is [T, H]: every expert gets its copy [E, T, H]
                x = g.op("Expand", [g.op("Unsqueeze", [x, g.const([0])]), g.const([len(lins), 1, 1])])
            zp = g.init(name + ".input_zp", zp_t)
            return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, zp], axis=0), s], axis=0)
        s = g.init(name + ".input_scale", lins[0].input_scale.float().reshape(()))
        zp = g.init(name + ".input_zp", zp_t)
        return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, zp]), s])

    def linear(self, x: str, prefix: str) -> str:
        lin = read_linear(self.reader, prefix)
        x = self.act_qdq(x, prefix, [lin])
        w = self.weight(prefix + ".weight", [lin])
        return self.g.op("MatMul", [x, self.g.op("Transpose", [w], perm=[1, 0])])

    def rmsnorm(self, x: str, wname: str, eps: float) -> str:
        g = self.g
        var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
        y = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])])
        return g.op("Mul", [self.plain(wname, self.reader.get(wname)), y])

    # rotary ---------------------------------------------------------------------------------------
    def rotary(self, ids: str) -> tuple[str, str]:
        """cos, sin [S, D/2] of positions 0..S-1 (the family's inv_freq and attention scaling)."""
        g = self.g
        rot = self.a.build_rotary()
        inv = rot.inv_freq.float()
        s = g.op("Gather", [g.op("Shape", [ids]), g.const(1)], axis=0)
        pos = g.op("Cast", [g.op("Range", [g.const(0), s, g.const(1)])], to=FLOAT)
        freqs = g.op("Mul", [g.op("Unsqueeze", [pos, g.const([1])]), g.init("rotary.inv_freq", inv[None, :])])
        scale = g.const(float(getattr(rot, "attention_scaling", 1.0)), np.float32)
        self.causal = self.causal_mask(s)
        return g.op("Mul", [g.op("Cos", [freqs]), scale]), g.op("Mul", [g.op("Sin", [freqs]), scale])

    def causal_mask(self, s: str) -> str:
        g = self.g
        r = g.op("Range", [g.const(0), s, g.const(1)])
        later = g.op("Greater", [g.op("Unsqueeze", [r, g.const([0])]), g.op("Unsqueeze", [r, g.const([1])])])
        return g.op("Where", [later, g.const(float("-inf"), np.float32), g.const(0.0, np.float32)])

    def rope_half(self, x: str, cos: str, sin: str, d: int) -> str:
        """Non-interleaved (GPT-NeoX) rotary: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)."""
        g = self.g
        c, s = g.op("Concat", [cos, cos], axis=-1), g.op("Concat", [sin, sin], axis=-1)
        x1 = g.op("Slice", [x, g.const([0]), g.const([d // 2]), g.const([-1])])
        x2 = g.op("Slice", [x, g.const([d // 2]), g.const([d]), g.const([-1])])
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, c]), g.op("Mul", [rot, s])])

    def rope_interleave(self, x: str, cos: str, sin: str, d: int) -> str:
        """DeepSeek's interleaved pairs (transformers' apply_rotary_pos_emb_interleave)."""
        g = self.g
        x1 = g.op("Slice", [x, g.const([0]), g.const([d]), g.const([-1]), g.const([2])])
        x2 = g.op("Slice", [x, g.const([1]), g.const([d]), g.const([-1]), g.const([2])])
        a = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
        b = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
        return g.op("Concat", [a, b], axis=-1)

    # attention ------------------------------------------------------------------------------------
    def sdpa(self, q: str, k: str, v: str, scaling: float) -> str:
        """q, k, v [B, heads, S, d] -> [B, S, heads * dv] (causal softmax attention)."""
        g = self.g
        att = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                           g.const(scaling, np.float32)])
        p = g.op("Softmax", [g.op("Add", [att, self.causal])], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
        return g.op("Reshape", [o, g.const([0, 0, -1])])

    def heads(self, x: str, n: int, d: int) -> str:
        return self.g.op("Transpose", [self.g.op("Reshape", [x, self.g.const([0, 0, n, d])])], perm=[0, 2, 1, 3])

    def attention(self, i: int, x: str, cos: str, sin: str) -> str:
        g, c, a = self.g, self.a.hf_config, self.a
        p = a.layer_prefix(i) + "self_attn."
        with torch.device("meta"):
            scaling = float(a.build_attention(i).scaling)
        nh = int(c.num_attention_heads)
        if a.family == "deepseek_v3":
            nope, rope, dv, rank = (int(c.qk_nope_head_dim), int(c.qk_rope_head_dim), int(c.v_head_dim),
                                    int(c.kv_lora_rank))
            if c.q_lora_rank:
                qa = self.rmsnorm(self.linear(x, p + "q_a_proj"), p + "q_a_layernorm.weight", 1e-6)
                q = self.linear(qa, p + "q_b_proj")
            else:
                q = self.linear(x, p + "q_proj")
            q = self.heads(q, nh, nope + rope)
            q_pass, q_rot = g.op("Split", [q, g.const([nope, rope])], n_out=2, axis=-1)
            ckv = self.linear(x, p + "kv_a_proj_with_mqa")
            kv_nope, k_rot = g.op("Split", [ckv, g.const([rank, rope])], n_out=2, axis=-1)
            kv = self.linear(self.rmsnorm(kv_nope, p + "kv_a_layernorm.weight", 1e-6), p + "kv_b_proj")
            kv = self.heads(kv, nh, nope + dv)
            k_pass, v = g.op("Split", [kv, g.const([nope, dv])], n_out=2, axis=-1)
            k_rot = g.op("Unsqueeze", [k_rot, g.const([1])])  # [B, 1, S, rope]
            rope_fn = self.rope_interleave if getattr(c, "rope_interleave", True) else self.rope_half
            q_rot, k_rot = rope_fn(q_rot, cos, sin, rope), rope_fn(k_rot, cos, sin, rope)
            k_rot = g.op("Expand", [k_rot, g.const([1, nh, 1, 1])])
            q = g.op("Concat", [q_pass, q_rot], axis=-1)
            k = g.op("Concat", [k_pass, k_rot], axis=-1)
        else:
            nkv = int(c.num_key_value_heads)
            hd = int(getattr(c, "head_dim", None) or c.hidden_size // nh)
            q, k, v = (self.heads(self.linear(x, p + f"{n}_proj"), h, hd)
                       for n, h in (("q", nh), ("k", nkv), ("v", nkv)))
            if a.family == "qwen3_moe":  # per-head RMSNorm on q and k before rotary
                eps = float(c.rms_norm_eps)
                q, k = self.rmsnorm(q, p + "q_norm.weight", eps), self.rmsnorm(k, p + "k_norm.weight", eps)
            q, k = self.rope_half(q, cos, sin, hd), self.rope_half(k, cos, sin, hd)
            if nkv != nh:  # GQA: repeat each kv head nh/nkv times
                rep = g.const([1, 1, nh // nkv, 1, 1])
                k, v = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), rep]),
                                         g.const([0, nh, -1, hd])]) for t in (k, v))
        return self.linear(self.sdpa(q, k, v, scaling), p + "o_proj")

    # feed-forward ---------------------------------------------------------------------------------
    def mlp(self, x: str, prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> str:
        gt, up, dn = (self.linear(x, prefix + n) if n != names[2] else None for n in names)
        h = self.g.op("Mul", [self.g.op("Mul", [gt, self.g.op("Sigmoid", [gt])]), up])
        return self.linear(h, prefix + names[2])

    def route(self, i: int, x2: str) -> str:
        """Dense gate matrix [T, E]: the routing weights at the chosen experts, zeros elsewhere."""
        g, a = self.g, self.a
        r = a.routing()
        rp = a.router_prefix(i)
        logits = g.op("MatMul", [x2, g.op("Transpose", [self.plain(rp + "weight", self.reader.get(rp + "weight"))],
                                                          perm=[1, 0])])
        k = g.const([a.top_k])
        if r["scoring"] == "softmax":
            w, idx = g.op("TopK", [g.op("Softmax", [logits], axis=-1), k], n_out=2, axis=-1)
            if r["renormalize"]:
                w = g.op("Div", [w, g.op("ReduceSum", [w, g.const([-1])], keepdims=1)])
        else:  # DeepSeek-V3 noaux_tc (compress/arch/deepseek_v3.py: sigmoid_group_topk)
            E, ng, kg = a.num_experts, int(r["n_group"]), int(r["topk_group"])
            scores = g.op("Sigmoid", [logits])
            bias = self.reader.get(rp + "e_score_correction_bias").float()
            choice = g.op("Add", [scores, g.init(rp + "e_score_correction_bias", bias)])
            grouped = g.op("Reshape", [choice, g.const([0, ng, E // ng])])
            top2, _ = g.op("TopK", [grouped, g.const([2])], n_out=2, axis=-1)
            gscore = g.op("ReduceSum", [top2, g.const([-1])], keepdims=0)
            _, gidx = g.op("TopK", [gscore, g.const([kg])], n_out=2, axis=-1)
            gzero = g.op("ConstantOfShape", [g.op("Shape", [gscore])], value=helper.make_tensor("z", FLOAT, [1], [0.0]))
            gones = g.op("Expand", [g.const(1.0, np.float32), g.op("Shape", [gidx])])
            gmask = g.op("ScatterElements", [gzero, gidx, gones], axis=1)
            emask = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [gmask, g.const([-1])]),
                                                     g.const([1, 1, E // ng])]), g.const([0, E])])
            masked = g.op("Where", [g.op("Equal", [emask, g.const(0.0, np.float32)]),
                                    g.const(float("-inf"), np.float32), choice])
            _, idx = g.op("TopK", [masked, k], n_out=2, axis=-1)
            w = g.op("GatherElements", [scores, idx], axis=1)
            if r["renormalize"]:
                den = g.op("Add", [g.op("ReduceSum", [w, g.const([-1])], keepdims=1), g.const(1e-20, np.float32)])
                w = g.op("Div", [w, den])
            w = g.op("Mul", [w, g.const(float(r["routed_scaling_factor"]), np.float32)])
        zeros = g.op("ConstantOfShape", [g.op("Shape", [logits])], value=helper.make_tensor("z", FLOAT, [1], [0.0]))
        return g.op("ScatterElements", [zeros, idx, w], axis=1)

    def moe(self, i: int, x: str) -> str:
        g, a = self.g, self.a
        gn, un, dn = a.expert_names
        E = a.num_experts
        x2 = g.op("Reshape", [x, g.const([-1, a.hidden_size])])
        gate = self.route(i, x2)  # [T, E]
        lins = {n: [read_linear(self.reader, a.expert_prefix(i, e) + n) for e in range(E)] for n in (gn, un, dn)}
        base = f"{a.layer_prefix(i)}{a.ffn_attr}.experts."

        def stacked(inp, n, flat):
            w = self.weight(f"{base}{n}.weight", lins[n])  # [E, out, in]
            xin = self.act_qdq(inp, f"{base}{n}", lins[n], flat)
            return g.op("MatMul", [xin, g.op("Transpose", [w], perm=[0, 2, 1])])  # [E, T, out]

        hg, hu = stacked(x2, gn, True), stacked(x2, un, True)
        h = g.op("Mul", [g.op("Mul", [hg, g.op("Sigmoid", [hg])]), hu])
        y = stacked(h, dn, False)  # [E, T, H]
        gw = g.op("Unsqueeze", [g.op("Transpose", [gate], perm=[1, 0]), g.const([2])])  # [E, T, 1]
        out = g.op("ReduceSum", [g.op("Mul", [y, gw]), g.const([0])], keepdims=0)
        out = g.op("Reshape", [out, g.op("Shape", [x])])
        if a.n_shared_experts():
            out = g.op("Add", [out, self.mlp(x, f"{a.layer_prefix(i)}{a.ffn_attr}.shared_experts.")])
        return out

    def layer(self, i: int, h: str, cos: str, sin: str) -> str:
        g, a = self.g, self.a
        p = a.layer_prefix(i)
        eps = float(a.hf_config.rms_norm_eps)
        h = g.op("Add", [h, self.attention(i, self.rmsnorm(h, p + "input_layernorm.weight", eps), cos, sin)])
        x = self.rmsnorm(h, p + "post_attention_layernorm.weight", eps)
        f = self.moe(i, x) if a.is_moe_layer(i) else self.mlp(x, f"{p}{a.ffn_attr}.", a.expert_names)
        return g.op("Add", [h, f])


@register_exporter("onnx", description="ONNX with QuantizeLinear/DequantizeLinear (FP8, INT4 block-wise, opset 21) "
                   "and MoE routing in the graph", consumers="TensorRT (trtexec / ONNX parser), onnxruntime")
def export_onnx(src: Path, writer, cfg, progress) -> dict:
    if cfg.opset < 21:
        raise MoepressError(f"--opset {cfg.opset}: the ONNX export needs opset 21 or newer "
                            f"(INT4 and block-wise DequantizeLinear)")
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config, reader.names())
    try:
        min_bytes = int(cfg.option("external_min_bytes", 1024))
    except ValueError:
        raise MoepressError(f"--option external_min_bytes={cfg.option('external_min_bytes')}: expected an "
                            f"integer byte count") from None
    g = Graph(writer.partial / "model.onnx.data", min_bytes)
    b = Builder(g, reader, adapter)
    outputs = []
    try:
        emb = g.op("Gather", [b.g.init(adapter.embed_name, reader.get(adapter.embed_name)), "input_ids"], axis=0)
        h = g.op("Cast", [emb], to=FLOAT)
        cos, sin = b.rotary("input_ids")
        H = adapter.hidden_size
        with progress.task("export onnx", adapter.num_layers) as task:
            for i in range(adapter.num_layers):
                h = b.layer(i, h, cos, sin)
                name = f"hidden_states.{i}"
                g.op("Identity", [h], out=[name])
                outputs.append(helper.make_tensor_value_info(name, FLOAT, ["batch", "sequence", H]))
                task.advance(note=f"layer {i}")
        hn = b.rmsnorm(h, adapter.norm_name, float(adapter.hf_config.rms_norm_eps))
        head = adapter.head_name if adapter.head_name in reader else adapter.embed_name
        w = b.plain(head + ".head" if head == adapter.embed_name else head, reader.get(head))
        g.op("MatMul", [hn, g.op("Transpose", [w], perm=[1, 0])], out=["logits"])
    finally:
        g.close()
    graph = helper.make_graph(
        g.nodes, f"moepress-{adapter.family}",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", "sequence", adapter.vocab_size]), *outputs],
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg.opset)], producer_name="moepress")
    model.ir_version = 10  # opset 21 needs IR >= 10 (INT4)
    onnx.save(model, str(writer.partial / "model.onnx"))
    writer.copy_aux_files(src)
    return {"onnx": {"file": "model.onnx", "external_data": g.data_path.name, "opset": cfg.opset,
                     "nodes": len(g.nodes), "initializers": len(g.inits), "data_bytes": g.offset,
                     "weight_schemes": sorted(b.schemes), "moe": "dense experts x scattered top-k gate"}}

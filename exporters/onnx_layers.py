"""Decoder layers as ONNX graph pieces (exporters/onnx_export.py): rotary, attention (GQA with
Qwen3's q/k norms; DeepSeek-V3's MLA), dense MLPs and the MoE with its routing in the graph.

Routing: router logits (float32) -> the family's routing (softmax top-k, renormalised for
Qwen3-MoE/Mixtral; DeepSeek-V3 sigmoid + correction bias + group top-k + renormalise x
routed_scaling_factor; compress/arch/deepseek_v3.py) -> a dense gate matrix [T, E]
(ScatterElements of the top-k weights, zeros elsewhere) -> every expert computed as batched
MatMuls over the stacked expert weights, weighted by the gate matrix and summed (why dense: see
exporters/onnx_export.py).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from moepress.exporters.onnx_graph import FLOAT, GraphBuilder


class LayerBuilder(GraphBuilder):
    """A decoder layer's graph: ``layer(i, h, cos, sin)`` after ``rotary(input_ids)``."""

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
        """[S, S] additive mask: -inf where key j > query i, and, when the config has a
        ``sliding_window`` w, where i - j >= w (transformers' masking_utils
        sliding_window_overlay, which Mixtral and Qwen3-MoE use: a key within w positions)."""
        g = self.g
        r = g.op("Range", [g.const(0), s, g.const(1)])
        d = g.op("Sub", [g.op("Unsqueeze", [r, g.const([1])]), g.op("Unsqueeze", [r, g.const([0])])])  # i - j
        masked = g.op("Less", [d, g.const(0)])
        w = getattr(self.a.hf_config, "sliding_window", None)
        if w is not None:
            masked = g.op("Or", [masked, g.op("Greater", [d, g.const(int(w) - 1)])])
        return g.op("Where", [masked, g.const(float("-inf"), np.float32), g.const(0.0, np.float32)])

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
        if a.latent_kv_cache:  # MLA
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
            if a.qk_norm:  # per-head RMSNorm on q and k before rotary
                eps = float(c.rms_norm_eps)
                q, k = self.rmsnorm(q, p + "q_norm.weight", eps), self.rmsnorm(k, p + "k_norm.weight", eps)
            q, k = self.rope_half(q, cos, sin, hd), self.rope_half(k, cos, sin, hd)
            if nkv != nh:  # GQA: repeat each kv head nh/nkv times
                rep = g.const([1, 1, nh // nkv, 1, 1])
                k, v = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), rep]),
                                         g.const([0, nh, -1, hd])]) for t in (k, v))
        return self.linear(self.sdpa(q, k, v, scaling), p + "o_proj")

    # feed-forward ---------------------------------------------------------------------------------
    def act(self, x: str) -> str:
        """The config's hidden_act (transformers' ACT2FN) in basic ops; onnx_export.refuse_activation
        refuses the others before anything is written."""
        g, name = self.g, getattr(self.a.hf_config, "hidden_act", "silu")
        if name in ("silu", "swish"):
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        if name == "relu":
            return g.op("Relu", [x])
        if name == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
            inner = g.op("Erf", [g.op("Mul", [x, g.const(float(1 / np.sqrt(2.0)), np.float32)])])
        else:  # gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
            cube = g.op("Mul", [g.op("Mul", [g.op("Mul", [x, x]), x]), g.const(0.044715, np.float32)])
            k = g.const(float(np.sqrt(2 / np.pi)), np.float32)
            inner = g.op("Tanh", [g.op("Mul", [g.op("Add", [x, cube]), k])])
        return g.op("Mul", [g.op("Mul", [x, g.const(0.5, np.float32)]), g.op("Add", [inner, g.const(1.0, np.float32)])])

    def mlp(self, x: str, prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> str:
        gt, up, dn = (self.linear(x, prefix + n) if n != names[2] else None for n in names)
        h = self.g.op("Mul", [self.act(gt), up])
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
        lins = {n: [self.read(a.expert_prefix(i, e) + n) for e in range(E)] for n in (gn, un, dn)}
        base = f"{a.layer_prefix(i)}{a.ffn_attr}.experts."

        def stacked(inp, n, flat):
            w = self.weight(f"{base}{n}.weight", lins[n], [f"{base}{e}.{n}.weight" for e in range(E)])  # [E, out, in]
            xin = self.act_qdq(inp, f"{base}{n}", lins[n], flat)
            return g.op("MatMul", [xin, g.op("Transpose", [w], perm=[0, 2, 1])])  # [E, T, out]

        hg, hu = stacked(x2, gn, True), stacked(x2, un, True)
        h = g.op("Mul", [self.act(hg), hu])
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


__all__ = ["LayerBuilder"]

"""A folded (re:) ignore pattern selects exactly the names it replaces, also where one
module name is a prefix of another (a router ``mlp.gate`` beside a dense ``mlp.gate_proj``)."""

from __future__ import annotations

from compressed_tensors.utils.match import match_name

from moepress.exporters.ct_ignore import COLLAPSE_AT, collapsed

PROJS = ("gate_proj", "up_proj", "down_proj")


def test_a_folded_router_pattern_does_not_select_a_quantized_dense_gate_proj():
    """Qwen3-MoE with a dense first layer (mlp_only_layers): layer 0's mlp.gate_proj quantized, every MoE
    layer's router mlp.gate and experts left bf16. ``re:...mlp\\.gate`` without its end anchor would select
    the quantized gate_proj too (compressed-tensors matches with re.match, a prefix match)."""
    ignore = [f"model.layers.{i}.mlp.gate" for i in range(1, 40)]
    ignore += [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(1, 40) for e in range(8) for p in PROJS]
    quantized = {f"model.layers.0.mlp.{p}" for p in PROJS} | {f"model.layers.{i}.self_attn.q_proj" for i in range(40)}
    assert len(ignore) > COLLAPSE_AT
    out = collapsed(ignore, quantized)
    assert any(e.startswith("re:") for e in out)
    for q in sorted(quantized):
        assert not any(match_name(q, e) for e in out), (q, [e for e in out if match_name(q, e)])
    for n in ignore:
        assert any(match_name(n, e) for e in out), n


def test_experts_left_bf16_in_every_layer_fold_into_one_pattern_per_projection():
    """A Kimi-sized list (61 layers x 384 experts x 3 projections, attention quantized): the layer number is
    varied as well as the expert's, so the list is 3 entries, not one per layer and projection."""
    ignore = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(1, 61) for e in range(384) for p in PROJS]
    quantized = {f"model.layers.{i}.self_attn.o_proj" for i in range(61)}
    out = collapsed(ignore, quantized)
    assert sorted(out) == sorted(f"re:model\\.layers\\.\\d+\\.mlp\\.experts\\.\\d+\\.{p}$" for p in PROJS), out[:5]

"""--awq-fold beyond the attention input (test_quant_folded_input_scale.py): the shared expert's static FP8
input_scale is that of the folded MoE input x * p, as the routed experts' are, and the rewritten router and
norms keep the input's stored dtype."""

import json

import pytest
import torch
from safetensors import safe_open

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

IDS = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))


def _tensors(d, names):
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for n in names:
        with safe_open(d / index[n], "pt") as f:
            out[n] = f.get_tensor(n)
    return out


def test_folded_w4a8_shared_expert_input_scale_is_the_routed_experts(tmp_path):
    """DeepSeek-V3 under --awq-fold: the shared expert and every routed expert read the same folded MoE input
    x * p; every token goes to some routed expert (top-k), so the max over the routed experts' amax is the amax
    over all tokens, which the shared expert sees: its gate/up input_scale must equal theirs. The shared expert's
    statistics were left those of x (fold.py: Fold.stats of the MoE fold), and its scale that of x."""
    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-deepseek-v3"), q,
                        QuantConfig(format="w4a8-awq", awq_fold=True, group_size=32), batches=[IDS])
    p = "model.layers.1.mlp."
    t = _tensors(q, [p + "shared_experts.gate_proj.input_scale", p + "experts.0.gate_proj.input_scale",
                     p + "shared_experts.up_proj.input_scale"])
    shared, routed = t[p + "shared_experts.gate_proj.input_scale"], t[p + "experts.0.gate_proj.input_scale"]
    assert torch.equal(t[p + "shared_experts.up_proj.input_scale"], shared)
    assert shared.item() == pytest.approx(routed.item(), rel=1e-5)


def test_folded_router_and_norms_keep_their_stored_dtype(tmp_path):
    """The fold rewrites the post-attention norm and the router; both are written in the input's dtype (bf16),
    as every tensor quantize does not quantize (a float32 router is a checkpoint unlike its input)."""
    src, q = models.path("tiny-qwen3-moe"), tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format="int4-awq", awq_fold=True), batches=[IDS])
    p = "model.layers.1."
    names = [p + "mlp.gate.weight", p + "post_attention_layernorm.weight", p + "input_layernorm.weight"]
    got, orig = _tensors(q, names), _tensors(src, names)
    assert not torch.equal(got[p + "mlp.gate.weight"].float(), orig[p + "mlp.gate.weight"].float())  # folded
    for n in names:
        assert got[n].dtype == orig[n].dtype, (n, got[n].dtype, orig[n].dtype)

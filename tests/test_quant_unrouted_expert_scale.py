"""The static input scale of a routed expert that calibration routed no token to, with no peer of its format
that saw one (a --rule giving it its own format): computed from every MoE-input token run through it
(calibrated.py _all_tokens_input_scale). Checked against transformers' own layer-1 MoE input: gate/up's
scale is max |x * pre_quant_scale| / 448 over every token (Model-Optimizer: the input quantizer reads x
after the pre_quant_scale), down's max |act(x Wg^T) * (x Wu^T)| / 448. Layers before it unquantized
(--format none), so the MoE input is the original model's."""

import pytest
import torch

from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.models import path as bundled_path

LAYER = 1
CALIB = {"num_samples": 2, "seq_len": 32}


@pytest.fixture(scope="module")
def moe_input():
    from transformers import AutoModelForCausalLM

    src = bundled_path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    mlp, xs = model.model.layers[LAYER].mlp, []
    h = mlp.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).detach()))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    X = torch.cat(xs)
    k = model.config.num_experts_per_tok
    routed = torch.topk(X @ mlp.gate.weight.float().T, k, dim=-1).indices
    unrouted = [e for e in range(model.config.num_experts) if not (routed == e).any()]
    assert unrouted  # the premise: some expert of the layer saw no calibration token
    ex = mlp.experts
    return src, batches, X, unrouted[0], ex


@pytest.mark.parametrize("fmt", ["fp8", "w4a8-awq"])
def test_unrouted_experts_input_scale_is_every_tokens_amax(moe_input, tmp_path, fmt):
    src, batches, X, e, _ = moe_input
    p = f"model.layers.{LAYER}.mlp.experts.{e}"
    out = tmp_path / "q"
    quantize_checkpoint(src, out, QuantConfig(format=None, rules=((f"{p}.*", fmt),), **CALIB), batches=batches)
    q, orig = CheckpointReader(out), CheckpointReader(src)
    pqs = q.get(f"{p}.gate_proj.pre_quant_scale").float() if f"{p}.gate_proj.pre_quant_scale" in q else 1.0
    want_gu = float((X * pqs).abs().max()) / 448
    assert float(q.get(f"{p}.gate_proj.input_scale")) == pytest.approx(want_gu, rel=1e-3)
    assert float(q.get(f"{p}.up_proj.input_scale")) == pytest.approx(want_gu, rel=1e-3)
    wg, wu = (orig.get(f"{p}.{n}.weight").float() for n in ("gate_proj", "up_proj"))
    h = torch.nn.functional.silu(X @ wg.T) * (X @ wu.T)
    dp = q.get(f"{p}.down_proj.pre_quant_scale").float() if f"{p}.down_proj.pre_quant_scale" in q else 1.0
    assert float(q.get(f"{p}.down_proj.input_scale")) == pytest.approx(float((h * dp).abs().max()) / 448, rel=1e-3)

"""Parity with NVIDIA Model-Optimizer 0.47, beyond tests/test_quant_modelopt.py (FP8
per-tensor, FP8 128x128 blocks, INT4 packing, INT4-AWQ pre_quant_scale) and tests/test_quant_gptq.py:
W4A8_AWQ scales, FP8 per-channel weights, modelopt's FP8 activation fake-quant, the real
`moepress quantize` output of a bundled MoE model against `mtq.quantize` on its transformers model,
and the FP8 KV-cache scales of every bundled family against modelopt's k/v bmm quantizers.

modelopt side: mtq.quantize with its own configs, then its export functions
(modelopt/torch/export/quant_utils.py: get_weight_scaling_factor(_2), get_activation_scaling_factor,
get_prequant_scaling_factor, to_quantized_weight), the values `export_hf_checkpoint` writes.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import salient_inputs
from moepress.compress.quant import awq, fp8, w4a8

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.quant_utils import (
        get_activation_scaling_factor,
        get_kv_cache_scaling_factor,
        get_prequant_scaling_factor,
        get_quantization_format,
        get_weight_scaling_factor,
        get_weight_scaling_factor_2,
        to_quantized_weight,
    )


def _mtq(cfg_name, xs, d_in=256, d_out=64):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    w = model[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), lambda m: [m(x) for x in xs])
    return w, model[0]


@torch.no_grad()
def test_w4a8_awq_scales_and_weights_equal_modelopt():
    """W4A8_AWQ_BETA_CFG: INT4 group scales (first quantizer), weight_scale_2 = amax / 448 (second,
    FP8 per-tensor), pre_quant_scale (awq_lite) and the FP8 input_scale of x * pre_quant_scale."""
    xs = salient_inputs()
    w, lin = _mtq("W4A8_AWQ_BETA_CFG", xs)
    assert get_quantization_format(lin) == "w4a8_awq"
    ref_pqs = get_prequant_scaling_factor(lin).float().reshape(-1)
    ref_ws = get_weight_scaling_factor(lin).float()
    ref_ws2 = get_weight_scaling_factor_2(lin).float().reshape(())
    ref_is = get_activation_scaling_factor(lin).float().reshape(())
    # lin.weight now holds modelopt's smoothed weight W * s (= W / pre_quant_scale)
    ref_packed = to_quantized_weight(lin.weight, ref_ws, "w4a8_awq", ref_ws2, 128)

    x = torch.cat(xs)
    pqs, _, _ = awq.search([w], x, x.abs().mean(0), 128)
    packed, ws, ws2 = w4a8.quantize(w, 128, pqs)
    isc = w4a8.input_scale(x.abs().amax(0), pqs)
    torch.testing.assert_close(pqs, ref_pqs, rtol=4e-7, atol=0)
    torch.testing.assert_close(ws, ref_ws.reshape(ws.shape), rtol=4e-7, atol=0)
    torch.testing.assert_close(ws2, ref_ws2, rtol=4e-7, atol=0)
    torch.testing.assert_close(isc, ref_is, rtol=4e-7, atol=0)
    assert packed.dtype == ref_packed.dtype == torch.uint8 and packed.shape == ref_packed.shape == (32, 256)
    agree = (packed == ref_packed).float().mean().item()
    assert agree > 0.999, f"packed W4A8 bytes agree {agree:.4%}"  # 1e-7-relative scale noise may flip a tie


@torch.no_grad()
def test_fp8_per_channel_weights_equal_modelopt():
    """FP8_PER_CHANNEL_PER_TOKEN_CFG (our fp8-dynamic): per-row amax / 448, bit-identical E4M3.
    modelopt exports this weight_scale 1-D [out]; moepress stores [out, 1] (same values)."""
    w, lin = _mtq("FP8_PER_CHANNEL_PER_TOKEN_CFG", salient_inputs(n_batches=1))
    assert get_quantization_format(lin) == "fp8_pc_pt"
    ref_s = get_weight_scaling_factor(lin)
    ref_q = to_quantized_weight(lin.weight, ref_s, "fp8_pc_pt")
    q, s = fp8.quantize_channel(w)
    assert ref_s.shape == (64,) and s.shape == (64, 1)
    assert torch.equal(s.reshape(-1), ref_s.float())
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@torch.no_grad()
def test_fp8_activation_fake_quant_equals_modelopt():
    """Our fake-quant forward's activation quantizers against modelopt's input quantizers: static
    per-tensor (FP8_DEFAULT_CFG) and dynamic per-token (FP8_PER_CHANNEL_PER_TOKEN_CFG, tokens as rows).
    modelopt multiplies by 448 / amax where we divide by amax / 448: equal to 1 ulp."""
    xs = salient_inputs(n_batches=2)
    _, lin = _mtq("FP8_DEFAULT_CFG", xs)
    x = torch.randn(64, 256) * torch.linspace(0.1, 60, 256)  # beyond the calibrated range too: clamps
    scale = get_activation_scaling_factor(lin).float().reshape(())
    torch.testing.assert_close(fp8.fake_quant(x, scale), lin.input_quantizer(x), rtol=2e-7, atol=0)
    _, lin = _mtq("FP8_PER_CHANNEL_PER_TOKEN_CFG", xs)
    torch.testing.assert_close(fp8.fake_quant_per_token(x), lin.input_quantizer(x), rtol=2e-7, atol=0)
    # NB: on [batch, seq, hidden] inputs modelopt's dynamic quantizer (axis=(0,)) keeps one scale per
    # *sequence*, not per token, so its fake-quant perplexity for this config (bench/quant_quality.py)
    # is of a coarser scheme than the per-token FP8 TensorRT-LLM / vLLM run.
    x3 = x.reshape(4, 16, 256)
    per_seq = x3.abs().amax(dim=(1, 2), keepdim=True) / 448
    torch.testing.assert_close(lin.input_quantizer(x3), (x3 / per_seq).to(fp8.FP8_DTYPE).float() * per_seq)


# ---- the real stage on a bundled model -----------------------------------------------------------

@pytest.fixture(scope="module")
def qwen3_fp8(tmp_path_factory):
    """`moepress quantize --format fp8 --kv-cache fp8` of tiny-qwen3-moe (not sequential: statistics
    from the original model, as modelopt's max calibration gathers them) and modelopt FP8_DEFAULT_CFG
    plus FP8_KV_CFG's k/v bmm quantizers on the same model (transformers, fp32), same calibration batches."""
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] += [e for e in mtq.FP8_KV_CFG["quant_cfg"] if "bmm_quantizer" in str(e.get("quantizer_name"))]
    return _moepress_and_modelopt("tiny-qwen3-moe", tmp_path_factory.mktemp("parity") / "fp8", cfg)


def _batches(name):
    from moepress.calib.data import calibration_batches
    from moepress.models import path

    return calibration_batches(path(name), (), 8, 128, 0, 8)


def _hf_model(name):
    from transformers import AutoModelForCausalLM

    from moepress.models import path

    return AutoModelForCausalLM.from_pretrained(str(path(name)), dtype=torch.float32).eval()


def _moepress_and_modelopt(name, out, cfg):
    """`moepress quantize --format fp8 --kv-cache fp8` of bundled model ``name`` into ``out`` (not
    sequential: statistics from the original model, as modelopt's max calibration gathers them) and
    its transformers model (fp32) through ``mtq.quantize(cfg)``, same calibration batches."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.models import path

    batches = _batches(name)
    quantize_checkpoint(path(name), out, QuantConfig(format="fp8", kv_cache="fp8", sequential=False), batches=batches)
    model = _hf_model(name)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        mtq.quantize(model, cfg, lambda m: [m(input_ids=b, use_cache=False) for b in batches])
    return CheckpointReader(out), model


@torch.no_grad()
def test_bundled_moe_fp8_checkpoint_equals_modelopt(qwen3_fp8):
    """Every weight scale of the written checkpoint equals modelopt's, bit for bit; so do the FP8
    weights; input scales agree to float noise (measured: bit-identical too, in every layer).
    modelopt's quantizers on transformers 5's fused experts: one weight quantizer per expert for
    the fused gate_up_proj (gate and up share it, as ours do) and for down_proj, one input quantizer
    per projection for all experts of a layer (ours: the maximum over experts, the same value).
    q/k/v: modelopt's export takes the max of their weight amaxes (preprocess_linear_fusion), which
    is what we store for each of them."""
    ck, model = qwen3_fp8
    n_layers = model.config.num_hidden_layers
    n_exp = model.config.num_experts
    checked = 0
    for i in range(n_layers):
        p, layer = f"model.layers.{i}.", model.model.layers[i]
        att = layer.self_attn
        qkv = max(float(getattr(att, k).weight_quantizer.amax) for k in ("q_proj", "k_proj", "v_proj"))
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ref_ws = torch.tensor(qkv if k != "o_proj" else float(att.o_proj.weight_quantizer.amax)) / 448
            assert torch.equal(ck.get(f"{p}self_attn.{k}.weight_scale"), ref_ws.float()), f"{p}{k}"
            ref_is = get_activation_scaling_factor(getattr(att, k)).float().reshape(())
            torch.testing.assert_close(ck.get(f"{p}self_attn.{k}.input_scale"), ref_is, rtol=2.4e-7, atol=0)
        ex = layer.mlp.experts
        for e in range(n_exp):
            gu = ex.gate_up_proj_weight_quantizers[e].amax.float() / 448
            dn = ex.down_proj_weight_quantizers[e].amax.float() / 448
            for proj, ref in (("gate_proj", gu), ("up_proj", gu), ("down_proj", dn)):
                name = f"{p}mlp.experts.{e}.{proj}"
                assert torch.equal(ck.get(name + ".weight_scale"), ref.reshape(())), name
                checked += 1
            in_q = (("gate_proj", ex.gate_up_proj_input_quantizer), ("down_proj", ex.down_proj_input_quantizer))
            for proj, qz in in_q:
                torch.testing.assert_close(ck.get(f"{p}mlp.experts.{e}.{proj}.input_scale"),
                                           qz.amax.float().reshape(()) / 448, rtol=2.4e-7, atol=0)
        # bit-identical FP8 weights: expert 0's fused gate half, exported as modelopt does
        w_gate = ex.gate_up_proj[0, : ex.gate_up_proj.shape[1] // 2]
        ref_q = to_quantized_weight(w_gate, ex.gate_up_proj_weight_quantizers[0].amax.float() / 448, "fp8")
        assert torch.equal(ck.get(f"{p}mlp.experts.0.gate_proj.weight").view(torch.uint8), ref_q.view(torch.uint8))
    assert checked == n_layers * n_exp * 3


# measured: bit-identical to modelopt's amax / 448 and to the amax of transformers' cache contents,
# in every layer of the three bundled models; the tolerance allows 2 float32 ulps
KV_RTOL = 2.4e-7


def _kv(ck, model, kind):
    """(tensor name, ours, modelopt's amax / 448) of each layer's ``kind`` ("k" or "v") scale."""
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn
        exported = get_kv_cache_scaling_factor(att)[("k", "v").index(kind)]
        # modelopt's export clamps FP8 KV scales to >= 1.0 by default (clamp_fp8_scales=True,
        # "we recommend default kv cache scaling factor to be 1"); compare the calibrated amax / 448
        assert float(exported) == 1.0
        ref = getattr(att, f"{kind}_bmm_quantizer").amax.float().reshape(()) / 448
        name = f"model.layers.{i}.self_attn.{kind}_scale"
        yield name, ck.get(name), ref


@torch.no_grad()
def _cached_amax(name, kind):
    """amax / 448 per layer of what transformers' DynamicCache holds as keys ("k") or values ("v")
    after the calibration batches (the unquantized model)."""
    model, amax = _hf_model(name), {}
    for b in _batches(name):
        for i, cached in enumerate(model(input_ids=b, use_cache=True).past_key_values.layers):
            a = (cached.keys if kind == "k" else cached.values).abs().amax().float()
            amax[i] = torch.maximum(amax[i], a) if i in amax else a
    return [amax[i] / 448 for i in sorted(amax)]


@torch.no_grad()
def test_kv_cache_v_scale_equals_modelopt(qwen3_fp8):
    """Qwen3-MoE v_scale: amax / 448 of v_proj's output, what the cache holds (modelopt's v_bmm_quantizer)."""
    for (name, ours, ref), cached in zip(_kv(*qwen3_fp8, "v"), _cached_amax("tiny-qwen3-moe", "v"), strict=True):
        torch.testing.assert_close(ours, ref, rtol=KV_RTOL, atol=0, msg=name)
        torch.testing.assert_close(ours, cached, rtol=KV_RTOL, atol=0, msg=name)


@torch.no_grad()
def test_kv_cache_k_scale_is_of_the_cached_keys(qwen3_fp8):
    """Qwen3-MoE k_scale: amax / 448 of the keys after k_norm and RoPE, what the cache holds and
    modelopt's k_bmm_quantizer observes (not k_proj's output)."""
    for (name, ours, ref), cached in zip(_kv(*qwen3_fp8, "k"), _cached_amax("tiny-qwen3-moe", "k"), strict=True):
        torch.testing.assert_close(ours, ref, rtol=KV_RTOL, atol=0, msg=name)
        torch.testing.assert_close(ours, cached, rtol=KV_RTOL, atol=0, msg=name)


@pytest.fixture(scope="module", params=["tiny-mixtral", "tiny-deepseek-v3"])
def kv_family(request, tmp_path_factory):
    """moepress fp8 + --kv-cache fp8 of a bundled model, and modelopt's k/v bmm quantizers alone
    (FP8_KV_CFG, every other quantizer off) on its transformers model."""
    cfg = {"quant_cfg": [{"quantizer_name": "*", "enable": False}, *mtq.FP8_KV_CFG["quant_cfg"]], "algorithm": "max"}
    return request.param, _moepress_and_modelopt(request.param, tmp_path_factory.mktemp("kv") / "fp8", cfg)


@torch.no_grad()
def test_kv_cache_scales_equal_modelopt_per_family(kv_family):
    """Mixtral: keys after RoPE and v_proj's output, what its cache holds. DeepSeek-V3 (MLA): as
    modelopt, the keys [k_nope | k_pe after RoPE] and values that kv_b_proj decompresses from the
    cached latent (compress/quant/kv.py says what runtimes do with them)."""
    name, (ck, model) = kv_family
    for kind in ("k", "v"):
        for t, ours, ref in _kv(ck, model, kind):
            torch.testing.assert_close(ours, ref, rtol=KV_RTOL, atol=0, msg=f"{name} {t}")
        if name == "tiny-mixtral":
            for (t, ours, _), cached in zip(_kv(ck, model, kind), _cached_amax(name, kind), strict=True):
                torch.testing.assert_close(ours, cached, rtol=KV_RTOL, atol=0, msg=f"{name} {t}")

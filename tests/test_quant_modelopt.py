"""Numerics parity with NVIDIA Model-Optimizer (the reference TensorRT-LLM's kernels expect), issue #5:
our quantized weights and scales equal modelopt's for the same weights and calibration data."""

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import salient_inputs
from moepress.compress.quant import awq, fp8, int4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.quant_utils import (
        get_activation_scaling_factor,
        get_prequant_scaling_factor,
        get_weight_scaling_factor,
        pack_int4_in_uint8,
        to_quantized_weight,
    )
    from modelopt.torch.quantization.qtensor import FP8QTensor


def _linear(d_in=256, d_out=64, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out, bias=False))


def _modelopt_awq(xs: list[torch.Tensor], group: int, method: str) -> tuple[nn.Linear, torch.Tensor]:
    """modelopt's INT4_AWQ_CFG (block ``group``, algorithm ``method``) on a fresh linear fed ``xs``:
    (its quantized linear, the original weight)."""
    model = _linear()
    w = model[0].weight.detach().clone()
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1 if -1 in entry["cfg"]["block_sizes"] else "-1"] = group
    cfg["algorithm"] = {"method": method}
    mtq.quantize(model, cfg, lambda m: [m(x) for x in xs])
    return model[0], w


@torch.no_grad()
def test_fp8_per_tensor_weights_and_input_scales_equal_modelopt():
    xs = salient_inputs()
    model = _linear()
    w = model[0].weight.detach().clone()
    mtq.quantize(model, copy.deepcopy(mtq.FP8_DEFAULT_CFG), lambda m: [m(x) for x in xs])
    lin = model[0]
    ref_ws, ref_is = get_weight_scaling_factor(lin), get_activation_scaling_factor(lin)
    ref_q = to_quantized_weight(lin.weight, ref_ws, "fp8")
    q, s = fp8.quantize_tensor(w)
    in_scale = fp8.scale_from_amax(torch.cat(xs).abs().amax())
    assert torch.equal(s, ref_ws.float().reshape(()))
    assert torch.equal(in_scale, ref_is.float().reshape(()))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))  # bit-identical FP8


@torch.no_grad()
@pytest.mark.parametrize("shape", [(300, 200), (700, 2600), (1100, 9000)])
def test_fp8_block_weights_equal_modelopt(shape):
    # partial edge blocks both ways; the two larger ones are quantized a few block rows at a time
    # (fp8._CHUNK): 3 + 3 block rows, and one at a time
    w = torch.randn(*shape) * torch.linspace(0.1, 5, shape[1])
    ref_q, ref_s = FP8QTensor.quantize(w, block_sizes={-1: 128, -2: 128})
    q, s = fp8.quantize_block(w)
    ref_s = ref_s.float().reshape(s.shape)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), ref_q._quantized_data.view(torch.uint8))


@torch.no_grad()
def test_int4_packing_equals_modelopt():
    w = torch.randn(64, 256)
    scales = int4.group_scales(w, 128)
    ref = pack_int4_in_uint8(w, scales, 128)
    ours = int4.pack_int4(int4.quantize_with_scales(w, scales))
    assert ours.dtype == ref.dtype == torch.uint8 and ours.shape == ref.shape == (32, 256)
    assert torch.equal(ours, ref)
    assert torch.equal(int4.unpack_int4(ours), int4.quantize_with_scales(w, scales))


@torch.no_grad()
@pytest.mark.parametrize("group", [128, 64])
def test_awq_pre_quant_scales_and_int4_weights_equal_modelopt(group):
    xs = salient_inputs()
    lin, w = _modelopt_awq(xs, group, "awq_lite")
    ref_pqs = get_prequant_scaling_factor(lin).float()
    ref_ws = get_weight_scaling_factor(lin).float()  # amax / 7 per group, of W * s
    ref_packed = to_quantized_weight(lin.weight, ref_ws, "int4_awq", None, group)

    x = torch.cat(xs)
    pqs, alpha, _ = awq.search([w], x, x.abs().mean(0), group)
    torch.testing.assert_close(pqs, ref_pqs.reshape(-1), rtol=4e-7, atol=0)
    q, s = int4.quantize(w / pqs[None, :], group)
    torch.testing.assert_close(s, ref_ws.reshape(s.shape), rtol=4e-7, atol=0)
    agree = (int4.pack_int4(q) == ref_packed).float().mean().item()
    assert agree > 0.999, f"packed INT4 bytes agree {agree:.4%}"  # rounding ties at 1e-5 relative scale noise
    assert 0.0 <= alpha <= 1.0


@torch.no_grad()
def test_awq_clip_scales_equal_modelopt_awq_full():
    """modelopt's awq_full (awq_lite, then awq_clip) on the same inputs: our AWQ scale search followed
    by the clip search over modelopt's grid gives its group scales (= clipped amax / 7 of W * s).
    Batches of 64 tokens, so modelopt's clip (at most 64 strided tokens per call) sees every token."""
    group = 64
    xs = salient_inputs(n_batches=8, tokens=64)
    lin, w = _modelopt_awq(xs, group, "awq_full")
    ref_pqs = get_prequant_scaling_factor(lin).float().reshape(-1)
    ref_ws = get_weight_scaling_factor(lin).float()

    x = torch.cat(xs)
    pqs, _, _ = awq.search([w], x, x.abs().mean(0), group)
    torch.testing.assert_close(pqs, ref_pqs, rtol=4e-7, atol=0)
    s = awq.clip_scales(w / pqs[None, :], x * pqs[None, :], group, awq.MODELOPT_CLIP_RATIOS)
    rtn = int4.group_scales(w / pqs[None, :], group)
    assert (s < rtn * 0.99).float().mean() > 0.3  # the clip really clips (not a vacuous comparison)
    same = torch.isclose(s, ref_ws.reshape(s.shape), rtol=1e-5, atol=0).float().mean().item()
    assert same > 0.99, f"clip scales agree on {same:.2%} of groups"  # near-ties may differ by summation order

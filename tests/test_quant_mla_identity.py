"""An MLA ``kv_b_proj``'s static FP8 or NVFP4 input scale survives vLLM 0.33's identity dequantization.

vLLM 0.33 splits DeepSeek-V3 / Kimi K2's ``kv_b_proj`` into W_UK / W_UV at load
(model_executor/layers/attention/mla_attention.py:417) by running a Model-Optimizer or
compressed-tensors FP8 linear on an identity matrix (quantization/utils/quant_utils.py:560-569),
which quantizes 1.0 with the static input scale (quantization/input_quant_fp8.py:216-220).
The test re-implements that pass (torch only) on `moepress quantize --format fp8` output, and the NVFP4 one
(csrc cvt_warp_fp16_to_fp4's block scale and E2M1 code, the FP4 GEMM's alpha) on `--format nvfp4` output.
"""

import pytest
import torch

from moepress.compress import formats
from moepress.compress.arch import deepseek_v3, mixtral, qwen3_moe
from moepress.compress.quant import fp8
from moepress.compress.quantize.group import LayerResult, QuantConfig, quantize_group
from moepress.compress.quantize.stats import LinearStats


def vllm_identity_dequant(q: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """vLLM 0.33's get_and_maybe_dequant_weights for a static per-tensor FP8 linear: eye quantized as
    QuantFP8.forward_native does (x * scale.reciprocal(), clamp to +-448, cast), then the scaled GEMM."""
    eye = torch.eye(q.shape[1], dtype=torch.float32)
    xq = (eye * input_scale.float().reciprocal()).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
    return (xq.float() @ q.float().T * input_scale * weight_scale).T


def _deepseek(tmp_path_factory, fmt: str):
    """tiny-deepseek-v3 quantized to ``fmt`` (8 x 128 calibration tokens), opened."""
    from moepress.calib.data import calibration_batches
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quantize import quantize_checkpoint
    from moepress.models import path

    out = tmp_path_factory.mktemp("mla") / fmt
    quantize_checkpoint(path("tiny-deepseek-v3"), out, QuantConfig(format=fmt),
                        batches=calibration_batches(path("tiny-deepseek-v3"), (), 8, 128, 0, 8))
    return CheckpointReader(out)


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    return _deepseek(tmp_path_factory, "fp8")


def test_vllm_identity_dequant_of_deepseek_kv_b_proj_is_exact(deepseek_fp8):
    """Every layer's kv_b_proj comes back from vLLM's identity pass as weight * weight_scale: the factor
    q(1/s) * s is exactly 1 (before the fix: 0.959 .. 0.994 on this model); an element may still differ by
    one float32 ulp, as s' = fl(1/v) is not exactly 1/v (measured: 1 ulp; tolerance 2 ulps)."""
    ck, n = deepseek_fp8, 0
    for name in ck.names():
        if not name.endswith("self_attn.kv_b_proj.input_scale"):
            continue
        p = name.removesuffix("input_scale")
        q, ws, s = ck.get(p + "weight"), ck.get(p + "weight_scale"), ck.get(name)
        assert (1 / s).clamp(max=fp8.FP8_MAX).to(fp8.FP8_DTYPE).float() * s == 1, p
        torch.testing.assert_close(vllm_identity_dequant(q, ws, s), q.float() * ws, rtol=2.4e-7, atol=0, msg=p)
        n += 1
    assert n == ck.config["num_hidden_layers"]


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def vllm_nvfp4_identity_dequant(ck, p: str) -> torch.Tensor:
    """vLLM's identity pass on a Model-Optimizer NVFP4 linear ``p`` (Blackwell's W4A4 path): ModelOptNvFp4LinearMethod
    (quantization/modelopt.py) loads G = fl32(1 / input_scale) and alpha = input_scale * weight_scale_2; each eye row
    is quantized by csrc's cvt_warp_fp16_to_fp4 (nvfp4_utils.cuh): its block holding the 1.0 gets the scale
    sf = e4m3(G * (1 / 6)) and the code e2m1(1 * 1 / (sf * (1 / G))), the other blocks 0; the FP4 GEMM multiplies
    code * sf by the weight's E2M1 value * its E4M3 block scale, times alpha. Returns the weight it gives back
    [out, in], here in float64 from those float32 factors."""
    s, s2 = ck.get(p + "input_scale").float(), ck.get(p + "weight_scale_2").float()
    packed, sfw = ck.get(p + "weight"), ck.get(p + "weight_scale").float()
    codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[0], -1).long()  # low nibble first
    wv = E2M1[codes & 7] * (1 - 2 * (codes >> 3)).float()  # sign bit 3
    g = torch.reciprocal(s)
    sf = (g * (1.0 / 6.0)).to(fp8.FP8_DTYPE).float()
    out_scale = torch.reciprocal(sf * torch.reciprocal(g))
    code = E2M1[(E2M1 - out_scale.clamp(max=6.0)).abs().argmin()]
    alpha = s * s2
    return wv.double() * sfw.repeat_interleave(16, 1).double() * (code * sf).double() * alpha.double()


@pytest.fixture(scope="module")
def deepseek_nvfp4(tmp_path_factory):
    return _deepseek(tmp_path_factory, "nvfp4")


def test_vllm_nvfp4_identity_dequant_of_deepseek_kv_b_proj_is_exact(deepseek_nvfp4):
    """Every layer's NVFP4 kv_b_proj comes back from vLLM's identity pass as its NVFP4 value (E2M1 * block scale *
    weight_scale_2): the factor e2m1(G / sf) * sf / G is 1 to float32 rounding (before the snap: 0.979 .. 1.017 on
    this model, up to 6% over input ranges; measured after: within 1.2e-7, tolerance 2.4e-7)."""
    ck, n = deepseek_nvfp4, 0
    for name in ck.names():
        if not name.endswith("self_attn.kv_b_proj.input_scale"):
            continue
        p = name.removesuffix("input_scale")
        want = formats.FORMATS["nvfp4"].dequantize({k: ck.get(p + k) for k in ("weight", "weight_scale",
                                                                               "weight_scale_2")})
        got = vllm_nvfp4_identity_dequant(ck, p)
        torch.testing.assert_close(got, want.double(), rtol=2.4e-7, atol=0, msg=p)
        n += 1
    assert n == ck.config["num_hidden_layers"]


def test_only_deepseek_declares_identity_dequantized_linears():
    assert deepseek_v3.DeepseekV3Adapter.identity_dequantized == ("self_attn.kv_b_proj",)
    assert qwen3_moe.Qwen3MoeAdapter.identity_dequantized == mixtral.MixtralAdapter.identity_dequantized == ()


@pytest.mark.parametrize("fmt", [n for n, f in formats.FORMATS.items() if f.static_input])
@pytest.mark.parametrize("identity", [False, True])
def test_input_scale_snapped_only_for_identity_dequantized_fp8_and_nvfp4(fmt, identity):
    """Without the adapter's word (Qwen3-MoE, Mixtral, DeepSeek's other linears) and for W4A8 (x * pre_quant_scale
    before the cast: no scale makes the identity exact) the input scale stays Model-Optimizer's amax / 448
    (/ 6 for NVFP4); an identity-dequantized FP8 per-tensor linear gets s' with 1/s' an E4M3 value, an NVFP4 one
    s' with 1/(6 s') an E4M3 value (the block scale its identity row gets)."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(256, 128) * 3
    st = LinearStats(False)
    st.add(x)
    res = LayerResult()
    quantize_group(res, QuantConfig(format=fmt), fmt, ["kv_b_proj"], [w], st, identity_dequantized=identity)
    s, plain = res.tensors["kv_b_proj.input_scale"], res.specs["kv_b_proj"][1]
    amax = (x * plain).abs().amax() if plain is not None else x.abs().amax()
    ref = formats.FORMATS[fmt].input_scale(amax).reshape(())
    top = {"fp8": 1.0, "nvfp4": 6.0}.get(fmt)
    if identity and top is not None:
        assert ref <= s < ref * 1.125 and (1 / (top * s)).to(fp8.FP8_DTYPE).float() * top * s == 1
    else:
        assert torch.equal(s, ref)


def _e4m3_values() -> torch.Tensor:
    """Every positive finite E4M3 (float8_e4m3fn) value, from its 256 bit patterns: 2^-9 .. 448."""
    v = torch.arange(256, dtype=torch.uint8).view(fp8.FP8_DTYPE).float()
    return v[torch.isfinite(v) & (v > 0)].unique()


def test_e4m3_table_is_the_format():
    """The table the tests below search: 126 positive values, subnormal 2^-9 the smallest, 448 the largest (OCP FP8
    E4M3: 4 exponent bits, bias 7, 3 mantissa bits, S.1111.111 NaN)."""
    v = _e4m3_values()
    assert len(v) == 126 and v.min() == 2.0 ** -9 and v.max() == 448


def test_identity_exact_input_scale_is_the_nearest_scale_at_least_s_with_an_e4m3_reciprocal():
    """For s over E4M3's whole range and beyond: s' is the smallest float32 1/v >= s over the E4M3 values v (s < 512),
    found by searching the table (not the bit step the function takes); so s' >= s (no more clipping), within one
    E4M3 step (12.5%) over [1/448, 64], and the identity quantizes exactly (q(1/s') * s' == 1, vLLM's float32
    pass). The sweep includes s = fl(1/v) for every E4M3 v: each is kept as it is (all 126), and the function
    applied to its own output changes nothing."""
    table = _e4m3_values()
    recip = 1 / table  # float32, as the runtime computes it
    s = torch.logspace(-12, 9, 2000, base=2.0)
    s = s[s <= 512]
    s = torch.cat([s, recip])
    got = fp8.identity_exact_input_scale(s)
    want = torch.stack([recip[recip >= x].min() for x in s])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(fp8.identity_exact_input_scale(recip), recip, rtol=0, atol=0)
    torch.testing.assert_close(fp8.identity_exact_input_scale(got), got, rtol=0, atol=0)
    assert bool((got >= s).all())
    assert bool(((1 / got).clamp(max=fp8.FP8_MAX).to(fp8.FP8_DTYPE).float() * got == 1).all())
    mid = (s >= 1 / 448) & (s <= 64)
    assert bool((got[mid] < s[mid] * 1.125).all())


def test_identity_exact_input_scale_below_e4m3_range_and_above_it():
    """s < 1/448 (activations under 448 * s ... the identity saturates at 448): s' = 1/448, the smallest scale whose
    reciprocal is representable; s > 512 (1/s under E4M3's smallest value 2^-9): no such scale, s is returned
    as it is, finite."""
    s = torch.tensor([1e-4, 1 / 1000, 600.0, 1e4])
    got = fp8.identity_exact_input_scale(s)
    torch.testing.assert_close(got[:2], torch.full((2,), 1 / 448), rtol=0, atol=0)
    torch.testing.assert_close(got[2:], s[2:], rtol=0, atol=0)


def test_deepseeks_other_linears_keep_modelopts_input_scale(deepseek_fp8):
    """Only kv_b_proj is dequantized through the identity: DeepSeek's other attention and dense / shared-expert
    static input scales stay amax / 448, whose reciprocal quantizes 1.0 exactly (q(1/s) * s == 1, what every
    snapped scale does) only by chance: measured, none of these 28 does."""
    ck, snapped, n = deepseek_fp8, [], 0
    for name in ck.names():
        if name.endswith(".input_scale") and "kv_b_proj" not in name and ".experts." not in name:
            s = ck.get(name)
            if (1 / s).clamp(max=fp8.FP8_MAX).to(fp8.FP8_DTYPE).float() * s == 1:
                snapped.append(name)
            n += 1
    assert n == 28 and not snapped, snapped

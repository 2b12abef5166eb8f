"""The format registry (compress/formats/): every registered format is complete and self-consistent,
and its quantizer, decoder and stored tensors agree. A new format module gets these checks by being
registered; its numerics against the consumer's reference go in their own test file."""

from __future__ import annotations

import pytest
import torch

from moepress.compress import formats
from moepress.compress.formats import QuantContext
from moepress.errors import MoepressError

SMS = {80, 86, 89, 90, 100, 120}  # the architectures of the GPU catalog (exporters/targets.py)
ALL = list(formats.FORMATS)
PRODUCED = list(formats.produced())


@pytest.mark.parametrize("name", ALL)
def test_declaration_is_complete(name):
    f = formats.FORMATS[name]
    assert f.name == name
    assert f.element in ("bf16", "fp8", "int4", "fp4")
    assert f.scale in (None, "tensor", "channel", "block", "group")
    assert f.activation in ("none", "static", "token", "block")
    assert f.archs and set(f.archs) <= SMS
    assert all(a in formats.FORMATS and a != name for a in f.alternatives)
    assert "weight" in f.stored and f.stored_bytes is not None
    if f.quant_algo is not None:
        assert formats.by_quant_algo(f.quant_algo) is f
    if f.produced:  # a consumer form: Model-Optimizer's or compressed-tensors' (MXFP4 has only the latter)
        assert f.decodes and (f.modelopt_entry is not None or f.ct_format is not None)
        if f.modelopt_entry is not None:
            assert f.modelopt_group is not None and f.modelopt_entry(128)["quant_algo"] == f.modelopt_algo
            assert formats.by_quant_algo(f.modelopt_algo) is f


def test_registry_lookups():
    assert formats.by_quant_algo(None).name == "bf16"
    assert formats.by_quant_algo("NO_SUCH_ALGO") is None
    with pytest.raises(MoepressError, match="--format int9: expected one of"):
        formats.get("int9")
    assert list(formats.produced()) == ["fp8", "fp8-block", "fp8-dynamic", "int4-awq", "int4-gptq", "w4a8-awq",
                                         "nvfp4", "nvfp4-a16", "mxfp4"]


class _Stats:
    """Calibration statistics of one input, as the quantize stage hands them to a quantizer."""

    def __init__(self, x: torch.Tensor):
        self.n = x.shape[0]
        self.amax = x.abs().amax(0)
        self.act_mean = x.abs().mean(0)
        self._x = x
        self.S = x.double().T @ x.double()

    single_use = taken = False

    def sample(self):
        return self._x

    def make_hessian(self, take: bool = False):
        return 2.0 * self.S / self.n

    @property
    def H(self):
        return 2.0 * self.S / self.n


@pytest.mark.parametrize("name", PRODUCED)
def test_quantizer_round_trips_through_its_decoder(name):
    """Two linears sharing an input, widths not multiples of 128 on the output side: every stored
    tensor is declared, and decode(quantize(w)) is w within the format's precision."""
    f = formats.FORMATS[name]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(200, 256, generator=g) * 0.02, torch.randn(200, 256, generator=g) * 0.03]
    x = torch.randn(64, 256, generator=g)
    out = f.quantize(ws, QuantContext(group_size=128, stats=_Stats(x) if f.calibrated else None))
    assert out.skipped is None and len(out.tensors) == 2
    for w, t in zip(ws, out.tensors, strict=True):
        assert set(t) <= set(f.stored), sorted(t)
        deq = f.dequantize(t, torch.float32)
        if f.awq:
            deq = deq * t["pre_quant_scale"][None, :]  # the stored weight is W / pre_quant_scale
        rel = ((deq - w).norm() / w.norm()).item()
        # measured: FP8 0.026, INT4 0.177 (GPTQ / AWQ trade weight error for output error)
        assert rel < (0.055 if f.element == "fp8" else 0.36), rel


@pytest.mark.parametrize("name", [n for n in PRODUCED if formats.FORMATS[n].element == "int4"])
def test_int4_width_not_a_multiple_of_the_group_is_refused_not_misquantized(name):
    f = formats.FORMATS[name]
    x = torch.randn(16, 200)
    out = f.quantize([torch.randn(64, 200)], QuantContext(group_size=128, stats=_Stats(x)))
    assert out.skipped is not None and "200" in out.skipped and not out.tensors


@pytest.mark.parametrize("name", [n for n in PRODUCED if formats.FORMATS[n].element == "int4"])
def test_int4_odd_output_width_is_skipped_not_a_crash(name):
    """INT4 packs two output rows per byte (modelopt's pack_int4_in_uint8 asserts the same): an odd width
    stops the whole run with a ValueError; now it stays bf16, said, and the plan counts it so."""
    f = formats.FORMATS[name]
    x = torch.randn(16, 128)
    out = f.quantize([torch.randn(33, 128)], QuantContext(group_size=128, stats=_Stats(x)))
    assert out.skipped is not None and "out_features 33 is odd" in out.skipped and not out.tensors
    assert f.stored_bytes(33, 128) == 2 * 33 * 128


@pytest.mark.parametrize("name", [n for n in PRODUCED if formats.FORMATS[n].element == "fp4"])
def test_fp4_of_an_all_zero_weight_is_zeros_with_finite_scales(name):
    """NVFP4's second-level scale of an all-zero weight was 0: 0 / 0 block scales (NaN E4M3), a weight
    that decoded to NaN and poisoned every later layer's calibration."""
    f = formats.FORMATS[name]
    x = torch.randn(16, 64)
    out = f.quantize([torch.zeros(8, 64)], QuantContext(group_size=128, stats=_Stats(x) if f.calibrated else None))
    t = out.tensors[0]
    assert all(torch.isfinite(v.float()).all() for k, v in t.items() if k != "weight"), t
    assert torch.equal(f.dequantize(t, torch.float32), torch.zeros(8, 64))


def test_decoders_read_the_stored_layouts():
    from moepress.compress.quant import fp8, int4

    w = torch.randn(130, 260)

    class Reader(dict):
        config = {"quantization_config": {"weight_block_size": [128, 128]}}

        def get(self, name):
            return self[name]

    q, s = fp8.quantize_block(w)
    got = formats.decode(Reader({"m.weight": q, "m.weight_scale_inv": s}), "m", torch.float32)
    assert torch.equal(got, fp8.dequantize_block(q, s))
    qi, si = int4.quantize(w[:, :256], 128)
    got = formats.decode(Reader({"m.weight": int4.pack_int4(qi), "m.weight_scale": si}), "m", torch.float32)
    assert torch.equal(got, int4.dequantize(qi, si))
    assert formats.decode(Reader({"m.weight": w}), "m", torch.float32) is None


@pytest.mark.parametrize("shape", [(128, 0), (0, 256), (0, 0)])
def test_fp8_block_of_an_empty_weight_is_empty(shape):
    from moepress.compress.quant import fp8

    q, s = fp8.quantize_block(torch.zeros(shape, dtype=torch.bfloat16))
    assert q.shape == shape and q.dtype == fp8.FP8_DTYPE
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))


def test_deepseek_block_fp8_with_non_square_blocks_decodes_by_rows_then_columns():
    """weight_block_size is [rows, columns] (DeepSeek-V3 README_WEIGHTS.md: scale_inv[i // br, j // bc]);
    every shipped checkpoint uses [128, 128], so a swapped pair went unnoticed."""
    from moepress.compress.formats.fp8_block import decode_deepseek

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(256, 256, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(4, 2, generator=g) + 0.5  # [256 / 64, 256 / 128]

    class Reader:
        path = "ckpt"
        config = {"quantization_config": {"weight_block_size": [64, 128]}}
        tensors = {"w.weight": q, "w.weight_scale_inv": s}

        def __contains__(self, name):
            return name in self.tensors

        def get(self, name):
            return self.tensors[name]

    want = q.float() * s.repeat_interleave(64, 0).repeat_interleave(128, 1)
    assert torch.equal(decode_deepseek(Reader(), "w", torch.float32), want)

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


def _ct_input_linear(f, amax: torch.Tensor):
    """An nn.Linear set up by compressed-tensors for the format's scheme, its static input parameters
    calibrated by the library's own formulas for max |x| ``amax``: scale amax / 448 (calculate_qparams),
    NVFP4's global scale 448 * 6 / amax (generate_gparam)."""
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = f.ct_scheme(128, ["Linear"])
    ia = scheme.input_activations
    lin = torch.nn.Linear(256, 8)
    initialize_module_for_quantization(lin, scheme)
    lo, hi = -amax.reshape(1), amax.reshape(1)
    if ia is not None and ia.dynamic == "local":
        lin.input_global_scale.data = generate_gparam(lo, hi)
    elif ia is not None and not ia.dynamic:
        lin.input_scale.data = calculate_qparams(lo, hi, ia)[0].reshape(lin.input_scale.shape)
    return lin, ia


@pytest.mark.parametrize("name", [n for n in PRODUCED if formats.FORMATS[n].ct_scheme is not None])
@pytest.mark.parametrize("over", [1.0, 4.0])
def test_activation_fake_quant_is_compressed_tensors_input_quantization(name, over):
    """The input hook of a quantized linear (fake_quant.act_hook: the stream's forward of a quantized
    checkpoint) computes compressed-tensors' input quantization of the format's scheme (forward_quantize):
    static FP8 per tensor at the library's scale, FP8 per token / per 1x128 block at run time, NVFP4 blocks
    of 16 under the library's global scale; none for the weight-only formats. Static / dynamic as the
    scheme declares them. ``over`` > 1: tokens past the calibrated range (x over its amax) saturate
    as the library clamps them (an unclamped cast to E4M3 gives NaN)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from moepress.compress.formats.fake_quant import act_hook

    f = formats.FORMATS[name]
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 4, 256)
    amax = x.abs().amax() / over  # the calibrated amax; the input goes over it x over
    lin, ia = _ct_input_linear(f, amax)
    assert f.static_input == (ia is not None and ia.dynamic is not True)
    assert f.dynamic_input == (ia is not None and ia.dynamic is True)
    isc = f.input_scale(amax).reshape(()) if f.static_input else None
    got = act_hook(name, None, isc)(lin, (x,))[0]
    if ia is None:
        assert torch.equal(got, x)
        return
    want = forward_quantize(lin, x, "input", ia)
    assert not torch.equal(want, x)
    # measured: FP8 bit-identical; NVFP4 within one float32 rounding of the global scale's reciprocal
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in PRODUCED if formats.FORMATS[n].ct_format is not None])
def test_weight_scales_have_the_shapes_compressed_tensors_allocates(name):
    """What the compressed-tensors export hands the library (ct_scale of our stored scale, or ct_tensors for
    the formats stored in its bytes) has the shape its initialize_module_for_quantization gives the
    parameter: [1] for a per-tensor FP8 scale (ours is stored []), [out, 1], blocks, groups."""
    f = formats.FORMATS[name]
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    lin, _ = _ct_input_linear(f, x.abs().amax())
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    t = f.quantize([w], QuantContext(group_size=128, stats=_Stats(x) if f.calibrated else None)).tensors[0]
    ct = f.ct_tensors(t) if f.ct_tensors is not None else {"weight_scale": f.ct_scale(t["weight_scale"])}
    for k, v in ct.items():
        if k != "weight_packed":
            assert v.shape == getattr(lin, k).shape, (k, v.shape, getattr(lin, k).shape)


def test_registry_decode_picks_each_formats_decoder_by_its_stored_dtypes():
    """formats.decode (what CheckpointReader.weight calls) of a Model-Optimizer layout tells the formats
    apart by the stored weight and scale dtypes (INT4 vs FP4 packed in uint8, E4M3 vs E8M0 FP4 scales)
    and decodes each with its own decoder."""

    class Reader(dict):
        path = "ckpt"

        def get(self, name):
            return self[name]

    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(0))
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    for name in PRODUCED:
        f = formats.FORMATS[name]
        t = f.quantize([w], QuantContext(group_size=128, stats=_Stats(x) if f.calibrated else None)).tensors[0]
        got = formats.decode(Reader({f"m.{k}": v for k, v in t.items()}), "m", torch.float32)
        assert got is not None and torch.equal(got, f.dequantize(t, torch.float32)), name


def test_stream_layers_get_the_hooks_moepress_quant_json_names(tmp_path):
    """prepare_layer, from a checkpoint's moepress_quant.json: a W4A8 linear multiplies its input by the
    stored pre_quant_scale and quantizes it to E4M3 at the stored input_scale (Model-Optimizer's W4A8_AWQ
    input), in the layer's dtype; an fp8-dynamic linear quantizes each token at amax / 448; an INT4
    weight-only linear is left alone; modules of layer 10 are not layer 1's."""
    import json

    from moepress.compress.formats import fake_quant

    def e4m3(v, s):  # torch's round-to-nearest-even cast
        return (v / s).clamp(-448, 448).to(torch.float8_e4m3fn).to(v.dtype) * s

    g = torch.Generator().manual_seed(0)
    pqs, isc = torch.rand(256, generator=g) + 0.5, torch.tensor(0.01)
    mods = {"model.layers.1.a": "w4a8-awq", "model.layers.1.b": "fp8-dynamic", "model.layers.1.c": "int4-gptq",
            "model.layers.10.a": "fp8"}
    (tmp_path / formats.SIDECAR).write_text(json.dumps({"modules": {k: {"format": v} for k, v in mods.items()}}))

    class Reader(dict):
        path = tmp_path

        def get(self, name):
            return self[name]

    reader = Reader({"model.layers.1.a.pre_quant_scale": pqs.bfloat16(), "model.layers.1.a.input_scale": isc,
                     "model.layers.10.a.input_scale": torch.tensor(1.0)})
    x = torch.randn(3, 256, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        layer = torch.nn.ModuleDict({k: torch.nn.Linear(256, 4, dtype=dtype) for k in "abc"})
        plain = [layer[k](x.to(dtype)) for k in "abc"]
        fake_quant.prepare_layer(reader, "model.layers.1.", layer)
        xd, p = x.to(dtype), pqs.bfloat16().to(dtype)
        lin = {k: (lambda v, m=layer[k]: torch.nn.functional.linear(v, m.weight, m.bias)) for k in "ab"}
        want_a = lin["a"](e4m3(xd * p, isc.to(dtype)))
        want_b = lin["b"](e4m3(xd, (xd.abs().amax(-1, keepdim=True) / 448)))
        for k, want in (("a", want_a), ("b", want_b), ("c", plain[2])):
            got = layer[k](xd)
            assert got.dtype == dtype and torch.equal(got, want), (k, dtype)
        assert not torch.equal(want_a, plain[0]) and not torch.equal(want_b, plain[1])


def test_quantize_format_choices_are_the_readmes_formats_table(cli_run, tmp_path):
    """`quantize --format` names only what quantize writes: bf16 (registered, planned, never written) and an
    unknown name are refused in one line listing the README's Formats table, in its order."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    table = text.split("## Formats\n\n", 1)[1].split("\n\n", 1)[0]
    names = re.findall(r"^\| `([^`-][^`]*)` \|", table, re.M)
    assert "fp8" in names and "bf16" not in names
    for name in ("bf16", "int9"):
        r = cli_run("quantize", "tiny-qwen3-moe", "--format", name, "-o", tmp_path / name)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.stderr.strip() == f"moepress: error: --format {name}: expected one of {', '.join(names)}", r.stderr
        assert not (tmp_path / name).exists()


def test_only_gptq_rounding_collects_an_inputs_hessian():
    """README: int4-gptq rounds with GPTQ, int4-awq / w4a8-awq round the smoothed weights with GPTQ on the
    smoothed input's Hessian by default and to nearest with --no-awq-gptq; nothing else reads a Hessian. The
    quantize stage collects one ([in, in] per input) where QuantConfig.needs_hessian says, and an AWQ + GPTQ
    run without it would silently round to nearest (compress/formats/_int4.py _hessian: None)."""
    from moepress.compress.quantize import QuantConfig

    for name in PRODUCED:
        for awq_gptq in (True, False):
            want = name == "int4-gptq" or (name in ("int4-awq", "w4a8-awq") and awq_gptq)
            assert QuantConfig(format=name, awq_gptq=awq_gptq).needs_hessian(name) == want, (name, awq_gptq)

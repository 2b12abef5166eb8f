"""Kimi's native INT4 and the other packed inputs (issue 17, input formats): compressed-tensors
``pack-quantized`` (any width, group, zero points), ``nvfp4-`` / ``mxfp4-pack-quantized`` and gpt-oss's
``_blocks`` / ``_scales``, read per tensor by the checkpoint reader and streamed like the rest.

The consumers decide: compressed-tensors' own decompression (the reader's weights equal it bit for
bit), transformers' gpt-oss MXFP4 conversion, and transformers + compressed-tensors loading the
Kimi fixture, its pruned copy and our Kimi-style INT4 export in a process that never imports
moepress. transformers 5.24 has no ``kimi_k2`` model type (Kimi ships remote code); the loader uses
its DeepseekV3 classes and registers the DeepSeek-V3 checkpoint conversion (per-expert tensors
merged into the fused experts) for ``kimi_k2`` with ``register_checkpoint_conversion_mapping``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import forkserver
from moepress import models
from moepress.compress import formats
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.formats import gptoss_mxfp4
from moepress.compress.prune import PruneConfig, prune_checkpoint
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.exporters.ct_ignore import KIMI_IGNORE, ROUTERS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_kimi_int4  # noqa: E402

KIMI = models.path("tiny-kimi-k2-int4")
MXFP4 = models.path("tiny-qwen3-moe-mxfp4")
IDS = torch.randint(1, 4096, (2, 24), generator=torch.Generator().manual_seed(0))

LOADER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, DeepseekV3ForCausalLM
    from transformers import conversion_mapping as cm
    cm.register_checkpoint_conversion_mapping("kimi_k2", cm.get_checkpoint_conversion_mapping("deepseek_v3"))
    dirs, ids = json.loads(sys.argv[1]), torch.load(sys.argv[2])
    out = {}
    for d in dirs:
        kimi = json.load(open(d + "/config.json"))["model_type"] == "kimi_k2"
        cls = DeepseekV3ForCausalLM if kimi else AutoModelForCausalLM
        m = cls.from_pretrained(d, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
        m = m.float().eval()  # Kimi's BF16 scales decompress to bf16 experts; exact in float32
        with torch.no_grad():
            out[d] = m(input_ids=ids, use_cache=False).logits
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
    torch.save(out, sys.argv[3])
""")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _scheme(reader):
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig.model_validate(reader.config["quantization_config"]).config_groups["group_0"]


def _library(reader, base: str, fmt: str) -> torch.Tensor:
    """compressed-tensors' own decompression of module ``base``."""
    from compressed_tensors.compressors import BaseCompressor

    sd = {n[len(base) + 1:]: reader.get(n) for n in reader.names() if n.startswith(base + ".")}
    return BaseCompressor.get_value_from_registry(fmt).decompress(sd, _scheme(reader))["weight"]


def _write(tmp_path: Path, tensors: dict, scheme, fmt: str) -> CheckpointReader:
    """A one-module checkpoint (model.layers.0.mlp.experts.0.down_proj) compressed as ``scheme``."""
    qc = {"quant_method": "compressed-tensors", "format": fmt,
          "config_groups": {"group_0": scheme.model_dump(mode="json")}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    save_file({f"model.layers.0.mlp.experts.0.down_proj.{k}": v.contiguous() for k, v in tensors.items()},
              str(tmp_path / "model.safetensors"))
    return CheckpointReader(tmp_path)


# ---- the fixture ---------------------------------------------------------------------------------
def test_fixture_is_laid_out_as_kimi_ships():
    conf = json.loads((KIMI / "config.json").read_text())
    qc = conf["quantization_config"]
    assert conf["model_type"] == "kimi_k2" and conf["architectures"] == ["DeepseekV3ForCausalLM"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == list(KIMI_IGNORE)
    (group,) = qc["config_groups"].values()
    w = group["weights"]
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 32)
    r = CheckpointReader(KIMI)
    packed = [n for n in r.names() if n.endswith(".weight_packed")]
    assert len(packed) == 3 * 32 * 3 and all(".mlp.experts." in n for n in packed)
    base = "model.layers.2.mlp.experts.5.down_proj"
    assert [r.info(f"{base}.{k}").dtype for k in ("weight_packed", "weight_scale", "weight_shape")] == \
        ["I32", "BF16", "I64"]
    assert r.info(base + ".weight_packed").shape == (128, 8) and r.info(base + ".weight_scale").shape == (128, 2)
    for n in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
              "model.layers.1.self_attn.q_b_proj.weight", "lm_head.weight"):
        assert r.info(n).dtype == "BF16"


def test_reader_equals_library_decompression_for_every_expert():
    r = CheckpointReader(KIMI)
    bases = sorted(n[: -len(".weight_packed")] for n in r.names() if n.endswith(".weight_packed"))
    for b in bases:
        lib = _library(r, b, "pack-quantized")
        assert lib.dtype == torch.bfloat16
        assert torch.equal(r.weight(b + ".weight", torch.bfloat16), lib), b
        assert torch.equal(r.weight(b + ".weight", torch.float32), lib.float()), b
    # the stream reads the same weights (through its prefetched layer view)
    sm = StreamedModel(r)
    state = sm.read_layer_state(3, sm.read_layer_raw(3))
    assert torch.equal(state["mlp.experts.7.gate_proj.weight"],
                       _library(r, "model.layers.3.mlp.experts.7.gate_proj", "pack-quantized").float())


def test_packed_weight_reads_as_its_decoded_weight():
    """``P.weight`` has no stored tensor of its own: ``get`` (what stages copy "as stored") gives the
    library's decompression in its own dtype (Kimi: bf16), the stored names stay the packed ones."""
    r = CheckpointReader(KIMI)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    assert name in r and name not in r.names() and r.info(name).dtype == "I32"
    assert torch.equal(r.get(name), _library(r, name[: -len(".weight")], "pack-quantized"))


# ---- other widths, groups, zero points, FP4 ------------------------------------------------------
@pytest.mark.parametrize("bits,strategy,group,symmetric,shape", [
    (4, "group", 16, True, (70, 48)),  # 70 rows, 3 groups: nothing a multiple of 32 or 128
    (4, "group", 48, False, (33, 96)),  # asymmetric: zero points packed along dim 0
    (8, "channel", None, True, (40, 24)),
    (2, "group", 8, True, (12, 40)),
    (3, "group", 12, False, (9, 36)),  # values straddle int32 words
])
def test_pack_quantized_any_width_group_and_zero_point_equal_library(tmp_path, bits, strategy, group, symmetric,
                                                                     shape):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    g = group or shape[1]
    grouped = w.reshape(shape[0], shape[1] // g, g)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    sd = {"weight": w, "weight_scale": scale} | ({} if symmetric else {"weight_zero_point": zp})
    stored = BaseCompressor.get_value_from_registry("pack-quantized").compress(sd, scheme)
    assert ("weight_zero_point" in stored) is not symmetric
    r = _write(tmp_path, stored, scheme, "pack-quantized")
    base = "model.layers.0.mlp.experts.0.down_proj"
    lib = _library(r, base, "pack-quantized")
    assert torch.equal(r.weight(base + ".weight", lib.dtype), lib)
    assert _rel(r.weight(base + ".weight"), w.float()) < 0.6 / 2 ** (bits - 2)  # it is w, quantized


@pytest.mark.parametrize("fmt,preset", [("nvfp4-pack-quantized", "NVFP4A16"), ("mxfp4-pack-quantized", "MXFP4A16")])
def test_fp4_pack_quantized_equal_library(tmp_path, fmt, preset):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 0.05
    grouped = w.reshape(24, -1, args.group_size)
    sd = {"weight": w}
    gs = None
    if fmt.startswith("nvfp4"):
        gs = generate_gparam(w.amin().reshape(1), w.amax().reshape(1))
        sd["weight_global_scale"] = gs
    sd["weight_scale"], _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args, global_scale=gs)
    stored = BaseCompressor.get_value_from_registry(fmt).compress(sd, scheme)
    r = _write(tmp_path, stored, scheme, fmt)
    base = "model.layers.0.mlp.experts.0.down_proj"
    lib = _library(r, base, fmt)
    assert lib.dtype == torch.bfloat16 and torch.equal(r.weight(base + ".weight", torch.bfloat16), lib)
    assert _rel(r.weight(base + ".weight"), w.float()) < 0.2


def test_gptoss_blocks_equal_transformers_dequantization(tmp_path):
    """gpt-oss's ``_blocks`` / ``_scales`` against transformers' own conversion (tensor level: moepress has no
    gpt-oss architecture adapter). Expert width 90 = 3 blocks of 32 minus nothing a multiple of 128."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 3, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 10, 3), dtype=torch.uint8, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert ref.shape == (3, 96, 10) and torch.equal(gptoss_mxfp4.dequantize(blocks, scales, dtype), ref)
    save_file({"model.layers.0.mlp.experts.gate_up_proj_blocks": blocks,
               "model.layers.0.mlp.experts.gate_up_proj_scales": scales}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "mxfp4"}}')  # as gpt-oss's
    r = CheckpointReader(tmp_path)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert name in r and torch.equal(r.weight(name, torch.bfloat16), convert_moe_packed_tensors(blocks, scales))


def test_inspect_shows_the_format_per_module_group(cli_run):
    r = cli_run("inspect", KIMI)
    assert r.exit_code == 0, r.output
    assert "storage    compressed-tensors pack-quantized" in r.output
    assert "int4 symmetric group 32 (compressed-tensors pack-quantized): routed experts 288" in r.output
    assert "bf16: other 32" in r.output  # attention, shared experts, dense MLP of the 4 layers
    j = json.loads(cli_run("inspect", KIMI, "--json").output)
    assert j["model_type"] == "kimi_k2" and j["family"] == "deepseek_v3"


# ---- stages and consumers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Prune the Kimi fixture 25%, quantize it to fp8, quantize tiny-deepseek-v3's routed experts to
    INT4 group 32 and export compressed-tensors; load the fixture, the pruned copy and the export in
    ONE transformers subprocess that never imports moepress."""
    base = tmp_path_factory.mktemp("kimi")
    batches = [IDS]
    out = {"pruned": base / "pruned", "fp8": base / "fp8", "q": base / "q-experts", "ct": base / "ct-experts",
           "mx-pruned": base / "mx-pruned", "mx-fp8": base / "mx-fp8"}
    prune_checkpoint(KIMI, out["pruned"], PruneConfig(method="frequency", ratio=0.25), batches=batches)
    prune_checkpoint(MXFP4, out["mx-pruned"], PruneConfig(method="frequency", ratio=0.25), batches=batches)
    quantize_checkpoint(MXFP4, out["mx-fp8"], QuantConfig(format="fp8-dynamic", num_samples=2, seq_len=32))
    quantize_checkpoint(KIMI, out["fp8"], QuantConfig(format="fp8", num_samples=2, seq_len=32))
    quantize_checkpoint(models.path("tiny-deepseek-v3"), out["q"],
                        QuantConfig(format=None, rules=(("mlp.experts.*", "int4-gptq"),), group_size=32,
                                    num_samples=2, seq_len=32))
    export(out["q"], out["ct"], ExportConfig(format="compressed-tensors"))
    torch.save(IDS, base / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    dirs = [str(KIMI), str(out["pruned"]), str(out["ct"]), str(MXFP4), str(out["mx-pruned"])]
    p = forkserver.run([sys.executable, "-c", LOADER, json.dumps(dirs), str(base / "ids.pt"), str(base / "l.pt")],
                       cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, torch.load(base / "l.pt")


# fixture, its pruned copy's key in ``staged``, experts key, experts after pruning 25%, stored tensors per linear
PRUNED = {"kimi": (KIMI, "pruned", "n_routed_experts", 24, ("weight_packed", "weight_scale", "weight_shape")),
          "mxfp4": (MXFP4, "mx-pruned", "num_local_experts", 12, ("weight_packed", "weight_scale"))}


@pytest.mark.parametrize("which", PRUNED)
def test_prune_keeps_the_kept_experts_stored_bytes_and_quantization_config(staged, which):
    out, _ = staged
    fixture, key, experts_key, n_kept, stored = PRUNED[which]
    src, dst = CheckpointReader(fixture), CheckpointReader(out[key])
    conf, orig = (json.loads((d / "config.json").read_text()) for d in (out[key], fixture))
    assert conf[experts_key] == n_kept and conf["model_type"] == orig["model_type"]
    assert conf["quantization_config"] == orig["quantization_config"]
    report = json.loads((out[key] / "prune_report.json").read_text())
    assert sorted(lay["layer"] for lay in report["layers"]) == src_moe_layers(src)
    for lay in report["layers"]:
        i = lay["layer"]
        assert len(lay["kept"]) == n_kept
        for k in lay["kept"]:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for t in stored:
                    a = dst.get(f"model.layers.{i}.mlp.experts.{k['new_index']}.{proj}.{t}")
                    b = src.get(f"model.layers.{i}.mlp.experts.{k['expert']}.{proj}.{t}")
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert not any(n.endswith(".weight") and ".mlp.experts." in n for n in dst.names())


def src_moe_layers(reader) -> list[int]:
    return sorted({int(n.split(".")[2]) for n in reader.names() if n.endswith(".weight_packed")})


@pytest.mark.parametrize("which", ["kimi", "kimi-pruned", "mxfp4", "mxfp4-pruned"])
def test_transformers_loads_packed_inputs_logits_match_the_stream(staged, which):
    out, logits = staged
    d = {"kimi": KIMI, "kimi-pruned": out["pruned"], "mxfp4": MXFP4, "mxfp4-pruned": out["mx-pruned"]}[which]
    ours = StreamedModel(d).forward([IDS])[0]
    assert _rel(logits[str(d)], ours) < 1e-6  # measured 2.2e-7: the same decoded weights, float32 both sides


def test_mxfp4_fixture_reader_equals_library_decompression():
    r = CheckpointReader(MXFP4)
    conf = r.config["quantization_config"]
    assert conf["format"] == "mxfp4-pack-quantized" and conf["config_groups"]["group_0"]["weights"]["group_size"] == 32
    bases = sorted(n[: -len(".weight_packed")] for n in r.names() if n.endswith(".weight_packed"))
    assert len(bases) == 4 * 16 * 3
    for b in bases[::7]:
        assert r.info(b + ".weight_scale").dtype == "U8"
        assert torch.equal(r.weight(b + ".weight", torch.bfloat16), _library(r, b, "mxfp4-pack-quantized")), b


def test_quantize_fp8_dynamic_from_mxfp4(staged):
    """The calibration-free path reads each expert's packed tensors and re-quantizes the decoded weight."""
    out, _ = staged
    r = CheckpointReader(out["mx-fp8"])
    assert not any(n.endswith((".weight_packed", ".weight_shape")) for n in r.names())
    n = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert r.info(n).dtype == "F8_E4M3" and _rel(r.weight(n), CheckpointReader(MXFP4).weight(n)) < 0.05


def test_quantize_fp8_from_kimi_reads_the_decoded_weights(staged):
    out, _ = staged
    r = CheckpointReader(out["fp8"])
    assert not any(n.endswith((".weight_packed", ".weight_shape")) for n in r.names())
    assert "quantization_config" not in r.config or r.config["quantization_config"].get("quant_method") != \
        "compressed-tensors"
    w = r.weight("model.layers.2.mlp.experts.3.up_proj.weight")
    ref = CheckpointReader(KIMI).weight("model.layers.2.mlp.experts.3.up_proj.weight")
    assert _rel(w, ref) < 0.05  # FP8 E4M3 of the INT4 values
    assert _rel(StreamedModel(out["fp8"]).forward([IDS])[0], StreamedModel(KIMI).forward([IDS])[0]) < 0.05


def test_an_export_of_a_compressed_tensors_input_says_it_is_one_already(staged, cli_run, tmp_path):
    """Kimi's INT4 checkpoint pruned (still compressed-tensors, loaded as it is) was refused by the export with
    "run moepress quantize first", and that quantize re-rounded its INT4 experts without a word."""
    out, _ = staged
    for src in (KIMI, out["pruned"]):
        r = cli_run("export", src, "--format", "compressed-tensors", "-o", tmp_path / "x")
        assert r.exit_code == 2 and f"{src} is a compressed-tensors checkpoint already (config.json " \
            "quantization_config); vLLM loads it as it is" in r.stderr and "quantize" not in r.stderr, r.stderr
        r = cli_run("export", src, "--format", "hf-modelopt", "-o", tmp_path / "y")
        assert r.exit_code == 2 and "rounds its quantized weights a second time" in r.stderr, r.stderr
    r = cli_run("quantize", KIMI, "--format", "fp8", "--num-samples", 2, "--seq-len", 16, "-o", tmp_path / "q")
    assert r.exit_code == 0 and f"note: {KIMI} stores its weights quantized (quantization_config " \
        "compressed-tensors); they are decoded and rounded again to fp8" in r.stderr, r.stderr


@pytest.mark.skipif("nvfp4" not in formats.produced(), reason="nvfp4 quantizer not registered")
def test_quantize_nvfp4_from_kimi(tmp_path):
    quantize_checkpoint(KIMI, tmp_path / "q", QuantConfig(format="nvfp4", num_samples=2, seq_len=32))
    r = CheckpointReader(tmp_path / "q")
    n = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert r.info(n).dtype == "U8" and _rel(r.weight(n), CheckpointReader(KIMI).weight(n)) < 0.2


def test_kimi_style_int4_export_config_layout_and_transformers_logits(staged):
    out, logits = staged
    qc = json.loads((out["ct"] / "config.json").read_text())["quantization_config"]
    kimi = json.loads((KIMI / "config.json").read_text())["quantization_config"]
    assert qc["format"] == kimi["format"] == "pack-quantized"
    (group,), (kgroup,) = qc["config_groups"].values(), kimi["config_groups"].values()
    assert group["targets"] == kgroup["targets"] == ["Linear"]
    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")
    assert [group["weights"][k] for k in keys] == [kgroup["weights"][k] for k in keys]
    # Kimi's four patterns, plus one for the routers (not Linears in DeepSeek-V3's modules: matches nothing there)
    assert qc["ignore"] == [*KIMI_IGNORE, ROUTERS]
    r = CheckpointReader(out["ct"])
    b = "model.layers.3.mlp.experts.9.down_proj"
    assert [r.info(f"{b}.{k}").dtype for k in ("weight_packed", "weight_shape")] == ["I32", "I64"]
    assert r.info(b + ".weight_scale").shape == (128, 2)
    assert all(".mlp.experts." in n for n in r.names() if n.endswith(".weight_packed"))
    assert r.info("model.layers.1.mlp.shared_experts.down_proj.weight").dtype == "BF16"
    assert _rel(logits[str(out["ct"])], StreamedModel(out["q"]).forward([IDS])[0]) < 1e-6  # measured 1.6e-7


# ---- memory --------------------------------------------------------------------------------------
DSV3 = dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=512, hidden_size=256,
            intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=32, n_shared_experts=1, n_group=4, topk_group=2,
            num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5, norm_topk_prob=True,
            num_nextn_predict_layers=0)
EXPERTS_FP32 = 32 * 3 * 256 * 256 * 4  # float32 bytes of one layer's routed experts (24 MB)

PROBE = """
    import json, sys, torch
    from moepress.compress.stream import StreamedModel
    sm = StreamedModel(sys.argv[1])
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    sm.forward([ids])
    base = reset_peak()
    logits = sm.forward([ids])[0]
    print(json.dumps({"grew": peak() - base, "finite": bool(torch.isfinite(logits).all())}))
"""


def test_streamed_kimi_format_peak_rss_is_a_few_layers(tmp_path):
    from memprobe import MB, run_probe
    from moepress.compress.synthetic import write_synthetic

    src = write_synthetic(DSV3, tmp_path / "bf16", seed=0)
    make_kimi_int4.write_fixture(src, tmp_path / "kimi", make_kimi_int4.kimi_scheme(), "pack-quantized",
                                 list(KIMI_IGNORE), "kimi_k2", "")
    r = run_probe(PROBE, tmp_path / "kimi", timeout=600, threads=1)
    assert r["finite"]
    # the model's 5 MoE layers are 5 x 24 MB of float32 experts; the stream holds about three layers
    # (the bf16 checkpoint's bound, tests/test_memory.py). Measured 45.5 MB = 1.9 expert layers (the bf16
    # source of the same model: 75.9 MB = 3.2): packed layers are read ahead at their stored size
    assert r["grew"] < 3.5 * EXPERTS_FP32, f"peak grew {r['grew'] / MB:.1f} MB"


# ---- scales that do not fit their weight: refused, not decoded with guessed groups ----------------
def _int4_module(tmp_path, out_f: int, in_f: int, scale: torch.Tensor, group: int = 32, **extra) -> CheckpointReader:
    """A pack-quantized INT4 module whose config declares ``group`` and whose stored scale is ``scale``."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, strategy="group",
                                                                              group_size=group))
    packed = torch.full((out_f, -(-in_f // 8)), 0x99999999 - 2 ** 32, dtype=torch.int32)  # every value 9 - 8 = 1
    tensors = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([out_f, in_f])} | extra
    return _write(tmp_path, tensors, scheme, "pack-quantized")


BASE = "model.layers.0.mlp.experts.0.down_proj"


def test_scale_whose_groups_are_not_the_declared_group_is_refused(tmp_path):
    """in_features 100 with a declared group of 32 is not whole groups: compressed-tensors itself refuses
    it; the reader did decode it with groups of 25 (100 / 4 scale columns)."""
    r = _int4_module(tmp_path, 4, 100, torch.tensor([[1.0, 2, 3, 4]] * 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="divisble|divisible"):
        _library(r, BASE, "pack-quantized")
    with pytest.raises(MoepressError, match=r"weight_scale' has shape \[4, 4\]; expected \[4, 100 / group\] with "
                                            r"group 32"):
        r.weight(BASE + ".weight")


@pytest.mark.parametrize("scale,words", [
    (torch.ones(2, 2, dtype=torch.bfloat16), None),  # 2 rows of scales for a 4-row weight
    (torch.ones(4, 3, dtype=torch.bfloat16), None),  # 64 inputs in 3 groups
    (torch.ones(4, 2, dtype=torch.int32), None),  # not a float scale
    (torch.ones(4, 2, dtype=torch.bfloat16), torch.tensor([4, 64, 1])),  # weight_shape of three values
])
def test_pack_quantized_scale_or_shape_that_does_not_fit_is_one_line(tmp_path, scale, words):
    extra = {} if words is None else {"weight_shape": words}
    r = _int4_module(tmp_path, 4, 64, scale, **extra)
    with pytest.raises(MoepressError, match=BASE):
        r.weight(BASE + ".weight")


def test_zero_point_of_another_shape_is_refused(tmp_path):
    r = _int4_module(tmp_path, 8, 64, torch.ones(8, 2, dtype=torch.bfloat16),
                     weight_zero_point=torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(MoepressError, match=r"weight_zero_point' has shape \[3, 5\]; expected \[1, 2\]"):
        r.weight(BASE + ".weight")


@pytest.mark.parametrize("edit,says", [
    ({"num_bits": 8}, "int 8-bit symmetric group"),  # compressed-tensors decodes the 4-bit words as 8-bit values
    ({"symmetric": False}, "int 4-bit asymmetric group"),  # it asserts: asymmetric needs zero points
    ({"strategy": "channel", "group_size": None}, "int 4-bit symmetric channel"),  # a size mismatch there
    ({"type": "float"}, "float 4-bit symmetric group"),
])
def test_a_config_that_does_not_describe_the_stored_tensors_is_refused(tmp_path, edit, says):
    """compressed-tensors decompresses by the config; the reader read the tensors alone (bits from the word count,
    symmetry from a zero point's presence), so a config saying otherwise was decoded as if it agreed."""
    r = _int4_module(tmp_path, 4, 64, torch.ones(4, 2, dtype=torch.bfloat16))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"].update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoepressError, match=rf"{BASE}\.weight_packed' stores 4-bit symmetric .*\({says}[^;)]*\)"):
        CheckpointReader(tmp_path).weight(BASE + ".weight")
    assert torch.equal(r.weight(BASE + ".weight"), torch.ones(4, 64))  # as the config first said: decoded


def test_one_scale_column_under_a_smaller_declared_group_is_refused(tmp_path):
    """A [out, 1] scale reads as one group per row, which a config group_size of 32 over 64 inputs does not
    describe: transformers allocates ceil(64 / 32) = 2 scale columns and refuses the stored one, while the reader
    decoded it as one 64-wide group and the check passed it."""
    r = _int4_module(tmp_path, 4, 64, torch.ones(4, 1, dtype=torch.bfloat16), group=64)
    assert torch.equal(r.weight(BASE + ".weight"), torch.ones(4, 64))  # as declared: one 64-wide group a row
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoepressError, match=rf"{BASE}\.weight_packed' stores 4-bit symmetric int values with a "
                       r"weight_scale of shape \[4, 1\], which no .*\(int 4-bit symmetric group group_size 32\)"):
        CheckpointReader(tmp_path).weight(BASE + ".weight")


def test_mxfp4_scale_per_24_values_is_refused(tmp_path):
    """MXFP4 has one scale per 32 values; a [2, 2] scale over 48 values is not that (the library refuses)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    r = _write(tmp_path, {"weight_packed": torch.full((2, 24), 0x22, dtype=torch.uint8),
                          "weight_scale": torch.tensor([[127, 128]] * 2, dtype=torch.uint8)},
               preset_name_to_scheme("MXFP4A16", ["Linear"]), "mxfp4-pack-quantized")
    with pytest.raises(MoepressError, match=r"expected \[2, 48 / group\] with group 32"):
        r.weight(BASE + ".weight")


@pytest.mark.parametrize("strategy,extra,shape", [
    ("group", {"group_size": 32}, (40, 96)),
    ("block", {"block_structure": [64, 64]}, (128, 192)),
])
def test_fp8_float_quantized_scales_other_than_tensor_channel_or_128_blocks_are_refused(tmp_path, strategy, extra,
                                                                                         shape):
    """compressed-tensors float-quantized FP8 by groups or by blocks other than 128x128: their scales
    were read as 128x128 blocks (relative error 0.05-0.3, exit 0). Refused, naming the tensor; the
    layouts that are read still equal the library's decompression."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    base = "model.layers.0.mlp.experts.0.down_proj"
    for strat, kw, refused in ((strategy, extra, True), ("channel", {}, False)):
        args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strat, **kw)
        scheme = QuantizationScheme(targets=["Linear"], weights=args)
        if strat == "block":
            br, bc = kw["block_structure"]
            b = w.reshape(shape[0] // br, br, shape[1] // bc, bc)
            mn, mx = b.amin((1, 3)), b.amax((1, 3))
        else:
            g = kw.get("group_size", shape[1])
            mn, mx = w.reshape(shape[0], -1, g).amin(-1), w.reshape(shape[0], -1, g).amax(-1)
        scale, _ = calculate_qparams(mn, mx, args)
        sd = {"weight": w, "weight_scale": scale}
        stored = BaseCompressor.get_value_from_registry("float-quantized").compress(sd, scheme)
        r = _write(tmp_path / strat, stored, scheme, "float-quantized")
        if refused:
            with pytest.raises(MoepressError, match=f"tensor '{base}.weight_scale' has shape"):
                r.weight(base + ".weight")
        else:
            lib = _library(r, base, "float-quantized")
            assert torch.equal(r.weight(base + ".weight", lib.dtype), lib)


def test_group_act_order_is_refused_unless_in_plain_order(tmp_path):
    """``weight_g_idx`` (older llm-compressor's actorder='group': column j scaled by group g_idx[j]) was
    ignored: every column read with the scale of its position's group. Refused when out of order; the
    plain order (j // group) is the same weight as without it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = torch.randn(70, 48, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scale, _ = calculate_qparams(w.reshape(70, 3, 16).amin(-1), w.reshape(70, 3, 16).amax(-1), args)
    stored = BaseCompressor.get_value_from_registry("pack-quantized").compress({"weight": w, "weight_scale": scale},
                                                                              scheme)
    base = "model.layers.0.mlp.experts.0.down_proj"
    plain = _write(tmp_path / "plain", stored, scheme, "pack-quantized").weight(base + ".weight")
    for name, g_idx, ok in (("in-order", torch.arange(48) // 16, True),
                            ("shuffled", (torch.arange(48) // 16)[torch.randperm(48)], False)):
        r = _write(tmp_path / name, {**stored, "weight_g_idx": g_idx.to(torch.int32)}, scheme, "pack-quantized")
        if ok:
            assert torch.equal(r.weight(base + ".weight"), plain)
        else:
            with pytest.raises(MoepressError, match=f"tensor '{base}.weight_g_idx': group act-order"):
                r.weight(base + ".weight")


@pytest.mark.parametrize("pattern,refused", [(r"re:.*experts\.1\..*", True), (r"re:.*experts\.\d+\.down_proj$", False)])
def test_prune_refuses_a_quantization_pattern_that_picks_experts_by_index(tmp_path, cli_run, pattern, refused):
    """An ignore pattern naming expert 1 (kept bf16 among packed experts) was copied as it was: after
    renumbering it named another expert (a bf16 one read as packed, a packed one left compressed), exit 0.
    Refused before any calibration; a pattern over every expert's projection is kept as it is."""
    src = tmp_path / "src"
    shutil.copytree(KIMI, src)
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"]["ignore"].append(pattern)
    (src / "config.json").write_text(json.dumps(conf))
    r = cli_run("prune", str(src), "--ratio", "0.25", "--method", "frequency", "--num-samples", "2", "--seq-len", "16",
                "-o", str(tmp_path / "p"))
    if refused:
        assert r.exit_code == 2 and not (tmp_path / "p").exists(), r.output
        assert len(r.stderr.strip().splitlines()) == 1 and f"pattern '{pattern}' selects routed experts" in r.stderr
    else:
        assert r.exit_code == 0, r.output
        assert pattern in json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["ignore"]


def test_per_tensor_fp8_weights_wider_than_a_block_equal_library(tmp_path, cli_run):
    """compressed-tensors' static FP8 (llm-compressor's, and moepress's own compressed-tensors fp8 export) stores a
    per-tensor weight_scale of shape [1]; the reader took it for a 1x1 block grid and, for a weight over 128 in either
    dimension, failed (size mismatch): prune, quantize and calib stats stopped with a traceback on such an input."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float",
                                                                             strategy="tensor", symmetric=True))
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(0))
    scale = (w.abs().max() / 448.0).reshape(1)
    packed = BaseCompressor.get_value_from_registry("float-quantized").compress(
        {"weight": w, "weight_scale": scale}, scheme)
    r = _write(tmp_path / "one", packed, scheme, "float-quantized")
    base = "model.layers.0.mlp.experts.0.down_proj"
    assert tuple(r.get(base + ".weight_scale").shape) == (1,)
    assert torch.equal(r.weight(base + ".weight", torch.float32), _library(r, base, "float-quantized").float())
    q, ct = tmp_path / "q", tmp_path / "ct"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8", num_samples=2, seq_len=32))
    export(q, ct, ExportConfig(format="compressed-tensors"))
    r = cli_run("prune", ct, "--method", "frequency", "--ratio", "0.25", "--num-samples", "2", "--seq-len", "32", "-o",
                tmp_path / "p", "--quiet")
    assert r.exit_code == 0, r.output


def test_a_stage_calibrating_on_an_activation_quantizing_input_says_it_streams_it_weight_only(tmp_path, cli_run):
    """A compressed-tensors checkpoint whose scheme quantizes activations (input_activations) is streamed weight-only
    (the stream fake-quantizes activations only as a moepress_quant.json says): prune, calib stats and a calibrated
    quantize say their statistics come from that weight-only forward (`moepress check` refuses it as a reference);
    a calibration-free quantize and a bf16 input say nothing of it."""
    cli_run("quantize", "tiny-mixtral", "--format", "fp8-dynamic", "-o", tmp_path / "fd", "--quiet")
    assert cli_run("export", tmp_path / "fd", "--format", "compressed-tensors", "-o", tmp_path / "ct").exit_code == 0
    small = ("--num-samples", 2, "--seq-len", 32)
    says = "input_activations), which moepress's stream leaves out: the calibration statistics come from its " \
           "weight-only forward"
    for args, noted in ((("prune", tmp_path / "ct", "--ratio", 0.25, "--method", "frequency", *small), True),
                        (("calib", "stats", tmp_path / "ct", *small), True),
                        (("quantize", tmp_path / "ct", "--format", "fp8", *small), True),
                        (("quantize", tmp_path / "ct", "--format", "fp8-block"), False),
                        (("prune", "tiny-mixtral", "--ratio", 0.25, "--method", "frequency", *small), False)):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        r = cli_run(*args, "-o", out)
        assert r.exit_code == 0, r.output
        assert (says in r.output) is noted, (args, r.output)

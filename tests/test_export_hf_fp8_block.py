"""hf-fp8-block: a DeepSeek-V3 (widths the runtimes take in block FP8) exported in DeepSeek-V3's
native block-FP8 layout loads with transformers on CPU (FineGrainedFP8: with no GPU it
dequantizes at load time — needs `accelerate`) and matches moepress's forward of the export.

Like with like: transformers on CPU runs the dequantized weights with no activation
quantization, so its logits are compared with moepress's weight-only forward of the same export
(float32 rounding); moepress's fake-quant forward (what a GPU runtime computes: dynamic 1x128
FP8 activations) differs from it by the activation quantization only, and is gated against the
original by `moepress check`.
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
from safetensors import safe_open

from helpers import checkpoint_tensors, transformers_logits
from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.stream import StreamedModel
from moepress.exporters import ExportConfig, export

CT_VERSION = tuple(int(x) for x in metadata.version("compressed-tensors").split(".")[:2])
DSV3 = models.path("tiny-deepseek-v3")
IDS = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))
# a DeepSeek-V3 whose widths the runtimes take in block FP8 (kernel_widths.block_ok: inputs and expert widths
# multiples of 128; the bundled tiny one's experts are 64 wide), but for kv_a_proj_with_mqa's 160 rows
DS128 = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
             num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from helpers import make_random_checkpoint

    base = tmp_path_factory.mktemp("fp8block")
    src = make_random_checkpoint("deepseek_v3", base / "ds128", **DS128)
    from_bf16 = base / "from-bf16"
    info_bf16 = export(src, from_bf16, ExportConfig(format="hf-fp8-block"))
    q = base / "q-fp8-block"
    quantize_checkpoint(src, q, QuantConfig(format="fp8-block"))
    from_q = base / "from-quantized"
    info_q = export(q, from_q, ExportConfig(format="hf-fp8-block"))
    return {"bf16": (from_bf16, info_bf16), "quantized": (from_q, info_q), "q": q, "src": src}


@pytest.fixture(scope="module")
def tf_runs(exports, tmp_path_factory):
    """Both exports run by transformers in one process without moepress."""
    outs = transformers_logits([(exports[w][0], IDS) for w in ("bf16", "quantized")], tmp_path_factory.mktemp("tf"))
    return dict(zip(("bf16", "quantized"), outs, strict=True))


def _moepress_logits(path, act_quant: bool):
    r = CheckpointReader(path)
    if not act_quant:
        r._moepress_quant = None  # no activation fake-quant hooks: weights only
    return StreamedModel(r).forward([IDS])[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("which", ["bf16", "quantized"])
def test_transformers_loads_and_matches_moepress(exports, tf_runs, which):
    path, _ = exports[which]
    # CPU: FineGrainedFP8 dequantizes at load (no FP8Linear left, every parameter float32)
    assert tf_runs[which]["dtypes"] == ["torch.float32"]
    tf = tf_runs[which]["logits"]
    # float32 rounding at most (measured 0.0 on this model, 1.7e-7 on the bundled tiny DeepSeek); transformers 5.24
    assert _rel(tf, _moepress_logits(path, act_quant=False)) < 4e-7
    fq = _moepress_logits(path, act_quant=True)
    # the dynamic activation quantization, nothing else: measured 0.0505 (bf16), 0.0442 (quantized)
    assert 0.022 < _rel(tf, fq) < 0.1


def test_layout_is_deepseeks(exports):
    path, info = exports["bf16"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == \
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    not_conv = set(qc["modules_to_not_convert"])
    assert {"lm_head", "model.embed_tokens", "model.layers.1.mlp.gate"} <= not_conv
    # 160-row kv_a_proj_with_mqa: 2 scale rows transformers would read as 80-row blocks -> kept bf16, listed; and
    # q_a_proj with it: vLLM and SGLang fuse the two into one linear and refuse one quantized beside one that is not
    # ("Detected some but not all shards ... are quantized", vLLM quant_utils.py is_layer_skipped)
    assert sorted(info["kept_high_precision"]) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("kv_a_proj_with_mqa", "q_a_proj"))
    assert set(info["kept_high_precision"]) <= not_conv
    src, out = CheckpointReader(exports["src"]), CheckpointReader(path)
    for name in out.names():
        info_ = out.info(name)
        if name.endswith(".weight_scale_inv"):
            w = out.info(name[: -len("_scale_inv")])
            assert info_.dtype == "F32" and w.dtype == "F8_E4M3"
            assert info_.shape == tuple(-(-d // 128) for d in w.shape)
        elif info_.dtype != "F8_E4M3":
            assert info_.dtype == src.info(name).dtype  # bf16 stays bf16, the router bias stays f32
    assert out.info("model.layers.1.mlp.gate.e_score_correction_bias").dtype == "F32"
    assert out.info("model.layers.1.mlp.experts.5.down_proj.weight").dtype == "F8_E4M3"
    assert out.info("model.layers.0.mlp.down_proj.weight").dtype == "F8_E4M3"  # dense first layer too


def test_quantized_input_is_renamed_not_requantized(exports):
    path, info = exports["quantized"]
    assert info["mode"] == "rename"
    q, out = CheckpointReader(exports["q"]), CheckpointReader(path)
    assert not any(n.endswith(".weight_scale") for n in out.names())
    for p in ("model.layers.2.mlp.experts.7.up_proj", "model.layers.2.self_attn.o_proj"):
        assert torch.equal(out.get(p + ".weight").view(torch.uint8), q.get(p + ".weight").view(torch.uint8))
        # the quantize output's Model-Optimizer [ceil(out/128), 1, ceil(in/128), 1], as DeepSeek's 2-D grid
        inv, stored = out.get(p + ".weight_scale_inv"), q.get(p + ".weight_scale")
        assert stored.dim() == 4 and inv.shape == (stored.shape[0], stored.shape[2])
        assert torch.equal(inv, stored.reshape(inv.shape))
    # same content as exporting the original directly (the quantizer's numerics are the exporter's)
    direct = CheckpointReader(exports["bf16"][0])
    p = "model.layers.2.mlp.shared_experts.gate_proj"
    assert torch.equal(direct.get(p + ".weight_scale_inv"), out.get(p + ".weight_scale_inv"))


def test_check_passes_against_the_original(tmp_path, cli_run):
    path = tmp_path / "fb"
    export(DSV3, path, ExportConfig(format="hf-fp8-block"))
    r = cli_run("check", path, "--reference", DSV3, "--max-samples", "4", "--seq-len", "128", "--quiet")
    assert r.exit_code == 0, r.output
    with safe_open(str(next(path.glob("model-*.safetensors"))), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_copied_mtp_layer_follows_the_trunks_rule(tmp_path):
    """DeepSeek's MTP layer (stored past num_hidden_layers) is copied under the trunk's rule: a linear no runtime
    computes in blocks is written dequantized and named in modules_to_not_convert, the others keep their FP8 and are
    not named. Its FP8 q/kv/o and experts were once named as bf16; then its partial-block linears were copied in FP8
    while the trunk's same linears were dequantized (the runtimes refuse them at load)."""
    from helpers import write_with_mtp

    # whole-block attention and experts but for q_b_proj / kv_b_proj (192 and 32 rows of 64 and 16 inputs)
    cfg = {**json.loads((DSV3 / "config.json").read_text()), "hidden_size": 256, "moe_intermediate_size": 128,
           "intermediate_size": 256, "num_nextn_predict_layers": 1}
    src = write_with_mtp(cfg, tmp_path / "mtp")
    n = cfg["num_hidden_layers"]
    export(src, tmp_path / "fb", ExportConfig(format="hf-fp8-block"))
    listed = set(json.loads((tmp_path / "fb" / "config.json").read_text())["quantization_config"]
                 ["modules_to_not_convert"])
    out, inp = CheckpointReader(tmp_path / "fb"), CheckpointReader(src)
    mtp = [k[: -len(".weight_scale_inv")] for k in inp.names()
           if k.startswith(f"model.layers.{n}.") and k.endswith(".weight_scale_inv")]
    kept_fp8 = {m for m in mtp if out.info(m + ".weight").dtype == "F8_E4M3"}
    assert kept_fp8 and len(kept_fp8) < len(mtp), (len(kept_fp8), len(mtp))  # both kinds, or the test shows nothing
    for m in mtp:
        trunk = m.replace(f"model.layers.{n}.", f"model.layers.{n - 1}.")
        assert (m in kept_fp8) == (out.info(trunk + ".weight").dtype == "F8_E4M3"), m
        assert (m in listed) == (m not in kept_fp8), m
        assert (m + ".weight_scale_inv" in out) == (m in kept_fp8), m
    assert {f"model.layers.{n}.eh_proj", f"model.layers.{n}.mlp.gate"} <= listed


def test_a_bf16_mtp_layer_stays_bf16_and_the_summary_says_so(tmp_path):
    """From a bf16 DeepSeek-V3 the trunk is quantized and the MTP layer copied in bf16 (DeepSeek ships it in FP8):
    every one of its linears named in modules_to_not_convert, and export.json names the layer."""
    from helpers import write_with_mtp

    cfg = {**json.loads((DSV3 / "config.json").read_text()), "hidden_size": 256, "moe_intermediate_size": 128,
           "intermediate_size": 256, "num_nextn_predict_layers": 1}
    src = write_with_mtp(cfg, tmp_path / "mtp", block_fp8=False)
    n = cfg["num_hidden_layers"]
    export(src, tmp_path / "fb", ExportConfig(format="hf-fp8-block"))
    listed = set(json.loads((tmp_path / "fb" / "config.json").read_text())["quantization_config"]
                 ["modules_to_not_convert"])
    out = CheckpointReader(tmp_path / "fb")
    mtp = [k[: -len(".weight")] for k in out.names()
           if k.startswith(f"model.layers.{n}.") and k.endswith("_proj.weight")]
    assert mtp and all(out.info(m + ".weight").dtype == "BF16" and m in listed for m in mtp)
    assert json.loads((tmp_path / "fb" / "export.json").read_text())["mtp_layers_high_precision"] == [
        f"model.layers.{n}"]


def test_copied_checkpoint_of_other_blocks_is_refused(tmp_path, cli_run):
    """The layout declares 128 x 128 blocks; a copied checkpoint of 64 x 64 blocks was relabelled."""
    from test_prune import write_deepseek_with_mtp

    src = write_deepseek_with_mtp(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {**(cfg.get("quantization_config") or {}), "weight_block_size": [64, 64]}
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli_run("export", src, "--format", "hf-fp8-block", "-o", tmp_path / "fb")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "weight_block_size [64, 64]" in r.stderr and not (tmp_path / "fb").exists()


@pytest.mark.parametrize("model", ["tiny-kimi-k2-int4", "tiny-qwen3-moe-mxfp4"])
def test_packed_input_is_refused(tmp_path, cli_run, model):
    """Kimi's INT4 / MXFP4 experts were copied still packed under a block-FP8 config: transformers
    initialised those experts at random (exit 0)."""
    r = cli_run("export", model, "--format", "hf-fp8-block", "-o", tmp_path / "fb")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "packed tensors" in r.stderr, r.output
    assert not (tmp_path / "fb").exists()


def test_a_model_without_one_readable_block_grid_is_refused(tmp_path, cli_run):
    """Hidden 200 (one full and one partial block, which transformers misreads: kernel_widths.grid_ok) in every
    linear: each stayed bf16 and the export exited 0 declaring quant_method fp8 (quantized_linears 0, said
    nowhere). Refused in one line instead."""
    from helpers import make_random_checkpoint

    src = make_random_checkpoint("mixtral", tmp_path / "w200", hidden_size=200, intermediate_size=72)
    r = cli_run("export", src, "--format", "hf-fp8-block", "-o", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "no linear of" in r.output and "128x128 block grid" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_experts_narrower_than_a_block_stay_bf16(tmp_path):
    """The bundled tiny DeepSeek's experts are 64 wide: vLLM, SGLang and TensorRT-LLM refuse block-FP8 experts
    whose width is not a multiple of 128 (at or under 128 too), and quantize activations in whole 1x128 groups
    (kernel_widths.block_ok). Those experts, and every linear with such an input, stay bf16 and are listed, the
    layer's fused experts module too; the export wrote them in FP8 with one partial block before."""
    out = tmp_path / "fb"
    export(DSV3, out, ExportConfig(format="hf-fp8-block"))
    r = CheckpointReader(out)
    fp8_linears = [n for n in r.names() if n.endswith(".weight") and r.info(n).dtype == "F8_E4M3"]
    assert fp8_linears  # the linears that qualify (128-wide inputs, dense outputs) are still FP8
    for n in fp8_linears:
        rows, cols = r.info(n).shape
        assert cols % 128 == 0 and (rows % 128 == 0 or ".experts." not in n), (n, rows, cols)
    assert r.info("model.layers.1.mlp.experts.5.down_proj.weight").dtype == "BF16"
    not_conv = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {f"model.layers.{i}.mlp.experts" for i in (1, 2, 3)} <= set(not_conv)


def test_a_layer_with_experts_partly_fp8_is_refused(exports, tmp_path, cli_run):
    """A --rule that leaves some of a layer's experts bf16: transformers' FP8 path builds the fused experts
    in FP8 unless the fused module is named, and then fails to load the bf16 ones (RuntimeError at
    from_pretrained); the export exited 0. Refused in one line, as compressed-tensors and hf-modelopt do."""
    q = tmp_path / "q"
    assert cli_run("quantize", exports["src"], "--format", "fp8-block", "--rule", "mlp.experts.1.*=none", "-o", q,
                   "--quiet").exit_code == 0
    r = cli_run("export", q, "--format", "hf-fp8-block", "-o", tmp_path / "fb", "--quiet")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "routed-expert linears stay unquantized" in r.output and "left unquantized by a --rule" in r.output
    # the way out this export takes: every expert projection in block FP8 (it writes no per-tensor FP8)
    assert r.output.rstrip().endswith("quantize every expert projection (no --rule leaving some unquantized)")
    assert not (tmp_path / "fb").exists()


def test_block_fp8_linears_kept_high_precision_are_written_in_the_export_dtype(tmp_path):
    """A quantize --format fp8-block output of the bundled tiny DeepSeek (64-wide experts, which no runtime
    computes in block FP8): hf-fp8-block writes those linears dequantized, in the export's --dtype (the dtype
    of every other high-precision tensor), and their values are the stored block-FP8 weights'."""
    import torch

    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-deepseek-v3"), q, QuantConfig(format="fp8-block"))
    for dtype, code in (("bfloat16", "BF16"), ("float16", "F16")):
        out = tmp_path / dtype
        info = export(q, out, ExportConfig(format="hf-fp8-block", dtype=dtype))
        kept = info["kept_high_precision"]
        assert any(".experts." in k for k in kept), kept
        r, src = CheckpointReader(out), CheckpointReader(q)
        for k in kept:
            assert r.info(k + ".weight").dtype == code, (k, r.info(k + ".weight").dtype)
            assert torch.equal(r.get(k + ".weight"), src.weight(k + ".weight", getattr(torch, dtype)))


def test_a_block_fp8_input_is_copied_but_for_linears_no_runtime_computes_in_blocks(tmp_path):
    """A DeepSeek-style block-FP8 checkpoint of experts 72 wide was copied as it was: every runtime refuses such
    block-FP8 experts, and transformers refused their grid at load. They are written dequantized (bf16, listed in
    modules_to_not_convert), as from a bf16 input. A dense linear the runtimes do compute, copied as shipped with a
    dimension over 128 that is not whole blocks (kv_a_proj_with_mqa of 576 rows, the last of its fused pair, as in
    DeepSeek-V3), is said to be misread by transformers in export.json."""
    from helpers import make_random_checkpoint, to_block_fp8

    src = make_random_checkpoint("deepseek_v3", tmp_path / "bf16", hidden_size=256, intermediate_size=256,
                                 moe_intermediate_size=72, q_lora_rank=256, kv_lora_rank=512, qk_rope_head_dim=64)
    to_block_fp8(src, tmp_path / "fp8")
    out = tmp_path / "fb"
    export(tmp_path / "fp8", out, ExportConfig(format="hf-fp8-block"))
    r, info = CheckpointReader(out), json.loads((out / "export.json").read_text())
    gate, kv_a = "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa"
    assert r.info(gate + ".weight").dtype == "BF16" and gate + ".weight_scale_inv" not in r
    assert gate in json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    want = CheckpointReader(tmp_path / "fp8")
    torch.testing.assert_close(r.get(gate + ".weight").float(), want.weight(gate + ".weight", torch.bfloat16).float())
    assert r.info(kv_a + ".weight").shape[0] == 576
    assert torch.equal(r.get(kv_a + ".weight").view(torch.uint8), want.get(kv_a + ".weight").view(torch.uint8))
    assert info["misloaded_by"] == {"transformers": "5.25"} and "kv_a_proj_with_mqa" in \
        info["misloaded_why"]["transformers"]


@pytest.mark.parametrize("family,over,group", [
    ("deepseek_v3", {"q_lora_rank": 192}, ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    ("qwen3_moe", {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 128, "head_dim": 64,
                   "num_key_value_heads": 1}, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))])
def test_a_copied_fused_group_with_a_partial_part_is_written_bf16_whole(tmp_path, family, over, group):
    """The copy of a block-FP8 input kept a fused q_a / kv_a (q_a of 192 rows) or q/k/v (64-row k / v) in FP8 where
    a part but DeepSeek's kv_a is not whole 128-row blocks: vLLM (fp8_utils.validate_fp8_block_shape) and SGLang
    (validate_block_quant_shapes) refuse the fused linear at load. Written bf16 as a group, as from a bf16 input."""
    from helpers import make_random_checkpoint, to_block_fp8

    src = make_random_checkpoint(family, tmp_path / "bf16", **over)
    to_block_fp8(src, tmp_path / "fp8")
    out = tmp_path / "fb"
    export(tmp_path / "fp8", out, ExportConfig(format="hf-fp8-block"))
    r = CheckpointReader(out)
    skipped = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    for p in group:
        name = f"model.layers.1.{p}"
        assert r.info(name + ".weight").dtype == "BF16" and name + ".weight_scale_inv" not in r, name
        assert name in skipped, name


def test_this_exports_output_exports_again(exports, tmp_path):
    """hf-fp8-block's own output as input: its moepress_quant.json lists the modules, their grids under DeepSeek's
    weight_scale_inv. hf-fp8-block refused it ("no linear ... (e.g. none)") after a pass over the model, and
    compressed-tensors stopped at a missing weight_scale. Now the first copies it byte for byte; the second
    writes its E4M3 bytes and block grids, and transformers (with compressed-tensors, no moepress) runs it as
    moepress's fake-quant forward of the hf-fp8-block export (dynamic 1x128 FP8 activations)."""
    fb, _ = exports["bf16"]
    again, ct = tmp_path / "again", tmp_path / "ct"
    export(fb, again, ExportConfig(format="hf-fp8-block"))
    a, b = checkpoint_tensors(fb), checkpoint_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    export(fb, ct, ExportConfig(format="compressed-tensors"))
    c = checkpoint_tensors(ct)
    blocks = [k.removesuffix(".weight_scale_inv") for k in a if k.endswith(".weight_scale_inv")]
    assert len(blocks) > 10
    for n in blocks:
        assert torch.equal(c[n + ".weight"].view(torch.uint8), a[n + ".weight"].view(torch.uint8)), n
        assert torch.equal(c[n + ".weight_scale"].float(), a[n + ".weight_scale_inv"].float()), n
    # compressed-tensors <= 0.18 reads a [3, 1] grid ([384, 128]) as per-channel (test_ct_block_grids.py)
    assert json.loads((ct / "export.json").read_text())["misloaded_by"] == {"compressed_tensors": "0.18"}
    if CT_VERSION < (0, 19):
        return
    tf = transformers_logits([(ct, IDS)], tmp_path / "tf")[0]["logits"]
    # transformers' CT Linears quantize their inputs per 1x128 group; its fused experts run dequantized weights
    # (test_export_ct.py): so does moepress's forward here
    r = CheckpointReader(fb)
    lay = json.loads((fb / "moepress_quant.json").read_text())
    r._moepress_quant = {**lay, "modules": {k: v for k, v in lay["modules"].items() if ".experts." not in k}}
    # measured 0.0 (test_export_ct.py allows 1e-4 for the lowest versions' rounding of a per-token scale)
    assert _rel(tf, StreamedModel(r).forward([IDS])[0]) < 1e-4


def test_a_packed_input_without_a_block_grid_is_not_sent_to_a_block_fp8_quantize(tmp_path, cli_run):
    """Kimi K2 Thinking's INT4 layout (made by compressed-tensors: tools/make_kimi_int4.py) at widths no 128x128
    grid divides (hidden 320, experts 96): the refusal named `quantize --format fp8-block, then export
    hf-fp8-block`, which this export then refused (no linear with a 128x128 block grid)."""
    import shutil
    import sys
    from pathlib import Path

    from moepress.compress.synthetic import write_synthetic

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import make_kimi_int4 as mk

    conf = {**json.loads((DSV3 / "config.json").read_text()), "hidden_size": 320, "intermediate_size": 448,
            "moe_intermediate_size": 96, "q_lora_rank": 96, "kv_lora_rank": 40, "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16, "v_head_dim": 32, "num_hidden_layers": 2}
    bf = write_synthetic(conf, tmp_path / "bf16", seed=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DSV3 / f, bf / f)
    src = tmp_path / "int4"
    mk.write_fixture(bf, src, mk.kimi_scheme(), "pack-quantized", mk.KIMI_IGNORE, "kimi_k2", "# synthetic\n")
    r = cli_run("export", src, "--format", "hf-fp8-block", "-o", tmp_path / "fb")
    assert r.exit_code == 2 and "packed tensors" in r.stderr, r.output
    assert "fp8-block, then export hf-fp8-block" not in r.stderr, r.stderr
    assert "quantize with --format fp8 (or fp8-dynamic), then export compressed-tensors" in r.stderr, r.stderr

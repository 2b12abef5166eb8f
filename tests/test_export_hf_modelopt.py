"""hf-modelopt export (issue #6 acceptance): the FP8 export of the bundled Qwen3-MoE matches
Model-Optimizer's own ``export_hf_checkpoint`` of the same model and calibration tokens.

modelopt side (a subprocess, so its module patching stays out of this process): transformers 5
loads the bf16 model, ``mtq.quantize(model, FP8_DEFAULT_CFG, forward_loop)`` over the same
calibration batches, ``export_hf_checkpoint``. Our side: ``quantize_checkpoint(format="fp8",
sequential=False)`` (modelopt calibrates every layer on the unquantized model's activations) and
``export --format hf-modelopt``.

Measured (modelopt 0.47.0, transformers 5.24): identical tensor names, dtypes and shapes,
identical hf_quant_config.json (producer aside) and config.json quantization_config; bf16
tensors bit-equal. What differs, by design:
* q/k/v ``weight_scale``: moepress gives the three linears that TensorRT-LLM fuses into one QKV
  GEMM one shared scale (the max; what its fused-QKV FP8 loader computes from separate scales),
  modelopt 0.47 keeps one per linear -> q/k/v FP8 bytes differ but dequantize to within one
  FP8 ulp; modelopt's fused-expert and o_proj scales are equal to ours bit for bit.
* ``input_scale``: modelopt's amax comes from its bf16 forward, ours from float32 -> within 2%.
* FP8 bytes with equal scales: ~93% identical (modelopt divides in bf16, we in float32); every
  dequantized weight is within one FP8 ulp of modelopt's.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import forkserver
from moepress import models
from moepress.calib.data import calibration_batches
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export

MODELOPT = textwrap.dedent("""
    import copy, sys, warnings
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM
    src, batches_path, out = sys.argv[1:4]
    batches = torch.load(batches_path)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    assert model.config.architectures  # modelopt's export needs it (set in the bundled config)

    def loop(m):
        with torch.no_grad():
            for b in batches:
                m(input_ids=b, use_cache=False)

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = [*cfg["quant_cfg"], *mtq.FP8_KV_CFG["quant_cfg"]]  # FP8 KV cache too (--kv-cache fp8)
    mtq.quantize(model, cfg, loop)
    export_hf_checkpoint(model, export_dir=out)
""")

QKV = ("q_proj", "k_proj", "v_proj")


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    base = tmp_path_factory.mktemp("hfmo")
    src = models.path("tiny-qwen3-moe")
    batches = calibration_batches(src, (), 4, 64, 0, 4)
    torch.save(batches, base / "batches.pt")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    p = forkserver.Popen([sys.executable, "-c", MODELOPT, str(src), str(base / "batches.pt"), str(base / "modelopt")],
                         cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    q = base / "q"
    quantize_checkpoint(src, q, QuantConfig(format="fp8", sequential=False, kv_cache="fp8"), batches=batches)
    info = export(q, base / "ours", ExportConfig(format="hf-modelopt"))
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    return base / "modelopt", base / "ours", q, info


def test_layout_and_configs_equal_modelopts(both):
    ref, ours, _, info = both
    a, b = _tensors(ref), _tensors(ours)
    assert sorted(a) == sorted(b)
    assert {k: (a[k].dtype, tuple(a[k].shape)) for k in a} == {k: (b[k].dtype, tuple(b[k].shape)) for k in b}
    assert b["model.layers.1.mlp.experts.3.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert b["model.layers.1.mlp.experts.3.gate_proj.weight_scale"].shape == ()
    ha, hb = (json.loads((d / "hf_quant_config.json").read_text()) for d in (ref, ours))
    assert hb["producer"].pop("exported_by").startswith("moepress")
    assert ha == hb and hb["quantization"]["quant_algo"] == "FP8" and hb["quantization"]["kv_cache_quant_algo"] == "FP8"
    # the KV scales under modelopt's names (they were self_attn.k_scale: TensorRT-LLM did not see them)
    assert "model.layers.0.self_attn.k_proj.k_scale" in b and "model.layers.3.self_attn.v_proj.v_scale" in b
    assert "model.layers.0.mlp.gate" in hb["quantization"]["exclude_modules"]
    ca, cb = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (ref, ours))
    cb["producer"].pop("exported_by")
    assert ca == cb
    assert info["quant_algo"] == "FP8" and (ours / "export.json").is_file() and (ours / "moepress_quant.json").is_file()


def test_values_equal_modelopts_to_fp8_rounding(both):
    ref, ours, _, _ = both
    a, b = _tensors(ref), _tensors(ours)
    fp8_weights = [k for k in a if a[k].dtype == torch.float8_e4m3fn]
    assert len(fp8_weights) == 4 * (4 + 16 * 3)
    for k in (k for k in a if k.endswith(("k_proj.k_scale", "v_proj.v_scale"))):  # the FP8 KV-cache scales
        torch.testing.assert_close(b[k], a[k], rtol=0.01, atol=0)  # measured <= 0.0051
    for k in a:  # high-precision tensors (embeddings, norms, routers, lm_head): bit-equal
        if a[k].dtype == torch.bfloat16:
            assert torch.equal(a[k], b[k]), k
    for k in fp8_weights:
        p = k[: -len(".weight")]
        sa, sb = a[p + ".weight_scale"], b[p + ".weight_scale"]
        if p.endswith(QKV):  # ours: the max over the fused q/k/v, as TensorRT-LLM's fused loader uses
            qkv = torch.stack([a[p.rsplit(".", 1)[0] + "." + n + ".weight_scale"] for n in QKV])
            assert torch.equal(sb, qkv.max())
        else:
            assert torch.equal(sa, sb), p
        # measured <= 0.0066
        torch.testing.assert_close(b[p + ".input_scale"], a[p + ".input_scale"], rtol=0.013, atol=0)
        da, db = a[k].float() * sa, b[k].float() * sb
        # one E4M3 ulp: 2^-3 relative (3 mantissa bits), subnormal step 2^-9 * scale
        ulp = torch.maximum(da.abs(), db.abs()) * 2**-3 + torch.maximum(sa, sb) * 2**-9
        assert ((da - db).abs() <= ulp).all(), k


def test_fp8_block_experts_go_to_hf_fp8_block(tmp_path, cli_run):
    """Block-FP8 experts: TensorRT-LLM's fused MoE reads their scales only under DeepSeek's name (vLLM / SGLang
    load none from a Model-Optimizer checkpoint), so hf-modelopt refuses them in one line naming hf-fp8-block,
    whose export of the same checkpoint names every expert's scale so, [out/128, in/128]."""
    sys.path.insert(0, os.path.dirname(__file__))
    import consumer_names as cn

    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-qwen3-moe"), q, QuantConfig(format="fp8-block"))
    r = cli_run("export", q, "--format", "hf-modelopt", "-o", tmp_path / "e")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "export hf-fp8-block" in r.stderr, r.output
    assert not (tmp_path / "e").exists()
    assert cli_run("export", q, "--format", "hf-fp8-block", "-o", tmp_path / "f", "--quiet").exit_code == 0
    t = _tensors(tmp_path / "f")
    experts = [n[: -len(".weight")] for n in t if ".mlp.experts." in n and n.endswith(".weight")]
    assert experts and all(t[f"{e}.{cn.TRTLLM_MOE_BLOCK_SCALE}"].shape == (1, 1) for e in experts)


def test_bf16_input_needs_quantize(tmp_path, cli_run):
    r = cli_run("export", models.path("tiny-qwen3-moe"), "--format", "hf-modelopt", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "run moepress quantize --format fp8" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_output_not_empty_needs_force(both, tmp_path, cli_run):
    _, _, q, _ = both
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / "moepress-manifest.json").write_text("{}")  # an earlier output
    r = cli_run("export", q, "--format", "hf-modelopt", "-o", out)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--force" in r.output
    r = cli_run("export", q, "--format", "hf-modelopt", "-o", out, "--force", "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "hf_quant_config.json").is_file() and not (out / "keep.txt").exists()


def test_format_family_combination_refused(monkeypatch, tmp_path, cli_run):
    """None of the Hugging Face formats is family-restricted; the registry's family check (what
    trtllm-ckpt's Mixtral/Qwen3-only layout relies on) answers in one line, before any output."""
    import dataclasses

    from moepress.exporters import exporters

    ex = exporters()["hf-fp8-block"]
    monkeypatch.setitem(exporters(), "hf-fp8-block", dataclasses.replace(ex, families=("mixtral",)))
    r = cli_run("export", models.path("tiny-qwen3-moe"), "--format", "hf-fp8-block", "-o", tmp_path / "x")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "not available for" in r.output and "mixtral" in r.output and not (tmp_path / "x").exists()


def test_check_passes_against_the_original(both, cli_run):
    """The export streams back through moepress (the kept sidecar attaches the static FP8
    activation fake-quant) and passes the default accuracy gates against the bf16 original."""
    _, ours, _, _ = both
    r = cli_run("check", ours, "--reference", "tiny-qwen3-moe", "--max-samples", "4", "--seq-len", "128", "--quiet")
    assert r.exit_code == 0, r.output


def test_transformers_misreads_it_and_check_refuses_that_reading_in_one_line(both, cli_run, tmp_path):
    """transformers has no quantizer for quant_method "modelopt" (not a consumer hf-modelopt names): it loads the
    export without an error, its FP8 codes as plain numbers (logits, in a process that never imports moepress,
    far from the quantize output's streamed ones). ``check --kind transformers`` refuses it in one line instead
    of measuring that misread model, and the export's consumer_notes say so."""
    from helpers import transformers_logits
    from moepress.compress.stream import StreamedModel

    _, ours, q, info = both
    assert any(n.startswith("transformers <= ") and "no Model-Optimizer quantizer" in n for n in info["consumer_notes"])
    ids = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(0))
    got = transformers_logits([(ours, ids)], tmp_path / "tf")[0]["logits"]
    want = StreamedModel(str(q)).forward([ids])[0]
    assert float((got - want).norm() / want.norm()) > 0.35  # misread: 0.78 measured here
    r = cli_run("check", ours, "--reference", "tiny-qwen3-moe", "--kind", "transformers", "--max-samples", "2",
                "--seq-len", "64", "--quiet")
    assert r.exit_code == 2 and "quant_method modelopt" in r.output and len(r.output.strip().splitlines()) == 1, \
        r.output


@pytest.mark.parametrize("fmt,modelopt_fmt", [("int4-awq", "int4_awq"), ("w4a8-awq", "w4a8_awq"),
                                              ("fp8-dynamic", "fp8_pc_pt"), ("fp8", "fp8")])
def test_quant_config_equals_modelopts_for_each_algo(both, fmt, modelopt_fmt):
    """hf_quant_config.json's ``quantization`` for every format, against modelopt's own
    process_layer_quant_config fed the same per-module formats. (Whole-model INT4_AWQ export is
    not comparable here: modelopt 0.47's export_hf_checkpoint fails on transformers 5's fused
    Qwen3-MoE experts, "object of type 'QuantQwen3MoeExperts' has no len()"; it worked with
    transformers 4.57.)"""
    import warnings

    from moepress.compress.quantize import read_quant_layout
    from moepress.exporters.hf_modelopt import quant_configs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.quant_utils import process_layer_quant_config

    _, ours, q, _ = both
    group = 128 if "awq" in fmt else None
    modules = {k: {**v, "format": fmt, "group": group} for k, v in read_quant_layout(q)["modules"].items()}
    exclude = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    hf_quant, flat = quant_configs({}, modules, exclude, kv_cache=False)
    layer_cfg = {}
    for n in sorted([*modules, *exclude]):
        layer_cfg[n + ".quantization"] = modelopt_fmt if n in modules else None
        layer_cfg[n + ".awq_block_size"] = group or 0
    ref = process_layer_quant_config(layer_cfg)
    assert hf_quant["quantization"] == ref
    assert flat["quant_algo"] == ref["quant_algo"] and flat["ignore"] == ref["exclude_modules"]


@pytest.mark.parametrize("fmts", [("int4-awq", "fp8"), ("w4a8-awq", "fp8"), ("fp8", "nvfp4"), ("fp8",), ("nvfp4",),
                                  ("nvfp4-a16",), ("w4a8-awq",), ("fp8-dynamic",), ("int4-awq",), ("int4-gptq",)])
def test_flat_quantization_config_equals_modelopts_conversion(fmts):
    """config.json's quantization_config (the flat form vLLM and SGLang read) against Model-Optimizer 0.47's own
    convert_hf_quant_config_format of the same hf_quant_config: quantized_layers, config groups (none where
    modelopt writes none: ours described W4A8_AWQ's INT4 weights as FP4 and FP8_PER_CHANNEL_PER_TOKEN's dynamic
    activations as static), ignore, algos, KV scheme."""
    import warnings

    from moepress.exporters.hf_modelopt import quant_configs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    names = ["model.layers.0.mlp.experts.0.w1", "model.layers.0.self_attn.q_proj"]
    modules = {n: {"format": f, "group": 128 if "awq" in f else None}
               for n, f in zip(names, (fmts * 2)[:2], strict=True)}
    hf, flat = quant_configs({}, modules, ["lm_head"], True)
    ref = convert_hf_quant_config_format(hf)
    for k in ("quantized_layers", "ignore", "quant_algo", "kv_cache_scheme", "quant_method"):
        assert flat.get(k) == ref.get(k), (k, flat.get(k), ref.get(k))
    assert flat.get("config_groups") == ref.get("config_groups")


def _trtllm_excluded(name: str, exclude: list[str]) -> bool:
    """TensorRT-LLM's QuantConfig.is_module_excluded_from_quantization (tensorrt_llm/models/
    modeling_utils.py): fnmatchcase of the module name, then of each parent, against exclude_modules."""
    import fnmatch

    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:k]), p) for k in range(len(parts), 0, -1) for p in exclude)


@pytest.mark.parametrize("model,rule,fused,layers,quantized", [
    ("tiny-qwen3-moe", "self_attn.*", "self_attn.qkv_proj", range(4), "mlp.experts"),
    ("tiny-deepseek-v3", "self_attn.*", "self_attn.fused_a", range(4), "mlp.experts"),
    ("tiny-qwen3-moe", "model.layers.0.mlp.experts.*", "mlp.experts", [0], "mlp.experts")])
def test_linears_left_high_precision_are_excluded_by_their_fused_name(tmp_path, model, rule, fused, layers, quantized):
    """Attention left bf16 by a --rule was listed as q_proj, k_proj, v_proj; TensorRT-LLM's PyTorch
    backend builds one fused qkv_proj (DeepSeek: fused_a = q_a_proj + kv_a_proj_with_mqa), matches its
    name against exclude_modules, and built it quantized over bf16 tensors without scales. Likewise a layer
    whose routed experts all stay bf16: the fused MoE module (mlp.experts) is excluded by its own name, in
    hf_quant_config.json and in config.json's ignore (vLLM matches the fused name there too)."""
    q = tmp_path / "q"
    quantize_checkpoint(models.path(model), q, QuantConfig(format="fp8", rules=((rule, "none"),),
                                                           num_samples=2, seq_len=32))
    export(q, tmp_path / "m", ExportConfig(format="hf-modelopt"))
    exclude = json.loads((tmp_path / "m" / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    ignore = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["ignore"]
    for names in (exclude, ignore):
        for i in layers:
            assert _trtllm_excluded(f"model.layers.{i}.{fused}", names), (i, names)
        assert not _trtllm_excluded(f"model.layers.1.{quantized}", names)  # the quantized ones stay quantized


@pytest.mark.parametrize("fmt,group", [("nvfp4", 16), ("int4-awq", 64), ("int4-awq", 32), ("int4-gptq", 128)])
def test_flat_group_size_is_the_stored_group(fmt, group):
    """config.json's flat group_size and hf_quant_config.json's are the group the linears are stored in (NVFP4's
    16, INT4's --group-size): vLLM reads the flat one for NVFP4 (modelopt.py from_config) and allocates weight
    scales of [out, in // group_size]; TensorRT-LLM reads hf_quant_config.json's for INT4. Model-Optimizer's
    conversion compared above does not write the flat one, so it is checked here."""
    from moepress.exporters.hf_modelopt import quant_configs

    names = ["model.layers.0.mlp.experts.0.w1", "model.layers.0.self_attn.q_proj"]
    hf, flat = quant_configs({}, {n: {"format": fmt, "group": None if fmt == "nvfp4" else group} for n in names},
                             ["lm_head"], False)
    assert hf["quantization"]["group_size"] == flat["group_size"] == group


def test_folded_w4a8_awq_gets_a_ones_pre_quant_scale_per_awq_linear(tmp_path):
    """quantize --awq-fold moves AWQ's smoothing into the norms, so the quantize output has no
    pre_quant_scale; Model-Optimizer's W4A8_AWQ layout has one per AWQ linear (TensorRT-LLM multiplies the
    activations by it): the export writes ones, one per quantized linear, as wide as its input (the source
    model's in_features; the packed INT4 weight is [out / 2, in])."""
    from moepress.compress.checkpoint import CheckpointReader

    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="w4a8-awq", awq_fold=True,
                                                                    num_samples=2, seq_len=32))
    modules = json.loads((q / "moepress_quant.json").read_text())["modules"]
    assert not any(n.endswith(".pre_quant_scale") for n in CheckpointReader(q).names())
    export(q, e, ExportConfig(format="hf-modelopt"))
    r, src = CheckpointReader(e), CheckpointReader(models.path("tiny-mixtral"))
    assert {n for n in r.names() if n.endswith(".pre_quant_scale")} == {m + ".pre_quant_scale" for m in modules}
    for m in modules:
        s = r.get(m + ".pre_quant_scale")
        assert s.dtype == torch.float32 and torch.equal(s, torch.ones(src.info(m + ".weight").shape[1]))
    assert json.loads((e / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "W4A8_AWQ"


def test_fp8_kv_cache_of_an_hf_modelopt_export_is_what_build_budgets(tmp_path):
    """quantize --kv-cache fp8, export hf-modelopt: hf_quant_config.json says kv_cache_quant_algo FP8 (what
    TensorRT-LLM and vLLM read), and build / plan take that as the KV-cache dtype (1 byte per value), not bf16."""
    from moepress.exporters import artifacts
    from moepress.exporters.kv_cache import KV_CACHE

    q, e = tmp_path / "q", tmp_path / "m"
    quantize_checkpoint(models.path("tiny-qwen3-moe"), q, QuantConfig(format="fp8", kv_cache="fp8",
                                                                       num_samples=2, seq_len=32))
    export(q, e, ExportConfig(format="hf-modelopt"))
    assert json.loads((e / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    declared = artifacts.kv_cache_declared(e)
    assert declared is not None and declared.name == "fp8" and declared == KV_CACHE["fp8"]
    assert declared.bytes == 1


def test_fp8_dynamic_channel_scale_has_the_shape_modelopt_writes_and_runtimes_allocate(tmp_path):
    """FP8_PER_CHANNEL_PER_TOKEN ``weight_scale``: Model-Optimizer 0.47 exports a per-channel (axis 0) quantizer's
    scale squeezed to [out] (TensorQuantizer.export_amax: "If single-axis quantization, squeeze amax"), the shape
    TensorRT-LLM's FP8RowwiseLinearMethod (``torch.empty(out_features)``, filled by a plain ``copy_``) and vLLM's
    ModelOptFp8PcPtLinearMethod (ChannelQuantScaleParameter [out], shape asserted) allocate; [out, 1] fails to load."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.quant_utils import get_scaling_factor
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
    q = tmp_path / "q"
    # routed experts bf16: hf-modelopt refuses fp8-dynamic experts (no runtime's MoE loads them)
    quantize_checkpoint(models.path("tiny-qwen3-moe"), q, QuantConfig(format="fp8-dynamic",
                                                                     rules=(("mlp.experts.*", "none"),)))
    export(q, tmp_path / "m", ExportConfig(format="hf-modelopt"))
    name = "model.layers.0.self_attn.q_proj"
    t = _tensors(tmp_path / "m")
    tq = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=0))
    tq.enable_calib(), tq.disable_quant()
    tq(t[name + ".weight"].float())
    tq.load_calib_amax(), tq.disable_calib()
    assert tuple(t[name + ".weight_scale"].shape) == tuple(get_scaling_factor(tq).shape) == (128,)
    # the quantize output carries modelopt's hf_quant_config.json too: the same shape there
    assert tuple(_tensors(q)[name + ".weight_scale"].shape) == (128,)



def test_fp8_dynamic_routed_experts_are_refused_naming_exports_that_take_them(tmp_path, cli_run):
    """TensorRT-LLM's PyTorch backend has no fused-MoE method for FP8_PER_CHANNEL_PER_TOKEN (rowwise) experts
    (tensorrt_llm/_torch/modules/fused_moe: no such leaf among the CUTLASS / TRTLLM-gen / DeepGEMM ones; the engine
    path's layers/moe.py raises "MOE Does not support FP8 rowwise quantize") and vLLM's Model-Optimizer MoE method
    is per-tensor FP8 only: the export was written (exit 0) and loaded nowhere. Refused in one line; both ways it
    names take the model (the compressed-tensors export of the same checkpoint, the fp8 re-quantize)."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-mixtral", "--format", "fp8-dynamic", "-o", q, "--quiet").exit_code == 0
    r = cli_run("export", q, "--format", "hf-modelopt", "-o", tmp_path / "e")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "routed experts are fp8-dynamic" in r.stderr and "at any group size" not in r.stderr
    assert "export compressed-tensors" in r.stderr and "--format fp8 (or nvfp4)" in r.stderr
    assert not (tmp_path / "e").exists()
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", tmp_path / "ct", "--quiet").exit_code == 0


@pytest.mark.parametrize("sidecar", [True, False], ids=["moepress-output", "modelopt-original"])
def test_a_channel_scale_stored_out_dequantizes_each_row_by_its_own_scale(tmp_path, sidecar):
    """weight_scale [out] (Model-Optimizer's per-channel shape, no trailing 1) scales row i by scale[i]
    (modelopt 0.47 quant_utils.to_quantized_weight divides by weights_scaling_factor[:, None]), read by the
    registry's decoder and by the exporters' read_linear, on q_proj (128 x 128: a square weight, where a scale
    broadcast along the columns instead would not fail but give other numbers) and k_proj (64 x 128). Without
    moepress_quant.json (a checkpoint Model-Optimizer wrote) the shape alone says per channel: [out] is no block
    grid."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.linears import read_linear

    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-qwen3-moe"), q, QuantConfig(format="fp8-dynamic"))
    if not sidecar:
        (q / "moepress_quant.json").unlink()
    t = _tensors(q)
    reader = CheckpointReader(q)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        w, s = t[name + ".weight"], t[name + ".weight_scale"]
        assert s.dim() == 1 and s.unique().numel() > 1  # distinct per-row scales: a transposed read differs
        oracle = w.float() * s.float()[:, None]
        assert torch.equal(reader.weight(name + ".weight", torch.float32), oracle), name
        lin = read_linear(reader, name)
        assert lin.stored_as == "fp8-dynamic" and torch.equal(lin.dequantize(), oracle), name

"""hf-modelopt's block-FP8 linears (``fp8_pb_wo``): the ``weight_scale`` shape Model-Optimizer writes and vLLM
allocates, and moepress reading back both that shape and the 2-D grid hf-modelopt exports wrote before.

Facts (read from the consumers' sources):
* Model-Optimizer 0.47 exports a 128x128 block weight quantizer's scale as [ceil(out/128), 1, ceil(in/128), 1]
  (export/quant_utils.py ``get_weight_scaling_factor`` -> ``get_scaling_factor`` = export_amax / 448; the amax
  keeps the block reshape's singleton dims). The test below asks modelopt itself, on the same bf16 weights.
* vLLM 0.33.0 allocates that shape (model_executor/layers/quantization/modelopt.py ``KFp8Block128.create_weights``:
  ``(cdiv(out, 128), 1, in_ // 128, 1)``, a BlockQuantScaleParameter) and its loaders assert it (parameter.py
  ``load_column_parallel_weight`` / ``load_merged_column_weight`` / ``load_qkv_weight``: ``assert ... shape ==``;
  ``load_row_parallel_weight`` narrows dim 2, an IndexError on a 2-D tensor): the 2-D grid does not load.
* TensorRT-LLM main (2026-11) ``FP8BlockScalesLinearMethod`` (_torch/modules/linear.py) squeezes a 4-D scale to 2-D
  in its vanilla, fused-QKV and fused gate/up loaders ("modelopt fp8_pb_wo can have 2 extra singleton dimensions").

Fixture: a random Qwen3-MoE (compress/synthetic.py) whose q/o projections have 384 rows, k/v 128 (whole blocks: a
fused q/k/v part before the last with a partial block is refused, test below) and every attention linear 384
inputs: scale grids [3, 3] (q, o) and [1, 3] (k, v).
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.synthetic import write_synthetic
from moepress.exporters import ExportConfig, export

BASE = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
CONFIG = {**BASE, "hidden_size": 384, "num_attention_heads": 6, "head_dim": 64, "num_key_value_heads": 2,
          "num_hidden_layers": 2, "moe_intermediate_size": 64, "num_local_experts": 8, "num_experts": 8}
ATTN = "model.layers.1.self_attn."


def vllm_block_scale_shape(out_f: int, in_f: int) -> tuple[int, ...]:
    """vLLM 0.33.0 KFp8Block128.create_weights: ``ob, ib = cdiv(out, 128), in_ // 128``; weight_scale (ob, 1, ib, 1)
    (it refuses in_features that are not a multiple of 128, as moepress's hf-modelopt does)."""
    return (math.ceil(out_f / 128), 1, in_f // 128, 1)


def _tensors(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(f"{d}/**/*.safetensors", recursive=True)):
        with safe_open(f, "pt") as h:
            out.update({f"{f[len(str(d)):]}:{k}": h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = write_synthetic(CONFIG, tmp_path_factory.mktemp("syn") / "src", seed=3)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # for moepress check's evaluation text
        shutil.copy(models.path("tiny-qwen3-moe") / f, d / f)
    return d


def _quantized(src, out, fmt, rules):
    batches = [torch.randint(0, CONFIG["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))]
    quantize_checkpoint(src, out, QuantConfig(format=fmt, rules=rules, num_samples=2, seq_len=32), batches=batches)
    return out


@pytest.fixture(scope="module")
def block_attn(src, tmp_path_factory):
    """FP8 experts (per tensor), block-FP8 attention, exported hf-modelopt."""
    base = tmp_path_factory.mktemp("blk")
    export(_quantized(src, base / "q", "fp8", (("self_attn.*", "fp8-block"),)), base / "e",
           ExportConfig(format="hf-modelopt"))
    return base / "e"


def test_block_scale_has_the_shape_modelopt_writes_and_vllm_allocates(src, block_attn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.quant_utils import get_scaling_factor
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer
    hq = json.loads((block_attn / "hf_quant_config.json").read_text())["quantization"]
    t, orig = _tensors(block_attn), _tensors(src)
    t, orig = ({k.split(":", 1)[1]: v for k, v in d.items()} for d in (t, orig))
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = ATTN + p
        assert hq["quantized_layers"][name]["quant_algo"] == "fp8_pb_wo"
        w = orig[name + ".weight"]
        # Model-Optimizer's FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG weight quantizer, calibrated on the same bf16 weight
        tq = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None, block_sizes={-1: 128, -2: 128}))
        tq.enable_calib(), tq.disable_quant()
        tq(w)
        tq.load_calib_amax(), tq.disable_calib()
        ref = get_scaling_factor(tq)
        s = t[name + ".weight_scale"]
        assert tuple(s.shape) == tuple(ref.shape) == vllm_block_scale_shape(*w.shape), name
        torch.testing.assert_close(s, ref.float(), rtol=0, atol=0)  # measured: equal
    assert tuple(t[ATTN + "k_proj.weight_scale"].shape) == (1, 1, 3, 1)  # 128 rows



def _declared_algos(d) -> dict[str, str]:
    """Each quantized linear's quant_algo, upper-cased, as vLLM 0.33 reads a Model-Optimizer checkpoint's
    declaration (quantization/modelopt.py ``from_config``: hf_quant_config.json's ``quantization``, the algo
    upper-cased; MIXED_PRECISION: the per-layer ``quantized_layers`` entries); config.json must say the same."""
    hq = json.loads((d / "hf_quant_config.json").read_text())["quantization"]
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == hq["quant_algo"], qc
    t = {k.split(":", 1)[1]: v for k, v in _tensors(d).items()}
    bases = [k[: -len(".weight_scale")] for k in t if k.endswith(".weight_scale")]
    if hq["quant_algo"].upper() == "MIXED_PRECISION":
        return {b: hq["quantized_layers"][b]["quant_algo"].upper() for b in bases}
    return dict.fromkeys(bases, hq["quant_algo"].upper())


@pytest.mark.parametrize("fixture", ["all_block", "block_attn"])
def test_the_quantize_output_stores_block_scales_as_its_config_declares_them(request, fixture):
    """The quantize output itself (not its hf-modelopt export) declares Model-Optimizer's ``fp8_pb_wo`` in
    hf_quant_config.json and config.json (quant_method modelopt), so vLLM 0.33 loads it with its FP8_PB_WO linear
    method, which allocates ``weight_scale`` [ceil(out/128), 1, in/128, 1] and asserts the stored tensor has that
    shape (parameter.py ``BasevLLMParameter._assert_and_load`` / ``_ColumnvLLMParameter.load_column_parallel_weight``;
    ``RowvLLMParameter.load_row_parallel_weight`` narrows dim 2). It stored the 2-D grid [ceil(out/128), in/128],
    which only the hf-modelopt export reshaped: pointed at the quantize output, vLLM failed to load it."""
    q = request.getfixturevalue(fixture).parent / "q"
    algos = _declared_algos(q)
    t = {k.split(":", 1)[1]: v for k, v in _tensors(q).items()}
    block = [b for b, a in algos.items() if a == "FP8_PB_WO"]
    assert block and all(b.startswith("model.layers.") and ".self_attn." in b for b in block), sorted(algos)
    for b in block:
        w, s = t[b + ".weight"], t[b + ".weight_scale"]
        assert w.dtype == torch.float8_e4m3fn and w.shape[1] % 128 == 0, b
        assert tuple(s.shape) == vllm_block_scale_shape(*w.shape), (b, tuple(s.shape))


def _with_block_scales(src, dst, four_d: bool):
    """A copy of the export ``src`` whose block-FP8 scales are all 4-D (Model-Optimizer's) or all 2-D (the grid
    hf-modelopt wrote before), whatever the exporter wrote: the block scale of an F8 weight is the tensor that is
    neither per tensor nor per channel."""
    shutil.copytree(src, dst)
    for f in glob.glob(f"{dst}/*.safetensors"):
        t = load_file(f)
        for k in [k for k in t if k.endswith(".weight_scale")]:
            w, s = t[k[: -len("_scale")]], t[k]
            if w.dtype != torch.float8_e4m3fn or s.numel() == 1 and s.dim() == 0 or s.dim() == 1:
                continue
            grid = (math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
            assert s.numel() == grid[0] * grid[1], k
            t[k] = s.reshape(grid[0], 1, grid[1], 1) if four_d else s.reshape(grid)
        save_file({k: v.contiguous() for k, v in t.items()}, f, metadata={"format": "pt"})
    return dst


def _both(e, tmp_path):
    return _with_block_scales(e, tmp_path / "mo4d", True), _with_block_scales(e, tmp_path / "legacy2d", False)


@pytest.fixture(scope="module")
def block_o_proj(src, tmp_path_factory):
    """FP8 per tensor but o_proj block FP8 (whole blocks: compressed-tensors takes it), exported hf-modelopt."""
    base = tmp_path_factory.mktemp("oproj")
    export(_quantized(src, base / "q", "fp8", (("self_attn.o_proj", "fp8-block"),)), base / "e",
           ExportConfig(format="hf-modelopt"))
    return base / "e"


@pytest.fixture(scope="module")
def all_block(src, tmp_path_factory):
    """Block FP8 but routed experts bf16 (hf-modelopt refuses block-FP8 experts), exported hf-modelopt."""
    base = tmp_path_factory.mktemp("all")
    export(_quantized(src, base / "q", "fp8-block", (("mlp.experts.*", "none"),)), base / "e",
           ExportConfig(format="hf-modelopt"))
    return base / "e"


@pytest.fixture(scope="module")
def one_block(tmp_path_factory):
    """tiny-mixtral with a block-FP8 o_proj of one block (trtllm-ckpt writes those per tensor: a larger grid it
    refuses; not q/k/v, whose 64-row k_proj hf-modelopt refuses), FP8 experts, exported hf-modelopt. Its o_proj has
    no static input scale (block FP8 quantizes activations at run time), which trtllm-ckpt refuses."""
    base = tmp_path_factory.mktemp("one")
    quantize_checkpoint(models.path("tiny-mixtral"), base / "q", QuantConfig(
        format="fp8", rules=(("self_attn.o_proj", "fp8-block"),), num_samples=2, seq_len=32))
    export(base / "q", base / "e", ExportConfig(format="hf-modelopt"))
    return base / "e"


# the dims of the block scales each export writes: Model-Optimizer's, DeepSeek's weight_scale_inv and
# compressed-tensors' block strategy grid; trtllm-ckpt writes the one-block linears per tensor
GRID_DIMS = {"hf-modelopt": 4, "hf-fp8-block": 2, "compressed-tensors": 2, "trtllm-ckpt": None}


@pytest.mark.parametrize("fixture,fmt", [("block_attn", "hf-modelopt"), ("one_block", "trtllm-ckpt"),
                                         ("block_o_proj", "compressed-tensors"), ("all_block", "hf-fp8-block")])
def test_an_export_from_either_block_scale_shape_is_the_same(request, tmp_path, cli_run, fixture, fmt):
    """moepress export from an hf-modelopt checkpoint with 4-D block scales equals the export from the legacy
    2-D one, tensor for tensor (before, trtllm-ckpt and compressed-tensors failed with a traceback on 4-D
    and hf-fp8-block wrote a 4-D weight_scale_inv). The hf-modelopt re-export writes Model-Optimizer's 4-D."""
    four, two = _both(request.getfixturevalue(fixture), tmp_path)
    for d in (four, two):
        r = cli_run("export", d, "--format", fmt, "-o", d.with_name(d.name + "-x"), "--quiet")
        if fmt == "trtllm-ckpt":  # its block-FP8 o_proj has run-time activation scales, which QuantAlgo FP8 lacks:
            # written with activation_scaling_factor 0 before (TensorRT-LLM divides by it), refused from either shape
            assert r.exit_code == 2 and "4 FP8 linears without a static input_scale > 0 (model.layers.*.self_attn" \
                ".o_proj)" in r.stderr, r.output
            continue
        assert r.exit_code == 0, r.output
    if fmt == "trtllm-ckpt":
        return
    a, b = _tensors(tmp_path / "mo4d-x"), _tensors(tmp_path / "legacy2d-x")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn
                                                      else a[k], b[k].view(torch.uint8) if b[k].dtype ==
                                                      torch.float8_e4m3fn else b[k]) for k in a)
    if GRID_DIMS[fmt] is not None:
        scales = {k: v for k, v in a.items() if k.endswith(("weight_scale", "weight_scale_inv")) and v.numel() > 1}
        assert scales  # the block grids of more than one block are there
        assert all(v.dim() == GRID_DIMS[fmt] for v in scales.values()), {k: tuple(v.shape) for k, v in scales.items()}


def test_check_reads_either_block_scale_shape_alike(block_attn, src, tmp_path, cli_run):
    """moepress check of the 4-D export and of the legacy 2-D one: the same metrics (before, the 4-D one was
    refused: "weight_scale has shape [3, 1, 3, 1]")."""
    out = []
    for d in _both(block_attn, tmp_path):
        r = cli_run("check", d, "-r", src, "--max-samples", "2", "--seq-len", "32", "--json", "--quiet")
        assert r.exit_code in (0, 1), r.output  # 1: a gate failed (random weights), not bad input
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out.append({k: res[k] for k in ("metrics", "gates") if k in res})
    assert out[0] == out[1]
    # and read right: measured ppl_increase -0.0277 (64 tokens, random weights: no misread detector, a transposed or
    # row-flipped grid gave -0.014 / -0.008) and min_layer_cosine 0.9884 (1 - cos 0.0116); bounds ~2x those. The
    # scale grids transposed give cosine 0.965 and fail; a row-flipped grid (0.981) is not caught
    assert abs(out[0]["metrics"]["ppl_increase"]) < 0.06 and out[0]["metrics"]["min_layer_cosine"] > 0.977


@pytest.mark.parametrize("shape", [(3, 1, 3, 2), (3, 2, 3, 1), (1, 3, 1, 3), (3, 3, 1, 1)])
def test_a_4d_scale_not_in_modelopts_block_layout_is_refused(shape):
    """Only [ceil(out/128), 1, ceil(in/128), 1] (vLLM 0.33's KFp8Block128 allocation) is Model-Optimizer's block grid:
    a 4-D scale with another singleton pattern is no layout a consumer writes, and reading it as the grid of a
    384 x 384 weight (3 x 3 blocks) would take 18 or 9 scales for 9 blocks in the wrong places."""
    from moepress.compress.quant import fp8

    assert fp8.scale_layout_error((384, 384), (3, 1, 3, 1)) is None
    assert fp8.scale_layout_error((384, 384), shape) is not None
    with pytest.raises(ValueError, match="weight_scale"):
        fp8.dequantize(torch.zeros(384, 384).to(torch.float8_e4m3fn), torch.ones(shape))


@pytest.mark.parametrize("out_f,in_f", [(384, 256), (192, 384)])
def test_dequantize_block_takes_modelopts_4d_scale(out_f, in_f):
    """fp8.dequantize_block (and fp8.dequantize) of a 4-D [ceil(out/128), 1, ceil(in/128), 1] scale: each 128x128
    block (partial at the edge) times its own scale, computed here block by block."""
    from moepress.compress.quant import fp8

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(out_f, in_f, generator=g) * 50).to(torch.float8_e4m3fn)
    grid = torch.rand(math.ceil(out_f / 128), math.ceil(in_f / 128), generator=g) + 0.5
    ref = q.float().clone()
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= grid[i, j]
    four = grid.reshape(grid.shape[0], 1, grid.shape[1], 1)
    torch.testing.assert_close(fp8.dequantize_block(q, four), ref, rtol=0, atol=0)
    torch.testing.assert_close(fp8.dequantize(q, four), ref, rtol=0, atol=0)


def test_read_linear_gives_the_2d_grid_of_a_4d_block_scale(block_attn):
    """exporters/linears.read_linear (trtllm-ckpt's and ONNX's reader) of the 4-D export: Linear.scale is the
    [ceil(out/128), ceil(in/128)] grid its users index ([ro, ci]: the same numbers, singleton dims dropped) and
    Linear.dequantize is each 128x128 block times its own scale."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters.linears import read_linear

    r = CheckpointReader(block_attn)
    for p, grid in (("q_proj", (3, 3)), ("k_proj", (1, 3))):
        stored = r.get(ATTN + p + ".weight_scale")
        assert tuple(stored.shape) == (grid[0], 1, grid[1], 1)
        lin = read_linear(r, ATTN + p)
        assert lin.scheme == "block" and tuple(lin.scale.shape) == grid, (p, tuple(lin.scale.shape))
        torch.testing.assert_close(lin.scale, stored.float().reshape(grid), rtol=0, atol=0)
        ref = r.get(ATTN + p + ".weight").float()
        for i in range(grid[0]):
            for j in range(grid[1]):
                ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= stored[i, 0, j, 0]
        torch.testing.assert_close(lin.dequantize(), ref, rtol=0, atol=0)


def test_fused_block_fp8_parts_with_a_partial_block_before_the_last_are_refused(tmp_path, cli_run):
    """tiny-qwen3-moe's q/k/v are [128, 64, 64] rows. vLLM 0.33.0 (one ModelOptLinearMethod for FP8_PB_WO, single
    quant_algo or MIXED_PRECISION: quantization/modelopt.py build_linear_method, KFp8Block128) and TensorRT-LLM main
    (00bbf71e) place each part's block-scale rows at ceil(offset / 128) in a grid of ceil(rows / 128) rows (vLLM
    layers/linear.py adjust_block_scale_shard -> parameter.py load_qkv_weight: v at row 2 of 2, a narrow past the
    grid at load; TensorRT-LLM _torch/modules/linear.py FP8BlockScalesLinearMethod.load_weights_fused_qkv_linear ->
    copy_weight_shard: an empty slice, v's scale dropped and v run with k's). A MIXED_PRECISION export (NVFP4
    experts) and a single-algo FP8_PB_WO one (experts bf16) were written with exit 0; now one line, naming a --rule
    whose export is written. DeepSeek's q_a / kv_a keep their own refusal (every block-FP8 one)."""
    rows = [math.ceil(r / 128) for r in (128, 64, 64)]
    assert sum(rows) > math.ceil(256 / 128)  # the runtimes' grid is shorter than the parts' rows
    for n, (fmt, rule) in enumerate((("nvfp4", "self_attn.*=fp8-block"), ("fp8-block", "mlp.experts.*=none"))):
        q = tmp_path / f"q{n}"
        assert cli_run("quantize", "tiny-qwen3-moe", "--format", fmt, "--rule", rule, "-o", q, "--quiet").exit_code == 0
        r = cli_run("export", q, "--format", "hf-modelopt", "-o", tmp_path / f"e{n}")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert "(model.layers.*.self_attn.k_proj)" in r.stderr and "64 rows" in r.stderr and "v_proj" not in r.stderr
        assert "vLLM fails at load" in r.stderr and "TensorRT-LLM drops them" in r.stderr, r.stderr
        assert "--rule 'self_attn.*=fp8-dynamic'" in r.stderr and not (tmp_path / f"e{n}").exists()
    q2 = tmp_path / "q2"  # the --rule the line names: its export is written
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "nvfp4", "--rule", "self_attn.*=fp8-dynamic",
                   "-o", q2, "--quiet").exit_code == 0
    assert cli_run("export", q2, "--format", "hf-modelopt", "-o", tmp_path / "e2", "--quiet").exit_code == 0
    q3 = tmp_path / "q3"  # [64, 48] q_a / kv_a: refused once, as block-FP8 MLA
    assert cli_run("quantize", "tiny-deepseek-v3", "--format", "fp8", "--rule", "self_attn.q_a_proj=fp8-block",
                   "--rule", "self_attn.kv_a_proj_with_mqa=fp8-block", "-o", q3, "--quiet").exit_code == 0
    r = cli_run("export", q3, "--format", "hf-modelopt", "-o", tmp_path / "e3")
    assert r.exit_code == 2 and "block-FP8 MLA projections" in r.stderr and "vLLM fails" not in r.stderr, r.output

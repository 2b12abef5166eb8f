"""`moepress check` on every candidate kind that runs on a CPU (issue #8), plus the GPU engine kind.

- transformers: a compressed-tensors W4A16 (pack-quantized) checkpoint made here with the
  compressed-tensors library from the bundled model, loaded by transformers (auto-detected);
  the check's candidate perplexity equals one computed with transformers directly; and the
  bundled model itself run through transformers matches the streamed reference layer by layer;
- onnx: the bundled model exported with torch.onnx.export (logits + hidden_states.{i}),
  run with onnxruntime, matches the reference; an ONNX file that breaks the contract is
  one line, exit 2;
- engine: needs a GPU and TensorRT (skipped here, with the reason).
"""

import json
import os
import re
import shutil
import sys
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import forkserver
from helpers import QWEN_SMALL, assert_one_line_error
from moepress import models
from moepress.calib.data import eval_batches
from moepress.checks import CheckConfig, run_check
from moepress.checks.candidates import detect_kind
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.synthetic import write_synthetic
from moepress.manifest import file_digests, read_manifest, write_manifest

MODEL = "tiny-qwen3-moe"
ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")
SMALL = ["--seq-len", "64", "--max-samples", "8"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ref():
    return models.path(MODEL)


def write_compressed_tensors(src, out, preset="W4A16"):
    """Every decoder-layer linear (attention and each expert; routers, embeddings and lm_head
    excluded) quantized with compressed-tensors' own lifecycle: apply the preset scheme,
    min-max scales per group, compress (pack-quantized for W4A16), save, write the config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    r = CheckpointReader(src)
    root, linears = torch.nn.Module(), {}
    for name in r.names():
        t = r.get(name)
        # routers stay unquantized (Qwen/DeepSeek mlp.gate, Mixtral block_sparse_moe.gate), as llm-compressor's
        # recipes ignore them
        if ".layers." in name and name.endswith(".weight") and t.ndim == 2 and not ROUTER.search(name):
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=t.dtype)
            lin.weight.data = t
            parent = root
            *path, leaf = name[: -len(".weight")].split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, torch.nn.Module())
                parent = getattr(parent, p)
            parent.add_module(leaf, lin)
            linears[name] = lin
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])})
    apply_quantization_config(root, qc, show_progress=False)
    for lin in linears.values():
        args = lin.quantization_scheme.weights
        w = lin.weight.data.float()
        g = w.view(w.shape[0], -1, args.group_size) if args.group_size else w.unsqueeze(1)
        scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
        lin.weight_scale.data.copy_(scale.to(lin.weight_scale.dtype).view_as(lin.weight_scale))
        lin.weight_zero_point.data.copy_(zp.view_as(lin.weight_zero_point))
    comp = ModelCompressor.from_pretrained_model(root)
    comp.quantization_config.ignore = ["lm_head"]
    comp.compress_model(root)
    tensors = {n: r.get(n) for n in r.names() if n not in linears}
    tensors.update({k: v.contiguous() for k, v in root.state_dict().items()})
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    comp.update_config(str(out))
    return out


def test_compressed_tensors_checkpoint_through_transformers(cli_run, ref, tmp_path):
    ct = write_compressed_tensors(ref, tmp_path / "w4a16")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert detect_kind(ct) == "checkpoint"  # the streamed reader decodes weight_packed (formats/ct_inputs.py)
    r = cli_run("check", ct, "--reference", ref, *SMALL, "--kind", "transformers", "--json", "--quiet",
                "--max-kl", "none",
                "--min-top1", "none", "--max-ppl-increase", "none")
    assert r.exit_code == 0, r.output
    # --json: stderr is JSON events only (the libraries' progress bars and load report were mixed in)
    assert all(ln.startswith("{") for ln in r.stderr.splitlines() if ln.strip()), r.stderr[:500]
    res = json.loads(r.stdout)
    assert res["candidate"]["kind"] == "transformers" and res["candidate"]["quantization"] == "compressed-tensors"
    m = res["metrics"]
    assert 0 < m["kl_mean"] < 0.025 and 0.85 < m["top1_agreement"] < 1  # measured 0.0104, 0.939
    assert len(res["layers"]) == 4 and all(0 < p["rel_error"] < 1 for p in res["layers"])
    # independent: transformers' own perplexity of the same windows
    model = AutoModelForCausalLM.from_pretrained(str(ct), dtype=torch.float32).eval()
    ids = torch.cat(eval_batches(ref, seq_len=64, max_windows=8))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert m["ppl_candidate"] == pytest.approx(float(torch.exp(loss)), rel=1e-6)  # measured 2.1e-7


def test_transformers_kind_matches_the_streamed_reference_layer_by_layer(ref):
    res = run_check(ref, ref, CheckConfig(seq_len=64, max_samples=8, kind="transformers"))
    assert res["passed"] and res["candidate"]["kind"] == "transformers"
    m = res["metrics"]
    # measured (2-core CPU): KL 2.4e-13, perplexity change 3.1e-8, layer error <= 2.4e-7; the
    # bounds leave ~5x (KL, a square of the logit differences: ~8x; measured up to 4.1e-13 too)
    assert m["kl_mean"] < 2e-12 and m["top1_agreement"] >= 0.998 and abs(m["ppl_increase"]) < 1.5e-7
    # every layer, the last one included (transformers returns it after the final norm)
    assert len(res["layers"]) == 4 and all(p["rel_error"] < 1e-6 for p in res["layers"])
    assert res["embedding"]["rel_error"] == 0.0


class _OnnxContract(torch.nn.Module):
    """input_ids -> (logits, hidden_states.0 .. L-1): each decoder layer's output, before the final norm."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._last = None
        # transformers' last hidden state is after the final norm: take the last layer's own output
        model.model.layers[-1].register_forward_hook(self._keep_last)

    def _keep_last(self, module, args, out):
        self._last = out[0] if isinstance(out, tuple) else out

    def forward(self, input_ids):
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device)
        # an explicit causal mask: transformers' own mask helper uses aten::diff, which has no ONNX export
        causal = (pos[None, :] <= pos[:, None])[None, None].expand(input_ids.shape[0], 1, s, s)
        out = self.model(input_ids=input_ids, attention_mask=causal, output_hidden_states=True, use_cache=False)
        return (out.logits, *out.hidden_states[1:-1], self._last)


@pytest.fixture(scope="module")
def onnx_dir(ref, tmp_path_factory):
    """The bundled model exported to ONNX with torch.onnx.export (TorchScript exporter)."""
    # batched_mm: experts as gathers + batched matmuls, which trace to a static graph (the eager
    # loop over hit experts would bake the example's routing into the trace)
    model = AutoModelForCausalLM.from_pretrained(str(ref), dtype=torch.float32,
                                                 experts_implementation="batched_mm").eval()
    n = model.config.num_hidden_layers
    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    out.mkdir()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # tracer notes on transformers' Python branches, the exporter's deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(_OnnxContract(model), (ids,), str(out / "model.onnx"), input_names=["input_ids"],
                          output_names=["logits"] + [f"hidden_states.{i}" for i in range(n)],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}}, dynamo=False, opset_version=17)
    write_manifest(out, {"stage": "export", "files": file_digests(out)})  # as an exporter's output would have
    return out


def test_transformers_candidate_runs_on_the_checks_device(monkeypatch):
    """`check --kind transformers --device cpu` loaded the candidate onto cuda:0 whenever a GPU was visible (the
    reference streamed on the device asked for, and the memory report named the wrong one)."""
    from moepress.checks.candidates import open_candidate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cand = open_candidate(models.path("tiny-mixtral"), CheckConfig(kind="transformers"), torch.device("cpu"))
    assert cand.describe()["device"] == "cpu" and next(cand.model.parameters()).device.type == "cpu"


def test_onnx_export_matches_the_reference(cli_run, ref, onnx_dir, tmp_path):
    assert detect_kind(onnx_dir) == "onnx" and detect_kind(onnx_dir / "model.onnx") == "onnx"
    r = cli_run("check", onnx_dir / "model.onnx", "--reference", ref, *SMALL, "--json", "--quiet",
                "--report", tmp_path / "rep", "--generate", "1", "--gen-tokens", "3")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    m = res["metrics"]
    assert res["candidate"]["kind"] == "onnx" and res["candidate"]["hidden_states"] == 4
    # measured (2-core CPU): KL 2.4e-13, perplexity change 3.1e-8, layer error <= 2.4e-7; the
    # bounds leave ~5x (KL, a square of the logit differences: ~8x; measured up to 4.1e-13 too)
    assert m["kl_mean"] < 2e-12 and m["top1_agreement"] >= 0.998 and abs(m["ppl_increase"]) < 1.5e-7
    assert len(res["layers"]) == 4 and all(p["rel_error"] < 1e-6 for p in res["layers"])
    assert res["error_jump"] is None  # float32 rounding alone is no jump (JUMP_FLOOR)
    assert res["generations"]["samples"][0]["same_prefix_tokens"] == 3
    assert (tmp_path / "rep" / "layer_error.png").exists()
    # the file is listed in its directory's manifest: the metrics are recorded there
    assert res["manifest_updated"] and read_manifest(onnx_dir)["accuracy"]["kind"] == "onnx"


def test_onnx_outside_the_contract_is_exit_2(cli_run, ref, tmp_path):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["out"], to=TensorProto.FLOAT)], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    r = cli_run("check", tmp_path / "bad.onnx", "--reference", ref, *SMALL)
    assert r.exit_code == 2 and "no output 'logits'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_onnx_export_given_as_the_checkpoint_kind_is_named_as_onnx(cli_run, ref, tmp_path):
    """--kind checkpoint on a `moepress export --format onnx` output was refused as "a trtllm-ckpt export"."""
    from moepress.exporters import ExportConfig, export

    export(ref, tmp_path / "onnx", ExportConfig(format="onnx"))
    r = cli_run("check", tmp_path / "onnx", "--reference", ref, *SMALL, "--kind", "checkpoint", "--no-record")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "an onnx export (export.json)" in r.stderr and "--kind onnx" in r.stderr and "trtllm" not in r.stderr


def test_engine_needs_a_gpu_here(cli_run, ref, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_engine_on_gpu covers it")
    (tmp_path / "model.engine").write_bytes(b"\0")
    r = cli_run("check", tmp_path / "model.engine", "--reference", ref, *SMALL)
    assert r.exit_code == 2 and "runs on an NVIDIA GPU only" in r.stderr


@pytest.mark.gpu
def test_engine_on_gpu(ref, onnx_dir, tmp_path):
    """A TensorRT engine built from the ONNX export (same tensor names) matches the reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    trt = pytest.importorskip("tensorrt", reason="needs TensorRT (pip install moepress[tensorrt])")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_dir / "model.onnx")), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (8, 64), (8, 64))
    config.add_optimization_profile(profile)
    (tmp_path / "model.engine").write_bytes(bytes(builder.build_serialized_network(network, config)))
    res = run_check(tmp_path / "model.engine", ref, CheckConfig(seq_len=64, max_samples=8))
    assert res["candidate"]["kind"] == "engine"
    assert res["metrics"]["kl_mean"] < 1e-4 and res["metrics"]["top1_agreement"] >= 0.99


def test_a_per_layer_gate_on_a_logits_only_candidate_is_refused(cli_run, ref, onnx_dir, tmp_path):
    """--min-cosine on a candidate without per-layer hidden states is exit 2 before the check runs
    (it passed as 'n/a': a CI gate that never measured anything)."""
    model = onnx.load(str(onnx_dir / "model.onnx"))
    keep = [o for o in model.graph.output if o.name == "logits"]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    onnx.save(model, str(tmp_path / "logits-only.onnx"))
    r = cli_run("check", tmp_path / "logits-only.onnx", "--reference", ref, *SMALL, "--min-cosine", "0.99")
    assert r.exit_code == 2, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--min-cosine 0.99" in err[0] and "gives logits only" in err[0], r.stderr
    r = cli_run("check", tmp_path / "logits-only.onnx", "--reference", ref, *SMALL, "--json", "--quiet")
    assert r.exit_code == 0 and json.loads(r.stdout)["layers"] == [], r.output


def test_export_quantizing_activations_is_not_streamed_as_weights_only(cli_run, ref, tmp_path):
    """A compressed-tensors export of static FP8 (input_activations): auto-detected as `checkpoint`, it
    was checked with its weights only (no moepress_quant.json: no activation fake-quant), so an export
    whose input scales were broken passed. It goes to transformers, which quantizes the activations;
    `--kind checkpoint` is refused in one line. A weight-only export still streams (test above)."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert cli_run("quantize", MODEL, "--format", "fp8", "--num-samples", "2", "--seq-len", "32", "-o", q,
                   "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", ct, "--quiet").exit_code == 0
    assert detect_kind(q) == "checkpoint" and detect_kind(ct) == "transformers"
    r = cli_run("check", ct, "--reference", ref, *SMALL, "--kind", "checkpoint", "--quiet")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "input_activations" in r.stderr and "--kind transformers" in r.stderr
    # as the reference it was streamed weights-only too, without a word (a perplexity no consumer of it gets)
    r = cli_run("check", q, "--reference", ct, *SMALL, "--quiet")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert f"--reference {ct}: " in r.stderr and "input_activations" in r.stderr


def test_model_optimizer_checkpoint_without_its_layout_is_refused_by_both_kinds(cli_run, ref, tmp_path):
    """Without moepress_quant.json, a Model-Optimizer checkpoint's static activation scales are not
    streamed, and transformers 5.24 has no Model-Optimizer loader: it read the FP8 codes as plain
    weights (top-1 0.0 against the stream's 0.88), a check that measured nothing. One line, both kinds."""
    q = tmp_path / "q"
    assert cli_run("quantize", MODEL, "--format", "fp8", "--num-samples", "2", "--seq-len", "32", "-o", q,
                   "--quiet").exit_code == 0
    (q / "moepress_quant.json").unlink()
    for kind in ("auto", "transformers"):
        r = cli_run("check", q, "--reference", ref, *SMALL, "--kind", kind, "--quiet")
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, (kind, r.output)
        assert "Model-Optimizer" in r.stderr or "hf_quant_config.json" in r.stderr, r.stderr


def test_kimi_k2_export_runs_in_transformers_as_deepseek_v3(tmp_path, cli_run):
    """A compressed-tensors export of Kimi K2 (model_type kimi_k2, remote code) with FP8 activations: transformers
    does not know kimi_k2, the checkpoint kind is refused (activations), and the transformers kind was refused
    too, each sending the user to the other. It is built as DeepSeek-V3, as moepress and vLLM run it."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert cli_run("quantize", "tiny-kimi-k2-int4", "--format", "fp8", "--num-samples", 4, "--seq-len", 32, "-o", q,
                   "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", ct, "--quiet").exit_code == 0
    r = cli_run("check", ct, "--reference", "tiny-kimi-k2-int4", "--seq-len", 32, "--max-samples", 2, "--json")
    assert r.exit_code in (0, 1), r.output  # 1: the tiny calibration may miss a gate; the check ran
    res = json.loads(r.stdout)
    assert res["candidate"]["kind"] == "transformers" and res["metrics"]["kl_mean"] < 0.015, res  # measured 0.0069


GRID_PROBE = """
import json, sys, torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
d, n = sys.argv[1], sys.argv[2]
got = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()[n]
shard = json.load(open(d + "/model.safetensors.index.json"))["weight_map"][n]
with safe_open(d + "/" + shard, "pt") as f:
    w, s = f.get_tensor(n).float(), f.get_tensor(n + "_scale_inv").float()
blocks = s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
print(float((got - w * blocks).abs().max() / (w * blocks).abs().max()), "moepress" in sys.modules)
"""


def test_block_fp8_grids_transformers_reads_with_another_block_are_refused(tmp_path, cli_run):
    """A DeepSeek-layout block-FP8 checkpoint whose o_proj has 160 rows (2 scale rows): transformers takes the block
    as 160 // 2 = 80 rows, so rows 80-127 load with the second block's scale, without an error (measured here in a
    process that never imports moepress). The transformers kind refuses it in one line; the streamed kind checks it.
    When a transformers release reads the grid in 128-row blocks, the probe fails: the refusal's version gate
    (ct_misloads.TRANSFORMERS_CHECKED) stays below it."""
    cfg = {**QWEN_SMALL, "vocab_size": 4096, "hidden_size": 160, "head_dim": 32, "num_attention_heads": 4,
           "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2}
    d = write_synthetic(cfg, tmp_path / "m", block_fp8=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models.path(MODEL) / f, d / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = forkserver.run([sys.executable, "-c", GRID_PROBE, str(d), "model.layers.0.self_attn.o_proj.weight"],
                       env=env, capture_output=True, text=True, timeout=600)
    err, imported = p.stdout.split("\n")[-2].split()
    assert float(err) > 0.01 and imported == "False", p.stdout + p.stderr[-2000:]  # rows 80-127 off by a scale ratio
    ref = shutil.copytree(d, tmp_path / "ref")  # not the candidate itself, which check refuses
    args = ["check", d, "--reference", ref, "--max-samples", "2", "--seq-len", "32"]
    assert_one_line_error(cli_run(*args, "--kind", "transformers"), "block-FP8 weights have a dimension over 128",
                          "model.layers.0.mlp.experts.0.down_proj.weight: [160, 128]", "--kind checkpoint")
    assert cli_run(*args, "--kind", "checkpoint").exit_code == 0


def test_an_export_its_runtimes_misload_is_said_so(cli_run, tmp_path):
    """A helper's find: a streamed export whose export.json says every runtime of its format misloads it passed the
    check with nothing said (the check reads its files as moepress does). The consumers it names are now in the
    notes: here TensorRT-LLM, whose DeepSeek loader reads a quantized MLA kv_b_proj's scale by another name."""
    q, hf = tmp_path / "q", tmp_path / "hf"
    assert cli_run("quantize", "tiny-deepseek-v3", "--format", "fp8", "--num-samples", "4", "--seq-len", "64",
                   "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "hf-modelopt", "-o", hf, "--quiet").exit_code == 0
    r = cli_run("check", hf, "--reference", models.path("tiny-deepseek-v3"), "--seq-len", "64", "--max-samples", "4",
                "--json", "--quiet", "--no-record")
    notes = [n for n in json.loads(r.stdout)["notes"] if "export.json says" in n]
    assert len(notes) == 1 and "tensorrt_llm <= main 2026-09" in notes[0], r.output
    r = cli_run("check", q, "--reference", models.path("tiny-deepseek-v3"), "--seq-len", "64", "--max-samples", "4",
                "--json", "--quiet", "--no-record")
    assert not any("export.json says" in n for n in json.loads(r.stdout)["notes"]), r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="transformers keeps FP8 weights quantized on a GPU")
def test_fp8_weights_transformers_dequantized_on_load_are_said_so(cli_run, tmp_path):
    """transformers loads a finegrained-FP8 checkpoint without a GPU dequantized and drops its quantization_config
    (quantizer_finegrained_fp8.py validate_environment, 5.25): the check ran it with unquantized activations and
    said nothing, so its figures read lower than any runtime's (tiny-mixtral's hf-fp8-block export: KL 0.00040
    through transformers, 0.00081 streamed with its 1x128 activation quantization; a helper's find)."""
    x = tmp_path / "x"
    assert cli_run("export", MODEL, "--format", "hf-fp8-block", "-o", x, "--quiet").exit_code == 0
    r = cli_run("check", x, "--reference", MODEL, "--seq-len", "32", "--max-samples", "2", "--kind", "transformers",
                "--json", "--quiet")
    assert r.exit_code in (0, 1), r.output
    res = json.loads(r.stdout)
    assert res["candidate"]["kind"] == "transformers" and res["candidate"]["quantization"] is None  # dequantized
    assert any("dequantized its fp8 weights" in n and "unquantized" in n for n in res["notes"]), res["notes"]

"""Widths that are not multiples of the INT4 group or the FP8 block: the fixture
``models/tiny-mixtral-w192`` (tiny-mixtral with expert width 192) through every exporter, from the
bf16 checkpoint and from every quantize format. Each export either loads in its consumer with
perplexity within 0.8% of moepress's forward of the same checkpoint (1e-6 where nothing differs by
consumer: EXACT), or is refused with one line
(exit 2) and no output.

Consumers run in ONE subprocess that never imports moepress: transformers ``from_pretrained``
(compressed-tensors, hf-fp8-block), onnxruntime (onnx); hf-modelopt and trtllm-ckpt have no
consumer here, so their tensors are read back through the documented layouts (modelopt: weight x
weight_scale; TensorRT-LLM: qkv / fc = [w3; w1] / proj, weights_scaling_factor), written as a plain
Hugging Face checkpoint and run by transformers. moepress's side: StreamedModel's forward of the
export's input (of the export itself for hf-fp8-block, which quantizes).

What fused-MoE consumers cannot hold is refused (exporters/fused_moe.py): INT4 down projections
(in_features 192, no group <= 128 divides it) stay bf16 beside INT4 gate/up — written before, such a
compressed-tensors export loaded in transformers without an error at perplexity ~100x (its fused
experts drop the bf16 weights); block-FP8 experts of width 192 (partial 128x128 blocks).

Measured (transformers 5.24, compressed-tensors 0.20.1, onnxruntime 1.32; 8 x 128 tokens of
eval.txt): every written export within -0.39% .. +0.19% of moepress (FP8 activation quantization
differs by consumer); bf16 and INT4 through onnxruntime, bf16 through trtllm-ckpt: equal.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from test_export_trtllm import expected_layout, load_rank
from tokenizers import Tokenizer

import forkserver
from moepress import models
from moepress.cli import cli
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.stream import StreamedModel

FIXTURE = models.path("tiny-mixtral-w192")
QUANT = ["fp8", "fp8-block", "fp8-dynamic", "int4-awq", "int4-gptq", "w4a8-awq"]
EXPORTERS = ["hf-modelopt", "hf-fp8-block", "compressed-tensors", "trtllm-ckpt", "onnx"]
TF, ORT, BACK = "transformers", "onnxruntime", "layout"  # who reads a written export
MIXED = "routed-expert linears stay unquantized beside quantized projections"
PARTIAL = "block-FP8 routed-expert weights of shape 128x192, 192x128 are not whole 128x128 blocks"
NEEDS_Q = "needs a quantized checkpoint"
NOT_BLOCK = "expected fp8-block or a bf16 checkpoint"
TRT_ONLY = "which this exporter does not write: it writes bf16 or FP8 per tensor"
AWQ = "with pre_quant_scale, which has no compressed-tensors form"
NO_CT = "w4a8-awq, which has no compressed-tensors form"
UNLOADABLE = "no runtime would load them at any group size"  # checked before the group-size refusals
DYNAMIC = "whose activations are quantized per token at run time"
# (input, exporter) -> a consumer, or the words of the one-line refusal
EXPECT = {
    ("bf16", "hf-modelopt"): NEEDS_Q, ("bf16", "hf-fp8-block"): TF, ("bf16", "compressed-tensors"): NEEDS_Q,
    ("bf16", "trtllm-ckpt"): BACK, ("bf16", "onnx"): ORT,
    ("fp8", "hf-modelopt"): BACK, ("fp8", "hf-fp8-block"): NOT_BLOCK, ("fp8", "compressed-tensors"): TF,
    ("fp8", "trtllm-ckpt"): BACK, ("fp8", "onnx"): ORT,
    ("fp8-block", "hf-modelopt"): PARTIAL, ("fp8-block", "hf-fp8-block"): TF,
    ("fp8-block", "compressed-tensors"): PARTIAL, ("fp8-block", "trtllm-ckpt"): TRT_ONLY,
    ("fp8-block", "onnx"): DYNAMIC,
    ("fp8-dynamic", "hf-modelopt"): "routed experts are fp8-dynamic", ("fp8-dynamic", "hf-fp8-block"): NOT_BLOCK,
    ("fp8-dynamic", "compressed-tensors"): TF, ("fp8-dynamic", "trtllm-ckpt"): TRT_ONLY,
    ("fp8-dynamic", "onnx"): DYNAMIC,
    **{(f, "hf-modelopt"): UNLOADABLE for f in ("int4-awq", "int4-gptq")}, ("w4a8-awq", "hf-modelopt"): MIXED,
    **{(f, "hf-fp8-block"): NOT_BLOCK for f in ("int4-awq", "int4-gptq", "w4a8-awq")},
    ("int4-awq", "compressed-tensors"): AWQ, ("int4-gptq", "compressed-tensors"): MIXED,
    ("w4a8-awq", "compressed-tensors"): NO_CT,
    **{(f, "trtllm-ckpt"): TRT_ONLY for f in ("int4-awq", "int4-gptq", "w4a8-awq")},
    **{(f, "onnx"): ORT for f in ("int4-awq", "int4-gptq", "w4a8-awq")},
}
CASES = sorted(EXPECT)
# The same numbers in both (no activation quantization the consumer does its own way): measured
# 0 .. 4.8e-7 relative (float32 perplexity); the others -0.39% .. +0.19%
EXACT = {("bf16", "onnx"), ("bf16", "trtllm-ckpt"), ("int4-awq", "onnx"), ("int4-gptq", "onnx")}
WINDOWS, SEQ = 8, 128

CONSUMER = textwrap.dedent("""
    import glob, json, math, os, sys, torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    jobs, ids, out_path = json.loads(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3]

    def ppl(logits):
        lg = logits.float()
        return math.exp(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]),
                                                          ids[:, 1:].reshape(-1)).item())

    def transformers_ppl(d):
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            return ppl(m(input_ids=ids, use_cache=False).logits)

    def onnx_ppl(d):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(os.path.join(d, "model.onnx"), so, providers=["CPUExecutionProvider"])
        return ppl(torch.from_numpy(s.run(["logits"], {"input_ids": ids.numpy()})[0]))

    def tensors(d):
        out = {}
        for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    def as_hf(sd, conf, d):
        # a plain bf16 Hugging Face checkpoint of these weights, run by transformers
        conf = {k: v for k, v in conf.items() if k != "quantization_config"}
        os.makedirs(d)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        json.dump(conf, open(os.path.join(d, "config.json"), "w"))
        return transformers_ppl(d)

    def modelopt_back(d):
        # Model-Optimizer's layout: an FP8 weight times its weight_scale, per tensor ([]) or per channel ([out], one
        # per row: modelopt 0.47 quant_utils.to_quantized_weight divides by weights_scaling_factor[:, None])
        t = tensors(d)
        def deq(v, s):
            return v.float() * (s.float()[:, None] if s.dim() == 1 and s.numel() > 1 else s.float())
        sd = {k: (deq(v, t[k + "_scale"]) if k + "_scale" in t else v) for k, v in t.items() if k.endswith(".weight")}
        return as_hf(sd, json.load(open(os.path.join(d, "config.json"))), d + "-hf")

    def trtllm_back(d, hf_dir):
        # TensorRT-LLM's checkpoint (docs/source/architecture/checkpoint.md, layers/moe.py), tp = ep = 1
        conf = json.load(open(os.path.join(hf_dir, "config.json")))
        t = tensors(d)
        def w(name):  # FP8: weights_scaling_factor [1], or [E, 1] per expert of an [E, rows, cols] weight
            v, s = t[name + ".weight"].float(), t.get(name + ".weights_scaling_factor")
            if s is None:
                return v
            return v * (s.reshape(-1, 1, 1) if v.dim() == 3 else s)
        nh, nkv, hd = conf["num_attention_heads"], conf["num_key_value_heads"], conf["head_dim"]
        sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
              "model.norm.weight": t["transformer.ln_f.weight"], "lm_head.weight": t["lm_head.weight"]}
        for i in range(conf["num_hidden_layers"]):
            p, q = f"model.layers.{i}.", f"transformer.layers.{i}."
            for n, part in zip("qkv", w(q + "attention.qkv").split([nh * hd, nkv * hd, nkv * hd])):
                sd[p + f"self_attn.{n}_proj.weight"] = part
            sd[p + "self_attn.o_proj.weight"] = w(q + "attention.dense")
            sd[p + "input_layernorm.weight"] = t[q + "input_layernorm.weight"]
            sd[p + "post_attention_layernorm.weight"] = t[q + "post_layernorm.weight"]
            sd[p + "block_sparse_moe.gate.weight"] = t[q + "mlp.router.weight"]
            fc, proj = w(q + "mlp.fc"), w(q + "mlp.proj")
            for e in range(fc.shape[0]):
                up, gate = fc[e].chunk(2)  # fc = [w3; w1]
                x = p + f"block_sparse_moe.experts.{e}."
                sd[x + "w1.weight"], sd[x + "w3.weight"], sd[x + "w2.weight"] = gate, up, proj[e]
        return as_hf(sd, conf, d + "-hf")

    def fp8_kernel_path(d):
        # transformers' FineGrainedFP8 load as on an FP8 GPU (sm90), which this machine lacks: only the
        # module swap and weight loading run (no forward); experts kept bf16 must stay dense modules
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
        from transformers import AutoModelForCausalLM
        m, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, output_loading_info=True)
        return {"experts": sorted({type(x).__name__ for n, x in m.named_modules() if n.endswith(".experts")}),
                "missing": sorted(info["missing_keys"])}

    out = {}
    for key, how, d, extra in jobs:
        fn = {"transformers": transformers_ppl, "onnxruntime": onnx_ppl, "modelopt": modelopt_back,
              "trtllm": lambda d: trtllm_back(d, extra), "fp8-kernel-path": fp8_kernel_path}[how]
        try:
            out[key] = fn(d)
        except Exception as e:  # noqa: BLE001 -- reported per job, asserted by its test
            out[key] = f"{type(e).__name__}: {e}"[:2000]
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
    json.dump(out, open(out_path, "w"))
""")


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    lg = logits.float()
    return math.exp(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)))


def _ids() -> torch.Tensor:
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    text = (models.HERE.parent / "calib" / "data" / "eval.txt").read_text()
    return torch.tensor(tok.encode(text).ids[: WINDOWS * SEQ]).reshape(WINDOWS, SEQ)


def _export(src, fmt, out):
    r = CliRunner().invoke(cli, ["export", str(src), "--format", fmt, "-o", str(out), "--quiet"],
                           catch_exceptions=False)
    return r.exit_code, r.output


def _job(key, src_name, exporter, out) -> list | None:
    how = EXPECT[(src_name, exporter)]
    if how == TF:
        return [key, "transformers", str(out), None]
    if how == ORT:
        return [key, "onnxruntime", str(out), None]
    if how == BACK:
        return [key, "modelopt" if exporter == "hf-modelopt" else "trtllm", str(out), str(FIXTURE)]
    return None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Quantize the fixture in every format, run every export through the in-process CLI, read every
    written one in the consumer subprocess; moepress's perplexity of the same inputs."""
    base = tmp_path_factory.mktemp("w192")
    sources = {"bf16": FIXTURE}
    for f in QUANT:
        sources[f] = base / f"q-{f}"
        quantize_checkpoint(FIXTURE, sources[f], QuantConfig(format=f, num_samples=4, seq_len=64))
    ids = _ids()
    torch.save(ids, base / "ids.pt")
    exports, jobs, ours = {}, [], {}
    for (src_name, exporter) in CASES:
        out = base / f"x-{src_name}-{exporter}"
        exports[(src_name, exporter)] = (out, *_export(sources[src_name], exporter, out))
        key = f"{src_name}|{exporter}"
        job = _job(key, src_name, exporter, out)
        if job is not None and exports[(src_name, exporter)][1] == 0:
            jobs.append(job)
            ref = out if exporter == "hf-fp8-block" else sources[src_name]  # hf-fp8-block quantizes a bf16 input
            ours[key] = _ppl(StreamedModel(ref).forward([ids])[0], ids)
    jobs.append(["fp8-kernel-path", "fp8-kernel-path", str(base / "x-bf16-hf-fp8-block"), None])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    p = forkserver.run([sys.executable, "-c", CONSUMER, json.dumps(jobs), str(base / "ids.pt"), str(base / "c.json")],
                       cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return exports, json.loads((base / "c.json").read_text()), ours


@pytest.mark.parametrize("src,exporter", CASES)
def test_consumer_reads_it_or_it_is_refused(results, src, exporter):
    exports, theirs, ours = results
    out, code, output = exports[(src, exporter)]
    how = EXPECT[(src, exporter)]
    if how in (TF, ORT, BACK):
        assert code == 0, output
        key = f"{src}|{exporter}"
        assert isinstance(theirs[key], float), f"{how} could not read it: {theirs[key]}"
        rel = theirs[key] / ours[key] - 1
        bound = 1e-6 if (src, exporter) in EXACT else 0.008
        assert abs(rel) < bound, f"{how}: perplexity {theirs[key]:.3f} vs moepress {ours[key]:.3f} ({rel:+.2e})"
    else:
        assert code == 2 and how in output, output
        assert len(output.strip().splitlines()) == 1 and not out.exists()


def test_int4_refusal_names_the_tensors_and_a_group_that_fits(results):
    _, code, output = results[0][("int4-gptq", "compressed-tensors")]
    assert "model.layers.*.block_sparse_moe.experts.*.w2" in output and "in_features 192" in output
    assert "--group-size 64" in output  # 64 divides 192 (and 128): every linear gets INT4


def test_hf_fp8_block_names_fused_experts_kept_bf16(results):
    """Experts kept bf16 (partial blocks) are listed as the fused module too, so transformers' FP8
    path keeps them dense (per-expert entries alone: FP8Experts with uninitialised scales)."""
    exports, theirs, _ = results
    out = exports[("bf16", "hf-fp8-block")][0]
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {f"model.layers.{i}.block_sparse_moe.experts" for i in range(4)} <= set(skip)
    assert theirs["fp8-kernel-path"] == {"experts": ["MixtralExperts"], "missing": []}


@pytest.mark.parametrize("src", ["bf16", "fp8"])
def test_trtllm_layout_is_documented_one(results, src):
    out = results[0][(src, "trtllm-ckpt")][0]
    hf = json.loads((FIXTURE / "config.json").read_text())
    got = load_rank(out, 0)
    for name, (shape, dtype) in expected_layout(hf, 1, 1).items():
        assert tuple(got[name].shape) == shape, name
        assert got[name].dtype == (torch.float8_e4m3fn if src == "fp8" and name.endswith(
            ("qkv.weight", "dense.weight", "fc.weight", "proj.weight")) else dtype), name


def test_a_recipe_preflight_refuses_exactly_the_pairs_the_export_refuses():
    """``moepress run`` refuses before any stage (moepress/pipeline/preflight.py) every (quantize format, export) pair
    whose export refuses this fixture's quantized checkpoint (EXPECT, which test_consumer_reads_it_or_it_is_refused
    checks against the exports), and no pair the export writes: else hours of prune and quantize end in that refusal,
    or a recipe that works is turned away."""
    from moepress.errors import MoepressError
    from moepress.pipeline.preflight import refuse_unavailable_exports
    from moepress.pipeline.recipe import normalise

    wrong = []
    for src, exporter in CASES:
        rec = normalise({"model": str(FIXTURE), "prune": None, "quantize": None if src == "bf16" else {"format": src},
                         "export": {"formats": [exporter]}, "check": None, "build": None})
        try:
            refuse_unavailable_exports(rec, FIXTURE)
            refused = False
        except MoepressError:
            refused = True
        if refused != (EXPECT[(src, exporter)] not in (TF, ORT, BACK)):
            wrong.append((src, exporter, "refused" if refused else "taken"))
    assert not wrong, wrong

"""`moepress check` (issue #8): metrics, gates, exit codes, report, manifest.

- a model checked against itself: perplexity change 0, KL 0, top-1 1.0, hidden states identical;
- a damaged candidate (INT2 weights in one decoder layer) fails the default gates with
  exit 1, and the one-line message names the failing metric and the layer where the
  hidden-state error jumps; the metrics land in the candidate's manifest;
- one hot expert zeroed (the most-routed one, found with RoutingStats): the error is
  localised to its layer;
- bad input is one line and exit 2.
"""

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, make_random_checkpoint
from moepress import models
from moepress.calib.data import DEFAULT_EVAL, calibration_batches
from moepress.calib.metrics import LogitStats, error_jump, hidden_error, quantile, token_kl
from moepress.calib.observers import RoutingStats
from moepress.checks import CheckConfig, run_check, write_report
from moepress.checks.config import evaluate_gates, failure_line
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.compress.quant.fp8 import quantize_block
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.manifest import read_manifest, write_manifest

MODEL = "tiny-qwen3-moe"
ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.gate\.weight$")
SMALL = ["--seq-len", "64", "--max-samples", "8"]
# the gate tests on one broken expert or router: 2048 held-out tokens, a quarter of the default's
MID = ["--seq-len", "128", "--max-samples", "16"]


def quantizable(name: str, t: torch.Tensor) -> bool:
    """A decoder-layer linear weight other than a router (Qwen/DeepSeek mlp.gate, Mixtral block_sparse_moe.gate)."""
    return ".layers." in name and name.endswith(".weight") and t.ndim == 2 and not ROUTER.search(name)


def int2(w: torch.Tensor) -> torch.Tensor:
    """Symmetric 2-bit fake quantization per output channel: levels {-2, -1, 0, 1} x absmax / 2."""
    s = (w.float().abs().amax(dim=1, keepdim=True) / 2).clamp(min=1e-12)
    return ((w.float() / s).round().clamp(-2, 1) * s).to(w.dtype)


def rewrite(src, dst, change, note: dict):
    """A copy of checkpoint src written by CheckpointWriter (so it has a manifest), tensors mapped by change."""
    r = CheckpointReader(src)
    with CheckpointWriter(dst) as w:
        for name in r.names():
            w.add(name, change(name, r.get(name)))
        w.write_json("config.json", r.config)
        w.copy_aux_files(src)
        w.manifest = {"stage": "test-damage", "inputs": note}
    return dst


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ref():
    return models.path(MODEL)


@pytest.fixture(scope="module")
def int2_layer1(ref, tmp_path_factory):
    def change(name, t):
        return int2(t) if name.startswith("model.layers.1.") and quantizable(name, t) else t

    return rewrite(ref, tmp_path_factory.mktemp("int2") / "int2-layer1", change, {"int2_layer": 1})


def test_self_check_is_exact(cli_run, ref, tmp_path):
    """The model checked against a copy of itself: every metric exact. Against itself (one directory):
    refused, as a CI job's --reference pointing at its own output would pass whatever it holds."""
    r = cli_run("check", ref, "--reference", ref, *SMALL, "--quiet")
    assert r.exit_code == 2 and "the candidate is the reference" in r.stderr and len(r.stderr.splitlines()) == 1
    same = shutil.copytree(ref, tmp_path / "same")
    rep = tmp_path / "report"
    r = cli_run("check", same, "--reference", ref, *SMALL, "--generate", "2", "--gen-tokens", "4", "--json",
                "--quiet", "--report", rep)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    m = res["metrics"]
    assert res["passed"] and res["candidate"]["kind"] == "checkpoint"
    assert m["ppl_increase"] == 0.0 and m["ppl_candidate"] == m["ppl_reference"]
    assert m["kl_mean"] == 0.0 and m["kl_p99"] == 0.0 and m["kl_max"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["tokens"] == 8 * 64
    assert len(res["layers"]) == StreamedModel(str(ref)).num_layers
    assert all(p["rel_error"] == 0.0 and p["cosine"] == pytest.approx(1.0, abs=1e-12) for p in res["layers"])
    # the weights of a checkpoint moepress did not quantize are not compared (a copy, a cast, a fine-tuned model)
    assert all(g["passed"] is (None if g["metric"] == "max_weight_error_ratio" else True) for g in res["gates"])
    assert [g["metric"] for g in res["gates"]] == \
        ["ppl_increase", "top1_agreement", "kl_mean", "max_layer_rel_error", "min_routing_overlap", "max_expert_error",
         "max_expert_error_ratio", "max_weight_error_ratio", "max_attention_error_ratio"]
    assert m["max_expert_error"] == 0.0 and m["max_expert_error_ratio"] == 0.0 and m["max_attention_error_ratio"] == 0.0
    assert "max_weight_error_ratio" not in m
    assert all(p["attention_error"] == 0.0 and p["ffn_error"] == 0.0 for p in res["layers"])
    gen = res["generations"]["samples"]
    assert len(gen) == 2 and all(s["same_prefix_tokens"] == 4 and s["reference"] == s["candidate"] for s in gen)
    # report: JSON equal to stdout's, markdown, a real PNG, and a manifest of the report directory
    assert json.loads((rep / "report.json").read_text())["metrics"] == m
    md = (rep / "report.md").read_text()
    assert md.startswith("# Accuracy check: PASS") and "| top1_agreement | 1 | >= 0.85 | pass |" in md
    assert (rep / "layer_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(read_manifest(rep)["files"]) == {"report.json", "report.md", "layer_error.png"}
    # the bundled model was not written by a moepress stage: its directory is left alone
    assert res["manifest_updated"] is False and not (same / "moepress-manifest.json").exists()


def test_int2_layer_fails_default_gates_naming_metric_and_layer(cli_run, ref, int2_layer1):
    r = cli_run("check", int2_layer1, "--reference", ref, *SMALL, "--quiet")
    assert r.exit_code == 1, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moepress: check failed: "), r.stderr
    assert any(k in err[0] for k in ("ppl_increase", "top1_agreement", "kl_mean")), err[0]
    assert "hidden-state error jumps at layer 1 (rel. error 0 ->" in err[0], err[0]
    assert "FAIL" in r.stdout
    acc = read_manifest(int2_layer1)["accuracy"]
    assert acc["passed"] is False and acc["failed"] and acc["error_jump"]["layer"] == 1
    assert acc["metrics"]["kl_mean"] > 0 and acc["metrics"]["top1_agreement"] < 0.95
    # gates off: the same candidate is not failed (exit 0) but not passed either: nothing judged, the manifest says so
    r = cli_run("check", int2_layer1, "--reference", ref, *SMALL, "--quiet", "--min-top1", "none",
                "--max-kl", "none", "--max-ppl-increase", "none", "--max-layer-error", "none",
                "--min-routing-overlap", "none", "--max-expert-error", "none", "--max-expert-error-ratio", "none",
                "--max-weight-error-ratio", "none", "--max-attention-error-ratio", "none", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["gates"] == [] and read_manifest(int2_layer1)["accuracy"]["passed"] is None


def test_hot_expert_zeroed_is_localised_to_its_layer(ref, tmp_path):
    layer = 2
    sm = StreamedModel(str(ref))
    stats = RoutingStats()
    sm.forward(calibration_batches(ref, num_samples=8, seq_len=64), before_layer=lambda i, lay: stats.attach(i, lay))
    hot = int(stats.layers[layer].counts.argmax())
    prefix = sm.adapter.expert_prefix(layer, hot)
    cand = rewrite(ref, tmp_path / "zeroed", lambda n, t: torch.zeros_like(t) if n.startswith(prefix) else t,
                   {"zeroed": prefix})
    res = run_check(cand, ref, CheckConfig(seq_len=64, max_samples=8))
    assert res["error_jump"]["layer"] == layer
    rel = [p["rel_error"] for p in res["layers"]]
    assert all(e == 0.0 for e in rel[:layer]) and rel[layer] > 1e-3
    assert res["metrics"]["kl_mean"] > 0 and res["metrics"]["top1_agreement"] < 1.0


def test_pruned_and_block_fp8_checkpoints(cli_run, ref, tmp_path):
    """Checkpoint candidates other stages write: a pruned one (fewer experts, same layers) and a
    DeepSeek-style block-FP8 one (dequantized by the registered weight decoder while streamed)."""
    pruned = tmp_path / "pruned"
    r = cli_run("prune", ref, "--ratio", "0.25", "--method", "frequency", "--num-samples", "8", "--seq-len", "64",
                "-o", pruned, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli_run("check", pruned, "--reference", ref, *SMALL, "--quiet", "--json", "--max-ppl-increase", "none",
                "--min-top1", "none", "--max-kl", "none")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    n = StreamedModel(str(ref)).adapter.num_experts
    assert res["candidate"]["num_experts"] == n - n // 4 and len(res["layers"]) == 4
    assert res["metrics"]["kl_mean"] > 0 and all(p["rel_error"] > 0 for p in res["layers"])
    assert read_manifest(pruned)["stage"] == "prune" and read_manifest(pruned)["accuracy"]["passed"] is True

    r0 = CheckpointReader(ref)
    fp8 = tmp_path / "fp8"
    with CheckpointWriter(fp8) as w:
        for name in r0.names():
            t = r0.get(name)
            if quantizable(name, t):
                q, scale_inv = quantize_block(t)
                w.add(name, q)
                w.add(name[: -len(".weight")] + ".weight_scale_inv", scale_inv)
            else:
                w.add(name, t)
        w.write_json("config.json", {**r0.config, "quantization_config": {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}})
        w.copy_aux_files(ref)
    res = run_check(fp8, ref, CheckConfig(seq_len=64, max_samples=8))
    assert res["candidate"]["kind"] == "checkpoint" and res["candidate"]["quantization"] == "fp8"
    assert all(0 < p["rel_error"] < 0.2 for p in res["layers"]) and 0 < res["metrics"]["kl_mean"] < 0.004


def test_a_native_block_fp8_checkpoint_is_checked_with_its_runtimes_activation_quant(tmp_path):
    """A DeepSeek-layout block-FP8 checkpoint (no moepress_quant.json) was streamed weight-only, while vLLM, SGLang
    and TensorRT-LLM quantize its linears' inputs per token in 1x128 groups, and its hf-fp8-block export, the same
    bytes with moepress_quant.json, was checked with that activation quant: the check read KL 0.0019 between
    identical weights and understated the native checkpoint's own error. Every linear of this model runs in whole
    blocks, fused q/k/v included (head_dim 64: k / v of 128 rows; the bundled model's 64-row k / v are written bf16
    by the export, as vLLM and SGLang fuse them), so the export copies all of them: the two must read as identical,
    and alike against the original."""
    import shutil

    from helpers import make_random_checkpoint, to_block_fp8
    from moepress.exporters import ExportConfig, export

    ref = make_random_checkpoint("qwen3_moe", tmp_path / "ref", vocab_size=4096, hidden_size=128, head_dim=64,
                                 num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=128,
                                 intermediate_size=256)
    for f in models.path(MODEL).glob("tokenizer*"):
        shutil.copy(f, ref)
    native, exported = tmp_path / "native", tmp_path / "hf-fp8-block"
    to_block_fp8(ref, native)
    export(native, exported, ExportConfig(format="hf-fp8-block"))
    assert json.loads((exported / "export.json").read_text()).get("kept_high_precision", []) == []
    cfg = CheckConfig(seq_len=64, max_samples=8)
    same = run_check(exported, native, cfg)
    assert same["metrics"]["kl_mean"] == 0 and all(p["rel_error"] == 0 for p in same["layers"]), same["metrics"]
    assert any(n.startswith("the reference: DeepSeek-layout block FP8, run with") for n in same["notes"])
    a, b = run_check(native, ref, cfg), run_check(exported, ref, cfg)
    assert a["metrics"]["kl_mean"] == b["metrics"]["kl_mean"] > 0
    assert [p["rel_error"] for p in a["layers"]] == [p["rel_error"] for p in b["layers"]]


def test_bad_input_is_one_line_exit_2(cli_run, ref, tmp_path):
    def err(*args):
        r = cli_run("check", *args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moepress: error: "), r.stderr
        return lines[0]

    assert "reference checkpoint not found" in err(ref, "--reference", tmp_path / "nope")
    assert "candidate not found" in err(tmp_path / "nope", "--reference", ref)
    # a fixture's name resolves as in every other command (it was "candidate not found")
    assert "the candidate is the reference" in err("tiny-kimi-k2-int4", "--reference", "tiny-kimi-k2-int4")
    assert "--kind tensorflow: unknown candidate kind" in err(ref, "--reference", ref, "--kind", "tensorflow")
    assert "--max-kl lots" in err(ref, "--reference", ref, "--max-kl", "lots")
    # a bare 2 read as 200%: a perplexity gate that can hardly fail
    assert "write 200%" in err(ref, "--reference", ref, "--max-ppl-increase", "2")
    # a share gate above 1 never passes: 150% ran and failed (exit 1), and a bare 1.5 was sent to "write 150%"
    for gate, v in (("--min-top1", "150%"), ("--min-top1", "1.5"), ("--min-routing-overlap", "101%"),
                    ("--min-cosine", "2")):
        assert f"{gate} {v}: expected at most 1 (100%)" in err(ref, "--reference", ref, gate, v)
    other = make_random_checkpoint("qwen3_moe", tmp_path / "vocab256")  # vocab 256 vs the bundled 4096
    assert "vocabulary of 256 tokens" in err(other, "--reference", ref, *SMALL)
    # another family with the same vocabulary and widths: it ran and failed a metric (exit 1), perplexity
    # passing; streamed and through transformers alike
    for kind in ("checkpoint", "transformers"):
        line = err(models.path("tiny-mixtral"), "--reference", ref, *SMALL, "--kind", kind)
        assert "a mixtral model, the reference" in line and "is qwen3_moe" in line, line
    (tmp_path / "empty").mkdir()
    assert "not a candidate moepress can run" in err(tmp_path / "empty", "--reference", ref)
    same = shutil.copytree(ref, tmp_path / "same")
    assert "file not found" in err(same, "--reference", ref, "--data", tmp_path / "missing.txt")
    (tmp_path / "zeros.txt").write_bytes(b"x" * 10 + b"\0" * 20000)  # valid UTF-8: evaluated as NUL tokens before
    assert "zeros.txt: not text (a NUL byte at" in err(same, "--reference", ref, "--data", tmp_path / "zeros.txt")
    # a --report it cannot write is refused before the check runs (it ran whole, then failed)
    (tmp_path / "afile").write_text("x")
    manifest = (same / "moepress-manifest.json").read_bytes() if (same / "moepress-manifest.json").exists() else None
    assert "exists and is not a directory" in err(same, "--reference", ref, *SMALL, "--report", tmp_path / "afile")
    assert ((same / "moepress-manifest.json").read_bytes() if (same / "moepress-manifest.json").exists()
            else None) == manifest  # no check recorded
    # a --report into another output: its manifest was replaced by the report's (its digests lost), exit 0
    other = tmp_path / "export"
    other.mkdir()
    write_manifest(other, {"stage": "export", "files": {}})
    held = (other / "moepress-manifest.json").read_bytes()
    line = err(same, "--reference", ref, *SMALL, "--report", other)
    assert f"--report {other}: holds the moepress-manifest.json of the 'export' stage" in line, line
    assert (other / "moepress-manifest.json").read_bytes() == held and sorted(p.name for p in other.iterdir()) == [
        "moepress-manifest.json"]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert "holds a config.json (a checkpoint)" in err(same, "--reference", ref, *SMALL, "--report", tmp_path / "ckpt")


def test_jsonl_data_is_sampled_with_the_seed(ref, tmp_path):
    docs = [{"text": f"def f(x):\n    return x * {i}\n" * 20} for i in range(12)]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    cfg = CheckConfig(data=str(tmp_path / "eval.jsonl"), seq_len=32, max_samples=4)
    res = run_check(shutil.copytree(ref, tmp_path / "same"), ref, cfg)
    assert res["data"]["windows"] == "sampled (seed 0)" and res["data"]["samples"] == 4
    assert res["metrics"]["tokens"] == 4 * 32 and res["metrics"]["kl_mean"] == 0.0


def test_a_token_file_and_the_text_it_was_prepared_from_are_the_same_data(cli_run, tmp_path, monkeypatch):
    """A candidate calibrated on a text file and checked on a token file prepared from it (or the other way round)
    got no in-sample note: the token file's bytes were compared, not the sources its sidecar names."""
    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400)))
    ref, tok = models.path("tiny-mixtral"), tmp_path / "t.safetensors"
    assert cli_run("calib", "prepare", ref, "--calib", text, "--num-samples", "8", "--seq-len", "32", "-o", tok,
                   "--quiet").exit_code == 0
    for calib, data in ((text, tok), (tok, text)):
        q = tmp_path / f"q-{calib.suffix[1:]}"
        assert cli_run("quantize", ref, "--format", "fp8", "--calib", calib, "--num-samples", "8", "--seq-len", "32",
                       "-o", q, "--quiet").exit_code == 0
        res = run_check(q, ref, CheckConfig(data=str(data), seq_len=32, max_samples=4))
        assert res["data"].get("calibrated_on_by") == [f"{q} (quantize)"], (calib, data)


def test_data_the_candidate_was_calibrated_on_is_said(cli_run, tmp_path, monkeypatch):
    """`check --data FILE` on a candidate calibrated on FILE measured in-sample, silently (all 16 windows were
    calibration rows in a review's run); the check follows the manifests' inputs up the chain (export ->
    quantize) and says which stage was fitted to it. Other data: no such note."""
    docs = [{"text": f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 30} for i in range(40)]
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    ref, q, x = models.path("tiny-mixtral"), tmp_path / "q", tmp_path / "x"
    assert cli_run("quantize", ref, "--format", "fp8", "--calib", data, "--num-samples", "8", "--seq-len", "32",
                   "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", x, "--quiet").exit_code == 0
    res = run_check(x, ref, CheckConfig(data=str(data), seq_len=32, max_samples=4, kind="transformers"))
    assert res["data"]["calibrated_on_by"] == [f"{q} (quantize)"]
    assert any("is the calibration data of" in n for n in res["notes"])
    other = run_check(q, ref, CheckConfig(seq_len=32, max_samples=4))  # the bundled held-out text
    assert "calibrated_on_by" not in other["data"] and not any("calibration data" in n for n in other["notes"])
    # relative paths: prune and quantize run in one directory, the check from another
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli_run("prune", ref, "--method", "frequency", "--ratio", "0.25", "--calib", data, "--num-samples",
                   "8", "--seq-len", "32", "-o", "p", "--quiet").exit_code == 0
    assert cli_run("quantize", "p", "--format", "fp8-block", "-o", "q", "--quiet").exit_code == 0
    monkeypatch.chdir(tmp_path)
    cfg = CheckConfig(data=str(data), seq_len=32, max_samples=4)
    assert run_check(work / "q", ref, cfg)["data"]["calibrated_on_by"] == [f"{work / 'p'} (prune)"]
    (work / "p" / "moepress-manifest.json").write_text('{"inputs": ')  # damaged upstream: no traceback
    assert "calibrated_on_by" not in run_check(work / "q", ref, cfg)["data"]


def test_check_config_from_recipe():
    from moepress.checks.config import refuse_unmeasurable

    cfg = CheckConfig.from_dict({"max-ppl-increase": "5%", "min_top1": 0.9, "max_kl": "none", "seq-len": 128})
    assert (cfg.max_ppl_increase, cfg.min_top1, cfg.max_kl, cfg.seq_len) == (0.05, 0.9, None, 128)
    assert cfg.asked == ("max_ppl_increase", "min_top1", "max_kl")
    refuse_unmeasurable(cfg, "routing", "no router")  # the routing gate at its default, not asked: shown n/a
    with pytest.raises(MoepressError, match="min-routing-overlap 0.95 .*no router"):
        refuse_unmeasurable(CheckConfig.from_dict({"min_routing_overlap": 0.95}), "routing", "no router")
    with pytest.raises(MoepressError, match="check: unknown key 'max_ppl'"):
        CheckConfig.from_dict({"max_ppl": 1})
    with pytest.raises(MoepressError, match="seq_len 1"):
        CheckConfig(seq_len=1)
    with pytest.raises(AttributeError):
        cfg.max_kl = 1.0  # frozen: what the manifest records is what ran


def test_a_failing_expert_gate_names_its_layer_and_expert(cli_run, ref, tmp_path):
    """One routed expert's down projection x3 in layer 2: the failure line names that layer and expert beside the
    metric (it named the metric only, and the hidden-state jump, which starts at that layer's input)."""
    def change(name, t):
        return t * 3 if ".layers.2.mlp.experts.5.down_proj." in name else t

    cand = rewrite(ref, tmp_path / "expert5", change, {"scaled": "layer 2 expert 5"})
    r = cli_run("check", cand, "--reference", ref, *SMALL, "--quiet", "--no-record")
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(err) == 1, r.output
    assert re.search(r"check failed: max_expert_error \S+ at layer 2 \(expert 5\) > max 0.5", err[0]), err[0]


def test_gates_fail_on_nan_and_name_the_first_failure():
    cfg = CheckConfig(max_kl_p99=0.5)
    gates = evaluate_gates(cfg, {"ppl_increase": 0.031, "top1_agreement": 0.97, "kl_mean": float("nan"),
                                 "kl_p99": 0.1})
    assert [g["passed"] for g in gates] == [False, True, False, True] + [None] * 6  # no per-layer metrics given
    line = failure_line(gates, {"layer": 3, "before": 0.01, "after": 0.4})
    assert line == ("ppl_increase +3.10% > max +2.00% (--max-ppl-increase); also kl_mean nan; "
                    "hidden-state error jumps at layer 3 (rel. error 0.01 -> 0.4)")


def test_metrics_against_independent_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 50, generator=g), torch.randn(2, 5, 50, generator=g)
    want = torch.nn.functional.kl_div(torch.log_softmax(b.double(), -1), torch.log_softmax(a.double(), -1),
                                      reduction="none", log_target=True).sum(-1).flatten()
    assert torch.allclose(token_kl(a, b), want, atol=1e-12) and torch.all(token_kl(a, a) == 0)
    h1, h2 = torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g)
    cos, rel = hidden_error(h1, h2)
    x, y = h1.reshape(-1, 16).double().numpy(), h2.reshape(-1, 16).double().numpy()
    np.testing.assert_allclose(cos.numpy(), (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(rel.numpy(), np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1))
    v = torch.rand(1001, generator=g)
    assert quantile(v, 0.99) == pytest.approx(float(np.percentile(v.numpy(), 99)), abs=1e-12)
    assert error_jump([0.0, 0.01, 0.3, 0.32]) == 2 and error_jump([0.0, float("nan"), float("nan")]) == 1
    assert math.isnan(quantile(torch.empty(0), 0.5))


def _broken_copy(tmp_path, name: str, fn):
    from safetensors.torch import load_file, save_file

    out = shutil.copytree(models.path("tiny-mixtral"), tmp_path / "bad")
    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        if name in sd:
            sd[name] = fn(sd[name].clone())
            save_file(sd, f, metadata={"format": "pt"})
    return out


def _nan_first(t):
    t[0, 0] = float("nan")
    return t


@pytest.mark.parametrize("name,fn,gates,failing", [
    # NaN from layer 1 on: min() skipped the NaN cosines after layer 0's finite one (PASS, exit 0)
    ("model.layers.1.self_attn.o_proj.weight", _nan_first, ("--min-cosine", "0.99"), "min_layer_cosine"),
    # lm_head x 1000: a mean NLL past 709 nats raised OverflowError in math.exp (traceback, exit 1)
    ("lm_head.weight", lambda t: (t.float() * 1000).to(t.dtype), ("--max-ppl-increase", "2%"), "ppl_increase"),
])
def test_a_broken_candidate_fails_its_gate(cli_run, tmp_path, name, fn, gates, failing):
    off = [a for k, v in (("--max-ppl-increase", "none"), ("--min-top1", "none"), ("--max-kl", "none")) if k != gates[0]
           for a in (k, v)]  # every other gate off: a gate given twice with two values is refused
    bad = _broken_copy(tmp_path, name, fn)
    r = cli_run("check", bad, "--reference", models.path("tiny-mixtral"), "--max-samples", "2", "--seq-len", "32",
                "--quiet", "--json", *off, *gates)
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["failed"][0] == failing


def _rare_experts(ref, layer: int) -> tuple[StreamedModel, list[int]]:
    """The experts of ``layer`` by how many tokens the check's eval data (MID) routes to them, fewest
    first (those it routes none to last)."""
    from moepress.checks.runner import eval_data

    batches, _ = eval_data(ref, CheckConfig(seq_len=128, max_samples=16))  # the data of the CLI runs (MID)
    sm, stats = StreamedModel(str(ref)), RoutingStats()
    sm.forward(batches, before_layer=lambda i, lay: stats.attach(i, lay))
    counts = stats.layers[layer].counts
    return sm, torch.where(counts > 0, counts, counts.max() + 1).argsort(stable=True).tolist()


def _rare_expert(ref, layer: int) -> tuple[StreamedModel, int]:
    """The expert of ``layer`` the check's eval data (MID) routes fewest tokens to (at least one)."""
    sm, order = _rare_experts(ref, layer)
    return sm, order[0]


def test_one_rarely_routed_expert_blown_up_fails_the_layer_error_gate(cli_run, tmp_path):
    """Layer 1's least-routed expert's down projection x 1e6 (as one NVFP4 expert's global scale inverted:
    x 3.5e8): the few tokens it gets leave the layer with hidden states off by orders
    of magnitude, while perplexity, KL and top-1 over all tokens barely move and pass. The per-layer error
    gate (default 1.0) fails it, and the expert's own error and its ratio to its peers' (the other experts are
    the reference's, error 0: its error over the 1e-3 floor), and its weights' ratio likewise; they alone fail it
    (every other gate passes)."""
    ref = models.path("tiny-mixtral")
    sm, rare = _rare_expert(ref, 1)
    bad = _broken_copy(tmp_path, sm.adapter.expert_prefix(1, rare) + "w2.weight",
                       lambda t: (t.float() * 1e6).to(t.dtype))
    args = ("check", bad, "--reference", ref, *MID, "--quiet", "--json")
    r = cli_run(*args)
    res = json.loads(r.stdout)
    want = ["max_layer_rel_error", "max_expert_error", "max_expert_error_ratio"]
    assert r.exit_code == 1 and res["failed"] == want, r.output
    assert res["metrics"]["max_layer_rel_error"] > 10 and res["metrics"]["ppl_increase"] < 0.02


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_one_rarely_routed_expert_scaled_fails_the_expert_gate(cli_run, tmp_path, factor):
    """Layer 1's least-routed expert's down projection x 2 or x 1/2 (a wrong scale on one expert): every
    whole-model gate and the per-layer error pass it; the expert's own output, on the reference's inputs to
    the layer, is off by the smaller output's size (|2y - y| / |y| = |y/2 - y| / |y/2| = 1), over the default
    --max-expert-error 0.5 (relative to the reference's output alone, x 1/2 read 0.5 and passed), and 1000 times
    its peers' (their error 0 read as the 1e-3 floor)."""
    ref = models.path("tiny-mixtral")
    sm, rare = _rare_expert(ref, 1)
    bad = _broken_copy(tmp_path, sm.adapter.expert_prefix(1, rare) + "w2.weight",
                       lambda t: (t.float() * factor).to(t.dtype))
    args = ("check", bad, "--reference", ref, *MID, "--quiet", "--json")
    r = cli_run(*args)
    res = json.loads(r.stdout)
    want = ["max_expert_error", "max_expert_error_ratio"]
    assert r.exit_code == 1 and res["failed"] == want, r.output
    assert res["metrics"]["max_expert_error"] == pytest.approx(1.0, rel=1e-3)
    assert res["metrics"]["max_expert_error_ratio"] == pytest.approx(1000, rel=1e-3)
    row = res["layers"][1]
    assert row["worst_expert"] == rare and row["expert_error"] == res["metrics"]["max_expert_error"]
    assert row["ratio_expert"] == rare
    assert all(p["expert_error"] == 0.0 for p in res["layers"] if p["layer"] != 1)


def test_an_expert_zeroed_reads_an_infinite_error_that_fails_any_gate(cli_run, tmp_path):
    """An expert whose output is zero on one side only was divided by an epsilon: 6.3e30, which a
    --max-expert-error 1e31 passed. It reads inf (null in --json) and fails any finite gate."""
    ref = models.path("tiny-mixtral")
    sm, rare = _rare_expert(ref, 1)
    bad = _broken_copy(tmp_path, sm.adapter.expert_prefix(1, rare) + "w2.weight", lambda t: t * 0)
    r = cli_run("check", bad, "--reference", ref, *MID, "--quiet", "--json", "--max-expert-error", "1e31",
                "--max-layer-error", "none", "--report", tmp_path / "rep")
    res = json.loads(r.stdout)
    want = ["max_expert_error", "max_expert_error_ratio"]
    assert r.exit_code == 1 and res["failed"] == want, r.output
    assert res["metrics"]["max_expert_error"] is None and res["layers"][1]["worst_expert"] == rare
    # report.md names the expert per layer too (it had the gate row alone)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| routing overlap | worst expert's error |" in md and f"| inf (expert {rare}) |" in md, md


def test_an_expert_with_nan_weights_fails_the_expert_gate(cli_run, tmp_path):
    """A routed expert the eval tokens do not reach, its down projection NaN: its error read 0 (NaN compared False
    took the zero-output branch) and the check passed, exit 0. It reads NaN now, which no gate passes."""
    ref = models.path("tiny-mixtral")
    sm, rare = _rare_expert(ref, 1)
    bad = _broken_copy(tmp_path, sm.adapter.expert_prefix(1, rare) + "w2.weight", lambda t: t * float("nan"))
    r = cli_run("check", bad, "--reference", ref, *MID, "--quiet", "--json", "--max-layer-error", "none")
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and "max_expert_error" in res["failed"], r.output
    assert res["metrics"]["max_expert_error"] is None and res["layers"][1]["worst_expert"] == rare


def test_fewer_windows_than_asked_are_said(cli_run, tmp_path):
    """--max-samples 1000 of 1024 tokens evaluated the 39 windows the text holds, said only in data.samples."""
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(DEFAULT_EVAL.read_text().split()[:600]))
    r = cli_run("check", "tiny-qwen3-moe", "--reference", "tiny-qwen3-moe", "--kind", "transformers",
                "--data", text, "--max-samples", "1000", "--seq-len", "64", "--quiet", "--json")
    res = json.loads(r.stdout)
    n = res["data"]["samples"]
    assert r.exit_code == 0 and 0 < n < 1000, r.output
    assert any(f"holds {n} windows of 64 tokens, fewer than --max-samples 1000" in x for x in res["notes"])


def _deepseek_copy(tmp_path, change=None, **config):
    """tiny-deepseek-v3 with one tensor changed (``change(state_dict)``) or config.json keys set."""
    from safetensors.torch import load_file, save_file

    out = shutil.copytree(models.path("tiny-deepseek-v3"), tmp_path / "bad")
    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        if change is not None and change(sd):
            save_file(sd, f, metadata={"format": "pt"})
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, **config}))
    return out


def _bias_zeroed(sd) -> bool:
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    if name in sd:
        sd[name] = torch.zeros_like(sd[name])
    return name in sd


@pytest.mark.parametrize("k", [3, 5])
def test_another_top_k_is_refused_before_the_check_runs(cli_run, tmp_path, k):
    """Another top-k (an exporter's plausible mistake) moved perplexity by under 1.5% and KL stayed under its gate;
    the routing gate caught it (0.75 / 0.80). No stage changes top-k, so the candidate is refused as another
    model in one line (moepress/checks/consistency.py)."""
    bad = _deepseek_copy(tmp_path, None, num_experts_per_tok=k)
    r = cli_run("check", bad, "--reference", models.path("tiny-deepseek-v3"), *MID, "--quiet")
    assert_one_line_error(r, "num_experts_per_tok", f"is {k}", "has 4")


def test_routing_breaks_fail_the_routing_gate(cli_run, tmp_path):
    """A dropped DeepSeek correction bias (an exporter's plausible mistake): perplexity moved by +0.23% and KL
    stayed under its gate (0.012 on MID); only top-1 failed, which 4-bit formats also fail on small models. The
    candidate's router, given the reference's inputs, agrees on 78% of the choices (over the larger top-k); a
    correct candidate on all of them."""
    bad = _deepseek_copy(tmp_path, _bias_zeroed)
    args = ("check", bad, "--reference", models.path("tiny-deepseek-v3"), *MID, "--quiet", "--json", "--min-top1",
            "none")
    r = cli_run(*args)
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and res["failed"] == ["min_routing_overlap"], r.output
    assert res["metrics"]["min_routing_overlap"] < 0.85 and res["metrics"]["ppl_increase"] < 0.03
    assert [p.get("routing_overlap") is None for p in res["layers"]] == [True, False, False, False]  # layer 0 dense


def _experts_permuted(tmp_path, with_experts: bool, src=None):
    """tiny-mixtral (or ``src``, a quantized copy) with every layer's router rows permuted, and its experts with them
    or not."""
    from safetensors.torch import load_file, save_file

    perm = [3, 0, 7, 1, 6, 2, 5, 4]
    out = shutil.copytree(src or models.path("tiny-mixtral"), tmp_path / f"perm-{with_experts}-{src is not None}")
    shards = {f: load_file(f) for f in out.glob("*.safetensors")}
    every = {n: t for sd in shards.values() for n, t in sd.items()}
    for f, sd in shards.items():
        for n in sd:
            m = re.search(r"\.experts\.(\d+)\.", n)
            if n.endswith("block_sparse_moe.gate.weight"):
                sd[n] = every[n][perm].contiguous()
            elif with_experts and m:
                sd[n] = every[n.replace(m.group(0), f".experts.{perm[int(m.group(1))]}.")]
        save_file(sd, f, metadata={"format": "pt"})
    return out


def test_experts_renumbered_with_their_router_rows_route_alike(cli_run, tmp_path):
    """Every layer's experts and router rows permuted alike (what an expert-placement tool may write):
    the same function, so the routing and expert gates, which match experts by their router rows, pass it
    and say so; the router rows permuted without their experts send each token to another expert than the
    reference's: each expert then differs from the one its row stands for, and the expert gate fails it."""
    ref = models.path("tiny-mixtral")
    r = cli_run("check", _experts_permuted(tmp_path, True), "--reference", ref, *SMALL, "--quiet", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["metrics"]["min_routing_overlap"] == 1.0, r.output
    assert res["metrics"]["max_expert_error"] == 0.0 and "max_weight_error_ratio" not in res["metrics"]
    assert any("renumbered at layer(s) 0, 1, 2, 3" in n for n in res["notes"])
    # quantized: each expert's weights compared with the reference expert its row stands for, and exact
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    quantize_checkpoint(ref, tmp_path / "q", QuantConfig(format="nvfp4-a16"))
    r = cli_run("check", _experts_permuted(tmp_path, True, tmp_path / "q"), "--reference", ref, *SMALL, "--quiet",
                "--json", "--no-record")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6), r.output
    r = cli_run("check", _experts_permuted(tmp_path, False), "--reference", ref, *SMALL, "--quiet", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and "max_expert_error" in res["failed"] and res["metrics"]["max_expert_error"] > 1, \
        r.output


def test_two_rarely_routed_experts_swapped_without_their_router_rows_fail(cli_run, tmp_path):
    """Layer 1's two least-routed experts swapped, router rows left: the few tokens they get go to the
    other expert (routing overlap 0.998, perplexity -0.03%, every whole-model gate passes), and matched by
    outputs the swap looked like a renumbering (expert error 0). Matched by router rows, each of the two
    differs from the expert its row stands for."""
    from safetensors.torch import load_file, save_file

    ref = models.path("tiny-mixtral")
    sm, (a, b, *_) = _rare_experts(ref, 1)
    out = shutil.copytree(ref, tmp_path / "swapped")
    pa, pb = sm.adapter.expert_prefix(1, a), sm.adapter.expert_prefix(1, b)
    shards = {f: load_file(f) for f in out.glob("*.safetensors")}
    every = {n: t for sd in shards.values() for n, t in sd.items()}
    for f, sd in shards.items():
        for n in sd:
            if n.startswith(pa) or n.startswith(pb):
                sd[n] = every[n.replace(pa, "@").replace(pb, pa).replace("@", pb)]
        save_file(sd, f, metadata={"format": "pt"})
    r = cli_run("check", out, "--reference", ref, *MID, "--quiet", "--json")
    res = json.loads(r.stdout)
    assert r.exit_code == 1 and res["failed"] == ["max_expert_error", "max_expert_error_ratio"], r.output
    assert res["layers"][1]["worst_expert"] in (a, b) and res["metrics"]["max_expert_error"] > 1


def test_routing_gate_on_candidates_without_the_references_experts(cli_run, tmp_path):
    """A pruned candidate's experts are others: the default routing gate is shown unmeasured, an explicit
    one refused before the check runs; a quantized candidate routes exactly as its reference."""
    ref = models.path("tiny-deepseek-v3")
    pruned = tmp_path / "pruned"
    assert cli_run("prune", ref, "--ratio", "0.25", "--method", "frequency", "-o", pruned, "--quiet",
                   "--num-samples", "4", "--seq-len", "32").exit_code == 0
    r = cli_run("check", pruned, "--reference", ref, *SMALL, "--quiet", "--json", "--min-top1", "none",
                "--max-kl", "none", "--max-ppl-increase", "none")
    res = json.loads(r.stdout)
    assert r.exit_code == 0 and "min_routing_overlap" not in res["metrics"], r.output
    assert [g["passed"] for g in res["gates"] if g["metric"] == "min_routing_overlap"] == [None]
    for asked in ("0.9", "0.95"):  # the default's value, given explicitly, is asked for too
        r = cli_run("check", pruned, "--reference", ref, *SMALL, "--min-routing-overlap", asked)
        assert r.exit_code == 2 and f"--min-routing-overlap {float(asked)}" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    r = cli_run("check", pruned, "--reference", ref, *SMALL, "--max-expert-error", "0.5")
    assert r.exit_code == 2 and "--max-expert-error 0.5" in r.stderr and "expert gates need" in r.stderr, r.output
    q = tmp_path / "q"
    assert cli_run("quantize", ref, "--format", "fp8-block", "-o", q, "--quiet").exit_code == 0
    r = cli_run("check", q, "--reference", ref, *SMALL, "--quiet", "--json")
    assert json.loads(r.stdout)["metrics"]["min_routing_overlap"] == 1.0, r.output


def test_a_few_nan_tokens_make_the_p99_nan():
    """torch.sort puts NaN last: under 1% NaN tokens left the 99th percentile finite (a kl_p99 gate passed)."""
    v = torch.zeros(1000, dtype=torch.float64)
    v[3] = float("nan")
    assert math.isnan(quantile(v, 0.99))


def test_logit_summary_against_hand_formulas():
    """The gated numbers from two fixed, asymmetric sets of logits: KL(reference || candidate), its mean and
    99th percentile over positions, perplexities over next-token predictions and their ratio, top-1."""
    g = torch.Generator().manual_seed(1)
    ref, cand = torch.randn(2, 6, 11, generator=g) * 2, torch.randn(2, 6, 11, generator=g)
    ids = torch.randint(0, 11, (2, 6), generator=g)
    st = LogitStats()
    st.add(ref, cand, ids)
    out = st.summary()
    lr, lc = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    kl = (lr.exp() * (lr - lc)).sum(-1).flatten().numpy()
    nll = lambda lp: -lp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()  # noqa: E731
    assert out["kl_mean"] == pytest.approx(kl.mean(), rel=1e-9)
    assert out["kl_p99"] == pytest.approx(float(np.percentile(kl, 99)), rel=1e-9)
    assert out["ppl_reference"] == pytest.approx(math.exp(nll(lr)), rel=1e-6)
    assert out["ppl_increase"] == pytest.approx(math.exp(nll(lc)) / math.exp(nll(lr)) - 1, rel=1e-6)
    assert out["top1_agreement"] == pytest.approx((ref.argmax(-1) == cand.argmax(-1)).double().mean().item())


def _minimal_result() -> dict:
    metrics = {k: 0.0 for k in ("ppl_reference", "ppl_candidate", "ppl_increase", "kl_mean", "kl_p99", "kl_max",
                                "top1_agreement")}
    return {"passed": True, "failed": [], "metrics": {**metrics, "tokens": 1}, "gates": [], "layers": [],
            "candidate": {"path": "c", "kind": "checkpoint"}, "reference": "r", "config": {},
            "data": {"source": "d", "samples": 1, "seq_len": 1, "windows": "w"}, "error_jump": None}


def test_report_directory_is_never_half_written(tmp_path, monkeypatch):
    """A new --report DIR appears whole or not at all; an existing one (other files kept) loses its
    old manifest before any file is replaced, so an interrupted run leaves no vouched-for report."""
    import moepress.checks.report as report_mod

    def fail_after_json(result):
        raise KeyboardInterrupt  # report.json already written, report.md not

    new = tmp_path / "new"
    monkeypatch.setattr(report_mod, "markdown", fail_after_json)
    with pytest.raises(KeyboardInterrupt):
        write_report(_minimal_result(), new)
    assert not new.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    old = tmp_path / "ci"
    old.mkdir()
    (old / "other.txt").write_text("kept")
    write_report({**_minimal_result(), "passed": False, "failed": ["x"]}, old)
    replaced = []
    real_replace = os.replace

    def replace_once(src, dst):
        if replaced:
            raise KeyboardInterrupt
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(report_mod.os, "replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        write_report(_minimal_result(), old)
    assert not (old / "moepress-manifest.json").exists() and (old / "other.txt").read_text() == "kept"
    monkeypatch.undo()
    write_report(_minimal_result(), old)
    assert json.loads((old / "report.json").read_text())["passed"] is True
    assert set(read_manifest(old)["files"]) == {"report.json", "report.md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci"]


def test_the_cosine_gate_is_printed_beside_the_cosines():
    """--min-cosine's verdict stood at the end of the relative-error line ("0.108 ... [>= 0.999: FAIL]"),
    while the cosines it judged were printed nowhere."""
    from moepress.cli.check import _human

    result = {"candidate": {"path": "/c", "kind": "checkpoint"}, "reference": "/r",
              "data": {"samples": 2, "seq_len": 32, "source": "/d.txt"},
              "metrics": {"ppl_reference": 10.0, "ppl_candidate": 10.5, "ppl_increase": 0.05, "kl_mean": 0.01,
                          "kl_p99": 0.1, "top1_agreement": 0.9},
              "layers": [{"layer": 0, "rel_error": 0.108, "cosine": 0.99512}], "error_jump": None, "notes": [],
              "gates": [{"metric": "min_layer_cosine", "op": ">=", "threshold": 0.999, "passed": False}],
              "passed": False, "failed": ["min_layer_cosine"]}
    lines = _human(result)
    errors = next(x for x in lines if "rel. error" in x)
    cosines = next(x for x in lines if "cosine per layer" in x)
    assert "FAIL" not in errors and "0.995120" in cosines and cosines.endswith("[>= 0.999: FAIL]")


def test_a_killed_reports_hidden_directory_is_removed_by_the_next_report(tmp_path):
    """A check killed while writing --report left .NAME.partial-PID, which no later run removed (each run cleared
    only its own pid's); one of a process still running (another check writing the same report) is kept."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed, running = tmp_path / f".rep.partial-{dead}", tmp_path / f".rep.partial-{os.getppid()}"
    for d in (killed, running):
        d.mkdir()
        (d / "report.json").write_text("{}")
    write_report(_minimal_result(), tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rep", running.name])


def test_a_token_file_gives_at_most_its_samples_and_a_refusal_names_checks_options(cli_run, tmp_path, monkeypatch):
    """--max-samples is "at most" for a text file; a token file of fewer samples than it was refused, and the
    refusal (for another --seq-len too) asked for --num-samples, an option check does not have."""
    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    tok = tmp_path / "t.safetensors"
    assert cli_run("calib", "prepare", MODEL, "--calib", str(DEFAULT_EVAL), "--num-samples", "3", "--seq-len", "32",
                   "-o", tok, "--quiet").exit_code == 0
    cand = shutil.copytree(models.path(MODEL), tmp_path / "copy")  # not the reference's path (refused)
    r = cli_run("check", cand, "--reference", MODEL, "--data", tok, "--seq-len", "32", "--json", "--quiet")
    assert json.loads(r.stdout)["data"]["samples"] == 3, r.output  # the default --max-samples is larger
    r = cli_run("check", cand, "--reference", MODEL, "--data", tok, "--seq-len", "16", "--quiet")
    assert r.exit_code == 2 and "(run with --seq-len 32 --max-samples 3)" in r.stderr, r.output


def test_a_reference_other_than_the_model_the_candidate_was_made_from_is_said(cli_run, tmp_path):
    """`check` of a candidate quantized from tiny-mixtral against another Mixtral compared two models without a
    word (a gate failing was the only sign; a close enough pair would pass). The manifests' inputs.model chain
    names the original; the reference itself, a stage on the chain, or a copy of the original (same config.json)
    gets no note."""
    ref = models.path("tiny-mixtral")
    p, q = tmp_path / "p", tmp_path / "q"
    assert cli_run("prune", ref, "--keep", "6", "--method", "frequency", "--num-samples", "4", "--seq-len", "32",
                   "-o", p, "--quiet").exit_code == 0
    assert cli_run("quantize", p, "--format", "fp8-dynamic", "-o", q, "--quiet").exit_code == 0
    cfg = CheckConfig(seq_len=32, max_samples=2)
    # another model of the same architecture (a fine-tune: its own config.json, the same settings); one of other
    # widths (tiny-mixtral-w192) is refused before it runs (test_check_same_config.py)
    other = shutil.copytree(ref, tmp_path / "finetune")
    (other / "config.json").write_text(json.dumps({**json.loads((ref / "config.json").read_text()),
                                                   "_name_or_path": "someone/tiny-mixtral-finetune"}))
    res = run_check(q, other, cfg)
    said = [n for n in res["notes"] if "was made from" in n]
    assert said == [f"{q} was made from {ref} (its moepress-manifest.json inputs.model), not from the reference "
                    f"{other}: the figures compare two models"], said
    assert res["data"]["made_from"] == str(ref)  # recorded with the check: publish refuses it (test_publish_guards)
    for r in (ref, p, shutil.copytree(ref, tmp_path / "copy")):
        res = run_check(q, r, cfg)
        assert not any("was made from" in n for n in res["notes"]) and "made_from" not in res["data"], r


def test_fp8_kv_cache_scales_are_applied_as_the_runtime_caches(tmp_path, cli_run):
    """`quantize --kv-cache fp8` writes k_scale / v_scale; check streamed the keys and values unquantized, so scales
    100x too small (every cached value clamped to +-448 x s: ppl x4.7 under vLLM's FP8 cache) passed unchanged. The
    cached keys and values are now x / s in E4M3 times s; the right scales still pass."""
    from safetensors.torch import load_file, save_file

    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.exporters import ExportConfig, export

    good = tmp_path / "good"
    quantize_checkpoint(models.path("tiny-mixtral"), good, QuantConfig(format="fp8", kv_cache="fp8", num_samples=4,
                                                                       seq_len=64))
    export(good, tmp_path / "good-modelopt", ExportConfig(format="hf-modelopt"))  # k_proj.k_scale / v_proj.v_scale
    args = ("-r", "tiny-mixtral", "--max-samples", "4", "--seq-len", "128", "--json")
    for d in (good, tmp_path / "good-modelopt"):
        bad = shutil.copytree(d, tmp_path / f"bad-{d.name}")
        (bad / "moepress-manifest.json").unlink()
        for f in bad.glob("*.safetensors"):
            t = load_file(f)
            if any(k.endswith((".k_scale", ".v_scale")) for k in t):
                save_file({k: v * 0.01 if k.endswith((".k_scale", ".v_scale")) else v for k, v in t.items()}, f,
                          metadata={"format": "pt"})
        ok, broken = (cli_run("check", c, *args) for c in (d, bad))
        assert ok.exit_code == 0, ok.output
        assert broken.exit_code == 1 and json.loads(broken.stdout)["metrics"]["kl_mean"] > 0.5, (d, broken.output)


def test_no_record_gates_without_touching_the_manifest_and_a_read_only_artifact_is_refused_first(cli_run, tmp_path):
    """A read-only artifact (an artifact store, a CI cache): the check ran whole, passed, then exited 2 for the
    record it could not write. Now refused before it runs, and --no-record checks it, recording nothing."""
    import subprocess
    import sys

    q = tmp_path / "q"
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    manifest = (q / "moepress-manifest.json").read_bytes()
    args = ["check", q, "-r", "tiny-qwen3-moe", "--max-samples", "2", "--seq-len", "32", "--max-ppl-increase", "0.1",
            "--quiet"]
    r = cli_run(*args, "--no-record", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["manifest_updated"] is False, r.output
    assert (q / "moepress-manifest.json").read_bytes() == manifest
    if os.geteuid() == 0 and shutil.which("capsh") is None:
        pytest.skip("root without capsh: a read-only folder cannot be made")
    q.chmod(0o555)
    try:
        cmd = [sys.executable, "-m", "moepress", *map(str, args)]
        if os.geteuid() == 0:  # root ignores the mode unless it drops its override capabilities
            cmd = ["capsh", "--drop=cap_dac_override,cap_dac_read_search,cap_fowner", "--", "-c",
                   " ".join(f"'{c}'" for c in cmd)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    finally:
        q.chmod(0o755)
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.strip() == (f"moepress: error: {q}: cannot record the check in its moepress-manifest.json "
                                "(Permission denied); expected a writable artifact folder (or --no-record: the gate "
                                "alone, nothing recorded)"), p.stderr

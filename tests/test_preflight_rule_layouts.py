"""Quantize rules that give several formats (or one beside linears left unquantized) are asked as the layout they
write: run's preflight refuses, before any stage, each export that refuses that quantize output, and takes each that
exports it. They passed the preflight's checks of one format, and the export refused the output after prune and
quantize. The exports themselves are the oracle: the rules are quantized and each export is run."""

from __future__ import annotations

import pytest

from helpers import cli_quantized
from moepress import models
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import normalise

MODEL = "tiny-mixtral"
EXPORTS = ["trtllm-ckpt", "onnx", "compressed-tensors", "hf-modelopt", "hf-fp8-block"]


def _refused(fn, *args) -> str | None:
    try:
        fn(*args)
    except MoepressError as e:
        return str(e)
    return None


@pytest.mark.parametrize("fmt,rules,taken", [
    # attention left bf16: trtllm-ckpt has one quant_algo, hf-fp8-block writes block FP8 only
    ("fp8", {"self_attn.*": "none"}, {"onnx", "compressed-tensors", "hf-modelopt"}),
    # NVFP4 experts beside FP8 attention: one compressed-tensors format per checkpoint; onnx / trtllm-ckpt write no FP4
    ("fp8", {"block_sparse_moe.experts.*": "nvfp4"}, {"hf-modelopt"}),
    # one expert of each layer left bf16: a fused MoE (and onnx's stacked experts) takes one format for all
    ("fp8", {"block_sparse_moe.experts.0.*": "none"}, set()),
])
def test_the_preflight_refuses_the_exports_that_refuse_what_the_rules_write(tmp_path, fmt, rules, taken):
    args = [a for pat, f in rules.items() for a in ("--rule", f"{pat}={f}")]
    q = cli_quantized(tmp_path / "q", MODEL, "--format", fmt, *args, "--num-samples", "2", "--seq-len", "32")
    for x in EXPORTS:
        by_export = _refused(export, q, tmp_path / x, ExportConfig(format=x))
        raw = {"model": MODEL, "check": None, "quantize": {"format": fmt, "rules": rules}, "export": {"formats": [x]}}
        by_preflight = _refused(preflight, normalise(raw), models.path(MODEL))
        assert (by_export is None) == (x in taken), (x, by_export)
        assert (by_preflight is None) == (by_export is None), (x, by_preflight, by_export)
        assert by_preflight is None or f"export.formats {x}" in by_preflight, by_preflight


def test_mixed_ct_formats_are_told_before_the_quantize_and_not_sent_to_compressed_tensors(cli_run, tmp_path):
    """MXFP4 experts beside FP8 attention: hf-modelopt has no MXFP4 quant_algo and compressed-tensors takes one
    compressed-tensors format per checkpoint. The quantize names both exports as refusing its output (it named
    hf-modelopt only), and hf-modelopt's refusal sends it through an FP8 re-quantize, not straight to
    compressed-tensors, which refuses it."""
    import json

    r = cli_run("quantize", MODEL, "--format", "fp8", "--rule", "block_sparse_moe.experts.*=mxfp4", "--num-samples",
                "2", "--seq-len", "32", "-o", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.output
    refusing = json.loads(r.stdout)["exports_refusing"]
    assert set(refusing) == {"compressed-tensors", "hf-modelopt"}, refusing
    assert "mixes fp8, mxfp4" in refusing["compressed-tensors"]
    ct = _refused(export, tmp_path / "q", tmp_path / "ct", ExportConfig(format="compressed-tensors"))
    assert ct is not None and "mixes fp8, mxfp4" in ct, ct
    hf = _refused(export, tmp_path / "q", tmp_path / "hf", ExportConfig(format="hf-modelopt"))
    assert hf is not None and "have no modelopt quant_algo; quantize with --format fp8" in hf, hf


def test_the_exports_a_family_refusal_names_take_what_the_rules_write():
    """trtllm-ckpt has no DeepSeek writer; its refusal names the other exports of this quantize output, and named
    hf-fp8-block, which then refused the int4-gptq the rules write: each export it names now passes the preflight."""
    import re

    raw = {"model": "tiny-deepseek-v3", "check": None,
           "quantize": {"format": "int4-gptq", "rules": {"self_attn.*": "none", "mlp.shared_experts.*": "none"}}}
    model = models.path("tiny-deepseek-v3")
    line = _refused(preflight, normalise({**raw, "export": {"formats": ["trtllm-ckpt"]}}), model)
    named = re.search(r"expected export.formats (.*)$", line).group(1).replace(" or ", ", ").split(", ")
    assert named and "hf-fp8-block" not in named, line
    for x in named:
        assert _refused(preflight, normalise({**raw, "export": {"formats": [x]}}), model) is None, x

"""hf-modelopt and hf-fp8-block exports against tools/sglang_check.py, an independent re-implementation (no
moepress import) of SGLang 0.5.23's Model-Optimizer / block-FP8 loading rules (names, shapes, dtypes, exclusions,
fused scalars, KV-scale lookups; each rule cites its source line). An export the checker finds SGLang failing on or
misreading (FAIL / WRONG) must say so in export.json (``misloaded_by: {sglang: ...}``); one it passes must not.
MIXED_PRECISION exports take either of SGLang's two routes (model_config.py:1855-1865): modelopt_mixed with an
NVFP4 entry (per-layer algo; fused linears resolved only through the model class's packed_modules_mapping),
w4afp8 without one (block-FP8 linears and INT4 experts under weight_scale_inv)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export
from tests import consumer_names as cn

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sglang_check.py"


def _checker():
    spec = importlib.util.spec_from_file_location("sglang_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MLA_FP8 = (("self_attn.kv_b_proj", "none"), ("self_attn.*", "fp8"))
DS_GATE_UP_BF16 = tuple((p, "none") for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.shared_experts.gate_proj",
                                              "mlp.shared_experts.up_proj"))
CASES = [  # model, quantize options, exporter, whether SGLang 0.5.23 fails on / misreads it
    ("tiny-deepseek-v3", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", False),  # MLA KV scales left out
    ("tiny-deepseek-v3", {"format": "nvfp4"}, "hf-modelopt", True),  # packed FP4 kv_b_proj
    ("tiny-deepseek-v3", {"format": "nvfp4", "rules": (("self_attn.kv_b_proj", "none"),)}, "hf-modelopt", False),
    ("tiny-mixtral", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", True),  # qkv_proj.k_scale KeyError
    ("tiny-qwen3-moe", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", False),
    ("tiny-deepseek-v3", {"format": "fp8-block"}, "hf-fp8-block", False),
    # MIXED_PRECISION: with an NVFP4 entry SGLang's modelopt_mixed (per-layer algo; fused linears only through the
    # model class's packed_modules_mapping), else w4afp8 (block-FP8 linears, INT4 experts, weight_scale_inv)
    ("tiny-qwen3-moe", {"format": "nvfp4", "rules": (("self_attn.*", "fp8"),)}, "hf-modelopt", False),
    ("tiny-qwen3-moe", {"format": "nvfp4", "rules": (("self_attn.*", "fp8-dynamic"),)}, "hf-modelopt", True),
    ("tiny-deepseek-v3", {"format": "nvfp4", "rules": MLA_FP8}, "hf-modelopt", True),  # dense / shared gate_up_proj
    ("tiny-deepseek-v3", {"format": "nvfp4", "rules": MLA_FP8 + DS_GATE_UP_BF16}, "hf-modelopt", False),
    ("tiny-mixtral", {"format": "fp8", "rules": (("self_attn.*", "nvfp4-a16"),)}, "hf-modelopt", True),  # qkv_proj
    ("tiny-deepseek-v3", {"format": "fp8", "rules": (("self_attn.kv_b_proj", "int4-awq"),)}, "hf-modelopt", True),
    ("tiny-mixtral", {"format": "w4a8-awq", "rules": (("self_attn.*", "fp8"),)}, "hf-modelopt", True),
]


def _id(m, o, e):
    kv = ["kv"] if "kv_cache" in o else []
    return "-".join([m, o["format"], *(f"{p}={f}" for p, f in o.get("rules", ())), *kv, e])


@pytest.mark.parametrize("model,opts,exporter,fails", CASES, ids=[_id(m, o, e) for m, o, e, _ in CASES])
def test_export_says_sglang_misloads_it_exactly_where_the_independent_checker_finds_it(tmp_path, model, opts,
                                                                                      exporter, fails):
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path(model), q, QuantConfig(num_samples=2, seq_len=32, **opts))
    export(q, e, ExportConfig(format=exporter))
    found = [(lvl, msg) for lvl, msg in _checker().check(e) if lvl in ("FAIL", "WRONG")]
    assert bool(found) == fails, found
    info = json.loads((e / "export.json").read_text())
    assert ("sglang" in (info.get("misloaded_by") or {})) == fails, info.get("misloaded_by")
    hq = e / "hf_quant_config.json"
    layers = (json.loads(hq.read_text())["quantization"].get("quantized_layers") if hq.is_file() else None) or {}
    algos = {v["quant_algo"].upper() for v in layers.values()}
    if algos & {"NVFP4", "W4A16_NVFP4"}:  # modelopt_mixed: the entries it does not quantize are named
        why = info["misloaded_why"].get("sglang", "")
        assert all(a in why for a in algos - cn.SGLANG_MIXED), (algos, why)
    if fails:
        assert any(n.startswith("SGLang <= 0.5.23") for n in info["consumer_notes"]), info["consumer_notes"]

"""hf-modelopt and hf-fp8-block exports against tools/sglang_check.py, an independent re-implementation (no
moepress import) of SGLang 0.5.23's Model-Optimizer / block-FP8 loading rules (names, shapes, dtypes, exclusions,
fused scalars, KV-scale lookups; each rule cites its source line). An export the checker finds SGLang failing on or
misreading (FAIL / WRONG) must say so in export.json (``misloaded_by: {sglang: ...}``); one it passes must not."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sglang_check.py"


def _checker():
    spec = importlib.util.spec_from_file_location("sglang_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASES = [  # model, quantize options, exporter, whether SGLang 0.5.23 fails on / misreads it
    ("tiny-deepseek-v3", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", False),  # MLA KV scales left out
    ("tiny-deepseek-v3", {"format": "nvfp4"}, "hf-modelopt", True),  # packed FP4 kv_b_proj
    ("tiny-deepseek-v3", {"format": "nvfp4", "rules": (("self_attn.kv_b_proj", "none"),)}, "hf-modelopt", False),
    ("tiny-mixtral", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", True),  # qkv_proj.k_scale KeyError
    ("tiny-qwen3-moe", {"format": "fp8", "kv_cache": "fp8"}, "hf-modelopt", False),
    ("tiny-deepseek-v3", {"format": "fp8-block"}, "hf-fp8-block", False),
]


@pytest.mark.parametrize("model,opts,exporter,fails", CASES, ids=[f"{m}-{o['format']}-{len(o)}-{e}"
                                                                  for m, o, e, _ in CASES])
def test_export_says_sglang_misloads_it_exactly_where_the_independent_checker_finds_it(tmp_path, model, opts,
                                                                                      exporter, fails):
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(models.path(model), q, QuantConfig(num_samples=2, seq_len=32, **opts))
    export(q, e, ExportConfig(format=exporter))
    found = [(lvl, msg) for lvl, msg in _checker().check(e) if lvl in ("FAIL", "WRONG")]
    assert bool(found) == fails, found
    info = json.loads((e / "export.json").read_text())
    assert ("sglang" in (info.get("misloaded_by") or {})) == fails, info.get("misloaded_by")

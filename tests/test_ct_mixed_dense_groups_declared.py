"""compressed-tensors export whose dense linears carry two INT4 group sizes (DeepSeek MLA kv_b_proj with
kv_lora_rank 32 < --group-size 64 gets group 32): transformers 5.25 with CompressedTensorsConfig(dequantize=True /
run_compressed=False) decompresses every dense module with one scheme (get_dense_scheme) and from_pretrained raises
("tensor column shape must be divisible by the given group_size 64 but got 32"): export.json's consumer_notes say
so, as exporters/compressed_tensors.py's docstring does."""
from __future__ import annotations

import json
import shutil

from moepress import models
from tests.helpers import make_random_checkpoint


def test_mixed_dense_int4_groups_are_declared_for_transformers_dequantize(cli_run, tmp_path):
    src = make_random_checkpoint("deepseek_v3", tmp_path / "ds", q_lora_rank=None, kv_lora_rank=32, hidden_size=128,
                                 moe_intermediate_size=128, intermediate_size=256,
                                 vocab_size=4096)
    for f in models.path("tiny-deepseek-v3").glob("tokenizer*"):
        shutil.copy(f, src)
    q, e = tmp_path / "q", tmp_path / "e"
    r = cli_run("quantize", src, "--format", "int4-gptq", "--group-size", "64", "--num-samples", "4", "--seq-len", "32",
                "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    r = cli_run("export", q, "--format", "compressed-tensors", "-o", e, "--quiet")
    assert r.exit_code == 0, r.output
    groups = json.loads((e / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len({g["weights"]["group_size"] for g in groups.values()}) > 1  # the case under test
    ex = json.loads((e / "export.json").read_text())
    said = json.dumps(ex.get("consumer_notes", []))
    assert "(dequantize=True) fails on its dense linears' INT4 group sizes [32, 64]" in said, said

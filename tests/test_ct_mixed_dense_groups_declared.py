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


def test_one_block_fp8_attention_beside_per_channel_experts_is_not_declared(tmp_path):
    """Block-FP8 attention whose every linear is one 128x128 block ([1, 1] scale grid) beside per-channel FP8 experts:
    CompressedTensorsConfig(dequantize=True) decompresses the attention with the experts' per-channel scheme, and a
    [1, 1] scale broadcasts alike, so transformers loads it right; the export said that load fails (a review's find).
    The load, in a process that never imports moepress, is the evidence."""
    import os
    import sys

    import torch

    import forkserver
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.exporters import ExportConfig, export
    from tests.helpers import CT_LOADER

    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", hidden_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, head_dim=32, moe_intermediate_size=128,
                                 intermediate_size=256)
    q, e = tmp_path / "q", tmp_path / "e"
    quantize_checkpoint(src, q, QuantConfig(format="fp8-dynamic", rules=(("self_attn.*", "fp8-block"),)))
    info = export(q, e, ExportConfig(format="compressed-tensors"))
    assert not [n for n in info["consumer_notes"] if "dequantize=True" in n], info["consumer_notes"]
    torch.save(torch.randint(1, 256, (1, 8)), tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = forkserver.run([sys.executable, "-c", CT_LOADER, str(e), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]

"""DeepSeek-V2-Lite-style MLA (q_lora_rank null: q_proj, no q_a_proj). The TensorRT-LLM misload hint for a quantize
whose hf-modelopt export a trtllm-pytorch build would refuse must name only --rule patterns that match a linear of
the model: on such a model `moepress run` (and quantize's note / plan) named `self_attn.q_a_proj: none`, and the same
run then refused that rule ("quantize.rules self_attn.q_a_proj=none: matches no linear")."""
from __future__ import annotations

import re
import shutil

import pytest

from moepress import models
from tests.helpers import make_random_checkpoint


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    src = make_random_checkpoint("deepseek_v3", tmp_path_factory.mktemp("lite") / "dsv2-lite", q_lora_rank=None,
                                 vocab_size=4096)
    for f in models.path("tiny-deepseek-v3").glob("tokenizer*"):
        shutil.copy(f, src)
    return src


def test_quantize_hint_names_only_existing_mla_projections(cli_run, tmp_path, lite):
    r = cli_run("quantize", lite, "--format", "fp8", "--num-samples", "4", "--seq-len", "32", "-o", tmp_path / "q",
                "--json")
    assert r.exit_code == 0, r.output
    rules = re.findall(r"--rule '([^']+)'", r.stderr)
    assert rules, r.stderr  # the kv_b_proj hint is there
    assert "self_attn.q_a_proj=none" not in rules, r.stderr


def test_run_accepts_the_rules_its_own_refusal_names(cli_run, tmp_path, lite):
    def recipe(rules: str) -> str:
        p = tmp_path / f"r{len(rules)}.yaml"
        p.write_text(f"model: {lite}\noutput: {tmp_path / 'out'}\ncalib: {{num_samples: 4, seq_len: 32}}\n"
                     f"quantize: {{format: fp8, rules: {rules}}}\nexport: {{formats: [hf-modelopt]}}\n"
                     "build: {targets: [h100-sxm], dry_run: true}\n")
        return str(p)
    r = cli_run("run", recipe("{}"))
    assert r.exit_code == 2 and "quantize.rules" in r.output, r.output
    named = re.search(r"expected quantize\.rules (\{[^}]*\})", r.output).group(1)
    r2 = cli_run("run", recipe(named))
    assert "matches no linear" not in r2.output, r2.output

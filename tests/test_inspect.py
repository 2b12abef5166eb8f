"""`moepress inspect` (issue #2 acceptance: Kimi K2 from its published config alone)."""

import json
import shutil
from pathlib import Path

from moepress.compress.inspect import summarize

KIMI = Path(__file__).parent / "data" / "kimi-k2-config.json"


def kimi_dir(tmp_path):
    d = tmp_path / "kimi-k2"
    d.mkdir()
    shutil.copy(KIMI, d / "config.json")
    return d


def test_kimi_k2_config_only_counts(tmp_path):
    s = summarize(str(kimi_dir(tmp_path)))
    assert s["family"] == "deepseek_v3" and s["model_type"] == "kimi_k2"
    assert s["layers"]["total"] == 61 and s["layers"]["dense"] == [0] and len(s["layers"]["moe"]) == 60
    assert s["experts"] == {"routed": 384, "config_key": "n_routed_experts", "shared": 1, "top_k": 8,
                            "moe_intermediate_size": 2048}
    assert s["routing"]["scoring"] == "sigmoid" and s["routing"]["correction_bias"]
    # Published: 1T total, 32B activated. Counted with embeddings and head: ~1.03T / ~33B.
    assert 1.02e12 <= s["params"]["total"] <= 1.04e12, s["params"]
    assert 32.5e9 <= s["params"]["active"] <= 33.5e9, s["params"]
    assert not s["has_weights"] and s["storage"] == "fp8-block"


def test_inspect_cli_json_and_text(tmp_path, cli_run):
    r = cli_run("inspect", kimi_dir(tmp_path), "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["params"]["total"] > 1e12
    r = cli_run("inspect", "tiny-deepseek-v3")
    assert r.exit_code == 0
    assert "sigmoid top-4" in r.stdout and "4 groups (top 2)" in r.stdout and "MoE 1-3; dense 0" in r.stdout

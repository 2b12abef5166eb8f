"""`moepress inspect` (issue #2 acceptance: Kimi K2 from its published config alone)."""

import json
import shutil
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("scale", [1, 64])
def test_inspect_targets_line_says_what_the_table_holds(tmp_path, cli_run, scale):
    """Per target, the line (the text output's) lists the formats with a GPU count, "too big" for exactly those
    no GPU count holds (a format the GPU cannot run is not called too big) and "nothing fits" when no format
    fits. A ~1T-parameter Kimi K2 shape (2 layers of 16 wide experts: a quick plan) fits some targets; 64x
    fits none."""
    cfg = json.loads(KIMI.read_text())
    cfg.update(num_hidden_layers=2, n_routed_experts=16, moe_intermediate_size=2048 * 60 * 24 * scale)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli_run("inspect", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    table, lines = s["targets_table"], [ln.strip() for ln in s["targets"].splitlines()]
    for line, (target, row) in zip(lines, table.items(), strict=True):
        runs = ", ".join(f"{f} x{n}" for f, n in row.items() if n)
        too_big = [f for f, n in row.items() if n == 0]
        assert line == f"{target}: {runs or 'nothing fits'}" + (f" (too big: {', '.join(too_big)})" if too_big else "")
    assert any(None in row.values() for row in table.values())  # formats some GPUs cannot run
    assert any(0 in row.values() for row in table.values())
    assert all(not any(row.values()) for row in table.values()) == (scale == 64)

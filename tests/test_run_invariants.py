"""`moepress run`'s rerun keys, recipe defaults and card figures, against what the CLI and the files say:
properties no other test pinned (a mutation audit planted each bug and the suite passed)."""

import json
from pathlib import Path

import pytest
import yaml

from moepress.cli import cli
from moepress.pipeline.recipe import load_recipe

CALIB = Path(__file__).resolve().parent.parent / "calib" / "data" / "calib.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))


def _cli_default(command, name):
    return next(p.default for p in cli.commands[command].params if p.name == name)


def _statuses(out):
    return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def _recipe(tmp_path, **sections):
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": "tiny-qwen3-moe", "quantize": {"format": "fp8"}, "check": None,
                                   **sections}))
    return rec


def test_recipe_defaults_are_the_cli_defaults(tmp_path):
    r, _ = load_recipe(_recipe(tmp_path, build={"targets": ["h100"]}))
    for key in ("num_samples", "seq_len", "seed"):
        assert r["calib"][key] == _cli_default("quantize", key) == _cli_default("prune", key), key
    assert r["build"]["max_batch"] == _cli_default("build", "max_batch")
    assert r["build"]["max_seq_len"] == _cli_default("build", "max_seq_len")


def test_an_export_reruns_when_the_checkpoint_it_exports_changes(cli_run, tmp_path):
    out = tmp_path / "run"
    for seed in (0, 1):
        rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64, "seed": seed},
                      export={"formats": ["hf-modelopt"]})
        assert cli_run("run", rec, "-o", out).exit_code == 0
        if seed == 0:
            first = (out / "export" / "hf-modelopt" / "moepress-manifest.json").read_text()
    assert _statuses(out) == {"quantize": "ran", "export:hf-modelopt": "ran"}
    assert (out / "export" / "hf-modelopt" / "moepress-manifest.json").read_text() != first


def test_a_build_reruns_when_its_build_settings_change(cli_run, tmp_path):
    out = tmp_path / "run"
    for max_batch in (8, 16):
        rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64}, export={"formats": ["hf-modelopt"]},
                      build={"targets": ["h100"], "max_batch": max_batch})
        assert cli_run("run", rec, "-o", out).exit_code == 0
    assert _statuses(out) == {"quantize": "skipped", "export:hf-modelopt": "skipped",
                              "build:h100:trtllm-pytorch": "ran"}


def test_quantize_reruns_when_its_calibration_file_is_edited(cli_run, tmp_path):
    text = CALIB.read_text()
    src = tmp_path / "c.txt"
    src.write_text(text[:30000])
    rec = _recipe(tmp_path, calib={"sources": [str(src)], "num_samples": 8, "seq_len": 64})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    src.write_text(text[30000:60000])  # same path, other contents
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert _statuses(out) == {"quantize": "ran"}


def test_card_states_calibration_and_size_and_is_stable_on_rerun(cli_run, tmp_path):
    rec = _recipe(tmp_path, calib={"num_samples": 8, "seq_len": 64, "seed": 3}, export={"formats": ["hf-modelopt"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    d = out / "export" / "hf-modelopt"
    card = (d / "README.md").read_text()
    assert "| calibration | 8 samples x 64 tokens, seed 3, bundled text |" in card
    files = json.loads((d / "moepress-manifest.json").read_text())["files"]
    size = sum((d / f).stat().st_size for f in files if f != "README.md")
    assert f"| size on disk | {size / 1e6:.2f} MB |" in card
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert (d / "README.md").read_text() == card

"""moepress/pipeline/stale.py, as its docstring states it: when a run starts, the stages an earlier run recorded
in D/.state that this recipe cannot produce are removed (not only when the run ends: a run that fails midway
left the earlier D/prune beside a D/quantize it had since replaced); a stage output that is a symbolic link is
removed as the link, never what it points to. The earlier run's layout is written by hand: D/<stage>,
D/export/<format>, and D/.state/<stage>[__<format>].json."""

from __future__ import annotations

import json

from moepress.pipeline.stale import planned, withdraw


def _earlier_run(out, stages: dict[str, str]):
    """An earlier run's outputs: state file name -> output folder relative to ``out``."""
    state = out / ".state"
    state.mkdir(parents=True)
    for name, rel in stages.items():
        (out / rel).mkdir(parents=True)
        (out / rel / "model.safetensors").write_bytes(b"x")
        (state / name).write_text(json.dumps({"key": "k"}))
    return state


def test_a_run_without_prune_removes_the_earlier_prune_when_it_starts(tmp_path):
    out = tmp_path / "run"
    state = _earlier_run(out, {"prune.json": "prune", "quantize.json": "quantize"})
    recipe = {"prune": None, "quantize": {"format": "fp8-block"}, "export": None, "check": None, "build": None}
    gone = withdraw(out, planned(out, recipe, state), state)
    assert gone == ["prune"]
    assert not (out / "prune").exists() and not (state / "prune.json").exists()
    assert (out / "quantize" / "model.safetensors").exists() and (state / "quantize.json").exists()


def test_a_linked_stage_output_is_removed_as_a_link_and_its_target_kept(tmp_path):
    out = tmp_path / "run"
    state = _earlier_run(out, {"quantize.json": "quantize"})
    disk = tmp_path / "other-disk" / "onnx"  # the user moved the big export elsewhere and linked it back
    disk.mkdir(parents=True)
    (disk / "model.onnx").write_bytes(b"weights")
    (out / "export").mkdir()
    (out / "export" / "onnx").symlink_to(disk)
    (state / "export__onnx.json").write_text(json.dumps({"key": "k"}))
    recipe = {"prune": None, "quantize": {"format": "fp8"}, "export": {"formats": ["hf-fp8-block"]}, "check": None,
              "build": None}
    gone = withdraw(out, planned(out, recipe, state), state)
    assert gone == ["export/onnx"]
    assert not (out / "export" / "onnx").is_symlink() and not (out / "export").exists()
    assert (disk / "model.onnx").read_bytes() == b"weights"  # what the link pointed to is the user's


def test_a_removed_stage_takes_its_partial_and_lock_with_it(tmp_path):
    """An earlier run killed while re-exporting onnx left export/onnx.partial/ and its .partial.lock beside
    export/onnx: a recipe without onnx removes all three (a resumable partial of inputs since replaced)."""
    out = tmp_path / "run"
    state = _earlier_run(out, {"quantize.json": "quantize", "export__onnx.json": "export/onnx"})
    (out / "export" / "onnx.partial").mkdir()
    (out / "export" / "onnx.partial" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    (out / "export" / "onnx.partial.lock").write_text("")
    recipe = {"prune": None, "quantize": {"format": "fp8"}, "export": None, "check": None, "build": None}
    assert withdraw(out, planned(out, recipe, state), state) == ["export/onnx"]
    assert not (out / "export").exists()  # onnx, onnx.partial and onnx.partial.lock gone, then the empty export/

"""The model a trtllm-ckpt / onnx export came from is the one its export.json records while that still exists;
--reference is the planning fallback (build --help: "planning source when the export does not name it")."""
from pathlib import Path

from helpers import trtllm_ckpt
from moepress import models


def test_the_recorded_source_is_planned_from_and_reference_is_the_fallback(tmp_path):
    from moepress.exporters.artifacts import source_model

    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    other = models.path("tiny-qwen3-moe")
    assert source_model(ckpt, "trtllm-ckpt", other) == Path(models.path("tiny-mixtral"))
    (ckpt / "export.json").write_text('{"format": "trtllm-ckpt", "source": "' + str(tmp_path / "gone") + '"}')
    assert source_model(ckpt, "trtllm-ckpt", other) == Path(other)


def test_a_reference_of_another_model_is_refused_before_the_build(tmp_path, cli_run):
    """--reference is the engine accuracy check's reference: one of another family was accepted (a dry run never
    used it; a real build found out at the check, after building). Refused in one line naming what differs."""
    from helpers import assert_one_line_error

    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"))
    r = cli_run("build", ckpt, "--target", "h100", "--dry-run", "--reference", "tiny-qwen3-moe", "-o", tmp_path / "b")
    assert_one_line_error(r, "--reference", "model_type 'qwen3_moe'", "model_type 'mixtral'")
    assert not (tmp_path / "b").exists()
    r = cli_run("build", ckpt, "--target", "h100", "--dry-run", "--reference", "tiny-mixtral", "-o", tmp_path / "ok")
    assert r.exit_code == 0, r.output

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

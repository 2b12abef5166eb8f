"""A build section is a stage: a recipe of a model and a build alone is refused for what the build
lacks (an export it can build), not as a recipe with no stage to run."""
from __future__ import annotations

from tests.test_run import one_line_error


def test_a_build_alone_is_refused_for_its_missing_export(cli_run, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\nquantize: null\nbuild:\n  targets: [h100]\n")
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, "build", "has a builder")
    assert "no stage to run" not in r.stderr
    assert not (tmp_path / "run").exists()

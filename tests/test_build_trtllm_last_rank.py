"""A trtllm-ckpt has one rank{N}.safetensors per rank, N = 0..world_size-1 (TensorRT-LLM
docs/source/architecture/checkpoint.md); the last rank's file missing is refused in one line."""
import json

from helpers import trtllm_ckpt
from moepress import models


def test_a_trtllm_ckpt_missing_its_last_rank_is_refused(cli_run, tmp_path):
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), world=2, ep=2)
    assert json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"] == 2
    (ckpt / "rank1.safetensors").unlink()
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "rank1.safetensors is missing" in r.output and len(r.output.strip().splitlines()) == 1, r.output

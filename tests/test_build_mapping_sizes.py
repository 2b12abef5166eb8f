"""TensorRT-LLM's Mapping takes each size as a whole number >= 1 (tensorrt_llm/mapping.py); a hand-edited 0 in a
trtllm-ckpt's mapping is refused in one line naming the field, not a ZeroDivisionError traceback in `build`
(moe_tp_size defaults to tp // (ep x cluster))."""
import json

import pytest

from helpers import trtllm_ckpt
from moepress import models


@pytest.mark.parametrize("key", ["moe_ep_size", "moe_cluster_size"])
def test_a_zero_mapping_size_is_refused_in_one_line(cli_run, tmp_path, key):
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), world=2, ep=2)
    p = ckpt / "config.json"
    cfg = json.loads(p.read_text())
    cfg["mapping"] = {"world_size": 2, "tp_size": 2, "moe_ep_size": 2, key: 0}
    p.write_text(json.dumps(cfg))
    r = cli_run("build", ckpt, "--target", "h100", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert f"mapping.{key} 0: expected a whole number >= 1" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output

"""`moepress formats --json`: the same formats, families and consumers as its text listing, as data a CI script
reads (trtllm-ckpt: Mixtral and Qwen3-MoE only, the families its converter writes; README "Formats")."""

from __future__ import annotations

import json


def test_formats_json_lists_what_the_text_lists(cli_run):
    data = json.loads(cli_run("formats", "--json").output)
    text = cli_run("formats").output.splitlines()
    assert sorted(data) == [line.split()[0] for line in text]
    assert data["trtllm-ckpt"]["families"] == ["mixtral", "qwen3_moe"]
    assert data["onnx"]["families"] is None and "onnxruntime" in data["onnx"]["consumers"]
    for line in text:
        name = line.split()[0]
        assert data[name]["description"] in line and (data[name]["consumers"] or "") in line

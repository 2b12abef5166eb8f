"""An NVFP4 checkpoint in Model-Optimizer's layout without moepress_quant.json (NVIDIA's released NVFP4
checkpoints: weight U8 + weight_scale E4M3 + hf_quant_config.json) handed to an exporter that rewrites weights
tensor by tensor (onnx, trtllm-ckpt) is refused in one line (exit 2) that names the runtimes loading it as stored."""
import pytest

from helpers import assert_one_line_error, cli_quantized
from moepress import models


@pytest.fixture(scope="module")
def nvfp4_without_sidecar(tmp_path_factory):
    q = cli_quantized(tmp_path_factory.mktemp("nvfp4") / "q", str(models.path("tiny-qwen3-moe")),
                      "--format", "nvfp4-a16")
    (q / "moepress_quant.json").unlink()
    return q


@pytest.mark.parametrize("fmt", ["onnx", "trtllm-ckpt"])
def test_nvfp4_without_sidecar_is_refused_in_one_line(nvfp4_without_sidecar, tmp_path, cli_run, fmt):
    r = cli_run("export", nvfp4_without_sidecar, "--format", fmt, "-o", tmp_path / fmt)
    assert_one_line_error(r, "is NVFP4", "no moepress_quant.json", "load it as stored")

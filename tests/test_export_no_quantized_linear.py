"""A quantize output in which no linear was quantized (--format none --kv-cache fp8: moepress_quant.json with an
empty modules map) has no weight quant_algo for hf-modelopt's hf_quant_config.json and no scheme for
compressed-tensors; both exports refuse it in one line (exit 2) and write nothing."""
import json

import pytest

from helpers import assert_one_line_error, cli_quantized


@pytest.fixture(scope="module")
def none_quantized(tmp_path_factory):
    q = cli_quantized(tmp_path_factory.mktemp("none") / "q", "tiny-mixtral", "--format", "none", "--kv-cache", "fp8",
                     "--num-samples", "2", "--seq-len", "32")
    assert json.loads((q / "moepress_quant.json").read_text()).get("modules") in ({}, None)  # the case
    return q


@pytest.mark.parametrize("fmt", ["hf-modelopt", "compressed-tensors"])
def test_a_quantize_output_with_no_quantized_linear_is_refused(none_quantized, cli_run, tmp_path, fmt):
    r = cli_run("export", none_quantized, "--format", fmt, "-o", tmp_path / "e")
    assert_one_line_error(r, "no quantized linear")
    assert not (tmp_path / "e").exists()

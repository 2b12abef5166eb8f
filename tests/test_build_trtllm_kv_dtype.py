"""A TensorRT engine's KV-cache dtype is fixed by the checkpoint's quantization.kv_cache_quant_algo (TensorRT-LLM
docs/source/architecture/checkpoint.md): asking fp8 of a trtllm-ckpt written without an FP8 KV cache is refused in
one line, not planned (and budgeted) as an FP8 cache the engine will not have."""
from helpers import trtllm_ckpt
from moepress import models


def test_fp8_kv_cache_of_a_trtllm_ckpt_without_one_is_refused(cli_run, tmp_path):
    ckpt = trtllm_ckpt(tmp_path / "ckpt", models.path("tiny-mixtral"), kv=None)
    r = cli_run("build", ckpt, "--target", "h100", "--kv-cache-dtype", "fp8", "-o", tmp_path / "x", "--dry-run")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "--kv-cache-dtype fp8" in r.output and len(r.output.strip().splitlines()) == 1, r.output

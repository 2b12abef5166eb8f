"""`torchrun --nproc_per_node 2 moepress quantize` (gloo on CPU) writes the same bytes as one process (issue #10)."""

import hashlib
import os
import subprocess
import sys

import pytest

from moepress import models


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.suffix == ".safetensors" or p.name in ("moepress_quant.json", "hf_quant_config.json", "config.json")}


@pytest.mark.slow
def test_two_rank_gloo_quantize_is_byte_identical_to_one_process(tmp_path):
    # DeepSeek family (sigmoid routing, shared experts) and GPTQ: Hessians, expert routing and AWQ-free
    # INT4 all depend on every rank's calibration tokens
    args = ["quantize", str(models.path("tiny-deepseek-v3")), "--format", "int4-gptq", "--num-samples", "12",
            "--seq-len", "64", "--quiet"]
    # torchrun gives each worker OMP_NUM_THREADS=1; the single-process reference uses one thread too,
    # so every per-batch number is computed by the same kernels
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEPRESS_CACHE": str(tmp_path / "cache")}
    one = subprocess.run([sys.executable, "-m", "moepress", *args, "-o", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "moepress", *args, "-o", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("quantized") == 1  # rank 0 alone reports and writes
    a, b = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert len([n for n in a if n.endswith(".safetensors")]) >= 5
    assert a == b

#!/usr/bin/env bash
# The one script for a lent GPU machine (one H200, 16 cores, 128 GB; device README / H200.md):
# installs moepress over the machine's CUDA torch, runs the `gpu` tests and bench/gpu.py, and leaves
# every result in $OUT (what comes back: at most 8 files, no subfolders needed).
#
#   here:  bash bench/gpu_wheels.sh                      (wheels the machine lacks -> .whl/)
#   there: run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
# Budget: 15 device minutes per session, 10 per command (one shot: the machine's start leaves no time for
# a second): the bench first, with what the tests' 190 s leave (its figures are what no CPU can give),
# then the tests. Everything is also printed (output_tail).
# On a machine without CUDA it stops after the checks in step 1 (exit 3): CI never runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[gpu_run $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }

# 1. environment: the image's python3 (itself a venv) holds the CUDA torch; the wheels it lacks and
#    moepress go into a --target folder ahead of it on PYTHONPATH (a venv on top would lose that torch)
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/moepress-site}
mkdir -p "$SITE"
# the current directory is never on sys.path: from the repo root, `python -m` / `-c` would import the
# source folder moepress/ (without compress/, calib/ ... that pyproject maps into it) ahead of the install
export PYTHONSAFEPATH=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    2>&1 | tee -a "$OUT/pip.log" | grep -v WARNING
fi
# on the path before moepress is built: the carried setuptools (pyproject's license field needs >= 77)
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . 2>&1 \
  | tee -a "$OUT/pip.log" | grep -v WARNING
{ nvidia-smi || true; "$PY" - <<'PY'
import platform, torch
from importlib.metadata import version
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      *(f"{p} {version(p)}" for p in ("transformers", "compressed-tensors", "pydantic", "click", "typing-extensions",
                                     "safetensors", "tokenizers")))
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpus", __import__("os").cpu_count())
PY
} 2>&1 | tee "$OUT/machine.txt"
# without the carried wheels the image's transformers (5.17) is older than moepress's floor: stop here
"$PY" -c "import transformers, sys; sys.exit(0 if tuple(map(int, transformers.__version__.split('.')[:2])) >= (5, 24) else 3)" \
  || { log "transformers older than 5.24: were the wheels carried (carry=[\".whl\"])? stop"; exit 3; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
  || [ -n "${GPU_RUN_ALLOW_CPU:-}" ] || { log "no CUDA: stop"; exit 3; }  # GPU_RUN_ALLOW_CPU=1: try the script here
"$PY" -c "import moepress.cli, moepress.device" || { log "moepress does not import"; exit 3; }
log "environment ready"

# 2. the table: per-layer seconds, host and GPU peaks, CPU vs GPU, projection to Kimi K2 (the tests' 230 s
#    and 30 s of margin kept back); 32 routed experts a layer: in about 5 minutes for six runs, a per-expert
#    time measured on 32 projects to 384 as well as one on 64, and more runs finish
TESTS_S=230
left=$(( 570 - TESTS_S - ($(date +%s) - T0) ))
budget=$(( left > 150 ? left - 30 : 120 ))
log "bench/gpu.py with a ${budget}s budget"
# the checkpoints on the working tree's disk: /tmp may be a tmpfs, whose "raw read" is a memory copy
rm -rf .gpu-work  # what a run killed by its time limit left (gpu.py's own cleanup does not run then)
mkdir -p .gpu-work
timeout $(( budget + 30 )) env PYTHONUNBUFFERED=1 "$PY" bench/gpu.py --budget-s "$budget" --experts 32 --work .gpu-work \
  --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.md"
log "bench: exit ${PIPESTATUS[0]}"
rm -rf .gpu-work

# 3. the gpu-marked tests with their prints, the quickest and most telling first (memory bound and I/O
#    overlap; calibration-free bytes; then calibrated perplexity, which a time limit may cut short); each
#    test has its own limit (pytest-timeout is on the image) so that one slow test cannot take a group's time
per_test=""
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout=45"
gpu_tests() {  # SECONDS KEYWORDS
  # -o addopts: pyproject's `--dist loadfile` needs pytest-xdist, which the image may lack
  timeout "$1" "$PY" -m pytest -o addopts="" -v -m gpu -rs -s -p no:cacheprovider $per_test tests/test_device.py -k "$2" 2>&1 \
    | tee -a "$OUT/gpu-tests.log" \
    | grep -E "PASSED|SKIPPED|FAILED|ERROR|passed|skipped|failed|error|Timeout|idle|GPU peak|held-out" | tail -40
  log "gpu tests ($2): exit ${PIPESTATUS[0]}"
}
# torchrun on the GPU: 2 ranks on cuda:0 (one GPU: gloo, calib/distributed.py), statistics gathered to the
# device (all_gather_saved's map_location) and KV scales reduced there; NCCL needs a GPU a rank
log "torchrun, 2 ranks, --device cuda"
rm -rf /tmp/moepress-torchrun
timeout 40 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m moepress quantize tiny-qwen3-moe \
  --format int4-gptq --kv-cache fp8 --num-samples 16 --seq-len 64 --device cuda -o /tmp/moepress-torchrun --json \
  > "$OUT/torchrun.log" 2>&1
log "torchrun: exit $? ($(tail -c 300 "$OUT/torchrun.log" | tr '\n' ' '))"
gpu_tests 50 "memory_bounded or overlap"
gpu_tests 70 "byte_identical"
gpu_tests 70 "calibrated"
log "done"

#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, fetched HERE (it reaches no registry) into .whl/ for
# bench/gpu_run.sh, which installs them there. Its image (device KINDS.md, 2026-11) has python 3.12,
# torch 2.11 + CUDA 13, transformers 5.17 (moepress needs >= 5.24), no compressed-tensors, loguru or
# pydantic. `.whl/` is git-ignored (.gitignore) and must be named in the run's `carry`.
#
#   bash bench/gpu_wheels.sh            # then: run(command="bash bench/gpu_run.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "transformers==5.24.0" "compressed-tensors==0.20.1" "loguru" "pydantic==2.12.5" \
  "pydantic-core==2.41.5" "annotated-types" "typing-inspection" "typing-extensions>=4.15" "click>=8.4.2" \
  "regex>=2025.10.22" "setuptools>=77"
# regex: transformers 5.24 checks regex >= 2025.10.22 at import (dependency_versions_check), the image's
# version is unknown; typing-extensions: pydantic-core 2.41 / typing-inspection 0.4 need >= 4.15, the image's
# version is unknown; setuptools: builds moepress there (--no-build-isolation; the license field needs 77)
ls -la .whl
du -sh .whl   # the whole working tree that travels must stay under 64 MiB

#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, fetched HERE (it reaches no registry) into .whl/ for
# bench/gpu_run.sh, which installs them there. Its image (device KINDS.md, 2026-11) has python 3.12,
# torch 2.11 + CUDA 13, transformers 5.17 (moepress needs >= 5.24), no compressed-tensors, loguru or
# pydantic. `.whl/` is git-ignored (.gitignore) and must be named in the run's `carry`.
#
#   bash bench/gpu_wheels.sh            # then: run(command="bash bench/gpu_run.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
# made afresh, every version pinned: two versions of one package make pip refuse the whole --no-index set there
rm -rf .whl
mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_34_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "transformers==5.24.0" "compressed-tensors==0.20.1" "loguru==0.7.3" "pydantic==2.12.5" \
  "pydantic-core==2.41.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" "typing-extensions==4.16.0" \
  "click==8.5.1" "regex==2026.11.19" "setuptools==84.2.1"
# regex: transformers 5.24 checks regex >= 2025.10.22 at import (dependency_versions_check), the image's
# version is unknown; typing-extensions: pydantic-core 2.41 / typing-inspection 0.4 need >= 4.15, the image's
# version is unknown; setuptools: builds moepress there (--no-build-isolation; the license field needs 77)
dups=$(ls .whl | sed -E 's/-[0-9][^-]*-.*//' | tr '[:upper:]_' '[:lower:]-' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels: more than one wheel of: $dups" >&2; exit 1; }
ls -la .whl
# what travels: tracked files, untracked files git does not ignore, and the carried .whl (64 MiB in all)
bytes=$( { git ls-files -z; git ls-files -z -o --exclude-standard; find .whl -type f -print0; } \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
echo "gpu_wheels: $(( bytes / 1048576 )) MiB travel (working tree + .whl; limit 64 MiB)"
# the run carries at most 64 MiB; half a MiB kept as margin
[ "$bytes" -le $(( 127 * 524288 )) ] || { echo "gpu_wheels: over 63.5 MiB: remove untracked files first" >&2; exit 1; }

"""Byte-for-byte behaviour record for refactors: the sha256 of every file that `moepress quantize`
(every format, plus --kv-cache fp8 and a --rule mix), `moepress export` (every exporter, from the
original and from every quantized output) and `moepress prune` (every method) write on each
bundled model.

    python bench/golden.py --write bench/golden-hashes.json   # record (before a refactor)
    python bench/golden.py --check bench/golden-hashes.json   # recompute and compare (after)

Outputs go to one directory (--work, default /tmp/moepress-golden), written as WORK in the JSON files before
hashing, so that a record made with one --work checks with another; the bundled models are copied there first
(WORK/_models), so a record made in one checkout checks in another (a clone of the commit before a change).
Keys whose values are wall-clock measurements or version
strings (see VOLATILE) are removed from JSON files before hashing, and moepress-manifest.json's
digests of such files are dropped with them; every other byte counts. An export an exporter
refuses is recorded as its exit code. Calibration is small (8 x 64 tokens) to keep a run near
ten minutes on two cores; the code paths are the defaults'. Record and check on the same machine: the
calibrated stages' float results depend on the CPU's kernels (seen: every calibrated case differed on an
AVX-512-BF16 machine from hashes recorded on another, the calibration-free ones were identical).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

VOLATILE = {"seconds", "elapsed", "elapsed_s", "time_s", "versions", "created", "timestamp", "wall_s", "date",
            "peak_rss_mb", "rss_mb"}
QUANT = ["fp8", "fp8-block", "fp8-dynamic", "int4-awq", "int4-gptq", "w4a8-awq", "nvfp4", "nvfp4-a16", "mxfp4"]
EXPORTERS = ["hf-modelopt", "hf-fp8-block", "compressed-tensors", "trtllm-ckpt", "onnx"]
PRUNE = ["frequency", "ean", "reap", "reroute", "lookahead", "merge", "auto"]
MODELS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"]
CALIB = ["--num-samples", "8", "--seq-len", "64"]


def _strip(obj, work: str = "\0"):
    """``obj`` without VOLATILE keys, the work directory written WORK in its strings, and without the digests of
    JSON files it lists (an export's ``source_sha256``: those files record paths; each is compared in its own case)."""
    if isinstance(obj, dict):
        return {k: _strip(v, work) for k, v in obj.items()
                if k not in VOLATILE and not (k.endswith(".json") and isinstance(v, str) and len(v) == 64)}
    if isinstance(obj, list):
        return [_strip(v, work) for v in obj]
    if isinstance(obj, str):
        return obj.replace(work, "WORK")
    return obj


def digest_dir(d: Path, work: Path) -> dict[str, str]:
    """sha256 per file under ``d`` (relative path -> hex); JSON files without VOLATILE keys, ``work`` as WORK."""
    out, normalised = {}, set()
    for p in sorted(d.rglob("*")):
        if not p.is_file():
            continue
        rel = str(p.relative_to(d))
        data = p.read_bytes()
        if p.suffix == ".json":
            obj = json.loads(data)
            stripped = _strip(obj, str(work))
            if stripped != obj:
                normalised.add(rel)
            data = json.dumps(stripped, sort_keys=True).encode()
        out[rel] = hashlib.sha256(data).hexdigest()
    man = d / "moepress-manifest.json"
    if man.is_file():  # the manifest's own digests of normalised files vary with them
        obj = _strip(json.loads(man.read_text()), str(work))
        for rel in normalised:
            obj.get("files", {}).pop(rel, None)
        out["moepress-manifest.json"] = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return out


def run_cli(*args) -> int:
    from click.testing import CliRunner

    from moepress.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code


def _model_copy(work: Path, name: str) -> Path:
    """The bundled model ``name`` copied to ``WORK/_models/NAME``: stages record their input's path, which
    in the checkout would tie the record to one clone's location."""
    from moepress import models

    dst = work / "_models" / name
    if not dst.is_dir():
        shutil.copytree(models.path(name), dst)
    return dst


def cases(work: Path, models: list[str]):
    """Yield (case name, thunk returning (exit code, output dir))."""
    from moepress.compress.formats import FORMATS

    for name in models:
        m = _model_copy(work, name)
        for fmt in QUANT:
            out = work / name / f"q-{fmt}"
            calib = CALIB if FORMATS[fmt].calibrated else []  # a calibration-free format refuses them
            yield f"{name}/quantize/{fmt}", lambda m=m, fmt=fmt, out=out, calib=calib: (
                run_cli("quantize", m, "--format", fmt, *calib, "-o", out, "--force", "--quiet"), out)
        out = work / name / "q-fp8-kv"
        yield f"{name}/quantize/fp8+kv", lambda m=m, out=out: (
            run_cli("quantize", m, "--format", "fp8", "--kv-cache", "fp8", *CALIB, "-o", out, "--force", "--quiet"),
            out)
        out = work / name / "q-rules"
        yield f"{name}/quantize/rules", lambda m=m, out=out: (
            run_cli("quantize", m, "--format", "fp8", "--rule", "*experts.*=int4-awq", "--rule", "*self_attn.*=none",
                    "--group-size", "64", *CALIB, "-o", out, "--force", "--quiet"), out)
        for src in ["orig", *(f"q-{f}" for f in QUANT)]:
            src_path = m if src == "orig" else work / name / src
            for ex in EXPORTERS:
                out = work / name / f"x-{src}-{ex}"
                yield f"{name}/export/{src}/{ex}", lambda src_path=src_path, ex=ex, out=out: (
                    run_cli("export", src_path, "--format", ex, "-o", out, "--force", "--quiet"), out)
        for meth in PRUNE:
            out = work / name / f"p-{meth}"
            yield f"{name}/prune/{meth}", lambda m=m, meth=meth, out=out: (
                run_cli("prune", m, "--ratio", "0.25", "--method", meth, *CALIB, "-o", out, "--force", "--quiet"),
                out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path)
    g.add_argument("--check", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moepress-golden"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--only", default="", help="comma-separated substrings: run (and compare) just the cases "
                    "whose name holds one, e.g. /prune/ or /quantize/,/export/ (exports need their quantize)")
    a = ap.parse_args()
    a.work = a.work.resolve()  # the form the outputs record
    import torch

    torch.set_num_threads(1)
    if not a.only:
        shutil.rmtree(a.work, ignore_errors=True)
    record, t0 = {}, time.time()
    only = [o for o in a.only.split(",") if o]
    for name, thunk in cases(a.work, a.models.split(",")):
        if only and not any(o in name for o in only):
            continue
        code, out = thunk()
        record[name] = {"exit": code, "files": digest_dir(out, a.work) if code == 0 and out.is_dir() else {}}
        print(f"{time.time() - t0:7.1f}s {name}: exit {code}, {len(record[name]['files'])} files", flush=True)
    if a.write:
        a.write.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {a.write}: {sum(len(r['files']) for r in record.values())} files in {len(record)} cases")
        return 0
    want = json.loads(a.check.read_text())
    if only:
        want = {n: r for n, r in want.items() if any(o in n for o in only)}
    models = set(a.models.split(","))  # a record holds every model's cases; --models checks its own
    want = {n: r for n, r in want.items() if n.split("/")[0] in models}
    bad = [n for n in sorted(set(want) | set(record)) if want.get(n) != record.get(n)]
    for n in bad:
        w, g2 = want.get(n) or {"files": {}}, record.get(n) or {"files": {}}
        diff = sorted(k for k in set(w["files"]) | set(g2["files"]) if w["files"].get(k) != g2["files"].get(k))
        print(f"DIFFERS {n}: exit {w.get('exit')} -> {g2.get('exit')}; files {diff}")
    n_files = sum(len(r["files"]) for r in want.values())
    print(f"{'OK' if not bad else 'FAILED'}: {len(want) - len(bad)}/{len(want)} cases identical, "
          f"{n_files} files compared")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())

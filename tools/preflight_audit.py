"""Late-refusal audit of `moepress run`'s preflight for recipes with no quantize section: for each (source, export),
`moepress export SOURCE --format F` of the model as stored (the oracle, in a subprocess) against the preflight of
``{prune: {ratio: 0.25, method: frequency}, export: {formats: [F]}}``. Prints one line per pair:

- ``LATE``: the export refuses and the preflight passes (the run would refuse after the prune);
- ``EARLY?``: the export takes it and the preflight refuses;
- ``ok``: they agree.

    python tools/preflight_audit.py tiny-qwen3-moe-mxfp4,tiny-kimi-k2-int4,/path/to/quantize-output
    python tools/preflight_audit.py SOURCES --formats onnx,hf-fp8-block

Sources: bundled names or checkpoint directories (e.g. `moepress quantize` outputs). Exit 1 if any pair is LATE or
EARLY?.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from moepress import models
from moepress.errors import MoepressError
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import load_recipe

FORMATS = "hf-modelopt,compressed-tensors,onnx,trtllm-ckpt,hf-fp8-block"


def one(source: str, fmt: str) -> tuple[str, str, str]:
    """(verdict, the export's last line, the preflight's line) for one pair."""
    path = models.resolve(source)
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.run([sys.executable, "-m", "moepress", "export", str(path), "--format", fmt, "-o",
                            f"{d}/e", "--quiet"], capture_output=True, text=True)
        rf = Path(d) / "r.yaml"
        rf.write_text(yaml.safe_dump({"model": str(path), "calib": {"num_samples": 4, "seq_len": 64}, "check": None,
                                      "prune": {"ratio": 0.25, "method": "frequency"}, "export": {"formats": [fmt]}}))
        recipe, src = load_recipe(rf)
        try:
            preflight(recipe, path, src)
            pf = ""
        except MoepressError as e:
            pf = str(e)
    ex = "" if p.returncode == 0 else (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    verdict = "LATE" if ex and not pf else "EARLY?" if pf and not ex else "ok"
    return verdict, ex, pf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", help="comma-separated bundled names or checkpoint directories")
    ap.add_argument("--formats", default=FORMATS)
    args = ap.parse_args()
    bad = 0
    for source in args.sources.split(","):
        for fmt in args.formats.split(","):
            verdict, ex, pf = one(source, fmt)
            bad += verdict != "ok"
            print(f"{verdict:6} {source} {fmt}\n   export: {ex[:200] or 'passes'}\n"
                  f"   preflight: {pf[:200] or 'passes'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""Derive ``models/tiny-qwen3-moe-mxfp4``: ``models/tiny-qwen3-moe`` with its routed experts stored as
compressed-tensors ``mxfp4-pack-quantized``, written by compressed-tensors itself.

MXFP4 (OCP MX v1.0): E2M1 values two per byte (``weight_packed`` U8 [out, in/2], low nibble first)
and one power-of-two E8M0 scale byte per 32 input channels (``weight_scale`` U8 [out, in/32]);
compressed-tensors 0.20.1 preset ``MXFP4A16`` (``quantization/quant_scheme.py``: float, 4 bits,
symmetric, group 32, ``scale_dtype`` uint8), compressor ``MXFP4PackedCompressor``
(``compressors/mxfp4/base.py``), scales from the library's ``calculate_qparams`` (its
``generate_mx_scales``). The newest Kimi releases ship their routed experts this way, with the same
``ignore`` style as Kimi K2 Thinking's INT4; here attention and the routers (``mlp.gate``, a Linear
in Qwen3-MoE) stay bf16, so the fixture covers a second family. Every other tensor is copied
unchanged; deterministic.

    python tools/make_mxfp4.py            # writes models/tiny-qwen3-moe-mxfp4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from make_kimi_int4 import ROOT, write_fixture

IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"]


def mxfp4_scheme():
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("MXFP4A16", ["Linear"])


def main(src: Path, out: Path) -> None:
    readme = (f"# {out.name}\n\n`{src.name}` with its routed experts stored as compressed-tensors "
              "`mxfp4-pack-quantized` (E2M1 pairs in `weight_packed` U8, one E8M0 `weight_scale` byte per 32 "
              "input channels), attention, routers and `lm_head` in bf16. Written by `tools/make_mxfp4.py` "
              "through compressed-tensors' own `calculate_qparams` and `MXFP4PackedCompressor`. A test fixture "
              "for reading MXFP4 inputs; not trained further.\n")
    write_fixture(src, out, mxfp4_scheme(), "mxfp4-pack-quantized", IGNORE, None, readme)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "tiny-qwen3-moe")
    ap.add_argument("--out", type=Path, default=ROOT / "tiny-qwen3-moe-mxfp4")
    a = ap.parse_args()
    main(a.src, a.out)

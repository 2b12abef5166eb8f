"""The quantization format registry: one module per format (``fp8.py``, ``int4_awq.py``, ...), each
declaring a :class:`~moepress.compress.formats.base.Format`; they are assembled here, in the order
the CLI and the GPU catalog list them. Adding a format is one new module plus one line below.

Also here, because they are facts of the stored formats: the checkpoint weight decoders
(:func:`decode`: Model-Optimizer's ``weight`` + ``weight_scale`` layout, and each format's input
decoders such as DeepSeek's ``weight_scale_inv``), and the ``moepress_quant.json`` sidecar that says
which format each quantized module has (:func:`read_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moepress.compress.formats import (
    bf16,
    ct_inputs,
    fp8,
    fp8_block,
    fp8_dynamic,
    gptoss_mxfp4,
    int4_awq,
    int4_gptq,
    mxfp4,
    nvfp4,
    nvfp4_a16,
    w4a8_awq,
)
from moepress.compress.formats.base import Format, QuantContext, Quantized
from moepress.compress.quant.fp8 import FP8_DTYPE
from moepress.compress.quant.fp8 import scale_layout_error as fp8_scale_layout_error
from moepress.errors import MoepressError

FORMATS: dict[str, Format] = {m.FORMAT.name: m.FORMAT for m in (
    bf16, fp8, fp8_block, fp8_dynamic, int4_awq, int4_gptq, w4a8_awq, nvfp4, nvfp4_a16, mxfp4)}

SIDECAR = "moepress_quant.json"


def produced() -> dict[str, Format]:
    """The formats ``moepress quantize`` writes, in registry order."""
    return {n: f for n, f in FORMATS.items() if f.produced}


def get(name: str, option: str = "--format", choices: dict[str, Format] | None = None) -> Format:
    """The format called ``name``; else a one-line error naming ``option`` and the choices."""
    choices = FORMATS if choices is None else choices
    if name not in choices:
        raise MoepressError(f"{option} {name}: expected one of {', '.join(choices)}")
    return choices[name]


def by_quant_algo(algo: str | None) -> Format | None:
    """The format TensorRT-LLM / Model-Optimizer call ``algo``, or one of its aliases, in any case (vLLM
    upper-cases what it reads, TensorRT-LLM canonicalises ``fp8_pb_wo``); None: unquantized, bf16."""
    if algo is None:
        return FORMATS["bf16"] if FORMATS["bf16"].quant_algo is None else None
    for f in FORMATS.values():
        if f.quant_algo is not None and algo.upper() in (f.quant_algo.upper(), *(a.upper() for a in f.aliases)):
            return f
    return None


def read_layout(model_dir: str | Path) -> dict | None:
    """``moepress_quant.json`` of a ``moepress quantize`` output: {"format", "group_size",
    "modules": {prefix: {"format", "group"}}, "shared", ...}; None for any other checkpoint."""
    p = Path(model_dir) / SIDECAR
    if not p.is_file():
        return None
    try:
        layout = json.loads(p.read_text())
    except (OSError, ValueError):
        layout = None
    mods = layout.get("modules", {}) if isinstance(layout, dict) else None
    if not isinstance(mods, dict) or not all(isinstance(m, dict) for m in mods.values()):
        raise MoepressError(f"{p}: unreadable or not the sidecar `moepress quantize` writes (expected a JSON object "
                            "whose modules map each linear to its format)")
    bad = next(((n, m.get("format")) for n, m in mods.items()
                if not isinstance(m.get("format"), str) or m["format"] not in FORMATS), None)
    if bad is not None:
        raise MoepressError(f"{p}: module '{bad[0]}' has format {json.dumps(bad[1])}; expected one of "
                            f"{', '.join(sorted(FORMATS))}")
    return layout


def layout_of(reader) -> dict | None:
    """:func:`read_layout` of a reader's checkpoint, read once per reader."""
    if not hasattr(reader, "_moepress_quant"):
        reader._moepress_quant = read_layout(reader.path)
    return reader._moepress_quant


def _decode_modelopt(reader, base: str, dtype: torch.dtype):
    """Model-Optimizer's layout (``weight`` + ``weight_scale``): the decoder of the format family
    whose stored element type is the weight's (packed uint8 with F32 scales: INT4; with E4M3 scales
    and a ``weight_scale_2``: NVFP4; with E8M0 uint8 scales: MXFP4; E4M3: FP8)."""
    if base + ".weight_scale" not in reader or base + ".weight" not in reader:
        return None
    t = {k: reader.get(f"{base}.{k}") for k in ("weight", "weight_scale", "weight_scale_2") if f"{base}.{k}" in reader}
    q, s = t["weight"], t["weight_scale"]
    fp4 = q.dtype == torch.uint8 and s.dtype in (FP8_DTYPE, torch.uint8)
    element = "fp4" if fp4 else {torch.uint8: "int4", FP8_DTYPE: "fp8"}.get(q.dtype)
    why = fp8_scale_layout_error(tuple(q.shape), tuple(s.shape)) if element == "fp8" else \
        _packed_scale_error(element, tuple(q.shape), tuple(s.shape), s.dtype)
    if why is not None:
        raise MoepressError(f"{reader.path}: tensor '{base}.weight_scale' {why}")
    for f in FORMATS.values():
        if f.element == element and f.decodes and f.weight_scale_dtype in (None, s.dtype):
            return f.dequantize(t, dtype)
    return None


def _packed_scale_error(element: str | None, q: tuple, s: tuple, s_dtype: torch.dtype) -> str | None:
    """Why a packed weight's ``weight_scale`` is not the grid its decoder reads (None if it is): FP4 [out, in / 2]
    bytes take one scale per 16 inputs (NVFP4, E4M3) or 32 (MXFP4, E8M0); Model-Optimizer's INT4 [out / 2, in]
    bytes one per group of the inputs, [out, in / group]. Another shape would fail deep in the decoder, or, where
    it happens to broadcast, decode wrong."""
    if element == "fp4" and len(q) == 2:
        block = 16 if s_dtype == FP8_DTYPE else 32
        want = (q[0], q[1] * 2 // block)
        if s != want:
            return (f"has shape {list(s)}; expected {list(want)} (one scale per {block} inputs) for a packed FP4 "
                    f"weight {list(q)} ({q[1] * 2} inputs)")
    if element == "int4" and len(q) == 2 and not (len(s) == 2 and s[0] == 2 * q[0] and s[1] and q[1] % s[1] == 0):
        return (f"has shape {list(s)}; expected [{2 * q[0]}, {q[1]} / group] for a packed INT4 weight {list(q)} "
                f"({2 * q[0]} rows, {q[1]} inputs)")
    return None


DECODERS = (*ct_inputs.DECODERS, *gptoss_mxfp4.DECODERS, _decode_modelopt,
            *(d for f in FORMATS.values() for d in f.input_decoders))


def decode(reader, base: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The weight of module ``base`` dequantized to ``dtype``, or None if it is stored plainly."""
    for dec in DECODERS:
        out = dec(reader, base, dtype)
        if out is not None:
            return out
    return None


__all__ = ["FORMATS", "SIDECAR", "Format", "QuantContext", "Quantized", "by_quant_algo", "decode", "get",
           "layout_of", "produced", "read_layout"]

"""`moepress quantize`: FP8 / INT4 quantization, streamed one decoder layer at a time.

Output: Model-Optimizer's unified Hugging Face layout (what
``modelopt.torch.export.export_hf_checkpoint`` writes; NVIDIA/Model-Optimizer
``modelopt/torch/export/unified_export_hf.py`` and ``quant_utils.py``): for a quantized linear
``P`` (e.g. ``model.layers.1.mlp.experts.3.gate_proj``) the tensors its format stores (each
format's module in compress/formats/ lists them), and with ``kv_cache`` ``model.layers.N.self_attn.
k_scale`` / ``v_scale`` F32 [] = amax / 448 of the keys / values the attention caches (after k_norm
and RoPE; compress/quant/kv.py says what, per family). Everything else keeps its name and stored
dtype (routers, norms, embeddings, lm_head are never quantized).

INT4 group: ``group_size`` input channels (128 default, 64, 32); a linear with fewer inputs uses
one group per row (e.g. DeepSeek-V3-tiny's expert down_proj with 64 inputs: weight_scale [out, 1],
recorded per module as ``group`` in the sidecar); a linear whose in_features is not a multiple of
the group is left unquantized and listed under ``left_unquantized`` in quant_report.json
(compress/quant/int4.py: effective_group).

Also written: ``config.json`` with ``quantization_config``, ``hf_quant_config.json``, the
sidecar ``moepress_quant.json`` ({"format", "group_size", "modules": {P: {"format", "group"}},
"shared": [[P, ...]], "borrowed": [...]}, what :func:`read_quant_layout` returns) and
quant_report.json (quant_algo, quantized linears, ``experts_with_borrowed_scales``,
``expert_calibration_tokens``, ``left_unquantized``, ``awq_alpha``); see ``report``.

Modules, bottom to top: ``config`` (``QuantConfig``), ``stats`` (input statistics, groups of linears
sharing an input), ``group`` (one group through its format's quantizer; fake quant of a quantized
layer), ``calibrated`` (one layer calibrated and quantized), ``free`` (calibration-free layers),
``report`` (configs, sidecar, report), ``stage`` (``QuantizeStage``, ``quantize_checkpoint``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moepress.calib.config import CalibConfig
from moepress.compress import formats
from moepress.compress.quantize.config import (
    AWQ_SAMPLE_ROWS,
    FORMATS,
    MIN_EXPERT_TOKENS,
    REPORT,
    SHARED_INPUT,
    QuantConfig,
    parse_rules,
)
from moepress.progress import QUIET, Progress

if TYPE_CHECKING:
    import torch

    from moepress.compress.quantize.stage import Batches

# The stage's names, imported on first use: ``config`` (what the exporters, the planner and `moepress formats`
# read) must not pull in the stage's observers, transformers' modeling code and the distributed runtime.
_LAZY = {"quantize_layer": "calibrated", "quantize_tensors": "free", "LayerResult": "group",
         "quantize_group": "group", "Batches": "stage", "QuantizeStage": "stage", "LinearStats": "stats"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SIDECAR = formats.SIDECAR
read_quant_layout = formats.read_layout


def quantize_checkpoint(model: str | Path, out: str | Path, cfg: QuantConfig, *, batches: Batches | None = None,
                        progress: Progress = QUIET, force: bool = False, resume: bool = False,
                        trust_remote_code: bool = False, device: torch.device | None = None,
                        notes: Callable[[], list[str]] | None = None) -> dict:
    """Quantize ``model`` into ``out`` (:func:`stage.quantize_checkpoint`, ``notes`` too); returns the summary.

    ``batches``: calibration token ids [B, S], or a function returning them. Python callers may
    leave them out: a config that needs calibration then gets its own calibration set
    (:class:`~moepress.calib.config.CalibConfig` of ``cfg``'s fields). The CLI and the run pipeline
    hand theirs in; the stage itself never fetches calibration data."""
    if batches is None and cfg.needs_calibration:
        batches = CalibConfig(cfg.calib, cfg.num_samples, cfg.seq_len, cfg.seed, cfg.batch_size,
                              trust_remote_code).loader(model)
    from moepress.compress.quantize import stage

    return stage.quantize_checkpoint(model, out, cfg, batches=batches, progress=progress, force=force,
                                     resume=resume, device=device, notes=notes)


__all__ = [
    "AWQ_SAMPLE_ROWS", "FORMATS", "MIN_EXPERT_TOKENS", "REPORT", "SHARED_INPUT", "SIDECAR", "Batches", "LayerResult",
    "LinearStats", "QuantConfig", "QuantizeStage", "parse_rules", "quantize_checkpoint", "quantize_group",
    "quantize_layer", "quantize_tensors", "read_quant_layout",
]

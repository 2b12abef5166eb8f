"""A checkpoint's own weight format, as the plan and the build size it where no --format is given: what
moepress_quant.json, a block-FP8, compressed-tensors or Model-Optimizer config says, else unquantized."""

from __future__ import annotations

import json
from pathlib import Path

from moepress.compress import formats
from moepress.compress.inspect import storage_format
from moepress.errors import MoepressError
from moepress.exporters.ct_layout import ct_matcher, is_ct
from moepress.exporters.shape import model_shape
from moepress.exporters.targets import UNQUANTIZED


def default_format(model, ct: bool = True) -> str:
    """The checkpoint's own format: moepress_quant.json's, block-FP8 configs, a compressed-tensors config's (its
    routed experts' scheme: exporters/ct_layout.py; ``ct`` False: unquantized, as an onnx export of such a
    checkpoint decodes its packed weights), a Model-Optimizer config's quant_algo, else unquantized; another
    quantization_config is refused (sized as bf16, its plan would be wrong)."""
    if isinstance(model, dict):
        cfg = model
    elif Path(model).is_file():
        cfg = json.loads(Path(model).read_text())
    else:
        p = Path(model)
        layout = formats.read_layout(p)
        if layout and layout.get("format") in formats.FORMATS:
            return layout["format"]
        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    if is_ct(cfg) and not ct:
        return UNQUANTIZED
    if is_ct(cfg):  # a scheme moepress has no format of: refused, naming it (plan it with --format)
        ct_matcher(cfg, str(model) if not isinstance(model, dict) else "<config>")
        return model_shape(model).stored_format or UNQUANTIZED
    s = storage_format(cfg)
    if s in formats.FORMATS or not cfg.get("quantization_config"):
        return s if s in formats.FORMATS else UNQUANTIZED
    qc = cfg["quantization_config"]
    modelopt = qc.get("quant_method") == "modelopt" and qc.get("quant_algo") is not None
    if modelopt and (f := modelopt_format(qc)) is not None:
        return f.name  # a Model-Optimizer checkpoint's config (an hf-modelopt export's, a quantize output's) alone
    where = model if isinstance(model, dict) or Path(model).is_file() else Path(model) / "config.json"
    given = f"quant_algo {qc['quant_algo']}" if modelopt else s
    raise MoepressError(f"{'<config>' if isinstance(model, dict) else where}: quantization_config ({given}) names "
                        f"no weight format moepress sizes (sized as bf16, the plan would be wrong); expected one of "
                        f"{', '.join(formats.FORMATS)} (`moepress plan --format FORMAT` sizes it as one)")


def modelopt_format(q: dict) -> formats.Format | None:
    """The format a Model-Optimizer quantization dict names (hf_quant_config.json's ``quantization``, config.json's
    quantization_config): its quant_algo's, a MIXED_PRECISION one's routed experts' (what TensorRT-LLM's fused MoE
    must load); quant_algo None: bf16; None: no moepress format."""
    algo = q.get("quant_algo")
    if algo == "MIXED_PRECISION":
        algo = experts_algo(q.get("quantized_layers"))
    return formats.by_quant_algo(algo)


def experts_algo(layers) -> str | None:
    """The quant_algo of the routed experts in a MIXED_PRECISION hf_quant_config.json's ``quantized_layers``
    (module name -> {quant_algo, ...}; modelopt quant_utils.py), or None."""
    for name, entry in sorted(layers.items()) if isinstance(layers, dict) else ():
        if ".experts." in name and isinstance(entry, dict):
            return entry.get("quant_algo")
    return None

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
    if qc.get("quant_method") == "modelopt" and (f := formats.by_quant_algo(qc.get("quant_algo"))) is not None:
        return f.name  # a Model-Optimizer checkpoint's config (an hf-modelopt export's, a quantize output's) alone
    where = model if not isinstance(model, dict) else "<config>"  # was planned as bf16 without a word
    raise MoepressError(f"{where}: quantization_config ({s}) names no weight format moepress plans; expected "
                        f"--format FORMAT, the weights' format ({', '.join(formats.FORMATS)})")

"""Activation fake quantization: the forward pre-hook a quantized linear runs on its input, so a
layer of a quantized checkpoint computes what the runtime's quantized GEMM computes (AWQ's
``pre_quant_scale`` multiplication, the static ``input_scale`` of FP8 or NVFP4 (Format.fake_quant_static_input:
compress/quant/fp8.py, compress/quant/nvfp4.py), or the format's dynamic FP8)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moepress.compress.formats import FORMATS, SIDECAR, layout_of
from moepress.errors import MoepressError

# module name in a layer -> (format name, pre_quant_scale, input_scale)
Specs = dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]]


def act_hook(fmt: str, pre_quant_scale: torch.Tensor | None, input_scale: torch.Tensor | None):
    """The forward pre-hook a linear of format ``fmt`` runs on its input."""
    f = FORMATS[fmt]

    def hook(module, args):
        x = args[0]
        if pre_quant_scale is not None:
            x = x * pre_quant_scale.to(x.dtype)
        x = f.fake_quant_static_input(x, input_scale) if input_scale is not None else f.fake_quant_input(x)
        return (x, *args[1:])

    return hook


def attach(layer: nn.Module, specs: Specs) -> None:
    mods = dict(layer.named_modules())
    for name, (fmt, pqs, isc) in specs.items():
        # kept on the module too: the check compares the weight as computed with, knowing how it was rounded
        # (checks/weights.py)
        mods[name].quant_format = fmt
        if pqs is not None:
            mods[name].pre_quant_scale = pqs
        if pqs is None and isc is None and not FORMATS[fmt].dynamic_input:
            continue
        mods[name].register_forward_pre_hook(act_hook(fmt, pqs, isc))


def prepare_layer(reader, prefix: str, layer: nn.Module) -> None:
    """Attach the hooks the checkpoint's ``moepress_quant.json`` calls for to decoder layer
    ``layer`` (its tensors under ``prefix``); nothing for an unquantized checkpoint."""
    lay = layout_of(reader)
    if not lay:
        return
    specs = {}
    for full, m in lay["modules"].items():
        if not full.startswith(prefix):
            continue
        opt = {s: reader.get(full + s).float() if full + s in reader else None
               for s in (".pre_quant_scale", ".input_scale")}
        specs[full[len(prefix):]] = (m["format"], opt[".pre_quant_scale"], opt[".input_scale"])
    mods = dict(layer.named_modules())
    missing = next((n for n in specs if not isinstance(mods.get(n), nn.Linear)), None)
    if missing is not None:
        raise MoepressError(f"{Path(reader.path) / SIDECAR}: module '{prefix}{missing}' is not a linear of the "
                            "model's layer; expected the linears the checkpoint holds")
    for n, (fmt, _, isc) in specs.items():  # without its input_scale it would run weight-only: another model
        if isc is None and FORMATS[fmt].static_input:
            raise MoepressError(f"{Path(reader.path)}: tensor '{prefix}{n}.input_scale' is missing; expected the "
                                f"static input scale {fmt} stores for every linear ({SIDECAR} names it {fmt})")
    attach(layer, specs)

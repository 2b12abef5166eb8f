"""One group of linears that read the same input, quantized by its format's own quantizer
(compress/formats/), and a quantized layer turned into its fake-quant self.

Linears that read the same input (q/k/v; gate/up, fused into one GEMM by TensorRT-LLM,
tensorrt_llm/_torch/modules/fused_moe; Model-Optimizer's ``preprocess_linear_fusion``) share
``input_scale``, the FP8 ``weight_scale``, ``weight_scale_2`` and the AWQ ``pre_quant_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moepress.compress import formats
from moepress.compress.formats.fake_quant import attach as attach_fake_quant
from moepress.compress.quant import fp8, int4
from moepress.compress.quantize.config import QuantConfig
from moepress.compress.quantize.stats import LinearStats
from moepress.compress.stream import StoredLinear
from moepress.errors import MoepressError


@dataclass
class LayerResult:
    """What quantizing one decoder layer produced (names relative to the layer)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)  # linear -> {"format", "group"?} (the sidecar's)
    specs: dict[str, tuple] = field(default_factory=dict)  # linear -> (format, pre_quant_scale, input_scale)
    shared: list[list[str]] = field(default_factory=list)
    borrowed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    awq_alpha: dict[str, float] = field(default_factory=dict)
    expert_tokens: list[int] = field(default_factory=list)  # routed calibration tokens per expert
    expert_evidence: list[dict] = field(default_factory=list)  # per routed expert (calibrated.py _record_evidence)

    def merge(self, sub: LayerResult) -> None:
        """Add a calibration-free group's result (no statistics: nothing borrowed, no AWQ)."""
        self.tensors.update(sub.tensors)
        self.modules.update(sub.modules)
        self.specs.update(sub.specs)
        self.shared.extend(sub.shared)
        self.skipped.extend(sub.skipped)


def quant_context(cfg: QuantConfig, st: LinearStats | None) -> formats.QuantContext:
    """What the format's quantizer is handed for a group with statistics ``st``."""
    return formats.QuantContext(cfg.group_size, st, cfg.gptq_damp, cfg.gptq_act_order,
                                cfg.awq_gptq, cfg.awq_clip, cfg.awq_fold)


def quantize_group(res: LayerResult, cfg: QuantConfig, fmt: str, names: list[str], ws: list[torch.Tensor],
                   st: LinearStats | None, input_amax_override: torch.Tensor | None = None,
                   out: formats.Quantized | None = None, identity_dequantized: bool = False) -> None:
    """Quantize linears ``names`` (they read one input, statistics ``st``) with the format's own
    quantizer (``out``: its result, computed by the caller: compress/quantize/experts.py), add the
    static input scale where the format has one, and record them in ``res``. ``identity_dequantized``:
    a runtime dequantizes these weights through an identity matrix (the adapter's
    ``identity_dequantized``), so a static FP8 per-tensor or NVFP4 input scale is made to quantize 1.0 exactly."""
    f = formats.FORMATS[fmt]
    if out is None:
        out = f.quantize(ws, quant_context(cfg, st))
    if out.skipped is not None:
        res.skipped.extend({"module": n, "reason": out.skipped} for n in names)
        return
    if out.awq_alpha is not None:
        res.awq_alpha[names[0]] = out.awq_alpha
    tensors = dict(zip(names, out.tensors, strict=True))
    pqs = out.pre_quant_scale
    isc = None
    if f.static_input:
        amax = input_amax_override
        if amax is None:
            a = st.amax if st is not None and st.amax is not None else torch.zeros(ws[0].shape[1], device=ws[0].device)
            amax = (a * pqs).amax() if pqs is not None else a.amax()
        isc = f.input_scale(amax).reshape(())
        if identity_dequantized and f.identity_code:
            isc = fp8.identity_exact_input_scale(isc, f.identity_code)
        for n in names:
            tensors[n]["input_scale"] = isc
    for n in names:
        for k, v in tensors[n].items():
            res.tensors[f"{n}.{k}"] = v
        res.modules[n] = {"format": fmt, **({"group": int(ws[0].shape[1] // tensors[n]["weight_scale"].shape[1])}
                                            if out.group is not None else {})}
        res.specs[n] = (fmt, pqs, isc)
    if len(names) > 1:
        res.shared.append(list(names))


class FloatWeights(dict):
    """``weights[name]``: that linear's weight in float32, made when asked and not kept (a
    float32 layer's weight itself; a bf16 :class:`StoredLinear`'s, a transient copy)."""

    # a linear whose weight the layer let go once quantized (compress/quantize/calibrated.py _let_go): name ->
    # its stored weight in float32, read again
    reread: Callable[[str], torch.Tensor] | None = None

    def __init__(self, linears: dict[str, nn.Linear]):
        super().__init__()
        self._linears = linears

    def __missing__(self, name: str) -> torch.Tensor:
        m = self._linears[name]
        if isinstance(m, StoredLinear) and m.kept:  # stored quantized: decoded
            return m.stored_weight(torch.float32)
        if self.reread is not None and m.weight.numel() == 0 and m.in_features and m.out_features:
            return self.reread(name)
        return m.weight.detach().float()

    def get(self, name, default=None):  # noqa: D102  (dict.get skips __missing__)
        return self[name] if name in self._linears else default


def _dequantizer(w: torch.Tensor, s: torch.Tensor, f=None, t: dict | None = None):
    if f is not None and f.element == "fp4":  # NVFP4 (+ weight_scale_2), MXFP4 (E8M0): Format.dequantize
        return lambda: f.dequantize(t)
    if w.dtype == torch.uint8:
        return lambda: int4.dequantize(int4.unpack_int4(w), s)
    return lambda: fp8.dequantize(w, s)


def apply_fake_quant(layer, res: LayerResult) -> None:
    """Turn the layer into its fake-quant self: dequantized weights + activation hooks.

    A float32 linear gets the dequantized weight in place (no second copy of the layer); a
    :class:`StoredLinear` keeps the quantized tensors and dequantizes at each call, and its
    bf16 weight is released (memory goes down, not up, as the layer is quantized)."""
    mods = dict(layer.named_modules())
    for n in res.modules:
        w = res.tensors[f"{n}.weight"]
        s = res.tensors[f"{n}.weight_scale"]
        f = formats.FORMATS[res.modules[n]["format"]]
        t = {k: res.tensors[f"{n}.{k}"] for k in f.stored if f"{n}.{k}" in res.tensors}
        m = mods[n]
        if isinstance(m, StoredLinear):
            m.qweight = _dequantizer(w, s, f, t)
            m.drop_stored()
            continue
        deq = _dequantizer(w, s, f, t)()
        m.weight.data.copy_(deq)  # in place: no second copy of the layer's weights
        del deq
    attach_fake_quant(layer, res.specs)


SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def refuse_non_finite(prefix: str, res: LayerResult, weight: Callable[[str], torch.Tensor] | None = None) -> None:
    """A scale computed from NaN or Inf (a weight holding one, or calibration activations that do) is
    refused, naming the tensor: written, it makes every output of the linear NaN (or the block-max
    rounding of MXFP4's E8M0 NaN, 255). Scales are small, so the check costs nothing beside the work; the
    flags of a layer's scales are read in one host sync per device (not one per tensor: a GPU waits each time).
    ``weight`` (full name -> the stored weight, decoded): where a scale is bad, the layer's weights are searched
    for the NaN first, so that the refusal names the weight holding it rather than a scale it spoiled."""
    flags: dict[str, torch.Tensor] = {}
    for rel, t in res.tensors.items():
        if rel.endswith(".weight"):
            continue
        if t.dtype in SCALE_DTYPES or t.dtype == fp8.FP8_DTYPE:
            flags[rel] = ~torch.isfinite(t.float()).all()  # float8: NVFP4's E4M3 block scales
        elif t.dtype == torch.uint8 and rel.endswith("weight_scale"):
            flags[rel] = (t == 255).any()
    by_device: dict[torch.device, list[str]] = {}
    for rel, f in flags.items():
        by_device.setdefault(f.device, []).append(rel)
    bad = {rel for rels in by_device.values()
           for rel, b in zip(rels, torch.stack([flags[r] for r in rels]).tolist(), strict=True) if b}
    if bad and weight is not None:  # the cause: a weight holding NaN / Inf spoils its shared scale (gate / up)
        for base in res.modules:    # and the activations after it (the input scale of the layer's next linear)
            n = int((~torch.isfinite(weight(prefix + base + ".weight"))).sum())
            if n:
                raise MoepressError(f"{prefix}{base}.weight: {n} values are not finite (NaN or Inf); expected "
                                    "finite weights")
    for rel in flags:
        if rel in bad:
            base, what = rel.rsplit(".", 1)
            src = "the calibration activations into it hold" if "input" in what else "its weight holds"
            raise MoepressError(f"{prefix}{base}.weight: {what} is not finite: {src} NaN or Inf; expected finite "
                                "values")

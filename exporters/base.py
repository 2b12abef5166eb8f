"""What an exporter is and what it is asked to do: :class:`ExportConfig` (one export run) and
:class:`Exporter` (the record each exporter module declares as ``EXPORTER``; assembled in
``exporters/__init__.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moepress.errors import MoepressError


@dataclass(frozen=True)
class ExportConfig:
    format: str
    tp: int = 1  # tensor-parallel size (trtllm-ckpt shards)
    ep: int = 1  # expert-parallel size (trtllm-ckpt: moe_ep_size)
    dtype: str = "bfloat16"  # dtype of unquantized tensors in the output
    opset: int = 21  # onnx
    options: tuple[tuple[str, str], ...] = ()  # exporter-specific KEY=VALUE (--option)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Exporter:
    name: str
    fn: Callable
    description: str
    families: tuple[str, ...] | None = None  # adapter family names; None: every family
    consumers: str = ""  # who loads it (help text)
    options: tuple[str, ...] = ()  # the --option KEYs it reads (any other is refused)
    # what a refused family should use instead (said after the supported families); a function of the
    # source checkpoint where the answer depends on how it is quantized
    other_families: str | Callable[[object], str] = ""
    sharded: bool = False  # writes one part per rank of --tp / --ep (any other exporter refuses them)

    def refuse_family(self, family: str, src, where: str = "") -> None:
        """One line if it writes no ``family`` model (``where``: the option that asked, default --format)."""
        if self.families is not None and family not in self.families:
            other = self.other_families(src) if callable(self.other_families) else self.other_families
            raise MoepressError(f"{where or '--format ' + self.name}: not available for {family} models ({src}); "
                                f"it supports {', '.join(self.families)}" + (f"; {other}" if other else ""))


def _alike_group(s, modules: dict) -> int | None:
    """The --group-size that quantizes every layer's routed experts alike (the largest that divides all their
    in_features, as fused_moe.refuse_unlike / refuse_mixed suggest), when some layer's experts got different
    groups or some were left bf16 because no group divided them; else None."""
    from moepress.compress.quantize.config import GROUP_SIZES
    from moepress.exporters.fused_moe import routed_linears

    layers = routed_linears(s).values()
    groups = {modules[n].get("group") for ns in layers for n in ns if n in modules} - {None}
    unlike = any(len({modules[n].get("group") for n in ns if n in modules}) > 1 for ns in layers)
    left = any(n not in modules for ns in layers for n in ns) and any(n in modules for ns in layers for n in ns)
    if not groups or not (unlike or left):
        return None
    widths = {s.reader.info(n + ".weight").shape[1] for ns in layers for n in ns}
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]
    return max(fits) if fits and max(fits) < max(groups) else None


def int4_routes(s, refusing: str) -> str:
    """Where an INT4-quantized source can go instead of ``refusing``, as one clause ("quantize with --awq-fold,
    then export compressed-tensors (...), or export onnx (...)"), built from what each exporter takes (so that no hint
    names an export that refuses the same source): onnx every INT4 format; hf-modelopt routed experts whose
    format a runtime loads from a Model-Optimizer checkpoint (hf_modelopt.refuse_unloadable_experts); a
    compressed-tensors form for int4-gptq and folded int4-awq only (compressed_tensors._schemes); both
    need a layer's experts quantized alike (fused_moe.refuse_unlike). Empty when the source is not INT4."""
    from moepress.compress import formats
    from moepress.exporters.fused_moe import routed_linears

    modules = (s.layout or {}).get("modules") or {}
    fs = [formats.FORMATS[f] for f in sorted({m["format"] for m in modules.values()}) if f in formats.FORMATS]
    if not fs or any(f.element != "int4" for f in fs):
        return ""
    routed = {modules[n]["format"] for ns in routed_linears(s).values() for n in ns if n in modules}
    group = _alike_group(s, modules)
    regroup = f" --group-size {group}" if group else ""
    if any(f.ct_format is None for f in fs):  # w4a8-awq: no form, folded or not
        ct = f"re-quantize with --format int4-gptq (or int4-awq --awq-fold){regroup}, then "
    elif any(f.awq for f in fs) and not s.layout.get("awq_fold"):
        ct = f"quantize with --awq-fold{regroup}, then "
    else:
        ct = f"quantize with{regroup}, then " if group else ""
    ways = [f"{ct}export compressed-tensors (vLLM, SGLang, transformers)"]
    if all(formats.FORMATS[f].trtllm_loads_experts(s.adapter.family) for f in routed):
        ways.append(f"{f'quantize with{regroup}, then ' if group else ''}export hf-modelopt "
                    "(TensorRT-LLM's PyTorch backend)")
    ways.append("export onnx (a TensorRT engine)")
    ways = [w for w in ways if not w.startswith(f"export {refusing}")]
    return ", or ".join(ways)

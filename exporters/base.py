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
    dtype: str | None = None  # dtype of unquantized tensors in the output (None: :meth:`float_dtype`)
    opset: int = 21  # onnx
    options: tuple[tuple[str, str], ...] = ()  # exporter-specific KEY=VALUE (--option)

    def float_dtype(self, reader, adapter) -> str:
        """The dtype of the unquantized tensors written: ``dtype`` where set, else the source's as its embedding is
        stored (never quantized), so that a float16 model keeps its mantissa; bfloat16 for a float32 (or other)
        one, as it is deployed (TensorRT-LLM's FP8 / INT4 GEMMs take 16-bit activations)."""
        return self.dtype or {"F16": "float16"}.get(reader.info(adapter.embed_name).dtype, "bfloat16")

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
    # its own checks of an ExportConfig that need no input (onnx: --opset), run before anything is read
    check_config: Callable[[ExportConfig], None] | None = None
    # the quantize formats (compress.formats.Format) whose checkpoints it writes, where one format alone decides
    # (a recipe's quantize.format without rules: refused before any stage; the exporter reads the checkpoint)
    writes_format: Callable[[object], bool] | None = None
    # its refusals of the source model's config.json that no prune or quantize changes (onnx: the activation),
    # called as (src, adapter, reader) by the export and by run's preflight, before any stage (which also passes
    # ``instead``: what its refusal names to do, for a recipe whose quantize changes what other exports take)
    refuse_source: Callable[..., None] | None = None
    # its refusals of the checkpoint's stored form (the formats its tensors are stored in, moepress_quant.json's
    # layout), called as (src,) by the export before it writes and by run's preflight on the recipe's model where
    # no quantize section changes that form (a prune keeps the stored bytes of what it keeps)
    refuse_input: Callable[[object], None] | None = None
    # exports only a moepress quantize output: the formats a refusal of a bf16 source may name, in order
    # (hints.quantize_first keeps those whose plain quantize it takes)
    quantized_only: tuple[str, ...] = ()

    def refuse_family(self, family: str, src, where: str = "", other: str | None = None) -> None:
        """One line if it writes no ``family`` model (``where``: the option that asked, default --format; ``other``:
        what to do instead, default ``other_families``)."""
        if self.families is not None and family not in self.families:
            if other is None:
                other = self.other_families(src) if callable(self.other_families) else self.other_families
            raise MoepressError(f"{where or '--format ' + self.name}: not available for {family} models ({src}); "
                                f"it supports {', '.join(self.families)}" + (f"; {other}" if other else ""))

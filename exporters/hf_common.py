"""Shared helpers of the Hugging Face checkpoint exporters (hf-modelopt, hf-fp8-block,
compressed-tensors): the source's quantization layout, the layer-by-layer order of its tensors,
which linears stay unquantized, and the output config.json.

Everything here reads through :class:`CheckpointReader` one tensor at a time; exporters write
one decoder layer per shard (``writer.end_shard()`` at each layer boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.compress import formats
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import DTYPE_NAMES, CheckpointReader
from moepress.errors import MoepressError
from moepress.exporters.ct_layout import is_ct
from moepress.exporters.kernel_widths import TRTLLM_FUSED, block_ok, fused_block_ok
from moepress.exporters.shape import model_shape

QUANT_FILES = ("hf_quant_config.json", "moepress_quant.json", "quant_report.json")


# safetensors codes of the high-precision float dtypes -> torch dtype (a linear kept unquantized is read as one)
FLOAT_DTYPES = {code: t for t, code in DTYPE_NAMES.items() if t in (torch.bfloat16, torch.float16, torch.float32)}


def block_linear_ok(reader, adapter, base: str) -> bool:
    """:func:`fused_block_ok` for the stored linear ``base`` (``...experts.3.w1``): its stored shape and its
    fused group's, and whether it is a routed expert."""
    return fused_block_ok(reader, lambda b: tuple(reader.info(b + ".weight").shape), base,
                          adapter.expert_index(base) is not None)


@dataclass
class Source:
    path: Path
    reader: CheckpointReader
    adapter: object
    layout: dict | None  # moepress_quant.json (None: not a `moepress quantize` output)

    @property
    def formats(self) -> set[str]:
        return {m["format"] for m in (self.layout or {}).get("modules", {}).values()}

    @property
    def block_fp8(self) -> bool:
        """A DeepSeek/Kimi native block-FP8 checkpoint (``weight_scale_inv``)."""
        return any(n.endswith(".weight_scale_inv") for n in self.reader.names())


def decoder_linears(reader: CheckpointReader, adapter) -> list[str]:
    """Every decoder-layer linear but the routers (what a plain ``quantize --format F`` gives F), from the headers,
    by prefix (``...experts.3.w1``)."""
    routers = tuple(adapter.router_prefix(i) for i in range(adapter.num_layers))
    return [n[: -len(".weight")] for i in range(adapter.num_layers) for n in reader.layer_names(i)
            if n.endswith(".weight") and len(reader.info(n).shape) == 2 and not n.startswith(routers)]


def open_source(src: Path) -> Source:
    reader = CheckpointReader(src)
    if not reader.has_weights:
        raise MoepressError(f"{src}: checkpoint has no weights (only config.json)")
    layout = formats.read_layout(src)
    missing = next((n for n in (layout or {}).get("modules") or {} if n + ".weight" not in reader), None)
    if missing is not None:  # a module the exports would declare quantized with no weight behind it
        raise MoepressError(f"{src}/{formats.SIDECAR}: module '{missing}' has no tensor '{missing}.weight' in the "
                            "checkpoint; expected the modules `moepress quantize` wrote")
    return Source(Path(src), reader, get_adapter(reader.config), layout)


def fp8_block_grids(s: Source) -> bool:
    """Whether hf-fp8-block finds a linear to write in block FP8: one every runtime computes as stored
    (:func:`block_ok`); it refuses a checkpoint with none (e.g. hidden 200), keeping the rest bf16. A
    quantize output: its block-FP8 modules; else :func:`any_block_grid`."""
    if s.layout is None:
        return any_block_grid(s.path)
    names = [n for n, m in (s.layout.get("modules") or {}).items() if formats.FORMATS[m["format"]].scale == "block"]
    return any(block_linear_ok(s.reader, s.adapter, n) for n in names)


def any_block_grid(model) -> bool:
    """Whether some decoder linear of ``model`` (as its config builds it, stored quantized or not) is one
    every runtime computes as stored in 128x128 block FP8 (:func:`block_ok`)."""
    return any(block_ok((o, i), k == "routed") for k, o, i, _ in model_shape(model).linears)


def require_layout(s: Source, fmt: str, hint: Callable[[], str]) -> dict:
    """The source's moepress quantize layout; else a one-line error naming what to run first (``hint()``: the
    formats, hints.quantize_first)."""
    if s.layout is None and is_ct(s.reader.config):
        # Kimi K2 Thinking's INT4 experts, or what prune keeps of them: quantizing again rounds them a second time
        same = fmt == "compressed-tensors"
        raise MoepressError(f"--format {fmt}: {s.path} is a compressed-tensors checkpoint already (config.json "
                            "quantization_config); vLLM loads it as it is"
                            + ("" if same else f"; for {fmt}, `moepress quantize --format {hint()}` of it rounds its "
                               "quantized weights a second time"))
    if s.layout is None:
        raise MoepressError(f"--format {fmt} needs a quantized checkpoint: {s.path} has no moepress_quant.json "
                            f"(run moepress quantize --format {hint()} first)")
    if not s.layout.get("modules"):
        skipped = s.layout.get("skipped") or []
        why = (f"e.g. {skipped[0]['module']}: {skipped[0]['reason']}" if skipped else "quantized with --format none"
               if s.layout.get("format") == "none" else "--rule left every linear out")
        kv = ("; its KV-cache scales alone are not exported (hf-modelopt needs a weight quant_algo, compressed-tensors "
              "carries no KV-cache scales)") if s.layout.get("kv_cache") else ""
        raise MoepressError(f"--format {fmt}: {s.path} has no quantized linear (moepress_quant.json lists no module; "
                            f"{why}){kv}; expected at least one: quantize with --format fp8, then "
                            f"export {fmt}")
    return s.layout


def tensor_groups(s: Source) -> Iterator[tuple[str, int | None, list[str]]]:
    """("embed", None, names), ("layer", i, names) for every decoder layer, ("tail", None, names):
    every stored tensor exactly once, in the order a streamed export writes them."""
    r, a = s.reader, s.adapter
    in_layers = set()
    for i in range(a.num_layers):
        in_layers.update(r.layer_names(i))
    rest = [n for n in r.names() if n not in in_layers]
    head = [n for n in rest if n in (a.norm_name, a.head_name)]
    yield "embed", None, sorted(n for n in rest if n not in head)
    for i in range(a.num_layers):
        yield "layer", i, sorted(r.layer_names(i))
    yield "tail", None, sorted(head)


def unquantized_modules(s: Source, quantized: set[str]) -> list[str]:
    """Modules with a 2-D ``weight`` left in high precision (embeddings, routers, lm_head and any
    linear the recipe skipped), by full name — what modelopt lists in ``exclude_modules``
    (modelopt/torch/export/quant_utils.py: get_quant_config, routers recorded explicitly) and
    compressed-tensors in ``ignore``."""
    out = []
    for n in s.reader.names():
        if not n.endswith(".weight") or len(s.reader.info(n).shape) != 2:
            continue
        base = n[: -len(".weight")]
        if base not in quantized:
            out.append(base)
    head = s.adapter.head_name
    if head not in s.reader and head.endswith(".weight"):
        # tied embeddings store no lm_head.weight, yet the consumer builds lm_head as an nn.Linear that a
        # "Linear" target quantizes unless named (transformers + compressed-tensors 0.20: it then expects
        # a weight_scale and gives NaN logits; vLLM quantizes ParallelLMHead as a linear too)
        out.append(head[: -len(".weight")])
    out += [n for i in range(s.adapter.num_layers) for n in s.adapter.zero_width_linears(i) if n not in out]
    return sorted(out)


def fused_parts(s: Source, linears) -> dict[tuple[str, str], list[str]]:
    """The linears (base names) that the runtimes fuse into one (``TRTLLM_FUSED``), grouped by (parent, fused
    name); routed experts, which one fused MoE module holds, are left out."""
    fused_of = {p: fused for fused, parts in TRTLLM_FUSED.items() for p in parts}
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(linears):
        parent, _, leaf = name.rpartition(".")
        if leaf in fused_of and s.adapter.expert_index(name + ".") is None:
            groups.setdefault((parent, fused_of[leaf]), []).append(name)
    return groups


def fused_unquantized(s: Source, exclude: list[str], quantized: set[str]) -> list[str]:
    """The fused linears whose every stored part is left high precision (``exclude``), by the fused
    name: listed only by their parts, a runtime that fuses them would build them quantized."""
    excluded = set(exclude)
    return sorted(f"{parent}.{fused}" for (parent, fused), parts in fused_parts(s, excluded | quantized).items()
                  if all(p in excluded for p in parts))


def output_config(s: Source, quantization_config: dict | None) -> dict:
    """config.json of the export: the source's, with our ``quantization_config`` (or none)."""
    conf = dict(s.reader.config)
    conf.pop("quantization_config", None)
    conf.setdefault("architectures", [type(s.adapter).architectures[0]] if getattr(
        type(s.adapter), "architectures", None) else conf.get("architectures"))
    if quantization_config is not None:
        conf["quantization_config"] = quantization_config
    return conf


def linear_of(name: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """"P.weight_scale" -> ("P", "weight_scale") for the given tensor suffixes, else None."""
    for suf in suffixes:
        if name.endswith("." + suf):
            return name[: -len(suf) - 1], suf
    return None

"""`compressed-tensors`: the checkpoint format of vLLM's compressed-tensors loader, llm-compressor
and transformers' CompressedTensors integration (Kimi-K2-Thinking ships this way), written
THROUGH the ``compressed-tensors`` library.

Input: a ``moepress quantize`` output. Per quantized linear the stored (q, scale) is dequantized
and handed to the library's compressor classmethod ``compress(state_dict, scheme)``
(compressed_tensors/compressors/base.py: BaseCompressor.compress works on one module's local
state dict), which re-quantizes with the same scale — bit-identical values — and lays the module
out in the library's format. Which format and scheme each moepress format becomes is the
format's own ``ct_format`` / ``ct_scheme`` (compress/formats/): fp8, fp8-dynamic and fp8-block are
``float-quantized`` with weight strategy tensor / channel / block [128, 128]; int4-gptq is
``pack-quantized`` (int4 symmetric, strategy group: ``weight_packed`` I32 [out, in/8],
``weight_scale`` [out, in/group], ``weight_shape`` [2])
(compressed_tensors/compressors/naive_quantized/base.py, pack_quantized/base.py). AWQ's
``pre_quant_scale`` has no place in a compressed-tensors scheme (llm-compressor folds AWQ
smoothing into the previous norm/linear instead): an int4-awq checkpoint quantized with
``--awq-fold`` (compress/quantize/fold.py, the same folds; sidecar ``awq_fold``) has none and is
pack-quantized like int4-gptq; an unfolded one is refused with a pointer to ``--awq-fold``, and
w4a8-awq always (its static per-tensor FP8 activations have no compressed-tensors scheme vLLM runs).

``config.json: quantization_config`` is what the library writes
(ModelCompressor.update_config: quant_method "compressed-tensors", version, format,
config_groups with targets ["Linear"], ignore, quantization_status "compressed"); ``ignore``
names every high-precision Linear by full name (routers ``mlp.gate``, lm_head, skipped
linears): vLLM and compressed-tensors match ignore entries by exact name or ``re:`` regex.
Experts are stored per expert (``experts.{e}.gate_proj`` ...); transformers 5 merges them into
its fused 3-D expert parameters at load time (transformers/integrations/compressed_tensors.py:
CompressedTensorsDequantize decompresses per-expert tensors before the merge). What a fused MoE
cannot hold is refused with one line (fused_moe.py): a layer whose routed experts are partly
quantized (e.g. INT4 down projections whose in_features no group <= --group-size divides stay bf16:
transformers 5.24 drops them and loads the model silently broken), a layer whose experts are
quantized unlike each other (INT4 down projections narrower than --group-size get a smaller group
than gate / up), high-precision experts in an INT4 checkpoint, and block-FP8 experts whose width is
over 128 and not a multiple of it. Dense linears with different group sizes are written (vLLM
matches a scheme per module); transformers 5.24 loads them by default (each module keeps its scheme),
but with ``CompressedTensorsConfig(dequantize=True)`` runs one scheme over all dense modules
(get_dense_scheme) and fails converting them: there, quantize with a --group-size every width takes.

NVFP4 / NVFP4-A16 / MXFP4 (``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``): our stored bytes already
are the library's (same nibble order, E4M3 / E8M0 scales), so they are renamed, not re-quantized
(Format.ct_tensors: ``weight_packed``, ``weight_scale``, and NVFP4's reciprocal ``weight_global_scale`` /
``input_global_scale``; compress/formats/nvfp4.py). transformers 5.24 loads NVFP4 experts without their
``weight_global_scale`` (its per-expert decompression module holds weight_packed / weight_scale /
weight_shape only: integrations/compressed_tensors.py CompressedTensorsDequantize; upstream
huggingface/transformers#48371, fix proposed in #48372), so an NVFP4 MoE export is for vLLM / SGLang;
transformers loads its dense layers and MXFP4 exports exactly. The export says so (``consumer_notes``).

Streaming: one module's state dict at a time through the compressor, one decoder layer per
shard; the whole model is never built.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import moepress.exporters.ct_ignore as ct_ignore
import moepress.exporters.ct_misloads as ct_misloads
from moepress.compress import formats
from moepress.errors import MoepressError
from moepress.exporters.base import Exporter
from moepress.exporters.fused_moe import (
    FUSES_EXPERTS,
    fused_name,
    refuse_fp4_expert_widths,
    refuse_mixed,
    refuse_partial_blocks,
    refuse_partial_fused_blocks,
    refuse_partial_input_groups,
    refuse_partly_fused,
    refuse_unlike,
    refuse_unpacked_experts,
    routed_linears,
    routed_names,
)
from moepress.exporters.hf_common import (
    TRTLLM_FUSED,
    fused_parts,
    open_source,
    output_config,
    require_layout,
    tensor_groups,
    unquantized_modules,
)
from moepress.exporters.hints import fused_blocks_route, int4_routes, quantize_first

# moepress format -> compressed-tensors format, for the formats that have one (Format.ct_format)
SUPPORTED = {n: f.ct_format for n, f in formats.FORMATS.items() if f.ct_format}
FIRST = ("fp8", "fp8-dynamic", "fp8-block", "int4-gptq")  # what a bf16 source is quantized to first


def layout_schemes(src: Path, s) -> tuple[dict[tuple[str, int | None], object], str]:
    """The compressed-tensors scheme of each (format, group size) the source holds (Format.ct_scheme;
    targets ["Linear"] when there is one, else the module names), and the one CT format they share; refused in one
    line where the layout has no compressed-tensors form (also asked by run's preflight of the layout a recipe's
    quantize rules would write: moepress/pipeline/rule_layouts.py)."""
    require_layout(s, "compressed-tensors", lambda: quantize_first(s, "compressed-tensors", FIRST))
    fmts = s.formats
    # first what has no form at all (w4a8-awq, folded or not), so that the --awq-fold hint below is never a loop
    bad = sorted(fmts - set(SUPPORTED))
    if bad:
        static = any(b in formats.FORMATS and formats.FORMATS[b].awq for b in bad)
        why = " (static FP8 activations: vLLM's compressed-tensors W4A8 takes dynamic per-token ones only)" \
            if static else ""
        ways = int4_routes(s, "compressed-tensors")
        raise MoepressError(f"--format compressed-tensors: {src} is quantized as {', '.join(bad)}, which has no "
                            f"compressed-tensors form{why}; " + (ways if ways else f"expected {', '.join(SUPPORTED)}"))
    awq = sorted(f for f in fmts if f in formats.FORMATS and formats.FORMATS[f].awq)
    if awq and not s.layout.get("awq_fold"):  # compress/quantize/fold.py
        raise MoepressError(f"--format compressed-tensors: {src} is quantized as {', '.join(awq)} with "
                            "pre_quant_scale, which has no compressed-tensors form (AWQ folded into the norms has); "
                            + (int4_routes(s, "compressed-tensors") or "quantize with --awq-fold or int4-gptq"))
    # the routed experts' scheme first: transformers 5.24 merges every layer's experts under the first
    # config group whose targets are not "re:" patterns (integrations/compressed_tensors.py
    # get_experts_scheme), so a DeepSeek dense layer 0 with another INT4 group size failed to load
    routed = routed_names(s)
    kinds: dict[tuple[str, int | None], list[str]] = {}
    for n, m in sorted(s.layout["modules"].items(), key=lambda kv: (kv[0] not in routed, kv[0])):
        kinds.setdefault((m["format"], m.get("group")), []).append(n)
    schemes = {k: formats.FORMATS[k[0]].ct_scheme(k[1], ["Linear"] if len(kinds) == 1 else _vllm_targets(s, names))
               for k, names in kinds.items()}
    ct_formats = {SUPPORTED[f] for f, _ in kinds}
    if len(ct_formats) > 1:
        groups: dict[str, list[str]] = {}
        for f, ct in SUPPORTED.items():
            groups.setdefault(ct, []).append(f)
        one_of = "; ".join(f"{ct} ({', '.join(fs)})" for ct, fs in groups.items())
        raise MoepressError(f"--format compressed-tensors: {src} mixes {', '.join(sorted(fmts))}; expected formats of "
                            f"one compressed-tensors format per checkpoint: {one_of}")
    _refuse_misread_experts(s, schemes)
    refuse_partly_fused(s, "compressed-tensors", s.layout["modules"], "vLLM (which refuses the checkpoint) and SGLang")
    return schemes, next(iter(ct_formats))


# the names vLLM looks a fused MoE layer's scheme up under (compressed_tensors_moe.py
# CompressedTensorsMoEMethod.get_moe_method: layer_name + ".0.gate_proj" / ".0.up_proj" / ".0.down_proj",
# matched against the targets by name; vLLM main 2026-11), whatever the family's checkpoint names
VLLM_MOE_PROBES = (".0.gate_proj", ".0.up_proj", ".0.down_proj")


def _vllm_targets(s, names: list[str]) -> list[str]:
    """A config group's targets when schemes differ (module names, as compressed-tensors matches them), plus,
    for each MoE layer whose routed experts are among them, the names vLLM looks the layer's scheme up under
    where the checkpoint's differ (Mixtral's w1 / w2 / w3): without them vLLM finds no scheme for the layer
    (KeyError, or an unquantized fused MoE). They match no module, which compressed-tensors only warns of."""
    have = set(names)
    # SGLang 0.5.23 looks a fused qkv_proj / gate_up_proj up under its fused name where the model class has no
    # packed_modules_mapping for it (MixtralForCausalLM none, DeepseekV2ForCausalLM only fused_qkv_a_proj_with_mqa:
    # models/deepseek_v2.py:3250-3275) and refuses one no target matches (compressed_tensors/utils.py
    # find_matched_target: "Unable to find matching target"); vLLM matches the name first too (utils.py:105-109)
    fused = [f"{parent}.{f}" for (parent, f), parts in fused_parts(s, have).items()
             if f != "fused_a" and len(parts) == len(TRTLLM_FUSED[f])]
    probes = []
    for i, layer in sorted(routed_linears(s).items()):
        if have.intersection(layer):
            probes += [fused_name(s.adapter, i) + p for p in VLLM_MOE_PROBES]
    return names + [p for p in fused + probes if p not in have]


def _moe_probe_ignores(s, quantized: set[str], ignore: list[str]) -> list[str]:
    """For each MoE layer whose routed experts all stay unquantized, the names vLLM looks the layer up under
    (VLLM_MOE_PROBES) that no ``ignore`` entry matches yet: vLLM decides the fused layer's ignore by them, so a Mixtral
    layer ignored under its w1 / w2 / w3 names got the "Linear" scheme over bf16 weights (unscaled FP8), or no
    scheme at all (KeyError) when schemes differ."""
    out = []
    for i, layer in sorted(routed_linears(s).items()):
        if quantized.intersection(layer):
            continue
        out += [n for n in (fused_name(s.adapter, i) + p for p in VLLM_MOE_PROBES)
                if not any(ct_ignore.matches(e, n) for e in ignore + out)]
    return out


def refuse_partial_fused_parts(s, modules: dict) -> None:
    """One line for block-FP8 parts vLLM fuses that are not whole 128-row blocks (fused_moe.partial_fused_blocks:
    vLLM validate_fp8_block_shape), naming the ways that take them; also asked by ``run``'s preflight."""
    refuse_partial_fused_blocks(s, "compressed-tensors", modules,
                                lambda bad: fused_blocks_route(s, modules, bad, "compressed-tensors"))


def _refuse_misread_experts(s, schemes) -> None:
    """Refuse routed experts that fused-MoE consumers would misread (fused_moe.py): partly quantized
    layers; high-precision experts beside integer weights (transformers decompresses a non-FP8 experts
    scheme's ``weight_packed`` only: CompressedTensorsDequantize.convert); partial block-FP8 grids; FP4
    experts at widths vLLM's FP4 fused-MoE kernels cannot tile."""
    modules = s.layout["modules"]
    refuse_mixed(s, "compressed-tensors", set(modules), FUSES_EXPERTS["compressed-tensors"] + " (transformers drops "
                 "the unquantized ones without an error)")
    refuse_unlike(s, "compressed-tensors", modules, "vLLM refuses a layer whose expert projections differ in scheme "
                  "(compressed_tensors_moe.py: 'All MoE projections need to have same quantization scheme') and "
                  "transformers runs one experts scheme over all of them")
    if any(sch.weights is not None and (sch.weights.type != "float" or sch.weights.num_bits < 8)
           for sch in schemes.values()):  # INT4, and FP4's packed weights alike
        refuse_unpacked_experts(s, "compressed-tensors", set(modules))
    refuse_partial_blocks(s, "compressed-tensors", modules)
    refuse_partial_input_groups(s, "compressed-tensors", modules)
    refuse_partial_fused_parts(s, modules)
    refuse_fp4_expert_widths(s, "compressed-tensors", modules)


def _fused_ignores(s, high: set[str], quantized: set[str], ignore: list[str]) -> list[str]:
    """A fused qkv_proj / gate_up_proj whose parts all stay high precision (``high``), by its fused name where no
    ``ignore`` entry names it: SGLang applies entries naming its parts only through the model class's
    packed_modules_mapping (none for Mixtral's qkv_proj: compressed_tensors/utils.py should_ignore_layer) and would
    build it quantized. Written as a pattern: transformers has no module of that name."""
    out = []
    for (parent, fused), parts in sorted(fused_parts(s, high | quantized).items()):
        name = f"{parent}.{fused}"
        if fused != "fused_a" and all(p in high for p in parts) and not any(ct_ignore.matches(e, name)
                                                                              for e in ignore):
            out.append("re:" + re.escape(name) + "$")
    return out


def _compress_layer(r, modules: dict, prefix: str, compressor, schemes, writer) -> set[str]:
    """The layer's quantized linears through the library's compressor; the source tensors they replace."""
    done: set[str] = set()
    for base, m in modules.items():
        if not base.startswith(prefix):
            continue
        fmt = m["format"]
        f = formats.FORMATS[fmt]
        if f.ct_tensors is not None:  # stored bytes already the library's (NVFP4, MXFP4): renamed, not re-quantized
            stored = {k: r.get(f"{base}.{k}") for k in f.stored if f"{base}.{k}" in r}
            for k, t in sorted(f.ct_tensors(stored).items()):
                writer.add(f"{base}.{k}", t)
            done.update(f"{base}.{k}" for k in stored)
            continue
        # an hf-fp8-block export's block grid is under DeepSeek's name (its moepress_quant.json lists the modules)
        scale = base + (".weight_scale" if base + ".weight_scale" in r else ".weight_scale_inv")
        sd = {"weight": r.weight(base + ".weight", torch.float32), "weight_scale": f.ct_scale(r.get(scale))}
        if base + ".input_scale" in r:
            sd["input_scale"] = r.get(base + ".input_scale").float().reshape(1)
        out = compressor.compress(sd, schemes[(fmt, m.get("group"))])
        for k, t in sorted(out.items()):
            writer.add(f"{base}.{k}", t)
        done.update(f"{base}.{k}" for k in ("weight", "weight_scale", "weight_scale_inv", "input_scale"))
    return done


def export_compressed_tensors(src: Path, writer, cfg, progress) -> dict:
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    s = open_source(src)
    schemes, ct_format = layout_schemes(src, s)
    modules = s.layout["modules"]
    compressor = BaseCompressor.get_value_from_registry(ct_format)
    r, a = s.reader, s.adapter
    dropped: list[str] = []
    with progress.task("export compressed-tensors", a.num_layers + 2) as task:
        for kind, i, names in tensor_groups(s):
            done = _compress_layer(r, modules, a.layer_prefix(i), compressor, schemes, writer) \
                if kind == "layer" else set()
            for n in names:
                if n in done:
                    continue
                if n.endswith((".k_scale", ".v_scale")):  # kv-cache scales: not carried (see report)
                    dropped.append(n)
                    continue
                writer.add(n, r.get(n))
            writer.end_shard()
            task.advance(note=f"layer {i}" if kind == "layer" else kind)
    found = ct_misloads.misloads(s, schemes)
    notes = found["consumer_notes"]
    if dropped:
        notes.append(f"the FP8 KV-cache scales ({len(dropped)} k_scale / v_scale) are not carried: no kv_cache_scheme "
                     "is written, so runtimes keep the KV cache in the model's dtype; hf-modelopt carries them")
    for note in notes:
        progress.info(f"note: {note}")
    ignore = [n for n in unquantized_modules(s, set(modules)) if not n.endswith("embed_tokens")]
    ignore = ct_ignore.condensed(ignore, set(modules))  # Kimi's patterns where they fit (ct_ignore.py)
    ignore += _fused_ignores(s, set(unquantized_modules(s, set(modules))), set(modules), ignore)
    ignore += _moe_probe_ignores(s, set(modules), ignore)
    qc = QuantizationConfig(config_groups={f"group_{k}": sch for k, sch in enumerate(schemes.values())},
                            format=ct_format, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore)
    writer.write_json("config.json", output_config(s, None))
    ModelCompressor(quantization_config=qc).update_config(str(writer.partial))
    writer.copy_aux_files(src)
    return {"ct_format": ct_format, "compressed_tensors_version": ct_version,
            "quantized_linears": len(modules), "ignore": len(ignore), "dropped": dropped, **found}


EXPORTER = Exporter(
    "compressed-tensors", export_compressed_tensors, description="compressed-tensors checkpoint (float-quantized FP8, "
    "pack-quantized INT4, nvfp4- / mxfp4-pack-quantized) written through the compressed-tensors library",
    consumers="vLLM, transformers (CompressedTensors; not NVFP4 experts: transformers#48371, said in export.json), "
              "SGLang", quantized_only=FIRST, refuse_input=lambda src: layout_schemes(src, open_source(src)),
)

"""What fused-MoE consumers can read of a layer's routed experts, and the one-line refusals when an
export would be misread.

Checkpoints store experts per expert (``experts.{e}.w1/w2/w3`` or ``gate_proj/up_proj/down_proj``);
every runtime the Hugging Face exporters target merges them at load time into one fused module per
MoE layer with ONE quantization method for all its expert projections:

- transformers 5 (transformers/integrations/compressed_tensors.py, 5.24:
  CompressedTensorsDequantize.convert; quantizers/base.py: update_weight_conversions) merges
  ``experts.*.w1/w3`` into ``experts.gate_up_proj`` and ``experts.*.w2`` into ``experts.down_proj``
  after running one experts scheme (get_experts_scheme) over the collected tensors; with a
  pack-quantized (INT4) scheme only ``weight_packed`` tensors are decompressed and a plain bf16
  ``weight`` beside them is dropped: the fused parameter stays uninitialised (only a MISSING line in
  the load report says so). Its FineGrainedFP8 path replaces a fused ``experts`` module by
  FP8Experts unless ``modules_to_not_convert`` names that module itself (quantizers_utils.py:
  should_convert_module matches from the start of the module name), so per-expert entries do not
  keep it dense: bf16 weights are cast to FP8 with uninitialised ``*_scale_inv``.
- vLLM / SGLang FusedMoE (one ``quant_method`` per layer; fp8.py Fp8MoEMethod.create_weights raises
  "output_size of gate's and up's weight = 192 is not divisible by weight quantization block_n =
  128" for block-FP8 experts whose width is not a multiple of 128), TensorRT-LLM's fused MoE (one
  ``quant_config`` per MoE module; exclude_modules matched with fnmatch on module names).

So an export must quantize every routed-expert projection of a layer alike, one format and one INT4
group size (vLLM's compressed_tensors_moe.py CompressedTensorsMoEMethod.get_moe_method, 2025 main,
raises "All MoE projections need to have same quantization scheme"), or none; block-FP8 experts
must be whole 128x128 blocks when a dimension is over 128 (gate and up are stacked into one weight
whose 128-row blocks would straddle the two); a layer whose experts all stay high precision is
named as the fused module as well. The dense linears the runtimes fuse (q/k/v, gate/up, DeepSeek's q_a / kv_a)
likewise take one quantization (``refuse_partly_fused``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from moepress.compress import formats
from moepress.compress.quantize.config import GROUP_SIZES
from moepress.errors import MoepressError
from moepress.exporters.hf_common import TRTLLM_FUSED, Source, fp8_block_grids, fused_parts
from moepress.exporters.kernel_widths import TRTLLM_INT4_MOE_GROUP, fp4_widths_ok, grid_ok, marlin_tiles

MODELOPT = "hf-modelopt"  # the export whose runtimes load FP8 experts per tensor only (fp8_formats)
# who fuses a layer's routed experts into one quantized linear, per export (the ``why`` of refuse_mixed and
# refuse_unlike; a recipe's preflight refuses the same before any stage)
FUSES_EXPERTS = {"compressed-tensors": "vLLM and transformers fuse a layer's experts under one scheme",
                 MODELOPT: "TensorRT-LLM and vLLM fuse a layer's experts under one quantization"}


def routed_linears(s: Source) -> dict[int, list[str]]:
    """Routed-expert linears (module names with a 2-D ``weight``) of each MoE layer."""
    out: dict[int, list[str]] = {}
    for n in s.reader.names():
        if n.endswith(".weight") and len(s.reader.info(n).shape) == 2:
            idx = s.adapter.expert_index(n)
            if idx is not None:
                out.setdefault(idx[0], []).append(n[: -len(".weight")])
    return out


def routed_names(s: Source) -> set[str]:
    """Every routed-expert linear of the checkpoint, all layers together."""
    return {n for ns in routed_linears(s).values() for n in ns}


def expert_widths(s: Source, names=None) -> list[int]:
    """The in_features of the routed-expert linears ``names`` (default: all of them), sorted, distinct."""
    names = routed_names(s) if names is None else names
    return sorted({s.reader.info(n + ".weight").shape[1] for n in names})


def common_groups(widths) -> list[int]:
    """The INT4 --group-size values that divide every width (one group for all of a layer's experts)."""
    return [g for g in GROUP_SIZES if all(w % g == 0 for w in widths)]


def fused_name(adapter, layer: int) -> str:
    """The layer's experts as one module (``model.layers.3.block_sparse_moe.experts``)."""
    return adapter.expert_prefix(layer, 0)[: -len(".0.")]


def pattern(names) -> str:
    """Module names with layer and expert indices as ``*``, for a one-line message."""
    return ", ".join(sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names}))


def fp8_formats(s: Source, flag: str) -> str:
    """:func:`expert_fp8_formats` for ``s``'s family."""
    return " or ".join(expert_fp8_formats(s.adapter.family, flag))


def expert_fp8_formats(family: str, flag: str) -> list[str]:
    """The FP8 formats a refusal offers for routed experts (per tensor, per channel: any width quantizes whole),
    those whose experts the ``flag`` export's runtimes load: from a Model-Optimizer checkpoint TensorRT-LLM's
    (Format.trtllm_loads_experts: not fp8-dynamic's), from compressed-tensors every one."""
    return [n for n, f in formats.FORMATS.items() if f.scale in ("tensor", "channel")  # FP8 per tensor / channel
            and (flag != MODELOPT or f.trtllm_loads_experts(family))]


def _reason(s: Source, names: list[str]) -> str:
    """Why the quantize stage left these linears unquantized (moepress_quant.json ``skipped``)."""
    skipped = {d["module"]: d["reason"] for d in (s.layout or {}).get("skipped", [])}
    reasons = sorted({skipped.get(n, "left unquantized by a --rule") for n in names})
    return "; ".join(reasons)


def _hint(s: Source, names: list[str], flag: str, other_formats: bool = True) -> str:
    """What to run instead: for INT4, a --group-size that divides the in_features the quantize stage could
    not group; quantizing the linears a --rule left out; or (``other_formats``: an export that writes
    them) an FP8 format, which takes any width."""
    layout = s.layout or {}
    skipped = {d["module"] for d in layout.get("skipped", [])}
    # one group for every projection of the experts (else they are quantized two ways: refuse_unlike)
    widths = expert_widths(s)
    int4 = any(formats.FORMATS[m["format"]].element == "int4" for m in layout.get("modules", {}).values())
    fits = _loaded_groups(common_groups(widths), flag) if int4 and any(n in skipped for n in names) else []
    if fits:
        return (f"quantize with --group-size {max(fits)} (divides {', '.join(map(str, widths))}), or with an FP8 "
                f"format (--format {fp8_formats(s, flag)})")
    if any(n not in skipped for n in names):
        every = "quantize every expert projection (no --rule leaving some unquantized)"
        return every + f", or with an FP8 format (--format {fp8_formats(s, flag)})" if other_formats else every
    return f"quantize with --format {fp8_formats(s, flag)}"


def refuse_mixed(s: Source, flag: str, quantized: set[str], why: str, other_formats: bool = True) -> None:
    """Refuse a layer whose routed experts are partly quantized: no fused-MoE runtime can hold it.
    ``why``: what this export's consumers would do with it, for the message; ``other_formats``: whether
    the hint may offer per-tensor / per-token FP8 (formats this export writes)."""
    mixed = [n for names in routed_linears(s).values() if any(n in quantized for n in names)
             for n in names if n not in quantized]
    if mixed:
        raise MoepressError(
            f"--format {flag}: {len(mixed)} routed-expert linears stay unquantized beside quantized projections of "
            f"the same experts ({pattern(mixed)}: {_reason(s, mixed)}); {why}: {_hint(s, mixed, flag, other_formats)}")


def refuse_partly_fused(s: Source, flag: str, modules: dict, who: str) -> None:
    """Refuse linears that the runtimes fuse into one (``hf_common.TRTLLM_FUSED``: q/k/v, a dense or shared MLP's
    gate/up, DeepSeek's q_a / kv_a) quantized unlike each other, one left high precision included: a fused linear
    has one quantization. vLLM refuses such a checkpoint at load (compressed_tensors/utils.py
    should_ignore_layer: "Found different quantization schemes for the shards of ..."; modelopt.py likewise for
    exclude_modules), and TensorRT-LLM takes the fused linear's exclusion from its fused name
    (QuantConfig.is_module_excluded_from_quantization), so a part excluded alone is built quantized, without
    scales. ``who``: this export's consumers that fuse them, for the message. Routed experts are checked by
    :func:`refuse_mixed` / :func:`refuse_unlike`."""
    def kind(n: str) -> str:
        m = modules.get(n)
        return "unquantized" if m is None else m["format"] + (f" group {m['group']}" if m.get("group") else "")

    bases = {n[: -len(".weight")] for n in s.reader.names() if n.endswith(".weight")}
    groups = {key: {n: kind(n) for n in parts} for key, parts in fused_parts(s, bases).items()}
    unlike = [(fused, kinds) for (_, fused), kinds in sorted(groups.items()) if len(set(kinds.values())) > 1]
    if unlike:
        fused, kinds = unlike[0]
        by_kind = "; ".join(f"{pattern([n for n in kinds if kinds[n] == k])}: {k}" for k in sorted(set(kinds.values())))
        raise MoepressError(
            f"--format {flag}: {s.path}: {len(unlike)} linears that {who} fuse have parts quantized unlike each "
            f"other ({by_kind}); a fused {fused} has one quantization: quantize {', '.join(TRTLLM_FUSED[fused])} "
            "alike (the same --rule for all of them)")


def fp4_expert_widths_ok(s: Source) -> bool:
    """:func:`kernel_widths.fp4_widths_ok` for ``s``'s routed experts (from the config: the stored FP4 weights
    are packed)."""
    return fp4_widths_ok(s.adapter.hidden_size, s.adapter.moe_intermediate_size())


def refuse_fp4_expert_widths(s: Source, flag: str, modules: dict) -> None:
    """Refuse FP4 routed experts whose widths the FP4 fused-MoE kernels cannot run (:func:`fp4_expert_widths_ok`):
    vLLM loads them, then fails."""
    fp4 = [n for n in routed_names(s) if n in modules and formats.FORMATS[modules[n]["format"]].element == "fp4"]
    if fp4 and not fp4_expert_widths_ok(s):
        h, i = s.adapter.hidden_size, s.adapter.moe_intermediate_size()
        raise MoepressError(
            f"--format {flag}: {modules[fp4[0]]['format']} routed experts of hidden {h} and expert width {i}; "
            "vLLM's FP4 fused-MoE kernels need both multiples of 64 and one of 128 (Marlin's tiles; FlashInfer's "
            f"CUTLASS NVFP4 MoE cannot pad a gated expert): {_fp8_instead(s, flag)}")


def _fp8_instead(s: Source, flag: str) -> str:
    """FP8 for the routed experts: by a --rule where the export holds mixed formats (hf-modelopt), the whole model
    where it holds one (compressed-tensors refuses a checkpoint that mixes FP4 and FP8)."""
    if flag == MODELOPT:
        return f"quantize the experts with --format {fp8_formats(s, flag)}"
    return f"quantize the model with --format {fp8_formats(s, flag)} (this export holds one format)"


def fp4_dense_untiled(s: Source, modules: dict) -> list[str]:
    """The FP4 linears outside the routed experts that vLLM's Marlin cannot tile (:func:`kernel_widths.marlin_tiles`),
    a fused q/k/v or gate/up by its parts' rows together (the stored FP4 weights are packed two to a byte)."""
    routed = routed_names(s)
    fp4 = {n for n, m in modules.items() if n not in routed and formats.FORMATS[m["format"]].element == "fp4"}
    shape = {n: s.reader.info(n + ".weight").shape for n in fp4}
    groups = [parts for parts in fused_parts(s, fp4).values() if len(parts) > 1]
    grouped = {n for parts in groups for n in parts}
    groups += [[n] for n in sorted(fp4 - grouped)]
    return sorted(n for parts in groups if not marlin_tiles(2 * shape[parts[0]][1], sum(shape[p][0] for p in parts))
                  for n in parts)


def marlin_note(s, modules: dict) -> list[str]:
    """A consumer note on the FP4 linears outside the routed experts that vLLM's Marlin cannot tile
    (:func:`fp4_dense_untiled`): vLLM without Marlin's tile padding loads them, then fails at the first forward.
    Since vllm-project/vllm#45295 (merged 2026-06-11: ``marlin_padded_nk`` in model_executor/layers/quantization/
    utils/marlin_utils.py) vLLM zero-pads every dense Marlin linear to a tile, so the note names the releases
    before it."""
    bad = fp4_dense_untiled(s, modules)
    if not bad:
        return []
    return [f"vLLM runs FP4 linears outside the routed experts with Marlin (MXFP4 and NVFP4-A16 always, NVFP4 before "
            f"Blackwell), which tiles in_features x out_features by 128x128, 64x128, 128x64 or 64x256: "
            f"{len(bad)} linears here fit none ({pattern(bad)}); vLLM releases before its Marlin tile padding "
            f"(vllm-project/vllm#45295, June 2026) fail at their first forward, later ones pad them; for those, keep "
            f"them bf16 (--rule PATTERN=none) or quantize them FP8"]


def refuse_unlike(s: Source, flag: str, modules: dict[str, dict], why: str) -> None:
    """Refuse a layer whose quantized routed experts are not quantized alike (format, INT4 group size):
    e.g. --group-size 128 gives down projections with 64 in_features group 64 and gate / up group 128.
    ``why``: what this export's consumers would do with it, for the message."""
    for layer, names in sorted(routed_linears(s).items()):
        kinds: dict[tuple[str, int | None], list[str]] = {}
        for n in names:
            if n in modules:
                kinds.setdefault((modules[n]["format"], modules[n].get("group")), []).append(n)
        if len(kinds) > 1:
            ways = "; ".join(f"{fmt}{f' group {g}' if g else ''}: {pattern(ns)}" for (fmt, g), ns in sorted(
                kinds.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)))
            raise MoepressError(f"--format {flag}: layer {layer}'s routed experts are quantized {len(kinds)} ways "
                                f"({ways}); {why}: {_alike_hint(s, kinds, flag)}")


def refuse_unloaded_expert_groups(s: Source, flag: str, modules: dict[str, dict], why: str) -> None:
    """Refuse INT4 routed experts in a group no runtime loads them in from ``flag``'s export (:func:`_loaded_groups`:
    from hf-modelopt only TensorRT-LLM's fused MoE, in groups of 128); ``why``: what its runtimes do instead."""
    kinds: dict[tuple[str, int | None], list[str]] = {}
    for n in sorted(routed_names(s)):
        m = modules.get(n)
        if m and formats.FORMATS[m["format"]].element == "int4" and m.get("group") \
                and not _loaded_groups([m["group"]], flag):
            kinds.setdefault((m["format"], m["group"]), []).append(n)
    for (fmt, g), names in sorted(kinds.items()):
        raise MoepressError(f"--format {flag}: its routed experts are {fmt} in groups of {g} ({pattern(names)}); "
                            f"{why}: {_alike_hint(s, kinds, flag)}")


def _loaded_groups(groups: list[int], flag: str) -> list[int]:
    """The INT4 groups a runtime loads the routed experts of ``flag``'s export in: from hf-modelopt only
    TensorRT-LLM's, in groups of 128 (:data:`TRTLLM_INT4_MOE_GROUP`); compressed-tensors' kernels any."""
    return [g for g in groups if g == TRTLLM_INT4_MOE_GROUP] if "hf-modelopt" in flag else groups


def _alike_hint(s: Source, kinds: dict[tuple[str, int | None], list[str]], flag: str) -> str:
    """What to run instead: one --group-size that divides every expert projection's in_features (the
    formats agree), else one format for the routed experts, else per-tensor FP8 (takes any width)."""
    if len({fmt for fmt, _ in kinds}) > 1:
        return "quantize a layer's routed experts with one format (one --rule for all of them)"
    widths = expert_widths(s, [n for ns in kinds.values() for n in ns])
    fits = _loaded_groups(common_groups(widths), flag)
    return (f"quantize with --group-size {max(fits)} (divides {', '.join(map(str, widths))})" if fits else
            f"quantize with --format {fp8_formats(s, flag)}")


def refuse_unpacked_experts(s: Source, flag: str, quantized: set[str]) -> None:
    """Refuse routed experts left high precision in a pack-quantized (INT4) compressed-tensors checkpoint:
    transformers drops them (see the module docstring)."""
    plain = [n for names in routed_linears(s).values() for n in names if n not in quantized]
    if plain:
        raise MoepressError(
            f"--format {flag}: {len(plain)} routed-expert linears stay unquantized ({pattern(plain)}: "
            f"{_reason(s, plain)}) in a pack-quantized (INT4 / FP4) checkpoint, whose expert weights transformers "
            f"reads only as packed 4-bit weights: {_hint(s, plain, flag)}")


def refuse_partial_blocks(s: Source, flag: str, modules: dict[str, dict]) -> None:
    """Refuse block-FP8 routed experts whose 128x128 grid has partial blocks past the first."""
    bad = [n for names in routed_linears(s).values() for n in names if n in modules
           and formats.FORMATS[modules[n]["format"]].scale == "block"
           and not grid_ok(s.reader.info(n + ".weight").shape)]
    if bad:
        shapes = ", ".join(sorted({"x".join(map(str, s.reader.info(n + ".weight").shape)) for n in bad}))
        also = ", or export with --format hf-fp8-block (keeps those experts bf16)" if fp8_block_grids(s) else ""
        raise MoepressError(
            f"--format {flag}: block-FP8 routed-expert weights of shape {shapes} are not whole 128x128 blocks "
            f"({pattern(bad)}); a fused MoE stacks gate and up into one weight whose 128-row blocks would straddle "
            "the two (vLLM and SGLang refuse expert widths that are not multiples of 128): quantize with --format "
            f"{fp8_formats(s, flag)}{also}")


def refuse_partial_input_groups(s: Source, flag: str, modules: dict[str, dict]) -> None:
    """Refuse block-FP8 linears whose in_features is not a multiple of 128: the runtimes quantize a block-FP8
    linear's input per token in groups of 128 along in_features and need whole groups (vLLM
    ``fp8_utils.per_token_group_quant_fp8`` asserts ``x.shape[-1] % group_size == 0``; compressed-tensors
    0.20.1 ``forward_helpers`` cannot form the groups: transformers fails at the first forward)."""
    bad = [n for n, m in modules.items() if formats.FORMATS[m["format"]].scale == "block"
           and s.reader.info(n + ".weight").shape[1] % 128]
    if bad:
        raise MoepressError(
            f"--format {flag}: {len(bad)} block-FP8 linears have in_features ({_dims(s, bad, 1)}) that are not a "
            f"multiple of 128 ({pattern(bad)}); vLLM, SGLang and transformers quantize their inputs in whole groups "
            f"of 128 and would fail at the first forward: quantize with --format {fp8_formats(s, flag)}")


def partial_fused_blocks(s: Source, modules: dict[str, dict]) -> list[str]:
    """Block-FP8 linears that the runtimes fuse with the ones after them (q/k/v, a dense or shared gate/up,
    DeepSeek's q_a / kv_a) whose rows are not whole 128-row blocks: vLLM requires every part of a merged
    block-FP8 linear but the last to be a multiple of block_n, unless its quantization config gives a
    ``weight_block_size`` (vLLM 0.33 ``quantization/utils/fp8_utils.py`` validate_fp8_block_shape, from
    ``compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py`` create_weights: "Weight output_partition_size =
    64 is not divisible by weight quantization block_n = 128"; ``layers/linear.py``
    _maybe_allow_fp8_block_shape_mismatch reads ``quant_config.weight_block_size``, which its Fp8Config (the
    hf-fp8-block export) has and CompressedTensorsConfig has not)."""
    bad = []
    for (_, fused), parts in sorted(fused_parts(s, set(modules)).items()):
        order = TRTLLM_FUSED[fused]
        parts = sorted(parts, key=lambda n: order.index(n.rpartition(".")[2]))
        bad += [n for n in parts[:-1] if formats.FORMATS[modules[n]["format"]].scale == "block"
                and s.reader.info(n + ".weight").shape[0] % 128]
    return bad


def refuse_partial_fused_blocks(s: Source, flag: str, modules: dict[str, dict],
                                route: Callable[[list[str]], str], why: str = "") -> None:
    """One line naming the :func:`partial_fused_blocks` and ``route(them)``, the ways that take them; ``why``: what
    this export's runtimes do with them (default: vLLM's compressed-tensors refusal)."""
    bad = partial_fused_blocks(s, modules)
    if bad:
        why = why or f"vLLM refuses such a merged block-FP8 linear of a {flag} checkpoint at load " \
            "(validate_fp8_block_shape)"
        raise MoepressError(
            f"--format {flag}: {len(bad)} block-FP8 linears that vLLM fuses with the next ones have {_dims(s, bad, 0)} "
            f"rows, not whole 128-row blocks ({pattern(bad)}); {why}: {route(bad)}")


def _dims(s: Source, names: list[str], axis: int) -> str:
    """The distinct sizes of the stored weights ``names`` along ``axis`` (0: rows, 1: in_features), for a message."""
    return ", ".join(map(str, sorted({s.reader.info(n + ".weight").shape[axis] for n in names})))


def high_precision_layers(s: Source, kept: set[str]) -> list[str]:
    """The fused experts module of each MoE layer whose routed experts all stay high precision."""
    return sorted(fused_name(s.adapter, i) for i, names in routed_linears(s).items()
                  if names and all(n in kept for n in names))


__all__ = ["common_groups", "expert_widths", "fused_name", "high_precision_layers", "pattern",
           "fp4_expert_widths_ok", "refuse_fp4_expert_widths", "refuse_mixed",
           "partial_fused_blocks", "refuse_partial_blocks", "refuse_partial_fused_blocks",
           "refuse_partial_input_groups", "refuse_unpacked_experts", "routed_linears", "routed_names"]

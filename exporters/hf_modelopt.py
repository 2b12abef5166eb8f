"""`hf-modelopt`: the unified Hugging Face checkpoint NVIDIA Model-Optimizer writes
(``modelopt.torch.export.export_hf_checkpoint``), loaded by TensorRT-LLM's PyTorch backend,
vLLM and SGLang.

Input: a ``moepress quantize`` output (already modelopt's tensor layout — see the contract in
compress/quantize/); the export is a streamed copy, one decoder layer per shard, plus the two
config files consumers read:

- ``hf_quant_config.json`` in modelopt's nested ("legacy") shape
  ``{producer{name, version}, quantization{quant_algo, kv_cache_quant_algo, [group_size,
  has_zero_point, pre_quant_scale], exclude_modules}}`` (modelopt/torch/export/quant_utils.py:
  get_quant_config / process_layer_quant_config). ``producer.name`` must be ``modelopt``:
  vLLM (config parsing: ``producer_name == "modelopt"``) and TensorRT-LLM AutoDeploy's
  ModelOPTQuantConfigReader (raises unless ``producer == "modelopt"``) key off it; moepress is
  recorded in export.json and ``producer.exported_by``.
- ``config.json: quantization_config`` in modelopt 0.47's flat, compressed-tensors-style
  shape (modelopt/torch/export/convert_hf_config.py: convert_hf_quant_config_format:
  config_groups, ignore, quant_algo, kv_cache_scheme, producer, quant_method "modelopt"); TensorRT-LLM
  reads either shape (tensorrt_llm/quantization/modelopt_config.py: parse_modelopt_quant_config,
  the file form wins).
- ``exclude_modules`` lists every high-precision module by full name, as modelopt 0.47 wrote
  for the bundled Qwen3-MoE (``lm_head``, ``model.embed_tokens``, each ``model.layers.N.mlp.gate``);
  TensorRT-LLM matches entries with ``fnmatch.fnmatchcase`` on module names
  (tensorrt_llm/models/modeling_utils.py: QuantConfig.is_module_excluded_from_quantization), its
  fused MoE by the fused module's name, so a layer whose routed experts all stay high precision is
  also listed as ``model.layers.N.<mlp>.experts`` (fused_moe.py).
- Experts stay per expert (``mlp.experts.{e}.gate_proj/up_proj/down_proj``, Mixtral
  ``block_sparse_moe.experts.{e}.w1/w2/w3``): what modelopt exports from transformers 5's fused
  experts and what TensorRT-LLM's fused-MoE weight loaders read (``experts.{e}.w1/w2/w3`` or
  ``gate_proj/up_proj/down_proj``); gate and up share ``weight_scale`` / ``input_scale`` and all
  experts of a layer share each projection's ``input_scale`` (quantize stage's convention,
  equal to modelopt's _QuantFusedExperts export).

Refused with one line (fused_moe.py and this module): a layer whose routed experts are partly quantized (e.g.
INT4 down projections left bf16 because no group divides their in_features) and block-FP8 experts
whose width is over 128 and not a multiple of it: fused-MoE runtimes hold one quantization per
layer's experts and stack gate and up into one weight; q/k/v, gate/up or DeepSeek's q_a / kv_a quantized
unlike each other (``refuse_partly_fused``: the runtimes fuse each into one linear); block-FP8 q/k/v or gate/up
parts before the last not in whole 128-row blocks (``refuse_partial_fused_q_k_v``). Routed experts no
runtime loads from a Model-Optimizer checkpoint (``refuse_unloadable_experts``: INT4 weight-only, and W4A8
on DeepSeek-V3 / Kimi K2, the format registry's ``trtllm_moe_families``; block FP8 for every family, its
``modelopt_moe_why``: ``refuse_modelopt_named_experts`` sends them to hf-fp8-block); block-FP8 MLA kv_b_proj /
q_a / kv_a (modelopt_misloads.py ``refuse_block_fp8_mla``: TensorRT-LLM's DeepSeek loader and SGLang
misread them). What TensorRT-LLM and SGLang misread otherwise is declared in export.json (modelopt_misloads.py).

Each format's ``quant_algo`` is the name Model-Optimizer writes (Format.modelopt_entry): block FP8 is
``fp8_pb_wo``, which TensorRT-LLM and vLLM's linear methods read (compress/formats/fp8_block.py says
where), its ``weight_scale`` written [ceil(out/128), 1, ceil(in/128), 1] as Model-Optimizer 0.47 exports it
and the quantize output stores it (Format.modelopt_scale reshapes older outputs' 2-D grid): the shape vLLM 0.33
allocates (quantization/modelopt.py ``KFp8Block128``; its loaders assert it, so a 2-D grid is refused), which
TensorRT-LLM's FP8BlockScalesLinearMethod squeezes (_torch/modules/linear.py, main 2026-11; 2-D loads there
too). vLLM's Model-Optimizer MoE method takes per-tensor FP8 only, so no block-FP8 MoE model of this format
loads there; the README's consumer table lists, per consumer, the names it accepts
(tests/test_consumer_names.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moepress import __version__
from moepress.compress import formats
from moepress.errors import MoepressError
from moepress.exporters.base import Exporter
from moepress.exporters.fused_moe import (
    FUSES_EXPERTS,
    common_groups,
    expert_widths,
    high_precision_layers,
    refuse_fp4_expert_widths,
    refuse_mixed,
    refuse_partial_blocks,
    refuse_partial_fused_blocks,
    refuse_partial_input_groups,
    refuse_partly_fused,
    refuse_unlike,
    refuse_unloaded_expert_groups,
    routed_names,
)
from moepress.exporters.hf_common import (
    QUANT_FILES,
    fused_unquantized,
    linear_of,
    open_source,
    output_config,
    require_layout,
    tensor_groups,
    unquantized_modules,
)
from moepress.exporters.hints import (
    FP8_THEN_HF_MODELOPT,
    HF_MODELOPT,
    block_experts_route,
    ct_route,
    elsewhere,
    fused_blocks_route,
    int4_routes,
    modelopt_named_experts,
    quantize_first,
    quantizes_experts,
)
from moepress.exporters.kernel_widths import TRTLLM_INT4_MOE_GROUP
from moepress.exporters.modelopt_misloads import MLA_FUSED_A, misloads, refuse_block_fp8_mla, written

# the Model-Optimizer release whose export layout we follow (checked against it in tests)
MODELOPT_LAYOUT_VERSION = "0.47.0"

def layer_algo(fmt: str, group: int | None) -> dict:
    """One layer's entry in hf_quant_config.json (Format.modelopt_entry)."""
    return formats.FORMATS[fmt].modelopt_entry(group)


def group_config(entry: dict) -> dict:
    """compressed-tensors-style config group for one layer entry (Format.modelopt_group: modelopt
    convert_hf_config._quant_algo_to_group_config)."""
    f = formats.by_quant_algo(entry["quant_algo"])
    if f is None or f.modelopt_group is None:
        raise MoepressError(f"quant_algo {entry['quant_algo']}: no compressed-tensors-style group known")
    return f.modelopt_group(entry.get("group_size"))


def quant_configs(layout: dict, modules: dict[str, dict], exclude: list[str], kv_cache: bool) -> tuple[dict, dict]:
    """(hf_quant_config.json, config.json quantization_config)."""
    per = {n: layer_algo(m["format"], m.get("group")) for n, m in sorted(modules.items())}
    kinds = {tuple(sorted(v.items())) for v in per.values()}
    q: dict = {"quant_algo": None, "kv_cache_quant_algo": "FP8" if kv_cache else None}
    if len(kinds) == 1:
        q.update(next(iter(per.values())))
    else:
        q["quant_algo"] = "MIXED_PRECISION"
        q["quantized_layers"] = per
    q["exclude_modules"] = exclude
    producer = {"name": "modelopt", "version": MODELOPT_LAYOUT_VERSION, "exported_by": f"moepress {__version__}"}
    hf_quant = {"producer": producer, "quantization": q}
    # flat form for config.json (convert_hf_quant_config_format)
    flat: dict = {}
    if len(kinds) == 1:
        # one algo: a group only where Model-Optimizer writes one (modelopt_flat_group); its table's groups for
        # W4A8_AWQ (FP4 weights) and FP8_PER_CHANNEL_PER_TOKEN (static activations) would describe ours falsely
        fmt = formats.by_quant_algo(q["quant_algo"])
        if fmt is not None and fmt.modelopt_flat_group:
            flat["config_groups"] = {"group_0": {**group_config(next(iter(per.values()))), "targets": ["Linear"]}}
    else:
        groups: dict[tuple, list[str]] = {}
        for n, v in per.items():
            groups.setdefault(tuple(sorted(v.items())), []).append(n)
        flat["config_groups"] = {f"group_{k}": {**group_config(dict(key)), "targets": sorted(names)}
                                 for k, (key, names) in enumerate(groups.items())}
        flat["quantized_layers"] = per
    flat["ignore"] = exclude
    flat["quant_algo"] = q["quant_algo"]
    if q.get("group_size"):
        flat["group_size"] = q["group_size"]
    if kv_cache:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    flat["producer"] = producer
    flat["quant_method"] = "modelopt"
    return hf_quant, flat


def _folded_awq(layout: dict, modules: dict) -> set[str]:
    """AWQ modules of a folded checkpoint (quantize --awq-fold: the smoothing is in the norms): written
    with pre_quant_scale = 1, so that they stay Model-Optimizer's W4A16_AWQ / W4A8_AWQ layout (INT4 weight-only
    routed experts are refused before: ``refuse_unloadable_experts``)."""
    if not layout.get("awq_fold"):
        return set()
    return {n for n, m in modules.items() if m["format"] in formats.FORMATS and formats.FORMATS[m["format"]].awq}


# modelopt 0.47 quant_utils._KV_CACHE_REPLACEMENTS: the attention's k/v bmm quantizers are exported as
# ``self_attn.k_proj.k_scale`` / ``self_attn.v_proj.v_scale`` (TensorRT-LLM's PyTorch backend reads them
# from the k_proj / v_proj weights; vLLM's maybe_remap_kv_scale_name takes either form)
KV_SCALE_NAMES = {".self_attn.k_scale": ".self_attn.k_proj.k_scale", ".self_attn.v_scale": ".self_attn.v_proj.v_scale"}


def modelopt_name(n: str) -> str:
    """The name Model-Optimizer exports a stored tensor under (the quantize output's KV scales differ)."""
    for ours, theirs in KV_SCALE_NAMES.items():
        if n.endswith(ours):
            return n[: -len(ours)] + theirs
    return n


def _modelopt_tensor(n: str, t: torch.Tensor, modules: dict) -> torch.Tensor:
    """A stored tensor as Model-Optimizer exports it: the stored bytes, already its layout, but for block FP8's
    weight_scale, a 2-D grid (DeepSeek's, or any checkpoint storing the grid) written 4-D (Format.modelopt_scale:
    vLLM 0.33 refuses the 2-D grid)."""
    part = linear_of(n, ("weight_scale",))
    return formats.FORMATS[modules[part[0]]["format"]].modelopt_scale(t) if part and part[0] in modules else t


def refuse_unloadable_experts(s, modules: dict) -> None:
    """One line when no runtime loads the routed experts' format from a Model-Optimizer checkpoint: TensorRT-LLM
    only for the families the format registry's ``trtllm_moe_families`` names, vLLM and SGLang never for
    INT4 experts (tests/consumer_names.py). Checked before the group-size refusals (no group size makes
    them load), and the hint names only exports that take this source (hints.int4_routes)."""
    routed = routed_names(s)
    for fmt in sorted({modules[n]["format"] for n in routed if n in modules}):
        f = formats.FORMATS[fmt]
        if not f.trtllm_loads_experts(s.adapter.family):
            ways = int4_routes(s, "hf-modelopt") or ct_route(s, modules)
            # INT4 experts load only in TensorRT-LLM's groups of 128 (refuse_unloaded_expert_groups)
            take = TRTLLM_INT4_MOE_GROUP in common_groups(expert_widths(s))
            fit = [a for a in f.alternatives if formats.FORMATS[a].modelopt_entry is not None
                   and not formats.FORMATS[a].modelopt_experts_why(s.adapter.family) and quantizes_experts(s, a)
                   and (take or formats.FORMATS[a].element != "int4")]
            now = {modules[n].get("group") for n in routed if n in modules}
            group = TRTLLM_INT4_MOE_GROUP if formats.FORMATS[fit[0]].element == "int4" and \
                now != {TRTLLM_INT4_MOE_GROUP} else None
            again = f"--format {fit[0]}" + (f" --group-size {group}" if group else "") + \
                (f" (or {', '.join(fit[1:])})" if fit[1:] else "")
            raise MoepressError(f"--format hf-modelopt: {s.path}: its {s.adapter.family} routed experts are {fmt}; "
                                f"{f.trtllm_moe_why}, and vLLM / SGLang load only FP8 / NVFP4 experts from a "
                                f"Model-Optimizer checkpoint: no runtime would load them"
                                f"{' at any group size' if f.element == 'int4' else ''}; {ways}, "
                                f"or quantize with {again}, then export hf-modelopt")


def refuse_modelopt_named_experts(s, modules: dict) -> None:
    """One line when the routed experts' format loads only under other names than Model-Optimizer's (block FP8:
    Format.modelopt_moe_why). Checked after the refusals of partial blocks, so that what it names
    (hints.block_experts_route) takes the checkpoint."""
    for fmt in modelopt_named_experts(s, modules):
        raise MoepressError(f"--format hf-modelopt: {s.path}: its routed experts are {fmt}; "
                            f"{formats.FORMATS[fmt].modelopt_moe_why}: {block_experts_route(s, modules)}")


# Block-FP8 q/k/v or a gate/up with a part before the last not whole 128-row blocks, e.g. tiny-qwen3-moe's [128, 64, 64]
# q/k/v. vLLM 0.33.0 loads an FP8_PB_WO linear, in a single-algo or a MIXED_PRECISION export alike, with
# ModelOptLinearMethod + KFp8Block128 (quantization/modelopt.py build_linear_method: a weight_scale of
# cdiv(sum(rows), 128) rows; registered for weight_loader_v2), and QKVParallelLinear / MergedColumnParallelLinear
# .weight_loader_v2 put part i's scale rows at ceil(offset_i / 128) (layers/linear.py adjust_block_scale_shard):
# parameter.py load_qkv_weight / load_merged_column_weight narrow() past the grid, a RuntimeError at load (v of
# [128, 64, 64]: row 2 of 2), else a part runs with its neighbour's scale. TensorRT-LLM main (00bbf71e,
# _torch/modules/linear.py FP8BlockScalesLinearMethod.load_weights_fused_qkv_linear / _gate_up_linear:
# remap_fused_shard_indices_by_divisible_factor, the same ceil; copy_weight_shard) copies into an empty slice past
# its ceil(rows / 128)-row grid without an error: v's scales are dropped and v runs with k's. DeepSeek's q_a / kv_a
# are left to refuse_block_fp8_mla, which refuses every block-FP8 one.
FUSED_BLOCKS_WHY = ("vLLM and TensorRT-LLM read a merged block-FP8 linear's scales from a grid of ceil(rows / 128) "
                    "rows, part i's at ceil(offset_i / 128): vLLM fails at load where a part's rows fall past it, "
                    "TensorRT-LLM drops them without an error, and a part that fits may run on its neighbour's scale")


def refuse_partial_fused_q_k_v(s, modules: dict) -> None:
    """One line for block-FP8 fused parts not in whole blocks (FUSED_BLOCKS_WHY); not DeepSeek's q_a / kv_a."""
    other = {n: m for n, m in modules.items() if not n.endswith(MLA_FUSED_A)}
    refuse_partial_fused_blocks(s, "hf-modelopt", other,
                                lambda bad: fused_blocks_route(s, modules, bad, "hf-modelopt"),
                                FUSED_BLOCKS_WHY)


def refuse_hf_modelopt(s, src: Path, modules: dict) -> None:
    """Everything hf-modelopt refuses of a ``moepress quantize`` output (``modules``: its layout's), before writing;
    also asked by trtllm-ckpt before it names hf-modelopt as the way for a DeepSeek-V3 / Kimi K2 checkpoint."""
    unknown = sorted(f for f in {m["format"] for m in modules.values()}
                     if f not in formats.FORMATS or formats.FORMATS[f].modelopt_entry is None)
    if unknown:
        raise MoepressError(f"--format hf-modelopt: {src}/moepress_quant.json: formats {unknown} have no modelopt "
                            f"quant_algo; {ct_route(s, modules)}")
    refuse_unloadable_experts(s, modules)  # first: the refusals below suggest a --group-size, which cannot help
    # what a fused MoE cannot hold (fused_moe.py): TensorRT-LLM and vLLM quantize a layer's experts alike
    refuse_mixed(s, "hf-modelopt", set(modules), FUSES_EXPERTS["hf-modelopt"] + " and would misread or refuse it")
    refuse_unlike(s, "hf-modelopt", modules, FUSES_EXPERTS["hf-modelopt"] + " (one group size for all its projections)")
    refuse_unloaded_expert_groups(s, "hf-modelopt", modules, "TensorRT-LLM's INT4 fused MoE allocates their scales "
                                  "in groups of 128 only (WInt4AFP8FusedMoEMethod.create_weights), and vLLM / SGLang "
                                  "load no INT4 experts from a Model-Optimizer checkpoint: no runtime would load them")
    refuse_partly_fused(s, "hf-modelopt", modules, "TensorRT-LLM (which misreads them), vLLM and SGLang")
    refuse_partial_blocks(s, "hf-modelopt", modules)
    refuse_partial_input_groups(s, "hf-modelopt", modules)
    refuse_partial_fused_q_k_v(s, modules)
    refuse_fp4_expert_widths(s, "hf-modelopt", modules)  # vLLM and TensorRT-LLM read them with the same kernels
    refuse_modelopt_named_experts(s, modules)
    refuse_block_fp8_mla(s, modules)


def taken_route(route: str, s, src: Path) -> str:
    """``route`` (hints.elsewhere's way for a checkpoint trtllm-ckpt refuses), unless it names hf-modelopt and
    hf-modelopt refuses the checkpoint ``s``: then the FP8 per-tensor re-quantize first, which takes any width."""
    if route != HF_MODELOPT:
        return route
    try:
        refuse_hf_modelopt(s, src, s.layout["modules"])
    except MoepressError:
        return f"{FP8_THEN_HF_MODELOPT}, as hf-modelopt refuses it as it is quantized now"
    return route


def elsewhere_taken(s) -> str:
    """hints.elsewhere's way for a checkpoint trtllm-ckpt refuses, hf-modelopt only where hf-modelopt takes it as it
    is (:func:`taken_route`): fp8-dynamic experts, or experts left bf16 by a --rule, were sent there in vain."""
    return taken_route(elsewhere(s), s, s.path)


def refuse_input(src: Path):
    """A moepress quantize output whose layout this export writes (its Source and modules); else one line."""
    s = open_source(src)
    modules = require_layout(s, "hf-modelopt", lambda: quantize_first(s, "hf-modelopt", FIRST))["modules"]
    refuse_hf_modelopt(s, src, modules)
    return s, modules


def export_hf_modelopt(src: Path, writer, cfg, progress) -> dict:
    s, modules = refuse_input(src)
    r = s.reader
    count, dropped = 0, []
    folded = _folded_awq(s.layout, modules)
    with progress.task("export hf-modelopt", s.adapter.num_layers + 2) as task:
        for kind, i, names in tensor_groups(s):
            for n in names:
                if not written(s, n):
                    dropped.append(n)
                    continue
                writer.add(modelopt_name(n), _modelopt_tensor(n, r.get(n), modules))
                count += 1
                if n.endswith(".weight") and n[: -len(".weight")] in folded:
                    writer.add(n[: -len(".weight")] + ".pre_quant_scale", torch.ones(r.info(n).shape[1]))
            writer.end_shard()
            task.advance(note=f"layer {i}" if kind == "layer" else kind)
    exclude = unquantized_modules(s, set(modules))
    # a layer whose routed experts all stay high precision: named as the fused module too (TensorRT-LLM
    # matches exclude_modules on the fused MoE module's name: modeling_utils.apply_quant_config_exclude_modules)
    exclude = sorted(exclude + high_precision_layers(s, set(exclude)) + fused_unquantized(s, exclude, set(modules)))
    kv = any(n.endswith((".k_scale", ".v_scale")) for n in r.names())
    hf_quant, flat = quant_configs(s.layout, modules, exclude, kv)
    writer.write_json("config.json", output_config(s, flat))
    writer.write_json("hf_quant_config.json", hf_quant)
    # keep the sidecar: moepress (check, other exporters) reads the layout back from the export
    for name in QUANT_FILES[1:]:
        if (Path(src) / name).is_file():
            writer.write_text(name, (Path(src) / name).read_text())
    writer.copy_aux_files(src)
    declared = misloads(s, modules, kv, len(dropped))
    for note in declared["consumer_notes"]:
        progress.info(f"note: {note}")
    return {"quant_algo": hf_quant["quantization"]["quant_algo"], "tensors": count,
            "quantized_linears": len(modules), "exclude_modules": len(exclude), "dropped": dropped, **declared}


FIRST = ("fp8", "w4a8-awq", "nvfp4")  # what a bf16 source is quantized to first (Exporter.quantized_only)
EXPORTER = Exporter(
    "hf-modelopt", export_hf_modelopt, description="Hugging Face checkpoint with modelopt's hf_quant_config.json "
    "(FP8, NVFP4, W4A8_AWQ for Mixtral / Qwen3-MoE experts, fp8_pb_wo for other linears; block-FP8 and INT4 "
    "weight-only experts refused) from a "
    "moepress quantize output",
    consumers="TensorRT-LLM (PyTorch backend); vLLM, SGLang for FP8 / NVFP4", quantized_only=FIRST,
    refuse_input=refuse_input,
)

"""What the serving runtimes do with an hf-modelopt export beyond its names and shapes, read from their
loaders (not run: no GPU here): where SGLang 0.5.23, TensorRT-LLM's DeepSeek loader and vLLM 0.33's
MIXED_PRECISION config fail on or misread it. The export declares those runtimes in export.json
(``misloaded_by`` / ``misloaded_why``, ``consumer_notes``; exporters/artifacts.py ``consumer_misload`` reads them
back for builds and model cards), refuses what only one runtime would load (:func:`refuse_block_fp8_mla`) and
leaves out tensors a runtime would misread (:func:`written`)."""

from __future__ import annotations

from types import SimpleNamespace

from moepress.compress import formats
from moepress.errors import MoepressError
from moepress.exporters.ct_misloads import TRANSFORMERS_CHECKED
from moepress.exporters.fused_moe import marlin_note, pattern, routed_names

SGLANG_CHECKED = "0.5.23"
KV_SCALES = (".k_scale", ".v_scale")
# how SGLang 0.5.23's model classes read Model-Optimizer's self_attn.k_proj.k_scale / v_proj.v_scale: their
# load_weights renames k_proj / v_proj to qkv_proj first (models/mixtral.py:425-435: params_dict[...qkv_proj.k_scale],
# KeyError; models/qwen3_moe.py:1208-1226: not a parameter, skipped)
SGLANG_KV_SCALES = {
    "mixtral": (True, "fails loading the FP8 KV-cache scales (models/mixtral.py load_weights looks "
                      "self_attn.k_proj.k_scale up as qkv_proj.k_scale: KeyError); quantize without --kv-cache for it"),
    "qwen3_moe": (False, "skips the FP8 KV-cache scales (models/qwen3_moe.py load_weights looks them up as "
                         "qkv_proj.k_scale, not a parameter) and runs its FP8 cache at scale 1.0"),
}


def written(s, name: str) -> bool:
    """Whether the quantize output's tensor goes into the export: not an MLA model's k / v scales. They are
    measured on the decompressed keys and values (compress/quant/kv.py), but SGLang 0.5.23 reads Model-Optimizer's
    k_proj.k_scale as the scale of its latent cache (models/deepseek_common/deepseek_weight_loader.py:514-523:
    self_attn.attn_mqa.k_scale): its trtllm_mla decode multiplies the attention logits by it while writing the
    cache unscaled (layers/attention/trtllm_mla_backend.py:955-974; kernels/ops/attention/utils.py:115-117), its
    triton backend divides the latent by it. vLLM and TensorRT-LLM keep 1.0; without them SGLang does too."""
    return not (s.adapter.latent_kv_cache and name.endswith(KV_SCALES))


# SGLang 0.5.23 routes a MIXED_PRECISION export by its quantized_layers (configs/model_config.py:1855-1865): with an
# NVFP4 / W4A16_NVFP4 entry to ModelOptMixedPrecisionConfig, else to W4AFp8Config (DeepSeek-R1-W4AFP8's layout:
# every linear block FP8 with weight_scale_inv, nothing excluded; INT4 experts with weight_scale_inv, zeros until
# loaded: layers/quantization/w4afp8.py:78-195), which reads none of Model-Optimizer's per-tensor weight_scale.
# ModelOptMixedPrecisionConfig.get_quant_method (layers/quantization/modelopt_quant.py:1036-1091) quantizes a layer
# only as SGLANG_MIXED (FP8_PB_WO / MXFP8 as DeepSeek's weight_scale_inv layout, which hf-modelopt does not write),
# else it is unquantized (bf16 parameters: packed 4-bit weights fail the size check, FP8 ones run unscaled); a fused
# linear's quant_algo is found through the model class's packed_modules_mapping only (_resolve_quant_algo, 978-1008):
# Qwen3-MoE maps qkv_proj and gate_up_proj (models/qwen3_moe.py:999-1002), DeepSeek only fused_qkv_a_proj_with_mqa
# (models/deepseek_v2.py:3250-3275: its dense / shared-expert gate_up_proj finds none), Mixtral nothing (qkv_proj).
SGLANG_MIXED = {"FP8", "NVFP4", "W4A16_NVFP4"}
SGLANG_MIXED_UNFUSED = {"deepseek_v3": ((".gate_proj", ".up_proj"), "gate_up_proj", "'mlp.gate_proj=none', "
                                        "'mlp.up_proj=none', 'mlp.shared_experts.gate_proj=none', "
                                        "'mlp.shared_experts.up_proj=none'"),
                        "mixtral": ((".q_proj", ".k_proj", ".v_proj"), "qkv_proj",
                                    "'self_attn.q_proj=none', 'self_attn.k_proj=none', 'self_attn.v_proj=none'")}


def mixed_algos(modules: dict) -> dict[str, str]:
    """{module: its upper-cased quantized_layers quant_algo} when the export is MIXED_PRECISION (its modules'
    entries differ, as hf_modelopt.quant_configs decides), else {}."""
    entries = {n: formats.FORMATS[m["format"]].modelopt_entry(m.get("group")) for n, m in modules.items()}
    if len({tuple(sorted(e.items())) for e in entries.values()}) < 2:
        return {}
    return {n: e["quant_algo"].upper() for n, e in entries.items()}


def sglang_mixed_algo(algo: str, names: str) -> str:
    """Why SGLang 0.5.23's ModelOptMixedPrecisionConfig misloads layers of this quant_algo, and what to do instead."""
    how = (f"reads its {algo} layers ({names}) as block FP8 under DeepSeek's weight_scale_inv (Fp8LinearMethod, "
           "modelopt_quant.py:1054-1055), not the weight_scale written" if algo == "FP8_PB_WO" else
           f"loads its {algo} layers ({names}) unquantized (ModelOptMixedPrecisionConfig quantizes a layer only as "
           f"{' / '.join(sorted(SGLANG_MIXED))} or under DeepSeek's block-FP8 names, modelopt_quant.py:1036-1091)")
    return how + "; for SGLang quantize them FP8 or NVFP4 (or keep them bf16)"


def sglang_mixed(s, modules: dict) -> list[str]:
    """How SGLang 0.5.23 fails on or misreads this export's MIXED_PRECISION quantized_layers (none, or one algo: [])."""
    algos = mixed_algos(modules)
    if not algos:
        return []
    kinds = sorted(set(algos.values()))
    if not set(kinds) & {"NVFP4", "W4A16_NVFP4"}:
        return [f"fails on or misreads a MIXED_PRECISION export without an NVFP4 layer ({' / '.join(kinds)}: it loads "
                "it as W4AFp8Config, every linear block FP8 with DeepSeek's weight_scale_inv and the routed experts "
                "INT4 with weight_scale_inv, layers/quantization/w4afp8.py:78-195, none of which a Model-Optimizer "
                "export holds); for SGLang quantize to one format, or mix only NVFP4 with FP8"]
    routed, (parts, fused, rules) = routed_names(s), SGLANG_MIXED_UNFUSED.get(s.adapter.family, ((), "", ""))
    unfused = sorted(n for n, a in algos.items() if n not in routed and n.endswith(parts) and a in SGLANG_MIXED)
    why = [sglang_mixed_algo(a, pattern(n for n in algos if algos[n] == a)) for a in kinds if a not in SGLANG_MIXED]
    if unfused:
        why.append(f"loads its quantized {fused} unquantized ({pattern(unfused)}: its model class maps no packed "
                   f"module for {fused}, so ModelOptMixedPrecisionConfig finds no quant_algo for it, "
                   f"modelopt_quant.py:978-1008); for SGLang keep them bf16 (--rule {rules})")
    return why


def sglang_misloads(s, modules: dict, kv: bool) -> tuple[dict[str, str], list[str]]:
    """(misloaded_why, notes): what SGLang 0.5.23 fails on in this export, and what it reads otherwise."""
    why, notes = sglang_mixed(s, modules), []
    fp4 = sorted(n for n, m in modules.items()
                 if n.endswith(".kv_b_proj") and formats.FORMATS[m["format"]].element == "fp4")
    if fp4:  # deepseek_weight_loader.py:639-762: only FP8 / INT8 / AWQ are dequantized before the split
        why.append(f"fails at the first forward on its FP4 MLA kv_b_proj ({pattern(fp4)}: post_load_weights splits "
                   "the packed bytes into w_kc / w_vc, models/deepseek_common/attention_forward_methods/"
                   "forward_mla.py:586 bmm); keep it bf16 (--rule 'self_attn.kv_b_proj=none')")
    fails, how = SGLANG_KV_SCALES.get(s.adapter.family, (False, None)) if kv else (False, None)
    (why if fails else notes).extend([how] if how else [])
    misloaded = {"sglang": "; ".join(why)} if why else {}
    return misloaded, [f"SGLang <= {SGLANG_CHECKED} {n}" for n in why + notes]


TRTLLM_CHECKED = "main 2026-09"
MLA_FUSED_A = (".q_a_proj", ".kv_a_proj_with_mqa")
# TensorRT-LLM's DeepSeek-V3 / Kimi K2 loader reads the MLA projections it fuses or splits under DeepSeek's names
# only (_torch/models/modeling_deepseekv3.py DeepseekV3WeightLoader.load_weights; unchanged on main 2026-09,
# NVIDIA/TensorRT-LLM#18659 at a6616d6f, and in modeling_deepseekv4.py at 02586bf0, which copies it):
# kv_b_proj, split into k_b_proj_trans / v_b_proj, takes a quantized module's scale from weight_scale_inv
# (load_kv_b_proj_and_k_b_proj_trans: a KeyError on Model-Optimizer's weight_scale; packed FP4 bytes do not
# reshape into k_b_proj_trans); fused_a (q_a_proj + kv_a_proj_with_mqa) copies the weights and reads their scales
# only if kv_a_proj_with_mqa.weight_scale_inv exists, so an FP8 one runs with the scales it was built with (1.0 per
# tensor, torch.empty blocks); only its NVFP4 branch reads weight_scale / weight_scale_2 / input_scale.
TRTLLM_MLA_KV_B = ("fails loading its quantized MLA kv_b_proj ({}: DeepseekV3WeightLoader reads its scale as "
                   "DeepSeek's weight_scale_inv, a KeyError)")
TRTLLM_MLA_FUSED_A = ("runs its fused q_a / kv_a (fused_a) on scales it never loads ({}: DeepseekV3WeightLoader "
                      "reads an FP8 fused_a's scales only as weight_scale_inv), silently wrong")


def _mla(s, modules: dict, suffixes: tuple[str, ...], pick) -> list[str]:
    return sorted(n for n, m in modules.items() if s.adapter.latent_kv_cache and n.endswith(suffixes)
                  and pick(formats.FORMATS[m["format"]]))


def _trtllm_mla_parts(s, modules: dict) -> tuple[list[str], list[str]]:
    """The export's MLA projections TensorRT-LLM's DeepSeek loader misreads: (quantized kv_b_proj, any format;
    FP8 per tensor or channel q_a / kv_a). FP4 fused_a is left out: its NVFP4 branch reads Model-Optimizer's
    names (block FP8: refused)."""
    return (_mla(s, modules, (".kv_b_proj",), lambda f: True),
            _mla(s, modules, MLA_FUSED_A, lambda f: f.scale in ("tensor", "channel")))


def trtllm_misloads(s, modules: dict) -> list[str]:
    """How TensorRT-LLM's DeepSeek loader misreads this export's MLA projections (none: [])."""
    kv_b, fused_a = _trtllm_mla_parts(s, modules)
    return ([TRTLLM_MLA_KV_B.format(pattern(kv_b))] if kv_b else []) + \
        ([TRTLLM_MLA_FUSED_A.format(pattern(fused_a))] if fused_a else [])


# TensorRT-LLM's weight-only and W4A8 GEMMs for linears (cpp/tensorrt_llm/kernels/cutlass_kernels/fpA_intB_gemm/
# fpA_intB_gemm_template.h generic_mixed_gemm_kernelLauncher): fine-grained INT4 scales in groups of 64 or 128 only,
# of 128 only with FP8 activations ("Only group size 64 and 128 supported for fine grained kernels"): --group-size 32,
# or a group shrunk to a narrower input (compress/quant/int4.py effective_group), throws at the first GEMM
TRTLLM_INT4_GROUPS = (64, 128)




def trtllm_group_misloads(s, modules: dict) -> list[str]:
    """The export's INT4 linears outside the routed experts in groups TensorRT-LLM's INT4 GEMMs do not run (none:
    []). Routed experts in groups its fused MoE does not allocate are refused before (hf_modelopt.py,
    fused_moe.refuse_unloaded_expert_groups)."""
    routed, bad = routed_names(s), {}
    for n, m in sorted(modules.items()):
        f = formats.FORMATS.get(m.get("format"))
        if f is None or f.element != "int4" or m.get("group") is None or n in routed:
            continue
        ok = (128,) if f.static_input else TRTLLM_INT4_GROUPS
        if m["group"] not in ok:
            bad.setdefault((m["format"], m["group"], ok), []).append(n)
    return [f"fails at its first INT4 GEMM ({pattern(names)}: {fmt} in groups of {g}; fpA_intB_gemm_template.h runs "
            f"groups of {' or '.join(map(str, ok))} only)" for (fmt, g, ok), names in bad.items()]


MLA_PROJECTIONS = ("self_attn.kv_b_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")


def planned_trtllm_misloads(reader, adapter, format_of, group_size: int) -> tuple[list[str], list[str]]:
    """:func:`trtllm_misloads` of the hf-modelopt export of a quantize not yet run, and the ``--rule`` values
    (PATTERN=none) that keep those projections bf16: ``format_of(rel, full)`` the format (None: bf16) a linear of
    ``reader``'s checkpoint would get; a width the format skips stays bf16. Block FP8 projections are left out:
    that export refuses them (:func:`refuse_block_fp8_mla`)."""
    if not adapter.latent_kv_cache:
        return [], []
    modules = {}
    for name in reader.names():
        base = name.removesuffix(".weight")
        rel = next((p for p in MLA_PROJECTIONS if base.endswith("." + p)), None)
        fmt = format_of(rel, base) if rel and name.endswith(".weight") else None
        f = formats.FORMATS.get(fmt) if fmt else None
        if f is None or f.scale == "block" or (f.skip and f.skip(*reader.info(name).shape[:2], group_size)):
            continue
        modules[base] = {"format": fmt}
    s = SimpleNamespace(adapter=adapter)
    kv_b, fused_a = _trtllm_mla_parts(s, modules)
    keep = [*MLA_PROJECTIONS[:1 if kv_b else 0], *(MLA_PROJECTIONS[1:] if fused_a else ())]
    return trtllm_misloads(s, modules), [f"{p}=none" for p in _held(modules, keep)]


def quantize_trtllm_misloads(cfg, model) -> tuple[list[str], list[str]]:
    """:func:`planned_trtllm_misloads` of the quantize ``cfg`` (a QuantConfig: ``format_of``, ``group_size``) on
    ``model``."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader

    reader = CheckpointReader(model)
    return planned_trtllm_misloads(reader, get_adapter(reader.config, reader.names()), cfg.format_of, cfg.group_size)


def refuse_block_fp8_mla(s, modules: dict) -> None:
    """One line for block-FP8 MLA projections TensorRT-LLM misreads (kv_b_proj, q_a / kv_a): SGLang 0.5.23 reads no
    Model-Optimizer block-FP8 weight_scale either (README), so only vLLM would run the export."""
    parts = _mla(s, modules, (".kv_b_proj", *MLA_FUSED_A), lambda f: f.scale == "block")
    if parts:
        raise MoepressError(f"--format hf-modelopt: {s.path}: its block-FP8 MLA projections ({pattern(parts)}) are "
                            f"misread by TensorRT-LLM (DeepseekV3WeightLoader reads their scales only as DeepSeek's "
                            f"weight_scale_inv: kv_b_proj a KeyError, fused_a silently unscaled) and SGLang; keep "
                            f"them bf16 ({_keep_rules(modules, MLA_PROJECTIONS)}), or export an fp8-block quantize "
                            f"output with --format hf-fp8-block (weight_scale_inv)")


def _held(modules: dict, parts) -> list[str]:
    """The ``parts`` (MLA projection names) some module of ``modules`` is (no q_a_proj without q_lora_rank)."""
    return [p for p in parts if any(b.endswith("." + p) for b in modules)]


def _keep_rules(modules: dict, parts) -> str:
    """The --rule PART=none flags of the ``parts`` this export holds."""
    return " ".join(f"--rule '{p}=none'" for p in _held(modules, parts))


VLLM_CHECKED = "0.33.0"
# vLLM 0.33.0 quantization/modelopt.py ModelOptMixedPrecisionConfig.get_quant_method (MIXED_PRECISION exports): the
# upper-cased quant_algo of a linear's quantized_layers entry must be in LINEAR_ALGOS, else UnquantizedLinearMethod
# (a bf16 weight: a packed INT4 one fails its loader's shape check, its scales have no parameter); routed experts
# take FP8 / NVFP4 / W4A16_NVFP4 / MXFP8 (and block FP8 under DeepSeek's names only), else no quant method
# (unquantized experts, failing likewise). One quant_algo for the whole export: the README's consumer table.
VLLM_MIXED_LINEAR = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8"}
VLLM_MIXED_MOE = {"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8"}


def vllm_misloads(s, modules: dict) -> list[str]:
    """How vLLM 0.33's MIXED_PRECISION config fails on this export's quantized_layers (none, or one algo: [])."""
    routed, bad = routed_names(s), {}
    for n, algo in mixed_algos(modules).items():
        if algo not in (VLLM_MIXED_MOE if n in routed else VLLM_MIXED_LINEAR):
            bad.setdefault((algo, n in routed), []).append(n)
    return [f"fails loading its {algo} {'routed experts' if experts else 'linears'} ({pattern(names)}: "
            f"ModelOptMixedPrecisionConfig quantizes a MIXED_PRECISION layer only as "
            f"{' / '.join(sorted(VLLM_MIXED_MOE if experts else VLLM_MIXED_LINEAR))}, so it loads them unquantized)"
            for (algo, experts), names in sorted(bad.items())]


def misloads(s, modules: dict, kv: bool, dropped: int) -> dict:
    """export.json's ``misloaded_by`` (runtime -> newest version checked), ``misloaded_why`` and
    ``consumer_notes`` for this export (``kv``: it holds KV-cache scales; ``dropped``: MLA KV scales left out)."""
    misloaded, notes = sglang_misloads(s, modules, kv)
    by = {k: SGLANG_CHECKED for k in misloaded}
    trt, groups = trtllm_misloads(s, modules), trtllm_group_misloads(s, modules)
    if trt or groups:
        misloaded["tensorrt_llm"], by["tensorrt_llm"] = "; ".join(trt + groups), TRTLLM_CHECKED
    if trt:
        notes.append(f"TensorRT-LLM ({TRTLLM_CHECKED}) {'; '.join(trt)}; vLLM loads them; for TensorRT-LLM "
                     f"keep them bf16 ({_keep_rules(modules, MLA_PROJECTIONS)})")
    if groups:
        notes.append(f"TensorRT-LLM ({TRTLLM_CHECKED}) {'; '.join(groups)}; for TensorRT-LLM quantize with "
                     "--group-size 128 (a narrower input: keep it bf16 with --rule PATTERN=none)")
    if vllm := vllm_misloads(s, modules):
        misloaded["vllm"], by["vllm"] = "; ".join(vllm), VLLM_CHECKED
        notes.append(f"vLLM <= {VLLM_CHECKED} {misloaded['vllm']}; for vLLM quantize them FP8 or NVFP4 (or keep "
                     "them bf16)")
    notes += marlin_note(s, modules)
    # transformers' quantizers/auto.py (5.25) maps no "modelopt" quant_method: it warns and reads the stored codes
    # as plain weights (NVFP4's packed ones fail on their shapes)
    notes.append(f"transformers <= {TRANSFORMERS_CHECKED} has no Model-Optimizer quantizer: it warns and loads the "
                 "quantized weights without their scales; vLLM, SGLang and TensorRT-LLM load this export")
    if dropped:
        notes.append(f"the MLA KV-cache scales ({dropped} k_scale / v_scale, of the decompressed keys and values) "
                     "are not written: SGLang would take them for its latent cache's scale; every runtime runs the "
                     "FP8 latent cache at scale 1.0")
    return {"consumer_notes": notes, "misloaded_by": by, "misloaded_why": misloaded}

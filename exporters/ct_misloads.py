"""What the consumers of a compressed-tensors export are known to load wrongly or not at all: written into its
export.json (``consumer_notes``; ``misloaded_by``: consumer -> newest affected version, ``misloaded_why``: how;
exporters/artifacts.py ``consumer_misload`` reads them, ``moepress check`` refuses to gate a consumer that would
misload). The bytes follow the specification; these are the consumers' bugs the export meets."""

from __future__ import annotations

import math

from moepress.compress import formats
from moepress.compress.checkpoint import declared_dtype
from moepress.exporters.fused_moe import marlin_note, pattern, routed_names

# The newest transformers checked (5.25.0; its integrations/compressed_tensors.py is 5.24.0's, and the Qwen3-MoE,
# Mixtral and DeepSeek-V3 modeling files build and merge experts as 5.24's did): it dequantizes each routed
# expert's tensors and merges them into its fused experts. NVFP4 (``tensor_group``) experts lose their
# weight_global_scale (huggingface/transformers#48371); FP8 experts are ``weight * weight_scale``, which
# for block FP8 broadcasts only a single 128x128 block; FP8 experts' input_scale is not loaded. Its FP8
# dequantize (integrations/finegrained_fp8.py) takes a block-FP8 weight's block as rows // scale rows
# (moepress/checks/candidates/hf_transformers.py refuse_ambiguous_fp8_grids).
TRANSFORMERS_CHECKED = "5.25"


def _expert_schemes(s, schemes) -> dict:
    """{routed-expert module: its compressed-tensors scheme}."""
    routed = routed_names(s)
    return {n: schemes[(m["format"], m.get("group"))] for n, m in s.layout["modules"].items() if n in routed}


def _misloaded(s, experts: dict, schemes: dict) -> dict[str, str]:
    """{consumer: how the newest checked version loads this checkpoint wrongly or not at all}; ``experts``:
    {routed-expert module: its scheme}."""
    misread = s.adapter.transformers_misreads()
    if misread is not None:
        return {"transformers": misread}
    # DeepseekV3Attention.expand_kv (5.24-5.25) runs kv_b_proj on a [batch, 1, seq, rank] tensor, and
    # compressed-tensors' dynamic TOKEN strategy keeps dims 0 and 1 only (quantization/utils/helpers.py
    # calculate_qparams, 0.15-0.20)
    token = sorted(n for n, m in s.layout["modules"].items() if n.endswith("self_attn.kv_b_proj") and
                   (a := schemes[(m["format"], m.get("group"))].input_activations) is not None and
                   a.dynamic is True and a.strategy == "token")
    if token:
        return {"transformers": f"quantizes the inputs of {pattern(token)} with one FP8 scale per sequence, not per "
                                "token (it runs them as [batch, 1, seq, rank]); for transformers quantize them "
                                "with static scales (--rule 'self_attn.kv_b_proj=fp8') or keep them bf16"}
    strategies = {sch.weights.strategy for sch in experts.values() if sch.weights is not None}
    if "tensor_group" in strategies:
        return {"transformers": "loads its NVFP4 routed experts without weight_global_scale (wrong weights, no "
                                "error: huggingface/transformers#48371)"}
    big = [n for n, sch in experts.items() if sch.weights is not None and sch.weights.strategy == "block"
           and any(d > b for d, b in zip(s.reader.info(n + ".weight").shape, sch.weights.block_structure,
                                         strict=True))]
    if big:
        return {"transformers": f"cannot load its block-FP8 routed experts larger than one block ({pattern(big)}): "
                                "it multiplies each by its scale without expanding the blocks"}
    return {}


SGLANG_CHECKED = "0.5.23"
MLA_PARTS = ("q_a_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def _sglang_misloads(s, schemes) -> str | None:
    """How SGLang 0.5.23 fails a DeepSeek-style checkpoint whose MLA projections are packed (INT4 / FP4): its loader
    concatenates q_a_proj's and kv_a_proj_with_mqa's tensors of every name into fused_qkv_a_proj_with_mqa
    (models/deepseek_common/deepseek_weight_loader.py:463-478: weight_shape / weight_global_scale of two parts
    into a one-part parameter, layers/linear.py:376 asserts the size) and reads kv_b_proj.weight (:625-639; a
    packed kv_b_proj has weight_packed)."""
    packed = sorted(n for n, m in s.layout["modules"].items() if n.rsplit(".", 1)[-1] in MLA_PARTS
                    and (w := schemes[(m["format"], m.get("group"))].weights) is not None and w.num_bits < 8)
    if not packed:
        return None
    return (f"fails loading its packed MLA projections ({pattern(packed)}: fused q_a / kv_a tensors concatenated "
            "into one-part parameters, kv_b_proj read as .weight); keep them bf16 (--rule 'self_attn.*=none', Kimi's "
            "layout)")


def _fp4_dtype_notes(s) -> list[str]:
    """FP4 weights from a model not in bf16: compressed-tensors (0.20) leaves the weights it decompresses from FP4
    in bf16, so transformers' forward in the config's float16 / float32 fails on them ("expected m1 and m2 to have
    the same dtype"; a helper's find on a float16 source)."""
    dtype = declared_dtype(s.reader.config)
    fp4 = any(formats.FORMATS[m["format"]].element == "fp4" for m in s.layout["modules"].values())
    if not fp4 or dtype in (None, "bfloat16"):
        return []
    return [f"transformers <= {TRANSFORMERS_CHECKED} decompresses its FP4 weights to bf16 while the model runs in its "
            f"config's {dtype}: its first forward fails unless loaded with dtype=torch.bfloat16 (or "
            "CompressedTensorsConfig(dequantize=True)); vLLM and SGLang are not affected"]


def _dense_scheme_notes(s, experts: dict, schemes: dict) -> list[str]:
    """Dense linears quantized unlike the first config group (a narrow MLA kv_b_proj's smaller INT4 group; block FP8
    beside per-channel FP8 experts): transformers' default load keeps each module's scheme, but
    ``CompressedTensorsConfig(dequantize=True)`` decompresses every dense module with the first group whose targets
    are not ``re:`` patterns naming experts (integrations/compressed_tensors.py get_dense_scheme; moepress writes
    module names, the routed experts' group first) and, from compressed-tensors 0.19 (which applies the scheme it is
    given; earlier ones guess it from the scale's shape, ``misread_block_grids``), fails on the others. Per-tensor
    and per-channel FP8 scales broadcast alike there, and so does a one-block block-FP8 linear's [1, 1] grid: those
    mixes read right."""
    first = next(iter(schemes.values())).weights
    key = ("type", "num_bits", "strategy", "group_size", "block_structure")

    def misread(n, w) -> bool:
        if [getattr(w, a) for a in key] == [getattr(first, a) for a in key]:
            return False
        if {w.strategy, first.strategy} <= {"tensor", "channel"}:
            return False
        one_block = w.strategy == "block" and all(
            d <= b for d, b in zip(s.reader.info(n + ".weight").shape, w.block_structure, strict=True))
        return not (one_block and first.strategy in ("tensor", "channel"))

    dense = {n: schemes[(m["format"], m.get("group"))].weights for n, m in s.layout["modules"].items()
             if n not in experts}
    ws = [w for w in dense.values() if w is not None]
    if not any(misread(n, w) for n, w in dense.items() if w is not None):
        return []
    what = f"INT4 group sizes {sorted({w.group_size for w in ws})}" if first.type == "int" else \
        f"FP8 weight strategies {sorted({w.strategy for w in ws})}, read as {first.strategy}"
    return [f"transformers <= {TRANSFORMERS_CHECKED} loads it by default, but CompressedTensorsConfig(dequantize=True) "
            f"fails on its dense linears' {what} (one scheme for every dense module, the first config group's, "
            "which compressed-tensors 0.19 and later apply); "
            "vLLM loads them (a scheme per module); quantize them in one scheme (e.g. a --group-size every width "
            "takes) for that load"]


def _consumer_notes(experts: dict, misloaded: dict[str, str]) -> list[str]:
    """Known consumer bugs this checkpoint meets, said at export (the bytes follow the specification)."""
    sglang = "vLLM loads them correctly" if "sglang" in misloaded else "vLLM and SGLang load them correctly"
    notes = [f"transformers <= {TRANSFORMERS_CHECKED} {why}; {sglang}"
             for who, why in misloaded.items() if who == "transformers"]
    if "sglang" in misloaded:
        notes.append(f"SGLang <= {SGLANG_CHECKED} {misloaded['sglang']}")
    # transformers merges the experts into one fused module that holds dequantized weights and no quantization
    # scheme (modeling_deepseek_v3.py DeepseekV3Experts, qwen3_moe / mixtral alike), so no scheme's activation
    # quantization reaches them: a static input_scale is not loaded, a dynamic one is not applied
    acts = {"static" if not sch.input_activations.dynamic else "dynamic"
            for sch in experts.values() if sch.input_activations is not None}
    why = {"static": "their static input_scale is not loaded",
           "dynamic": "their inputs are not quantized at run time: the fused experts module has no quantization scheme"}
    if acts:
        notes.append(f"transformers <= {TRANSFORMERS_CHECKED} runs the routed experts on unquantized activations "
                     f"({'; '.join(why[k] for k in sorted(acts, reverse=True))}); vLLM and SGLang quantize them")
    # vLLM main (compressed_tensors_moe_w4a4_mxfp4.py at cd5f1c27) picks its MXFP4 MoE method from the weights alone
    # and, where its CUTLASS MXFP4 MoE runs (Blackwell), quantizes the activations to MXFP4 as well
    if any(sch.weights is not None and sch.weights.type == "float" and sch.weights.num_bits == 4
           and sch.weights.group_size == 32 and sch.input_activations is None for sch in experts.values()):
        notes.append("vLLM main runs MXFP4 routed experts with MXFP4 activations where its CUTLASS MXFP4 MoE runs "
                     "(Blackwell), whatever input_activations says, which computes other than the weight-only "
                     "forward moepress checks; elsewhere (Marlin) they run weight-only")
    return notes


# compressed-tensors 0.15.0-0.18.0 decompress a float-quantized weight without its scheme
# (compressors/naive_quantized/base.py ``decompress`` calls ``dequantize(x_q, scale, zero_point, g_idx)``), and
# ``dequantize`` (quantization/lifecycle/forward.py) guesses the strategy from the scale's shape: [R, 1] is read as
# per-channel, [1, C] as groups of in // C, [R, C] as blocks of (out // R, in // C). 0.19.0 passes
# ``args=scheme.weights``. 0.16 and later need torch >= 2.10, so with an older torch 0.15 is the newest there is.
CT_GUESSES_BLOCKS = "0.18"


def misread_block_grids(s, schemes) -> list[str]:
    """Block-quantized linears whose grid compressed-tensors <= 0.18 guesses otherwise from the scale's shape: more
    than one block row in one block column (per-channel: the load fails), or a dimension the blocks do not divide
    (rows // scale rows is not the block: the load fails, or where those guessed blocks tile the rows, e.g. 192 as
    2 x 96, wrong scales and no error). Not the routed experts: transformers multiplies
    their FP8 weights by their scales itself (integrations/compressed_tensors.py; ``_misloaded`` says where that
    fails)."""
    bad, routed = [], routed_names(s)
    for n, m in s.layout["modules"].items():
        w = schemes[(m["format"], m.get("group"))].weights
        if w is None or w.strategy != "block" or n in routed:
            continue
        (rows, cols), (bh, bw) = s.reader.info(n + ".weight").shape, w.block_structure
        r, c = math.ceil(rows / bh), math.ceil(cols / bw)
        if (r > 1 and c == 1) or (r > 1 and rows // r != bh) or (c > 1 and cols // c != bw):
            bad.append(n)
    return sorted(bad)


def misloads(s, schemes) -> dict:
    """export.json's ``consumer_notes``, ``misloaded_by`` and ``misloaded_why`` for the source ``s`` written with
    ``schemes`` ({(format, group): compressed-tensors scheme})."""
    experts = _expert_schemes(s, schemes)
    misloaded = _misloaded(s, experts, schemes)
    checked = {k: TRANSFORMERS_CHECKED for k in misloaded}
    if (sg := _sglang_misloads(s, schemes)) is not None:
        misloaded["sglang"] = sg
        checked["sglang"] = SGLANG_CHECKED
    notes = _consumer_notes(experts, misloaded) + _dense_scheme_notes(s, experts, schemes) + _fp4_dtype_notes(s)
    notes += marlin_note(s, s.layout["modules"])
    if grids := misread_block_grids(s, schemes):
        misloaded["compressed_tensors"] = (f"guesses the block grids of {len(grids)} block-FP8 linears from their "
                                           f"scales' shapes ({pattern(grids)}): the load fails or misreads them")
        checked["compressed_tensors"] = CT_GUESSES_BLOCKS
        notes.append(f"compressed-tensors <= {CT_GUESSES_BLOCKS} (all that torch < 2.10 can install) "
                     f"{misloaded['compressed_tensors']} when transformers loads it; compressed-tensors 0.19 and "
                     "later, vLLM and SGLang read the scheme")
    return {"consumer_notes": notes, "misloaded_by": checked, "misloaded_why": misloaded}


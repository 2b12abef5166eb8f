"""Which weight shapes the runtimes' kernels compute as stored: 128x128 block FP8 (DeepSeek-V3 / Kimi K2's
``weight_block_size``) and FP4 routed experts. The facts the exporters (``hf_common``, ``fused_moe``) and the
planner (``shape``, ``plan``) share. A linear that fails :func:`fused_block_ok` is kept bf16 by hf-fp8-block (and
counted so by the planner); one that fails :func:`block_ok` is refused as a routed expert by compressed-tensors and
hf-modelopt; one that fails :func:`runs_in_blocks` no runtime computes in block FP8; FP4 experts that fail
:func:`fp4_widths_ok` are refused by both FP4 exports."""

from __future__ import annotations

from moepress.compress.quant.fp8 import DEFAULT_BLOCK

# TensorRT-LLM's fused MoE for INT4 experts (_torch/modules/fused_moe/quantization.py
# WInt4AFP8FusedMoEMethod.create_weights, main 2026-12) allocates fc31_weight_scale / fc2_weight_scale of
# hidden_size // 128 and intermediate // 128 groups: experts in other groups fail to load (their scales are copied
# into those shapes)
TRTLLM_INT4_MOE_GROUP = 128

# TensorRT's INT4 Q/DQ blocks (docs.nvidia.com/deeplearning/tensorrt, latest pages read 2026-12, 11.3 the newest
# versioned one: inference-library/quantized-types-schemes.html "INT4 quantization requires per-block scales. The
# supported block sizes are {64, 128}", "TensorRT only supports INT4 for weight quantization"): an onnx export of
# INT4 linears in other blocks runs in onnxruntime, not in a TensorRT engine
TENSORRT_INT4_BLOCKS = (64, 128)

BLOCK = list(DEFAULT_BLOCK)  # DeepSeek-V3's block-FP8 weight block (its config.json weight_block_size)


def grid_ok(shape) -> bool:
    """Whether every consumer reads this weight's 128x128 scale grid the same way. transformers
    derives the block from the grid (block = rows // scale_rows: integrations/finegrained_fp8.py
    Fp8Dequantize._dequantize_one, which rejects or misreads partial edge blocks), so a dimension
    over 128 that is not a multiple of 128 (e.g. 192 -> 2 scale rows read as 96-row blocks) is
    ambiguous; one partial block (a dimension <= 128) reads the same everywhere. Real DeepSeek-V3 /
    Kimi K2 dimensions are multiples of 128 but kv_a_proj_with_mqa's 576 rows (so a bf16 source's is kept bf16)."""
    return all(d <= BLOCK[0] or d % BLOCK[0] == 0 for d in shape)


def runs_in_blocks(shape, is_routed: bool) -> bool:
    """Whether the runtimes compute a linear of this [out, in] shape in 128x128 block FP8 at all: its input in
    whole 128-wide groups (activations are quantized per token in 1x128 groups: vLLM
    ``fp8_utils.per_token_group_quant_fp8`` and SGLang assert ``x.shape[-1] % group_size == 0``) and a routed
    expert's output in whole blocks too (the fused MoE paths refuse other expert widths, at or under 128 as
    well: SGLang 00563d36 ``layers/quantization/fp8.py`` Fp8MoEMethod "is not divisible by weight quantization
    block_n", TensorRT-LLM a98a9061 ``_torch/modules/fused_moe/quantization.py``
    DeepSeekFP8BlockScalesFusedMoEMethod asserts ``intermediate_size_per_partition % 128 == 0``). A dense
    output with a partial last block runs (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa``, the last part of its fused
    q_a / kv_a; inside a fused linear vLLM takes a partial block only from a config that gives ``weight_block_size``:
    fused_moe.partial_fused_blocks)."""
    out, inp = shape
    return inp % BLOCK[1] == 0 and (out % BLOCK[0] == 0 or not is_routed)


def block_ok(shape, is_routed: bool) -> bool:
    """Whether every consumer computes a linear of this [out, in] shape, stored in 128x128 block FP8, as stored:
    the runtimes (:func:`runs_in_blocks`) and, for a dense output, transformers too (at most 128 rows or whole
    blocks: :func:`grid_ok`)."""
    return runs_in_blocks(shape, is_routed) and (is_routed or grid_ok(shape))


# TensorRT-LLM's PyTorch backend builds these fused linears from the checkpoint's (HfWeightMapper
# qkv_proj / gate_up_proj; DeepSeek-V3 attention's fused_a from q_a_proj + kv_a_proj_with_mqa,
# _torch/models/modeling_deepseekv3.py) and tests exclude_modules on the fused name
# (QuantConfig.is_module_excluded_from_quantization: fnmatchcase on the name and its parents).
TRTLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
                "fused_a": ("q_a_proj", "kv_a_proj_with_mqa")}


def fused_group(names, base: str) -> list[str]:
    """The linears that the runtimes fuse with ``base`` into one (``TRTLLM_FUSED``), in fused order, ``base``
    included; [] when it is not fused with another. ``names``: the stored tensor names (a CheckpointReader, or a
    set of ``<linear>.weight``)."""
    parent, _, leaf = base.rpartition(".")
    for parts in TRTLLM_FUSED.values():
        if leaf in parts:
            found = [f"{parent}.{p}" for p in parts if f"{parent}.{p}.weight" in names]
            return found if len(found) > 1 else []
    return []


def fused_blocks_ok(leaf: str, rows: list[int]) -> bool:
    """Whether block-FP8 parts of these output widths (fused order) load as one fused linear. vLLM 0.33.0 allocates
    the fused weight_scale_inv as ceil(sum(rows) / 128) rows and copies part i's scale rows at row
    ceil(offset_i / 128) (layers/linear.py adjust_block_scale_shard; a part past the end fails narrow() at load,
    one that fits is read with its neighbour's scale); SGLang 0.5.23 refuses qkv / gate_up parts that are not
    multiples of 128 (layers/quantization/fp8.py validate_block_quant_shapes) and concatenates q_a's and kv_a's
    scales into one ReplicatedLinear's (models/deepseek_common/deepseek_weight_loader.py). So every part is whole
    blocks, but for DeepSeek's kv_a_proj_with_mqa (576 rows in DeepSeek-V3), the last of its pair."""
    if not rows:
        return True
    last_free = leaf in TRTLLM_FUSED["fused_a"]
    return all(r % BLOCK[0] == 0 for r in (rows[:-1] if last_free else rows))


def fused_block_ok(names, shape_of, base: str, is_routed: bool, shape_ok=None) -> bool:
    """Whether hf-fp8-block writes the linear ``base`` in block FP8 (else bf16), the one decision its export and the
    planner take: :func:`block_ok` of its [out, in] shape and, for a dense linear the runtimes fuse with others
    (:func:`fused_group` in ``names``), every part's too, each part but the last of DeepSeek's q_a / kv_a pair in
    whole 128-row blocks (:func:`fused_blocks_ok`). ``shape_of``: a linear's name -> its [out, in] shape.
    ``shape_ok``: the per-shape rule in place of :func:`block_ok` (a block-FP8 input copied as it ships:
    :func:`runs_in_blocks`, whose dense outputs transformers may read with another grid)."""
    shape_ok = shape_ok or block_ok
    if not shape_ok(shape_of(base), is_routed):
        return False
    parts = [] if is_routed else fused_group(names, base)
    return all(shape_ok(shape_of(p), False) for p in parts) and fused_blocks_ok(
        base.rpartition(".")[2], [shape_of(p)[0] for p in parts])


def fp4_widths_ok(hidden: int, width: int) -> bool:
    """Whether the FP4 fused-MoE kernels run routed experts of this hidden size and expert width: both multiples
    of 64, one of them of 128. vLLM (compressed-tensors and Model-Optimizer checkpoints alike) runs them with
    Marlin (NVFP4 before Blackwell, MXFP4 always), which tiles a GEMM by thread configs (K, N) of (128, 128),
    (64, 128), (128, 64) or (64, 256) (vllm-project/vllm csrc/quantization/marlin/marlin.cu, commit 778460ce:
    "Invalid thread config" otherwise), or with FlashInfer's CUTLASS NVFP4 MoE, the Blackwell default, which pads
    the gate / up block scales to 128 rows and refuses to pad a gated expert (utils/flashinfer_fp4_moe.py,
    296ce48d: "Intermediate size padding for w1 and w3 ... not currently supported"); for gate / up K = hidden,
    N = 2 x width, for down K = width, N = hidden. TensorRT-LLM's NVFP4 fused MoE packs 16 values to an int64
    and 4 block scales to an int32: both widths multiples of 64 (NVIDIA/TensorRT-LLM a98a9061
    ``_torch/modules/fused_moe/quantization.py`` NVFP4FusedMoEMethod ``create_weights``: ``hidden_size //
    scaling_vector_size // block_scales_vec_size``)."""
    return hidden % 64 == 0 and width % 64 == 0 and (hidden % 128 == 0 or width % 128 == 0)


# vLLM's Marlin GEMM tiles a linear of in_features K and out_features N by one of these (thread_k, thread_n)
# (csrc/quantization/marlin/marlin.cu small_batch_thread_configs / large_batch_thread_configs, 778460ce; "Invalid
# thread config" at the first forward where none divides): vLLM runs FP4 dense linears with it (compressed-tensors
# W4A16 MXFP4 / NVFP4 always, schemes/compressed_tensors_w4a16_*.py; NVFP4 before Blackwell, modelopt.py
# prepare_fp4_layer_for_marlin)
MARLIN_TILES = ((128, 128), (64, 128), (128, 64), (64, 256))


def marlin_tiles(k: int, n: int) -> bool:
    """Whether Marlin tiles a [n, k] linear (:data:`MARLIN_TILES`)."""
    return any(k % tk == 0 and n % tn == 0 for tk, tn in MARLIN_TILES)


def mla_rule_flags(per_tensor: bool) -> str:
    """The --rule flags that keep bf16 what TensorRT-LLM's DeepSeek-V3 / Kimi K2 loader misreads in an hf-modelopt
    export (modelopt_misloads.trtllm_misloads): the MLA kv_b_proj in any format, q_a / kv_a in FP8 per tensor or
    channel (``per_tensor``)."""
    parts = ("kv_b_proj", *(("q_a_proj", "kv_a_proj_with_mqa") if per_tensor else ()))
    return "".join(f" --rule 'self_attn.{p}=none'" for p in parts)

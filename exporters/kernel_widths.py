"""Which weight shapes the runtimes' kernels compute as stored: 128x128 block FP8 (DeepSeek-V3 / Kimi K2's
``weight_block_size``) and FP4 routed experts. The facts the exporters (``hf_common``, ``fused_moe``) and the
planner (``shape``, ``plan``) share. A linear that fails :func:`block_ok` is kept bf16 by hf-fp8-block and
refused as a routed expert by compressed-tensors and hf-modelopt; one that fails :func:`runs_in_blocks` no
runtime computes in block FP8 (the planner counts it bf16); FP4 experts that fail :func:`fp4_widths_ok` are
refused by both FP4 exports."""

from __future__ import annotations

BLOCK = [128, 128]  # DeepSeek-V3's block-FP8 weight block (its config.json weight_block_size)


def grid_ok(shape) -> bool:
    """Whether every consumer reads this weight's 128x128 scale grid the same way. transformers
    derives the block from the grid (block = rows // scale_rows: integrations/finegrained_fp8.py
    Fp8Dequantize._dequantize_one, which rejects or misreads partial edge blocks), so a dimension
    over 128 that is not a multiple of 128 (e.g. 192 -> 2 scale rows read as 96-row blocks) is
    ambiguous; one partial block (a dimension <= 128) reads the same everywhere. Real DeepSeek-V3 /
    Kimi K2 dimensions are all multiples of 128."""
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

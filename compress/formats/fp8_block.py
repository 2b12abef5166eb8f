"""``fp8-block``: E4M3 weights with one scale per 128x128 block, FP8 activations per 1x128 block.

Stored: ``P.weight`` F8_E4M3, ``P.weight_scale`` F32 [ceil(out/128), 1, ceil(in/128), 1], as Model-Optimizer
0.47 exports it and vLLM 0.33 allocates it (compress/quant/fp8.py modelopt_block): the quantize output declares
``fp8_pb_wo``, so vLLM reads it as one. Its values are the grid DeepSeek-V3 ships as 2-D ``weight_scale_inv``
(deepseek-ai/DeepSeek-V3 README_WEIGHTS.md; hf-fp8-block and compressed-tensors write that 2-D grid). Readers take
both shapes (quantize outputs written before stored the 2-D grid; hf-modelopt re-exports them 4-D). TensorRT-LLM
QuantAlgo ``FP8_BLOCK_SCALES``. Model-Optimizer checkpoints name it ``fp8_pb_wo`` (modelopt 0.47
export/quant_utils.py), and so do we: TensorRT-LLM canonicalises that alias to FP8_BLOCK_SCALES
(tensorrt_llm/quantization/modelopt_config.py, parse_modelopt_quant_config) and vLLM 0.33 accepts it
upper-cased (model_executor/layers/quantization/modelopt.py LINEAR_ALGOS ``FP8_PB_WO``), while vLLM
refuses ``FP8_BLOCK_SCALES`` as a checkpoint's quant_algo (QUANT_ALGOS) and leaves a
MIXED_PRECISION layer so named unquantized. TensorRT-LLM releases before the alias read only the enum
name; the trtllm-ckpt exporter writes the enum name. compressed-tensors
``float-quantized``, weights strategy block [128, 128], dynamic group-128 input.

Not for routed experts in a Model-Optimizer checkpoint: TensorRT-LLM's fused MoE reads block-FP8
expert scales only under DeepSeek's name ``weight_scale_inv``
(tensorrt_llm/_torch/modules/fused_moe/quantization.py, DeepSeekFP8BlockScalesFusedMoEMethod
``load_expert_all_weight_scale_fp8_block_scale``, VANILLA loading mode, main 2026-11; older releases
fail with a KeyError, newer ones leave the scales unset), while Model-Optimizer names them
``weight_scale``; vLLM's Model-Optimizer MoE method takes per-tensor FP8 experts only. Such experts go to
the hf-fp8-block export (DeepSeek's names) or compressed-tensors.

Also the input decoder for DeepSeek-V3 / Kimi K2 native block-FP8 checkpoints
(``weight_scale_inv``, block size from ``quantization_config.weight_block_size``).
"""

import torch

import moepress.compress.formats._fp8 as _fp8
from moepress.compress.formats.base import GROUP, Format, QuantContext, Quantized
from moepress.compress.quant import fp8
from moepress.errors import MoepressError


def _quantize_one(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, grid = fp8.quantize_block(w)
    return q, fp8.modelopt_block(grid)


def quantize(ws: list[torch.Tensor], ctx: QuantContext) -> Quantized:
    """E4M3 weights and their block scales in Model-Optimizer's 4-D layout (:func:`fp8.modelopt_block`): the
    quantize output declares ``fp8_pb_wo`` (hf_quant_config.json, config.json), and vLLM 0.33 loads that from
    it with the FP8_PB_WO linear method, which allocates [ceil(out/128), 1, in/128, 1] and asserts it
    (model_executor/parameter.py ``_assert_and_load``): a 2-D grid is refused there."""
    return Quantized(_fp8.each(ws, _quantize_one))


def decode_deepseek(reader, base: str, dtype: torch.dtype):
    """DeepSeek / Kimi block FP8: ``weight`` E4M3 + ``weight_scale_inv`` per block."""
    if base + ".weight_scale_inv" not in reader:
        return None
    q = reader.get(base + ".weight")
    s = reader.get(base + ".weight_scale_inv")
    br, bc = fp8.block_size_of(reader.config)
    want = (-(-q.shape[0] // br), -(-q.shape[1] // bc)) if q.ndim == 2 else None
    if want is None or tuple(s.shape) != want:  # one scale per (partial) block, or it is another layout
        raise MoepressError(f"{reader.path}: tensor '{base}.weight_scale_inv' has shape {list(s.shape)}; expected "
                            f"{list(want) if want else '[blocks, blocks]'} for weight {list(q.shape)} in "
                            f"{br}x{bc} blocks (quantization_config.weight_block_size)")
    return fp8.dequantize_block(q, s, (br, bc), dtype)


# transformers' quant_method of a FineGrainedFP8Config, which DeepSeek-V3 / Kimi K2 configs carry with a
# weight_block_size (transformers/utils/quantization_config.py, QuantizationMethod.FP8)
HF_METHOD = "fp8"


def transformers_fp8(q) -> bool:
    """``q`` (a config's quantization_config) is transformers' finegrained FP8 (quant_method fp8: DeepSeek's
    block-FP8 layout and what transformers itself writes), whose linears quantize their activations."""
    return isinstance(q, dict) and q.get("quant_method") == HF_METHOD


def block_config(q) -> bool:
    """``q`` is a block-FP8 quantization_config (quant_method fp8 with a weight_block_size): what this format's
    input decoder reads, and what an hf-fp8-block export writes."""
    return transformers_fp8(q) and bool(q.get("weight_block_size"))


def quantization_config(not_converted: list[str] | None = None) -> dict:
    """DeepSeek-V3's block-FP8 quantization_config (128x128 blocks, dynamic activations), with the modules left in
    high precision where given (transformers' ``modules_to_not_convert``)."""
    q = {"quant_method": HF_METHOD, "fmt": "e4m3", "activation_scheme": "dynamic",
         "weight_block_size": list(fp8.DEFAULT_BLOCK)}
    return q if not_converted is None else {**q, "modules_to_not_convert": not_converted}


def dynamic_native(config: dict) -> bool:
    """A config in DeepSeek's block-FP8 layout whose runtimes quantize the activations too (DeepSeek-V3, Kimi K2):
    quant_method fp8, 128x128 ``weight_block_size``, dynamic activations (per token in 1x128 groups: vLLM
    fp8_utils.py ``per_token_group_quant_fp8``; vLLM's Fp8Config takes block weights with dynamic activations only)."""
    q = config.get("quantization_config")
    return (transformers_fp8(q) and list(q.get("weight_block_size") or ()) == [GROUP, GROUP]
            and q.get("activation_scheme", "dynamic") == "dynamic")


def ct_scheme(group, targets):
    from compressed_tensors.quantization import QuantizationScheme

    return QuantizationScheme(targets=targets, weights=_fp8.ct_args(strategy="block", block_structure=[128, 128]),
                              input_activations=_fp8.ct_args(dynamic=True, strategy="group", group_size=128))


FORMAT = Format(
    name="fp8-block",
    split_unit=(128, 128), description="128x128 block weight scales, dynamic 1x128 activations (DeepSeek style)",
    element="fp8", scale="block", activation="block", archs=(90, 100), quant_algo="FP8_BLOCK_SCALES",
    alternatives=("fp8", "fp8-dynamic", "int4-awq", "nvfp4"), stored=("weight", "weight_scale"),
    quantize=quantize,
    stored_bytes=lambda out_f, in_f: out_f * in_f + 4 * -(-out_f // GROUP) * -(-in_f // GROUP),
    aliases=("FP8_PB_WO",), modelopt_entry=_fp8.modelopt_entry("fp8_pb_wo"),
    modelopt_moe_why="TensorRT-LLM's fused MoE reads block-FP8 expert scales only as DeepSeek's weight_scale_inv, "
    "not a Model-Optimizer checkpoint's weight_scale, and vLLM / SGLang load no block-FP8 experts from one",
    modelopt_group=lambda group: {"input_activations": {**_fp8.GROUP_ARGS, "dynamic": True, "group_size": 128},
                                  "weights": {**_fp8.GROUP_ARGS, "strategy": "block", "block_structure": [128, 128]}},
    ct_format="float-quantized", ct_scheme=ct_scheme, decode=_fp8.decode, input_decoders=(decode_deepseek,),
)

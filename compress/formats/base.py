"""What a quantization format is, as data: one frozen :class:`Format` per format.

Everything a stage, exporter, planner or the CLI needs to know about a format is an attribute
here, so that no module outside this package decides a format's properties from its name: the names its consumers
use (TensorRT-LLM / Model-Optimizer ``quant_algo``, the compressed-tensors format and scheme), the
tensors it stores, the GPU architectures that run it, its weight quantizer, its activation
fake-quant and its decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# bits per stored weight value, by Format.element
ELEMENT_BITS = {"bf16": 16, "fp8": 8, "int4": 4, "fp4": 4}

# Model-Optimizer's INT4 group and DeepSeek's FP8 block (plan sizes use it; compress/quant/int4.py)
GROUP = 128


@dataclass(frozen=True)
class QuantContext:
    """What a weight quantizer is handed for one group of linears that read the same input.

    ``stats``: the input's calibration statistics (an object with ``n`` rows seen, ``amax`` and
    ``act_mean`` per channel, ``sample()`` rows and ``H`` the Hessian 2 X^T X / n), or None for
    calibration-free formats and experts without tokens."""

    group_size: int = 128
    stats: object | None = None
    gptq_damp: float = 0.01
    gptq_act_order: bool | None = True
    awq_gptq: bool = True
    awq_clip: bool = True
    # AWQ folded (compress/quantize/fold.py): the caller already smoothed the weights and statistics
    # (x * p, W / p, the vector folded into the preceding op); no search, no pre_quant_scale stored
    awq_folded: bool = False


@dataclass
class Quantized:
    """A weight quantizer's result for one group: per linear, its stored tensors by suffix
    (``weight``, ``weight_scale``, ...); the AWQ ``pre_quant_scale`` the group shares; the INT4
    group; or why the group stays unquantized."""

    tensors: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pre_quant_scale: torch.Tensor | None = None
    awq_alpha: float | None = None
    group: int | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Format:
    """One quantization format.

    element: what a stored weight value is (``bf16``, ``fp8`` E4M3, ``int4``, ``fp4`` E2M1).
    scale: weight scale granularity (``tensor``, ``channel``, ``block`` 128x128, ``group`` of input
    channels; None unquantized). activation: ``none`` (weight-only), ``static`` (calibrated FP8
    ``input_scale``), ``token`` / ``block`` (FP8 per token / per 1x128 block, computed at run time).
    archs: the SM versions whose TensorRT-LLM kernels run it. alternatives: what to suggest, in
    order, on a GPU that cannot run it. aliases: other ``quant_algo`` spellings consumers write for it
    (Model-Optimizer's ``fp8_pb_wo``), read back as this format. modelopt_group: the format's config group in
    config.json's flat quantization_config, where a MIXED_PRECISION layer of it is described; modelopt_flat_group:
    whether a checkpoint of this format alone has one too (Model-Optimizer 0.47 convert_hf_config.py
    ``convert_hf_quant_config_format``: of moepress's formats FP8, NVFP4 and W4A16_NVFP4). quantize: (weights of
    linears sharing an input, :class:`QuantContext`) -> :class:`Quantized`; None for formats moepress plans but does
    not write. skip: (out_features, in_features, --group-size) -> why a linear of that shape stays unquantized
    (stored as it was and
    reported skipped), None when it quantizes; the quantizer and the checks made before a run (a recipe's preflight)
    ask the same rule. None: every shape quantizes.
    """

    name: str
    description: str
    element: str
    scale: str | None
    activation: str
    archs: tuple[int, ...]
    quant_algo: str | None = None
    aliases: tuple[str, ...] = ()
    calibrated: bool = False
    # what a tensor-parallel rank's share of a weight must hold whole: (rows of a column split, input
    # channels of a row split); None: one INT4 group of input channels (--group-size). vLLM refuses a
    # block-FP8 gate/up split of 192 rows (vllm-project/vllm#17569), SGLang a DeepSeek dense MLP at TP 32
    # (18432 / 32 = 576 rows: sgl-project/sglang#3345)
    split_unit: tuple[int, int] | None = (1, 1)
    awq: bool = False
    gptq: bool = False
    weight_scale_2: bool = False
    alternatives: tuple[str, ...] = ()
    stored: tuple[str, ...] = ()
    quantize: Callable[[list[torch.Tensor], QuantContext], Quantized] | None = None
    skip: Callable[[int, int, int], str | None] | None = None
    stored_bytes: Callable[[int, int], float] | None = None
    modelopt_entry: Callable[[int | None], dict] | None = None
    modelopt_group: Callable[[int | None], dict] | None = None
    modelopt_flat_group: bool = False
    ct_format: str | None = None
    ct_scheme: Callable[[int | None, list[str]], object] | None = None
    decode: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor] | None = None
    input_decoders: tuple[Callable, ...] = ()
    # formats whose weight needs more than (weight, weight_scale): the weight from one linear's stored
    # tensors by suffix (NVFP4's weight_scale_2); the stored dtype of its weight_scale, when that tells it
    # apart from another format with the same element (E4M3 for NVFP4, E8M0 uint8 for MXFP4)
    decode_stored: Callable[[dict[str, torch.Tensor], torch.dtype], torch.Tensor] | None = None
    weight_scale_dtype: torch.dtype | None = None
    # a static input scale other than FP8's amax / 448 (NVFP4: amax / (6 * 448)) and its fake quant
    input_scale_of: Callable[[torch.Tensor], torch.Tensor] | None = None
    # the code a static input of 1.0 becomes where an input scale can make a runtime's identity pass exact
    # (compress/quant/fp8.py identity_exact_input_scale), besides FP8 per tensor's 1.0: NVFP4's E2M1 6
    identity_top: float | None = None
    input_quant: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # compressed-tensors tensors written directly from our stored ones (suffix -> tensor), for formats
    # whose stored bytes already are the library's (NVFP4, MXFP4) instead of through its compressor
    ct_tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # the model families whose routed experts TensorRT-LLM's fused MoE loads in this format from a
    # Model-Optimizer checkpoint (None: every family): the reason, when not every family
    trtllm_moe_families: tuple[str, ...] | None = None
    trtllm_moe_why: str = ""
    # why no runtime loads routed experts in this format from a Model-Optimizer checkpoint under the names
    # Model-Optimizer gives them, whatever the family ("": they load where the lines above say)
    modelopt_moe_why: str = ""

    def trtllm_loads_experts(self, family: str) -> bool:
        """Does TensorRT-LLM's fused MoE load ``family``'s routed experts in this format?"""
        return self.trtllm_moe_families is None or family in self.trtllm_moe_families

    def modelopt_experts_why(self, family: str) -> str:
        """Why no runtime loads ``family``'s routed experts in this format from a Model-Optimizer checkpoint
        ("" where one does): the names (block FP8), else TensorRT-LLM's fused MoE."""
        return self.modelopt_moe_why or ("" if self.trtllm_loads_experts(family) else self.trtllm_moe_why)

    @property
    def produced(self) -> bool:
        """Does ``moepress quantize`` write it?"""
        return self.quantize is not None

    @property
    def weight_bits(self) -> int:
        """Bits per stored weight value (4 for INT4 and FP4)."""
        return ELEMENT_BITS[self.element]

    @property
    def modelopt_algo(self) -> str | None:
        """The ``quant_algo`` a Model-Optimizer checkpoint of this format carries."""
        return self.modelopt_entry(None)["quant_algo"] if self.modelopt_entry else self.quant_algo

    @property
    def static_input(self) -> bool:
        return self.activation == "static"

    @property
    def fp8_tensor_input(self) -> bool:
        """The input is cast to FP8 with the static per-tensor ``input_scale`` as is (not W4A8's
        x * pre_quant_scale, not NVFP4's per-block scales under a global one)."""
        return self.static_input and self.element == "fp8" and self.scale == "tensor"

    @property
    def identity_code(self) -> float | None:
        """The code an input of 1.0 becomes under an input scale made for identity passes (``identity_top``; FP8 per
        tensor: 1.0); None: the format has no static input scale that makes such a pass exact."""
        return 1.0 if self.fp8_tensor_input else self.identity_top

    @property
    def dynamic_input(self) -> bool:
        return self.activation in ("token", "block")

    def needs_hessian(self, awq_gptq: bool) -> bool:
        """Is the weight rounded by GPTQ (its input's Hessian needed)?"""
        return self.gptq or (self.awq and awq_gptq)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """The run-time (dynamic) activation quantization of this format, as fake quant."""
        from moepress.compress.quant import fp8

        if self.activation == "token":
            return fp8.fake_quant_per_token(x)
        if self.activation == "block":
            return fp8.fake_quant_per_token(x, GROUP)
        return x

    @property
    def decodes(self) -> bool:
        """Can its stored weights be dequantized (:meth:`dequantize`)?"""
        return self.decode is not None or self.decode_stored is not None

    def dequantize(self, t: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One linear's weight from its stored tensors ``t`` (``weight``, ``weight_scale``, ...)."""
        if self.decode_stored is not None:
            return self.decode_stored(t, dtype)
        return self.decode(t["weight"], t["weight_scale"], dtype)

    def input_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The static ``input_scale`` of an input whose calibrated max |x| is ``amax``."""
        from moepress.compress.quant import fp8

        return self.input_scale_of(amax) if self.input_scale_of is not None else fp8.scale_from_amax(amax)

    def fake_quant_static_input(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        """The GEMM's quantization of an input with a static ``input_scale``, as fake quant."""
        from moepress.compress.quant import fp8

        return self.input_quant(x, input_scale) if self.input_quant is not None else fp8.fake_quant(x, input_scale)

    def ct_scale(self, s: torch.Tensor) -> torch.Tensor:
        """A stored weight scale -> compressed-tensors' parameter shape (tensor strategy: [1]; channel: [out, 1],
        where Model-Optimizer's layout stores [out]; block: the 2-D grid, where Model-Optimizer's is 4-D)."""
        from moepress.compress.quant import fp8

        if self.scale == "tensor":
            return s.float().reshape(1)
        if self.scale == "block":
            return fp8.block_grid(s.float())
        return s.float().reshape(-1, 1) if self.scale == "channel" else s.float()

    def modelopt_scale(self, s: torch.Tensor) -> torch.Tensor:
        """A stored weight scale -> the shape Model-Optimizer 0.47 exports it in: block FP8's grid as
        [ceil(out/128), 1, ceil(in/128), 1] (compress/quant/fp8.py modelopt_block: what vLLM 0.33 allocates;
        the quantize output stores it so, one written before stored the 2-D grid); every other scale is stored in
        that layout already."""
        from moepress.compress.quant import fp8

        return fp8.modelopt_block(s) if self.scale == "block" else s

"""What the TensorRT-LLM checkpoint export (exporters/trtllm_ckpt.py) refuses of its source, in one line: a
quantized form other than FP8 per tensor with static input scales in every decoder linear, and attention or MLP
features its config.json cannot say (rope scaling, a sliding window, biases, an activation other than SiLU)."""

from __future__ import annotations

from pathlib import Path

from moepress.compress import formats
from moepress.compress.checkpoint import CheckpointReader
from moepress.errors import MoepressError
from moepress.exporters.fused_moe import pattern
from moepress.exporters.hf_common import FLOAT_DTYPES, Source, decoder_linears, open_source
from moepress.exporters.hf_modelopt import elsewhere_taken
from moepress.exporters.linears import read_linear

# what this exporter writes (quant_algo): the words of its refusals
WRITES = "bf16 or FP8 per tensor (moepress quantize --format fp8)"


def source(reader: CheckpointReader, adapter) -> Source:
    """The checkpoint as hints.elsewhere reads it (its layout, if moepress quantize wrote it)."""
    return Source(Path(reader.path), reader, adapter, formats.read_layout(reader.path))


def quant_algo(reader: CheckpointReader, adapter) -> tuple[str | None, str | None]:
    """(quant_algo, kv_cache_quant_algo) from every decoder linear: all stored in float is bf16; a quantized
    one decides (FP8 per tensor then needs all of them so; anything else is refused). Every linear, not one
    probe: a linear left bf16 (a --rule, a width quantize skipped) says nothing of the others."""
    kv = "FP8" if any(n.endswith((".k_scale", ".v_scale")) for n in reader.layer_names(0)) else None
    linears = decoder_linears(reader, adapter)
    quantized = [b for b in linears if reader.info(b + ".weight").dtype not in FLOAT_DTYPES]
    if not quantized:
        return None, kv
    lin = read_linear(reader, quantized[0], "--format trtllm-ckpt", WRITES)
    if lin.scheme != "tensor":  # FP8 per tensor: TensorRT-LLM QuantAlgo FP8
        raise MoepressError(f"--format trtllm-ckpt: {reader.path} is quantized as {lin.stored_as}, which this exporter "
                            f"does not write: it writes {WRITES}; {elsewhere_taken(source(reader, adapter))}")
    refuse_partly_fp8(reader, adapter, linears)
    return "FP8", kv


def refuse_partly_fp8(reader: CheckpointReader, adapter, linears: list[str]) -> None:
    """An FP8 checkpoint must be FP8 per tensor in every decoder linear but the routers: the config has one
    quant_algo and excludes only lm_head and the routers, and the writer fuses q/k/v and w3/w1 under one
    scale (an attention left bf16 made every weight of its layer bf16 under quant_algo FP8)."""
    def fp8_per_tensor(base: str) -> bool:
        scale = base + ".weight_scale"
        return reader.info(base + ".weight").dtype == "F8_E4M3" and scale in reader and reader.info(scale).nbytes <= 4

    plain = [b for b in linears if not fp8_per_tensor(b)]
    if plain:
        raise MoepressError(f"--format trtllm-ckpt: {reader.path} has {len(plain)} decoder linears not in FP8 per "
                            f"tensor ({pattern(plain)}); this exporter writes one quant_algo for every linear but "
                            f"the routers; for mixed precision: {elsewhere_taken(source(reader, adapter))}")
    unscaled = [b for b in linears if not static_input(reader, b + ".input_scale")]
    if unscaled:  # written as 0: TensorRT-LLM divides by it (layers/moe.py forward_experts: fc2_quant = 1 / scale)
        raise MoepressError(f"--format trtllm-ckpt: {reader.path} has {len(unscaled)} FP8 linears without a static "
                            f"input_scale > 0 ({pattern(unscaled)}); TensorRT-LLM's FP8 (QuantAlgo FP8) quantizes "
                            f"every input with its activation_scaling_factor: quantize with --format fp8 (calibrated "
                            f"input scales)")


def static_input(reader: CheckpointReader, name: str) -> bool:
    """A one-value, finite, positive static input scale."""
    if name not in reader or reader.info(name).nbytes > 4:
        return False
    v = float(reader.get(name).float().reshape(()))
    return 0.0 < v < float("inf")


def refuse_unwritten_attention(src: Path, adapter, reader, instead: str | None = None) -> None:
    """The config trtllm_ckpt.py writes has MoE layers only, unscaled rotary embeddings, no attention window, no
    biases and SiLU-gated MLPs (``rotary_scaling``, ``max_attention_window_size``, ``attention_bias`` unmapped;
    ``hidden_act`` swiglu): a model with other is refused rather than built to compute differently from its
    checkpoint. ``instead``: what the refusal names to do (a recipe's, whose quantize changes what the other
    exports take); default: the exports that take ``src`` itself."""
    c = adapter.hf_config

    def elsewhere() -> str:
        return instead or elsewhere_taken(open_source(src))
    dense = [i for i in range(adapter.num_layers) if not adapter.is_moe_layer(i)]
    if dense:  # found by the writer at that layer, after a run's prune and quantize (trtllm_ckpt.py experts)
        raise MoepressError(f"--format trtllm-ckpt: {src}/config.json makes layer(s) {dense[:5]} dense"
                            f"{adapter.layer_kind()}; this exporter writes MoE layers only: "
                            f"{elsewhere()}")
    kind, act = adapter.build_rotary().rope_type, getattr(c, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise MoepressError(f"--format trtllm-ckpt: {src}/config.json has hidden_act {act!r}; this exporter writes a "
                            f"SiLU-gated MLP (hidden_act swiglu): {elsewhere()}")
    if kind != "default":
        raise MoepressError(f"--format trtllm-ckpt: {src}/config.json has rope_type {kind!r} (rope scaling), which "
                            "this exporter does not write (TensorRT-LLM's PyTorch backend reads it from config.json): "
                            f"{elsewhere()}")
    biased = [n for n in reader.names() if n.endswith(".bias")]
    if biased:  # written, the config would say attn_bias false and the engine would run without them
        raise MoepressError(f"--format trtllm-ckpt: {src} stores {len(biased)} linear biases (e.g. {biased[0]}), which "
                            f"this exporter does not write: {elsewhere()}")
    w = getattr(c, "sliding_window", None)
    if w is not None and int(w) < int(c.max_position_embeddings):
        raise MoepressError(f"--format trtllm-ckpt: {src}/config.json has sliding_window {w} (shorter than max_position"
                            f"_embeddings {c.max_position_embeddings}), which this exporter does not write (TensorRT-"
                            f"LLM's PyTorch backend reads it from config.json): {elsewhere()}")

"""``checkpoint``: anything StreamedModel reads (original, pruned, block-FP8, moepress-quantized).

A streamed candidate: the check advances it layer by layer in lockstep with the reference, so
memory is about two layers, never two models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from moepress.checks.candidates.base import Candidate, CandidateKind, config_json
from moepress.checks.config import CheckConfig
from moepress.compress.formats import SIDECAR, by_quant_algo, fp8_block, layout_of
from moepress.compress.formats.fake_quant import act_hook
from moepress.compress.inspect import non_hf_export
from moepress.compress.moe import AttentionObserver
from moepress.compress.quant import fp8
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.exporters.artifacts import kv_cache_declared
from moepress.exporters.kernel_widths import runs_in_blocks


class CheckpointCandidate(Candidate):
    kind = "checkpoint"
    streamed = True
    has_hidden = True

    def __init__(self, path: Path, cfg: CheckConfig):
        super().__init__(path)
        un = unstreamed_activations(path)
        if un is not None:
            other = ("use --kind transformers" if un.transformers_runs else "transformers 5 has no Model-Optimizer "
                     "loader either; check the `moepress quantize` output it came from")
            raise MoepressError(f"{path}: {un.why}, which the checkpoint kind does not apply (it streams the weights "
                                f"only); {other}")
        # weights kept as stored, as the reference's (checks/runner.py)
        self.stream = runtime_kv_cache(runtime_activations(StreamedModel(str(path), prefetch=False, keep_stored=True)))
        self.vocab_size = self.stream.adapter.vocab_size
        self.num_layers = self.stream.num_layers

    def describe(self) -> dict:
        q = self.stream.config.get("quantization_config") or {}
        return {**super().describe(), "family": self.stream.adapter.family,
                "num_experts": self.stream.adapter.num_experts,
                "quantization": q.get("quant_method") or q.get("quant_algo")}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stream.forward([ids])[0]


def runtime_kv_cache(sm: StreamedModel) -> StreamedModel:
    """``sm`` with an FP8 KV cache where the checkpoint declares one and holds one scale per k / v
    (``self_attn.k_scale`` / ``v_scale`` of a moepress quantize output, ``self_attn.k_proj.k_scale`` /
    ``v_proj.v_scale`` of its hf-modelopt export): the keys and values the attention reads are the cached ones,
    x / s clamped to +-448, in E4M3, times s, as vLLM writes and reads its cache (csrc quantization/fp8
    ``scaled_convert``); without it the stream would run the cache unquantized, and a wrong scale would not show.
    Not for a latent (MLA) cache, whose runtimes keep its scale at 1.0 whatever the checkpoint holds (README,
    --kv-cache), nor per-head scales. Returns ``sm``."""
    declared = kv_cache_declared(sm.ckpt.path)
    if sm.adapter.latent_kv_cache or declared is None or declared.quant_algo != "FP8":
        return sm

    def attach(reader, prefix: str, layer) -> None:
        names = [next((prefix + f"self_attn.{n}" for n in (f"{k}_scale", f"{k}_proj.{k}_scale")
                       if prefix + f"self_attn.{n}" in reader), None) for k in "kv"]
        scales = [reader.get(n) for n in names] if None not in names else []
        if not scales or any(s.numel() != 1 for s in scales):  # none, or per-head scales: not simulated
            return
        ks, vs = (s.float().reshape(()) for s in scales)
        AttentionObserver(layer.self_attn, lambda key, value: (fp8.fake_quant(key, ks), fp8.fake_quant(value, vs)))

    sm.on_build.append(attach)
    return sm


def native_block_fp8(sm: StreamedModel) -> bool:
    """A checkpoint in DeepSeek's block-FP8 layout (DeepSeek-V3, Kimi K2 and what prune keeps of them): config
    ``quantization_config`` quant_method fp8 with 128x128 ``weight_block_size`` and dynamic activations, and no
    moepress_quant.json (a moepress output declares its own activations there)."""
    return fp8_block.dynamic_native(sm.config) and not layout_of(sm.ckpt)


def runtime_activations(sm: StreamedModel) -> StreamedModel:
    """``sm`` computing a native block-FP8 checkpoint's linears as its runtimes do: inputs quantized to FP8 per
    token in 1x128 groups (vLLM fp8_utils.py ``per_token_group_quant_fp8``, SGLang alike) on the linears they compute
    in blocks (kernel_widths.runs_in_blocks), the same fake quant and linears as its hf-fp8-block export (the same
    bytes) is checked with through its moepress_quant.json. The stream alone runs such a checkpoint weight-only
    (prune and quantize gather their statistics so); a check of it, or against it, would understate its error and
    read a difference between identical bytes. Returns ``sm``."""
    if not native_block_fp8(sm):
        return sm
    hook = act_hook("fp8-block", None, None)

    def attach(reader, prefix: str, layer) -> None:
        for n, m in layer.named_modules():
            full = prefix + n
            if full + ".weight_scale_inv" in reader and runs_in_blocks(
                    tuple(reader.info(full + ".weight").shape), sm.adapter.expert_index(full) is not None):
                m.register_forward_pre_hook(hook)

    sm.on_build.append(attach)
    return sm


def streamable(path: Path) -> bool:
    """StreamedModel can read every tensor of the first decoder layer (a cheap probe)."""
    try:
        sm = StreamedModel(str(path), prefetch=False)
        prefix = sm.adapter.layer_prefix(0)
        if all(prefix + k in sm.ckpt for k in sm.expected_layer_shapes(0)):
            return True
        sm.read_layer_state(0)  # a registered weight decoder may serve names the files lack
        return True
    except MoepressError:
        return False


class Unstreamed(NamedTuple):
    """Activation quantization a directory declares that the stream would leave out: why, and
    whether transformers runs the directory instead (compressed-tensors) or nothing here does
    (Model-Optimizer: transformers 5.24 has no loader for it)."""

    why: str
    transformers_runs: bool


def unstreamed_activations(path: Path) -> Unstreamed | None:
    """What activation quantization ``path`` declares that the stream would leave out (None: none).
    The stream fake-quantizes activations as a ``moepress quantize`` output's moepress_quant.json says
    (hf-modelopt and hf-fp8-block exports carry it); a compressed-tensors ``input_activations`` scheme
    or a Model-Optimizer checkpoint's activation scales without it would be checked as weight-only
    while vLLM or transformers quantize those activations."""
    if (path / SIDECAR).is_file():
        return None
    q = (config_json(path) or {}).get("quantization_config") or {}
    groups = q.get("config_groups") if isinstance(q, dict) else None
    if isinstance(groups, dict) and any(isinstance(g, dict) and g.get("input_activations") for g in groups.values()):
        return Unstreamed("its compressed-tensors quantization_config quantizes activations (input_activations)", True)
    try:
        algo = json.loads((path / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    f = by_quant_algo(str(algo)) if algo else None
    if f is not None and f.activation != "none":
        return Unstreamed(f"its hf_quant_config.json quantizes activations ({algo})", False)
    return None


def _detect_checkpoint(path: Path) -> bool:
    cfg = config_json(path) if path.is_dir() else None
    if cfg is None:
        return False
    if not cfg.get("quantization_config"):
        return True  # a plain checkpoint: StreamedModel reads it, or says exactly why not
    un = unstreamed_activations(path)
    if un is not None:  # compressed-tensors: transformers runs it; Model-Optimizer: opened here, to be refused
        return not un.transformers_runs
    return streamable(path)


def _open_checkpoint(path: Path, cfg: CheckConfig, device=None) -> Candidate:
    info = non_hf_export(path)
    if info is not None and info.get("format") == "onnx":  # --kind checkpoint given for an ONNX export
        raise MoepressError(f"{path}: an onnx export (export.json), which the streamed checkpoint kind does not "
                            "read: check it with --kind onnx (onnxruntime), or check the checkpoint it was exported "
                            "from")
    if info is not None:
        raise MoepressError(f"{path}: a trtllm-ckpt export (export.json), which trtllm-build loads and no runtime here "
                            f"runs: build its engine (`moepress build {path} --target T`) and check the engine "
                            "directory on a GPU (--kind engine), or check the checkpoint it was exported from")
    cand = CheckpointCandidate(path, cfg)
    cand.stream.to(device)
    return cand


KIND = CandidateKind("checkpoint", _open_checkpoint, priority=20, detect=_detect_checkpoint,
                     summary="a checkpoint directory moepress streams (original, pruned, block-FP8, quantized)")

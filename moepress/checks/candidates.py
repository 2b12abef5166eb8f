"""Candidate kinds: what `moepress check` compares with the reference, and how each one runs.

A kind is registered with :func:`register_candidate` (an opener, a detector for ``--kind
auto``, a priority among detectors), so an exporter adds the kind of what it writes
without touching the check. Two shapes of candidate:

* streamed (``checkpoint``): a :class:`StreamedModel`; the check advances it layer by
  layer in lockstep with the reference, so memory is about two layers, never two models;
* whole (``transformers``, ``onnx``, ``engine``): its own runtime runs a batch of token ids
  [B, S] and returns logits [B, S, V] and, where it can, each decoder layer's output.

Contract of an ONNX candidate (what the ONNX exporter writes): input ``input_ids`` int64
(or int32) [B, S]; optional inputs ``attention_mask`` (ones) and ``position_ids`` (0..S-1);
output ``logits`` [B, S, V]; optional outputs ``hidden_states.{i}`` [B, S, H], the
output of decoder layer i (the residual stream, before the final norm), i = 0..L-1.
A TensorRT engine built from such an ONNX file keeps the same tensor names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.checks.config import CheckConfig
from moepress.errors import MoepressError

ONNX_CONTRACT = "input_ids int64 [B, S] -> logits [B, S, V] (optional hidden_states.{i})"


@dataclass
class Outputs:
    """What a whole candidate returns for one batch (float32, on the CPU)."""

    logits: torch.Tensor  # [B, S, V]
    hidden: list[torch.Tensor] | None = None  # decoder layer i's output [B, S, H], i = 0..L-1
    last_normed: bool = False  # hidden[-1] is after the final norm (transformers' hidden_states)
    embed: torch.Tensor | None = None  # the embedding output [B, S, H]


class Candidate:
    """What every candidate knows about itself. Whole candidates implement :meth:`run`."""

    kind = ""
    streamed = False
    has_hidden = False  # returns per-layer hidden states
    fixed_seq: int | None = None  # a runtime that accepts one sequence length only

    def __init__(self, path: Path):
        self.path = path
        self.vocab_size: int | None = None
        self.num_layers: int | None = None

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "num_layers": self.num_layers,
                "vocab_size": self.vocab_size}

    def run(self, ids: torch.Tensor) -> Outputs:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of one batch (greedy generation calls this once per new token)."""
        return self.run(ids).logits

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class CandidateKind:
    name: str
    open: Callable[[Path, CheckConfig], Candidate]
    detect: Callable[[Path], bool] | None
    priority: int  # detectors run from the highest priority down
    summary: str
    gpu: bool = False


CANDIDATE_KINDS: dict[str, CandidateKind] = {}


def register_candidate(name: str, *, summary: str, detect: Callable[[Path], bool] | None = None,
                       priority: int = 0, gpu: bool = False):
    """Decorator for ``opener(path, cfg) -> Candidate``; ``detect(path)`` claims a path for ``--kind auto``."""

    def deco(opener):
        CANDIDATE_KINDS[name] = CandidateKind(name, opener, detect, priority, summary, gpu)
        return opener

    return deco


def detect_kind(path: Path) -> str:
    for k in sorted(CANDIDATE_KINDS.values(), key=lambda k: -k.priority):
        if k.detect is not None and k.detect(path):
            return k.name
    kinds = "; ".join(f"{k.name}: {k.summary}" for k in CANDIDATE_KINDS.values())
    raise MoepressError(f"{path}: not a candidate moepress can run (expected {kinds})")


def open_candidate(path: str | Path, cfg: CheckConfig) -> Candidate:
    path = Path(path)
    if not path.exists():
        raise MoepressError(f"{path}: candidate not found")
    kind = cfg.kind
    if kind == "auto":
        kind = detect_kind(path)
    elif kind not in CANDIDATE_KINDS:
        raise MoepressError(f"--kind {kind}: unknown candidate kind (expected auto, {', '.join(CANDIDATE_KINDS)})")
    return CANDIDATE_KINDS[kind].open(path, cfg)


def _config(path: Path) -> dict | None:
    p = path / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ---- checkpoint: anything StreamedModel reads (pruned, block-FP8, moepress-quantized) --------------

class CheckpointCandidate(Candidate):
    kind = "checkpoint"
    streamed = True
    has_hidden = True

    def __init__(self, path: Path, cfg: CheckConfig):
        from moepress.compress.stream import StreamedModel

        super().__init__(path)
        self.stream = StreamedModel(str(path), prefetch=False)
        self.vocab_size = self.stream.adapter.vocab_size
        self.num_layers = self.stream.num_layers

    def describe(self) -> dict:
        q = self.stream.config.get("quantization_config") or {}
        return {**super().describe(), "family": self.stream.adapter.family,
                "num_experts": self.stream.adapter.num_experts,
                "quantization": q.get("quant_method") or q.get("quant_algo")}

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.stream.forward([ids])[0]


def streamable(path: Path) -> bool:
    """StreamedModel can read every tensor of the first decoder layer (a cheap probe)."""
    from moepress.compress.stream import StreamedModel

    try:
        sm = StreamedModel(str(path), prefetch=False)
        prefix = sm.adapter.layer_prefix(0)
        if all(prefix + k in sm.ckpt for k in sm.expected_layer_shapes(0)):
            return True
        sm.read_layer_state(0)  # a registered weight decoder may serve names the files lack
        return True
    except MoepressError:
        return False


def _detect_checkpoint(path: Path) -> bool:
    cfg = _config(path) if path.is_dir() else None
    if cfg is None:
        return False
    if not cfg.get("quantization_config"):
        return True  # a plain checkpoint: StreamedModel reads it, or says exactly why not
    return streamable(path)


@register_candidate("checkpoint", priority=20, detect=_detect_checkpoint,
                    summary="a checkpoint directory moepress streams (original, pruned, block-FP8, quantized)")
def _open_checkpoint(path: Path, cfg: CheckConfig) -> Candidate:
    return CheckpointCandidate(path, cfg)


# ---- transformers: any directory AutoModelForCausalLM loads (e.g. compressed-tensors) -----------

class TransformersCandidate(Candidate):
    kind = "transformers"
    has_hidden = True

    def __init__(self, path: Path, cfg: CheckConfig):
        from transformers import AutoModelForCausalLM

        super().__init__(path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                         trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as e:
            raise MoepressError(f"{path}: transformers cannot load it as a causal LM ({_first_line(e)})") from None
        self.model = model.to(self.device).eval()
        text = self.model.config.get_text_config()
        self.vocab_size = int(text.vocab_size)
        self.num_layers = int(text.num_hidden_layers)
        q = getattr(self.model.config, "quantization_config", None)
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
        self.quantization = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum

    def describe(self) -> dict:
        return {**super().describe(), "class": type(self.model).__name__, "device": self.device,
                "quantization": str(self.quantization) if self.quantization else None}

    @torch.no_grad()
    def run(self, ids: torch.Tensor) -> Outputs:
        out = self.model(input_ids=ids.to(self.device), output_hidden_states=True, use_cache=False)
        # hidden_states: the embeddings, then every decoder layer's output, the last one after
        # the final norm (transformers/models/qwen3_moe/modeling_qwen3_moe.py, Qwen3MoeModel.forward)
        hs = [h.float().cpu() for h in out.hidden_states]
        return Outputs(out.logits.float().cpu(), hs[1:], last_normed=True, embed=hs[0])

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()


def _detect_transformers(path: Path) -> bool:
    cfg = _config(path) if path.is_dir() else None
    return bool(cfg and (cfg.get("architectures") or cfg.get("model_type"))
                and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))))


@register_candidate("transformers", priority=0, detect=_detect_transformers,
                    summary="a directory transformers' AutoModelForCausalLM loads (e.g. compressed-tensors)")
def _open_transformers(path: Path, cfg: CheckConfig) -> Candidate:
    return TransformersCandidate(path, cfg)


# ---- onnx: an ONNX model run with onnxruntime ------------------------------------------------------

_HIDDEN = re.compile(r"hidden_states\.(\d+)")


def _onnx_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.onnx"))
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    if len(files) == 1:
        return files[0]
    raise MoepressError(f"{path}: expected model.onnx or exactly one .onnx file, found "
                        f"{', '.join(p.name for p in files) or 'none'}")


class OnnxCandidate(Candidate):
    kind = "onnx"

    def __init__(self, path: Path, cfg: CheckConfig):
        import onnxruntime as ort

        super().__init__(path)
        self.file = _onnx_file(path)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        try:
            self.sess = ort.InferenceSession(str(self.file), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise MoepressError(f"{self.file}: onnxruntime cannot load it ({_first_line(e)})") from None
        inputs = {i.name: i for i in self.sess.get_inputs()}
        if "input_ids" not in inputs:
            raise MoepressError(f"{self.file}: no input 'input_ids' (inputs: {', '.join(inputs)}; "
                                f"expected {ONNX_CONTRACT})")
        extra = [n for n in inputs if n not in ("input_ids", "attention_mask", "position_ids")]
        if extra:
            raise MoepressError(f"{self.file}: input '{extra[0]}' is not part of the contract ({ONNX_CONTRACT}; "
                                f"attention_mask and position_ids are fed as ones and 0..S-1)")
        self.inputs = inputs
        self.id_dtype = "int32" if inputs["input_ids"].type == "tensor(int32)" else "int64"
        outs = {o.name: o for o in self.sess.get_outputs()}
        if "logits" not in outs:
            raise MoepressError(f"{self.file}: no output 'logits' (outputs: {', '.join(outs)}; "
                                f"expected {ONNX_CONTRACT})")
        hidden = {int(m.group(1)): n for n in outs if (m := _HIDDEN.fullmatch(n))}
        if hidden and sorted(hidden) != list(range(len(hidden))):
            raise MoepressError(f"{self.file}: outputs hidden_states.{{i}} must be numbered 0..L-1, "
                                f"found {sorted(hidden)}")
        self.hidden_names = [hidden[i] for i in range(len(hidden))]
        self.has_hidden = bool(hidden)
        self.num_layers = len(hidden) or None
        v = outs["logits"].shape[-1] if outs["logits"].shape else None
        self.vocab_size = v if isinstance(v, int) else None
        b, s = (list(inputs["input_ids"].shape) + [None, None])[:2]
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None
        self.fixed_seq = s if isinstance(s, int) and s > 0 else None

    def describe(self) -> dict:
        return {**super().describe(), "file": str(self.file), "providers": self.sess.get_providers(),
                "hidden_states": len(self.hidden_names)}

    def _run(self, ids: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        if self.fixed_seq is not None and ids.shape[1] != self.fixed_seq:
            raise MoepressError(f"{self.file}: input_ids has a fixed sequence length of {self.fixed_seq}; "
                                f"pass --seq-len {self.fixed_seq}")
        step = self.fixed_batch or ids.shape[0]
        parts: list[list] = []
        for s in range(0, ids.shape[0], step):
            x = ids[s:s + step]
            if x.shape[0] != step:
                raise MoepressError(f"{self.file}: input_ids has a fixed batch size of {step}; "
                                    f"{ids.shape[0]} samples do not divide into it")
            feed = {"input_ids": x.numpy().astype(self.id_dtype)}
            if "attention_mask" in self.inputs:
                feed["attention_mask"] = torch.ones_like(x).numpy().astype(self.id_dtype)
            if "position_ids" in self.inputs:
                feed["position_ids"] = torch.arange(x.shape[1]).expand_as(x).numpy().astype(self.id_dtype)
            parts.append(self.sess.run(names, feed))
        out = [torch.cat([torch.from_numpy(p[k]).float() for p in parts]) for k in range(len(names))]
        lg = out[0]
        if lg.ndim != 3 or tuple(lg.shape[:2]) != tuple(ids.shape):
            raise MoepressError(f"{self.file}: output 'logits' has shape {list(lg.shape)} for input_ids "
                                f"{list(ids.shape)}; expected [B, S, V]")
        return out

    def run(self, ids: torch.Tensor) -> Outputs:
        out = self._run(ids, ["logits", *self.hidden_names])
        return Outputs(out[0], out[1:] or None)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run(ids, ["logits"])[0]


def _detect_onnx(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".onnx"
    return (path / "model.onnx").is_file() or len(list(path.glob("*.onnx"))) == 1


@register_candidate("onnx", priority=30, detect=_detect_onnx,
                    summary=f"an ONNX model (file, or a directory with model.onnx): {ONNX_CONTRACT}")
def _open_onnx(path: Path, cfg: CheckConfig) -> Candidate:
    return OnnxCandidate(path, cfg)


# ---- engine: a TensorRT engine or a TensorRT-LLM engine directory (GPU only) -----------------------

class TensorRTCandidate(Candidate):
    """A TensorRT engine built from an ONNX file of the contract above (same tensor names).

    Runtime calls as in NVIDIA/TensorRT samples/python/common_runtime.py (TensorRT 10:
    named I/O tensors, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``).
    """

    kind = "engine"

    def __init__(self, path: Path, cfg: CheckConfig):
        import tensorrt as trt

        super().__init__(path)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise MoepressError(f"{path}: TensorRT cannot deserialize this engine (built for another GPU or "
                                f"TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if "input_ids" not in self.inputs or "logits" not in self.outputs:
            raise MoepressError(f"{path}: engine tensors {names}; expected {ONNX_CONTRACT}")
        hidden = {int(m.group(1)): n for n in self.outputs if (m := _HIDDEN.fullmatch(n))}
        self.hidden_names = [hidden[i] for i in sorted(hidden)]
        self.has_hidden = bool(hidden) and sorted(hidden) == list(range(len(hidden)))
        self.num_layers = len(hidden) or None
        self.vocab_size = int(self.engine.get_tensor_shape("logits")[-1]) or None

    def _torch_dtype(self, name: str) -> torch.dtype:
        t = self.trt.DataType
        table = {t.FLOAT: torch.float32, t.HALF: torch.float16, t.INT32: torch.int32, t.INT64: torch.int64}
        if hasattr(t, "BF16"):
            table[t.BF16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def run(self, ids: torch.Tensor) -> Outputs:
        bufs = {}
        for n in self.inputs:
            if n == "input_ids":
                x = ids
            elif n == "attention_mask":
                x = torch.ones_like(ids)
            elif n == "position_ids":
                x = torch.arange(ids.shape[1]).expand_as(ids)
            else:
                raise MoepressError(f"{self.path}: engine input '{n}' is not part of the contract ({ONNX_CONTRACT})")
            bufs[n] = x.to("cuda", self._torch_dtype(n)).contiguous()
            self.context.set_input_shape(n, tuple(bufs[n].shape))
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            bufs[n] = torch.empty(shape, dtype=self._torch_dtype(n), device="cuda")
        for n, t in bufs.items():
            self.context.set_tensor_address(n, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise MoepressError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        hidden = [bufs[n].float().cpu() for n in self.hidden_names] if self.has_hidden else None
        return Outputs(bufs["logits"].float().cpu(), hidden)


class TrtllmCandidate(Candidate):
    """A TensorRT-LLM engine directory, run with ``tensorrt_llm.runtime.ModelRunner``.

    Context logits need an engine built with ``--gather_context_logits``
    (NVIDIA/TensorRT-LLM tensorrt_llm/runtime/model_runner.py: ``from_dir``, ``generate(...,
    return_dict=True)`` -> ``context_logits`` when ``gather_context_logits``).
    """

    kind = "engine"

    def __init__(self, path: Path, cfg: CheckConfig):
        from tensorrt_llm.runtime import ModelRunner

        super().__init__(path)
        self.runner = ModelRunner.from_dir(engine_dir=str(path), rank=0)
        if not self.runner.gather_context_logits:
            raise MoepressError(f"{path}: the engine does not return context logits; rebuild it with "
                                f"--gather_context_logits")
        self.vocab_size = int(self.runner.vocab_size)
        self.num_layers = int(self.runner.num_layers)

    def run(self, ids: torch.Tensor) -> Outputs:
        out = self.runner.generate([row.to(torch.int32) for row in ids], max_new_tokens=1, end_id=0, pad_id=0,
                                   return_dict=True)
        cl = out["context_logits"]
        if isinstance(cl, (list, tuple)):
            cl = torch.stack([c.reshape(ids.shape[1], -1) for c in cl])
        elif cl.ndim == 2:  # packed (remove_input_padding): [B * S, V_padded]
            cl = cl.view(ids.shape[0], ids.shape[1], -1)
        # the engine pads the vocabulary to a multiple of the TP size; the padding is not a token
        return Outputs(cl[..., : self.vocab_size].float().cpu())


def _detect_engine(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".engine", ".plan")
    return any(path.glob("rank*.engine")) or len(list(path.glob("*.engine")) + list(path.glob("*.plan"))) == 1


@register_candidate("engine", priority=40, detect=_detect_engine, gpu=True,
                    summary="a TensorRT engine (.engine/.plan of the ONNX contract) or a TensorRT-LLM engine "
                            "directory (rank0.engine, built with --gather_context_logits); GPU only")
def _open_engine(path: Path, cfg: CheckConfig) -> Candidate:
    if not torch.cuda.is_available():
        raise MoepressError(f"{path}: an engine runs on an NVIDIA GPU only, and this machine has none")
    if path.is_dir() and any(path.glob("rank*.engine")) and (path / "config.json").is_file():
        try:
            return TrtllmCandidate(path, cfg)
        except ImportError:
            raise MoepressError(f"{path}: a TensorRT-LLM engine needs the tensorrt_llm package "
                                f"(pip install moepress[trtllm])") from None
    file = path
    if path.is_dir():
        files = sorted(path.glob("*.engine")) + sorted(path.glob("*.plan"))
        if len(files) != 1:
            raise MoepressError(f"{path}: expected one .engine or .plan file, found {len(files)}")
        file = files[0]
    try:
        return TensorRTCandidate(file, cfg)
    except ImportError:
        raise MoepressError(f"{file}: a TensorRT engine needs the tensorrt package "
                            f"(pip install moepress[tensorrt])") from None

"""``engine``: a TensorRT engine or a TensorRT-LLM engine directory (GPU only)."""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.checks.candidates.base import HIDDEN, ONNX_CONTRACT, Candidate, CandidateKind, Outputs
from moepress.checks.config import CheckConfig
from moepress.errors import MoepressError


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
        hidden = {int(m.group(1)): n for n in self.outputs if (m := HIDDEN.fullmatch(n))}
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


def _open_engine(path: Path, cfg: CheckConfig, device=None) -> Candidate:
    """The engine on ``device``'s GPU where it names one (``cuda:N``): TensorRT deserializes and runs on the
    current CUDA device, which is made that one; otherwise the current one."""
    if not torch.cuda.is_available():
        raise MoepressError(f"{path}: an engine runs on an NVIDIA GPU only, and this machine has none")
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
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


KIND = CandidateKind("engine", _open_engine, priority=40, detect=_detect_engine, gpu=True,
                     summary="a TensorRT engine (.engine/.plan of the ONNX contract) or a TensorRT-LLM engine "
                             "directory (rank0.engine, built with --gather_context_logits); GPU only")

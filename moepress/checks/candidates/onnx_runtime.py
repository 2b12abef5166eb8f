"""``onnx``: an ONNX model of the contract in :mod:`moepress.checks.candidates`, run with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.checks.candidates.base import HIDDEN, ONNX_CONTRACT, Candidate, CandidateKind, Outputs, first_line
from moepress.checks.config import CheckConfig
from moepress.errors import MoepressError


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


def graph_family(path: Path) -> str | None:
    """The family a moepress ONNX export (the file :func:`_onnx_file` picks in a folder) names its graph after
    (onnx_export: ``moepress-FAMILY``; the export writes no config.json), read without the external weights;
    None for another graph, or no ONNX file."""
    try:
        f = _onnx_file(path)
    except MoepressError:
        return None
    if f.suffix != ".onnx":
        return None
    import onnx

    try:
        name = onnx.load(str(f), load_external_data=False).graph.name
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own, on a corrupt or truncated file
        raise MoepressError(f"{f}: not a readable ONNX model ({first_line(e)}); expected the graph an export "
                            "wrote") from None
    return name.removeprefix("moepress-") if name.startswith("moepress-") else None


def session_options(optimize: bool = True):
    """onnxruntime session options that run the exported graph as written.

    ``optimize=False`` (the check's session) also turns every graph optimization off: constant folding
    turns each weight's DequantizeLinear (and the reshapes after it) into a float32 copy when the session
    loads, several times the stored weights; the graph as written dequantizes each weight when it runs.

    ``session.disable_quant_qdq=1`` turns off onnxruntime's QDQ fusions, so the FP8
    QuantizeLinear/DequantizeLinear pairs stay as they are. Those fusions target integer kernels:
    onnxruntime 1.20 rejects the graph ("Type (tensor(float8e4m3fn)) of output arg ... of node
    (QuantizeLinear) does not match expected type (tensor(uint8))"), 1.30 fuses the FP8 Q/DQ MatMul into
    MatMulIntegerToFloat, which has no float8 input. The logits are the same as with every graph
    optimization off. Key and meaning: onnxruntime include/onnxruntime/core/session/
    onnxruntime_session_options_config_keys.h (kOrtSessionOptionsDisableQuantQDQ: "1": ORT doesn't do
    fusion logic for QDQ format); present in onnxruntime 1.20 through 1.32.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


class OnnxCandidate(Candidate):
    kind = "onnx"

    def __init__(self, path: Path, cfg: CheckConfig):
        import onnxruntime as ort

        super().__init__(path)
        self.file = _onnx_file(path)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        try:
            self.sess = ort.InferenceSession(str(self.file), session_options(optimize=False), providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise MoepressError(f"{self.file}: onnxruntime cannot load it ({first_line(e)})") from None
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
        hidden = {int(m.group(1)): n for n in outs if (m := HIDDEN.fullmatch(n))}
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
            try:
                parts.append(self.sess.run(names, feed))
            except Exception as e:  # a graph that loads but cannot run (a scale shape its block_size contradicts)
                raise MoepressError(f"{self.file}: onnxruntime cannot run it ({first_line(e)})") from None
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


def _open_onnx(path: Path, cfg: CheckConfig, device=None) -> Candidate:  # onnxruntime's CPU provider
    return OnnxCandidate(path, cfg)


KIND = CandidateKind("onnx", _open_onnx, priority=30, detect=_detect_onnx,
                     summary=f"an ONNX model (file, or a directory with model.onnx): {ONNX_CONTRACT}")

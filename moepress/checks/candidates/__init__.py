"""Candidate kinds: what `moepress check` compares with the reference, and how each one runs.

A kind is a :class:`CandidateKind` (an opener, a detector for ``--kind auto``, a priority
among detectors); the built-in ones, one module each, are registered below, and
:func:`register_candidate` lets an exporter add the kind of what it writes without touching
the check. Two shapes of candidate:

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

from moepress.checks.candidates import checkpoint, engine, hf_transformers, onnx_runtime
from moepress.checks.candidates.base import (
    CANDIDATE_KINDS,
    ONNX_CONTRACT,
    Candidate,
    CandidateKind,
    Outputs,
    detect_kind,
    open_candidate,
    register_candidate,
)

# Registration order is the order `--kind` lists them; detectors run by priority.
for _kind in (checkpoint.KIND, hf_transformers.KIND, onnx_runtime.KIND, engine.KIND):
    CANDIDATE_KINDS[_kind.name] = _kind

__all__ = ["CANDIDATE_KINDS", "ONNX_CONTRACT", "Candidate", "CandidateKind", "Outputs", "detect_kind",
           "open_candidate", "register_candidate"]

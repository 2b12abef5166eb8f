"""The TensorRT-LLM candidate on a stand-in ``tensorrt_llm.runtime.ModelRunner`` (no GPU needed): an engine
pads its vocabulary to a multiple of the TP size (TensorRT-LLM's ``vocab_size_padded``), and the packed
context logits [B * S, V_padded] (remove_input_padding) are the first V entries of each row, per sample and
position. Expected values: the hand-built logits tensor the runner returns."""

from __future__ import annotations

import sys
import types

import torch

from moepress.checks.candidates.engine import TrtllmCandidate
from moepress.checks.config import CheckConfig

B, S, V, V_PADDED = 2, 3, 5, 8


class _Runner:
    gather_context_logits = True
    vocab_size = V
    num_layers = 2

    @classmethod
    def from_dir(cls, engine_dir, rank=0):
        return cls()

    def generate(self, rows, **kw):
        assert [r.dtype for r in rows] == [torch.int32] * B and kw["return_dict"]
        return {"context_logits": torch.arange(B * S * V_PADDED, dtype=torch.float32).view(B * S, V_PADDED)}


def test_padded_context_logits_are_cut_to_the_vocabulary(tmp_path, monkeypatch):
    rt = types.ModuleType("tensorrt_llm.runtime")
    rt.ModelRunner = _Runner
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    monkeypatch.setitem(sys.modules, "tensorrt_llm.runtime", rt)
    cand = TrtllmCandidate(tmp_path, CheckConfig())
    lg = cand.run(torch.zeros(B, S, dtype=torch.long)).logits
    assert tuple(lg.shape) == (B, S, V)
    # sample 1, position 2 is packed row 1 * S + 2 = 5: entries 5 * 8 + 0..4
    assert lg[1, 2].tolist() == [40.0, 41.0, 42.0, 43.0, 44.0]
    assert cand.vocab_size == V and cand.num_layers == 2


def test_a_trtllm_ckpt_export_is_refused_naming_what_to_check_instead(tmp_path, cli_run):
    """check of its own trtllm-ckpt export said only "found rank0.safetensors but no model.safetensors.index.json":
    one line now says what it is and what can be checked (its engine, or its source)."""
    from helpers import assert_one_line_error

    out = tmp_path / "t"
    assert cli_run("export", "tiny-mixtral", "--format", "trtllm-ckpt", "-o", out, "--quiet").exit_code == 0
    assert_one_line_error(cli_run("check", out, "-r", "tiny-mixtral", "--max-samples", "2"),
                          "a trtllm-ckpt export", "moepress build", "--kind engine")

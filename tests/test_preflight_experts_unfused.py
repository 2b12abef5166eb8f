"""refuse_expert_schemes judges only the exports that fuse experts (compressed-tensors,
hf-modelopt): a quantize leaving the odd model's experts partly unquantized is no concern of onnx / trtllm-ckpt /
no export, and must not reach the refusal's fused[0] (an IndexError, not a one-line refusal). (Uses
tests/test_preflight_experts.py's ``odd`` fixture.)"""
from __future__ import annotations

import pytest
from test_preflight_experts import CALIB, odd  # noqa: F401  (the fixture)

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader
from moepress.pipeline.preflight import refuse_expert_schemes
from moepress.pipeline.recipe import normalise


@pytest.mark.parametrize("exports", [[], ["onnx"], ["trtllm-ckpt"]])
@pytest.mark.parametrize("quantize", [{"format": "nvfp4"}, {"format": "int4-gptq", "group_size": 64}])
def test_exports_that_do_not_fuse_experts_are_not_judged(odd, exports, quantize):  # noqa: F811
    rec = normalise({"model": str(odd), "calib": CALIB, "prune": None, "quantize": quantize,
                     "export": {"formats": exports} if exports else None, "check": None, "build": None})
    reader = CheckpointReader(odd)
    refuse_expert_schemes(rec, exports, get_adapter(reader.config, reader.names()))

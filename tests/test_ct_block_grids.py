"""compressed-tensors 0.15-0.18 decompress a block-FP8 weight without its scheme and guess the grid from the scale's
shape (compressors/naive_quantized/base.py ``decompress`` -> quantization/lifecycle/forward.py ``dequantize`` with
``args=None``): [R, 1] is read as per-channel (the load fails), [R, C] as blocks of rows // R (a 192-row
kv_a_proj_with_mqa in 96-row blocks: wrong scales, no error). 0.19 passes the scheme. Those releases are all that
torch < 2.10 can install, so at pyproject's lower bounds a transformers load of such an export is broken: the export
says so (export.json misloaded_by ``compressed_tensors``), and ``moepress check`` refuses to gate it there.

The model: a random DeepSeek-V3 of hidden 256 (MLA widths Kimi-like in shape, not in size), block FP8 everywhere
but the routed experts. Expected by hand from its shapes (block 128 x 128):
  q_a_proj 128x256 [1, 2], o_proj 256x256, the dense MLP 256x256, shared gate / up 128x256: read right;
  kv_a_proj_with_mqa 192x256 [2, 2]: 96-row blocks; q_b_proj / kv_b_proj 512x128 [4, 1] and the shared
  down_proj 256x128 [2, 1]: per-channel.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata

import pytest
import torch

import forkserver
from helpers import TF_LOADER, checkpoint_tensors, make_random_checkpoint, transformers_logits
from moepress.checks.candidates import hf_transformers
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint, read_quant_layout
from moepress.compress.stream import StreamedModel
from moepress.exporters import ExportConfig, export

CT_VERSION = tuple(int(x) for x in metadata.version("compressed-tensors").split(".")[:2])
SHAPES = dict(vocab_size=256, hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
              kv_lora_rank=128, q_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,
              n_routed_experts=4, n_group=1, topk_group=1, n_shared_experts=1)
IDS = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
MISREAD = sorted([f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("kv_a_proj_with_mqa", "kv_b_proj",
                                                                               "q_b_proj")]
                 + ["model.layers.1.mlp.shared_experts.down_proj"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("ctgrids")
    src = make_random_checkpoint("deepseek_v3", base / "src", max_shard_size="10MB", **SHAPES)
    quantize_checkpoint(src, base / "q", QuantConfig(format="fp8-block", rules=(("mlp.experts.*", "fp8-dynamic"),)))
    info = export(base / "q", base / "ct", ExportConfig(format="compressed-tensors"))
    return base, info


def test_the_export_names_the_linears_whose_grid_compressed_tensors_before_0_19_guesses(exported):
    _, info = exported
    assert info["misloaded_by"] == {"compressed_tensors": "0.18"}, info["misloaded_by"]
    why = info["misloaded_why"]["compressed_tensors"]
    assert "guesses the block grids of 7 block-FP8 linears" in why
    for part in ("self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.q_b_proj", "shared_experts.down"):
        assert part in why
    assert "q_a_proj" not in why and "o_proj" not in why and "gate_proj" not in why
    assert any(n.startswith("compressed-tensors <= 0.18") for n in info["consumer_notes"])


@pytest.mark.skipif(CT_VERSION >= (0, 19), reason="compressed-tensors 0.19+ reads the scheme; dequantize(args=None) "
                                                  "is refused there")
def test_the_installed_compressed_tensors_guesses_exactly_those(exported):
    """The consumer's own decompression (dequantize with no args, as its decompress calls it) against the block
    expansion the scheme says: the linears it fails on or misreads are those export.json names; the check
    refuses to gate the export, and transformers' load fails."""
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    base, _ = exported
    t = checkpoint_tensors(base / "ct")
    bad = []
    for n in sorted(k.removesuffix(".weight_scale") for k in t if k.endswith(".weight_scale")):
        w, s = t[n + ".weight"], t[n + ".weight_scale"].float()
        if s.numel() == 1 or s.shape[0] * s.shape[1] == w.shape[0]:  # per-tensor / per-channel FP8 (the experts)
            continue
        right = w.float() * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        try:
            ok = torch.equal(dequantize(w, s, None, dtype=torch.float32), right)
        except RuntimeError:
            ok = False
        if not ok:
            bad.append(n)
    assert bad == MISREAD
    why = hf_transformers.misloaded(base / "ct")
    assert why and why.startswith(f"compressed-tensors {metadata.version('compressed-tensors')} guesses"), why
    torch.save(IDS, base / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    spec = json.dumps([[str(base / "ct"), str(base / "ids.pt"), str(base / "out.pt")]])
    p = forkserver.run([sys.executable, "-c", TF_LOADER, spec], cwd=base, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0 and "size of tensor" in p.stderr, p.stderr[-2000:]


@pytest.mark.skipif(CT_VERSION < (0, 19), reason="measured on compressed-tensors 0.20")
def test_from_0_19_transformers_loads_it_and_the_check_does_not_refuse(exported):
    base, _ = exported
    assert hf_transformers.misloaded(base / "ct") is None
    tf = transformers_logits([(base / "ct", IDS)], base / "tf")[0]["logits"]
    # transformers' CT Linears quantize their inputs per 1x128 group, its fused experts run dequantized weights
    # (test_export_ct.py): so does moepress's forward of the quantized checkpoint here
    r = CheckpointReader(base / "q")
    lay = read_quant_layout(base / "q")
    r._moepress_quant = {**lay, "modules": {k: v for k, v in lay["modules"].items() if ".experts." not in k}}
    ref = StreamedModel(r).forward([IDS])[0]
    assert ((tf - ref).norm() / ref.norm()).item() < 1e-4  # measured 0.0

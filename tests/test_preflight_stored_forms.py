"""A recipe with no quantize section exports the model as it is stored, and its prune keeps the stored bytes of the
experts it keeps: an export that refuses that stored form (FP4 weights for onnx and trtllm-ckpt, activations
quantized at run time for onnx, packed tensors or another format for hf-fp8-block, a layout hf-modelopt does not
write) is refused by run's preflight, before the prune, with the export's own line under the recipe key. It used to
be refused by the export after the prune. The export itself is the oracle: each source is exported and refused."""

from __future__ import annotations

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import normalise

# (source, export) pairs the export refuses
REFUSED = [("mxfp4", "onnx"), ("mxfp4", "trtllm-ckpt"), ("mxfp4", "hf-fp8-block"), ("kimi-int4", "hf-fp8-block"),
           ("nvfp4", "onnx"), ("nvfp4", "trtllm-ckpt"), ("nvfp4", "hf-fp8-block"),
           ("fp8-dynamic", "onnx"), ("fp8-dynamic", "hf-modelopt"), ("fp8-dynamic", "trtllm-ckpt")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Bundled packed checkpoints (compressed-tensors MXFP4, Kimi's INT4) and moepress quantize outputs."""
    base, bf16 = tmp_path_factory.mktemp("stored"), models.path("tiny-qwen3-moe")
    out = {"mxfp4": models.path("tiny-qwen3-moe-mxfp4"), "kimi-int4": models.path("tiny-kimi-k2-int4")}
    for fmt in ("nvfp4", "fp8-dynamic"):
        quantize_checkpoint(bf16, base / fmt, QuantConfig(format=fmt), batches=None)
        out[fmt] = base / fmt
    return out


def _preflight(model, fmt: str) -> None:
    raw = {"model": str(model), "check": None, "quantize": None, "prune": {"ratio": 0.25, "method": "frequency"},
           "export": {"formats": [fmt]}}
    preflight(normalise(raw), model)


@pytest.mark.parametrize("source,fmt", REFUSED)
def test_an_export_refusing_the_stored_form_is_refused_before_the_prune(sources, tmp_path, source, fmt):
    with pytest.raises(MoepressError) as e:
        export(sources[source], tmp_path / "e", ExportConfig(format=fmt))
    said = str(e.value)
    assert said.startswith(f"--format {fmt}: ") and "\n" not in said, said
    with pytest.raises(MoepressError) as pf:
        _preflight(sources[source], fmt)
    assert str(pf.value) == f"recipe export.formats {fmt}: {said.removeprefix(f'--format {fmt}: ')}"


def test_a_stored_form_the_export_takes_passes(sources, tmp_path):
    """Kimi's packed INT4 experts: onnx decodes them; the preflight lets the recipe through."""
    export(sources["kimi-int4"], tmp_path / "e", ExportConfig(format="onnx"))
    _preflight(sources["kimi-int4"], "onnx")


def test_fp4_outside_the_trunk_is_not_the_exports_business(tmp_path):
    """An NVFP4 expert in DeepSeek's MTP layer, which the onnx graph does not carry: the export writes the trunk, so
    neither it nor the preflight refuses the model for it."""
    import torch

    from helpers import DSV3_SMALL, write_with_mtp
    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter

    src = write_with_mtp({**DSV3_SMALL, "max_position_embeddings": 128, "num_nextn_predict_layers": 1},
                         tmp_path / "bf16", block_fp8=False)
    r, out = CheckpointReader(src), tmp_path / "mtp-fp4"
    base = f"model.layers.{DSV3_SMALL['num_hidden_layers']}.mlp.experts.0.down_proj"
    rows, cols = r.info(base + ".weight").shape
    with CheckpointWriter(out, force=True) as w:
        for name in r.names():
            if name == base + ".weight":  # NVFP4 as stored: E2M1 pairs, E4M3 scales of 16 inputs
                w.add(name, torch.zeros(rows, cols // 2, dtype=torch.uint8))
                w.add(base + ".weight_scale", torch.ones(rows, cols // 16).to(torch.float8_e4m3fn))
                w.add(base + ".weight_scale_2", torch.ones(()))
            else:
                w.add(name, r.get(name))
        w.write_json("config.json", r.config)
        w.copy_aux_files(src)
    export(out, tmp_path / "e", ExportConfig(format="onnx"))
    _preflight(out, "onnx")

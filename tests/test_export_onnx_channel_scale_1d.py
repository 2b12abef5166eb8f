"""E4M3 weights whose per-channel weight_scale is stored 1-D [out] (Model-Optimizer's own layout,
FP8_PER_CHANNEL_PER_TOKEN) with no moepress layout are read as per-channel, not as a block grid. Reference:
transformers' float32 forward of the weights dequantized by hand (w x s per output row), run by onnxruntime
(test_export_onnx stores [out, 1] only)."""
import torch
from test_export_onnx import FLOAT32, _ort_logits

from moepress import models


def test_per_channel_fp8_with_a_1d_scale_exports_as_transformers_computes_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
    from moepress.compress.quant.fp8 import quantize_channel
    from moepress.exporters import ExportConfig, export

    reader = CheckpointReader(models.path("tiny-qwen3-moe"))
    fp8, deq = tmp_path / "fp8", tmp_path / "deq"
    with CheckpointWriter(fp8) as wq, CheckpointWriter(deq) as wd:
        for name in reader.names():
            t = reader.get(name)
            if ".layers." in name and name.endswith("proj.weight") and t.ndim == 2:
                q, s = quantize_channel(t.float())
                assert s.shape == (t.shape[0], 1) and s.unique().numel() > 1
                wq.add(name, q)
                wq.add(name[: -len(".weight")] + ".weight_scale", s.reshape(-1).contiguous())  # [out]
                wd.add(name, q.float() * s)
            else:
                wq.add(name, t)
                wd.add(name, t)
        for w in (wq, wd):
            w.write_json("config.json", reader.config)
            w.copy_aux_files(models.path("tiny-qwen3-moe"))
    export(fp8, tmp_path / "onnx", ExportConfig(format="onnx"))
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(deq), dtype=torch.float32).eval()(ids).logits
    got = _ort_logits(tmp_path / "onnx", ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= FLOAT32[0]

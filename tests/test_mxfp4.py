"""MXFP4 (issue 17): ``moepress quantize --format mxfp4`` writes, for every quantized linear of the bundled
models, the bytes compressed-tensors' own MXFP4 quantizer writes (calculate_qparams with the MXFP4A16
preset, MXFP4PackedCompressor); its compressed-tensors export loads with transformers in a process that
never imports moepress, weights equal to ours and logits matching our forward."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import forkserver
from helpers import CT_LOADER
from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.formats import FORMATS, QuantContext
from moepress.compress.quant import fp4
from moepress.compress.quantize import QuantConfig, quantize_checkpoint, read_quant_layout
from moepress.compress.stream import StreamedModel
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export

IDS = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))


def _ct_reference(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors 0.20.1's MXFP4A16 quantization of ``w``: its qparams, then its compressor."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["MXFP4A16"])
    wb = w.reshape(w.shape[0], -1, 32)
    scale, _ = calculate_qparams(wb.amin(-1), wb.amax(-1), scheme.weights)
    return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    base = tmp_path_factory.mktemp("mxfp4")
    out = {}
    for name in models.BUNDLED:
        quantize_checkpoint(models.path(name), base / name, QuantConfig(format="mxfp4"))
        out[name] = base / name
    export(out["tiny-qwen3-moe"], base / "ct", ExportConfig(format="compressed-tensors"))
    out["ct"] = base / "ct"
    return out


@pytest.mark.parametrize("name", models.BUNDLED)
def test_every_weight_identical_to_compressed_tensors(quantized, name):
    q = CheckpointReader(quantized[name])
    src = CheckpointReader(models.path(name))
    mods = read_quant_layout(q.path)["modules"]
    assert mods
    for m in mods:
        ref = _ct_reference(src.get(m + ".weight"))
        assert torch.equal(q.get(m + ".weight"), ref["weight_packed"]), m
        assert torch.equal(q.get(m + ".weight_scale"), ref["weight_scale"]), m


def test_e8m0_and_odd_shapes():
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale

    e = torch.arange(0, 255, dtype=torch.uint8)
    assert torch.equal(fp4.e8m0_decode(e), decompress_mx_scale(e).float())
    assert fp4.e8m0_decode(torch.tensor([255], dtype=torch.uint8)).isnan().all()
    w = torch.randn(33, 64) * 0.02  # odd output width: fine, packing runs along the input
    t = FORMATS["mxfp4"].quantize([w], QuantContext()).tensors[0]
    ref = _ct_reference(w)
    assert torch.equal(t["weight"], ref["weight_packed"]) and torch.equal(t["weight_scale"], ref["weight_scale"])
    for width in (48, 200):  # not a multiple of the 32-block: stays bf16, reported
        out = FORMATS["mxfp4"].quantize([torch.randn(32, width)], QuantContext())
        assert out.skipped is not None and str(width) in out.skipped




def test_transformers_loads_the_compressed_tensors_export(quantized, tmp_path):
    torch.save(IDS, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    p = forkserver.run([sys.executable, "-c", CT_LOADER, str(quantized["ct"]), str(tmp_path / "ids.pt"),
                        str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    notes = json.loads((quantized["ct"] / "export.json").read_text())["consumer_notes"]
    assert not any(n.startswith("transformers") for n in notes), notes  # transformers loads it exactly
    r = CheckpointReader(quantized["tiny-qwen3-moe"])
    st = got["state"]
    for i in range(4):  # every weight exactly ours: attention, and the fused experts transformers builds
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            n = f"model.layers.{i}.self_attn.{proj}.weight"
            assert torch.equal(st[n], r.weight(n, torch.float32)), n
        p = f"model.layers.{i}.mlp.experts."
        for e in range(16):
            gu = torch.cat([r.weight(f"{p}{e}.{k}.weight", torch.float32) for k in ("gate_proj", "up_proj")])
            assert torch.equal(st[p + "gate_up_proj"][e], gu)
            assert torch.equal(st[p + "down_proj"][e], r.weight(f"{p}{e}.down_proj.weight", torch.float32))
    ours = StreamedModel(r).forward([IDS])[0]
    # measured 1.3e-3 (transformers' CT-loaded expert forward differs from its plain one on equal weights)
    assert ((got["logits"] - ours).norm() / ours.norm()).item() < 3e-3


def test_modelopt_layout_exporters_refuse_mxfp4(quantized, tmp_path):
    for fmt in ("hf-modelopt", "trtllm-ckpt", "onnx"):
        with pytest.raises(MoepressError, match="mxfp4|FP4"):
            export(quantized["tiny-qwen3-moe"], tmp_path / fmt, ExportConfig(format=fmt))


def test_mxfp4_zero_and_tiny_blocks_are_compressed_tensors_bytes():
    """An all-zero block, a subnormal block and one at the smallest subnormal: E8M0 byte 0 at the bottom of the
    range (not 1), codes and scales as compressed-tensors writes them."""
    w = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    w[0, :32] = 0.0
    w[1, 32:64] *= 2.0 ** -130
    w[2, 64:96] = 1e-45
    q, s = fp4.mx_quantize(w)
    ref = _ct_reference(w)
    assert torch.equal(s, ref["weight_scale"]) and torch.equal(q, ref["weight_packed"]) and int(s[0, 0]) == 0


def test_mxfp4_non_finite_blocks_get_the_nan_scale():
    """A block holding Inf or NaN gets E8M0's NaN byte (255), which the quantize stage refuses; the largest
    finite float does not."""
    s = fp4.mx_scale_bytes(torch.tensor([float("inf"), float("nan"), 3.0e38, 1.0]))
    assert s.tolist()[:2] == [255, 255] and s[2] < 255 and s[3] == 125


def test_check_through_transformers_runs_the_compressed_tensors_export(quantized, cli_run):
    """`moepress check --kind transformers` (and `moepress run`, which checks compressed-tensors exports so)
    loaded it in float32 without dequantize=True and refused it: "transformers cannot run it (expected m1 and m2
    to have the same dtype)". Through transformers it measures what the streamed quantized checkpoint does."""
    args = ["-r", "tiny-qwen3-moe", "--max-samples", "2", "--seq-len", "64", "--json"]
    r = cli_run("check", quantized["ct"], "--kind", "transformers", *args)
    assert r.exit_code == 0, r.output
    ref = cli_run("check", quantized["tiny-qwen3-moe"], *args)
    kl, kl_ref = (json.loads(x.stdout)["metrics"]["kl_mean"] for x in (r, ref))
    assert abs(kl - kl_ref) <= 1e-4 * kl_ref, (kl, kl_ref)  # measured 3.7e-5 relative (3.9e-7 of 0.0107)


def test_the_e2m1_tables_are_made_once_per_device():
    """cast_e2m1 and e2m1_values take their tables from a per-device cache: a copy from host memory to a GPU is a
    stream sync, which each decode of each expert's weight made (three per NVFP4 input fake quant)."""
    import torch

    from moepress.compress.quant import fp4

    fp4._tables.cache_clear()
    x = torch.tensor([0.25, 0.75, 2.5, -5.0, 7.0])
    for _ in range(3):
        assert fp4.round_e2m1(x).tolist() == [0.0, 1.0, 2.0, -4.0, 6.0]
    info = fp4._tables.cache_info()
    assert (info.misses, info.hits) == (1, 5)

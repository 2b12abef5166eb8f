"""A quantized checkpoint whose stored scales are not what its format reads is refused in one line naming the tensor,
not checked as something else: a static-FP8 linear without its ``input_scale`` was run weight-only (and passed the
check); a packed FP4 or INT4 weight with a scale of another grid failed deep in the decoder with a traceback
(exit 1, read by CI as an accuracy failure)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError


def _edit(ckpt, name: str, fn) -> None:
    """Rewrite the shard holding ``name`` with ``fn`` applied to its tensors (dict), the index kept in step."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != shard.name or n in tensors}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    base = tmp_path_factory.mktemp("scales")

    def make(fmt: str):
        out = base / fmt
        if not out.exists():
            quantize_checkpoint(models.path("tiny-qwen3-moe"), out, QuantConfig(format=fmt, num_samples=4, seq_len=32))
        copy = base / f"{fmt}-edited"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(out, copy)
        return copy
    return make


def test_a_static_fp8_linear_without_its_input_scale_is_refused_by_check(quantized, cli_run):
    ckpt = quantized("fp8")
    name = "model.layers.1.self_attn.q_proj.input_scale"
    _edit(ckpt, name, lambda t: t.pop(name))
    r = cli_run("check", ckpt, "-r", models.path("tiny-qwen3-moe"), "--no-record", "--quiet", "--max-samples", "2")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and lines[-1].startswith("moepress: error: ") and "Traceback" not in r.output, r.output
    assert f"tensor '{name}' is missing; expected the static input scale fp8 stores" in lines[-1], lines[-1]


@pytest.mark.parametrize("fmt,name,edit,says", [
    # NVFP4 [128, 64] bytes (128 inputs): one E4M3 scale per 16 inputs, [128, 8]; stored transposed
    ("nvfp4-a16", "model.layers.1.self_attn.o_proj.weight_scale", lambda s: s.t().contiguous(),
     r"has shape \[8, 128\]; expected \[128, 8\] \(one scale per 16 inputs\) for a packed FP4 weight \[128, 64\]"),
    # Model-Optimizer INT4 [out / 2, in] bytes: [out, in / group]; one row short
    ("int4-awq", "model.layers.1.self_attn.o_proj.weight_scale", lambda s: s[1:].contiguous(),
     r"has shape \[127, 1\]; expected \[128, 128 / group\] for a packed INT4 weight \[64, 128\]"),
])
def test_a_packed_weights_scale_of_another_grid_is_refused_naming_it(quantized, fmt, name, edit, says):
    ckpt = quantized(fmt)
    _edit(ckpt, name, lambda t: t.update({name: edit(t[name])}))
    with pytest.raises(MoepressError, match=rf"tensor '{name}' {says}"):
        CheckpointReader(ckpt).weight(name.removesuffix("_scale"))

"""Block-FP8 linears that vLLM / SGLang fuse into one (q/k/v, gate/up, DeepSeek's q_a / kv_a) load only in whole
128-row blocks: vLLM 0.33.0 allocates the fused ``weight_scale_inv`` as ceil(sum(rows) / 128) rows and copies part
i's scale rows at row ceil(offset_i / 128) (layers/linear.py adjust_block_scale_shard; parameter.py
load_qkv_weight narrows the parameter there: out of range, or a block read with its neighbour's scale), SGLang
0.5.23 refuses qkv / gate_up parts that are not multiples of 128 (layers/quantization/fp8.py
validate_block_quant_shapes) and concatenates q_a's and kv_a's scales into one ReplicatedLinear's. The bundled tiny
models' k / v (64 rows), shared-expert gate / up (64) and q_a / kv_a (64 / 48) are all partial."""

from __future__ import annotations

import json
import struct

import pytest

from moepress import models

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))


def _headers(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            out.update(json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0])))
    return out


def _fused_groups_load(d) -> list[str]:
    """Fused groups (outside routed experts) the runtimes would refuse or misread: parts quantized unlike each other,
    or block-FP8 parts not in whole 128-row blocks (all of q/k/v and gate/up; all but kv_a of q_a / kv_a)."""
    h = _headers(d)
    bad = []
    for name in h:
        if not name.endswith(".weight") or ".experts." in name:
            continue
        parent, _, leaf = name[: -len(".weight")].rpartition(".")
        for parts in FUSED:
            if leaf != parts[0]:
                continue
            names = [f"{parent}.{p}" for p in parts if f"{parent}.{p}.weight" in h]
            fp8 = [f"{n}.weight_scale_inv" in h for n in names]
            if len(names) < 2 or not any(fp8):
                continue
            rows = [h[n + ".weight"]["shape"][0] for n in names]
            checked = rows[:-1] if parts[-1] == "kv_a_proj_with_mqa" else rows
            if not all(fp8) or any(r % 128 for r in checked):
                bad.append(f"{parent}.{'/'.join(parts)} rows {rows} fp8 {fp8}")
    return bad


@pytest.mark.parametrize("model", ["tiny-qwen3-moe", "tiny-deepseek-v3"])
def test_hf_fp8_block_keeps_partial_fused_linears_high_precision(cli_run, tmp_path, model):
    out = tmp_path / "hfb"
    assert cli_run("export", models.path(model), "--format", "hf-fp8-block", "-o", out, "-q").exit_code == 0
    assert _fused_groups_load(out) == []
    skipped = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"])
    h = _headers(out)
    for n in h:  # what is listed is stored high precision, what is not is block FP8 with its scale
        if n.endswith(".weight") and len(h[n]["shape"]) == 2 and n[: -len(".weight")] not in skipped:
            assert h[n]["dtype"] == "F8_E4M3" and n + "_scale_inv" in h, n



def test_hf_fp8_block_quantizes_whole_block_q_a_beside_a_one_block_kv_a(cli_run, tmp_path):
    """q_a_proj of 128 rows (whole blocks) and kv_a_proj_with_mqa of 64 (the last of the pair, within one block:
    SGLang's fused q_a / kv_a takes its partial last block, vLLM's ceil(offset / 128) places it right): the pair
    loads block FP8, so both are written F8_E4M3 with their scales, not kept bf16 as a group."""
    from helpers import make_random_checkpoint

    src = make_random_checkpoint("deepseek_v3", tmp_path / "ds", hidden_size=128, q_lora_rank=128, kv_lora_rank=32,
                                 qk_rope_head_dim=32)
    out = tmp_path / "hfb"
    assert cli_run("export", src, "--format", "hf-fp8-block", "-o", out, "-q").exit_code == 0
    h = _headers(out)
    assert _fused_groups_load(out) == []
    for i in range(3):
        for p in ("q_a_proj", "kv_a_proj_with_mqa"):
            n = f"model.layers.{i}.self_attn.{p}"
            assert h[n + ".weight"]["dtype"] == "F8_E4M3" and n + ".weight_scale_inv" in h, (n, h[n + ".weight"])

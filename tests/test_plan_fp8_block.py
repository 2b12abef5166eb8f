"""`moepress plan --format fp8-block` budgets the bytes hf-fp8-block writes: a linear the export keeps bf16
(kernel_widths.fused_block_ok: its shape, or a part of the group the runtimes fuse it into, q/k/v, gate/up, q_a /
kv_a, not in whole 128-row blocks) is counted bf16, by the same function. The planner counted each linear alone,
so a fused group the export keeps bf16 was planned in FP8 (tiny-qwen3-moe: q/k/v of 128, 64, 64 rows, 131,024 B
short of the 5,590,544 B written; DeepSeek-V3's q_a_proj, whose partner kv_a_proj_with_mqa has 576 rows)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.exporters import ExportConfig, export
from moepress.exporters.plan import plan
from moepress.exporters.shape import model_shape

KIMI = "tests/data/kimi-k2-config.json"
# a DeepSeek-V3 whose q_a_proj is one whole block (q_lora_rank 128) beside a 160-row kv_a_proj_with_mqa (128 + 32):
# the shape of DeepSeek-V3's 1536-row q_a beside its 576-row kv_a (tests/test_export_hf_fp8_block.py DS128)
DS128 = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
             num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def _written(d) -> tuple[int, int]:
    """(bytes of every tensor the export wrote, bytes of its float32 tensors that are not block scales), read
    with safetensors alone."""
    total = wide = 0
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                total += t.numel() * t.element_size()
                if str(t.dtype) == "torch.float32" and not k.endswith("_scale_inv"):
                    wide += t.numel() * t.element_size()
    return total, wide


@pytest.fixture(scope="module")
def ds128(tmp_path_factory):
    from helpers import make_random_checkpoint

    d = make_random_checkpoint("deepseek_v3", tmp_path_factory.mktemp("plan-fp8b") / "ds128", **DS128)
    for f in d.glob("*.safetensors"):  # stored bf16 like a hub checkpoint (transformers saved float32), bias float32
        t = load_file(str(f))
        save_file({k: v if k.endswith("e_score_correction_bias") else v.bfloat16() for k, v in t.items()}, str(f),
                  metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("name", ["tiny-deepseek-v3", "tiny-qwen3-moe", "tiny-mixtral", "tiny-mixtral-w192", "ds128"])
def test_plan_of_fp8_block_counts_the_bytes_hf_fp8_block_writes(name, tmp_path, request):
    """Plan's weights_total against the tensor bytes of the hf-fp8-block export. Equal to the byte but for the
    float32 tensors outside the linears: plan budgets routers at bf16 and leaves DeepSeek's e_score_correction_bias
    (a buffer) out, so it may be short by at most those tensors' bytes (tiny-deepseek-v3 stores its routers float32:
    measured 24,960 B short of its 49,536 float32 router and bias bytes; ds128 64 B, its float32 biases; the others
    0). Before the fix: 131,400 B short on tiny-deepseek-v3, 131,024 on the others, 110,620 on ds128."""
    src = request.getfixturevalue("ds128") if name == "ds128" else models.path(name)
    out = tmp_path / "fb"
    export(src, out, ExportConfig(format="hf-fp8-block"))
    total, wide = _written(out)
    p = plan(str(src), "h100", "fp8-block", gpus=1)
    assert 0 <= total - p.weights_total <= wide, (total, p.weights_total, wide)


def _deepseek_v3(quantized: bool) -> dict:
    """deepseek-ai/DeepSeek-V3's config.json structure (Kimi K2's MLA and widths; 256 experts, 128 heads, 3 dense
    layers, vocab 129280); ``quantized`` False: a bf16 conversion (no quantization_config)."""
    cfg = json.loads(open(KIMI).read())
    cfg.update(model_type="deepseek_v3", n_routed_experts=256, num_attention_heads=128, num_key_value_heads=128,
               first_k_dense_replace=3, n_group=8, topk_group=4, vocab_size=129280, routed_scaling_factor=2.5)
    if not quantized:
        del cfg["quantization_config"]
    return cfg


def test_deepseek_v3_q_a_proj_is_planned_as_hf_fp8_block_writes_it():
    """DeepSeek-V3 in bf16 planned as fp8-block: hf-fp8-block keeps q_a_proj [1536, 7168] bf16 with its fused
    partner kv_a_proj_with_mqa [576, 7168] (576 rows over 128, not whole blocks: transformers misreads its grid), so
    both are 2 B a value, 61 layers. DeepSeek-V3 as shipped (block FP8) is copied as stored: both FP8 (1 B a value
    + an F32 scale per 128 x 128 block: 12 x 56 and 5 x 56)."""
    bf16 = model_shape(_deepseek_v3(False)).bytes_by_kind("fp8-block")["replicated"]
    assert bf16 == 61 * 2 * (1536 + 576) * 7168
    shipped = model_shape(_deepseek_v3(True)).bytes_by_kind("fp8-block")["replicated"]
    assert shipped == 61 * ((1536 + 576) * 7168 + 4 * (12 + 5) * 56)
    p = plan(_deepseek_v3(False), "h200", "fp8-block")
    assert any("counted bf16" in n and "replicated [576, 7168], replicated [1536, 7168]" in n for n in p.notes)


def _with_mtp(out, block_fp8: bool):
    """A DeepSeek-V3 of whole-block widths with one MTP layer, block FP8 or bf16 (helpers.write_with_mtp)."""
    from helpers import DSV3_SMALL, write_with_mtp

    cfg = {**DSV3_SMALL, **DS128, "num_hidden_layers": 2, "n_routed_experts": 8, "num_nextn_predict_layers": 1}
    return write_with_mtp(cfg, out, block_fp8)


@pytest.mark.parametrize("block_fp8", [True, False], ids=["block-fp8", "bf16"])
def test_plan_of_fp8_block_counts_the_mtp_layer_hf_fp8_block_copies(tmp_path, block_fp8):
    """DeepSeek's MTP layer (num_nextn_predict_layers 1, stored as layer num_hidden_layers): hf-fp8-block copies it
    as stored (block FP8 from a block-FP8 checkpoint, bf16 from a bf16 one), so plan counts it: its bytes against the
    export's, as above (64 B apart: the float32 biases). Before, the plan left it out (827,356 B short of the
    1,872,320 B written from block FP8, 1,453,888 of 2,572,556 from bf16). `moepress quantize` writes no MTP layer:
    a format it makes (fp8) counts none."""
    src = _with_mtp(tmp_path / "src", block_fp8)
    out = tmp_path / "fb"
    export(src, out, ExportConfig(format="hf-fp8-block"))
    total, wide = _written(out)
    p = plan(str(src), "h100", "fp8-block", gpus=1)
    assert 0 <= total - p.weights_total <= wide, (total, p.weights_total, wide)
    cfg = json.loads((src / "config.json").read_text())
    no_mtp = {**cfg, "num_nextn_predict_layers": 0}
    assert plan(cfg, "h100", "fp8", gpus=1).weights_total == plan(no_mtp, "h100", "fp8", gpus=1).weights_total


def test_bf16_deepseek_v3_counts_its_mtp_layer_and_its_own_embedding_and_head():
    """DeepSeek-V3 as a bf16 conversion keeps its MTP layer (num_nextn_predict_layers 1), so a bf16 plan counts it.
    deepseek-ai/DeepSeek-V3 README.md: 685B on Hugging Face, 671B of them the main model (rounded: here 671.03B and
    684.49B, scales left out). README_WEIGHTS.md: layer 61 stores its own embed_tokens and shared_head.head
    [129280, 7168] (the embedding), and besides its decoder linears enorm, hnorm, shared_head.norm [7168] and
    eh_proj [7168, 14336], with the decoder layer's norms (input, post-attention 7168; q_a 1536; kv_a 512) and
    router [256, 7168] (e_score_correction_bias, a buffer, is not budgeted)."""
    cfg = {**_deepseek_v3(False), "num_nextn_predict_layers": 1}
    with_mtp = model_shape(cfg).bytes_by_kind("bf16")
    trunk = model_shape({**cfg, "num_nextn_predict_layers": 0}).bytes_by_kind("bf16")
    assert 670.5e9 <= sum(trunk.values()) / 2 < 671.5e9
    assert 684.0e9 <= sum(with_mtp.values()) / 2 < 685.5e9
    assert with_mtp["embed"] - trunk["embed"] == 2 * 2 * 129280 * 7168
    assert with_mtp["other"] - trunk["other"] == 2 * (3 * 7168 + 7168 * 14336 + 2 * 7168 + 1536 + 512 + 256 * 7168)


def test_mtp_layers_the_config_declares_but_the_checkpoint_lacks_are_not_counted(tmp_path):
    """A DeepSeek-V3 saved by transformers keeps num_nextn_predict_layers (1 by default) and drops the MTP layer's
    tensors: inspect lists no MTP layer and plan budgets the trunk alone (it counted the absent layer: 10.5 MB
    planned for a 6.0 MB checkpoint of this shape). A config alone still counts what it declares."""
    from moepress.compress.inspect import summarize

    base = models.resolve("tiny-deepseek-v3")
    src = tmp_path / "src"
    shutil.copytree(base, src)
    cfg = {**json.loads((base / "config.json").read_text()), "num_nextn_predict_layers": 1}
    (src / "config.json").write_text(json.dumps(cfg))
    assert "mtp" not in summarize(str(src))["layers"]
    trunk = plan(str(base), "h100", "bf16", gpus=1).weights_total
    assert plan(str(src), "h100", "bf16", gpus=1).weights_total == trunk
    assert plan(cfg, "h100", "bf16", gpus=1).weights_total > trunk


@pytest.mark.parametrize("widths,block", [
    # Kimi-K2-shaped at widths no 128x128 grid divides: hf-fp8-block refuses a model with no such linear
    (dict(hidden_size=320, intermediate_size=448, moe_intermediate_size=96, q_lora_rank=96, kv_lora_rank=40,
          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32), False),
    (DS128, True)])
def test_the_block_fp8_alternative_is_named_only_where_hf_fp8_block_writes_it(tmp_path, widths, block):
    """int4-gptq DeepSeek-V3 experts, which TensorRT-LLM does not load: the alternative was fp8-block (export
    hf-fp8-block) whatever the widths, and that export then refused a model without one 128x128 linear."""
    conf = {**json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text()), **widths}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    note = next(n for n in plan(tmp_path, "h100", "int4-gptq").notes if n.startswith("TensorRT-LLM cannot load"))
    assert ("use fp8-block (export hf-fp8-block)" in note) == block, note
    if not block:
        assert "use fp8 with --rule 'self_attn.kv_b_proj=none'" in note, note

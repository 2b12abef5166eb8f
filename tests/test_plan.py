"""Planner arithmetic on the Kimi K2 config (tests/data/kimi-k2-config.json), by hand.

Kimi K2: hidden 7168, 61 layers (layer 0 dense, 1..60 MoE), 384 routed experts + 1 shared,
moe_intermediate 2048, dense intermediate 18432, 64 heads, MLA (q_lora_rank 1536, kv_lora_rank
512, qk_rope 64, qk_nope 128, v_head 128), vocab 163840, untied head.

Linear weights [out, in] per decoder layer:
  q_a_proj            1536 x 7168
  q_b_proj           12288 x 1536   (64 heads x (128 nope + 64 rope))
  kv_a_proj_with_mqa   576 x 7168   (512 latent + 64 rope)
  kv_b_proj          16384 x 512    (64 heads x (128 nope + 128 v))
  o_proj              7168 x 8192   (64 heads x 128 v)
  expert (routed and shared): gate, up 2048 x 7168; down 7168 x 2048
  dense MLP (layer 0): gate, up 18432 x 7168; down 7168 x 18432
bf16, split by nothing: norms 61 x (7168 + 7168 + 1536 + 512) + final 7168; routers 60 x 384 x 7168
(the correction bias is a buffer, not counted). Embedding + lm_head: 2 x 163840 x 7168, split by TP.
"""

import json
import math
import re

import pytest

from moepress import models
from moepress.errors import MoepressError
from moepress.exporters.plan import RESERVE_FRACTION, plan
from moepress.exporters.shape import linear_bytes, model_shape

KIMI = "tests/data/kimi-k2-config.json"

# ---- hand-computed bytes per component -------------------------------------------------------
# FP8 block (1 B/param + F32 scale per 128x128 block, ceil on both dims):
#   q_a  1536*7168  = 11,010,048 + 4*12*56  (=2,688)  = 11,012,736
#   q_b 12288*1536  = 18,874,368 + 4*96*12  (=4,608)  = 18,878,976
#   kv_a  576*7168  =  4,128,768 + 4*5*56   (=1,120)  =  4,129,888
#   kv_b 16384*512  =  8,388,608 + 4*128*4  (=2,048)  =  8,390,656
#   o    7168*8192  = 58,720,256 + 4*56*64  (=14,336) = 58,734,592
#   attention per layer = 101,146,848; x 61 layers = 6,169,957,728, of which q_a + kv_a (15,142,624 per layer:
#   MLA's down-projections, whole on every TP rank) 923,700,064 and the TP-split rest 5,246,257,664
#   expert: 2 x (14,680,064 + 4*16*56) + (14,680,064 + 4*56*16) = 3 x 14,683,648 = 44,050,944
#   dense MLP: 3 x (132,120,576 + 4*144*56 = 32,256) = 396,458,496
FP8B_ATTN = 61 * (101_146_848 - 15_142_624)
FP8B_REPL = 61 * 15_142_624
FP8B_EXPERT = 44_050_944
FP8B_DENSE = 396_458_496
# INT4 AWQ (0.5 B/param + F32 [out, in/128] + F32 pre_quant_scale [in]):
#   q_a   5,505,024 + 4*1536*56  (=344,064)   + 4*7168  (=28,672) =  5,877,760
#   q_b   9,437,184 + 4*12288*12 (=589,824)   + 4*1536  (=6,144)  = 10,033,152
#   kv_a  2,064,384 + 4*576*56   (=129,024)   + 4*7168  (=28,672) =  2,222,080
#   kv_b  4,194,304 + 4*16384*4  (=262,144)   + 4*512   (=2,048)  =  4,458,496
#   o    29,360,128 + 4*7168*64  (=1,835,008) + 4*8192  (=32,768) = 31,227,904
#   attention per layer = 53,819,392, of which q_a + kv_a 8,099,840 (whole on every rank)
#   expert: gate/up 7,340,032 + 4*2048*56 (=458,752) + 28,672 = 7,827,456 (x2)
#           down    7,340,032 + 4*7168*16 (=458,752) +  8,192 = 7,806,976  -> 23,461,888
#   dense:  gate/up 66,060,288 + 4*18432*56 (=4,128,768) + 28,672 = 70,217,728 (x2)
#           down    66,060,288 + 4*7168*144 (=4,128,768) + 73,728 = 70,262,784 -> 210,698,240
INT4_ATTN = 61 * (53_819_392 - 8_099_840)
INT4_REPL = 61 * 8_099_840
INT4_EXPERT = 23_461_888
INT4_DENSE = 210_698_240
EMBED = 2 * 2 * 163840 * 7168  # bf16 embedding + lm_head = 4,697,620,480
OTHER = 2 * (61 * (7168 + 7168 + 1536 + 512) + 7168 + 60 * 384 * 7168)  # bf16 = 332,314,624
# pruned to 192 experts: the routers shrink to 60 x 192 x 7168 -> 332,314,624 - 165,150,720
OTHER_PRUNED = 2 * (61 * (7168 + 7168 + 1536 + 512) + 7168 + 60 * 192 * 7168)  # = 167,163,904
# KV cache, MLA: (512 + 64) values x 61 layers x 2 B (bf16) per token, 8 x 4096 tokens:
KV = 8 * 4096 * 61 * 576 * 2  # = 2,302,672,896 (every TP rank holds the latent)
# activations: 8192 tokens x 7168 x (4 + 2 x top-8) x 2 B
ACT = 8192 * 7168 * 20 * 2  # = 2,348,810,240


def weights_per_gpu(attn, expert, dense, experts, gpus, ep, repl):
    """Split: attention, dense, shared expert (60 layers) and embeddings by TP = gpus; routed by EP.

    Norms, routers and MLA's q_a / kv_a (``repl``) are replicated; a pruned router has ``experts`` rows.
    """
    split = (attn + dense + 60 * expert + EMBED) / gpus
    routed = 60 * (experts // ep) * expert / (gpus // ep)
    other = OTHER - 2 * 60 * (384 - experts) * 7168
    return math.ceil(split + routed + other + repl)


@pytest.fixture(scope="module")
def kimi():
    return model_shape(KIMI)


@pytest.fixture(scope="module")
def kimi_pruned(tmp_path_factory):
    """50% expert pruning: what `moepress prune --keep 0.5` writes into config.json."""
    cfg = json.loads(open(KIMI).read())
    cfg["n_routed_experts"] = 192
    d = tmp_path_factory.mktemp("kimi-pruned")
    (d / "config.json").write_text(json.dumps(cfg))
    return d, model_shape(d)


def test_component_bytes_match_hand_numbers(kimi):
    b = kimi.bytes_by_kind("fp8-block")
    assert b["attn"] + b["replicated"] == FP8B_ATTN + FP8B_REPL == 6_169_957_728
    assert b["replicated"] == FP8B_REPL == 923_700_064
    assert b["routed"] == 23040 * FP8B_EXPERT == 1_014_933_749_760
    assert b["shared"] == 60 * FP8B_EXPERT
    assert b["dense"] == FP8B_DENSE
    assert b["embed"] == EMBED == 4_697_620_480
    assert b["other"] == OTHER == 332_314_624
    i = kimi.bytes_by_kind("int4-awq")
    assert (i["attn"], i["replicated"], i["routed"], i["dense"]) == (INT4_ATTN, INT4_REPL, 23040 * INT4_EXPERT,
                                                                     INT4_DENSE)
    assert linear_bytes(2048, 7168, "bf16") == 2 * 14_680_064


def test_fp8_block_kimi_on_h200_needs_16(kimi):
    # 8 x H200: weights = (5,246,257,664 + 396,458,496 + 60 x 44,050,944 + 4,697,620,480) / 8
    #   + 60 x 48 experts x 44,050,944 + 332,314,624 + 923,700,064 = 129,745,657,568 B; + KV 2.30 GB
    #   + act 2.35 GB + reserve 14.1 GB = 148.5 GB > 141 GB -> 16 GPUs (2 nodes): 65,500,836,128 B of weights
    w8 = weights_per_gpu(FP8B_ATTN, FP8B_EXPERT, FP8B_DENSE, 384, 8, 8, FP8B_REPL)
    assert w8 == 129_745_657_568
    assert w8 + KV + ACT + RESERVE_FRACTION * 141e9 > 141e9
    p = plan(kimi, "h200", "fp8-block")
    assert (p.gpus, p.tp, p.ep, p.moe_tp, p.nodes, p.experts_per_rank) == (16, 16, 16, 1, 2, 24)
    assert p.bytes_per_gpu["weights"] == weights_per_gpu(FP8B_ATTN, FP8B_EXPERT, FP8B_DENSE, 384, 16, 16,
                                                         FP8B_REPL) == 65_500_836_128
    assert p.bytes_per_gpu["kv_cache"] == KV and p.bytes_per_gpu["activations"] == ACT
    assert p.bytes_per_gpu["reserve"] == 14_100_000_000
    assert p.fits and p.bytes_per_gpu["total"] == 65_500_836_128 + KV + ACT + 14_100_000_000
    with pytest.raises(MoepressError, match=r"--gpus 8: fp8-block needs 148.5 GB .* use --gpus 16"):
        plan(kimi, "h200", "fp8-block", gpus=8)


def test_int4_kimi_on_h200_fits_8_and_a100_needs_16(kimi):
    # 8 x H200, INT4 AWQ: (2,788,892,672 + 210,698,240 + 1,407,713,280 + 4,697,620,480 = 9,104,924,672) / 8
    #   + 60 x 48 x 23,461,888 + 332,314,624 + 494,090,240 (q_a, kv_a on every rank)
    #   = 69,534,757,888 B (+ KV 2.30 + act 2.35 + reserve 14.1 GB) = 88.3 GB <= 141 GB
    p = plan(kimi, "h200", "int4-awq")
    assert (p.gpus, p.ep) == (8, 8)
    assert p.bytes_per_gpu["weights"] == weights_per_gpu(INT4_ATTN, INT4_EXPERT, INT4_DENSE, 384, 8, 8,
                                                         INT4_REPL) == 69_534_757_888
    # 8 x A100 80GB: 69.5 + 2.30 + 2.35 + 8.0 = 82.2 GB > 80 GB -> 16
    assert plan(kimi, "a100-80gb", "int4-awq").gpus == 16


def test_plan_says_when_trtllm_cannot_load_the_experts(kimi):
    """The sizes hold for any runtime; TensorRT-LLM's fused MoE loads INT4 experts only as Model-Optimizer
    W4A8 (Mixtral / Qwen3-MoE): the plan says so and names a format it loads."""
    p = plan(kimi, "h200", "int4-awq")
    # MLA: the block FP8 Kimi ships in, under DeepSeek's names, not per-tensor fp8 through hf-modelopt (whose MLA
    # projections TensorRT-LLM's DeepSeek loader misreads: the build refused what this named)
    assert "WInt4AFP8" in p.unloadable and "use fp8-block (export hf-fp8-block) on H200" in p.unloadable
    # where the target runs no block FP8 (L40S, sm89), per-tensor fp8 with the rules the build asks for
    assert "use fp8 with --rule 'self_attn.kv_b_proj=none'" in plan(kimi, "l40s", "int4-awq").unloadable
    # a 4-bit alternative stays 4-bit, with the one rule its MLA needs (not block FP8, twice the bytes)
    assert "use nvfp4-a16 with --rule 'self_attn.kv_b_proj=none' on B200" in plan(kimi, "b200", "mxfp4").unloadable
    assert any("TensorRT-LLM cannot load it" in n for n in p.notes)
    assert "W4A8_CUSTOM" in plan(kimi, "h200", "w4a8-awq").unloadable
    assert plan(kimi, "h200", "fp8-block").unloadable is None
    # MXFP4 goes out as compressed-tensors only: "fits" on an A100 is for vLLM / SGLang
    assert "compressed-tensors only" in plan(kimi, "a100-80gb", "mxfp4").unloadable


def test_pruned_50_percent(kimi_pruned):
    d, shape = kimi_pruned
    assert shape.num_experts == 192
    # FP8 block, 8 x H200: 12,983,393,280 / 8 + 60 x 24 x 44,050,944 + (332,314,624 - 2 x 60 x 192 x 7168
    #   = 167,163,904: routers of 192 rows) + 923,700,064 = 66,147,147,488 B
    #   (+ 18.75 GB = 84.9 GB) fits; 4 GPUs would hold 48 experts per rank: 126.9 GB of experts
    p = plan(shape, "h200", "fp8-block")
    assert (p.gpus, p.experts_per_rank) == (8, 24)
    assert p.bytes_per_gpu["weights"] == weights_per_gpu(FP8B_ATTN, FP8B_EXPERT, FP8B_DENSE, 192, 8, 8,
                                                         FP8B_REPL) == 66_147_147_488
    # INT4 AWQ, 4 x H200: 9,104,924,672 / 4 + 60 x 48 x 23,461,888 + 167,163,904 + 494,090,240
    #   = 70,507,722,752 B (+ 18.75 GB = 89.3 GB <= 141 GB); 2 GPUs would hold 96 experts per rank
    p = plan(shape, "h200", "int4-awq")
    assert p.gpus == 4
    assert p.bytes_per_gpu["weights"] == weights_per_gpu(INT4_ATTN, INT4_EXPERT, INT4_DENSE, 192, 4, 4,
                                                         INT4_REPL) == 70_507_722_752
    # from the directory too (pruning is read from config.json)
    assert plan(str(d), "h200", "int4-awq").gpus == 4


def test_ep_smaller_than_tp(kimi):
    # 16 GPUs, EP 8: 48 experts per EP rank split over moe_tp 2 -> same routed bytes as EP 16
    p = plan(kimi, "h200", "fp8-block", gpus=16, ep=8)
    assert (p.ep, p.moe_tp, p.experts_per_rank) == (8, 2, 48)
    assert p.bytes_per_gpu["weights"] == weights_per_gpu(FP8B_ATTN, FP8B_EXPERT, FP8B_DENSE, 384, 16, 8, FP8B_REPL)


def test_gqa_kv_cache():
    # a GQA config: 8 kv heads x 128 head dim, 2 (K and V) x 2 B, 4 layers, 2 x 1024 tokens
    from tests.helpers import make_random_checkpoint  # noqa: F401  (helpers importable)

    cfg = json.loads(open("models/tiny-qwen3-moe/config.json").read())
    cfg.update(num_key_value_heads=8, num_attention_heads=16, head_dim=128)
    p = plan(cfg, "l4", "bf16", gpus=2, max_batch=2, max_seq_len=1024)
    # TP 2: 4 kv heads per rank -> 2 x 1024 x 4 layers x (2 x 4 x 128) x 2 B
    assert p.bytes_per_gpu["kv_cache"] == 2 * 1024 * cfg["num_hidden_layers"] * (2 * 4 * 128) * 2


def test_a_quantized_checkpoint_planned_in_its_own_format_is_refused_naming_it(tmp_path):
    """plan of a quantize output without --format plans its own format; a target that cannot run it was refused as
    "--format fp8: ...", a flag never given."""
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="fp8-dynamic"))
    with pytest.raises(MoepressError) as e:
        plan(str(q), "a100")
    assert str(e.value).startswith(f"{q}: quantized as fp8-dynamic: FP8-DYNAMIC runs in TensorRT-LLM on sm90 "), \
        str(e.value)


def test_refusals(kimi):
    # not int4-awq: TensorRT-LLM's fused MoE does not load INT4 weight-only experts
    with pytest.raises(MoepressError, match=r"FP8 needs sm89\+; A100 80GB SXM is sm80: use bf16"):
        plan(kimi, "a100", "fp8")
    with pytest.raises(MoepressError, match=r"FP8 needs sm89\+; A100 80GB SXM is sm80: use int4-awq"):
        plan(kimi, "a100", "fp8", runtime="onnx")
    with pytest.raises(MoepressError, match=r"FP8-BLOCK runs in TensorRT-LLM on sm90/sm100 only \(its hardware "
                       r"support matrix\); L40S is sm89: use fp8"):
        plan(kimi, "l40s", "fp8-block")
    with pytest.raises(MoepressError, match=r"INT4-AWQ runs in TensorRT-LLM on .*RTX PRO 6000 Blackwell is sm120: "
                       r"use nvfp4"):
        plan(kimi, "rtx-pro-6000", "int4-awq")
    with pytest.raises(MoepressError, match=r"--ep 5: the model has 384 routed experts, not divisible by 5; use --ep 4"
                       ):
        plan(kimi, "h200", "int4-awq", gpus=8, ep=5)
    # --tp stands for the GPU count only when --gpus is not given: both, and unequal, is refused, not planned at 4
    with pytest.raises(MoepressError, match=r"--tp 4: expected --tp equal to --gpus \(8\)"):
        plan(kimi, "h200", "int4-awq", gpus=8, tp=4)
    with pytest.raises(MoepressError, match=r"--target h300: unknown GPU target"):
        plan(kimi, "h300", "fp8")
    # the MLA latent cache is on every rank: 8 x 131072 tokens x 61 x 576 x 2 B = 73.7 GB > 24 GB
    with pytest.raises(MoepressError, match=r"does not fit on up to 256 x L4"):
        plan(kimi, "l4", "bf16", max_seq_len=131072)


@pytest.mark.parametrize("content,needle", [(b"{", "not valid JSON"), (b"\xff\xfe", "not UTF-8"),
                                            (b"[1]", "expected a JSON object")])
def test_plan_of_a_broken_config_file_is_one_line(cli_run, tmp_path, content, needle):
    """A config .json given to plan was read with a bare json.loads: tracebacks."""
    f = tmp_path / "partial.json"
    f.write_bytes(content)
    r = cli_run("plan", f, "--target", "h100")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "partial.json" in lines[0] and needle in lines[0], r.output


def test_plan_of_a_config_file_whose_quantization_config_is_no_object_is_one_line(cli_run, tmp_path):
    """The checkpoint directory refused it; the config file alone reached .get on a str: a traceback."""
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    f = tmp_path / "c.json"
    f.write_text(json.dumps({**cfg, "quantization_config": "fp8"}))
    r = cli_run("plan", f, "--target", "h100")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0] == f"moepress: error: {f}: quantization_config is str; expected a JSON object", lines


def test_a_config_file_alone_is_planned_in_the_format_its_quantization_config_names(cli_run, tmp_path):
    """A Model-Optimizer config (a quantize output's or an hf-modelopt export's config.json, or NVIDIA's) was planned
    as bf16 without a word; its quant_algo names the format, as its directory's moepress_quant.json does. Another
    quantization_config (GPTQ's here) names none moepress sizes: refused, asking for --format."""
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    for algo, fmt in (("FP8", "fp8"), ("NVFP4", "nvfp4"), ("W4A16_AWQ", "int4-awq")):
        f = tmp_path / f"{algo}.json"
        f.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "modelopt", "quant_algo": algo}}))
        r = cli_run("plan", f, "--target", "b200", "--json")
        assert r.exit_code == 0 and json.loads(r.output)["format"] == fmt, r.output
    f = tmp_path / "gptq.json"
    f.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    r = cli_run("plan", f, "--target", "h100")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert f"{f}: quantization_config (gptq) names no weight format moepress sizes" in lines[0]
    assert "`moepress plan --format FORMAT` sizes it as one" in lines[0]
    assert cli_run("plan", f, "--target", "h100", "--format", "int4-gptq").exit_code == 0
    # a quantize --rule output's config alone: MIXED_PRECISION, sized by its routed experts' format as its build is
    f = tmp_path / "mixed.json"
    layers = {"model.layers.0.mlp.experts.0.gate_proj": {"quant_algo": "NVFP4"},
              "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"}}
    f.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                                                            "quantized_layers": layers}}))
    r = cli_run("plan", f, "--target", "b200", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["format"] == "nvfp4", r.output


def test_an_mla_config_is_not_held_to_a_kv_head_count(cli_run, tmp_path):
    """A KV head count that does not divide the heads is refused (test_bad_input.py), as written in the file: a
    DeepSeek-V3 config that leaves it out (transformers' config class fills in 128) plans, its MLA reads none."""
    cfg = json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text())
    cfg.pop("num_key_value_heads", None)
    f = tmp_path / "dsv3.json"
    f.write_text(json.dumps(cfg))
    r = cli_run("plan", f, "--target", "h100")
    assert r.exit_code == 0, r.output


def test_plan_cli(cli_run):
    r = cli_run("plan", "tiny-qwen3-moe", "--target", "h100", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["gpus"] == 1 and d["format"] == "bf16" and d["fits"]
    for args, msg in [
        (("--target", "a100", "--format", "fp8"), "FP8 needs sm89+; A100 80GB SXM is sm80: use bf16"),
        (("--target", "nope"), "--target nope: unknown GPU target"),
        (("--target", "h200", "--format", "fp8-block", "--gpus", "8"), "use --gpus 16"),
        (("--target", "h200", "--gpus", "8", "--ep", "7"), "not divisible by 7"),
    ]:
        r = cli_run("plan", KIMI, *args)
        assert r.exit_code == 2, r.output
        assert msg in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1


def test_inspect_reports_formats_and_targets(cli_run):
    r = cli_run("inspect", "tiny-qwen3-moe", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    t = s["targets_table"]
    assert t["h100"]["fp8-block"] == 1 and t["a100-80gb"]["int4-awq"] == 1
    assert t["a100-80gb"]["fp8"] is None  # sm80 cannot run FP8
    assert "fp8" in s["formats"] and "h100:" in s["targets"]
    r = cli_run("inspect", "tiny-qwen3-moe")
    assert "targets    a100-40gb:" in r.output


def test_splits_the_heads_or_experts_cannot_take_are_refused_and_skipped(cli_run):
    """TensorRT-LLM gives each rank heads / tp heads and intermediate / moe_tp of every expert: a TP the heads
    or experts cannot split was planned as fitting (tiny-mixtral on 8 GPUs with 4 heads)."""
    cfg = json.loads(open("models/tiny-mixtral/config.json").read())  # 4 heads, 2 kv heads, 8 experts x 256
    for gpus, ep, msg in [(8, None, "tp 8 does not divide the 4 attention heads"),
                          (4, 1, "moe_tp 4 (tp / ep) does not divide the experts' intermediate size 254")]:
        c = {**cfg, "intermediate_size": 254} if ep == 1 else cfg
        with pytest.raises(MoepressError, match=rf"^--gpus {gpus}: {re.escape(msg)}; expected a GPU count"):
            plan(c, "h100", "bf16", gpus=gpus, ep=ep)
    # an --ep larger than some GPU count the hint considered: ZeroDivisionError (moe_tp 0), exit 1 and a traceback;
    # the GPU counts it names are those the --ep given splits
    c = json.loads(open(KIMI).read())
    with pytest.raises(MoepressError, match=r"^--gpus 6: tp 6 does not divide the 64 attention heads; .*\(e\.g\. 16, "):
        plan(c, "h200", "fp8", gpus=6, ep=2)
    # the count given by --tp alone is named as --tp (it said "--gpus 6", an option not given)
    with pytest.raises(MoepressError, match=r"^--tp 6: tp 6 does not divide the 64 attention heads"):
        plan(c, "h200", "fp8", tp=6, ep=2)
    with pytest.raises(MoepressError, match=r"^--gpus 6: .*splits both$"):
        plan(c, "h200", "fp8", gpus=6, ep=3)
    r = cli_run("plan", "tiny-mixtral", "--target", "h100", "--max-seq-len", "100000")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "--max-seq-len 100000: " in r.output
    assert "has max_position_embeddings 1024; expected at most 1024" in r.output
    r = cli_run("plan", "tiny-mixtral", "--target", "h100", "--max-seq-len", "1")  # no token left to generate
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "--max-seq-len 1: expected at least 2" in r.output
    r = cli_run("plan", "tiny-mixtral", "--target", "h100", "--json")
    assert json.loads(r.output)["max_seq_len"] == 1024  # the default, capped by the model


def test_a_quantized_checkpoints_group_size_is_planned(cli_run, tmp_path):
    """INT4 with group 32 stores 4x the scales of group 128: the plan counted 128 whatever the checkpoint
    said (18% under at Kimi K2 Thinking's group 32). Its weights equal the bytes the checkpoint stores."""
    from moepress.compress.checkpoint import CheckpointReader

    q = tmp_path / "q32"
    r = cli_run("quantize", "tiny-mixtral", "--format", "int4-gptq", "--group-size", "32", "--num-samples", "2",
                "--seq-len", "16", "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    reader = CheckpointReader(q)
    assert plan(str(q), "h100").weights_total == sum(reader.info(n).nbytes for n in reader.names())


@pytest.mark.parametrize("rule", ["*.experts.*=none", "*.experts.*=int4-awq"])
def test_linears_a_rule_stores_otherwise_are_planned_as_stored(cli_run, tmp_path, rule):
    """A --rule leaving the experts bf16 (or giving them another format) was planned as if every linear
    were in the checkpoint's format: 37% under the stored bytes here, a plan that fits where the model
    does not. Its weights equal the bytes the checkpoint stores."""
    from moepress.compress.checkpoint import CheckpointReader

    q = tmp_path / "q"
    r = cli_run("quantize", "tiny-mixtral", "--format", "fp8", "--rule", rule, "--num-samples", "2",
                "--seq-len", "16", "-o", q, "--quiet")
    assert r.exit_code == 0, r.output
    reader = CheckpointReader(q)
    assert plan(str(q), "h100").weights_total == sum(reader.info(n).nbytes for n in reader.names())
    # B200 runs fp8, not int4-awq: the rule's format is held to the target too (it planned "fits yes" on the
    # fp8 headline, where `moepress build` then refused the export)
    if rule.endswith("int4-awq"):
        with pytest.raises(MoepressError, match="its routed linears are stored int4-awq .a --rule.: INT4-AWQ runs in "
                           "TensorRT-LLM on sm80"):
            plan(str(q), "b200")
    else:
        assert plan(str(q), "b200").fits


def test_a_split_that_cuts_blocks_or_groups_is_refused_or_noted(kimi):
    """A rank's share of a routed expert must hold whole blocks (fp8-block 128 x 128) or INT4 groups: vLLM refuses a
    block-FP8 gate/up of 192 rows per rank (vllm-project/vllm#17569) and no runtime shrinks moe_tp. A dense or
    shared MLP cut this way (DeepSeek's 18432-wide MLP at TP 32: 576 per rank, sgl-project/sglang#3345) is a
    note: TensorRT-LLM runs it at a smaller TP (modeling_deepseekv3.py _compute_mlp_tp_size)."""
    with pytest.raises(MoepressError, match=r"moe_tp 32 gives each rank 64 (rows|input channels) of the routed MLP"):
        plan(kimi, "h200", "fp8-block", gpus=32, ep=1)
    with pytest.raises(MoepressError, match=r"moe_tp 32 gives each rank 64 input channels .* int4-awq's 128"):
        plan(kimi, "h200", "int4-awq", gpus=32, ep=1)
    assert plan(kimi, "h200", "int4-awq", gpus=16, ep=1).moe_tp == 16  # 2048 / 16 = 128: whole groups
    p = plan(kimi, "h200", "fp8-block", gpus=32)  # EP 32: experts whole; the dense MLP cut, said
    assert p.tp == 32 and any("576" in n and "vLLM and SGLang refuse" in n for n in p.notes)
    assert plan(kimi, "h200", "fp8", gpus=32, ep=1).tp == 32  # per-tensor FP8: no block to cut
    assert not any("refuse this split" in n for n in plan(kimi, "h200", "fp8-block", gpus=16).notes)


def test_the_planner_says_when_only_a_cut_split_would_hold_it(kimi):
    """Kimi K2 in block FP8 with --ep 1 and a large KV cache: the GPU counts that would hold it split every
    expert's 2048 rows below 128. The refusal says so (it said "does not fit", printing a per-GPU size that fits)."""
    with pytest.raises(MoepressError, match=r"x H100 SXM would hold it, but moe_tp \d+ gives each rank \d+ rows"):
        plan(kimi, "h100", "fp8-block", ep=1, max_batch=32, max_seq_len=16384)


def test_linears_a_rule_left_unquantized_are_not_held_to_the_formats_blocks(tmp_path, cli_run):
    """A checkpoint quantized to fp8-block with its MLPs left bf16 (--rule ...=none): the planner held those
    bf16 weights to fp8-block's 128-wide blocks and refused TP 2 and 4."""
    from moepress import models

    q = tmp_path / "q"
    assert cli_run("quantize", models.path("tiny-deepseek-v3"), "--format", "fp8-block", "--rule",
                   "mlp.experts.*=none", "--rule", "mlp.*_proj=none", "-o", q, "--quiet").exit_code == 0
    assert [plan(str(q), "h100", gpus=g, ep=1).tp for g in (2, 4)] == [2, 4]
    # the bf16 original planned as fp8-block: its 64-wide experts run bf16 (no runtime takes them in blocks), so
    # TP 4 cuts no block; the cut of experts that do run in blocks: test_the_planner_says_when_only_a_cut_...
    p = plan(str(models.path("tiny-deepseek-v3")), "h100", "fp8-block", gpus=4, ep=1)
    assert p.tp == 4 and any("routed [64, 128], routed [128, 64]" in n for n in p.notes)


def test_block_fp8_linears_no_runtime_computes_in_blocks_are_planned_bf16():
    """tiny-mixtral-w192 in fp8-block: its experts are 192 wide, which no fused MoE takes in 128x128 blocks
    (hf-fp8-block keeps them bf16; compressed-tensors and hf-modelopt refuse them). The planner counted them as
    block FP8 (about half their bytes); now bf16, said in a note. Attention: o_proj (128 x 128) stays block FP8
    (1 B a value + one F32 scale); q / k / v (128, 64, 64 rows) are fused into one qkv whose k / v are not whole
    128-row blocks, so hf-fp8-block keeps all three bf16 (kernel_widths.fused_block_ok), 4 layers."""
    from moepress import models

    m = str(models.path("tiny-mixtral-w192"))
    shape = model_shape(m)
    b = shape.bytes_by_kind("fp8-block")
    assert b["routed"] == sum(2 * o * i * c for k, o, i, c in shape.linears if k == "routed")
    assert b["attn"] + b["kv"] == 4 * (2 * (128 * 128 + 2 * 64 * 128) + 128 * 128 + 4)  # kv: k_proj, v_proj
    assert b["kv"] == 4 * 2 * 2 * 64 * 128
    p = plan(m, "h100", "fp8-block")
    assert any("counted bf16" in n and "routed [128, 192], routed [192, 128]" in n for n in p.notes)
    assert not any("counted bf16" in n for n in plan(m, "h100", "fp8").notes)


@pytest.mark.parametrize("width,noted", [(176, True), (192, False)])
def test_fp4_experts_at_widths_the_kernels_cannot_run_are_noted(width, noted):
    """Mixtral experts 176 wide in NVFP4: no FP4 fused-MoE kernel runs them (both widths multiples of 64, one of
    128), so both FP4 exports refuse them; the plan says so instead of planning what cannot be written."""
    from moepress import models

    cfg = json.loads((models.path("tiny-mixtral") / "config.json").read_text())
    cfg["intermediate_size"] = width
    for p in (plan(cfg, "b200", "nvfp4"), plan(cfg, "b200", bits=4)):
        assert any("FP4 fused-MoE kernels" in n and f"128 / {width}" in n for n in p.notes) == noted


def _kimi_thinking(tmp_path):
    """Kimi K2 Thinking's config.json: Kimi K2's with the compressed-tensors quantization_config it ships (routed
    experts INT4 symmetric group 32, weight-only; attention, shared experts and the dense MLP ignored: bf16), as the
    bundled fixture carries it (moonshotai/Kimi-K2-Thinking config.json)."""
    from moepress import models

    cfg = json.loads(open(KIMI).read())
    cfg["quantization_config"] = json.loads(
        (models.resolve("tiny-kimi-k2-int4") / "config.json").read_text())["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_a_compressed_tensors_checkpoint_is_planned_as_it_stores_its_linears(tmp_path, cli_run):
    """Kimi K2 Thinking was planned in bf16 (2,053 GB: 32 H200 in 4 nodes) although its routed experts are INT4 (one
    node of 8 H200 holds it): its quantization_config was not read. Hand numbers: expert = 3 x (7,340,032 packed +
    2 x 458,752 group-32 scales in the model's dtype, BF16, as Kimi stores them; they were counted F32, 63 GB too
    many on Kimi K2 Thinking) = 24,772,608 B; attention bf16 61 x 202,244,096; shared experts bf16 60 x 88,080,384;
    dense MLP bf16 792,723,456."""
    d = _kimi_thinking(tmp_path)
    shape = model_shape(d)
    assert (shape.stored_format, shape.int4_group) == ("int4-gptq", 32)
    b = shape.bytes_by_kind("int4-gptq")
    assert b["routed"] == 23040 * 24_772_608
    assert b["attn"] + b["replicated"] == 61 * 202_244_096
    assert (b["shared"], b["dense"]) == (60 * 88_080_384, 792_723_456)
    p = plan(str(d), "h200")
    assert (p.format, p.gpus, p.nodes) == ("int4-gptq", 8, 1)
    assert p.weights_total == 23040 * 24_772_608 + 61 * 202_244_096 + 60 * 88_080_384 + 792_723_456 + EMBED + OTHER
    r = cli_run("plan", d, "--target", "h200", "--format", "fp8-block", "--json")  # --format still plans all in it
    assert json.loads(r.output)["format"] == "fp8-block" and json.loads(r.output)["gpus"] == 16


@pytest.mark.parametrize("fmt", ["fp8", "int4-gptq"])
def test_a_compressed_tensors_export_plans_as_the_checkpoint_it_was_exported_from(tmp_path, cli_run, fmt):
    """`moepress plan` of a compressed-tensors export planned bf16 (2.3x the bytes of an INT4 one); it now plans the
    export's scheme, with the bytes of the quantize output it came from (planned from moepress_quant.json)."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert cli_run("quantize", "tiny-mixtral", "--format", fmt, "--num-samples", "2", "--seq-len", "16", "-o", q,
                   "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", ct, "--quiet").exit_code == 0
    theirs, ours = plan(str(ct), "h100"), plan(str(q), "h100")
    assert (theirs.format, theirs.weights_total) == (fmt, ours.weights_total)


def test_a_compressed_tensors_scheme_no_format_stores_is_refused_unless_a_format_is_given(tmp_path, cli_run):
    """INT8 weights (a scheme moepress has no format of) are not planned as something else."""
    d = _kimi_thinking(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (d / "config.json").write_text(json.dumps(cfg))
    r = cli_run("plan", d, "--target", "h200")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "quantization_config.config_groups.group_0" in r.stderr and "plan it with --format" in r.stderr
    assert cli_run("plan", d, "--target", "h200", "--format", "fp8-block").exit_code == 0


def test_a_native_int4_checkpoint_on_blackwell_is_sized_for_vllm(cli_run):
    """Kimi K2 Thinking's own INT4 on B200 was refused (TensorRT-LLM's matrix has no W4A16 there) while on H200 it
    was sized with a note that TensorRT-LLM cannot load it; vLLM serves it as stored on both. Now sized with that
    note on both, its bytes those the checkpoint holds (within 1%: the I64 weight_shape tensors and the F32 router
    bias are counted as bf16 others); an INT4 --format asked for B200 is still refused."""
    from moepress import models
    from moepress.compress.checkpoint import CheckpointReader

    d = models.path("tiny-kimi-k2-int4")
    p = plan(str(d), "b200")
    assert p.format == "int4-gptq" and p.fits and "TensorRT-LLM runs int4-gptq on sm80" in (p.unloadable or "")
    r = CheckpointReader(d)
    stored = sum(r.info(n).nbytes for n in r.names())
    assert abs(p.weights_total / stored - 1) < 0.01, (p.weights_total, stored)
    refused = cli_run("plan", d, "--target", "b200", "--format", "int4-gptq")
    assert refused.exit_code == 2 and "use nvfp4" in refused.stderr


def _ct_groups(*groups) -> dict:
    """A compressed-tensors quantization_config of (format, group, targets, ct format) groups, each scheme the
    format's own (its ``ct_scheme``: what moepress's export writes for it)."""
    from moepress.compress import formats

    def one(fmt, group, targets, ct_format):
        return {**formats.FORMATS[fmt].ct_scheme(group, targets).model_dump(exclude_none=True), "format": ct_format}

    return {"quant_method": "compressed-tensors", "format": "mixed", "ignore": ["lm_head"],
            "config_groups": {f"group_{k}": one(*g) for k, g in enumerate(groups)}}


def test_a_compressed_tensors_checkpoint_is_planned_in_its_experts_format_and_smallest_group():
    """The checkpoint's format is its routed experts' even where other quantized linears outnumber them (here one
    INT4 expert against every FP8 attention linear), and INT4 scales are counted at its smallest group (experts
    at 128, attention at 32): the largest would under-count the scales' bytes."""
    from moepress import models

    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    one_expert = _ct_groups(("int4-gptq", 128, ["re:model\\.layers\\.0\\.mlp\\.experts\\.0\\..*"], "pack-quantized"),
                            ("fp8", None, ["re:.*self_attn.*"], "float-quantized"))
    assert model_shape({**cfg, "quantization_config": one_expert}).stored_format == "int4-gptq"
    two_groups = _ct_groups(("int4-gptq", 128, ["re:.*mlp\\.experts.*"], "pack-quantized"),
                            ("int4-gptq", 32, ["re:.*self_attn.*"], "pack-quantized"))
    shape = model_shape({**cfg, "quantization_config": two_groups})
    assert (shape.stored_format, shape.int4_group) == ("int4-gptq", 32)

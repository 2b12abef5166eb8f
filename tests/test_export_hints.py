"""Export refusals send the user somewhere that works: every export a refusal names as the thing to use
takes the same quantized checkpoint ("export onnx"), and every "quantize with FLAGS, then export X" step,
followed once, gives a checkpoint X exports. A new-user walkthrough went in a loop: unfolded int4-awq was
sent from compressed-tensors to hf-modelopt and back; DeepSeek's w4a8-awq was asked for --group-size 64,
then --awq-fold, each refused in turn.

Also: an engine built from a trtllm-ckpt is suggested only formats a trtllm-ckpt holds, naming the export
rather than a --format option that ``moepress build`` does not have; so is an hf-modelopt export built for
TensorRT-LLM's PyTorch backend, and both refusals start with the export's path. trtllm-ckpt sends block FP8
with partial-block experts, bf16 DeepSeek and Kimi's own INT4 to exports that take them; onnx's FP4
refusal starts with its flag."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.exporters.build import build
from moepress.exporters.plan import plan

EXPORTS = ("hf-modelopt", "compressed-tensors", "trtllm-ckpt", "onnx")
NAMED = EXPORTS + ("hf-fp8-block",)  # what a hint may send a source to
# (family, format, group, --awq-fold): the defaults, and group 64 where DeepSeek's 64-wide down
# projections make the default quantize its experts two ways
SOURCES = [("tiny-mixtral", f, 128, False) for f in ("int4-awq", "int4-gptq", "w4a8-awq")] + \
    [("tiny-mixtral", "w4a8-awq", 128, True)] + \
    [("tiny-deepseek-v3", f, g, False) for f in ("int4-awq", "int4-gptq", "w4a8-awq") for g in (128, 64)] + \
    [("tiny-deepseek-v3", "w4a8-awq", 64, True), ("tiny-deepseek-v3", "mxfp4", 128, False)] + \
    [("tiny-mixtral-w192", f, 128, False) for f in ("int4-gptq", "w4a8-awq")]  # 192 wide: groups of 64 only


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source key) -> path, and (source key, export) -> None or the refusal: each made once, on demand.
    A key with format None is the model itself: a bundled one, or a Path (a config-edited copy)."""
    base, done = tmp_path_factory.mktemp("hints"), {}

    def get(key, ex=None):
        model = key[0] if isinstance(key[0], Path) else models.path(key[0])
        if key not in done and key[1] is None:
            done[key] = model
        if key not in done:
            fam, fmt, group, fold = key
            q = base / "-".join(str(getattr(k, "name", k)) for k in key)
            quantize_checkpoint(model, q, QuantConfig(format=fmt, group_size=group, awq_fold=fold,
                                                                 num_samples=4, seq_len=32))
            done[key] = q
        if ex is None:
            return done[key]
        if (key, ex) not in done:
            try:
                export(done[key], base / "out" / f"{done[key].name}-{ex}", ExportConfig(format=ex))
                done[(key, ex)] = None
            except MoepressError as e:
                done[(key, ex)] = str(e)
        return done[(key, ex)]

    get.out = lambda key, ex: base / "out" / f"{done[key].name}-{ex}"  # where (key, ex) was written
    return get


def _requantized(key, flags: str):
    """The source key after re-running its quantize with ``flags`` (--format, --group-size, --awq-fold added)."""
    fam, fmt, group, fold = key
    f = re.search(r"--format ([\w-]+)", flags)
    g = re.search(r"--group-size (\d+)", flags)
    new = f.group(1) if f else fmt
    return fam, new, int(g.group(1)) if g else group, "--awq-fold" in flags or (fold and new == fmt)


def steps(key, refusing: str, msg: str) -> list[tuple[tuple, str]]:
    """What a refusal says to do, as (source key, export) pairs: "quantize with FLAGS, then export X",
    "quantize with FLAGS" (then this export again), and exports named as they are ("export X", "--format X")."""
    hint = msg.split(": ", 1)[1]  # not the refusal's own "--format X:"
    out = []
    for flags, ex in re.findall(r"quantize with ([^;]*?), then export ([\w-]+)", hint):
        out.append((_requantized(key, re.sub(r"\([^)]*\)", "", flags)), ex))
    hint = re.sub(r"quantize with [^;]*?, then export [\w-]+", "", hint)
    for flags in re.findall(r"quantize with ((?:--[\w-]+(?: (?!--)[\w-]+)? ?)+)", hint):
        out.append((_requantized(key, flags), refusing))
    out += [(key, ex) for ex in re.findall(r"(?:--format|export) ([\w-]+)", hint) if ex in NAMED]
    return out


@pytest.mark.parametrize("key", SOURCES, ids=["-".join(map(str, k)) for k in SOURCES])
def test_refusals_name_only_exports_that_take_the_source(exported, key):
    _refusals_lead_somewhere(exported, key)


def test_experts_no_group_fits_are_sent_to_fp8(exported, tmp_path_factory):
    """Mixtral experts 176 wide: no INT4 group (128 / 64 / 32) nor MXFP4 block divides the down projections'
    in_features, so they stay bf16 beside quantized gate / up, which every fused-MoE export refuses; the
    refusals sent INT4 to "--awq-fold, then export compressed-tensors" and MXFP4 to compressed-tensors,
    both refused again (and fp8-block's refusal asked for a --group-size it has no use for)."""
    from helpers import make_random_checkpoint

    src = make_random_checkpoint("mixtral", tmp_path_factory.mktemp("w176") / "mixtral-w176", hidden_size=128,
                                 intermediate_size=176, vocab_size=4096)
    for f in models.path("tiny-mixtral").glob("tokenizer*"):
        shutil.copy(f, src)
    for fmt in ("int4-awq", "int4-gptq", "mxfp4"):
        _refusals_lead_somewhere(exported, (src, fmt, 128, False))
    # hidden 160, experts 72 wide: group 32 divides the 160 inputs the default group left bf16, not the 72
    qwen = make_random_checkpoint("qwen3_moe", tmp_path_factory.mktemp("w160") / "qwen-w160", hidden_size=160,
                                  moe_intermediate_size=72, vocab_size=4096)
    for f in models.path("tiny-qwen3-moe").glob("tokenizer*"):
        shutil.copy(f, qwen)
    key = (src, "fp8-block", 128, False)  # its onnx refusal names formats, not steps (not this grammar)
    for ex in ("compressed-tensors", "hf-modelopt"):  # the fp8 re-quantize, or hf-fp8-block keeping them bf16
        assert sorted(_follow(exported, key, ex, exported(key, ex))) == sorted([ex, "hf-fp8-block"])
    _refusals_lead_somewhere(exported, (qwen, "int4-gptq", 128, False))


def _random(tmp_path_factory, family: str, like: str, **config) -> Path:
    """A random-init checkpoint of ``family`` with ``like``'s tokenizer (a bundled model)."""
    from helpers import make_random_checkpoint

    name = "-".join(f"{v}" for v in config.values())
    src = make_random_checkpoint(family, tmp_path_factory.mktemp("r") / f"{family}-{name}", vocab_size=4096, **config)
    for f in models.path(like).glob("tokenizer*"):
        shutil.copy(f, src)
    return src


def test_deepseek_experts_hf_modelopt_refuses_are_not_sent_there_by_trtllm_ckpt(exported, tmp_path_factory):
    """DeepSeek experts 40 wide: NVFP4 leaves their down projections bf16 beside NVFP4 gate / up, which hf-modelopt
    refuses; trtllm-ckpt (no DeepSeek engine path) sent this checkpoint to hf-modelopt as it was."""
    src = _random(tmp_path_factory, "deepseek_v3", "tiny-deepseek-v3", moe_intermediate_size=40)
    key = (src, "nvfp4", 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert _follow(exported, key, "trtllm-ckpt", msg) == ["hf-modelopt"], msg
    _refusals_lead_somewhere(exported, key)


def test_narrow_experts_and_no_block_grid_are_sent_where_taken(exported, tmp_path_factory):
    """Hidden 96, experts 72: every linear narrower than the default group gets its own width as group, so
    each layer's experts are quantized two ways (refuse_unlike) and no --group-size fits both: INT4 was
    sent to compressed-tensors / w4a8-awq, refused again; block FP8 was sent by trtllm-ckpt to hf-modelopt,
    which refuses in_features that are no whole groups of 128. Hidden 200: hf-fp8-block has no linear
    to write and sent every format to itself; INT4 quantizes nothing and the refusals named no way out."""
    narrow = _random(tmp_path_factory, "mixtral", "tiny-mixtral", hidden_size=96, intermediate_size=72)
    for fmt in ("int4-gptq", "int4-awq", "w4a8-awq", "fp8-block"):
        _refusals_lead_somewhere(exported, (narrow, fmt, 128, False))
    # hf-modelopt refuses fp8-dynamic experts: every format its refusal offers ("--format A or B") is exported
    key = (narrow, "w4a8-awq", 128, False)
    msg = exported(key, "hf-modelopt")
    offered = [f for alts in re.findall(r"--format ([\w-]+(?: or [\w-]+)*)", msg.split(": ", 1)[1])
               for f in alts.split(" or ")]
    assert offered, msg
    for f in offered:
        assert exported((narrow, f, 128, False), "hf-modelopt") is None, f"{msg}\n  -> {f}"
    wide = _random(tmp_path_factory, "mixtral", "tiny-mixtral", hidden_size=200, intermediate_size=200)
    _refusals_lead_somewhere(exported, (wide, "fp8", 128, False), EXPORTS + ("hf-fp8-block",))
    # INT4 holds no 200-wide input at any group: quantize refuses before the first layer, naming formats that do
    with pytest.raises(MoepressError) as e:
        exported((wide, "int4-gptq", 128, False))
    named = re.search(r", e\.g\. --format ([\w -]+)$", str(e.value)).group(1).split(" or ")
    assert "fp8" in named and not any(f.startswith(("int4", "w4a8", "nvfp4", "mxfp4")) for f in named), str(e.value)


def _refusals_lead_somewhere(exported, key, exports=EXPORTS):
    exported(key)
    for ex in exports:
        msg = exported(key, ex)
        if msg is None:
            continue
        assert len(msg.splitlines()) == 1 and steps(key, ex, msg), msg  # one line, with somewhere to go
        for src, to in steps(key, ex, msg):
            assert (src, to) != (key, ex), f"{ex} on {key} suggests itself: {msg}"
            again = exported(src, to)
            assert again is None, f"{ex} on {key}: {msg}\n  -> {to} on {src} refused: {again}"
            if to == "onnx" and "export onnx (a TensorRT engine)" in msg:  # the engine takes its INT4 blocks
                info = json.loads((exported.out(src, to) / "export.json").read_text())
                assert "tensorrt" not in info.get("misloaded_by", {}), f"{ex} on {key}: {msg}\n  -> {info}"


def test_hf_modelopt_refuses_unloadable_experts_before_group_sizes(exported):
    """DeepSeek's INT4 experts load from no Model-Optimizer checkpoint at any group size: the refusal says
    so, not --group-size 64 (which the default group's unlike experts would otherwise ask for first)."""
    for fmt in ("int4-gptq", "w4a8-awq"):
        msg = exported(("tiny-deepseek-v3", fmt, 128, False), "hf-modelopt")
        assert "no runtime would load them at any group size" in msg, msg
        assert "--group-size 64, then export hf-modelopt" not in msg, msg
        assert "quantize with --format nvfp4 (or fp8), then export hf-modelopt" in msg, msg  # a format it loads


def test_unfolded_awq_is_sent_to_awq_fold_then_compressed_tensors(exported):
    msg = exported(("tiny-mixtral", "int4-awq", 128, False), "hf-modelopt")
    assert "quantize with --awq-fold, then export compressed-tensors" in msg, msg
    msg = exported(("tiny-mixtral", "int4-awq", 128, False), "compressed-tensors")
    assert "--format hf-modelopt" not in msg and "export hf-modelopt" not in msg, msg


def test_w4a8_names_no_compressed_tensors_form(exported):
    for key in (("tiny-deepseek-v3", "w4a8-awq", 64, False), ("tiny-deepseek-v3", "w4a8-awq", 64, True)):
        msg = exported(key, "compressed-tensors")
        assert "w4a8-awq, which has no compressed-tensors form" in msg and "dynamic per-token" in msg, msg
        assert "export onnx" in msg and "--format int4-gptq" in msg and "int4-awq --awq-fold" in msg, msg


def test_trtllm_ckpt_refusals_carry_its_flag(exported):
    """trtllm-ckpt refusals start with its --format and say what it writes (not INT4, which it refuses)."""
    msg = exported(("tiny-mixtral", "int4-gptq", 128, False), "trtllm-ckpt")
    assert msg.startswith("--format trtllm-ckpt: ") and "it writes bf16 or FP8 per tensor" in msg, msg


def test_fp4_refusal_names_trtllm_ckpt_and_what_it_writes(tmp_path):
    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="mxfp4"))
    with pytest.raises(MoepressError) as e:
        export(q, tmp_path / "t", ExportConfig(format="trtllm-ckpt"))
    msg = str(e.value)
    assert msg.startswith("--format trtllm-ckpt: ") and "expected bf16 or FP8 per tensor" in msg, msg
    assert "INT4" not in msg and "for MXFP4 use --format compressed-tensors)" in msg, msg


def test_engine_from_a_trtllm_ckpt_is_suggested_what_a_trtllm_ckpt_holds():
    """`moepress build` of an FP8 trtllm-ckpt for an A100: the engine's format is the export's, so the
    refusal names the export and suggests only what a trtllm-ckpt holds (not int4-awq, not a --format)."""
    with pytest.raises(MoepressError) as e:
        plan(models.path("tiny-mixtral"), "a100", "fp8", runtime="trtllm-engine")
    msg = str(e.value)
    assert "FP8 needs sm89+; A100 80GB SXM is sm80" in msg and "--format" not in msg, msg
    named = re.findall(r"as a ([\w-]+) trtllm-ckpt|--format ([\w-]+), then export trtllm-ckpt", msg)
    assert named and all(f in ("bf16", "fp8", "") for m in named for f in m), msg  # trtllm_refusals.quant_algo


def _refused(fn) -> str:
    with pytest.raises(MoepressError) as e:
        fn()
    return str(e.value)


def _follow(exported, key, refusing: str, msg: str) -> list[str]:
    """Each step the refusal names, taken once (each must be accepted); the exports it named."""
    named = steps(key, refusing, msg)
    assert len(msg.splitlines()) == 1 and named, msg
    for src, to in named:
        assert exported(src, to) is None, f"{refusing} on {key}: {msg}\n  -> {to} on {src}: {exported(src, to)}"
    return [to for _, to in named]


def test_trtllm_ckpt_sends_partial_block_experts_to_hf_fp8_block(exported):
    """Block FP8 whose 192-wide experts are not whole 128x128 blocks: hf-modelopt refuses those experts too,
    hf-fp8-block keeps them bf16."""
    key = ("tiny-mixtral-w192", "fp8-block", 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert _follow(exported, key, "trtllm-ckpt", msg) == ["hf-fp8-block"], msg


def test_no_whole_block_grid_is_not_sent_to_hf_fp8_block(exported, tmp_path_factory):
    """Hidden 200 (no linear of whole 128x128 blocks): hf-fp8-block refuses it, so block FP8 with such
    experts, refused by compressed-tensors and hf-modelopt, was sent there in vain; so was bf16 from
    trtllm-ckpt. They go to the per-tensor FP8 re-quantize, which the exports take."""
    from helpers import make_random_checkpoint

    src = make_random_checkpoint("deepseek_v3", tmp_path_factory.mktemp("w200") / "dsv3-w200", hidden_size=200,
                                 moe_intermediate_size=72, q_lora_rank=None, qk_nope_head_dim=24, v_head_dim=20,
                                 vocab_size=4096)
    for f in models.path("tiny-deepseek-v3").glob("tokenizer*"):  # per-tensor FP8 calibrates
        shutil.copy(f, src)
    key = (src, "fp8-block", 128, False)
    assert "no linear of" in exported(key, "hf-fp8-block")
    # hf-modelopt's runtimes load no fp8-dynamic experts: its refusal names per-tensor FP8 only
    for ex, fp8s in (("compressed-tensors", "fp8 or fp8-dynamic"), ("hf-modelopt", "fp8")):
        msg = exported(key, ex)
        assert f"quantize with --format {fp8s}" in msg and "hf-fp8-block" not in msg, msg
        assert ex != "hf-modelopt" or "fp8-dynamic" not in msg, msg
        assert exported((src, "fp8", 128, False), ex) is None
    for k in (key, (src, None, 128, False)):
        msg = exported(k, "trtllm-ckpt")
        assert _follow(exported, k, "trtllm-ckpt", msg) == ["hf-modelopt"], msg


def test_trtllm_ckpt_sends_kimi_int4_where_it_is_taken(exported):
    """Kimi's own INT4 compressed-tensors (no moepress_quant.json): hf-modelopt cannot read it, onnx can,
    and hf-modelopt takes it re-quantized to FP8 (per tensor: its widths are no whole 128-groups)."""
    key = ("tiny-kimi-k2-int4", None, 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert "vLLM and SGLang load its packed compressed-tensors form as stored" in msg, msg
    assert sorted(_follow(exported, key, "trtllm-ckpt", msg)) == ["hf-modelopt", "onnx"], msg
    # its 64-wide expert inputs are not whole groups of 128 for block FP8 (fused_moe.refuse_partial_input_groups)
    assert ("tiny-kimi-k2-int4", "fp8", 128, False) in [s for s, _ in steps(key, "trtllm-ckpt", msg)], msg


def test_trtllm_ckpt_sends_bf16_deepseek_to_hf_fp8_block(exported):
    key = ("tiny-deepseek-v3", None, 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert _follow(exported, key, "trtllm-ckpt", msg) == ["hf-fp8-block"], msg


def test_stored_mxfp4_is_sent_where_it_is_taken(exported):
    """compressed-tensors MXFP4 as released (no moepress_quant.json): compressed-tensors and hf-modelopt export
    only a moepress quantize output, and onnx reads no FP4, so trtllm-ckpt's and onnx's refusals name the
    fp8-block re-quantize hf-fp8-block takes (hf-modelopt refuses block-FP8 experts; vLLM / SGLang load it as
    stored); moepress's own MXFP4 is still sent to compressed-tensors, which exports it."""
    key = ("tiny-qwen3-moe-mxfp4", None, 128, False)
    for ex in ("trtllm-ckpt", "onnx"):
        msg = exported(key, ex)
        assert "vLLM and SGLang load its packed compressed-tensors form as stored" in msg, msg
        assert _follow(exported, key, ex, msg) == ["hf-fp8-block"], msg
    key = ("tiny-qwen3-moe-mxfp4", "mxfp4", 128, False)
    for ex in ("trtllm-ckpt", "onnx"):
        msg = exported(key, ex)
        assert _follow(exported, key, ex, msg) == ["compressed-tensors"], msg


def test_hf_fp8_block_sends_kimi_int4_where_it_is_taken(exported):
    """Kimi's own INT4 (packed, no moepress_quant.json) was sent to compressed-tensors, which refuses it."""
    key = ("tiny-kimi-k2-int4", None, 128, False)
    msg = exported(key, "hf-fp8-block")
    assert sorted(_follow(exported, key, "hf-fp8-block", msg)) == ["hf-fp8-block", "hf-modelopt", "onnx"], msg


@pytest.mark.parametrize("change", [{"sliding_window": 8}, {"rope_scaling": {
    "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}], ids=["window", "yarn"])
def test_trtllm_ckpt_attention_refusal_names_what_takes_bf16(exported, tmp_path, change):
    """Rope scaling or a sliding window on a bf16 model: hf-modelopt (named before) needs a quantized checkpoint."""
    src = tmp_path / next(iter(change))
    shutil.copytree(models.path("tiny-mixtral"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    key = (src, None, 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert msg.startswith(f"--format trtllm-ckpt: {src}/config.json has "), msg
    assert _follow(exported, key, "trtllm-ckpt", msg) == ["hf-fp8-block"], msg


def test_trtllm_ckpt_sends_partly_fp8_without_sidecar_to_a_re_quantize(exported, tmp_path):
    """FP8 per tensor with attention left bf16 and no moepress_quant.json: hf-modelopt (named before) needs a
    quantize output, so the refusal names the re-quantize it takes."""
    src = tmp_path / "partly-fp8"
    quantize_checkpoint(models.path("tiny-mixtral"), src, QuantConfig(format="fp8", rules=(("*self_attn.*", "none"),),
                                                                      num_samples=4, seq_len=32))
    (src / "moepress_quant.json").unlink()
    key = (src, None, 128, False)
    msg = exported(key, "trtllm-ckpt")
    assert "decoder linears not in FP8 per tensor" in msg, msg
    assert _follow(exported, key, "trtllm-ckpt", msg) == ["hf-modelopt"], msg


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4-a16"])
@pytest.mark.parametrize("experts", [False, True], ids=["all", "experts-only"])
def test_onnx_fp4_refusal_carries_its_flag(tmp_path, fmt, experts):
    """Refused before the graph is built (exporters/linears.py refuse_fp4, from the headers), naming an FP4 linear
    (a routed expert's where only the experts are FP4), which export refused and what it takes."""
    q = tmp_path / "q"
    cfg = QuantConfig(format=None, rules=(("*experts.*", fmt),)) if experts else QuantConfig(format=fmt)
    quantize_checkpoint(models.path("tiny-mixtral"), q, cfg)
    msg = _refused(lambda: export(q, tmp_path / "o", ExportConfig(format="onnx")))
    assert msg.startswith(f"--format onnx: {q}: 'model.layers.0."), msg
    assert "experts" in msg.split("'")[1] or not experts, msg
    assert f"is {'MXFP4' if fmt == 'mxfp4' else 'NVFP4'}, which this exporter cannot write" in msg, msg
    assert "expected fp8 (static input scales), int4-awq, int4-gptq, w4a8-awq or bf16" in msg, msg


@pytest.fixture(scope="module")
def artifact(exported):
    """(source key, export) -> the path of that export, which must be accepted."""
    def get(key, ex):
        assert exported(key, ex) is None, exported(key, ex)
        return exported.out(key, ex)

    return get


def test_build_refusal_of_a_trtllm_ckpt_names_it_first(artifact, tmp_path):
    a = artifact(("tiny-mixtral", "fp8", 128, False), "trtllm-ckpt")
    msg = _refused(lambda: build(a, "a100-80gb", tmp_path / "b", dry_run=True))
    assert msg.startswith(f"{a}: the trtllm-ckpt export is fp8: FP8 needs sm89+"), msg


def test_build_of_hf_modelopt_names_a_re_export_it_takes(artifact, tmp_path):
    """No --format (build has none): a format the hf-modelopt export holds and TensorRT-LLM loads on that
    GPU, followed once (on A100 too: nvfp4-a16)."""
    a = artifact(("tiny-mixtral", "nvfp4", 128, False), "hf-modelopt")
    msg = _refused(lambda: build(a, "h100", tmp_path / "b", dry_run=True))
    assert msg.startswith(f"{a}: the hf-modelopt export is nvfp4: NVFP4 needs sm100+"), msg
    fmt = re.search(r"re-quantize the original model with --format ([\w-]+), then export hf-modelopt", msg)
    assert fmt and fmt.group(1) != "nvfp4" and not re.search(r"--format nvfp4\b(?!-)", msg), msg
    build(artifact(("tiny-mixtral", fmt.group(1), 128, False), "hf-modelopt"), "h100", tmp_path / "b2", dry_run=True)
    msg = _refused(lambda: build(a, "a100-80gb", tmp_path / "b", dry_run=True))
    assert msg.startswith(f"{a}: the hf-modelopt export is nvfp4: ") and "use bf16" not in msg, msg
    # the same weights with bf16 activations (W4A16_NVFP4: TensorRT-LLM's dequantizing MoE from sm80)
    assert msg.endswith("re-quantize the original model with --format nvfp4-a16, then export hf-modelopt again"), msg
    build(artifact(("tiny-mixtral", "nvfp4-a16", 128, False), "hf-modelopt"), "a100-80gb", tmp_path / "b3",
          dry_run=True)


def test_build_of_an_onnx_export_names_a_re_export_it_takes(artifact, tmp_path):
    """An FP8 onnx export for an A100: the refusal names the export (no --format) and a format an onnx export
    holds that the A100 runs; followed once, the build is planned."""
    a = artifact(("tiny-mixtral", "fp8", 128, False), "onnx")
    msg = _refused(lambda: build(a, "a100-80gb", tmp_path / "b", dry_run=True))
    assert msg.startswith(f"{a}: the onnx export is fp8: FP8 needs sm89+") and "--format fp8:" not in msg, msg
    fmt = re.search(r"re-quantize the original model with --format ([\w-]+), then export onnx again", msg)
    assert fmt, msg
    build(artifact(("tiny-mixtral", fmt.group(1), 128, False), "onnx"), "a100-80gb", tmp_path / "b2", dry_run=True)


def test_block_fp8_experts_beside_other_formats_are_sent_where_they_are_taken(tmp_path, cli_run):
    """Experts block FP8 by --rule, the rest FP8 per tensor: hf-modelopt and trtllm-ckpt refuse the experts and
    named hf-fp8-block, which refuses a checkpoint with other formats than block FP8 (a dead end). They name a
    plain fp8-block re-quantize for hf-fp8-block, and compressed-tensors, which takes it as it is: each step
    taken once here."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8", "--rule", "mlp.experts.*=fp8-block", "-o", q,
                   "--quiet").exit_code == 0
    for ex in ("hf-modelopt", "trtllm-ckpt"):
        r = cli_run("export", q, "--format", ex, "-o", tmp_path / ex)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        assert "quantize with --format fp8-block, then export hf-fp8-block" in r.stderr, r.stderr
        assert "export compressed-tensors" in r.stderr, r.stderr
    assert cli_run("export", q, "--format", "hf-fp8-block", "-o", tmp_path / "no").exit_code == 2  # as it is: no
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", tmp_path / "ct", "--quiet").exit_code == 0
    q2 = tmp_path / "q2"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-block", "-o", q2, "--quiet").exit_code == 0
    assert cli_run("export", q2, "--format", "hf-fp8-block", "-o", tmp_path / "fb", "--quiet").exit_code == 0


def test_bf16_refusal_names_only_formats_the_export_takes(exported, tmp_path_factory):
    """A bf16 source ("needs a quantized checkpoint") was sent to fixed formats: DeepSeek-V3 to w4a8-awq for
    hf-modelopt, which refuses its INT4 experts; experts 40 wide beside hidden 72 to fp8-block and int4-gptq at
    the default group for compressed-tensors, refused there (partial blocks; two INT4 groups). Every format the
    hint names (with the --group-size it gives) now quantizes into a checkpoint that export takes (found by
    helper P, session 38, on random models of shapes the bundled ones lack)."""
    odd = _random(tmp_path_factory, "qwen3_moe", "tiny-qwen3-moe", hidden_size=72, moe_intermediate_size=40)
    for model, ex in (("tiny-deepseek-v3", "hf-modelopt"), (odd, "compressed-tensors")):
        msg = exported((model, None), ex)
        named = re.search(r"quantize --format (.*?) first", msg or "")
        assert named, msg
        first, _, others = named.group(1).partition(" (or ")
        for way in [first] + (others.rstrip(")").split(", ") if others else []):
            fmt, _, group = way.partition(" --group-size ")
            assert exported((model, fmt, int(group or 128), False), ex) is None, (way, msg)


def test_fp4_experts_of_widths_no_fp4_kernel_runs_are_sent_to_fp8_not_to_an_export_that_refuses(tmp_path):
    """A helper's find: MXFP4 experts of hidden 96 and width 160 (the FP4 fused-MoE kernels need both multiples of
    64 and one of 128): hf-modelopt and onnx refused them with "export compressed-tensors", which refuses them too.
    Their hints now name the route that takes them: FP8, then compressed-tensors (taken here); compressed-tensors'
    own refusal named FP8 experts by a --rule, which it then refused as mixed formats."""
    from helpers import make_random_checkpoint

    m = make_random_checkpoint("mixtral", tmp_path / "m", hidden_size=96, intermediate_size=160)
    q = tmp_path / "q"
    quantize_checkpoint(m, q, QuantConfig(format="mxfp4"))
    route = "quantize with --format fp8 (or fp8-dynamic), then export compressed-tensors"
    for fmt in ("hf-modelopt", "onnx", "compressed-tensors"):
        with pytest.raises(MoepressError) as e:
            export(q, tmp_path / fmt, ExportConfig(format=fmt))
        assert fmt == "compressed-tensors" or route in str(e.value), e.value
    # compressed-tensors holds one format: FP8 experts beside FP4 linears (a --rule) it refuses as mixed
    assert str(e.value).endswith("quantize the model with --format fp8 or fp8-dynamic (this export holds one "
                                 "format)"), e.value
    f = tmp_path / "f"
    quantize_checkpoint(m, f, QuantConfig(format="fp8-dynamic"))
    export(f, tmp_path / "ct", ExportConfig(format="compressed-tensors"))


def test_a_bf16_source_no_default_group_fits_is_sent_to_int4_with_a_group_that_does(exported, tmp_path_factory):
    """Hidden 160, experts 224 wide: no width takes the default group of 128, so the bf16 source's refusal named
    plain int4-gptq, which quantize then refused (every linear would stay unquantized). Each format the refusal
    names, with its flags, quantizes and exports."""
    src = _random(tmp_path_factory, "mixtral", "tiny-mixtral", hidden_size=160, intermediate_size=224)
    msg = exported((src, None, 128, False), "compressed-tensors")
    named = re.search(r"run moepress quantize --format (.+) first\)$", msg).group(1)
    ways = [w.strip() for w in re.sub(r"[()]|\bor\b", ",", named).split(",") if w.strip()]
    assert "int4-gptq --group-size 32" in ways, msg
    for way in ways:
        fmt, _, group = way.partition(" --group-size ")
        assert exported((src, fmt, int(group or 128), False), "compressed-tensors") is None, f"{msg}\n  -> {way}"

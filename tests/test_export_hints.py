"""Export refusals send the user somewhere that works: every export a refusal names as the thing to use
takes the same quantized checkpoint ("export onnx"), and every "quantize with FLAGS, then export X" step,
followed once, gives a checkpoint X exports. A new-user walkthrough went in a loop: unfolded int4-awq was
sent from compressed-tensors to hf-modelopt and back; DeepSeek's w4a8-awq was asked for --group-size 64,
then --awq-fold, each refused in turn.

Also: an engine built from a trtllm-ckpt is suggested only formats a trtllm-ckpt holds, naming the export
rather than a --format option that ``moepress build`` does not have."""

from __future__ import annotations

import re

import pytest

from moepress import models
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.errors import MoepressError
from moepress.exporters import ExportConfig, export
from moepress.exporters.plan import plan

EXPORTS = ("hf-modelopt", "compressed-tensors", "trtllm-ckpt", "onnx")
# (family, format, group, --awq-fold): the defaults, and group 64 where DeepSeek's 64-wide down
# projections make the default quantize its experts two ways
SOURCES = [("tiny-mixtral", f, 128, False) for f in ("int4-awq", "int4-gptq", "w4a8-awq")] + \
    [("tiny-mixtral", "w4a8-awq", 128, True)] + \
    [("tiny-deepseek-v3", f, g, False) for f in ("int4-awq", "int4-gptq", "w4a8-awq") for g in (128, 64)] + \
    [("tiny-deepseek-v3", "w4a8-awq", 64, True)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source key) -> path, and (source key, export) -> None or the refusal: each made once, on demand."""
    base, done = tmp_path_factory.mktemp("hints"), {}

    def get(key, ex=None):
        if key not in done:
            fam, fmt, group, fold = key
            q = base / "-".join(map(str, key))
            quantize_checkpoint(models.path(fam), q, QuantConfig(format=fmt, group_size=group, awq_fold=fold,
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
    for flags in re.findall(r"quantize with ((?:--[\w-]+(?: \d+)? ?)+)", hint):
        out.append((_requantized(key, flags), refusing))
    out += [(key, ex) for ex in re.findall(r"(?:--format|export) ([\w-]+)", hint) if ex in EXPORTS]
    return out


@pytest.mark.parametrize("key", SOURCES, ids=["-".join(map(str, k)) for k in SOURCES])
def test_refusals_name_only_exports_that_take_the_source(exported, key):
    exported(key)
    for ex in EXPORTS:
        msg = exported(key, ex)
        if msg is None:
            continue
        assert len(msg.splitlines()) == 1 and steps(key, ex, msg), msg  # one line, with somewhere to go
        for src, to in steps(key, ex, msg):
            assert (src, to) != (key, ex), f"{ex} on {key} suggests itself: {msg}"
            again = exported(src, to)
            assert again is None, f"{ex} on {key}: {msg}\n  -> {to} on {src} refused: {again}"


def test_hf_modelopt_refuses_unloadable_experts_before_group_sizes(exported):
    """DeepSeek's INT4 experts load from no Model-Optimizer checkpoint at any group size: the refusal says
    so, not --group-size 64 (which the default group's unlike experts would otherwise ask for first)."""
    for fmt in ("int4-gptq", "w4a8-awq"):
        msg = exported(("tiny-deepseek-v3", fmt, 128, False), "hf-modelopt")
        assert "no runtime would load them" in msg and "then export hf-modelopt" not in msg, msg


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
    named = re.findall(r"export an? ([\w-]+) trtllm-ckpt", msg)
    assert named and all(f in ("bf16", "fp8") for f in named), msg  # trtllm_ckpt._quant_algo

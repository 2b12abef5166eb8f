"""A plain fp8-block quantize of tiny-qwen3-moe (q/k/v of 128, 64, 64 rows: k is not whole 128-row blocks): every
export's refusal names only steps that take it. hf-modelopt's said "--rule 'self_attn.*=fp8-dynamic', then export"
(hf-modelopt again, which then refused the block-FP8 experts) and trtllm-ckpt's named compressed-tensors as it is,
which refuses the partial fused blocks. Each step a refusal names is followed here once and must succeed."""

from __future__ import annotations

import re
import shlex

import pytest

from helpers import cli_quantized
from moepress.compress import formats

EXPORTS = ("hf-modelopt", "compressed-tensors", "trtllm-ckpt", "onnx", "hf-fp8-block")


@pytest.fixture(scope="module")
def fp8_block(tmp_path_factory):
    return cli_quantized(tmp_path_factory.mktemp("fb") / "q", "tiny-qwen3-moe", "--format", "fp8-block")


def _steps(hint: str) -> list[tuple[list[str] | None, str]]:
    """(quantize flags or None for the checkpoint as it is, export) for each way the hint names."""
    out = []
    for flags, ex in re.findall(r"quantize with (.*?), then export ([\w-]+)", hint):
        out.append((shlex.split(re.sub(r"\([^)]*\)", "", flags)), ex))
    rest = re.sub(r"quantize with .*?, then export [\w-]+", "", hint)
    rest = re.sub(r"quantize them .*?, then export [\w-]+", "", rest)
    out += [(None, ex) for ex in re.findall(r"export ([\w-]+)", rest) if ex in EXPORTS]
    return out


@pytest.mark.parametrize("refusing", EXPORTS)
def test_every_way_a_refusal_names_takes_the_checkpoint(cli_run, fp8_block, tmp_path, refusing):
    r = cli_run("export", fp8_block, "--format", refusing, "-o", tmp_path / "refused", "--quiet")
    if r.exit_code == 0:
        return  # hf-fp8-block takes it
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    hint = r.stderr.split(": ", 2)[2]
    # the re-quantize of the fused parts names its export, rather than "then export" (the refusing one)
    rule_way = re.search(r"quantize them and the linears fused with them in another format \(([^)]*)\), then export"
                         r"( [\w-]+)?", hint)
    steps = _steps(hint)
    if rule_way:
        assert rule_way.group(2), hint
        steps.append((["--format", "fp8-block", *shlex.split(rule_way.group(1))], rule_way.group(2).strip()))
    assert steps, hint
    for n, (flags, ex) in enumerate(steps):
        src = fp8_block
        if flags is not None:
            src = tmp_path / f"q{n}"
            args = flags if "--format" in flags else ["--format", "fp8-block", *flags]
            named = [v.rpartition("=")[2] for k, v in zip(args, args[1:], strict=False) if k in ("--format", "--rule")]
            calib = ["--num-samples", "4", "--seq-len", "32"] if any(  # a calibration-free run refuses them
                getattr(formats.FORMATS.get(f), "calibrated", False) for f in named) else []
            q = cli_run("quantize", "tiny-qwen3-moe", *args, *calib, "-o", src, "--quiet")
            assert q.exit_code == 0, (hint, q.output)
        e = cli_run("export", src, "--format", ex, "-o", tmp_path / f"e{n}-{ex}", "--quiet")
        assert e.exit_code == 0, (refusing, hint, flags, ex, e.output)

"""The planner's 4-bit choice per GPU: NVFP4 on Blackwell (FP4 tensor cores; TensorRT-LLM's support
matrix offers no INT4 weight-only kernels on sm100/sm120), INT4 AWQ before it, with the reason."""

import json

import pytest

from moepress import models
from moepress.compress import formats
from moepress.errors import MoepressError
from moepress.exporters.plan import plan
from moepress.exporters.targets import TARGETS, check_format, pick_format


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_four_bit_choice_follows_the_architecture(target):
    t = TARGETS[target]
    name, why = pick_format(t, 4)
    f = formats.FORMATS[name]
    assert f.produced and t.supports(name) and f.element in ("int4", "fp4")
    if t.sm >= 100:
        assert f.element == "fp4" and f.static_input and "FP4" in why
    else:
        assert f.element == "int4" and not f.static_input, (target, name)


def test_plan_cli_explains_the_choice(cli_run):
    r = cli_run("plan", "tiny-deepseek-v3", "--target", "b200", "--bits", "4", "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert formats.FORMATS[p["format"]].element == "fp4"
    assert p["notes"][0].startswith("format chosen for 4-bit weights: ") and "Blackwell" in p["notes"][0]


def test_int4_on_blackwell_suggests_what_moepress_writes():
    with pytest.raises(MoepressError) as e:
        check_format(TARGETS["b200"], "int4-awq")
    msg = str(e.value)
    assert "use nvfp4 (it runs" in msg and "does not yet" not in msg


def test_no_four_bit_format_is_one_line():
    t = TARGETS["b200"]
    with pytest.raises(MoepressError, match="--bits 2: B200"):
        pick_format(t, 2)
    assert formats.FORMATS[plan(str(models.path("tiny-qwen3-moe")), t, bits=8).format].element == "fp8"


def test_bits_with_a_format_is_refused_not_ignored(cli_run):
    """`plan --bits 4 --format fp8` planned FP8 and said nothing of --bits."""
    from helpers import assert_one_line_error

    assert_one_line_error(cli_run("plan", "tiny-qwen3-moe", "--target", "h100-sxm", "--bits", "4", "--format", "fp8"),
                          "--bits 4 with --format fp8")

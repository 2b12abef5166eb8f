"""GPU target catalog facts (exporters/targets.py; sources in its docstring)."""

import json

import pytest

from moepress.errors import MoepressError
from moepress.exporters.targets import TARGETS, check_format, get_target, min_sm


def test_catalog_covers_the_issue_list():
    assert set(TARGETS) == {"a100-40gb", "a100-80gb", "a10g", "l4", "l40s", "h100", "h100-pcie", "h200", "gh200",
                            "b200", "gb200", "rtx-pro-6000"}


@pytest.mark.parametrize("name,sm,mem,link", [
    ("a100-40gb", 80, 40, "NVLink 3"), ("a100-80gb", 80, 80, "NVLink 3"), ("a10g", 86, 24, "PCIe Gen4"),
    ("l4", 89, 24, "PCIe Gen4"), ("l40s", 89, 48, "PCIe Gen4"), ("h100", 90, 80, "NVLink 4"),
    ("h100-pcie", 90, 80, "PCIe Gen5"), ("h200", 90, 141, "NVLink 4"), ("gh200", 90, 96, "NVLink-C2C"),
    ("b200", 100, 180, "NVLink 5"), ("gb200", 100, 186, "NVLink 5"), ("rtx-pro-6000", 120, 96, "PCIe Gen5"),
])
def test_hardware_facts(name, sm, mem, link):
    t = get_target(name)
    assert (t.sm, t.memory_gb) == (sm, mem)
    assert t.interconnect.startswith(link)
    assert t.compute_capability == f"{sm // 10}.{sm % 10}"


def test_format_floors_follow_the_support_matrix():
    # TensorRT-LLM hardware support matrix: W4A16 Ampere+, FP8 per tensor Ada+, W4A8 AWQ Ada+,
    # FP8 block scales and rowwise Hopper, NVFP4 Blackwell
    assert min_sm("int4-awq") == min_sm("int4-gptq") == 80
    assert min_sm("fp8") == min_sm("w4a8-awq") == 89
    assert min_sm("fp8-block") == min_sm("fp8-dynamic") == 90
    assert min_sm("nvfp4") == 100
    a100, l40s, h100, b200, rtx = (get_target(n) for n in ("a100", "l40s", "h100", "b200", "rtx-pro-6000"))
    assert not a100.supports("fp8") and a100.supports("int4-awq") and "fp8" in a100.kv_cache_dtypes
    assert l40s.supports("fp8") and l40s.supports("w4a8-awq") and not l40s.supports("fp8-block")
    assert h100.supports("fp8-block") and h100.supports("fp8-dynamic") and not h100.supports("nvfp4")
    # sm100 runs block FP8 (MXFP8 kernels) but not FP8 rowwise; nvfp4 KV cache
    assert b200.supports("nvfp4") and b200.supports("fp8-block") and not b200.supports("fp8-dynamic")
    assert "nvfp4" in b200.kv_cache_dtypes
    # sm120: NVFP4, MXFP4, FP8 per tensor; no INT4 kernels in the matrix
    assert rtx.formats == ("bf16", "fp8", "nvfp4", "nvfp4-a16", "mxfp4")


def test_aliases_and_unknown():
    assert get_target("A100").name == "a100-80gb"
    assert get_target("h100-sxm").name == "h100"
    with pytest.raises(MoepressError, match=r"--target v100: unknown GPU target; expected one of a100-40gb"):
        get_target("v100")
    with pytest.raises(MoepressError, match=r"--format int8: unknown format"):
        check_format(get_target("h100"), "int8")


def test_targets_cli(cli_run):
    r = cli_run("targets", "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["h200"]["compute_capability"] == "9.0" and "fp8-block" in d["h200"]["formats"]
    r = cli_run("targets")
    assert r.exit_code == 0 and "rtx-pro-6000" in r.output and "sm120" in r.output
    # the default recipe's h100-sxm was a name no listing showed: each target's other names follow its row
    lines = r.output.splitlines()
    assert lines[lines.index(next(ln for ln in lines if ln.startswith("h100 "))) + 1] == "  also: h100-sxm"


def test_kv_cache_bytes_per_value_are_the_formats():
    """What a plan budgets per cached value: bf16 2 bytes, FP8 1, NVFP4 a 4-bit value plus one E4M3 scale per
    16 values (0.5 + 1/16; a 0.5 under-budgeted the NVFP4 cache by 11%)."""
    from moepress.exporters.kv_cache import KV_CACHE

    assert {k: v.bytes for k, v in KV_CACHE.items()} == {"bf16": 2, "fp8": 1, "nvfp4": 0.5 + 1 / 16}


def test_targets_json_lists_the_kv_caches_an_mla_model_gets(cli_run):
    """An FP8 latent (DeepSeek-V3, Kimi K2) needs TensorRT-LLM's FP8 MLA kernels, Hopper and sm100 only: `targets
    --json` listed fp8 for every target with no word of it, while the planner refuses it off them."""
    import json

    d = json.loads(cli_run("targets", "--json").stdout)
    assert d["a100-80gb"]["kv_cache_dtypes"] == ["bf16", "fp8"] and d["a100-80gb"]["kv_cache_dtypes_mla"] == ["bf16"]
    assert d["h100"]["kv_cache_dtypes_mla"] == ["bf16", "fp8"] and d["rtx-pro-6000"]["kv_cache_dtypes_mla"] == ["bf16"]

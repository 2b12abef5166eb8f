"""`moepress inspect` (issue #2 acceptance: Kimi K2 from its published config alone)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from moepress.compress.inspect import summarize

KIMI = Path(__file__).parent / "data" / "kimi-k2-config.json"


def kimi_dir(tmp_path):
    d = tmp_path / "kimi-k2"
    d.mkdir()
    shutil.copy(KIMI, d / "config.json")
    return d


def test_kimi_k2_config_only_counts(tmp_path):
    s = summarize(str(kimi_dir(tmp_path)))
    assert s["family"] == "deepseek_v3" and s["model_type"] == "kimi_k2"
    assert s["layers"]["total"] == 61 and s["layers"]["dense"] == [0] and len(s["layers"]["moe"]) == 60
    assert s["experts"] == {"routed": 384, "config_key": "n_routed_experts", "shared": 1, "top_k": 8,
                            "moe_intermediate_size": 2048}
    assert s["routing"]["scoring"] == "sigmoid" and s["routing"]["correction_bias"]
    # Published: 1T total, 32B activated. Counted with embeddings and head: ~1.03T / ~33B.
    assert 1.02e12 <= s["params"]["total"] <= 1.04e12, s["params"]
    assert 32.5e9 <= s["params"]["active"] <= 33.5e9, s["params"]
    assert not s["has_weights"] and s["storage"] == "fp8-block"


def test_inspect_cli_json_and_text(tmp_path, cli_run):
    r = cli_run("inspect", kimi_dir(tmp_path), "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["params"]["total"] > 1e12
    r = cli_run("inspect", "tiny-deepseek-v3")
    assert r.exit_code == 0
    assert "sigmoid top-4" in r.stdout and "4 groups (top 2)" in r.stdout and "MoE 1-3; dense 0" in r.stdout


@pytest.mark.parametrize("scale", [1, 64])
def test_inspect_targets_line_says_what_the_table_holds(tmp_path, cli_run, scale):
    """Per target, the line (the text output's) lists the formats with a GPU count, "too big" for exactly those
    no GPU count holds (a format the GPU cannot run is not called too big) and "nothing fits" when no format
    fits. A ~1T-parameter Kimi K2 shape (2 layers of 16 wide experts: a quick plan) fits some targets; 64x
    fits none."""
    cfg = json.loads(KIMI.read_text())
    cfg.update(num_hidden_layers=2, n_routed_experts=16, moe_intermediate_size=2048 * 60 * 24 * scale)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli_run("inspect", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    table, lines = s["targets_table"], [ln.strip() for ln in s["targets"].splitlines()]
    for line, (target, row) in zip(lines, table.items(), strict=True):
        runs = ", ".join(f"{f} x{n}" for f, n in row.items() if n)
        too_big = [f for f, n in row.items() if n == 0]
        assert line == f"{target}: {runs or 'nothing fits'}" + (f" (too big: {', '.join(too_big)})" if too_big else "")
    assert any(None in row.values() for row in table.values())  # formats some GPUs cannot run
    assert any(0 in row.values() for row in table.values())
    assert all(not any(row.values()) for row in table.values()) == (scale == 64)
    assert set(s["formats"]) == {f for row in table.values() for f, n in row.items() if n}  # any target's count


def _headers(d: Path) -> dict[str, dict]:
    """Every tensor's safetensors header entry (dtype, shape, data_offsets), read here from the files' bytes."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        out.update({k: v for k, v in head.items() if k != "__metadata__"})
    return out


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-mixtral"])
def test_param_counts_are_the_checkpoints_tensors(name):
    """Total, routed-expert, embedding and head counts are the parameter elements the safetensors headers hold; active
    is the total less the (experts - top_k) unused experts of each MoE layer (config.json's numbers)."""
    from moepress import models

    d = models.path(name)
    heads, p = _headers(d), summarize(str(d))
    # DeepSeek's e_score_correction_bias is a buffer, not a parameter (transformers' DeepseekV3TopkRouter: nn.Buffer)
    numel = {k: math.prod(v["shape"]) for k, v in heads.items() if not k.endswith("e_score_correction_bias")}
    expert = {k: n for k, n in numel.items() if ".experts." in k and ".shared_experts." not in k}
    assert p["params"]["total"] == sum(numel.values())
    assert p["params"]["routed_experts"] == sum(expert.values())
    assert p["params"]["embeddings"] == numel["model.embed_tokens.weight"]
    assert p["params"]["lm_head"] == numel["lm_head.weight"]
    per_expert = sum(expert.values()) // (len(p["layers"]["moe"]) * p["experts"]["routed"])
    unused = len(p["layers"]["moe"]) * (p["experts"]["routed"] - p["experts"]["top_k"]) * per_expert
    assert p["params"]["active"] == sum(numel.values()) - unused


def test_mtp_layers_count_in_total_and_mtp_not_in_active(tmp_path):
    """DeepSeek's MTP layer (stored past the trunk: a decoder layer, enorm, hnorm, eh_proj, its own embedding and
    head) is in the total and ``mtp`` as the headers hold it, its experts in ``routed_experts``, and not in
    ``active`` (it was left out of every count while the modules and bytes listed it)."""
    from helpers import write_with_mtp
    from moepress import models

    cfg = {**json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text()), "num_nextn_predict_layers": 1}
    d = write_with_mtp(cfg, tmp_path / "mtp", block_fp8=False)
    n, p = cfg["num_hidden_layers"], summarize(str(d))
    numel = {k: math.prod(v["shape"]) for k, v in _headers(d).items() if not k.endswith("e_score_correction_bias")}
    mtp = {k: v for k, v in numel.items() if k.startswith(f"model.layers.{n}.")}
    trunk = p["params"]["total"] - p["params"]["mtp"]
    assert p["layers"]["mtp"] == [n] and p["params"]["total"] == sum(numel.values())
    assert p["params"]["mtp"] == sum(mtp.values())
    assert p["params"]["routed_experts"] == sum(v for k, v in numel.items() if ".mlp.experts." in k)
    assert p["params"]["active"] == summarize(str(models.path("tiny-deepseek-v3")))["params"]["active"] < trunk


def test_module_formats_count_the_2d_weights_by_stored_dtype():
    """`module_formats`: the decoder layers' 2-D weights per stored dtype (the header's), routed experts apart."""
    from moepress import models

    d = models.path("tiny-qwen3-moe")
    want: dict[str, dict[str, int]] = {}
    for k, v in _headers(d).items():
        if k.startswith("model.layers.") and k.endswith(".weight") and len(v["shape"]) == 2:
            kind = "routed experts" if ".mlp.experts." in k else "other"
            row = want.setdefault(v["dtype"].lower(), {})
            row[kind] = row.get(kind, 0) + 1
    assert summarize(str(d))["module_formats"] == want


def test_storage_says_what_quantization_config_holds(tmp_path):
    """A compressed-tensors checkpoint: its quant_method and format; an FP8 config without a weight_block_size is
    per-tensor FP8 ("fp8"), not the block-FP8 format."""
    from moepress import models

    d = models.path("tiny-kimi-k2-int4")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert summarize(str(d))["storage"] == f"{qc['quant_method']} {qc['format']}"
    cfg = json.loads(KIMI.read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert summarize(str(tmp_path))["storage"] == "fp8"


def test_a_moepress_quantize_output_is_described_by_its_formats(tmp_path):
    """storage and module_formats name the formats moepress_quant.json lists, with their groups (every quantized
    output read "modelopt", and INT4, NVFP4 and MXFP4 modules all "u8", their bytes on disk; tiny-deepseek-v3's
    int4-awq holds groups of 128, 64 and 32, which read as all 128)."""
    from moepress import models
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    for model, fmt in (("tiny-qwen3-moe", "int4-awq"), ("tiny-qwen3-moe", "nvfp4"), ("tiny-deepseek-v3", "int4-awq")):
        out = tmp_path / f"{model}-{fmt}"
        quantize_checkpoint(str(models.path(model)), str(out), QuantConfig(format=fmt, num_samples=2, seq_len=16))
        layout = json.loads((out / "moepress_quant.json").read_text())["modules"]
        s = summarize(str(out))
        assert s["storage"] == fmt
        want: dict = {}
        for name, m in layout.items():
            counts = want.setdefault(f"{fmt} group {m['group']}" if m.get("group") else fmt, {})
            kind = "routed experts" if ".mlp.experts." in name else "other"
            counts[kind] = counts.get(kind, 0) + 1
        assert {k: v for k, v in s["module_formats"].items() if k.startswith(fmt)} == want
        if model == "tiny-deepseek-v3":
            assert {f"{fmt} group {g}" for g in (128, 64, 32)} <= set(want)


def test_an_onnx_export_is_refused_naming_its_source(tmp_path, cli_run):
    """inspect of an ONNX export named a missing config.json; it names what the folder is and its source."""
    from helpers import assert_one_line_error
    from moepress import models

    assert cli_run("export", "tiny-qwen3-moe", "--format", "onnx", "-o", tmp_path / "x", "--quiet").exit_code == 0
    r = cli_run("inspect", tmp_path / "x")
    assert_one_line_error(r, "moepress export --format onnx", str(models.path("tiny-qwen3-moe")))


def _count(text: str) -> float:
    return float(text[:-1]) * {"T": 1e12, "B": 1e9, "M": 1e6, "K": 1e3}[text[-1]]


def test_inspect_text_says_what_the_config_and_files_hold(tmp_path, cli_run):
    """The text report against config.json (renormalised top-k, routed scaling factor, auto_map), the JSON's
    parameter counts (3 significant digits) and the bytes the safetensors headers hold."""
    from moepress import models

    cfg = json.loads(KIMI.read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = cli_run("inspect", tmp_path, "--no-targets")
    assert r.exit_code == 0, r.output
    s = summarize(str(tmp_path))
    lines = dict(ln.split(None, 1) for ln in r.stdout.splitlines() if ln.strip())
    assert f"scaled x{cfg['routed_scaling_factor']}" in lines["routing"] and "remote code not needed" in lines["family"]
    assert f"{cfg['n_shared_experts']} shared" in lines["experts"]
    total, _, active = lines["params"].split()[:3]
    assert abs(_count(total) / s["params"]["total"] - 1) < 5e-3
    assert abs(_count(active) / s["params"]["active"] - 1) < 5e-3
    assert lines["on"] == "disk    no weights (config only)"

    d = models.path("tiny-qwen3-moe")
    r = cli_run("inspect", d, "--no-targets")
    assert r.exit_code == 0, r.output
    lines = dict(ln.split(None, 1) for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith(" "))
    assert ("renormalised" in lines["routing"]) == json.loads((d / "config.json").read_text())["norm_topk_prob"]
    size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in _headers(d).values())
    shown, unit = lines["on"].split()[1:3]
    assert abs(float(shown) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit] / size - 1) < 5e-3, lines["on"]


@pytest.mark.parametrize("text", ["{", '{"modules": {"a": "fp8"}}', "[1]"])
def test_an_unreadable_sidecar_is_one_line(tmp_path, cli_run, text):
    """A moepress_quant.json that is not the sidecar quantize writes gave a traceback once inspect read it."""
    from helpers import assert_one_line_error
    from moepress import models

    d = tmp_path / "m"
    shutil.copytree(models.path("tiny-qwen3-moe"), d)
    (d / "moepress_quant.json").write_text(text)
    assert_one_line_error(cli_run("inspect", d), "moepress_quant.json")

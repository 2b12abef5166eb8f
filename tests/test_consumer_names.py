"""The names our exports carry, checked against what each runtime accepts (tests/consumer_names.py,
copied from the runtimes' sources), and the README's consumer table checked against both.

``python tests/test_consumer_names.py`` prints the table the README must hold.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import consumer_names as cn  # noqa: E402

from moepress.compress import formats  # noqa: E402
from moepress.exporters.hf_modelopt import quant_configs  # noqa: E402

README = Path(__file__).parents[1] / "README.md"
MARK = "<!-- consumer-table -->"


def modelopt_name(fmt: str) -> str | None:
    """The top-level quant_algo of an hf-modelopt export whose linears are all ``fmt``."""
    f = formats.FORMATS[fmt]
    if f.modelopt_entry is None:
        return None
    group = 128 if f.scale == "group" else None
    hf_quant, flat = quant_configs({}, {"model.layers.0.mlp.experts.0.up_proj": {"format": fmt, "group": group}},
                                   ["lm_head"], kv_cache=False)
    assert flat["quant_algo"] == hf_quant["quantization"]["quant_algo"]
    return hf_quant["quantization"]["quant_algo"]


def modelopt_export_name(fmt: str) -> str | None:
    """``modelopt_name`` of an MoE model's hf-modelopt export; None where the exporter refuses its experts
    (no family's TensorRT-LLM MoE loads them: exporters/hf_modelopt.refuse_unloadable_experts)."""
    f = formats.FORMATS[fmt]
    return None if f.trtllm_moe_families == () or f.modelopt_moe_why else modelopt_name(fmt)


def _args_key(a, weights: bool) -> str | None:
    if a is None:
        return None
    kind = f"{a.type.value if hasattr(a.type, 'value') else a.type}{a.num_bits}"
    strategy = a.strategy.value if hasattr(a.strategy, "value") else a.strategy
    if weights:
        return f"{kind}/{strategy}"
    return f"{'dynamic' if a.dynamic else 'static'}/{strategy}"


def ct_key(fmt: str) -> tuple | None:
    """(compressed-tensors format, weights, activations) of a compressed-tensors export of ``fmt``."""
    f = formats.FORMATS[fmt]
    if f.ct_format is None or f.ct_scheme is None:
        return None
    group = 32 if f.element == "fp4" and f.scale == "group" and f.activation == "none" else 128
    s = f.ct_scheme(group, ["Linear"])
    return (f.ct_format, _args_key(s.weights, True), _args_key(s.input_activations, False))


def _cell(ok: bool) -> str:
    return "yes" if ok else "no"


def table() -> str:
    """The README's consumer table, computed from our names and the consumers' lists."""
    head = ("| format | hf-modelopt `quant_algo` | " + " | ".join(cn.CONSUMERS[:3])
            + " | compressed-tensors (format; weights; activations) | " + " | ".join(cn.CONSUMERS) + " |")
    rows = [head, "|" + "---|" * (2 + 2 * len(cn.CONSUMERS))]
    for name, f in formats.produced().items():
        if f.element == "bf16":
            continue
        algo, key = modelopt_export_name(name), ct_key(name)
        mo = [_cell(algo is not None and cn.modelopt_accepts(c, algo)) for c in cn.CONSUMERS[:3]]
        ct = [_cell(key is not None and cn.ct_accepts(c, key)) for c in cn.CONSUMERS]
        key_s = "; ".join(str(k) for k in key) if key else "(refused)"
        algo_s = f"`{algo}`" if algo else "(refused)"
        rows.append(f"| {name} | {algo_s} | " + " | ".join(mo) + f" | {key_s} | " + " | ".join(ct) + " |")
    return "\n".join(rows)


def test_readme_table_is_the_computed_one():
    text = README.read_text()
    assert text.count(MARK) == 2, f"README.md needs the table between two {MARK} lines"
    block = text.split(MARK)[1].strip()
    assert block == table(), "README consumer table is stale: run python tests/test_consumer_names.py"


@pytest.mark.parametrize("name", [n for n, f in formats.produced().items() if f.element != "bf16"])
def test_every_export_has_a_consumer(name):
    """A format we let an exporter write is loaded by at least one runtime there (else it must be refused)."""
    algo, key = modelopt_export_name(name), ct_key(name)
    if algo is not None:
        assert any(cn.modelopt_accepts(c, algo) for c in cn.CONSUMERS), (name, algo)
    if key is not None:
        assert any(cn.ct_accepts(c, key) for c in cn.CONSUMERS), (name, key)


def test_block_fp8_is_written_as_model_optimizer_writes_it():
    """Model-Optimizer writes 128x128 block FP8 as ``fp8_pb_wo``; TensorRT-LLM and vLLM's linear
    methods both read that spelling (vLLM's MoE method does not take block scales), while vLLM refuses
    the enum name FP8_BLOCK_SCALES."""
    block = next(n for n, f in formats.produced().items() if f.scale == "block")
    assert modelopt_name(block) == "fp8_pb_wo"
    assert cn.TRTLLM_ALIASES["fp8_pb_wo"] in cn.TRTLLM_QUANT_ALGO and "FP8_PB_WO" in cn.VLLM_MODELOPT  # linears
    # an MoE model's experts: TensorRT-LLM reads their block scales only under DeepSeek's name, vLLM not at all
    assert not cn.modelopt_accepts("TensorRT-LLM", "fp8_pb_wo") and not cn.modelopt_accepts("vLLM", "fp8_pb_wo")
    assert "FP8_BLOCK_SCALES" not in cn.VLLM_MODELOPT
    assert formats.by_quant_algo("FP8_BLOCK_SCALES").name == block == formats.by_quant_algo("fp8_pb_wo").name



@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_routed_experts_of_a_modelopt_checkpoint_load_where_a_runtime_takes_them(family):
    """The registry's reason why no runtime loads a format's routed experts from a Model-Optimizer checkpoint
    (Format.modelopt_experts_why: hf-modelopt's refusal, plan, the recipe check) is empty exactly where one
    of the runtimes' lists accepts the checkpoint's quant_algo for MoE layers; TensorRT-LLM's W4A8_AWQ
    experts are Mixtral / Qwen3-MoE only (DeepSeek-V3 / Kimi K2 use its W4A8_CUSTOM layout)."""
    for name, f in formats.produced().items():
        if f.modelopt_entry is None:
            continue
        algo = f.modelopt_algo
        trtllm = cn.modelopt_accepts("TensorRT-LLM", algo) and not (algo == "W4A8_AWQ" and family == "deepseek_v3")
        loads = trtllm or cn.modelopt_accepts("vLLM", algo) or cn.modelopt_accepts("SGLang", algo)
        assert (f.modelopt_experts_why(family) == "") == loads, (name, algo)

def test_names_match_model_optimizer_export():
    """Our per-layer entries equal what Model-Optimizer 0.47's exporter writes for the same format
    (modelopt/torch/export/quant_utils.py process_layer_quant_config)."""
    qu = pytest.importorskip("modelopt.torch.export.quant_utils")
    ours = {"fp8": "fp8", "fp8-block": "fp8_pb_wo", "fp8-dynamic": "fp8_pc_pt", "int4-awq": "int4_awq",
            "w4a8-awq": "w4a8_awq"}
    for fmt, mo_fmt in ours.items():
        cfg = {"model.layers.0.mlp.up_proj.quantization": mo_fmt, "model.layers.0.mlp.up_proj.awq_block_size": 128}
        want = qu.process_layer_quant_config(cfg)["quant_algo"]
        assert modelopt_name(fmt) == want, (fmt, want)


if __name__ == "__main__":
    print(MARK + "\n" + table() + "\n" + MARK)
    sys.exit(0 if re.search(MARK, README.read_text()) else 1)

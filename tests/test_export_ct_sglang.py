"""compressed-tensors exports as SGLang 0.5.23 reads them (read, not run: no GPU here).

SGLang resolves a linear's scheme with the model class's own ``packed_modules_mapping`` (MixtralForCausalLM has
none, DeepseekV2ForCausalLM only ``fused_qkv_a_proj_with_mqa``: models/deepseek_v2.py:3250-3275), so a fused
``qkv_proj`` / ``gate_up_proj`` is looked up under its fused name: ignore entries naming only its parts do not
ignore it (layers/quantization/compressed_tensors/utils.py should_ignore_layer), and targets naming only its parts
do not match it ("Unable to find matching target", utils.py find_matched_target:137-147). And its DeepSeek loader
reads ``kv_b_proj.weight`` after loading (models/deepseek_common/deepseek_weight_loader.py:625-639: AttributeError
for a ``weight_packed`` kv_b_proj) and concatenates q_a_proj's and kv_a_proj_with_mqa's tensors of every name into
the fused linear (:463-478), so their ``weight_shape`` / ``weight_global_scale`` ([2]+[2], [1]+[1]) fail
ReplicatedLinear.weight_loader's size assert (layers/linear.py:376-378)."""

from __future__ import annotations

import json
import re

from moepress import models
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.exporters import ExportConfig, export

SGLANG_PACKED = {"mixtral": {}, "deepseek_v3": {"fused_qkv_a_proj_with_mqa": ["q_a_proj", "kv_a_proj_with_mqa"]}}


def _match(name: str, t: str) -> bool:
    return bool(re.match(t[3:], name)) if t.startswith("re:") else t == name


def _sglang_ignored(name: str, ignore: list[str], packed: dict) -> bool:
    """utils.py should_ignore_layer (a plain entry also matches a dotted suffix)."""
    def m(n):
        return any(_match(n, t) or (not t.startswith("re:") and n.endswith("." + t)) for t in ignore)
    proj = name.split(".")[-1]
    if proj in packed and name not in ignore:
        return all(m(name.replace(proj, p)) for p in packed[proj])
    return m(name)


def _sglang_target(name: str, cls: str, targets: list[str], packed: dict) -> str | None:
    """utils.py find_matched_target: the name, then the class name (contained), then the fused mapping."""
    for t in targets:
        if _match(name, t):
            return t
    for t in targets:
        if not t.startswith("re:") and t.lower() in cls.lower():
            return t
    fused = next((k for k in packed if name.endswith(k)), None)
    if fused:
        hits = [next((t for t in targets if _match(name.replace(fused, p), t)), None) for p in packed[fused]]
        if all(hits):
            return hits[0]
    return None


def _fused_dense(r: CheckpointReader):
    """(fused SGLang module name, its class, its stored parts) of every q/k/v and dense / shared gate/up."""
    bases = {n.rsplit(".", 1)[0] for n in r.names() if ".experts." not in n}
    for b in sorted(bases):
        parent, _, leaf = b.rpartition(".")
        if leaf == "q_proj":
            yield parent + ".qkv_proj", "QKVParallelLinear", [parent + p for p in (".q_proj", ".k_proj", ".v_proj")]
        if leaf == "gate_proj":
            yield parent + ".gate_up_proj", "MergedColumnParallelLinear", [parent + ".gate_proj", parent + ".up_proj"]


def _sglang_resolves_as_stored(ct, model_type: str) -> list[str]:
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    r = CheckpointReader(ct)
    bad = []
    for fused, cls, parts in _fused_dense(r):
        packed = all(p + ".weight_packed" in r or p + ".weight_scale" in r for p in parts)
        if _sglang_ignored(fused, qc["ignore"], SGLANG_PACKED[model_type]):
            if packed:
                bad.append(f"{fused}: ignored, stored quantized")
        elif _sglang_target(fused, cls, targets, SGLANG_PACKED[model_type]) is None:
            bad.append(f"{fused}: no matching target")
        elif not packed:
            bad.append(f"{fused}: quantized by a target, stored high precision")
    return bad


def test_module_name_targets_match_fused_linears_in_sglang(tmp_path):
    """Two schemes -> module-name targets: SGLang finds none for Mixtral's qkv_proj (no packed mapping)."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(
        format="fp8-dynamic", rules=(("self_attn.o_proj", "fp8-block"),)))
    export(q, ct, ExportConfig(format="compressed-tensors"))
    assert _sglang_resolves_as_stored(ct, "mixtral") == []


def test_high_precision_qkv_named_by_parts_is_ignored_in_sglang(tmp_path):
    """q/k/v left bf16, o_proj NVFP4-A16: the ignore list names q/k/v (Kimi's self_attn pattern would take
    o_proj too), which SGLang's Mixtral does not apply to its fused qkv_proj: it builds it quantized."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(
        format="nvfp4-a16", rules=(("self_attn.[qkv]_proj", "none"),)))
    export(q, ct, ExportConfig(format="compressed-tensors"))
    assert _sglang_resolves_as_stored(ct, "mixtral") == []


def test_deepseek_mla_projections_sglang_cannot_load_are_said(tmp_path):
    """tiny-deepseek-v3 NVFP4-A16 (every linear, MLA's included): SGLang 0.5.23 fails loading its q_a / kv_a
    (global scales concatenated into a 1-element parameter) and kv_b_proj (``.weight`` read); the export must
    not say "vLLM and SGLang load them correctly" and must name SGLang where it records misloading consumers."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    quantize_checkpoint(models.path("tiny-deepseek-v3"), q, QuantConfig(format="nvfp4-a16"))
    info = export(q, ct, ExportConfig(format="compressed-tensors"))
    r = CheckpointReader(ct)
    assert "model.layers.1.self_attn.kv_b_proj.weight_packed" in r  # the case under test
    assert not any("SGLang load them correctly" in n for n in info["consumer_notes"]), info["consumer_notes"]
    assert "sglang" in info["misloaded_by"], info["misloaded_by"]

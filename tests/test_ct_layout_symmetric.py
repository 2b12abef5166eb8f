"""The planner reads a compressed-tensors quantization_config by comparing a config group's weight args with each
moepress format's own scheme on exporters/ct_layout.py's _KEYS, ``symmetric`` among them: an ASYMMETRIC INT4 group
scheme (what llm-compressor writes for W4A16_ASYM: a ``weight_zero_point`` beside every weight_scale) is not
moepress's symmetric ``int4-gptq``, whose name and tensor count a plan would otherwise give it.

Independent expectation: compressed-tensors 0.20's own PackedQuantizationCompressor writes a ``weight_zero_point``
for the asymmetric scheme and none for the symmetric one (int4-gptq's), so the two store different tensors; no
moepress format stores the asymmetric one, and the planner refuses such a scheme in one line as it refuses INT8
(tests/test_plan.py test_a_compressed_tensors_scheme_no_format_stores_is_refused_unless_a_format_is_given)."""

from __future__ import annotations

import json

import torch

KIMI = "tests/data/kimi-k2-config.json"
EXPERT = "model.layers.1.mlp.experts.0.gate_proj"


def _kimi_thinking(tmp_path, **weights):
    """Kimi K2's config with the compressed-tensors quantization_config tiny-kimi-k2-int4 ships (routed experts INT4
    symmetric group 32), its group_0 weights edited by ``weights``."""
    from moepress import models

    cfg = json.loads(open(KIMI).read())
    qc = json.loads((models.resolve("tiny-kimi-k2-int4") / "config.json").read_text())["quantization_config"]
    qc["config_groups"]["group_0"]["weights"].update(weights)
    cfg["quantization_config"] = qc
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path, cfg


def _library_tensors(weights: dict) -> set[str]:
    """The tensor names compressed-tensors' pack-quantized compressor writes for one [8, 64] linear under
    ``weights``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**weights)
    w = torch.randn(8, 64)
    g = args.group_size
    mn, mx = (w.reshape(8, -1, g).amin(-1), w.reshape(8, -1, g).amax(-1))
    scale, zp = calculate_qparams(mn, mx, args)
    sd = {"weight": w, "weight_scale": scale}
    if not args.symmetric:
        sd["weight_zero_point"] = zp
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    out = comp.compress(sd, QuantizationScheme(targets=["Linear"], weights=args))
    return set(out)


def test_an_asymmetric_int4_scheme_is_not_planned_as_symmetric_int4_gptq(tmp_path, cli_run):
    from moepress.exporters.ct_layout import UNKNOWN, ct_matcher

    d, cfg = _kimi_thinking(tmp_path, symmetric=False)
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    # the library stores the asymmetric scheme with zero points, the symmetric one (int4-gptq's) without
    assert "weight_zero_point" in _library_tensors({**w, "symmetric": False})
    assert "weight_zero_point" not in _library_tensors({**w, "symmetric": True})
    # so the planner must not name it int4-gptq: non-strict matching gives the unknown format ...
    assert ct_matcher(cfg, "<config>", strict=False)(EXPERT) == (UNKNOWN, None)
    # ... and `moepress plan` refuses it in one line unless a --format is given, as for any scheme no format stores
    r = cli_run("plan", d, "--target", "h200")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "quantization_config.config_groups.group_0" in r.stderr and "plan it with --format" in r.stderr
    assert cli_run("plan", d, "--target", "h200", "--format", "int4-gptq").exit_code == 0


def test_the_symmetric_scheme_kimi_ships_is_still_int4_gptq_group_32(tmp_path):
    """The positive control: the shipped (symmetric) scheme is planned as int4-gptq group 32."""
    from moepress.exporters.ct_layout import ct_matcher

    _, cfg = _kimi_thinking(tmp_path)
    assert ct_matcher(cfg, "<config>")(EXPERT) == ("int4-gptq", 32)

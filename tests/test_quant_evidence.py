"""Per-expert evidence in quant_report.json and the rule for routed experts with too little of it
(compress/quantize/calibrated.py): a tiny calibration set (512 tokens) leaves several of
tiny-deepseek-v3's layer-2 experts with a handful of tokens, a correction bias of -1e4 one with
none; they get the documented rule, and the report says so."""

import json

import pytest
import torch

from helpers import copy_checkpoint
from moepress.calib.data import calibration_batches
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
from moepress.compress.quant import int4
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.quantize import config as qconfig
from moepress.compress.quantize.stats import hessian_evidence
from moepress.models import path as bundled_path

LAYER = 2
NEVER = 5  # expert of LAYER whose correction bias is -1e4: never routed
CALIB = {"num_samples": 4, "seq_len": 128}


def _biased(tmp_path):
    """tiny-deepseek-v3 with expert NEVER of LAYER never selected (sigmoid score + correction bias)."""
    src = copy_checkpoint(bundled_path("tiny-deepseek-v3"), tmp_path / "src")
    reader = CheckpointReader(src)
    name = f"model.layers.{LAYER}.mlp.gate.e_score_correction_bias"
    out = tmp_path / "biased"
    with CheckpointWriter(out) as w:
        for n in reader.names():
            t = reader.get(n)
            if n == name:
                t = t.clone()
                t[NEVER] = -1e4
            w.add(n, t)
        w.write_json("config.json", reader.config)
        w.copy_aux_files(src)
    return out


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evidence")
    src = _biased(tmp)
    out = tmp / "q"
    batches = calibration_batches(src, (), CALIB["num_samples"], CALIB["seq_len"], 0, 8)
    quantize_checkpoint(src, out, QuantConfig(format="int4-gptq", **CALIB), batches=batches)
    return src, out, json.loads((out / "quant_report.json").read_text())


def _few(experts: list[dict]) -> list[int]:
    """Experts that calibration routed a handful (1..MIN_EXPERT_TOKENS - 1) of tokens to."""
    return [x["expert"] for x in experts if 0 < x["tokens"] < qconfig.MIN_EXPERT_TOKENS]


def _threshold(width: int) -> float:
    return max(qconfig.MIN_EXPERT_TOKENS, qconfig.SPARSE_EXPERT_RATIO * width)


def test_report_lists_every_routed_expert_with_tokens_statistics_and_rounding(gptq_run):
    _, _, rep = gptq_run
    experts = rep["experts"][str(LAYER)]
    assert [x["expert"] for x in experts] == list(range(32))
    assert [x["tokens"] for x in experts] == rep["expert_calibration_tokens"][str(LAYER)]
    few = _few(experts)
    assert experts[NEVER]["tokens"] == 0 and few, experts
    assert rep["sparse_expert_rule"]["rule"] == qconfig.SPARSE_EXPERT_RULE
    for x in experts:
        sparse = x["tokens"] < _threshold(128)
        assert (x["statistics"] == "its routed tokens") == (not sparse), x
        assert x["hessian"]["rank"] <= x["tokens"]
        if not sparse:
            assert x["rounding"] == {"gate_up": "gptq", "down": "gptq"}, x
    listed = {b["expert"]: b for b in rep["experts_with_borrowed_scales"] if b["layer"] == LAYER}
    assert NEVER in listed and all(listed[e]["rule"] == qconfig.SPARSE_EXPERT_RULE for e in few)


def test_hessian_rank_is_the_token_count_below_the_width_and_full_above():
    torch.manual_seed(0)
    few = hessian_evidence(torch.randn(5, 128), 0.01)
    many = hessian_evidence(torch.randn(600, 128), 0.01)
    assert few["rank"] == 5 and many["rank"] == 128 and few["estimate"] == "eigvalsh"
    assert few["condition"] > 50 * many["condition"]  # rank-deficient: only the damping bounds it
    wide = hessian_evidence(torch.randn(5, 600), 0.01, exact_width=512)
    assert wide["rank"] == 5 and wide["estimate"].startswith("diagonal")
    assert hessian_evidence(None, 0.01)["rank"] == 0


def test_sparse_expert_gets_the_documented_rounding(gptq_run):
    """The rule is applied, not only reported: a sparse expert's stored INT4 weight is what the rule
    makes of its original weight (round to nearest: int4.quantize exactly), a well-routed expert's is
    GPTQ's (not round-to-nearest)."""
    src, out, rep = gptq_run
    experts = rep["experts"][str(LAYER)]
    orig, q = CheckpointReader(src), CheckpointReader(out)

    def is_rtn(e: int, proj: str) -> bool:
        p = f"model.layers.{LAYER}.mlp.experts.{e}.{proj}"
        w = orig.get(p + ".weight").float()
        qv, s = int4.quantize(w, int4.effective_group(w.shape[1], 128))
        return torch.equal(q.get(p + ".weight"), int4.pack_int4(qv)) and torch.equal(q.get(p + ".weight_scale"), s)

    routed = max(range(32), key=lambda e: experts[e]["tokens"])
    assert experts[routed]["tokens"] >= _threshold(128)
    assert not is_rtn(routed, "gate_proj") and not is_rtn(routed, "down_proj")
    sparse = [x["expert"] for x in experts if x["tokens"] < _threshold(128)]
    assert NEVER in sparse and set(_few(experts)) <= set(sparse)
    for e in sparse:
        rounding = experts[e]["rounding"]
        for proj, key in (("gate_proj", "gate_up"), ("up_proj", "gate_up"), ("down_proj", "down")):
            assert is_rtn(e, proj) == (rounding[key] == "round to nearest"), (e, proj, rounding)

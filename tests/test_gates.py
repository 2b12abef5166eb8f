"""The accuracy gates' directions and defaults, the layer metric the gate reads, and what publish vouches
for, each against a table written here (not the GATES table both the check and publish read)."""

from __future__ import annotations

import torch

from moepress.checks.config import GATES, CheckConfig, evaluate_gates
from moepress.checks.verify import recompute_gates, verify_section

MIN_GATES = {"top1_agreement", "min_layer_cosine", "min_routing_overlap"}  # pass at or above the threshold
MAX_GATES = {"ppl_increase", "kl_mean", "kl_p99", "max_layer_rel_error", "max_expert_error",  # at or below
             "max_expert_error_ratio", "max_weight_error_ratio", "max_attention_error_ratio"}


def test_each_gate_fails_on_the_wrong_side_of_its_threshold():
    assert {g.metric for g in GATES} == MIN_GATES | MAX_GATES
    cfg = CheckConfig(**{g.field: 0.5 for g in GATES})
    for v in (0.4, 0.6, 0.49999, 0.50001, 0.5):  # 0.5 exactly: at the threshold passes either way (<=, >=)
        gates = evaluate_gates(cfg, {g.metric: v for g in GATES})
        for g in gates:
            assert g["passed"] is ((v >= 0.5) if g["metric"] in MIN_GATES else (v <= 0.5)), (g, v)
        applied, problems = recompute_gates({"metrics": {g.metric: v for g in GATES}, "gates": gates})
        assert problems == [] and all(ok is ((v >= 0.5) if m in MIN_GATES else (v <= 0.5)) for m, ok in applied)


def test_a_non_finite_value_fails_every_gate_even_on_its_passing_side():
    """-inf is below every maximum and +inf above every minimum, yet no measurement gives them (a KL, an error,
    a cosine): a manifest holding one (hand-edited, or a broken metric) fails its gate in the check and in
    publish's recomputation, as NaN does."""
    cfg = CheckConfig(**{g.field: 0.5 for g in GATES})
    for v in (float("nan"), float("inf"), float("-inf")):
        metrics = {g.metric: v for g in GATES}
        gates = evaluate_gates(cfg, metrics)
        assert [g["passed"] for g in gates] == [False] * len(GATES), (v, gates)
        applied, _ = recompute_gates({"metrics": metrics, "gates": gates})
        assert applied and not any(ok for _, ok in applied), (v, applied)


def test_default_gates_are_the_documented_ones():
    """README "Accuracy gates for CI" and CheckConfig's docstring."""
    c = CheckConfig()
    assert (c.max_ppl_increase, c.min_top1, c.max_kl, c.max_kl_p99, c.min_cosine, c.max_layer_error,
            c.min_routing_overlap, c.max_expert_error, c.max_expert_error_ratio, c.max_attention_error_ratio) == \
        (0.02, 0.85, 0.05, None, None, 1.0, 0.95, 0.5, 3.0, 4.0)


def test_max_layer_rel_error_is_the_worst_layers():
    """The worst layer's error, not the last's (on real models the error grows, so the two agree there)."""
    from moepress.calib.metrics import LayerStats
    from moepress.checks.rows import layer_metrics

    ref = torch.ones(1, 4, 8)
    layers = [LayerStats(), LayerStats()]
    layers[0].add(ref, ref * 3)  # relative error 2
    layers[1].add(ref, ref * 1.1)  # 0.1
    metrics = {}
    layer_metrics(layers, None, {}, {}, metrics)
    assert abs(metrics["max_layer_rel_error"] - 2.0) < 1e-12 and abs(metrics["final_layer_rel_error"] - 0.1) < 1e-6


def test_a_file_added_after_the_check_is_not_vouched_for(tmp_path, monkeypatch):
    """A weight file the check did not cover (listed in the manifest, absent from the sealed section) is named;
    a README is not a weight and passes."""
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "no-key"))
    d = {"sha256": "0" * 64, "size": 1}
    acc = {"passed": True, "failed": [], "metrics": {"kl_mean": 0.0},
           "gates": [{"metric": "kl_mean", "value": 0.0, "op": "<=", "threshold": 0.05, "passed": True}],
           "files": {"model.safetensors": d}}
    v = verify_section(acc, {"model.safetensors": d, "extra.safetensors": d, "README.md": d}, tmp_path)
    assert [p for p in v.problems if "extra.safetensors" in p and "not covered by the accuracy check" in p]
    assert not [p for p in v.problems if "README.md" in p] and v.passed is True


def test_a_value_that_would_read_as_its_threshold_is_printed_with_the_digits_that_tell_them_apart():
    """A perplexity increase of +2.0014% failed its +2% gate printed "(+2.00%) [<= +2.00%: FAIL]"; a top-1
    agreement of 0.8499996 would read 0.85 beside its 0.85 minimum."""
    from moepress.checks.config import failure_line, fmt

    cfg = CheckConfig()
    metrics = {"ppl_increase": 0.020014, "kl_mean": 0.001, "kl_p99": 0.01, "top1_agreement": 0.9}
    gates = [g for g in evaluate_gates(cfg, metrics) if g["metric"] in metrics]
    line = failure_line(gates, None)
    assert line.startswith("ppl_increase +2.001% > max +2.00%"), line
    assert fmt(0.0133, True, 0.02) == "+1.33%" and fmt(0.02, True, 0.02) == "+2.00%"
    assert fmt(0.8499996, False, 0.85) == "0.8499996" and fmt(0.9, False, 0.85) == "0.9"

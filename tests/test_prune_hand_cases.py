"""Pruning's statistics and decisions against values computed by hand: the routing summary of a top-2
layer, frequency's tie order, REAP's mean over the reference's tokens, the jackknife of each kind of score
(sums: frequency, ean; means: REAP) and its fragile rule, folds of unequal batches, a compressed-tensors
prefix pattern that picks an expert, and the race's unpruned NLL against transformers' own loss."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from helpers import DSV3_SMALL, FakeAdapter, count_evidence, transformers_logits
from moepress import models
from moepress.calib.observers import LayerRouting
from moepress.calib.stats import layer_summary
from moepress.compress.prune import METHODS, PruneConfig, plan_budget
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.stability import jackknife
from moepress.compress.synthetic import write_synthetic


def test_summary_of_a_top2_layer_divides_by_routing_slots():
    """4 tokens, top-2 -> 8 slots over 4 experts: mean 2 slots/expert (not 4 tokens / 4 = 1)."""
    lr = LayerRouting(4, 2)
    lr.counts = torch.tensor([4, 2, 1, 1])
    lr.tokens = 4
    s = layer_summary(lr)
    assert s["routed_slots"] == 8
    assert s["max_over_mean"] == 2.0 and s["min_over_mean"] == 0.5
    # population std of [4,2,1,1] = sqrt(1.5); / mean 2
    assert math.isclose(s["cv"], math.sqrt(1.5) / 2, rel_tol=1e-12)


def test_frequency_ties_keep_the_lower_expert_index():
    """counts [5, 3, 3, 0], keep 2: experts 1 and 2 tie; the lower index (1) stays (as reroute's
    argmin: 'lowest expert id on ties')."""
    E = 4
    lr = LayerRouting(E, 1, 11)
    lr.counts = torch.tensor([5, 3, 3, 0])
    budget = plan_budget(FakeAdapter(E), PruneConfig(keep=2))
    ev = LayerEvidence(0, None, lr, {"scoring": "softmax"}, None, None)
    assert METHODS["frequency"].select(ev, budget).kept == [0, 1]
    lr.counts = torch.tensor([0, 0, 0, 7])
    assert METHODS["frequency"].select(ev, budget).kept == [0, 3]


def test_a_jackknife_flip_off_the_boundary_pair_makes_the_decision_fragile():
    """expert 0's 100 tokens all come from one group; the boundary (weakest kept 1 vs strongest dropped 2)
    is firm (z >> 2), but without group 0 expert 0 falls below expert 2: 1 flip of 8 -> fragile."""
    per = torch.tensor([[100, 10, 5, 0]] + [[0, 10, 5 + (g % 2), 0] for g in range(1, 8)])
    ev, budget, chunks = count_evidence(per, keep=2)
    sel = METHODS["frequency"].select(ev, budget)
    assert sel.kept == [0, 1]
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    assert (row["weakest_kept"], row["strongest_dropped"]) == (1, 2)
    assert row["z"] is not None and row["z"] > 2
    assert row["jackknife_flips"] == "1/8" and row["fragile"] is True


def test_fragile_threshold_is_two_noise_units():
    """z = 1.5 is fragile, z = 2.5 is not, z = 2.0 exactly is not (z < 2), for the jackknife row and a
    search's own boundary alike. Group margins [3, 0, 3, 0] (E=4, keep 3): M = 6, jackknife se =
    sqrt(4/3 * 4 * 1.5**2) = sqrt(12) -> z = 6 / sqrt(12) = 1.732."""
    from moepress.compress.prune.evidence import Selection
    from moepress.compress.prune.stability import stability

    E = 4
    per = torch.tensor([[50, 40, 13, 10], [50, 40, 10, 10], [50, 40, 13, 10], [50, 40, 10, 10]])
    ev, budget, chunks = count_evidence(per, keep=3)
    sel = METHODS["frequency"].select(ev, budget)
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    assert row["z"] == pytest.approx(6 / math.sqrt(12), rel=1e-12)
    assert row["jackknife_flips"] == "0/4" and row["fragile"] is True
    budget_r = plan_budget(FakeAdapter(E), PruneConfig(keep=3, method="reroute"))
    ev_r = LayerEvidence(0, None, ev.stats, {"scoring": "softmax"}, None, None)
    for margin, fragile in ((1.5, True), (2.0, False), (2.5, False)):
        b = {"weakest_kept": 2, "strongest_dropped": 3, "margin": margin, "noise": 1.0}
        sel = Selection([0, 1, 2], torch.zeros(E, dtype=torch.float64), {"boundary": b})
        assert stability(METHODS["reroute"], ev_r, budget_r, sel, None)["fragile"] is fragile, margin


def test_reap_method_scores_divide_by_the_reference_token_count():
    """DeepSeek-style layer where the raw-logit top-k (reap_count) differs from the routed counts: the reap
    method's scores are reap_sum / reap_count (the reference's mean), by hand: [2, 3, 0.5, 0]."""
    E = 4
    lr = LayerRouting(E, 1, 10)
    lr.counts = torch.tensor([4, 2, 4, 0])
    lr.reap_sum = torch.tensor([8.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    lr.reap_count = torch.tensor([4, 1, 4, 1])
    budget = plan_budget(FakeAdapter(E), PruneConfig(keep=2))
    ev = LayerEvidence(0, None, lr, {"scoring": "sigmoid"}, None, None)
    sel = METHODS["reap"].select(ev, budget)
    assert sel.scores.tolist() == [2.0, 3.0, 0.5, 0.0] and sel.kept == [0, 1]


def test_jackknife_ignores_groups_without_samples():
    """fewer samples than CHUNKS leaves groups empty; the jackknife is over the 5 groups that hold
    samples, so appending 3 empty groups changes nothing (hand formula: sqrt(G/(G-1) * sum (m_g - mean)^2))."""
    G = 5
    per = torch.tensor([[30, 20, 11, 9], [28, 22, 9, 11], [31, 19, 12, 10], [29, 21, 12, 8], [30, 20, 9, 12]])
    ev, budget, chunks = count_evidence(per, keep=3, empty=3)
    sel = METHODS["frequency"].select(ev, budget)
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    own = [float(per[g, 2] - per[g, 3]) for g in range(G)]
    mean = sum(own) / G
    se = math.sqrt(G / (G - 1) * sum((m - mean) ** 2 for m in own))
    assert math.isclose(row["noise"], se, rel_tol=1e-12) and row["jackknife_flips"].endswith("/5")


def test_split_folds_deals_whole_batches_of_different_lengths_alternately():
    """three batches of different lengths: batch r to fold r % 2, none left out."""
    from moepress.compress.prune.holdout import split_folds

    b = [torch.zeros(2, n, dtype=torch.long) for n in (20, 30, 40)]
    folds = split_folds(b)
    assert [[id(x) for x in f] for f in folds] == [[id(b[0]), id(b[2])], [id(b[1])]]


def test_a_prefix_regex_picking_one_expert_is_refused_as_compressed_tensors_matches_it(tmp_path):
    """compressed-tensors matches 're:' targets with re.match (a prefix match: match_name); a pattern
    naming expert 1 without a trailing '.*' selects it there, so pruning must refuse it too."""
    from compressed_tensors.utils.match import match_name

    from moepress.compress.prune.sidecars import refuse_index_patterns
    from moepress.compress.stream import StreamedModel
    from moepress.errors import MoepressError

    src = tmp_path / "src"
    shutil.copytree(models.path("tiny-kimi-k2-int4"), src)
    pattern = r"re:.*experts\.1\."
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"]["ignore"].append(pattern)
    (src / "config.json").write_text(json.dumps(conf))
    adapter = StreamedModel(str(src)).adapter
    i = adapter.moe_layers()[0]
    name = adapter.expert_prefix(i, 1) + "down_proj"
    assert match_name(name, pattern) and not match_name(adapter.expert_prefix(i, 2) + "down_proj", pattern)
    with pytest.raises(MoepressError, match="selects routed experts"):
        refuse_index_patterns(src, conf, adapter)


def test_ean_jackknife_is_the_se_of_a_sum():
    """ean is a sum over tokens like frequency: se = sqrt(G/(G-1) * sum_g (m_g - mean m)^2) of the groups'
    own margins (weakest kept 2 vs strongest dropped 3)."""
    norms = [[30.0, 20.0, 11.0, 9.0], [28.0, 22.0, 9.5, 11.0], [31.0, 19.0, 12.0, 10.0], [29.0, 21.0, 12.5, 8.0]]
    ev, budget, chunks = count_evidence(torch.tensor([[3, 2, 1, 1]] * 4), keep=3, norm_sum=norms)
    sel = METHODS["ean"].select(ev, budget)
    row = jackknife(METHODS["ean"], ev, budget, sel, chunks)
    assert (row["weakest_kept"], row["strongest_dropped"]) == (2, 3)
    own = [n[2] - n[3] for n in norms]
    mean = sum(own) / 4
    assert math.isclose(row["noise"], math.sqrt(4 / 3 * sum((m - mean) ** 2 for m in own)), rel_tol=1e-12)


def test_reap_jackknife_is_over_the_leave_one_out_means():
    """REAP is a per-token mean: its jackknife is the textbook one over the leave-one-group-out means,
    sqrt((G-1)/G * sum_i (theta_i - mean theta)^2), theta_i = margin of (sum - group i) sums / counts."""
    G = 4
    sums = [[9.0, 6.0, 3.0, 1.0], [8.0, 5.0, 2.5, 1.5], [10.0, 6.5, 3.5, 0.5], [9.5, 5.5, 2.0, 1.2]]
    cnts = [[3, 3, 2, 1], [3, 2, 2, 2], [4, 3, 2, 1], [3, 3, 1, 2]]
    ev, budget, chunks = count_evidence(torch.tensor(cnts), keep=3, reap_sum=sums, reap_count=cnts)
    sel = METHODS["reap"].select(ev, budget)
    row = jackknife(METHODS["reap"], ev, budget, sel, chunks)
    k, d = row["weakest_kept"], row["strongest_dropped"]

    def loo_mean(i, e):
        return (sum(s[e] for s in sums) - sums[i][e]) / (sum(c[e] for c in cnts) - cnts[i][e])
    theta = [loo_mean(i, k) - loo_mean(i, d) for i in range(G)]
    mean = sum(theta) / G
    assert math.isclose(row["noise"], math.sqrt((G - 1) / G * sum((t - mean) ** 2 for t in theta)), rel_tol=1e-9)


def test_the_races_unpruned_nll_is_transformers_loss_of_the_original(tmp_path):
    """prune_report.json's plans.unpruned_heldout_nll: the original model's mean next-token NLL over every
    calibration sample (each scored once, out of fold), against the logits transformers computes for the
    source checkpoint in a process without moepress (8 samples of 48 tokens, equal lengths)."""
    from moepress.compress.prune import prune_checkpoint

    src = write_synthetic(DSV3_SMALL, tmp_path / "src")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 48), generator=g) for _ in range(2)]
    prune_checkpoint(src, tmp_path / "p", PruneConfig(keep=16), batches=batches)
    rep = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    ids = torch.cat(batches)
    logits = transformers_logits([(src, ids)], tmp_path / "tf")[0]["logits"].double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert rep["plans"]["unpruned_heldout_nll"] == pytest.approx(float(nll), rel=1e-7)  # measured 3e-8

"""Pruning decided on held-out calibration samples, and how firmly each decision rests (issue #21).

- ``split_folds`` deals the calibration samples into two disjoint folds;
- ``auto`` scores each method by its plans made from one fold's statistics on the other fold; the
  report's held-out KL and NLL of a method are recomputed independently (that method run alone on
  each fold, its checkpoint compared with the original on the other fold); the method with the
  lowest KL is then run on every sample: auto's checkpoint is byte for byte that method's;
- ``ChunkedRouting`` splits a layer's routing statistics by calibration sample exactly (the groups
  add up to the unsplit statistics), and the jackknife noise of a decision's margin equals the
  textbook formula recomputed here from the per-group counts;
- every report row says how many tokens its decision rested on and whether it is fragile.
"""

import json
import math

import pytest
import torch

from helpers import DSV3_SMALL as DSV3
from helpers import QWEN_SMALL as QWEN
from helpers import FakeAdapter, count_evidence, heldout_scores
from moepress.calib.observers import LayerRouting, RoutingStats
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.prune import METHODS, PruneConfig, plan_budget, prune_checkpoint
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.holdout import FOLDS, choice_margin, split_folds
from moepress.compress.prune.stability import CHUNKS, ChunkedRouting, jackknife
from moepress.compress.stream import StreamedModel
from moepress.compress.synthetic import write_synthetic


def ids(n, s, seed):
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


def test_split_folds_deals_samples_into_two_disjoint_folds():
    batches = [ids(3, 20, 0), ids(3, 20, 1), ids(3, 20, 2), ids(2, 20, 3)]  # 11 samples, batches of 3
    folds = split_folds(batches)
    rows = torch.cat(batches)
    assert FOLDS == 2 and len(folds) == 2
    assert torch.equal(torch.cat(folds[0]), rows[0::2]) and torch.equal(torch.cat(folds[1]), rows[1::2])
    assert all(b.shape[0] <= 3 for f in folds for b in f)
    one = [ids(1, 8, 5)]
    assert len(split_folds(one)) == 1 and split_folds(one)[0] is one  # a single sample: one fold, nothing held out


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """A DeepSeek-V3 checkpoint (dense first layer, groups, sigmoid routing) pruned by ``auto``."""
    tmp = tmp_path_factory.mktemp("auto")
    src = write_synthetic(DSV3, tmp / "src")
    batches = [ids(4, 48, 0), ids(4, 48, 1)]
    out = tmp / "p"
    res = prune_checkpoint(src, out, PruneConfig(keep=16), batches=batches)
    return src, out, batches, res, json.loads((out / "prune_report.json").read_text())


def test_auto_scores_methods_out_of_fold_and_writes_the_best_run_alone(auto_run, tmp_path):
    """Each candidate's held-out KL and NLL equal an independent recomputation: the method run alone
    on one fold, its checkpoint's next-token distribution on the other fold against the original's,
    both ways round. The chosen method has the lowest KL, and auto's checkpoint is byte for byte
    that method's run alone on every sample with the dropped experts folded into the kept ones."""
    src, out, batches, res, rep = auto_run
    plans = rep["plans"]
    assert set(plans["candidates"]) == set(METHODS["auto"].plans) and len(METHODS["auto"].plans) >= 2
    kl = {k: v["heldout_kl"] for k, v in plans["candidates"].items()}
    assert kl[plans["chosen"]] == min(kl.values())
    assert plans["folds"] == 2 and plans["heldout_tokens"] == 8 * 48 and plans["heldout_samples"] == 8
    folds = split_folds(batches)
    for name in dict.fromkeys((plans["chosen"], "frequency")):
        got_kl, got_nll = heldout_scores(src, tmp_path, name, folds, keep=16)
        assert got_kl == pytest.approx(kl[name], rel=1e-4), name
        assert got_nll == pytest.approx(plans["candidates"][name]["heldout_nll"], rel=1e-5), name
    c = plans["choice"]
    others = {k: v for k, v in kl.items() if k != plans["chosen"]}
    assert c["runner_up"] == min(others, key=others.get)
    assert c["kl_margin"] == pytest.approx(others[c["runner_up"]] - kl[plans["chosen"]], rel=1e-9, abs=1e-15)
    # written: the chosen method run alone on every sample, the dropped experts folded in (bf16 experts)
    alone = tmp_path / "chosen-alone"
    prune_checkpoint(src, alone, PruneConfig(method=plans["chosen"], keep=16, merge=True), batches=batches)
    for f in sorted(alone.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert rep["merge"]["rule"] == "float" and rep["merge"]["merged_layers"] == [1, 2]
    assert all(lr["merged"] for lr in rep["layers"])
    plain = tmp_path / "chosen-plain"
    prune_checkpoint(src, plain, PruneConfig(method=plans["chosen"], keep=16), batches=batches)
    down = [f"model.layers.1.mlp.experts.{j}.down_proj.weight" for j in range(16)]
    assert any(not torch.equal(CheckpointReader(plain).get(n), CheckpointReader(out).get(n)) for n in down)
    assert [r["kept"] for r in rep["layers"]] == [
        r["kept"] for r in json.loads((alone / "prune_report.json").read_text())["layers"]]
    assert res["kept"] == 16 and [lr["layer"] for lr in rep["layers"]] == [1, 2]
    r_src, r_out = CheckpointReader(src), CheckpointReader(out)  # the chosen plan's router rows, dense layer copied
    for lr in rep["layers"]:
        kept = [k["expert"] for k in lr["kept"]]
        g = f"model.layers.{lr['layer']}.mlp.gate."
        assert torch.equal(r_out.get(g + "weight"), r_src.get(g + "weight")[kept])
        assert torch.equal(r_out.get(g + "e_score_correction_bias"), r_src.get(g + "e_score_correction_bias")[kept])
    dense = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(r_out.get(dense), r_src.get(dense))


def test_a_race_of_two_methods_scores_them_as_the_whole_race_does_and_writes_the_chosen_one_alone(auto_run, tmp_path):
    """`--race ean,frequency`: only those two are raced, each scored exactly as in the race of all four (a
    plan does not depend on the others), the lower held-out KL is chosen, and the checkpoint is that method's
    run alone on every sample with the dropped experts folded in, byte for byte."""
    src, _, batches, _, rep = auto_run
    out = tmp_path / "raced"
    prune_checkpoint(src, out, PruneConfig(keep=16, race=("ean", "frequency")), batches=batches)
    plans = json.loads((out / "prune_report.json").read_text())["plans"]
    assert list(plans["candidates"]) == ["frequency", "ean"]  # auto's own order, whatever the order given
    for name, got in plans["candidates"].items():
        assert got == rep["plans"]["candidates"][name], name
    kl = {k: v["heldout_kl"] for k, v in plans["candidates"].items()}
    assert plans["chosen"] == min(kl, key=kl.get)
    alone = tmp_path / "alone"
    prune_checkpoint(src, alone, PruneConfig(method=plans["chosen"], keep=16, merge=True), batches=batches)
    for f in sorted(alone.glob("*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_auto_with_one_sample_scores_on_it(tmp_path):
    """A single calibration sample cannot be split: the plans are scored on it, and the report says so."""
    src = write_synthetic(QWEN, tmp_path / "src")
    prune_checkpoint(src, tmp_path / "p", PruneConfig(keep=8), batches=[ids(1, 32, 0)])
    plans = json.loads((tmp_path / "p" / "prune_report.json").read_text())["plans"]
    assert plans["folds"] == 1 and "nothing held out" in plans["selection"] and plans["choice"]["fragile"]


def test_chunked_routing_adds_up_to_the_layer_statistics(tmp_path):
    """Sample r goes to group r % CHUNKS; the groups' statistics sum to the unsplit statistics."""
    src = write_synthetic(QWEN, tmp_path / "src")
    sm = StreamedModel(str(src))
    hs = sm.embed([ids(5, 24, 0), ids(6, 24, 1)])
    layer = sm.load_layer(0)
    whole = RoutingStats().attach(0, layer)
    chunked = ChunkedRouting(whole.num_experts, whole.top_k, 24)
    layer.moe.observers.append(chunked)
    sm.run_layer(layer, hs)
    assert [c.tokens for c in chunked.chunks] == [24 * sum(1 for r in range(11) if r % CHUNKS == c)
                                                  for c in range(CHUNKS)]
    for k in LayerRouting._FIELDS:
        total = sum(getattr(c, k) for c in chunked.chunks)
        assert torch.allclose(total.double(), getattr(whole, k).double(), rtol=1e-12, atol=1e-9), k


def test_jackknife_noise_of_a_frequency_margin_is_the_textbook_formula():
    """Per-group counts given: the margin between the weakest kept and strongest dropped expert,
    its delete-a-group jackknife standard error, and the flips, computed here by hand."""
    G = 5
    per = torch.tensor([[30, 20, 11, 9], [28, 22, 9, 11], [31, 19, 12, 10], [29, 21, 12, 8], [30, 20, 9, 12]])
    ev, budget, chunks = count_evidence(per, keep=3)
    sel = METHODS["frequency"].select(ev, budget)
    assert sel.kept == [0, 1, 2]
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    assert (row["weakest_kept"], row["strongest_dropped"]) == (2, 3)
    assert row["margin"] == float(per[:, 2].sum() - per[:, 3].sum()) == 3
    # the margin is a sum of the groups' own margins m_g: its standard error is sqrt(G var(m)) (the
    # jackknife of the sum over G - 1 groups read (G - 1) / G of it)
    own = [float(per[g, 2] - per[g, 3]) for g in range(G)]
    mean = sum(own) / G
    se = math.sqrt(G / (G - 1) * sum((m - mean) ** 2 for m in own))
    assert row["noise"] == pytest.approx(se, rel=1e-12)
    loo = [float((per[:, 2].sum() - per[g, 2]) - (per[:, 3].sum() - per[g, 3])) for g in range(G)]
    flips = sum(m < 0 for m in loo)  # leaving a group out makes expert 3 outrank expert 2
    assert row["jackknife_flips"] == f"{flips}/{G}" and row["fragile"]


def test_a_tie_at_the_boundary_is_fragile():
    """Two experts no sample routed to, one kept by index: margin 0 and noise 0 were reported z None, not
    fragile, though one token to the dropped expert flips the decision."""
    ev, budget, chunks = count_evidence(torch.tensor([[30, 20, 0, 0]] * 4), keep=3)
    sel = METHODS["frequency"].select(ev, budget)
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    assert (row["margin"], row["noise"], row["z"], row["fragile"]) == (0.0, 0.0, 0.0, True)


def test_choice_margin_is_the_paired_standard_error_of_the_sum():
    """The chosen plan's KL margin over the runner-up, in nats per position, and its noise: the standard
    error of a sum of paired per-sample differences, sqrt(m) x their sample standard deviation."""
    import numpy as np

    best, runner, worse = [1.0, 2.0, 3.5, 1.5], [1.5, 2.0, 4.5, 1.0], [9.0, 9.0, 9.0, 9.0]
    c = choice_margin("a", {"a": best, "b": runner, "c": worse}, positions=40)
    d = np.array(runner) - np.array(best)
    assert c["runner_up"] == "b" and c["kl_margin"] == pytest.approx(d.sum() / 40, rel=1e-12)
    assert c["kl_margin_noise"] == pytest.approx(d.std(ddof=1) * math.sqrt(len(d)) / 40, rel=1e-12)
    assert c["z"] == pytest.approx(d.sum() / (d.std(ddof=1) * math.sqrt(len(d))), rel=1e-12)
    assert c["fragile"] == (c["z"] < 2.0) is True  # z = 0.98


def test_a_dead_even_choice_is_fragile():
    """Two plans keeping the same experts share their states: identical per-sample KLs were reported noise 0,
    z None and not fragile, though the choice was the first name in the list."""
    c = choice_margin("a", {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0]}, positions=30)
    assert (c["kl_margin"], c["kl_margin_noise"], c["z"], c["fragile"]) == (0.0, 0.0, 0.0, True)


@pytest.mark.parametrize("method", ["frequency", "reroute"])
def test_report_rows_say_what_each_decision_rested_on(tmp_path, method):
    """A prune report row names the boundary experts, the tokens behind them and the noise of their
    margin; a decision whose margin is within twice its noise is flagged fragile."""
    src = write_synthetic(QWEN, tmp_path / "src")
    out = tmp_path / method
    prune_checkpoint(src, out, PruneConfig(method=method, keep=8), batches=[ids(8, 32, 0), ids(8, 32, 1)])
    rep = json.loads((out / "prune_report.json").read_text())
    for lr in rep["layers"]:
        st = lr["stability"]
        kept = {k["expert"]: k for k in lr["kept"]}
        dropped = {k["expert"]: k for k in lr["dropped"]}
        assert st["statistics_tokens"] == lr["tokens"] == 16 * 32
        assert st["weakest_kept"] in kept and st["strongest_dropped"] in dropped
        assert st["kept_tokens"] == kept[st["weakest_kept"]]["tokens"]
        assert st["dropped_tokens"] == dropped[st["strongest_dropped"]]["tokens"]
        assert st["margin"] >= 0 and st["noise"] >= 0
        assert st["fragile"] == (st["z"] is not None and st["z"] < 2.0 or st.get("jackknife_flips", "0/")[0] != "0")
        if method == "frequency":
            assert st["margin"] == kept[st["weakest_kept"]]["tokens"] - dropped[st["strongest_dropped"]]["tokens"]
        else:
            assert st["strongest_dropped"] == lr["drop_order"][-1]


def test_reap_rows_count_the_tokens_reap_scored(tmp_path):
    """REAP scores an expert on the tokens whose top-k of the raw router logits holds it (not the tokens DeepSeek's
    biased, group-limited router sends it): a reap row's kept / dropped tokens are those, counted here from
    transformers' own forward (the gate's input, hooked, times the gate's weight); they were the routed counts."""
    from transformers import AutoModelForCausalLM

    src = write_synthetic(DSV3, tmp_path / "src")
    batches = [ids(4, 32, 0), ids(4, 32, 1)]
    out = tmp_path / "reap"
    prune_checkpoint(src, out, PruneConfig(method="reap", keep=16), batches=batches)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    counts, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "e_score_correction_bias"):
            def hook(mod, args, i=i):
                logits = args[0].reshape(-1, args[0].shape[-1]).float() @ mod.weight.float().T
                top = logits.topk(DSV3["num_experts_per_tok"], dim=-1).indices
                counts[i] = counts.get(i, 0) + torch.bincount(top.reshape(-1), minlength=logits.shape[-1])
            hooks.append(gate.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    rep = json.loads((out / "prune_report.json").read_text())
    routed_differs = False
    for lr in rep["layers"]:
        st, c = lr["stability"], counts[lr["layer"]]
        assert st["kept_tokens"] == int(c[st["weakest_kept"]])
        assert st["dropped_tokens"] == int(c[st["strongest_dropped"]])
        kept = {k["expert"]: k["tokens"] for k in lr["kept"]}
        routed_differs |= kept[st["weakest_kept"]] != st["kept_tokens"]
    assert routed_differs  # the routed counts are other numbers here (the test can tell the two apart)


def test_a_search_boundary_tie_is_fragile():
    """reroute's own boundary (last drop against the runner-up) with margin 0 and noise 0 (neither expert
    touches a search token, e.g. `--search-tokens 2`: the drop is decided by index) was reported z None and
    not fragile, though the score methods' jackknife calls the same tie fragile (margin_z: 0 for a tie)."""
    from moepress.compress.prune.evidence import Selection
    from moepress.compress.prune.stability import stability

    E = 4
    total = LayerRouting(E, 1, 200)
    total.counts = torch.tensor([90, 60, 30, 20])
    budget = plan_budget(FakeAdapter(E), PruneConfig(keep=3, method="reroute"))
    ev = LayerEvidence(0, None, total, {"scoring": "softmax"}, None, None)
    boundary = {"weakest_kept": 3, "strongest_dropped": 2, "margin": 0.0, "noise": 0.0,
                "noise_from": "per-token paired differences over 2 search tokens", "tokens_that_differ": 0}
    sel = Selection([0, 1, 3], torch.zeros(E, dtype=torch.float64), {"boundary": boundary})
    row = stability(METHODS["reroute"], ev, budget, sel, None)
    assert (row["margin"], row["noise"], row["z"], row["fragile"]) == (0.0, 0.0, 0.0, True)

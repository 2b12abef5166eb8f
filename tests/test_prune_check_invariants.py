"""Invariants of the fold, the stability report, check's per-layer metrics, lineage and publish's
re-evaluation that no other test pinned (a mutation audit planted each of these bugs and the suite
passed): each test states the property independently of the code under test."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from test_check import _broken_copy  # a tiny-mixtral copy with one tensor changed

from moepress import models
from moepress.calib.observers import LayerRouting
from moepress.compress.moe import ExpertMLP
from moepress.compress.prune import METHODS, PruneConfig, prune_checkpoint, prune_moe_module
from moepress.compress.prune import merge as merge_mod
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import LayerEvidence
from moepress.compress.prune.stability import jackknife
from moepress.compress.stream import StreamedModel
from moepress.compress.synthetic import write_synthetic


@pytest.mark.parametrize("from_store", [False, True])
def test_folded_restores_each_kept_experts_own_down(monkeypatch, from_store):
    """auto's race scores every plan on one loaded layer: after a plan's fold, each kept expert gets its own
    down projection back (from the checkpoint, or from the copy taken where the layer is quantized)."""
    torch.manual_seed(0)
    experts = [ExpertMLP(8, 5) for _ in range(4)]
    orig = [e.linears()[2].weight.detach().clone() for e in experts]
    ev = SimpleNamespace(moe=SimpleNamespace(experts=experts))

    def fake_refit(ev, kept, release=False):
        for c in kept:
            ev.moe.experts[c].linears()[2].weight.data.add_(1.0 + c)
        return kept

    monkeypatch.setattr(merge_mod, "refit", fake_refit)
    with merge_mod.folded(ev, [1, 3], (lambda c: orig[c].clone()) if from_store else None):
        assert not torch.equal(experts[3].linears()[2].weight, orig[3])
    for c in range(4):
        assert torch.equal(experts[c].linears()[2].weight, orig[c]), c


def test_jackknife_boundary_is_strongest_dropped_of_the_tightest_group():
    """Group-limited routing (2 groups, 2 kept in each): the reported boundary is the group whose kept/dropped
    margin is smallest (group 1: experts 5 and 6, about one token apart; group 0's is ~35), against the
    strongest dropped expert of that group, not the weakest."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([50, 40, 5, 1, 30, 20, 19, 2], dtype=torch.float64)
    chunks = []
    for _ in range(5):
        lr = LayerRouting(8, 1, 100)
        lr.counts = (base + torch.randint(0, 3, (8,), generator=g)).long()
        chunks.append(lr)
    total = LayerRouting(8, 1, 500)
    total.counts = sum(c.counts for c in chunks)
    budget = Budget(8, 4, 1, n_group=2, topk_group=2)
    ev = LayerEvidence(0, None, total, {"scoring": "softmax"}, None, chunks)
    sel = METHODS["frequency"].select(ev, budget)
    assert sorted(sel.kept) == [0, 1, 4, 5]
    row = jackknife(METHODS["frequency"], ev, budget, sel, chunks)
    assert (row["weakest_kept"], row["strongest_dropped"]) == (5, 6)
    assert row["margin"] == float(total.counts[5] - total.counts[6])


def test_refit_shares_the_lost_output_by_router_weight_under_a_scaling_factor(tmp_path, monkeypatch):
    """The output the dropped experts leave is shared out by the pruned router's weights: lost = (full routed
    output - pruned routed output) / sum of the pruned weights, which carry DeepSeek's routed_scaling_factor
    (2.5 here). Both routed outputs are recomputed expert by expert through the family's router."""
    from test_prune_merge import DS_CFG

    src = write_synthetic(DS_CFG, tmp_path / "bf16")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]
    seen, real = [], merge_mod._refit_down

    def spy(expert, x, pw, lost):
        seen.append((x.clone(), pw.clone(), lost.clone()))
        return real(expert, x, pw, lost)

    monkeypatch.setattr(merge_mod, "_refit_down", spy)
    prune_checkpoint(src, tmp_path / "m", PruneConfig(method="merge", keep=4), batches=batches)
    row = json.loads((tmp_path / "m" / "prune_report.json").read_text())["layers"][0]
    kept = [k["expert"] for k in row["kept"]]
    sm = StreamedModel(str(src))
    moe = sm.load_layer(row["layer"]).moe
    pruned = prune_moe_module(copy.deepcopy(moe), kept)

    @torch.no_grad()
    def routed(m, x):  # the routed experts' output as the family's router weighs it (no shared expert)
        _, w, idx = sm.adapter.route(m, x)
        y = torch.zeros(x.shape, dtype=torch.float64)
        for t in range(x.shape[0]):
            for s in range(idx.shape[1]):
                y[t] += float(w[t, s]) * m.experts[int(idx[t, s])](x[t:t + 1].float())[0].double()
        return y, w.double().sum(-1)

    assert seen
    for x, _, lost in seen[:len(kept)]:  # the first layer's refits
        x = x[:6]
        full, _ = routed(moe, x)
        part, wsum = routed(pruned, x)
        assert torch.allclose(lost[:6].double(), (full - part) / wsum[:, None], rtol=1e-5, atol=2e-6)


def test_calibrated_on_follows_an_onnx_files_directory(tmp_path):
    """`check path/model.onnx`: the lineage starts at the file's folder's manifest."""
    from moepress.calib.data import source_hashes
    from moepress.checks.lineage import calibrated_on

    data = tmp_path / "d.txt"
    data.write_text("some calibration text " * 50)
    q, e = tmp_path / "q", tmp_path / "e"
    q.mkdir()
    e.mkdir()
    (q / "moepress-manifest.json").write_text(json.dumps(
        {"stage": "quantize", "inputs": {"calibration_sha256": [source_hashes((str(data),))[str(data)]]}}))
    (e / "moepress-manifest.json").write_text(json.dumps({"stage": "export", "inputs": {"model": str(q)}}))
    (e / "model.onnx").write_bytes(b"x")
    assert calibrated_on(e / "model.onnx", str(data)) == [f"{q} (quantize)"]


def test_publish_recompute_passes_a_metric_at_its_threshold():
    """A metric exactly at its gate passes (`--max-kl 0` on a bit-identical export, `--min-top1 1`), in the
    check and in publish's re-evaluation of the recorded metrics."""
    from moepress.checks.config import CheckConfig, evaluate_gates
    from moepress.checks.verify import recompute_gates

    metrics = {"kl_mean": 0.0, "top1_agreement": 1.0, "ppl_increase": 0.0}
    gates = evaluate_gates(CheckConfig(max_kl=0.0, min_top1=1.0, max_ppl_increase=0.0, max_layer_error=None,
                                       min_routing_overlap=None, max_expert_error=None, max_expert_error_ratio=None,
                                       max_weight_error_ratio=None, max_attention_error_ratio=None), metrics)
    assert all(g["passed"] for g in gates)
    applied, problems = recompute_gates({"metrics": metrics, "gates": gates})
    assert problems == [] and all(ok for _, ok in applied)


def test_check_layer_metrics_are_the_worst_and_the_last(tmp_path):
    """min_layer_cosine (the --min-cosine gate) is the worst layer's; final_layer_rel_error the last layer's."""
    from moepress.checks import CheckConfig, run_check

    cand = _broken_copy(tmp_path, "model.layers.1.self_attn.o_proj.weight", lambda t: (t.float() * 3).to(t.dtype))
    res = run_check(cand, models.path("tiny-mixtral"), CheckConfig(seq_len=32, max_samples=2))
    cos = [p["cosine"] for p in res["layers"]]
    assert res["metrics"]["min_layer_cosine"] == min(cos) < max(cos)
    last, before = res["layers"][-1]["rel_error"], res["layers"][-2]["rel_error"]
    assert res["metrics"]["final_layer_rel_error"] == last != before


def test_check_sees_a_changed_final_norm(tmp_path):
    """The candidate's last state goes through its own final norm: a doubled model.norm is seen."""
    from moepress.checks import CheckConfig, run_check

    cand = _broken_copy(tmp_path, "model.norm.weight", lambda t: (t.float() * 2).to(t.dtype))
    res = run_check(cand, models.path("tiny-mixtral"), CheckConfig(seq_len=32, max_samples=2))
    assert res["metrics"]["kl_mean"] > 1e-4


def test_lineage_follows_no_relative_input_model(tmp_path, monkeypatch):
    """An older manifest's relative inputs.model is not read against this process's directory, which may hold
    another model of that name: the candidate is not said to be made from another model than the reference."""
    from moepress.checks.lineage import made_from_another, upstream

    cand, ref, other = tmp_path / "cand", tmp_path / "ref", tmp_path / "cwd" / "orig"
    for d, cfg in ((cand, "{}"), (ref, '{"a": 1}'), (other, '{"b": 2}')):
        d.mkdir(parents=True)
        (d / "config.json").write_text(cfg)
    (cand / "moepress-manifest.json").write_text(json.dumps({"stage": "quantize", "inputs": {"model": "orig"}}))
    monkeypatch.chdir(tmp_path / "cwd")
    assert [d for d, _ in upstream(cand)] == [cand]
    assert made_from_another(cand, ref) is None

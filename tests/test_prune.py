"""Expert pruning (issue #4): constraints, routing simulation, surgery, MTP + block-FP8, sequential mode.

The bundled-model acceptance (transformers loads the pruned checkpoints, CLI) is in test_prune_bundled.py.
"""

import json
from pathlib import Path

import pytest
import torch

from helpers import DSV3_SMALL as DSV3
from helpers import QWEN_SMALL as QWEN
from helpers import make_random_checkpoint, write_with_mtp
from moepress.calib.observers import RoutingStats
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.prune import (
    METHODS,
    PruneConfig,
    group_of,
    keep_top,
    parse_protect,
    plan_budget,
    prune_checkpoint,
    prune_moe_module,
    route_masked,
)
from moepress.compress.stream import StreamedModel
from moepress.compress.synthetic import write_synthetic
from moepress.errors import MoepressError

KIMI = json.loads((Path(__file__).parent / "data" / "kimi-k2-config.json").read_text())


def budget(config, **kw):
    return plan_budget(get_adapter(config), PruneConfig(**kw))


def refuse(config, *needles, **kw):
    with pytest.raises(MoepressError) as e:
        budget(config, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# ---- constraints ----------------------------------------------------------------------------------

def test_budget_ratio_keep_and_ep_rounding():
    assert budget(QWEN, ratio=0.25).keep == 12 and budget(QWEN, ratio=0.5).keep == 8
    assert budget(QWEN, keep=7).keep == 7
    # 60 experts, drop 0.8: 60 x (1 - 0.8) is 11.999999999999996 in float64; by hand it keeps 12
    assert budget({**QWEN, "num_experts": 60}, ratio=0.8).keep == 12
    b = budget(QWEN, ratio=0.25, ep_size=5)  # 12 -> 10: rounded down, the size budget holds
    assert b.keep == 10 and any("rounded down to 10" in d for d in b.decisions)
    k = budget(KIMI, ratio=0.25, ep_size=64)  # 288 -> 256: a multiple of the EP size
    assert k.keep == 256 and k.keep % 64 == 0
    refuse(QWEN, "--keep 12", "multiple of 8", "nearest valid: 8", keep=12, ep_size=8)
    refuse(QWEN, "--ratio 0.9", "fewer than top_k=4", "largest valid ratio is 0.75", "--keep 4", ratio=0.9)
    # Kimi K2 (384 experts, top-8): 1 - 8/384 = 0.97917 is printed rounded down, so it is itself accepted
    msg = refuse(KIMI, "--ratio 0.99", "largest valid ratio is 0.9791 (--keep 8)", ratio=0.99)
    assert budget(KIMI, ratio=float(msg.split("largest valid ratio is ")[1].split()[0])).keep == 8
    refuse(QWEN, "--ratio / --keep", ratio=0.5, keep=8)
    refuse(QWEN, "--ratio / --keep")
    refuse(QWEN, "--ratio 1.0", "(0, 1)", ratio=1.0)
    # a ratio that rounds to no expert dropped ran a whole calibration for nothing (exit 0)
    msg = refuse(QWEN, "--ratio 1e-12", "drops none of the 16 routed experts", "at least 0.0625", ratio=1e-12)
    assert budget(QWEN, ratio=0.0625).keep == 15 and "drops none" in msg
    refuse(QWEN, "--keep 16", "1..15", keep=16)


def test_budget_groups_drop_equally_and_keep_top_k_reachable():
    b = budget(DSV3, ratio=0.25)
    assert (b.keep, b.keep_per_group) == (24, 6)
    assert budget(DSV3, ratio=0.3).keep == 20  # floor(22.4) = 22 -> 20, a multiple of n_group=4
    refuse(DSV3, "--keep 10", "multiple of 4", "n_group=4", "nearest valid: 8 or 12", keep=10)
    # 4 kept = 1 per group: DeepSeek's group score needs each group's two best
    refuse(DSV3, "1 per group", "--keep 8", ratio=0.85)
    # ... refused on its own too (topk_group=4 reaches top_k with 1 per group): transformers' DeepseekV3 router
    # and vLLM's grouped_topk take topk(2) inside each group, which fails on groups of one
    refuse({**DSV3, "topk_group": 4}, "1 per group", "two best", keep=4)
    assert budget({**DSV3, "topk_group": 4}, keep=8).keep == 8
    # topk_group=1: 2 per group x 1 reachable group < top_k=4
    refuse({**DSV3, "topk_group": 1}, "topk_group=1", "fewer than top_k=4", keep=8)
    assert budget({**DSV3, "topk_group": 1}, keep=16).keep == 16
    refuse({**DSV3, "n_routed_experts": 30}, "n_group=4 equal groups", ratio=0.5)
    # EP and groups together: a multiple of lcm(4, 6) = 12
    assert budget(DSV3, ratio=0.25, ep_size=6).keep == 24 and budget(DSV3, ratio=0.3, ep_size=6).keep == 12


def test_protect_parsing_and_validation():
    assert parse_protect("3:5, 1:0,3:5") == ((1, 0), (3, 5))
    with pytest.raises(MoepressError, match="--protect 'x'"):
        parse_protect("x")
    refuse(DSV3, "--protect 0:1", "not an MoE layer", protect=((0, 1),), ratio=0.25)
    refuse(DSV3, "expert 40 does not exist", protect=((1, 40),), ratio=0.25)
    refuse(DSV3, "3 experts protected in group 0", "2 kept per group", protect=((1, 0), (1, 1), (1, 2)), ratio=0.75)
    b = budget(DSV3, protect=((1, 0), (1, 1)), ratio=0.5)
    scores = torch.arange(32, dtype=torch.float64)  # experts 0 and 1 score lowest of group 0
    kept = keep_top(scores, b, 1)
    assert kept[:2] == [0, 1] and len(kept) == 16
    assert [sum(1 for e in kept if group_of(32, 4)[e] == g) for g in range(4)] == [4, 4, 4, 4]
    b = budget(DSV3, protect=((1, 0), (1, 1)), ratio=0.75)  # exactly the 2 kept per group: allowed
    assert b.keep == 8 and keep_top(scores, b, 1)[:2] == [0, 1]


# ---- routing simulation == the sliced router ------------------------------------------------------

@pytest.mark.parametrize("family,overrides", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                              ("mixtral", {}), ("deepseek_v3", {"n_routed_experts": 16})])
def test_route_masked_equals_sliced_router(tmp_path, family, overrides):
    ckpt = make_random_checkpoint(family, tmp_path / "m", **overrides)
    sm = StreamedModel(str(ckpt))
    i = sm.adapter.moe_layers()[0]
    moe = sm.load_layer(i).moe
    E, r = moe.num_experts, sm.adapter.routing()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, sm.adapter.hidden_size, generator=g)
    if r["n_group"] > 1:  # the same number per group
        per = E // r["n_group"]
        kept = sorted(gi * per + e for gi in range(r["n_group"]) for e in torch.randperm(per, generator=g)[:2].tolist())
    else:
        kept = sorted(torch.randperm(E, generator=g)[: E // 2].tolist())
    logits, w0, i0 = sm.adapter.route(moe, x)
    keep = torch.zeros(E, dtype=torch.bool)
    keep[kept] = True
    w_sim, i_sim = route_masked(logits, torch.ones(E, dtype=torch.bool), r, moe.gate.e_score_correction_bias)
    assert torch.equal(i_sim.sort(1)[0], i0.sort(1)[0]) and torch.allclose(w_sim.sort(1)[0], w0.float().sort(1)[0])
    w_sim, i_sim = route_masked(logits, keep, r, moe.gate.e_score_correction_bias)
    pruned = prune_moe_module(moe, kept)
    _, w1, i1 = sm.adapter.route(pruned, x)
    mapped = torch.tensor(kept)[i1]
    o_sim, o1 = i_sim.argsort(1), mapped.argsort(1)
    assert torch.equal(i_sim.gather(1, o_sim), mapped.gather(1, o1))
    assert torch.allclose(w_sim.gather(1, o_sim), w1.float().gather(1, o1), rtol=1e-5, atol=1e-6)


def test_qwen3_without_renormalisation_scales_kept_tokens_by_the_softmax_mass(tmp_path):
    """norm_topk_prob=False cannot be exact: the softmax denominator loses the dropped experts'
    mass. Documented behaviour: same choices, output x sum(exp(all)) / sum(exp(kept))."""
    ckpt = make_random_checkpoint("qwen3_moe", tmp_path / "m", norm_topk_prob=False)
    sm = StreamedModel(str(ckpt))
    moe = sm.load_layer(0).moe
    x = torch.randn(2000, sm.adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, _, i0 = sm.adapter.route(moe, x)
    want = moe(x)
    kept = [0, 2, 3, 5, 6, 7]
    got = prune_moe_module(moe, kept)(x)
    all_kept = torch.isin(i0, torch.tensor(kept)).all(1)
    mass = torch.logsumexp(logits, 1) - torch.logsumexp(logits[:, kept], 1)
    assert all_kept.sum() > 500
    torch.testing.assert_close(got[all_kept], want[all_kept] * mass.exp()[all_kept, None], rtol=1e-4, atol=1e-5)


# ---- MTP + block-FP8 ------------------------------------------------------------------------------

MTP_CFG = {**DSV3, "num_hidden_layers": 2, "n_routed_experts": 16, "num_experts_per_tok": 2,
           "num_nextn_predict_layers": 1}


def write_deepseek_with_mtp(tmp_path) -> Path:
    """A block-FP8 DeepSeek-V3 checkpoint with one MTP layer (helpers.write_with_mtp)."""
    return write_with_mtp(MTP_CFG, tmp_path / "dsv3-mtp-fp8")


@pytest.mark.parametrize("argv", [["inspect", "--no-targets"], ["export", "--format", "hf-fp8-block", "-o", "EXP"],
                                  ["prune", "--keep", "8", "-o", "EXP"]])
def test_an_mtp_layer_storing_other_experts_than_the_config_is_refused(tmp_path, cli_run, argv):
    """A checkpoint whose MTP layer holds 32 experts under a config of 16 (its trunk pruned, the MTP layer not):
    vLLM's MTP loader maps experts by the config's count and cannot load it. Checked as a trunk layer is (the MTP
    layer's experts were never counted: inspect described it and export wrote it, exit 0)."""
    from helpers import assert_one_line_error
    from moepress.compress.checkpoint import CheckpointWriter

    small = CheckpointReader(write_with_mtp(MTP_CFG, tmp_path / "e16"))
    big = CheckpointReader(write_with_mtp({**MTP_CFG, "n_routed_experts": 32}, tmp_path / "e32"))
    n = MTP_CFG["num_hidden_layers"]
    with CheckpointWriter(tmp_path / "mixed") as w:
        for name in small.names():
            if not name.startswith(f"model.layers.{n}."):
                w.add(name, small.get(name))
        for name in big.names():
            if name.startswith(f"model.layers.{n}."):
                w.add(name, big.get(name))
        w.write_json("config.json", small.config)
    args = [str(tmp_path / "EXP") if a == "EXP" else a for a in argv]
    r = cli_run(args[0], tmp_path / "mixed", *args[1:])
    assert_one_line_error(r, "n_routed_experts=16", f"layer {n} stores 32 routed experts")
    assert not (tmp_path / "EXP").exists()


def test_block_fp8_with_mtp_layer_prunes_consistently(tmp_path):
    src = write_deepseek_with_mtp(tmp_path)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "pruned"
    res = prune_checkpoint(src, out, PruneConfig(method="reap", ratio=0.5), batches=[ids])
    assert res["kept"] == 8 and res["mtp_layers"] == 1
    rep = json.loads((out / "prune_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_routed_experts"] == 8 and cfg["num_nextn_predict_layers"] == 1
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    by_layer = {r["layer"]: r for r in rep["layers"]}
    assert by_layer[1]["kind"] == "trunk" and by_layer[2]["kind"] == "mtp"
    assert by_layer[1]["tokens"] == 4 * 48 and by_layer[2]["tokens"] == 4 * 47  # MTP sees t_{i+1}: one fewer
    s, o = CheckpointReader(src), CheckpointReader(out)
    for i in (1, 2):  # the trunk MoE layer and the MTP layer, each with its own kept set
        kept = [k["expert"] for k in by_layer[i]["kept"]]
        assert len(kept) == 8 and [sum(1 for e in kept if e // 4 == g) for g in range(4)] == [2, 2, 2, 2]
        p = f"model.layers.{i}.mlp."
        assert torch.equal(o.get(p + "gate.weight"), s.get(p + "gate.weight")[kept])
        assert torch.equal(o.get(p + "gate.e_score_correction_bias"), s.get(p + "gate.e_score_correction_bias")[kept])
        for j, e in enumerate(kept):  # FP8 bytes and block scales copied as stored, renumbered densely
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "weight_scale_inv"):
                    a_, b_ = o.get(f"{p}experts.{j}.{proj}.{suffix}"), s.get(f"{p}experts.{e}.{proj}.{suffix}")
                    assert a_.dtype == b_.dtype and torch.equal(a_.view(torch.uint8), b_.view(torch.uint8))
        assert not any(f"{p}experts.{j}." in n for n in o.layer_names(i) for j in range(8, 16))
    for name in s.names():  # everything that is not a routed expert or router is copied untouched
        if ".experts." not in name and ".gate." not in name:
            assert torch.equal(o.get(name).view(torch.uint8), s.get(name).view(torch.uint8)), name
    assert o.info("model.layers.1.mlp.experts.0.down_proj.weight").dtype == "F8_E4M3"
    # the pruned trunk's stream equals the source's stream with the same experts removed in memory
    kept1 = [k["expert"] for k in by_layer[1]["kept"]]
    want = StreamedModel(str(src)).forward(
        [ids], before_layer=lambda i, layer: i == 1 and prune_moe_module(layer.moe, kept1))[0]
    got = StreamedModel(str(out)).forward([ids])[0]
    assert torch.equal(got, want)


def test_mtp_layer_is_scored_on_the_input_vllm_gives_it(tmp_path):
    """The MTP layer's statistics (frequency: tokens per expert in prune_report.json) are its MoE's routing
    on eh_proj(cat(enorm(embed(t_{i+1})), hnorm(norm(h_i)))), h_i the trunk's last hidden state before the
    final norm (vLLM deepseek_mtp.py: enorm of the embedding first; the final norm applied by the main model).
    The input is computed here from the stored tensors, not by compress/prune/mtp.py."""
    from moepress.compress.prune.mtp import read_decoder_state

    src = write_deepseek_with_mtp(tmp_path)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    prune_checkpoint(src, tmp_path / "pruned", PruneConfig(method="frequency", ratio=0.5), batches=[ids])
    row = {r["layer"]: r for r in json.loads((tmp_path / "pruned" / "prune_report.json").read_text())["layers"]}
    n = MTP_CFG["num_hidden_layers"]
    want = {k["expert"]: k["tokens"] for k in row[n]["kept"] + row[n]["dropped"]}
    sm, ck, p = StreamedModel(str(src)), CheckpointReader(src), f"model.layers.{n}."
    trunk = {}
    sm.forward([ids], after_layer=lambda i, lay, hs: trunk.__setitem__(i, hs[0]))

    def rms(x, name):  # DeepSeek's RMSNorm, eps 1e-6
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * ck.weight(name, torch.float32)

    with torch.no_grad():
        e = torch.nn.functional.embedding(ids[:, 1:], ck.weight(p + "embed_tokens.weight", torch.float32))
        h = rms(trunk[n - 1], "model.norm.weight")[:, :-1]
        x = torch.cat([rms(e, p + "enorm.weight"), rms(h, p + "hnorm.weight")], -1) @ ck.weight(
            p + "eh_proj.weight", torch.float32).T
        layer = sm.build_layer(n, read_decoder_state(sm, n))
        routed = []
        layer.mlp.observers = [type("Obs", (), {"on_route": lambda self, m, x, lg, w, idx: routed.append(idx)})()]
        sm.run_layer(layer, [x])
    got = torch.bincount(torch.cat(routed).reshape(-1), minlength=MTP_CFG["n_routed_experts"]).tolist()
    assert sum(got) == 4 * 47 * MTP_CFG["num_experts_per_tok"]
    assert got == [want[e] for e in range(MTP_CFG["n_routed_experts"])]


# ---- sequential: layer i+1's statistics gathered on the pruned layers 0..i -------------------------

def test_sequential_statistics_come_from_the_pruned_prefix(tmp_path):
    src = make_random_checkpoint("qwen3_moe", tmp_path / "m", num_experts=16, num_experts_per_tok=2)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    reports = {}
    for seq in (False, True):
        out = tmp_path / f"seq{seq}"
        prune_checkpoint(src, out, PruneConfig(method="frequency", ratio=0.5, sequential=seq), batches=[ids])
        reports[seq] = {r["layer"]: r for r in json.loads((out / "prune_report.json").read_text())["layers"]}

    def counts(rep):
        return {k["expert"]: k["tokens"] for k in rep["kept"] + rep["dropped"]}

    def layer1_counts(prefix_ckpt):
        stats = RoutingStats()
        hs = StreamedModel(str(prefix_ckpt)).embed([ids])
        hs = StreamedModel(str(prefix_ckpt)).run_layer(StreamedModel(str(prefix_ckpt)).load_layer(0), hs)
        layer1 = StreamedModel(str(src)).load_layer(1)  # the unpruned layer 1 sees the (pruned) prefix
        stats.attach(1, layer1)
        StreamedModel(str(src)).run_layer(layer1, hs)
        return dict(enumerate(stats.layers[1].counts.tolist()))

    assert counts(reports[True][1]) == layer1_counts(tmp_path / "seqTrue")
    assert counts(reports[False][1]) == layer1_counts(src)
    assert counts(reports[True][1]) != counts(reports[False][1])
    assert counts(reports[True][0]) == counts(reports[False][0])


def test_methods_registry_and_reroute_report(tmp_path):
    assert {"frequency", "ean", "reap", "reroute"} <= set(METHODS)
    src = make_random_checkpoint("mixtral", tmp_path / "m", num_local_experts=8)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="reroute", keep=4, protect=((1, 3),)), batches=[ids])
    rep = json.loads((out / "prune_report.json").read_text())
    for lr in rep["layers"]:
        assert len(lr["kept"]) == 4 and len(lr["dropped"]) == 4 and len(lr["drop_order"]) == 4
        assert 0 <= lr["post_moe_state_rel_error"] < 1
        assert abs(sum(k["share"] for k in lr["kept"] + lr["dropped"]) - 1) < 1e-4
    assert any(k["expert"] == 3 and k.get("protected") for k in rep["layers"][1]["kept"])
    man = json.loads((out / "moepress-manifest.json").read_text())
    assert man["stage"] == "prune" and man["config"]["keep"] == 4 and "prune_report.json" in man["files"]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_route_recorder_keeps_what_the_decoder_layer_outputs_at_the_picked_tokens(tmp_path, family):
    """The search's post-block state (RouteRecorder.attach: residual stream + the MoE block's whole output) is
    the decoder layer's own output hidden state at the picked tokens, bit for bit, across forwards whose
    token counts differ (the picks cross the batch boundary)."""
    from moepress.compress.prune import RouteRecorder

    ckpt = make_random_checkpoint(family, tmp_path / "m")
    sm = StreamedModel(str(ckpt))
    layer = sm.load_layer(sm.adapter.moe_layers()[0])
    g = torch.Generator().manual_seed(3)
    H = sm.adapter.hidden_size
    hs = [torch.randn(2, 9, H, generator=g), torch.randn(3, 7, H, generator=g)]
    rec = RouteRecorder(2 * 9 + 3 * 7, 20, 0)
    remove = rec.attach(layer)
    with torch.no_grad():
        outs = sm.run_layer(layer, hs)
    remove()
    want = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])[rec.pick]
    assert rec.pick[:18].any() and rec.pick[18:].any()
    assert torch.equal(rec.states(), want.float())


def _reroute_case(tmp_path, family, overrides, bias_scale=None):
    """A MoE layer with 600 random tokens recorded through it and a residual stream, and the brute-force
    post-block error of any kept set: every expert's output for every token, each token fully routed
    again over the kept experts. ``bias_scale``: DeepSeek's correction bias replaced by one of that size
    (the synthetic's is ~0.03, too small to move many tokens)."""
    from moepress.compress.prune import LayerEvidence, RouteRecorder

    ckpt = make_random_checkpoint(family, tmp_path / "m", **overrides)
    sm = StreamedModel(str(ckpt))
    i = sm.adapter.moe_layers()[0]
    moe = sm.load_layer(i).moe
    r, bias = sm.adapter.routing(), moe.gate.e_score_correction_bias
    g = torch.Generator().manual_seed(2)
    if bias_scale is not None:
        bias.copy_(torch.randn(bias.shape, generator=g) * bias_scale)
    x = torch.randn(600, sm.adapter.hidden_size, generator=g)
    rec = RouteRecorder(600, 600, 0)
    moe.observers = [rec]
    with torch.no_grad():
        block = moe(x)
    moe.observers = []
    # the residual stream the block's output is added to (as RouteRecorder.attach records it)
    h = torch.randn(600, sm.adapter.hidden_size, generator=g) * torch.rand(600, 1, generator=g) * 3
    rec.state = [h + block]
    with torch.no_grad():
        f = torch.stack([ex(x) for ex in moe.experts], 1)  # [T, E, H]
        logits, w0, i0 = sm.adapter.route(moe, x)

    def out(w, idx):
        return (f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1])) * w[..., None]).sum(1)

    y0 = out(w0.float(), i0)
    base = h + block - y0  # residual + shared experts

    def n(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-12)

    ref = n(base + y0)

    def err(keep):
        return float(((ref - n(base + out(*route_masked(logits, keep, r, bias)))).double() ** 2).sum())

    return sm, LayerEvidence(i, moe, None, r, rec), x, err


@pytest.mark.parametrize("family,overrides", [("qwen3_moe", {"num_experts": 12, "num_experts_per_tok": 3}),
                                              ("qwen3_moe", {"norm_topk_prob": False}),
                                              ("deepseek_v3", {"n_routed_experts": 16, "num_experts_per_tok": 3})])
def test_reroute_incremental_search_equals_brute_force_greedy(tmp_path, family, overrides):
    from moepress.compress.prune import RerouteSearch

    sm, ev, _, err = _reroute_case(tmp_path, family, overrides)
    E = ev.moe.num_experts
    b = plan_budget(sm.adapter, PruneConfig(keep=E // 2 if ev.routing["n_group"] == 1 else 8))
    sel = RerouteSearch(ev, b).run()
    keep, order = torch.ones(E, dtype=torch.bool), []
    while int(keep.sum()) > b.keep:
        best = None
        for c in range(E):
            g = group_of(E, b.n_group)
            if not keep[c] or int(keep[g == g[c]].sum()) <= b.keep_per_group:
                continue
            k2 = keep.clone()
            k2[c] = False
            e = err(k2)
            if best is None or e < best[0] - 1e-9:
                best = (e, c)
        order.append(best[1])
        keep[best[1]] = False
    assert sel.extra["drop_order"] == order
    assert sel.kept == keep.nonzero(as_tuple=True)[0].tolist()


def test_reroute_incremental_contributions_equal_brute_force_each_step(tmp_path):
    """32 grouped experts (DeepSeek, 4 groups, keep 8): at every step of the search, each eligible expert's
    summed contribution (the error its drop would add, kept up to date incrementally) equals the brute-force
    difference of errors, and the kept experts end evenly spread over the groups (DeepSeek's router reshapes
    the experts into equal groups). Drop order alone is not compared at this size: contributions that are
    zero in exact arithmetic come out ~1e-15, so ties break by rounding."""
    from moepress.compress.prune import RerouteSearch

    sm, ev, _, err = _reroute_case(tmp_path, "deepseek_v3", {"n_routed_experts": 32, "num_experts_per_tok": 4})
    b = plan_budget(sm.adapter, PruneConfig(keep=8))
    S = RerouteSearch(ev, b)
    worst = 0.0
    while int(S.keep.sum()) > b.keep:
        now, delta, ok = err(S.keep), S.contrib.sum(0), S.eligible()
        for c in ok.nonzero(as_tuple=True)[0].tolist():
            k2 = S.keep.clone()
            k2[c] = False
            worst = max(worst, abs(float(delta[c]) - (err(k2) - now)))
        S.drop(int(torch.argmin(delta.masked_fill(~ok, float("inf")))))
    assert worst < 3e-7, worst  # measured 1.6e-7 (float32 expert outputs summed in float64)
    g = group_of(32, b.n_group)
    assert torch.bincount(g[S.keep], minlength=b.n_group).tolist() == [b.keep_per_group] * b.n_group


def test_each_kept_expert_is_refit_on_the_tokens_the_pruned_router_sends_it(tmp_path, monkeypatch):
    """merge's refit: kept expert c is refit on exactly the tokens that the pruned layer (what the writer
    writes: the kept router rows and correction bias) routes to c, in token order, with the weight it gives c
    there, towards the share of the lost output its weight gives it: (unpruned MoE block - pruned MoE block,
    both run as modules) / the pruned weights' sum (2.5, DeepSeek's routed_scaling_factor, not 1). DeepSeek
    with a correction bias large enough to move tokens between experts and groups."""
    import copy

    from moepress.compress.prune import merge as merge_mod

    sm, ev, x, _ = _reroute_case(tmp_path, "deepseek_v3", {"n_routed_experts": 32, "num_experts_per_tok": 4},
                                 bias_scale=0.2)
    kept = [e for e in range(ev.moe.num_experts) if e % 4 < 2]
    seen = {}
    monkeypatch.setattr(merge_mod, "_refit_down", lambda ex, xs, pw, lost: seen.__setitem__(id(ex), (xs, pw, lost)))
    with torch.no_grad():
        merge_mod.refit(ev, kept)
        pruned = prune_moe_module(copy.deepcopy(ev.moe), kept)
        _, w1, i1 = sm.adapter.route(pruned, x)
        share = (ev.moe(x) - pruned(x)).float() / w1.float().sum(1, keepdim=True)
    assert len(seen) >= 4 and abs(float(w1.float().sum(1).mean()) - 2.5) < 1e-4  # the bias favours a few
    for j, c in enumerate(kept):
        hit = (i1 == j).any(1)
        xs, pw, lost = seen.get(id(ev.moe.experts[c]), (x[:0], torch.zeros(0), share[:0]))
        assert torch.equal(xs, x[hit]), (c, xs.shape[0], int(hit.sum()))
        torch.testing.assert_close(pw.float(), (w1 * (i1 == j)).sum(1)[hit].float(), rtol=1e-5, atol=1e-6)
        # measured 5.8e-10 where |share| reaches 4.7e-3 (float32 rounding)
        torch.testing.assert_close(lost.float(), share[hit], rtol=0, atol=1.2e-9)


def test_lookahead_keeps_the_candidate_closest_after_the_next_layer(tmp_path):
    """lookahead: per MoE layer, the reroute or the reap selection, whichever leaves the state
    after the next layer closest to the original model's. The report names the choice with both
    errors; the chosen one has the smaller error; the written experts are the chosen selection; and
    the recorded error is recomputed independently against the original's streamed forward: for the last
    layer (no next layer: its own output) from the written checkpoint, for layer 0 from the original with
    only layer 0 pruned to its chosen experts, after layer 1."""
    assert METHODS["lookahead"].candidates == ("reroute", "reap")
    src = write_synthetic({**QWEN, "num_hidden_layers": 3}, tmp_path / "src")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="lookahead", ratio=0.5), batches=[ids[:2], ids[2:]])
    rep = json.loads((out / "prune_report.json").read_text())
    assert [lr["layer"] for lr in rep["layers"]] == [0, 1, 2]
    for lr in rep["layers"]:
        la = lr["lookahead"]
        assert la["chosen"] in ("reroute", "reap") and la["chosen"] in la["next_state_rel_error"]
        assert la["next_state_rel_error"][la["chosen"]] == min(la["next_state_rel_error"].values())
        assert lr["score"] == METHODS[la["chosen"]].score_name
    # the checkpoint holds the reported experts (router rows of the kept ones, renumbered)
    r_src, r_out = CheckpointReader(src), CheckpointReader(out)
    for lr in rep["layers"]:
        kept = [k["expert"] for k in lr["kept"]]
        g = f"model.layers.{lr['layer']}.mlp.gate.weight"
        assert torch.equal(r_out.get(g), r_src.get(g)[kept])
    states = {}
    for name, d in (("orig", src), ("pruned", out)):
        StreamedModel(str(d)).forward([ids[:2], ids[2:]],
                                      after_layer=lambda i, lay, hs, name=name: states.__setitem__((name, i), hs))
    last = rep["layers"][-1]["lookahead"]

    def n(v):  # the state the next norm reads: v / rms(v), written here, not taken from moepress
        v = v.double()
        return v / v.pow(2).mean(-1, keepdim=True).sqrt()

    def rel(a, b):
        ref, got = n(torch.cat(states[a])), n(torch.cat(states[b]))
        return float((ref - got).pow(2).sum() / ref.pow(2).sum())

    want = rel(("orig", 2), ("pruned", 2))
    assert want > 0 and last["next_state_rel_error"][last["chosen"]] == pytest.approx(want, rel=1e-4)
    # layer 0: its chosen selection alone (layer 1 as it was), judged by the state after layer 1
    first = rep["layers"][0]["lookahead"]
    kept0 = [k["expert"] for k in rep["layers"][0]["kept"]]
    StreamedModel(str(src)).forward(
        [ids[:2], ids[2:]], before_layer=lambda i, lay: prune_moe_module(lay.mlp, kept0) if i == 0 else None,
        after_layer=lambda i, lay, hs: states.__setitem__(("layer 0 pruned", i), hs))
    want = rel(("orig", 1), ("layer 0 pruned", 1))
    assert want > 0 and first["next_state_rel_error"][first["chosen"]] == pytest.approx(want, rel=1e-4)


def test_pruning_a_quantized_checkpoint_renumbers_its_quantization_files(tmp_path):
    """A `moepress quantize` output pruned: moepress_quant.json, hf_quant_config.json and quant_report.json
    are carried with every kept expert under its new index (its format as at its old index in the
    source's layout, by prune_report.json's mapping), dropped experts gone, and every expert of the
    pruned checkpoint is stored as its layout entry says (FP8 where listed, bf16 where not). Some
    experts are left unquantized by a --rule, so an entry renamed wrongly lands on a bf16 expert or
    leaves one out; the pruned checkpoint exports."""
    import fnmatch

    from moepress.compress.quant.fp8 import FP8_DTYPE
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint, read_quant_layout
    from moepress.compress.quantize.config import parse_rules
    from moepress.exporters import ExportConfig, export

    src = write_synthetic(QWEN, tmp_path / "src")
    q = tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format="fp8-block", rules=parse_rules(
        ["model.layers.1.mlp.experts.1[0-5].*=none", "model.layers.*.mlp.experts.[02468].down_proj=none"])))
    p = tmp_path / "p"
    prune_checkpoint(q, p, PruneConfig(method="frequency", keep=8),
                     batches=[torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))])
    before, after = read_quant_layout(q)["modules"], read_quant_layout(p)["modules"]
    rows = json.loads((p / "prune_report.json").read_text())["layers"]
    assert len(rows) == 2
    moved = 0
    for row in rows:
        pre = f"model.layers.{row['layer']}.mlp.experts."
        for k in row["kept"]:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                old, new = f"{pre}{k['expert']}.{proj}", f"{pre}{k['new_index']}.{proj}"
                assert before.get(old) == after.get(new), (old, new)
            moved += k["expert"] != k["new_index"]
    assert moved
    experts_after = [m for m in after if ".experts." in m]
    assert experts_after and all(int(m.split(".")[5]) < 8 for m in experts_after)
    r = CheckpointReader(p)
    for i in range(2):
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                m = f"model.layers.{i}.mlp.experts.{e}.{proj}"
                assert (r.get(m + ".weight").dtype == FP8_DTYPE) == (m in after), m
    shared = read_quant_layout(p)["shared"]
    assert all(g and all(n in after for n in g) for g in shared)
    # hf_quant_config's exclude_modules: exactly the pruned checkpoint's unquantized linears
    exclude = json.loads((p / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    linears = [n[: -len(".weight")] for n in r.names() if n.endswith(".weight") and len(r.info(n).shape) == 2
               and "embed_tokens" not in n]
    for m in linears:
        assert any(fnmatch.fnmatchcase(m, x) for x in exclude) == (m not in after), m
    # its count of quantized linears is the pruned checkpoint's (it kept the source's: 2 layers x 16 experts more)
    fp8 = sum(r.get_dtype(n) == FP8_DTYPE for n in r.names() if n.endswith(".weight"))
    assert json.loads((p / "quant_report.json").read_text())["quantized_linears"] == fp8
    with pytest.raises(MoepressError, match="unquantized beside quantized"):  # the layout is read: mixed experts
        export(p, tmp_path / "e", ExportConfig(format="hf-modelopt"))
    q2, p2 = tmp_path / "q2", tmp_path / "p2"  # every expert quantized: the pruned checkpoint exports
    quantize_checkpoint(src, q2, QuantConfig(format="fp8-dynamic"))  # block FP8: its 64 inputs are refused
    prune_checkpoint(q2, p2, PruneConfig(method="frequency", keep=8),
                     batches=[torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))])
    # (hf-modelopt refuses fp8-dynamic experts: no runtime's fused MoE loads them from it)
    info = export(p2, tmp_path / "e2", ExportConfig(format="compressed-tensors"))
    assert info["quantized_linears"] == 2 * (4 + 8 * 3)


def test_sidecar_renaming_keeps_layout_records_of_kept_experts_only():
    """Layer 1 keeps experts 3 and 9 (-> 0, 1); layer 0 was not pruned. Names of kept experts are renamed
    (with or without a projection after the index), a dropped expert's dict key, list entry, record and
    emptied group go, anything else (layer 0, attention, patterns) stays; token counts are reordered."""
    from moepress.compress.prune.sidecars import expert_renamer, renumber, renumber_expert_rows, rewrite_report_counts

    kept = {1: {9: 1, 3: 0}}
    rename = expert_renamer(get_adapter(QWEN), kept)
    L1, L0 = "model.layers.1.mlp.experts.", "model.layers.0.mlp.experts."
    src = {"modules": {L1 + "9.down_proj": {"format": "a"}, L1 + "4.up_proj": {"format": "b"},
                       L0 + "4.up_proj": {"format": "c"}, "model.layers.1.self_attn.q_proj": {"format": "d"}},
           "shared": [[L1 + "4.gate_proj", L1 + "4.up_proj"], [L1 + "3.gate_proj", L1 + "3.up_proj"]],
           "borrowed": [{"module": L1 + "4", "tokens": 2}, {"module": L1 + "3", "tokens": 5}],
           "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"], "skipped": [L1 + "5.down_proj"],
           "expert_calibration_tokens": {"0": [7] * 16, "1": list(range(16))},
           # records by (layer, expert) index: quant_report's borrowed scales and per-expert rows
           "experts_with_borrowed_scales": [{"layer": 1, "expert": 9, "tokens": 0}, {"layer": 1, "expert": 4},
                                            {"layer": 0, "expert": 4}],
           "experts": {"1": [{"expert": 3, "tokens": 5}, {"expert": 4}, {"expert": 9}], "0": [{"expert": 4}]}}
    out = rewrite_report_counts(renumber_expert_rows(renumber(src, rename), kept), kept)
    assert out == {"modules": {L1 + "1.down_proj": {"format": "a"}, L0 + "4.up_proj": {"format": "c"},
                               "model.layers.1.self_attn.q_proj": {"format": "d"}},
                   "shared": [[L1 + "0.gate_proj", L1 + "0.up_proj"]],
                   "borrowed": [{"module": L1 + "0", "tokens": 5}],
                   "exclude_modules": ["lm_head", "model.layers.*.mlp.gate"], "skipped": [],
                   "expert_calibration_tokens": {"0": [7] * 16, "1": [3, 9]},
                   "experts_with_borrowed_scales": [{"layer": 0, "expert": 4}, {"layer": 1, "expert": 1, "tokens": 0}],
                   "experts": {"1": [{"expert": 0, "tokens": 5}, {"expert": 1}], "0": [{"expert": 4}]}}


def test_quantize_of_a_checkpoint_with_an_mtp_layer_says_it_is_not_written(tmp_path):
    """quantize streams the decoder layers only: DeepSeek-V3's MTP layer (model.layers.N past
    num_hidden_layers) is not written, so the output's config no longer declares it (a runtime looking
    for it would fail), and the report says which layers and why."""
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    src = write_deepseek_with_mtp(tmp_path)
    assert 2 in CheckpointReader(src).layer_indices()
    q = tmp_path / "q"
    quantize_checkpoint(src, q, QuantConfig(format="fp8-block"))
    out = CheckpointReader(q)
    assert out.layer_indices() == [0, 1] and out.config["num_nextn_predict_layers"] == 0
    rep = json.loads((q / "quant_report.json").read_text())["layers_not_written"]
    assert rep["layers"] == [2] and "num_nextn_predict_layers=0" in rep["why"]
    StreamedModel(str(q)).check_weights()
    # nor do the configs name modules of the layer not written
    for f in ("hf_quant_config.json", "config.json"):
        d = json.loads((q / f).read_text())
        qc = d.get("quantization") or d["quantization_config"]
        assert not [m for m in qc["exclude_modules"] if m.startswith("model.layers.2.")], qc["exclude_modules"]


def test_prune_says_which_undeclared_layers_it_does_not_write(tmp_path):
    """A layer stored past num_hidden_layers that the config does not declare (num_nextn_predict_layers=0)
    is read by no runtime and not written; prune_report.json says so instead of dropping it silently."""
    src = write_deepseek_with_mtp(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="frequency", keep=8),
                     batches=[torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))])
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["mtp_layers"] == [] and rep["layers_not_written"]["layers"] == [2]
    assert CheckpointReader(out).layer_indices() == [0, 1]


@pytest.mark.parametrize("residual", [True, False])
def test_reroute_error_from_pair_products_equals_the_error_of_the_outputs(tmp_path, residual):
    """The search's error of any routing, expanded into inner products (||ref - n(b + y)||^2, or without a
    recorded residual ||y0 - y||^2), equals the error evaluated on the cached expert outputs in float64."""
    from moepress.compress.prune import RerouteSearch

    sm, ev, _, _ = _reroute_case(tmp_path, "deepseek_v3", {"n_routed_experts": 16, "num_experts_per_tok": 3})
    if not residual:
        ev.recorder.state = []
    S = RerouteSearch(ev, plan_budget(sm.adapter, PruneConfig(keep=8)))
    g = torch.Generator().manual_seed(5)
    rows = torch.randperm(S.T, generator=g)[:200]
    idx = torch.stack([torch.randperm(16, generator=g)[:3] for _ in range(200)])
    w = torch.rand(200, 3, generator=g) * 2.5
    got = S._err(rows, idx, w)  # computes the pairs it lacks: rows below are cached
    f = S.out.gather(S.out.slot[rows[:, None], idx].reshape(-1)).view(200, 3, -1).double()
    y = (w.double()[..., None] * f).sum(1)
    if residual:
        v = S.base[rows].double() + y
        d = S.ref[rows].double() - v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-12)
    else:
        d = S.y0[rows].double() - y
    want = (d * d).sum(-1)
    # measured 1.2e-9 (errors ~1e-5 from terms ~64: the expansion cancels) and 1.7e-15 without a residual
    torch.testing.assert_close(got, want, rtol=3e-9 if residual else 1e-13, atol=0)


@pytest.mark.parametrize("config,kw,note", [
    ("QWEN", {"keep": 7}, "refuses 7 experts (7 not a multiple of 4); --keep 8 runs there"),
    ("QWEN", {"keep": 4}, "refuses 4 experts (4 not above top_k=4); --keep 8 runs there"),
    ("QWEN", {"keep": 10}, "refuses 10 experts (10 not a multiple of 4); --keep 8 or 12 runs there"),
    ("DSV3", {"keep": 8}, "refuses 8 experts (topk_group x 2 per group = 4 not above top_k=4); --keep 12 runs"),
    ("QWEN", {"keep": 8}, None), ("DSV3", {"keep": 12}, None)])
def test_counts_tensorrt_llms_blackwell_fused_moe_refuses_are_said(config, kw, note):
    """trtllm-gen's routing kernels check num_experts % 4 == 0, num_experts > top_k and top_k < topk_group x experts
    per group (TensorRT-LLM cpp/tensorrt_llm/thop/fp8BlockScaleMoe.cpp): such a count loads everywhere and fails
    at the first forward on a B200; the prune says so, with a count that runs there."""
    said = [d for d in budget(globals()[config], **kw).decisions if "trtllm-gen" in d]
    assert (said[0].split("refuses ", 1)[1].startswith(note.split("refuses ", 1)[1]) if note else not said), said


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-mixtral"])
def test_a_config_with_both_expert_count_keys_gets_both_rewritten(name):
    """transformers 5 reads Qwen3-MoE's and Mixtral's expert count under either key (``attribute_map``), and
    a config saved by one version and edited by another can carry both: the pruned config.json sets every one
    of them, so no reader finds the old count beside the new one."""
    import transformers

    from moepress import models

    config = json.loads((models.path(name) / "config.json").read_text())
    n = config.get("num_local_experts", config.get("num_experts"))
    both = {**config, "num_experts": n, "num_local_experts": n}
    out = get_adapter(both).config_with_experts(n // 2)
    assert out["num_experts"] == out["num_local_experts"] == n // 2
    read = transformers.AutoConfig.for_model(**out)
    assert read.num_local_experts == read.num_experts == n // 2

"""`moepress check`: each block held to its peers (checks/peers.py, checks/local.py).

A fault in one attention block or one expert that every absolute gate passes (a q_proj scale x 2, gate and up
swapped in one expert or in the shared experts) fails the peer-ratio gates; the correct candidate they were
made from passes them; a folded AWQ candidate compares block by block as an unfolded one.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.checks.peers import FLOOR, peer_ratios, relative_error, stored_form
from moepress.compress.moe import ExpertMLP
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

MID = ["--seq-len", "128", "--max-samples", "16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """tiny-mixtral and tiny-deepseek-v3 in fp8-dynamic (no calibration)."""
    out = {}
    for name in ("tiny-mixtral", "tiny-deepseek-v3"):
        q = tmp_path_factory.mktemp("q") / name
        quantize_checkpoint(models.path(name), q, QuantConfig(format="fp8-dynamic"))
        out[name] = q
    return out


def _edited(src, dst, edit):
    """A copy of ``src`` with ``edit(tensors)`` applied to every shard's tensors (in place)."""
    out = shutil.copytree(src, dst)
    every = {}
    shards = {f: load_file(f) for f in sorted(out.glob("*.safetensors"))}
    for sd in shards.values():
        every.update(sd)
    for f, sd in shards.items():
        before = dict(sd)
        edit(sd, every)
        if any(sd[n] is not before[n] for n in sd):
            save_file({n: t.contiguous() for n, t in sd.items()}, f, metadata={"format": "pt"})
    return out


def _swap(prefix: str, a: str, b: str):
    """The tensors of ``prefix + a`` exchanged with those of ``prefix + b`` (weights and scales alike)."""
    def edit(sd, every):
        for n in sd:
            for x, y in ((a, b), (b, a)):
                if n.startswith(prefix + x + "."):
                    sd[n] = every[prefix + y + n[len(prefix + x):]]
    return edit


def _check(cli_run, cand, ref, *extra, data=MID):
    r = cli_run("check", cand, "--reference", models.path(ref), *data, "--quiet", "--json", "--no-record", *extra)
    return r, json.loads(r.stdout)


def test_the_correct_candidates_pass_within_twice_their_peers(cli_run, fp8):
    """The correct fp8-dynamic candidates: every block within 2x its peers' median (measured 1.0-1.4)."""
    for name, q in fp8.items():
        r, res = _check(cli_run, q, name)
        m = res["metrics"]
        assert r.exit_code == 0, r.output
        assert 0.8 < m["max_attention_error_ratio"] < 2 and 0.8 < m["max_expert_error_ratio"] < 2, (name, m)


def test_one_attention_q_scale_doubled_fails_the_attention_and_weight_gates(cli_run, fp8, tmp_path):
    """Layer 1's q_proj weight scale x 2 (a sharper softmax in one layer): on the default data perplexity +1.6%,
    KL 0.018, top-1 0.90, every output gate but the attention ratio passes; its attention block errs 10x the median
    of the layers' on the reference's input, and q_proj's weights far more than FP8 rounds them (checks/weights.py)."""
    def edit(sd, every):
        for n in sd:
            if n.startswith("model.layers.1.self_attn.q_proj.weight_scale"):
                sd[n] = sd[n] * 2
    bad = _edited(fp8["tiny-mixtral"], tmp_path / "q2", edit)
    r, res = _check(cli_run, bad, "tiny-mixtral", data=())
    assert r.exit_code == 1 and res["failed"] == ["max_weight_error_ratio", "max_attention_error_ratio"], r.output
    rows = res["layers"]
    assert rows[1]["weight_module"] == "self_attn.q_proj" and rows[1]["weight_error_ratio"] > 10
    assert max(range(len(rows)), key=lambda i: rows[i]["attention_error_ratio"]) == 1
    assert rows[1]["attention_error_ratio"] > 6 and all(rows[i]["attention_error_ratio"] < 2 for i in (0, 2, 3))
    assert "attention error / median of its peers" in cli_run("check", bad, "--reference", models.path("tiny-mixtral"),
                                                              *MID, "--no-record").stdout


def test_gate_and_up_swapped_in_one_expert_fails_the_expert_ratio_gate(cli_run, fp8, tmp_path):
    """Expert 3 of layer 1 with its gate and up projections exchanged: 0.30 of its output, under the 0.5 expert
    gate (the tiny model's small pre-activations keep SiLU nearly linear), 9.6x its layer's median."""
    bad = _edited(fp8["tiny-mixtral"], tmp_path / "swap",
                  _swap("model.layers.1.block_sparse_moe.experts.3.", "w1", "w3"))
    r, res = _check(cli_run, bad, "tiny-mixtral")
    assert r.exit_code == 1 and res["failed"] == ["max_expert_error_ratio", "max_weight_error_ratio"], r.output
    row = res["layers"][1]
    assert row["ratio_expert"] == 3 and row["expert_error_ratio"] > 6 and row["expert_error"] < 0.5
    assert row["weight_module"].startswith("block_sparse_moe.experts.3.") and row["weight_error_ratio"] > 20


def test_the_shared_experts_are_held_to_the_routed_ones(cli_run, fp8, tmp_path):
    """DeepSeek's shared experts of layer 1 with gate and up exchanged: 0.42 of their output, passed before (no
    gate saw the shared experts); 8.8x the median of the layer's routed experts. Their down projection x 2:
    the expert gate names them. Their weights are held to their own rounding too (checks/weights.py)."""
    q = fp8["tiny-deepseek-v3"]
    bad = _edited(q, tmp_path / "swap", _swap("model.layers.1.mlp.shared_experts.", "gate_proj", "up_proj"))
    r, res = _check(cli_run, bad, "tiny-deepseek-v3")
    assert r.exit_code == 1 and res["failed"] == ["max_expert_error_ratio", "max_weight_error_ratio"], r.output
    assert res["layers"][1]["weight_module"].startswith("mlp.shared_experts.")
    assert res["layers"][1]["ratio_expert"] == "shared" and res["layers"][1]["expert_error_ratio"] > 6

    def down(sd, every):
        for n in sd:
            if n.startswith("model.layers.2.mlp.shared_experts.down_proj.weight_scale"):
                sd[n] = sd[n] * 2
    r, res = _check(cli_run, _edited(q, tmp_path / "down", down), "tiny-deepseek-v3", "--max-ppl-increase", "none")
    assert r.exit_code == 1 and res["failed"] == ["max_expert_error", "max_expert_error_ratio",
                                                  "max_weight_error_ratio"], r.output
    row = res["layers"][2]
    assert row["worst_expert"] == "shared" and row["expert_error"] == pytest.approx(1, rel=0.05)


def test_a_folded_awq_candidate_compares_block_by_block_as_an_unfolded_one(tmp_path):
    """--awq-fold moves the AWQ scales into the norms before the blocks: fed the reference's normed input, a
    folded block would err by the scales; on the reference's input to the layer, through its own norm, each
    block errs as the unfolded candidate's (the same rounding up to the fold)."""
    from moepress.checks import CheckConfig, run_check

    ref = models.path("tiny-mixtral")
    rows = {}
    for fold in (False, True):
        q = tmp_path / f"fold-{fold}"
        quantize_checkpoint(ref, q, QuantConfig(format="int4-awq", awq_fold=fold, num_samples=4, seq_len=64))
        res = run_check(q, ref, CheckConfig(seq_len=64, max_samples=8))
        assert res["passed"], res["failed"]
        rows[fold] = res["layers"]
    for a, b in zip(rows[False], rows[True], strict=True):
        assert b["attention_error"] < 1.5 * a["attention_error"] and b["ffn_error"] < 1.5 * a["ffn_error"], (a, b)
        # the router and the experts get the input the folded norm gives them. Fed the reference's normed input they
        # read overlaps of 0.984-0.994 and expert errors up to 1.10x the unfolded's; measured now: at most 1 of
        # 1024 choices differs (the fold rescales the router's columns in bf16: a near tie flips), 1.04x
        assert 1 - b["routing_overlap"] <= 0.002 and b["expert_error"] < 1.08 * a["expert_error"], (a, b)


def test_peer_ratios_group_by_form_floor_and_count():
    """Each error over the median of its form's; fewer than 3 alike: none, 3: judged; an exact group (median 0)
    reads the floor, so one broken block among exact copies stands out; a NaN error's ratio is NaN; a judged block
    (the shared experts) is held to a group without joining it."""
    errs = [0.1, 0.1, 0.08, 0.3, 0.12, 0.0, 0.0, 0.0, 0.02, 0.5, 0.5]
    forms = ["a"] * 5 + ["x"] * 4 + ["b"] * 2
    ratios, judged = peer_ratios(errs, forms, [(0.22, "a"), (0.1, "b"), (math.nan, "a")])
    assert ratios[:5] == pytest.approx([1.0, 1.0, 0.8, 3.0, 1.2], rel=1e-9)
    assert ratios[5:9] == pytest.approx([0.0, 0.0, 0.0, 0.02 / FLOOR], rel=1e-9) and ratios[9:] == [None, None]
    assert judged[0] == pytest.approx(2.2) and judged[1] is None and math.isnan(judged[2])
    ratios, _ = peer_ratios([0.1, 0.1, 0.4], ["c"] * 3)  # exactly 3 alike: judged (a group of 3 experts)
    assert ratios == pytest.approx([1.0, 1.0, 4.0], rel=1e-9)
    ratios, _ = peer_ratios([0.1, 0.1, math.nan, 0.1], ["a"] * 4)
    assert ratios[:2] == [1.0, 1.0] and math.isnan(ratios[2])
    ratios, _ = peer_ratios([0.1, math.inf, 0.1, 0.1], ["a"] * 4)  # inf over a finite median: inf
    assert ratios[1] == math.inf and ratios[0] == 1.0
    ratios, _ = peer_ratios([0.1, math.inf, math.nan, math.inf], ["a"] * 4)  # mostly broken: the median is inf
    assert ratios[0] == 0.0 and math.isnan(ratios[1]) and math.isnan(ratios[2])


def test_a_blocks_own_rounding_floors_its_median():
    """Exact peers (median 0): a block that errs as its own rounding does (its floor) reads 1, a block erring 3x
    its floor reads 3, a block without a floor reads over FLOOR; a floor under the median changes nothing; NaN
    stays NaN; the judged blocks take their own floors."""
    errs, forms = [0.0] * 6 + [0.1, 0.3, 0.1, math.nan], ["a"] * 10
    floors = [None] * 6 + [0.1, 0.1, None, 0.1]
    ratios, judged = peer_ratios(errs, forms, [(0.2, "a"), (0.2, "a")], floors, [0.2, None])
    assert ratios[5:9] == pytest.approx([0, 1.0, 3.0, 0.1 / FLOOR], rel=1e-9) and math.isnan(ratios[9])
    assert judged == pytest.approx([1.0, 0.2 / FLOOR], rel=1e-9)
    ratios, _ = peer_ratios([0.1, 0.1, 0.1, 0.3], ["a"] * 4, floors=[0.01] * 4)
    assert ratios == pytest.approx([1.0, 1.0, 1.0, 3.0], rel=1e-9)


def test_an_expert_off_by_two_either_way_reads_one_and_a_silenced_one_never_passes():
    """The expert error is |y - y_ref| / min(|y|, |y_ref|): an expert's output x 2 and x 1/2 both read 1.0 (over
    --max-expert-error 0.5; divided by the reference's norm, x 1/2 read 0.5 and passed it), a zeroed one inf, two
    zero outputs 0, a NaN NaN."""
    ref = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(0))
    cand = ref.clone()
    cand[0] *= 2
    cand[1] *= 0.5
    cand[2] = 0
    ref[3] = cand[3] = 0
    cand[4, 0, 0] = math.nan
    err = relative_error(cand - ref, cand, ref).tolist()
    assert err[:4] == pytest.approx([1.0, 1.0, math.inf, 0.0], rel=1e-6) and math.isnan(err[4]) and err[5] == 0


def test_stored_form_tells_formats_apart_not_widths():
    """Two experts of other widths in one dtype are stored alike; in another dtype they are not."""
    a, b = ExpertMLP(16, 8), ExpertMLP(16, 24)
    assert stored_form(a) == stored_form(b)
    assert stored_form(a) != stored_form(ExpertMLP(16, 8).to(torch.bfloat16))


def test_a_ratio_gate_asked_where_no_block_has_peers_is_refused(fp8, tmp_path):
    """Layers 0 and 1's attention kept bf16 by rules, 2 and 3's in FP8: two groups of two, no ratio. The gate given
    explicitly was shown "not measured" and the check passed, even with layer 2's q_proj scale x 2; it is refused
    in one line now. Left at its default, the check runs and a note names the layers no peers covered."""
    from moepress.checks import CheckConfig, run_check
    from moepress.errors import MoepressError

    ref = models.path("tiny-mixtral")
    q = tmp_path / "mixed"
    quantize_checkpoint(ref, q, QuantConfig(format="fp8-dynamic", rules=(("model.layers.0.self_attn.*", "none"),
                                                                          ("model.layers.1.self_attn.*", "none"))))
    small = {"seq_len": 64, "max_samples": 8}
    with pytest.raises(MoepressError, match=r"--max-attention-error-ratio 4.0 .*fewer than 3 layers' attention"):
        run_check(q, ref, CheckConfig(max_attention_error_ratio=4.0, asked=("max_attention_error_ratio",), **small))
    res = run_check(q, ref, CheckConfig(**small))
    assert res["passed"] and "max_attention_error_ratio" not in res["metrics"]
    assert any(n.startswith("attention of layer(s) 0, 1, 2, 3: fewer than 3") for n in res["notes"]), res["notes"]


def test_an_asked_attention_gate_is_refused_where_blocks_cannot_be_run():
    """A candidate that runs whole (ONNX, transformers, an engine) or has other layers cannot be fed the
    reference's input to a layer: the attention gate given explicitly is refused before the check runs."""
    from moepress.checks import CheckConfig
    from moepress.checks.config import refuse_unmeasurable
    from moepress.errors import MoepressError

    cfg = CheckConfig(max_attention_error_ratio=4.0, asked=("max_attention_error_ratio",))
    with pytest.raises(MoepressError, match="--max-attention-error-ratio 4.0 .*whole"):
        refuse_unmeasurable(cfg, "blocks", "whole")
    refuse_unmeasurable(CheckConfig(), "blocks", "whole")  # at its default, not asked: shown not measured


def test_stored_form_of_quantized_experts(fp8):
    """Experts kept as stored (FP8 weight and scale) are alike and unlike the reference's bf16 ones."""
    from moepress.checks import CheckConfig
    from moepress.checks.candidates import open_candidate
    from moepress.compress.stream import StreamedModel

    cand = open_candidate(fp8["tiny-mixtral"], CheckConfig(), None)
    try:
        layer = cand.stream.build_layer(1, cand.stream.read_layer_state(1))
        forms = {stored_form(e) for e in layer.moe.experts}
        assert len(forms) == 1 and any(n == "weight_scale" for _, ts in next(iter(forms)) for n, _ in ts)
    finally:
        cand.close()
    ref = StreamedModel(str(models.path("tiny-mixtral")), keep_stored=True)
    bf16 = stored_form(ref.build_layer(1, ref.read_layer_state(1)).moe.experts[0])
    assert bf16 not in forms

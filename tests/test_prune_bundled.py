"""`moepress prune` on the bundled models (issue #4 acceptance).

- each bundled model pruned 25% loads in transformers and its logits equal moepress's
  streamed forward of the same pruned checkpoint (fp32);
- router surgery is exact: tokens whose chosen experts were all kept (and, with DeepSeek's
  groups, whose routing is unchanged) get the same MoE output from the pruned layer;
- constraint refusals are one line, exit 2, before any calibration work.
"""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from helpers import transformers_logits
from moepress import models
from moepress.calib.data import eval_batches
from moepress.cli import cli
from moepress.compress.prune import DEFAULT_METHOD, route_masked
from moepress.compress.stream import StreamedModel


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(name, *flags) -> (dir, CLI result): the bundled model pruned 25% by the CLI with its default method
    (small calibration set) and ``flags``, made once per module on first use."""
    done = {}

    def get(name, *flags):
        if (name, flags) not in done:
            dst = tmp_path_factory.mktemp("pruned") / name
            r = CliRunner().invoke(cli, ["prune", name, "--ratio", "0.25", "-o", str(dst), "--num-samples", "4",
                                         "--seq-len", "64", "--json", *flags], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            done[(name, flags)] = (dst, json.loads(r.stdout))
        return done[(name, flags)]

    return get


@pytest.fixture(scope="module")
def tf_logits(pruned, tmp_path_factory):
    """Each bundled model's pruned checkpoint run by transformers in one process without moepress."""
    jobs = [(pruned(n)[0], torch.cat(eval_batches(models.path(n), seq_len=64, max_windows=2))) for n in models.BUNDLED]
    outs = transformers_logits(jobs, tmp_path_factory.mktemp("tf"))
    return {n: o["logits"] for n, o in zip(models.BUNDLED, outs, strict=True)}


@pytest.mark.parametrize("name", models.BUNDLED)
def test_pruned_bundled_loads_in_transformers_and_matches_stream(pruned, tf_logits, name):
    dst, res = pruned(name)
    src = models.path(name)
    E = StreamedModel(str(src)).adapter.num_experts
    assert res["kept"] == E - E // 4 and res["method"] == DEFAULT_METHOD == "auto"
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg[StreamedModel(str(src)).adapter.experts_key()] == res["kept"]
    assert (dst / "tokenizer.json").exists() and (dst / "moepress-manifest.json").exists()
    ids = torch.cat(eval_batches(src, seq_len=64, max_windows=2))
    want = tf_logits[name]
    got = StreamedModel(str(dst)).forward([ids])[0]
    diff = (got - want).abs().max().item()
    assert diff <= 2e-5, f"pruned {name}: streamed logits differ from transformers by {diff}"  # measured <= 9.5e-6
    report = json.loads((dst / "prune_report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == StreamedModel(str(src)).adapter.moe_layers()


@pytest.mark.parametrize("name", models.BUNDLED)
def test_router_surgery_is_exact_for_tokens_whose_experts_were_kept(pruned, name):
    """Without folding (which refits kept experts' down projections), a token whose experts all stay gets
    exactly the original MoE output."""
    dst, _ = pruned(name, "--no-merge")
    src_sm, dst_sm = StreamedModel(str(models.path(name))), StreamedModel(str(dst))
    a, routing = src_sm.adapter, src_sm.adapter.routing()
    report = {r["layer"]: r for r in json.loads((dst / "prune_report.json").read_text())["layers"]}
    i = a.moe_layers()[-1]
    kept = torch.tensor([k["expert"] for k in report[i]["kept"]])
    orig, new = src_sm.load_layer(i).moe, dst_sm.load_layer(i).moe
    # MoE inputs as the model sees them: post-attention-norm hidden states of held-out text
    hs = src_sm.embed(eval_batches(models.path(name), seq_len=128, max_windows=8))
    for _, layer in src_sm.layers(0, i):
        hs = src_sm.run_layer(layer, hs)
    x = torch.cat([src_sm.load_layer(i).post_attention_layernorm(h).reshape(-1, a.hidden_size) for h in hs])
    logits, _, i0 = a.route(orig, x)
    _, _, i1 = a.route(new, x)
    all_kept = torch.isin(i0, kept).all(1)
    same = all_kept & (i0.sort(1)[0] == kept[i1].sort(1)[0]).all(1)
    with torch.no_grad():
        y0, y1 = orig(x), new(x)
    if routing["scoring"] == "softmax":
        assert routing["renormalize"]  # the bundled Qwen3 / Mixtral renormalise the top-k
        assert torch.equal(same, all_kept)  # softmax top-k over fewer experts: same choice whenever all were kept
    else:  # DeepSeek: a dropped expert may have made its group's score; only then can routing change
        assert same.sum() >= 0.8 * all_kept.sum()
    assert all_kept.sum() >= 0.3 * x.shape[0], "too few tokens kept all their experts for a meaningful test"
    torch.testing.assert_close(y1[same], y0[same], rtol=1e-6, atol=5e-7)  # measured max 2.4e-7 abs
    # and the search's routing simulation is the pruned router, for every token
    keep = torch.zeros(orig.num_experts, dtype=torch.bool)
    keep[kept] = True
    _, i_sim = route_masked(logits, keep, routing, orig.gate.e_score_correction_bias)
    assert torch.equal(i_sim.sort(1)[0], kept[i1].sort(1)[0])


@pytest.mark.parametrize("args,needles", [
    (["tiny-deepseek-v3", "--keep", "10"], ["--keep 10", "multiple of 4", "n_group=4"]),
    (["tiny-deepseek-v3", "--keep", "4"], ["--keep 4", "1 per group"]),
    (["tiny-mixtral", "--ratio", "0.8"], ["--ratio 0.8", "fewer than top_k=2", "--keep 2"]),
    (["tiny-qwen3-moe", "--keep", "12", "--ep-size", "8"], ["--keep 12", "multiple of 8", "nearest valid: 8"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--keep", "8"], ["--ratio / --keep"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--method", "magic"], ["--method magic", "reap"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--protect", "9:1"], ["--protect 9:1", "not an MoE layer"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--protect", "1-2"], ["--protect '1-2'"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--protect", "1:16"], ["--protect 1:16", "expert 16 does not exist"]),
    (["tiny-qwen3-moe", "--ratio", "0.25", "--ep-size", "32"], ["--ratio 0.25", "multiple of 32", "--ep-size 32",
                                                                 "no kept count is valid"]),
    (["tiny-qwen3-moe", "--ratio", "0.75", "--ep-size", "8"], ["--ratio 0.75", "rounded down to a multiple of 8",
                                                                "largest valid ratio is 0.5"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--ep-size", "0"], ["--ep-size 0", "positive"]),
    (["tiny-qwen3-moe", "--ratio", "-0.1"], ["--ratio -0.1", "(0, 1)"]),
    (["tiny-qwen3-moe", "--keep", "0"], ["--keep 0", "1..15"]),
    (["tiny-qwen3-moe", "--ratio", "0.5", "--search-tokens", "0"], ["--search-tokens 0"]),
])
def test_cli_refusals_are_one_line(cli_run, tmp_path, args, needles):
    r = cli_run("prune", *args, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moepress: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_shows_per_layer_progress_with_eta(cli_run, tmp_path):
    out = tmp_path / "out"
    r = cli_run("prune", "tiny-mixtral", "--ratio", "0.25", "--method", "frequency", "--num-samples", "2",
                "--seq-len", "32", "-o", out)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("prune: layer")]
    assert len(lines) == 4, r.stderr  # one per decoder layer
    for n, ln in enumerate(lines, 1):
        assert re.match(rf"prune: layer {n}/4 \(\d+%\) elapsed \d+:\d\d ETA \d+:\d\d  layer {n - 1}: kept 6/8", ln), ln
    assert "kept 6 of 8 routed experts in 4 MoE layers (frequency)" in r.stdout
    man = json.loads((out / "moepress-manifest.json").read_text())
    assert man["stage"] == "prune" and man["config"]["method"] == "frequency"
    assert {"config.json", "prune_report.json", "tokenizer.json"} <= set(man["files"])

"""``moepress prune --method merge``: the dropped experts folded into the kept ones.

- the CLI lists it; on a bundled model the output keeps one expert count, router rows and correction
  bias are the kept experts' own rows, gate/up projections are stored bytes of the kept experts, the
  down projections the refit rewrote differ, and transformers loads it with the stream's logits;
- the fold does what it is for: on the calibration tokens, the merged model's loss is below the plain
  REAP pruning of the same kept experts;
- a block-FP8 (DeepSeek ``weight_scale_inv``) input stays block FP8: the rewritten down projections are
  re-quantized by the fp8-block quantizer (the report says so), the others copied as stored;
- an expert stored in a form no calibration-free registered format writes is refused in one line.
"""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import transformers_logits
from moepress import models
from moepress.calib.data import calibration_batches, eval_batches
from moepress.calib.metrics import perplexity
from moepress.compress.prune import PruneConfig, encode_like, prune_checkpoint
from moepress.compress.quant import fp8
from moepress.compress.stream import StreamedModel
from moepress.compress.synthetic import write_synthetic
from moepress.errors import MoepressError


def _tensors(d):
    if not (d / "model.safetensors.index.json").exists():
        with safe_open(str(d / "model.safetensors"), "pt") as fh:
            return {n: fh.get_tensor(n) for n in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, f in idx.items():
        with safe_open(str(d / f), "pt") as fh:
            out[name] = fh.get_tensor(name)
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """tiny-deepseek-v3 pruned 50% by merge (CLI) and by reap (API) on the same calibration tokens."""
    from click.testing import CliRunner

    from moepress.cli import cli

    src = models.path("tiny-deepseek-v3")
    base = tmp_path_factory.mktemp("merge")
    r = CliRunner().invoke(cli, ["prune", "tiny-deepseek-v3", "--method", "merge", "--ratio", "0.5", "-o",
                                 str(base / "merge"), "--num-samples", "8", "--seq-len", "64", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    batches = calibration_batches(src, num_samples=8, seq_len=64)
    prune_checkpoint(src, base / "reap", PruneConfig(method="reap", ratio=0.5, num_samples=8, seq_len=64),
                     batches=batches)
    return src, base / "merge", base / "reap", batches


def test_cli_lists_merge(cli_run):
    r = cli_run("prune", "--help")
    assert "merge" in r.output


def test_merge_keeps_router_rows_and_bias_of_kept_experts(deepseek):
    src, out, _, _ = deepseek
    report = json.loads((out / "prune_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_routed_experts"] == report["kept"] == 16
    a, b = _tensors(src), _tensors(out)
    rewritten = 0
    for row in report["layers"]:
        i, kept = row["layer"], [k["expert"] for k in row["kept"]]
        p = f"model.layers.{i}.mlp."
        assert torch.equal(b[p + "gate.weight"], a[p + "gate.weight"][kept])
        assert torch.equal(b[p + "gate.e_score_correction_bias"], a[p + "gate.e_score_correction_bias"][kept])
        assert row["merged"] and all(m["stored_as"] == "bfloat16" for m in row["merged"].values())
        for j, e in enumerate(kept):
            for lin in ("gate_proj", "up_proj"):
                assert torch.equal(b[f"{p}experts.{j}.{lin}.weight"], a[f"{p}experts.{e}.{lin}.weight"])
            same = torch.equal(b[f"{p}experts.{j}.down_proj.weight"], a[f"{p}experts.{e}.down_proj.weight"])
            assert same == (str(e) not in row["merged"])
            rewritten += not same
        dropped = {d["expert"] for d in row["dropped"]}
        for c, m in row["merged"].items():  # the kept expert itself, then only dropped ones; shares of 1
            assert m["members"][0] == int(c) and set(m["members"][1:]) <= dropped, (c, m, dropped)
            assert sum(m["mass_share"]) == pytest.approx(1.0, abs=1e-5)
    assert rewritten > 0


def test_merged_checkpoint_loads_in_transformers(deepseek, tmp_path):
    src, out, _, _ = deepseek
    ids = torch.cat(eval_batches(src, seq_len=64, max_windows=2))
    want = transformers_logits([(out, ids)], tmp_path)[0]["logits"]  # a process without moepress
    got = StreamedModel(str(out)).forward([ids])[0]
    assert (got - want).abs().max().item() <= 1.5e-5  # measured 6.2e-6


def test_merge_fits_calibration_better_than_pruning_the_same_experts(deepseek):
    src, merged, reaped, batches = deepseek
    km = [[k["expert"] for k in r["kept"]] for r in json.loads((merged / "prune_report.json").read_text())["layers"]]
    kr = [[k["expert"] for k in r["kept"]] for r in json.loads((reaped / "prune_report.json").read_text())["layers"]]
    assert km == kr
    pm = perplexity(StreamedModel(str(merged)).forward(batches), batches)
    pr = perplexity(StreamedModel(str(reaped)).forward(batches), batches)
    assert pm < pr, (pm, pr)


DS_CFG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 256,
          "hidden_size": 160, "intermediate_size": 192, "moe_intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1,
          "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
          "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
          "q_lora_rank": None, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
          "v_head_dim": 16, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def test_block_fp8_input_stays_block_fp8(tmp_path):
    src = write_synthetic(DS_CFG, tmp_path / "fp8", block_fp8=True)
    out = tmp_path / "out"
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]
    prune_checkpoint(src, out, PruneConfig(method="merge", keep=4, num_samples=8, seq_len=32), batches=batches)
    row = json.loads((out / "prune_report.json").read_text())["layers"][0]
    assert row["merged"] and all(m["stored_as"] == "fp8-block" for m in row["merged"].values())
    a, b = _tensors(src), _tensors(out)
    kept = [k["expert"] for k in row["kept"]]
    p = "model.layers.1.mlp.experts."
    for j, e in enumerate(kept):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            for suf in ("weight", "weight_scale_inv"):
                assert b[f"{p}{j}.{lin}.{suf}"].dtype == a[f"{p}{e}.{lin}.{suf}"].dtype
                assert b[f"{p}{j}.{lin}.{suf}"].shape == a[f"{p}{e}.{lin}.{suf}"].shape
        u8 = torch.uint8
        assert torch.equal(b[f"{p}{j}.gate_proj.weight"].view(u8), a[f"{p}{e}.gate_proj.weight"].view(u8))
        if str(e) in row["merged"]:  # rewritten: its FP8 bytes are the fp8-block quantizer's of some float weight
            q, s = b[f"{p}{j}.down_proj.weight"], b[f"{p}{j}.down_proj.weight_scale_inv"]
            assert not torch.equal(q.view(u8), a[f"{p}{e}.down_proj.weight"].view(u8))
            w = fp8.dequantize_block(q, s)
            q2, s2 = fp8.quantize_block(w)
            assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    logits = StreamedModel(str(out)).forward(batches[:1])[0]
    assert torch.isfinite(logits).all()


def test_auto_keeps_quantized_experts_bytes_and_merge_flag_refits_them(tmp_path):
    """auto folds only experts stored in float: a block-FP8 input keeps every kept expert's stored bytes;
    --merge asks for the fold there too (re-quantized, as the merge method does)."""
    src = write_synthetic(DS_CFG, tmp_path / "fp8", block_fp8=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]
    for merge in (None, True):
        out = tmp_path / f"auto-{merge}"
        prune_checkpoint(src, out, PruneConfig(keep=4, merge=merge), batches=batches)
        rep = json.loads((out / "prune_report.json").read_text())
        row = rep["layers"][0]
        assert rep["merge"]["rule"] == ("float" if merge is None else "always")
        a, b = _tensors(src), _tensors(out)
        p = "model.layers.1.mlp.experts."
        same = [torch.equal(b[f"{p}{j}.down_proj.weight"].view(torch.uint8), a[f"{p}{e}.down_proj.weight"].view(
            torch.uint8)) for j, e in enumerate(k["expert"] for k in row["kept"])]
        if merge is None:
            assert rep["merge"]["merged_layers"] == [] and "merged" not in row and all(same)
        else:
            assert rep["merge"]["merged_layers"] == [1] and row["merged"] and not all(same)


def test_merge_flag_with_lookahead_is_refused_in_one_line(tmp_path):
    with pytest.raises(MoepressError) as e:
        prune_checkpoint(models.resolve("tiny-qwen3-moe"), tmp_path / "o", PruneConfig(method="lookahead", ratio=0.5,
                         merge=True), batches=[torch.zeros(1, 8, dtype=torch.long)])
    assert "\n" not in str(e.value) and "--merge" in str(e.value)


class _Stub:
    """A reader holding one expert linear as int8 values + a scale, a layout no registered format declares."""

    path, config, _moepress_quant = "stub", {}, None

    def __init__(self):
        self.t = {"e.weight": torch.zeros(4, 16, dtype=torch.int8), "e.weight_scale": torch.ones(4, 1)}

    def __contains__(self, n):
        return n in self.t

    def get(self, n):
        return self.t[n]

    def get_dtype(self, n):
        return self.t[n].dtype


def test_unwritable_expert_format_is_refused_in_one_line():
    r = _Stub()
    with pytest.raises(MoepressError) as e:
        encode_like(r, "e", torch.zeros(4, 16), list(r.t))
    assert "\n" not in str(e.value) and "weight_scale" in str(e.value) and "--method merge" in str(e.value)


def test_ct_int4_encoding_equals_compressed_tensors():
    """The merged expert's pack-quantized bytes are compressed-tensors' own: scales by its minmax
    ``calculate_qparams``, values by its ``quantize``, words by its ``pack_to_int32`` (group 32, bf16
    scales as Kimi ships; 96 in-features: three groups, not a multiple of 128)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from moepress.compress.prune.merge import encode_ct_int4

    out_f, in_f, group = 24, 96, 32
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    class R:
        path = "stub"
        t = {"e.weight_packed": torch.zeros(out_f, in_f // 8, dtype=torch.int32),
             "e.weight_scale": torch.zeros(out_f, in_f // group, dtype=torch.bfloat16),
             "e.weight_shape": torch.tensor([out_f, in_f])}

        def get(self, n):
            return self.t[n]

    got = encode_ct_int4(R(), "e", w.float(), sorted(R.t))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    wg = w.view(out_f, in_f // group, group)
    scale, zp = calculate_qparams(wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0), args)
    q = quantize(w, scale, zp, args, dtype=torch.int8)
    assert torch.equal(got["e.weight_scale"], scale)
    assert torch.equal(got["e.weight_packed"], pack_to_int32(q, 4))


def test_ct_int4_input_stays_pack_quantized(tmp_path):
    src = models.path("tiny-kimi-k2-int4")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 200, (4, 32), generator=g) for _ in range(2)]
    out = tmp_path / "kimi"
    prune_checkpoint(src, out, PruneConfig(method="merge", ratio=0.5, num_samples=8, seq_len=32), batches=batches)
    row = json.loads((out / "prune_report.json").read_text())["layers"][0]
    assert row["merged"] and all("pack-quantized" in m["stored_as"] for m in row["merged"].values())
    a, b = _tensors(src), _tensors(out)
    p = f"model.layers.{row['layer']}.mlp.experts."
    for j, e in enumerate(k["expert"] for k in row["kept"]):
        for lin in ("gate_proj", "up_proj", "down_proj"):
            for suf in ("weight_packed", "weight_scale", "weight_shape"):
                x, y = a[f"{p}{e}.{lin}.{suf}"], b[f"{p}{j}.{lin}.{suf}"]
                assert x.dtype == y.dtype and x.shape == y.shape
                # a kept expert no dropped expert's mass went to keeps its codes (its refit only rounds)
                if lin != "down_proj" or row["merged"].get(str(e), {}).get("members", [e]) == [e]:
                    assert torch.equal(x, y)
    assert torch.isfinite(StreamedModel(str(out)).forward(batches[:1])[0]).all()


@pytest.mark.parametrize("kw", [dict(method="merge"), dict(method="frequency", merge=True)])
def test_merge_of_experts_it_cannot_write_back_is_refused_before_any_layer(kw):
    """MXFP4 experts (compressed-tensors mxfp4-pack-quantized): a merged expert could not be stored as its
    input was, so the run is refused in one line when it is set up (PruneStage), not after a whole pass."""
    from moepress import models
    from moepress.compress.prune.stage import PruneStage

    with pytest.raises(MoepressError, match=r"experts\.0\.down_proj' is stored as weight_packed.*without merging"):
        PruneStage(models.path("tiny-qwen3-moe-mxfp4"), PruneConfig(ratio=0.5, **kw))


def test_merge_of_calibrated_down_projections_is_refused_before_any_layer(tmp_path):
    """int4-gptq down projections (a ``moepress quantize`` output): a merged one could only be re-rounded to nearest,
    without the calibration that made its codes, and would still be labelled int4-gptq; refused in one line when the
    prune is set up, naming the tensor and its format."""
    from moepress.compress.prune.stage import PruneStage
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    g = torch.Generator().manual_seed(0)
    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="int4-gptq"),
                        batches=[torch.randint(0, 200, (2, 32), generator=g)])
    with pytest.raises(MoepressError, match=r"experts\.0\.w2' is stored as .*its calibrated format int4-gptq"):
        PruneStage(q, PruneConfig(ratio=0.5, method="merge"))


def test_merge_of_calibrated_gate_up_with_float_down_rewrites_only_down(tmp_path):
    """A ``moepress quantize`` output whose experts' gate/up projections are int4-gptq (calibrated: no merge
    could re-quantize them) and whose down projections stayed bf16 merges: a fold rewrites only down
    projections (written in bf16), and every kept expert's gate/up tensors are the input's bytes."""
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 200, (4, 32), generator=g) for _ in range(2)]
    q, out = tmp_path / "q", tmp_path / "p"
    quantize_checkpoint(models.path("tiny-qwen3-moe"), q, QuantConfig(
        format="int4-gptq", group_size=32, rules=(("mlp.experts.*.down_proj", "none"),)), batches=batches)
    prune_checkpoint(q, out, PruneConfig(method="merge", ratio=0.5, num_samples=8, seq_len=32), batches=batches)
    row = json.loads((out / "prune_report.json").read_text())["layers"][0]
    assert row["merged"] and {m["stored_as"] for m in row["merged"].values()} == {"bfloat16"}
    a, b = _tensors(q), _tensors(out)
    p = f"model.layers.{row['layer']}.mlp.experts."
    for j, e in enumerate(k["expert"] for k in row["kept"]):
        for lin in ("gate_proj", "up_proj"):
            names = [n for n in a if n.startswith(f"{p}{e}.{lin}.")]
            assert len(names) > 1  # quantized: codes and scales
            for n in names:
                assert torch.equal(a[n], b[n.replace(f"{p}{e}.", f"{p}{j}.")])
        assert b[f"{p}{j}.down_proj.weight"].dtype == torch.bfloat16


def test_ct_int4_encoding_keeps_the_codes_of_an_unchanged_expert():
    """A kept expert the refit left alone is written back with its own bytes: re-encoding Kimi's stored
    grid with fresh amax / 7.5 scales re-rounded every group holding a -8 code (~7% change)."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.prune.merge import encode_ct_int4

    r = CheckpointReader(models.path("tiny-kimi-k2-int4"))
    names = [n for n in r.names() if n.endswith(".down_proj.weight_packed")]
    assert names
    for n in names[:8]:
        base = n.removesuffix(".weight_packed")
        stored = sorted(m for m in r.names() if m.startswith(base + "."))
        got = encode_ct_int4(r, base, r.weight(base + ".weight", torch.float32), stored)
        assert torch.equal(got[n], r.get(n)) and torch.equal(got[base + ".weight_scale"], r.get(base + ".weight_scale"))


def test_ct_int4_encoding_of_a_grown_group_takes_a_fresh_scale():
    """A refit that grew a group past what its stored scale codes (-8..7) is re-encoded at a fresh scale, not
    clipped at the old one: decoded by compressed-tensors' own unpack_from_int32 and dequantize, every weight
    is within 0.6 of its group's step of the refit weight (half a step; the library's amax / 7.5 scale puts a
    group's positive amax at 7.5, clamped to 7; the bf16 scale and weight round: measured 0.533). Clipped at
    the old scale, column 0 would be off by several steps."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.prune.merge import encode_ct_int4

    r = CheckpointReader(models.path("tiny-kimi-k2-int4"))
    n = next(n for n in r.names() if n.endswith(".down_proj.weight_packed"))
    base = n.removesuffix(".weight_packed")
    w = r.weight(base + ".weight", torch.float32).clone()
    w[:, 0] *= 3.0  # column 0's groups now reach past their stored scale's codes
    got = encode_ct_int4(r, base, w, sorted(m for m in r.names() if m.startswith(base + ".")))
    s = got[base + ".weight_scale"]
    group = w.shape[1] // s.shape[1]
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    q = unpack_from_int32(got[n], 4, torch.Size(w.shape))
    deq = dequantize(q, s, None, args).float()
    step = s.float().repeat_interleave(args.group_size, dim=1)
    assert not torch.equal(s, r.get(base + ".weight_scale"))
    assert ((deq - w).abs() <= 0.6 * step).all(), float(((deq - w).abs() / step).max())


@pytest.mark.parametrize("n,inter", [(40, 7), (9, 30)], ids=["more-tokens-than-width", "fewer-tokens-than-width"])
def test_refit_is_the_ridge_least_squares_solution_it_describes(n, inter):
    """A kept expert's new down projection D' minimises sum_t pw_t^2 ||D' h_t - (D h_t + lost_t)||^2
    + lam ||D' - D||^2, lam = 0.01 x mean(diag(sum_t pw_t^2 h_t h_t^T)): solved here as a stacked least-squares
    problem (torch.linalg.lstsq), not through the refit's normal equations, with more tokens than the
    expert's width (solved through its Gram matrix) and with fewer (through its tokens' kernel)."""
    from moepress.compress.moe import ExpertMLP
    from moepress.compress.prune.merge import _hidden, _refit_down

    torch.manual_seed(0)
    H = 12
    ex = ExpertMLP(H, inter)  # float32 weights, as the stream's layers hold them
    x, lost = torch.randn(n, H), torch.randn(n, H, dtype=torch.float64) * 0.3
    pw = torch.rand(n, dtype=torch.float64) * 0.9 + 0.05  # not normalised: the weighting matters
    D = ex.linears()[2].weight.detach().double()
    h = _hidden(ex, x).detach().double()  # the expert's own intermediate activations, the refit's regressors
    lam = 0.01 * float((h * pw[:, None] ** 2).T.mul(h.T).sum(1).mean())
    A = torch.cat([pw[:, None] * h, lam ** 0.5 * torch.eye(inter, dtype=torch.float64)])
    B = torch.cat([pw[:, None] * (h @ D.T + lost), lam ** 0.5 * D.T])
    want = torch.linalg.lstsq(A, B).solution.T
    with torch.no_grad():  # as refit calls it
        _refit_down(ex, x, pw.float(), lost.float())
    got = ex.linears()[2].weight.detach().double()
    assert torch.allclose(got, want, rtol=1e-6, atol=2e-7), (got - want).abs().max()  # measured 9.7e-8 abs


def test_sequential_merge_of_a_quantized_input_gathers_statistics_on_the_layers_it_wrote(tmp_path):
    """--sequential: layer i+1's statistics are gathered on the already pruned layers 0..i, as written. A merged
    Kimi INT4 expert is written re-quantized (pack-quantized INT4), so the next layer's statistics must come from
    those INT4 weights, not from the float refit before re-quantization: recomputed here by streaming the
    written output's layers 0..i and then the source's layer i+1 (REAP scores of every expert)."""
    from moepress.calib.observers import RoutingStats

    src = models.path("tiny-kimi-k2-int4")
    ids = [torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))]
    out = tmp_path / "kimi-seq"
    prune_checkpoint(src, out, PruneConfig(method="merge", ratio=0.25, sequential=True), batches=ids)
    rows = {r["layer"]: r for r in json.loads((out / "prune_report.json").read_text())["layers"]}
    sm_out, sm_src = StreamedModel(str(out)), StreamedModel(str(src))
    hs = sm_out.embed(ids)
    for _, layer in sm_out.layers(0, 2):  # dense layer 0 and the merged, re-quantized layer 1, as written
        hs = sm_out.run_layer(layer, hs)
    stats = RoutingStats()
    for i, layer in sm_src.layers(2, 3):  # the source's layer 2 on that state
        stats.attach(i, layer)
        sm_src.run_layer(layer, hs)
    want = stats.layers[2].reap
    got = torch.zeros_like(want)
    for r in rows[2]["kept"] + rows[2]["dropped"]:
        got[r["expert"]] = r["score"]
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got - want).abs().max()  # measured 0.0


def test_fold_of_an_expert_fed_only_by_group_moves_does_not_crash(tmp_path, cli_run):
    """Group-limited routing (tiny-deepseek-v3: 4 groups, 2 compete): dropping experts can move a token from
    one kept expert to another kept expert of another group. A kept expert whose every post-prune token came
    that way has no own routing mass and no dropped expert's mass: it is still refit and must be listed alone
    (README: "an expert listed alone can still be refit") with its own share 1.0, not crash the fold with a
    ZeroDivisionError (a traceback, exit 1) - also under the default `auto`."""
    out = tmp_path / "p"
    r = cli_run("prune", "tiny-deepseek-v3", "--method", "merge", "--ratio", "0.5", "--num-samples", "2",
                "--seq-len", "16", "--seed", "4", "-o", out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    for layer in rep["layers"]:
        for m in layer["merged"].values():
            assert sum(m["mass_share"]) == pytest.approx(1.0, abs=1e-5)


def test_refit_hands_each_kept_expert_the_lost_output_over_its_tokens_summed_weights(tmp_path, monkeypatch):
    """DeepSeek's routing weights sum to routed_scaling_factor (2.5), not 1: the lost routed output a kept expert
    absorbs is divided by the token's summed pruned weights (merge.refit's docstring), so the kept experts restore
    it once between them, not 2.5 times (at 2.5x the merged model's KL doubled). Recomputed here from the experts'
    own forwards, the family's router and route_masked, not through the merge's routed outputs."""
    from helpers import make_random_checkpoint
    from moepress.compress.prune import LayerEvidence, RouteRecorder, merge
    from moepress.compress.prune.routing import route_masked

    ckpt = make_random_checkpoint("deepseek_v3", tmp_path / "m", n_routed_experts=8, routed_scaling_factor=2.5)
    sm = StreamedModel(str(ckpt))
    moe = sm.load_layer(sm.adapter.moe_layers()[0]).moe
    x = torch.randn(300, sm.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    rec = RouteRecorder(300, 300, 0)
    moe.observers = [rec]
    kept, keep = [0, 2, 4, 6], torch.zeros(8, dtype=torch.bool)
    keep[kept] = True
    with torch.no_grad():
        moe(x)
        f = torch.stack([ex(x) for ex in moe.experts], 1).double()  # [T, E, H], before the refit changes any
        logits, w, idx = sm.adapter.route(moe, x)
        pw, pidx = route_masked(logits, keep, sm.adapter.routing(), moe.gate.e_score_correction_bias.float())
    moe.observers = []

    def out(ws, ids):
        return (f.gather(1, ids[..., None].expand(-1, -1, f.shape[-1])) * ws[..., None].double()).sum(1)

    assert torch.allclose(pw.double().sum(-1), torch.tensor(2.5, dtype=torch.float64))
    want = (out(w, idx) - out(pw, pidx)) / pw.double().sum(-1, keepdim=True)
    got = []
    monkeypatch.setattr(merge, "_refit_down", lambda ex, xs, p, lost: got.append((xs, lost)))
    changed = merge.refit(LayerEvidence(0, moe, None, sm.adapter.routing(), rec), kept)
    assert changed and len(got) == len(changed)
    for xs, lost in got:
        tok = torch.stack([(x == r).all(1).nonzero()[0, 0] for r in xs])
        err = float((lost.double() - want[tok]).abs().max() / want[tok].abs().max())
        assert err < 2.5e-7, err  # measured 1.0e-7 (float32 routed outputs); 1.5 at 2.5x

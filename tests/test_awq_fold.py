"""Folded AWQ (``quantize --awq-fold``, compress/quantize/fold.py; issue 17 item 3).

* Before rounding the folded model IS the original: the fold alone (no quantization, norms and
  router kept in float32) gives the original logits to float32 rounding, on every bundled model.
* One vector per input: every routed expert's and the shared expert's gate/up divide by the same
  vector as the router and the post-attention norm carry; GQA's o_proj vector is equal across the
  query heads that read one value head; MLA's o_proj vector sits on kv_b_proj's value rows only.
* The folded int4-awq checkpoint has no pre_quant_scale, exports to compressed-tensors
  pack-quantized and loads in transformers (a process that never imports moepress) with logits
  equal to moepress's forward of the folded checkpoint; an unfolded one, and W4A8 (no
  compressed-tensors form vLLM runs), are refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import forkserver
import moepress.compress.quantize.config as qconfig
from helpers import count_host_reads
from moepress import models
from moepress.calib.distributed import DistEnv
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.quantize import QuantConfig, quantize_checkpoint
from moepress.compress.quantize import fold as fold_mod
from moepress.compress.quantize.calibrated import CalibratedLayer
from moepress.compress.stream import StreamedModel
from moepress.exporters import ExportConfig, export

IDS = torch.randint(1, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
GROUP = {"tiny-deepseek-v3": 32}  # transformers' CT loader: one scheme for all dense modules (test_export_ct.py)

LOADER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    dirs, ids_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    ids, out = torch.load(ids_path), {}
    for d in dirs:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        with torch.no_grad():
            out[d] = m(input_ids=ids, use_cache=False).logits
    assert not any(k.startswith("moepress") for k in sys.modules), "moepress was imported"
    torch.save(out, out_path)
""")


@pytest.fixture(scope="module")
def folded():
    """Per bundled model: (original logits, logits of the fold applied to float32 weights without
    quantizing, the layers' folds). Norms and router stay float32 here (no storage rounding); every
    expert with MIN_EXPERT_TOKENS routed tokens counts as calibrated (64 tokens leave every expert
    below the default one-token-per-input-channel rule), so the experts' up -> down folds are exercised."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fold_mod.LayerFolder, "_stored_dtype", lambda self, rel: torch.float32)
        mp.setattr(qconfig, "SPARSE_EXPERT_RATIO", 0.0)
        return {name: _folded_forward(name) for name in models.BUNDLED}


def _folded_forward(name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    cfg = QuantConfig(format="int4-awq", awq_fold=True, group_size=GROUP.get(name, 128))
    sm = StreamedModel(models.path(name))
    hs = sm.embed([IDS])
    hs_ref = [h.clone() for h in hs]
    folds = {}
    for i, layer in sm.layers(0):
        hs_ref = sm.run_layer(layer, hs_ref)
        cl = CalibratedLayer(sm, i, layer, cfg, DistEnv())
        cl.observe(hs)
        folder = fold_mod.LayerFolder(cl)
        folder.plan()
        folder.apply()
        folds[i] = (folder.folds, cl.weights)
        for n, lin in cl.linears.items():
            if n in cl.weights.cols or n in cl.weights.rows:
                lin.weight = torch.nn.Parameter(cl.weights[n], requires_grad=False)
        hs = sm.run_layer(layer, hs)
    return sm.head(hs_ref)[0], sm.head(hs)[0], folds


@pytest.mark.parametrize("name", models.BUNDLED)
def test_fold_without_quantizing_is_the_original_model(folded, name):
    ref, out, folds = folded[name]
    kinds = {f.source for fs, _ in folds.values() for f in fs}
    assert "input_layernorm" in kinds and "post_attention_layernorm" in kinds
    assert any(k.endswith(("up_proj", "w3")) for k in kinds)  # up -> down folded
    if name != "tiny-deepseek-v3":
        assert "self_attn.v_proj" in kinds  # GQA-tied v -> o
    else:  # MLA: o_proj smoothed through kv_b_proj's value rows
        assert {"self_attn.q_a_layernorm", "self_attn.kv_a_layernorm", "self_attn.kv_b_proj"} <= kinds
    # the vectors are far from 1, so an unfolded reader or a missed norm would show
    assert max(float((f.p.log().abs()).max()) for fs, _ in folds.values() for f in fs) > 0.3  # measured 0.55
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6  # measured 3e-7 (float32 rounding)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_one_vector_per_input_shared_by_every_expert(folded):
    _, _, folds = folded["tiny-deepseek-v3"]
    fs, weights = folds[1]
    (moe,) = [f for f in fs if f.source == "post_attention_layernorm"]
    assert moe.router == "mlp.gate"
    n_experts = CheckpointReader(models.path("tiny-deepseek-v3")).config["n_routed_experts"]
    assert len(moe.readers) == 2 * n_experts + 2 and "mlp.shared_experts.up_proj" in moe.readers
    assert all(weights.cols[n] is weights.cols[moe.readers[0]] for n in moe.readers)
    # GQA (Qwen3-MoE: 4 query heads, 2 value heads of 32): o_proj's vector repeats per group of heads
    _, _, folds = folded["tiny-qwen3-moe"]
    (vo,) = [f for f in folds[1][0] if f.source == "self_attn.v_proj"]
    p = vo.p.reshape(2, 2, 32)
    assert torch.equal(p[:, 0], p[:, 1]) and torch.equal(vo.row_p, p[:, 0].reshape(-1))


def test_mla_value_rows_carry_o_proj_vector(folded):
    """DeepSeek-V3 MLA (4 heads, qk_nope_head_dim 32, v_head_dim 32): kv_b_proj's rows per head are
    [32 key rows, 32 value rows]; the fold scales only the value rows, by o_proj's vector."""
    _, _, folds = folded["tiny-deepseek-v3"]
    (vo,) = [f for f in folds[1][0] if f.source == "self_attn.kv_b_proj"]
    assert vo.readers == ["self_attn.o_proj"] and vo.p.shape == (4 * 32,)
    rows = vo.row_p.reshape(4, 64)
    assert torch.equal(rows[:, :32], torch.ones(4, 32)) and torch.equal(rows[:, 32:], vo.p.reshape(4, 32))
    assert float(vo.p.log().abs().max()) > 0.1  # a real vector, not the identity


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each bundled model quantized int4-awq --awq-fold (small calibration), exported to
    compressed-tensors, loaded by transformers in ONE subprocess without moepress."""
    base = tmp_path_factory.mktemp("fold")
    out = {}
    for name in models.BUNDLED:
        q, e = base / f"q-{name}", base / f"ct-{name}"
        quantize_checkpoint(models.path(name), q, QuantConfig(format="int4-awq", awq_fold=True, num_samples=2,
                                                              seq_len=64, group_size=GROUP.get(name, 128)))
        export(q, e, ExportConfig(format="compressed-tensors"))
        out[name] = (q, e)
    torch.save(IDS, base / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    dirs = [str(e) for _, e in out.values()]
    p = forkserver.run([sys.executable, "-c", LOADER, json.dumps(dirs), str(base / "ids.pt"), str(base / "lg.pt")],
                       cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, torch.load(base / "lg.pt")


@pytest.mark.parametrize("name", models.BUNDLED)
def test_folded_export_loads_in_transformers(exported, name):
    out, logits = exported
    q, e = out[name]
    r, src = CheckpointReader(q), CheckpointReader(models.path(name))
    assert not any(n.endswith(".pre_quant_scale") for n in r.names())
    assert json.loads((q / "moepress_quant.json").read_text())["awq_fold"] is True
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert r.get(norm).dtype == src.get(norm).dtype and not torch.equal(r.get(norm), src.get(norm))
    qc = json.loads((e / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized"
    with safe_open(str(next(e.glob("*.safetensors"))), "pt") as f:
        assert not any("pre_quant_scale" in k for k in f.keys())
    ours = StreamedModel(r).forward([IDS])[0]
    theirs = logits[str(e)]
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-6  # measured 2.3e-7


def test_unfolded_awq_and_w4a8_refused(exported, tmp_path, cli_run):
    q, _ = exported[0]["tiny-mixtral"]
    for fmt, fold, why in (("int4-awq", False, "--awq-fold"), ("w4a8-awq", True, "dynamic per-token")):
        c = tmp_path / f"{fmt}-{fold}"
        shutil.copytree(q, c)
        lay = json.loads((c / "moepress_quant.json").read_text())
        lay.pop("awq_fold")
        lay = {**lay, "format": fmt, "modules": {k: {**v, "format": fmt} for k, v in lay["modules"].items()},
               **({"awq_fold": True} if fold else {})}
        (c / "moepress_quant.json").write_text(json.dumps(lay))
        r = cli_run("export", c, "--format", "compressed-tensors", "-o", tmp_path / "x")
        assert r.exit_code == 2 and why in r.output and fmt in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_refusal_of_folded_awq_sends_it_straight_to_compressed_tensors(exported, tmp_path, cli_run):
    """A folded int4-awq checkpoint exports to compressed-tensors as it is (the fixture wrote it), so
    trtllm-ckpt's refusal names that export with no "--awq-fold" re-quantize before it (hints.int4_routes)."""
    q, e = exported[0]["tiny-mixtral"]
    assert (e / "config.json").is_file()  # the export the hint should name as it is
    r = cli_run("export", q, "--format", "trtllm-ckpt", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "export compressed-tensors" in r.output, r.output
    assert "--awq-fold" not in r.output and "quantize with" not in r.output, r.output


def test_awq_fold_needs_an_awq_format(cli_run, tmp_path):
    r = cli_run("quantize", models.path("tiny-mixtral"), "--format", "int4-gptq", "--awq-fold", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--awq-fold" in r.output and "int4-awq" in r.output


def test_int4_experts_are_refused_by_hf_modelopt(exported, tmp_path):
    """No runtime loads INT4 weight-only experts from a Model-Optimizer checkpoint (TensorRT-LLM's fused MoE
    reads W4A8's input_scale / weight_scale_2; vLLM and SGLang take FP8 / NVFP4 experts only)."""
    from moepress.errors import MoepressError

    q, _ = exported[0]["tiny-qwen3-moe"]
    with pytest.raises(MoepressError, match=r"routed experts are int4-awq; .*WInt4AFP8.*export compressed-tensors"):
        export(q, tmp_path / "mo", ExportConfig(format="hf-modelopt"))
    assert not (tmp_path / "mo").exists()


def test_shared_vector_consensus_of_the_readers_own_vectors():
    """The MoE input's vector (fold.consensus): one reader gets exactly its own AWQ vector (unfolded
    AWQ's pre_quant_scale); several get the geometric mean weighted by their rows; the fold keeps
    whichever of it and the pooled alpha grid loses less over all readers."""
    from moepress.compress.quant import awq

    g = torch.Generator().manual_seed(0)
    spread = torch.logspace(-1, 1, 96)  # channels of very different magnitudes: AWQ's case
    parts = []
    for n_rows, tilt in ((200, 1.0), (40, -1.0)):
        x = torch.randn(n_rows, 96, generator=g) * spread.pow(tilt)
        parts.append(([torch.randn(40, 96, generator=g), torch.randn(40, 96, generator=g)], x))
    own = [awq.search(ws, x, x.abs().mean(0), 32)[0] for ws, x in parts]
    assert torch.allclose(fold_mod.consensus(parts[:1], 32), own[0], rtol=4e-7)  # measured 1.6e-7
    both = fold_mod.consensus(parts, 32)
    geo = ((200 * own[0].log() + 40 * own[1].log()) / 240).exp()
    assert torch.allclose(both / both.max(), geo / geo.max(), rtol=5e-7)  # measured 2.3e-7
    grid = awq.search_shared(parts, torch.cat([x for _, x in parts]).abs().mean(0), 32)[0]
    losses = [fold_mod.shared_loss(parts, v, 32) for v in (both, grid, torch.ones(96))]
    assert min(losses[:2]) < losses[2]  # smoothing beats none on this input


def test_no_smoothing_is_a_candidate_of_every_fold():
    """awq.search_shared scores no smoothing first: with statistics that disagree with the rows the
    readers see (as the pooled MoE input's can for one expert) every alpha candidate is worse than
    leaving the input alone, and the fold then keeps the identity (alpha None)."""
    from moepress.compress.quant import awq

    c = torch.logspace(-1, 1, 64)
    g = torch.Generator().manual_seed(0)
    parts = [([torch.randn(24, 64, generator=g) * c], torch.randn(256, 64, generator=g) * c)]
    act = c.flip(0)  # says the small channels are the large ones
    p, k, _ = awq.search_shared(parts, act, 32)
    assert awq.alpha_of(int(k)) is None and torch.equal(p, torch.ones(64))
    wsc = awq.weight_scale(parts[0][0], 32)
    grid = [awq.shared_error(parts, awq.candidate_scales(act, wsc, k / 10), 32) for k in range(11)]
    assert awq.shared_error(parts, torch.ones(64), 32) < 0.99 * min(grid)  # measured 0.965 x


def test_a_tie_keeps_no_smoothing():
    """On a tie (every candidate's loss zero: all-zero weights, or a part without tokens, an expert no
    calibration token reached) awq.search_shared keeps the identity it scored first (alpha None): a
    smoothing vector would be folded into the norm and router for no gain, adding their bf16 rounding."""
    from moepress.compress.quant import awq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 96, generator=g) * torch.linspace(0.1, 5, 96)
    for parts in ([([torch.zeros(32, 96)], x)], [([torch.randn(32, 96, generator=g)], torch.zeros(0, 96))]):
        p, k, err = awq.search_shared(parts, x.abs().mean(0), 32)
        assert int(k) == 0 and torch.equal(p, torch.ones(96)) and float(err) == 0.0


def test_sparse_experts_down_is_not_folded():
    """A routed expert below calibrated.py's evidence rule (fewer tokens than input channels) is
    rounded to nearest without smoothing by unfolded AWQ, so the fold leaves its up -> down alone;
    the experts above it get their own up -> down vector."""
    name = "tiny-mixtral"
    sm = StreamedModel(models.path(name))
    ids = torch.randint(1, 4096, (4, 128), generator=torch.Generator().manual_seed(1))
    (i, layer), *_ = sm.layers(0)
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True), DistEnv())
    cl.observe(sm.embed([ids]))
    folder = fold_mod.LayerFolder(cl)
    folder.plan()
    idx = torch.cat(cl.routes)
    tokens = [int((idx == e).any(-1).sum()) for e in range(len(layer.moe.experts))]
    width = cl.linears[f"{layer.ffn_attr}.experts.0.{layer.moe.experts[0].names[0]}"].in_features
    need = max(qconfig.MIN_EXPERT_TOKENS, qconfig.SPARSE_EXPERT_RATIO * width)
    folded = {int(f.source.split(".")[-2]) for f in folder.folds if ".experts." in f.source}
    assert folded == {e for e, t in enumerate(tokens) if t >= need}
    assert folded and any(qconfig.MIN_EXPERT_TOKENS <= t < need for t in tokens), tokens


def test_a_layers_folds_read_the_host_once_not_per_expert(monkeypatch):
    """A host read (``float(t)``, ``.tolist()``, ...) of a GPU tensor waits for the device's queue to drain. The fold
    searches per routed expert (its consensus and its up -> down vector, twelve candidates each): the candidates'
    losses and the choices stay on the device, and the layer's choices are read at once when the fold is applied.
    Counted on tiny-mixtral's first layer (8 experts, 3 of them folded up -> down)."""
    sm = StreamedModel(models.path("tiny-mixtral"))
    ids = torch.randint(1, 4096, (4, 128), generator=torch.Generator().manual_seed(1))
    (i, layer), *_ = sm.layers(0)
    cl = CalibratedLayer(sm, i, layer, QuantConfig(format="int4-awq", awq_fold=True), DistEnv())
    cl.observe(sm.embed([ids]))
    reads = count_host_reads(monkeypatch)
    folder = fold_mod.LayerFolder(cl)
    folder.plan()
    folder.apply()
    monkeypatch.undo()
    assert len([f for f in folder.folds if ".experts." in f.source]) == 3
    assert sum(reads.values()) <= 3, reads  # the experts' token lists, the choices


def test_dense_sites_fold_to_unfolded_awq_bit_for_bit(tmp_path):
    """DeepSeek-V3's first layer (MLA + dense MLP), each input read by one group of linears: folded with
    the norms kept in float32, every group whose vector came from the alpha grid has unfolded AWQ's
    INT4 codes bit for bit (same vector, same GPTQ Hessian of x * p) and its group scales (up to the
    rows a later fold scales: up_proj by down's vector, kv_b_proj's value rows by o_proj's). A group
    where no smoothing won (a fold-only candidate; alpha absent from the report) differs."""
    from moepress.compress.quant import int4

    out, alphas = {}, {}
    for fold in (False, True):
        q = tmp_path / str(fold)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fold_mod.LayerFolder, "_stored_dtype", lambda self, rel: torch.float32)
            quantize_checkpoint(models.path("tiny-deepseek-v3"), q, QuantConfig(
                format="int4-awq", awq_fold=fold, num_samples=2, seq_len=64, group_size=32))
        out[fold] = CheckpointReader(q)
        alphas[fold] = json.loads((q / "quant_report.json").read_text())["awq_alpha"]
    u, f, pre = out[False], out[True], "model.layers.0."
    group_of = {"kv_a_proj_with_mqa": "q_a_proj", "up_proj": "gate_proj"}
    same = []
    for n in (n[: -len(".weight")] for n in u.names() if n.startswith(pre) and n.endswith("proj.weight")):
        parent, _, leaf = n.rpartition(".")
        key = f"{parent}.{group_of.get(leaf, leaf)}"
        codes_equal = torch.equal(int4.unpack_int4(u.get(f"{n}.weight")), int4.unpack_int4(f.get(f"{n}.weight")))
        if key in alphas[True]:
            assert alphas[True][key] == alphas[False][key] and codes_equal, n
            same.append(leaf)
            if leaf not in ("up_proj", "kv_b_proj"):
                assert torch.allclose(u.get(f"{n}.weight_scale"), f.get(f"{n}.weight_scale"), rtol=8e-7), n
        else:
            assert not codes_equal, n
    assert {"gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj"} <= set(same), same

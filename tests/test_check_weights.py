"""`moepress check`: each expert's weights held to the error their own rounding makes (checks/weights.py).

A scale tensor rolled by one row in one expert (an exporter's layout slip) passes every output-level gate: its
output on the probe tokens errs within the spread of correct experts. Its weights, compared with the reference's
as the candidate computes with them, err several times what the format's rounding to nearest of the reference's
weight errs; a correct candidate reads 1 whatever its experts' weights look like. Where that rounding is not known
(AWQ, GPTQ, a format moepress did not write) nothing is judged.
"""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.checks.weights import (
    SAMPLES,
    WeightSketch,
    _columns,
    _rounded_error,
    effective_weight,
    rounded_to_nearest,
    sketch,
    sketch_error,
)
from moepress.compress.formats import FORMATS, fake_quant
from moepress.compress.formats.base import QuantContext
from moepress.compress.moe import StoredLinear
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

MID = ["--seq-len", "128", "--max-samples", "16"]
ROLLED = "model.layers.1.block_sparse_moe.experts.3.w1.weight_scale"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """tiny-mixtral in fp8-dynamic (per-channel weight scales) and nvfp4-a16 (16-wide block scales); no
    calibration."""
    out = {}
    for fmt in ("fp8-dynamic", "nvfp4-a16"):
        q = tmp_path_factory.mktemp("q") / fmt
        quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format=fmt))
        out[fmt] = q
    return out


def _rolled(src, dst, names=(ROLLED,)):
    """A copy of ``src`` with the weight scales ``names`` rolled by one row."""
    out = shutil.copytree(src, dst)
    left = set(names)
    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        hit = left & set(sd)
        for n in hit:
            sd[n] = torch.roll(sd[n], 1, 0).contiguous()
        if hit:
            save_file(sd, f, metadata={"format": "pt"})
        left -= hit
    assert not left, f"{left} not in {src}"
    return out


def _check(cli_run, cand, *extra, ref=None):
    r = cli_run("check", cand, "--reference", ref or models.path("tiny-mixtral"), *MID, "--quiet", "--json",
                "--no-record", *extra)
    return r, json.loads(r.stdout)


@pytest.mark.parametrize(("fmt", "also"), [("nvfp4-a16", []), ("fp8-dynamic", ["max_expert_error_ratio"])])
def test_a_scale_rolled_by_one_row_in_one_expert_fails_the_weight_gate(cli_run, mixtral, fmt, also, tmp_path):
    """Rolled NVFP4 block scales: every other gate passes (the expert's output 1.6x its peers' median); its w1
    weight error reads 3.5x what rounding its reference weight to nearest errs. Rolled per-channel FP8 scales (rows
    of more unequal ranges): the output ratio reads it too (4.1), the weights 7.5. The correct candidate is that
    rounding: every linear reads 1."""
    r, res = _check(cli_run, mixtral[fmt])
    assert r.exit_code == 0, r.output
    assert res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6)
    r, res = _check(cli_run, _rolled(mixtral[fmt], tmp_path / "rolled"))
    assert r.exit_code == 1 and res["failed"] == [*also, "max_weight_error_ratio"], r.output
    row = res["layers"][1]
    assert row["weight_module"] == "block_sparse_moe.experts.3.w1" and row["weight_error_ratio"] > 3
    assert all(p["weight_error_ratio"] == pytest.approx(1.0, abs=1e-6) for p in res["layers"] if p["layer"] != 1)


def test_the_weight_gate_off_passes_it(cli_run, mixtral, tmp_path):
    r, res = _check(cli_run, _rolled(mixtral["nvfp4-a16"], tmp_path / "rolled"), "--max-weight-error-ratio", "none")
    assert r.exit_code == 0, r.output


def test_two_faulty_experts_in_one_layer_both_fail(cli_run, mixtral, tmp_path):
    """Each expert is held to its own rounding, not to its peers: a second faulty expert in the layer hides neither."""
    second = ROLLED.replace("experts.3.", "experts.5.")
    r, res = _check(cli_run, _rolled(mixtral["nvfp4-a16"], tmp_path / "rolled", (ROLLED, second)))
    assert r.exit_code == 1 and "max_weight_error_ratio" in res["failed"], r.output
    assert res["layers"][1]["weight_error_ratio"] > 3
    assert cli_run("check", tmp_path / "rolled", "--reference", models.path("tiny-mixtral"), *MID, "--no-record",
                   "--max-weight-error-ratio", "3").exit_code == 1


def test_a_rolled_scale_in_the_shared_experts_fails_the_weight_gate(cli_run, tmp_path):
    """The shared experts are held to their own rounding too (they have no peers stored alike)."""
    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-deepseek-v3"), q, QuantConfig(format="nvfp4-a16"))
    name = "model.layers.1.mlp.shared_experts.gate_proj.weight_scale"
    ref = models.path("tiny-deepseek-v3")
    r, res = _check(cli_run, q, ref=ref)
    assert res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6), r.output
    r, res = _check(cli_run, _rolled(q, tmp_path / "rolled", (name,)), ref=ref)
    assert r.exit_code == 1 and "max_weight_error_ratio" in res["failed"], r.output
    row = res["layers"][1]
    assert row["weight_module"] == "mlp.shared_experts.gate_proj" and row["weight_error_ratio"] > 2


def test_a_rolled_v_proj_scale_fails_the_weight_gate_in_a_pruned_candidate_too(cli_run, tmp_path):
    """Attention linears are held to their own rounding as the experts are: layer 1's v_proj NVFP4 block scales
    rolled by one row read 1.5-2.1 against the other layers' attention errors, within the spread of correct
    candidates, and passed every other gate. A pruned candidate (other experts) has its attention judged."""
    p, q = tmp_path / "p", tmp_path / "q"
    assert cli_run("prune", "tiny-mixtral", "--ratio", "0.25", "--method", "frequency", "--num-samples", "4",
                   "--seq-len", "64", "-o", p, "--quiet").exit_code == 0
    quantize_checkpoint(p, q, QuantConfig(format="nvfp4-a16"))
    off = ("--max-expert-error", "none", "--max-ppl-increase", "none", "--max-kl", "none", "--min-top1", "none")
    r, res = _check(cli_run, q, *off)
    assert r.exit_code == 0 and res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6), r.output
    assert all(p["weight_module"] is not None and ".experts." not in p["weight_module"] for p in res["layers"])
    r, res = _check(cli_run, _rolled(q, tmp_path / "rolled", ("model.layers.1.self_attn.v_proj.weight_scale",)), *off)
    assert r.exit_code == 1 and res["failed"] == ["max_weight_error_ratio"], r.output
    assert res["layers"][1]["weight_module"] == "self_attn.v_proj" and res["layers"][1]["weight_error_ratio"] > 2


def test_a_quantize_of_a_decoded_export_carries_two_roundings_and_is_judged_only_against_its_input(cli_run, tmp_path):
    """A review's find: nvfp4-a16 exported to compressed-tensors (no moepress_quant.json), that export quantized to
    fp8 and checked against the original read 3.79 (its weights hold both roundings, the expected error only the
    second's). Two quantize stages between the candidate and the reference: not judged; against the export it was
    quantized from: judged, exact."""
    q, ct, q2 = tmp_path / "q", tmp_path / "ct", tmp_path / "q2"
    quantize_checkpoint(models.path("tiny-mixtral"), q, QuantConfig(format="nvfp4-a16"))
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", ct, "--quiet").exit_code == 0
    quantize_checkpoint(ct, q2, QuantConfig(format="fp8-dynamic"))
    r, res = _check(cli_run, q2)
    assert "max_weight_error_ratio" not in res["metrics"], r.output
    r, res = _check(cli_run, q2, ref=ct)
    assert res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6), r.output


def test_linears_of_one_input_split_by_a_rule_are_rounded_as_quantize_groups_them(tmp_path):
    """A review's find: --rule giving k_proj another format than q_proj and v_proj, which quantize still rounds
    together (one FP8 scale): the expected error had rounded each alone (1.028 over the rounding)."""
    from moepress.checks.weights import _groups

    fmts = {"self_attn.q_proj": "fp8", "self_attn.k_proj": "nvfp4-a16", "self_attn.v_proj": "fp8",
            "self_attn.o_proj": "fp8"}
    assert _groups(list(fmts), fmts) == [["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.k_proj"],
                                         ["self_attn.o_proj"]]


def _on_grid(src, dst, fmt: str, layer: int, off: int):
    """A copy of ``src`` whose layer ``layer`` routed experts hold weights already on ``fmt``'s grid (rounded by its
    quantizer and stored in bf16, exactly: a bf16 upcast of a checkpoint shipped in ``fmt``), except expert ``off``,
    moved off it by 1% noise (that expert fine-tuned after the upcast)."""
    out = shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    for f in sorted(out.glob("*.safetensors")):
        sd = load_file(f)
        for n in [n for n in sd if f".layers.{layer}." in n and ".experts." in n]:
            w = sd[n].float()
            if f".experts.{off}." in n:
                w = w + 0.01 * w.std() * torch.randn(w.shape, generator=g)
            else:
                q = FORMATS[fmt].quantize([w], QuantContext()).tensors[0]
                w = FORMATS[fmt].dequantize(q)
                assert torch.equal(w.bfloat16().float(), w)
            sd[n] = w.bfloat16()
        save_file(sd, f, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("model", "off", "worst"), [("tiny-mixtral", 3, 3), ("tiny-deepseek-v3", -1, "shared")])
def test_an_expert_off_the_grid_its_peers_sit_on_is_not_a_fault(cli_run, tmp_path, model, off, worst):
    """A review's reproduction: the reference's routed experts on the MXFP4 grid but one (tiny-mixtral) or but the
    shared experts (tiny-deepseek-v3), re-quantized to mxfp4. The peers quantize exactly (error 0) while the other
    errs as MXFP4 errs: held to the peers' median its weights read 10.2 and its output 73 (the shared experts':
    143), failing; held to their own rounding (weights; the output's denominator floored at the error the rounded
    expert makes on the same tokens) both read 1."""
    ref = _on_grid(models.path(model), tmp_path / "ref", "mxfp4", layer=1, off=off)
    q = tmp_path / "q"
    quantize_checkpoint(ref, q, QuantConfig(format="mxfp4"))
    r, res = _check(cli_run, q, ref=ref)
    assert not {"max_weight_error_ratio", "max_expert_error_ratio"} & set(res["failed"]), r.output
    assert res["metrics"]["max_weight_error_ratio"] == pytest.approx(1.0, abs=1e-6)
    row = res["layers"][1]
    assert row["ratio_expert"] == worst and row["expert_error_ratio"] == pytest.approx(1.0, abs=0.02), row  # 1.0000


@pytest.mark.parametrize(("spectrum", "tol"), [("flat", 0.05), ("a few directions", 0.03)])
def test_the_sketch_estimates_the_weight_error(spectrum, tol):
    """A weight wider than its sketch: the error from the sketches within ``tol`` of the weights' own (Frobenius),
    computed here directly (measured: within 2.5% over seeds 0-4, flat; 0.5% here with a few dominant directions
    and 5% noise, where sketched norms, not exact ones, read 0.94)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.Linear(4096, 64, bias=False)
    cand = torch.nn.Linear(4096, 64, bias=False)
    w = torch.randn(64, 4096, generator=g)
    if spectrum != "flat":
        w = torch.randn(64, 3, generator=g) @ torch.randn(3, 4096, generator=g) * 10 + w
    with torch.no_grad():
        ref.weight.copy_(w)
        cand.weight.copy_(w + 0.05 * w.std() * torch.randn(64, 4096, generator=g))
    wc, wr = cand.weight.detach(), ref.weight.detach()
    exact = float((wc - wr).norm() / torch.minimum(wc.norm(), wr.norm()))
    assert _columns(4096, 64, "cpu").shape == (4096, SAMPLES // 64)
    assert sketch_error(sketch(cand), sketch(ref)) == pytest.approx(exact, rel=tol)
    narrow = torch.nn.Linear(64, 64, bias=False)  # narrower than its sketch: the weight itself
    assert _columns(64, 64, "cpu") is None and torch.equal(sketch(narrow)[0], narrow.weight.detach())


class _Expert(torch.nn.Module):
    def __init__(self, w: list[torch.Tensor]):
        super().__init__()
        self.g, self.u, self.d = (torch.nn.Linear(t.shape[1], t.shape[0], bias=False) for t in w)
        with torch.no_grad():
            for lin, t in zip(self.linears(), w, strict=True):
                lin.weight.copy_(t)

    def linears(self):
        return self.g, self.u, self.d

    def forward(self, x):
        return self.d(torch.nn.functional.silu(self.g(x)) * self.u(x))


def test_a_nan_weight_in_any_linear_is_the_experts_ratio():
    """Experts stored in fp8-dynamic as their reference weights x 1.01 (an error of 0.01 besides the rounding's,
    which the weights' own is compared with, about 0.02 here); expert 2's down projection NaN: its ratio is NaN,
    not the finite ratio of its gate projection."""
    g = torch.Generator().manual_seed(0)
    ws = [[torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(16, 8, generator=g)]
          for _ in range(4)]
    ref = type("M", (), {"experts": [_Expert(w) for w in ws]})()
    probe = torch.randn(5, 16, generator=g)
    sk = WeightSketch(ref, {f"experts.{k}.{n}": "fp8-dynamic" for k in range(4) for n in "gud"}, "", probe,
                      torch.stack([e(probe) for e in ref.experts]))
    bad = [[t * 1.01 for t in w] for w in ws]
    bad[2][2] = torch.full_like(bad[2][2], math.nan)
    cand = [_Expert(w) for w in bad]
    for e in cand:
        for lin in e.linears():
            lin.quant_format = "fp8-dynamic"
    got = sk.ratios(type("M", (), {"experts": cand})(), torch.arange(4))
    assert 0.25 < got[0][0] < 1.0  # x 1.01 unrounded against the rounding's own error: measured 0.51
    assert math.isnan(got[2][0]) and got[2][1] == "experts.2.d"


def test_only_weights_known_rounded_to_nearest_are_judged():
    """A moepress output of a round-to-nearest format: judged; an AWQ / GPTQ output, a quantized weight of unknown
    origin (a compressed-tensors checkpoint: AWQ or GPTQ beside experts rounded to nearest for want of tokens), or a
    weight stored in float (an export may hold a rounding dequantized): not."""
    lin = torch.nn.Linear(4, 2, bias=False)
    assert not rounded_to_nearest(lin)
    lin.quant_format = "nvfp4"
    assert rounded_to_nearest(lin)
    lin.quant_format = "int4-awq"
    assert not rounded_to_nearest(lin)
    lin.quant_format = "int4-gptq"
    assert not rounded_to_nearest(lin)
    stored = StoredLinear(4, 2, bias=False)
    stored.keep(None, "x.weight", {"x.weight_packed": torch.zeros(2, 1, dtype=torch.int32)})
    assert not rounded_to_nearest(stored)


def test_an_awq_fold_compressed_tensors_export_is_not_failed_by_its_weights(cli_run, tmp_path):
    """A review's reproduction: experts with too few calibration tokens are rounded to nearest and agree; a
    calibrated expert among them, its smoothing folded into its weights (no pre_quant_scale to undo), read 2.43
    over their median once exported to compressed-tensors, where no moepress_quant.json names the format."""
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert cli_run("quantize", "tiny-mixtral", "--format", "int4-awq", "--awq-fold", "--num-samples", "3",
                   "--seq-len", "64", "-o", q, "--quiet").exit_code == 0
    assert cli_run("export", q, "--format", "compressed-tensors", "-o", ct, "--quiet").exit_code == 0
    r, res = _check(cli_run, ct, "--max-expert-error-ratio", "none", "--max-expert-error", "none")
    assert "max_weight_error_ratio" not in res["metrics"] and "max_weight_error_ratio" not in res["failed"], r.output


def test_the_pre_quant_scale_is_part_of_the_compared_weight():
    """AWQ stores W x s and multiplies the input by 1 / s (``pre_quant_scale``): the weight computed with is
    their product, which is what compares with the reference's W."""
    lin = torch.nn.Linear(4, 2, bias=False)
    layer = torch.nn.ModuleDict({"proj": lin})
    pqs = torch.tensor([1.0, 2.0, 0.5, 4.0])
    fake_quant.attach(layer, {"proj": ("int4-awq", pqs, None)})
    assert torch.equal(effective_weight(lin), lin.weight.detach() * pqs)


def test_an_awq_candidate_is_not_judged_by_its_weights(cli_run, tmp_path):
    """AWQ rounds by calibration (its weight errors spread 1.2-1.5 over a layer's experts on the bundled models):
    shown not measured, a note names the layers; asked for explicitly, refused in one line after the run."""
    q = tmp_path / "awq"
    assert cli_run("quantize", "tiny-mixtral", "--format", "int4-awq", "--num-samples", "2", "--seq-len", "32",
                   "-o", q, "--quiet").exit_code == 0
    r, res = _check(cli_run, q, "--max-expert-error-ratio", "none", "--max-expert-error", "none")
    assert r.exit_code == 0 and "max_weight_error_ratio" not in res["metrics"], r.output
    assert any("--max-weight-error-ratio" in n and "0, 1, 2, 3" in n for n in res["notes"]), res["notes"]
    assert all(p["weight_error_ratio"] is None for p in res["layers"])
    r = cli_run("check", q, "--reference", models.path("tiny-mixtral"), *MID, "--quiet", "--no-record",
                "--max-weight-error-ratio", "2")
    assert r.exit_code == 2 and "--max-weight-error-ratio 2" in r.stderr and len(r.stderr.splitlines()) == 1, r.output


def _renumbered(src, dst, perm):
    """A copy of ``src`` whose experts and router rows are renumbered alike (new expert j = old ``perm[j]``), the
    names in its JSON files too (what an expert-placement tool writes)."""
    out = shutil.copytree(src, dst)
    inv = {k: j for j, k in enumerate(perm)}

    def ren(s):
        return re.sub(r"\.experts\.(\d+)\.", lambda m: f".experts.{inv[int(m.group(1))]}.", s)

    for f in out.glob("*.safetensors"):
        sd = load_file(f)
        save_file({ren(n): t[perm].contiguous() if n.endswith(".gate.weight") else t for n, t in sd.items()}, f,
                  metadata={"format": "pt"})

    def walk(o):
        if isinstance(o, dict):
            return {ren(k): walk(v) for k, v in o.items()}
        return [walk(v) for v in o] if isinstance(o, list) else ren(o) if isinstance(o, str) else o

    for name in ("moepress_quant.json", "hf_quant_config.json", "model.safetensors.index.json"):
        if (out / name).exists():
            (out / name).write_text(json.dumps(walk(json.loads((out / name).read_text()))))
    (out / "moepress-manifest.json").unlink(missing_ok=True)
    return out


def test_a_renumbered_candidate_storing_its_experts_in_two_formats_keeps_the_floor_of_each(cli_run, tmp_path):
    """A review's find: experts 0-3 in fp8-dynamic, 4-7 in mxfp4 by a --rule, then renumbered (new j = old
    (j + 4) % 8). The floor of reference expert k was rounded in the format the candidate's expert k is stored in,
    not the format of the candidate expert that stands for it, so an fp8-dynamic expert got an MXFP4 floor and its
    rolled scale (old expert 0's w1, now expert 4's) passed at 1.70 (6.68 before the floor). A floor rounded in
    another format than the candidate's expert is not used."""
    q = tmp_path / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), q,
                        QuantConfig(format="mxfp4", rules=(("block_sparse_moe.experts.[0-3].*", "fp8-dynamic"),)))
    perm = _renumbered(q, tmp_path / "perm", [4, 5, 6, 7, 0, 1, 2, 3])
    bad = _rolled(perm, tmp_path / "bad", ["model.layers.1.block_sparse_moe.experts.4.w1.weight_scale"])
    r, res = _check(cli_run, bad)
    assert r.exit_code == 1 and "max_expert_error_ratio" in res["failed"], r.output
    row = res["layers"][1]
    assert row["ratio_expert"] == 4 and row["expert_error_ratio"] > 5, row  # measured 6.68
    r, res = _check(cli_run, perm)
    assert r.exit_code == 0 and res["metrics"]["max_expert_error_ratio"] < 2, r.output  # measured 1.28


def test_the_floor_reads_each_linears_input_before_the_references_own_pre_hooks():
    """A reviewer's find: the floor's rounded linears took their input after the reference's own pre-hooks (a
    native block-FP8 reference quantizes its activations so), quantizing it twice, up to 10% low. Here a pre-hook
    zeroes the gate's input; the rounded weights are the weights themselves, so from the input as it came the
    expert's output is its own (error 0), from the hooked one it is not."""
    g = torch.Generator().manual_seed(0)
    e = _Expert([torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(16, 8, generator=g)])
    x = torch.randn(5, 16, generator=g)
    with torch.no_grad():
        ref = e(x)
    e.g.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    assert _rounded_error(e, {"g": e.g.weight.detach().float()}, {"g": "mxfp4"}, x, ref) == pytest.approx(0.0, abs=1e-6)

"""The ``ean`` prune method (REAP paper's EAN baseline): each expert's score is the sum over the
tokens routed to it of ||f_j(x)||_2, its unweighted output's norm (compress/prune/methods.py).

The scores are recomputed here without moepress: transformers runs the model and hands over each
MoE block's input; the router (softmax, top-k) and the experts (SwiGLU) are applied to it from the
checkpoint's tensors as stored.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from helpers import make_random_checkpoint
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.prune import METHODS, PruneConfig, prune_checkpoint

EXPERTS, TOP_K, KEEP = 8, 2, 4


def _tensors(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            out.update({k: s.get_tensor(k).float() for k in s.keys()})
    return out


def _moe_inputs(ckpt, ids) -> list[torch.Tensor]:
    """Each decoder layer's MoE block input [tokens, hidden], as transformers computes it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    seen = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen


def _ean(w: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens per expert, sum of ||f_j(x)||_2 over them) of Mixtral layer i: softmax router, top-k."""
    p = f"model.layers.{i}.block_sparse_moe."
    chosen = F.softmax(x @ w[p + "gate.weight"].T, dim=-1).topk(TOP_K, dim=-1).indices
    counts, norms = torch.zeros(EXPERTS, dtype=torch.int64), torch.zeros(EXPERTS, dtype=torch.float64)
    for e in range(EXPERTS):
        xe = x[(chosen == e).any(-1)]
        w1, w2, w3 = (w[f"{p}experts.{e}.{k}.weight"] for k in ("w1", "w2", "w3"))
        y = (F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T
        counts[e], norms[e] = xe.shape[0], y.double().norm(dim=-1).sum()
    return counts, norms


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    root = tmp_path_factory.mktemp("ean")
    src = make_random_checkpoint("mixtral", root / "src", num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    out = root / "pruned"
    prune_checkpoint(src, out, PruneConfig(method="ean", keep=KEEP), batches=[ids])
    return src, out, ids


def test_ean_scores_are_the_summed_expert_output_norms(pruned):
    src, out, ids = pruned
    assert METHODS["ean"].score_name == "ean_sum"
    rep = json.loads((out / "prune_report.json").read_text())
    w = _tensors(src)
    xs = _moe_inputs(src, ids)
    assert [r["layer"] for r in rep["layers"]] == [0, 1]
    for r in rep["layers"]:
        counts, want = _ean(w, r["layer"], xs[r["layer"]])
        rows = sorted(r["kept"] + r["dropped"], key=lambda d: d["expert"])
        assert r["score"] == "ean_sum" and r["tokens"] == ids.numel()
        assert [d["tokens"] for d in rows] == counts.tolist()  # the same routing decisions
        got = torch.tensor([d["score"] for d in rows], dtype=torch.float64)
        # measured: equal (transformers 5.24 and the stream compute the same float32 operations); another
        # attention kernel would differ by float32 rounding (~1e-7)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert not torch.allclose(got, want / counts.clamp(min=1), rtol=0.01)  # the sum, not the mean


def test_ean_prune_keeps_the_highest_summed_norms(pruned):
    src, out, ids = pruned
    w = _tensors(src)
    xs = _moe_inputs(src, ids)
    rep = {r["layer"]: r for r in json.loads((out / "prune_report.json").read_text())["layers"]}
    s, o = CheckpointReader(src), CheckpointReader(out)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == KEEP
    for i in (0, 1):
        _, scores = _ean(w, i, xs[i])
        order = scores.argsort(descending=True).tolist()
        assert scores[order[KEEP - 1]] > scores[order[KEEP]] * 1.01  # no near-tie decides the test
        kept = sorted(order[:KEEP])
        assert [d["expert"] for d in rep[i]["kept"]] == kept
        p = f"model.layers.{i}.block_sparse_moe."
        assert torch.equal(o.get(p + "gate.weight"), s.get(p + "gate.weight")[kept])
        for j, e in enumerate(kept):
            for k in ("w1", "w2", "w3"):
                assert torch.equal(o.get(f"{p}experts.{j}.{k}.weight"), s.get(f"{p}experts.{e}.{k}.weight"))
        assert not any(f"{p}experts.{KEEP}." in n for n in o.names())

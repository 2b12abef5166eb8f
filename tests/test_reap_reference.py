"""REAP scores equal the reference implementation's on the same tokens.

The reference is CerebrasResearch/reap at commit 1970473c51ca3caeb98c10392f15b3a08a672974:
src/reap/observer.py (``MoETransformerObserver._hook_factory``: ``selected_experts = topk(router_logits,
top_k)``, every expert run on every token) and src/reap/pruning_metrics.py (``update_pruning_state``:
``routing_weights = softmax(router_logits, dim=1, dtype=float)``, divided by their sum over the selected
experts and clamped at eps when ``model.config.norm_topk_prob`` is true (main.py ``_setup_observer``),
``reap[i] = mean over tokens selecting i of ||expert_i(x)||_2 * routing_weights[:, i]``, batches combined
weighted by the expert's frequency). Here that formula is written out again in plain torch over the
checkpoint's own tensors (read with safetensors, names as stored), on the MoE inputs a real forward
produced; only the MoE input is taken from moepress's stream. The test fails if the gate, the norm, the
token set or the divisor of ``LayerRouting.reap`` departs from the reference.
"""

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from moepress import models
from moepress.calib.data import calibration_batches
from moepress.calib.observers import RoutingStats
from moepress.compress.stream import StreamedModel

# family -> (the MoE block's name in the checkpoint, expert linear names gate/up/down)
NAMES = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2")),
         "Qwen3MoeForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj")),
         "DeepseekV3ForCausalLM": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def _tensors(path, prefix):
    idx = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in idx.items():
        if name.startswith(prefix):
            with safe_open(str(path / file), "pt") as f:
                out[name[len(prefix):]] = f.get_tensor(name).float()
    return out


def reference_reap(x: torch.Tensor, w: dict, config: dict, lin: tuple[str, str, str], batch_tokens: list[int]):
    """REAP per expert as the reference computes it, batch by batch, combined as its OnlineStatsTracker does
    (a frequency-weighted mean of the batch means, which equals the mean over all selected tokens)."""
    E, k = w["gate.weight"].shape[0], config["num_experts_per_tok"]
    g_name, u_name, d_name = lin
    total, count = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.int64)
    for xb in torch.split(x, batch_tokens):
        logits = xb @ w["gate.weight"].T
        selected = torch.topk(logits, k, dim=-1).indices
        rw = F.softmax(logits, dim=1, dtype=torch.float)
        if config.get("norm_topk_prob", False):
            rw = torch.clamp(rw / torch.gather(rw, 1, selected).sum(-1, keepdim=True), min=torch.finfo(rw.dtype).eps)
        for i in range(E):
            active = (selected == i).any(dim=-1)
            if not active.any():
                continue
            p = f"experts.{i}."
            xa = xb[active]
            act = (F.silu(xa @ w[p + g_name + ".weight"].T) * (xa @ w[p + u_name + ".weight"].T)) @ w[p + d_name
                                                                                                     + ".weight"].T
            n = int(active.sum())
            # batch mean in float32, then the tracker's frequency-weighted combination
            total[i] += float((torch.linalg.norm(act, dim=-1) * rw[active, i]).mean()) * n
            count[i] += n
    return torch.where(count > 0, total / count.clamp(min=1), 0.0), count


@functools.cache
def _run(name):
    path = models.path(name)
    config = json.loads((path / "config.json").read_text())
    block, lin = NAMES[config["architectures"][0]]
    sm = StreamedModel(str(path), dtype=torch.float32)
    layer_i = sm.adapter.moe_layers()[0]
    stats, inputs = RoutingStats(), []

    def before(i, layer):
        if i == layer_i:
            stats.attach(i, layer)
            layer.moe.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1]).clone()))

    sm.forward(calibration_batches(path, num_samples=8, seq_len=48, batch_size=4), before_layer=before)
    x = torch.cat(inputs)
    w = _tensors(path, f"model.layers.{layer_i}.{block}.")
    ref, count = reference_reap(x, w, config, lin, [t.shape[0] for t in inputs])
    return stats.layers[layer_i], ref, count, x, w, config


@pytest.mark.parametrize("name", models.BUNDLED)
def test_reap_equals_reference(name):
    lr, ref, count, *_rest = _run(name)
    assert torch.equal(lr.reap_count, count), name
    assert (count > 0).sum() >= 2
    torch.testing.assert_close(lr.reap, ref, rtol=1e-6, atol=0.0)


def test_mixtral_gate_is_the_softmax_over_all_experts():
    """Mixtral's config has no norm_topk_prob: the reference's gate is the full softmax, not the renormalised
    top-k weight Mixtral routes with, so REAP is smaller than the mean gate x norm of the real routing."""
    lr = _run("tiny-mixtral")[0]
    real = torch.where(lr.counts > 0, lr.gate_sum / lr.counts.clamp(min=1), 0.0)
    assert (real[lr.counts > 0] > 1.2 * (lr.reap / lr.mean_norm.clamp(min=1e-30))[lr.counts > 0]).all()


def test_deepseek_counts_the_raw_logit_top_k_not_the_routed_experts():
    """DeepSeek-V3 routes on sigmoid + correction bias within groups; the reference counts REAP on the top-k
    of the raw logits: on the bundled model those sets differ, and REAP follows the reference's."""
    lr = _run("tiny-deepseek-v3")[0]
    assert not torch.equal(lr.reap_count, lr.counts)

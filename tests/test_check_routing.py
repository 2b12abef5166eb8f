"""The routing and expert gates' parts, each on its own (the CLI tests in test_check.py use routers that are
exact copies or permutations of the reference's, on which a one-token probe or a non-permutation order passes
too), and every gate's metric carried into the manifest that `moepress publish` re-evaluates."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moepress.checks.config import GATES, CheckConfig, evaluate_gates, refuse_unmeasurable
from moepress.checks.report import accuracy_section
from moepress.checks.routing import PROBE_TOKENS, Agreement, RouteCapture, _order
from moepress.checks.rows import _moe_rows
from moepress.checks.verify import recompute_gates
from moepress.errors import MoepressError


class _Moe:
    def __init__(self, n: int):
        self.num_experts, self.observers = n, []
        self.experts = [torch.nn.Identity() for _ in range(n)]
        self.shared_experts = None


def test_probe_is_16_tokens_spread_over_the_first_batch():
    moe = _Moe(2)
    cap = RouteCapture(moe, weights=False)  # identity experts: no weights to sketch
    x = torch.arange(64.0)[:, None]
    cap.on_route(moe, x, torch.stack([x[:, 0], -x[:, 0]], 1), None, None)
    cap.on_route(moe, x + 1000, torch.zeros(64, 2), None, None)  # a later batch changes nothing
    want = torch.linspace(0, 63, 16).round()
    assert PROBE_TOKENS == 16 and cap.probe[:, 0].tolist() == want.tolist()
    assert cap.scores[:, 0].tolist() == want.tolist() and cap.outputs.shape == (2, 16, 1)


def test_order_is_a_renumbering_or_the_identity():
    ref = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert _order(ref[:, perm], ref).tolist() == perm.tolist()
    assert _order(ref[:, [0, 0, 2, 3, 4, 5]], ref).tolist() == list(range(6))  # two rows alike: no renumbering


def test_a_nan_expert_error_wins_over_the_other_layers():
    m = {}
    _moe_rows({1: Agreement(1.0, False, 0.1, 0, 1.0, 0), 2: Agreement(1.0, False, math.nan, 3, math.nan, 3),
               3: Agreement(0.9, False, 0.2, 1, 2.0, 1)}, m)
    assert math.isnan(m["max_expert_error"]) and m["min_routing_overlap"] == 0.9
    assert math.isnan(m["max_expert_error_ratio"])


@pytest.mark.parametrize("field", ["min_routing_overlap", "max_expert_error", "max_expert_error_ratio"])
def test_an_asked_routing_gate_is_refused_where_there_is_no_routing(field):
    with pytest.raises(MoepressError, match=f"--{field.replace('_', '-')}"):
        refuse_unmeasurable(CheckConfig(**{field: 0.5}, asked=(field,)), "routing", "pruned")


def test_every_gate_metric_reaches_the_manifest_and_publish_re_evaluates_it():
    """A gate's metric left out of the manifest's metrics makes `publish` refuse every checked artifact."""
    metrics = {g.metric: 0.0 for g in GATES}
    gates = evaluate_gates(CheckConfig(**{g.field: 0.0 for g in GATES}), metrics)
    result = {"passed": True, "failed": [], "reference": "r", "data": {}, "metrics": metrics, "error_jump": None,
              "gates": gates, "candidate": {"kind": "checkpoint"}}
    acc = accuracy_section(result)
    assert set(acc["metrics"]) >= {g.metric for g in GATES}
    applied, problems = recompute_gates(acc)
    assert problems == [] and len(applied) == len(GATES)


def test_the_expert_error_does_not_depend_on_the_batch_size(cli_run, tmp_path):
    """The 16 tokens each expert is probed on were spread over the first batch: --batch-size 8, 3, 1 read
    max_expert_error 0.123, 0.143, 0.118 for one int4-awq candidate (here 0.123 - 0.132). Taken from the
    first sample now; the blocks' errors from the first 8 samples."""
    q = tmp_path / "q"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "int4-awq", "--num-samples", "2", "--seq-len", "32",
                   "-o", q, "--quiet").exit_code == 0
    got, attention = set(), set()
    for b in (8, 3, 1):
        r = cli_run("check", q, "--reference", "tiny-qwen3-moe", "--max-samples", "4", "--seq-len", "64",
                    "--batch-size", b, "--quiet", "--json", "--max-ppl-increase", "none", "--min-top1", "none",
                    "--max-kl", "none", "--max-expert-error", "none")
        assert r.exit_code == 0, r.output
        m = json.loads(r.stdout)["metrics"]
        got.add(m["max_expert_error"])
        attention.add(m["max_attention_error_ratio"])
    # the same probe tokens: equal but for the float rounding of batched matmuls (measured 1.1e-7 relative)
    assert min(got) > 0 and max(got) / min(got) - 1 < 5e-7, got
    # the blocks on the first 8 samples, whatever the batches: taken from the first batch, the attention ratio
    # moved with the batch size
    assert min(attention) > 0 and max(attention) / min(attention) - 1 < 1e-5, attention

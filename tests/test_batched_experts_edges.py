"""ExpertBatch against the one-by-one quantizer (the reference, experts.BATCHED False) on the two cases the
batched INT4 path must hand back: gate and up whose all-zero columns differ (one shared factorisation would
use gate's dead columns for up), and a width no INT4 group divides (the quantizer leaves it unquantized)."""

import pytest
import torch
from test_batched_experts import B, _groups, _items, _run

from moepress.compress.quantize.config import QuantConfig
from moepress.compress.quantize.stats import LinearStats


def _gate_up_groups(width: int) -> list:
    """B experts' gate and up of ``width`` inputs, sharing one Hessian per expert (int4-gptq)."""
    W, xs, _ = _items(2, width=width)
    groups = []
    for b in range(B):
        st = LinearStats(hessian=True)
        st.add(xs[b])
        groups.append(("int4-gptq", [f"e{b}.gate", f"e{b}.up"], [W[b, 0], W[b, 1]], st))
    return groups


def _same(one, many):
    assert list(one.tensors) == list(many.tensors)
    for k, v in one.tensors.items():
        assert torch.equal(v, many.tensors[k]), k
    assert list(one.modules.items()) == list(many.modules.items())
    assert [s["module"] for s in one.skipped] == [s["module"] for s in many.skipped]


@pytest.mark.parametrize("fmt", ["int4-gptq", "int4-awq"])
def test_gate_and_up_with_different_dead_columns_batched_equal_one_by_one(fmt):
    cfg = QuantConfig(format=fmt, group_size=32, awq_gptq=fmt == "int4-awq")
    groups = _groups(fmt, cfg)
    for k in (0, 4, 8):  # gate/up pairs of experts 0, 2, 4: a column dead in gate only
        _, names, ws, _ = groups[k]
        ws[0][:, 3 + k] = 0
        assert not torch.equal((ws[0] == 0).all(0), (ws[1] == 0).all(0))
    _same(_run(groups, cfg, batched_int4=False, budget=1 << 40), _run(groups, cfg, batched_int4=True, budget=1 << 40))


def test_a_width_no_group_divides_is_left_unquantized_batched_too():
    """72 inputs, group 32: formats/_int4.py skips every such linear; the batch must skip them too (it built one
    GPTQ batch of them, with no group to quantize by)."""
    cfg = QuantConfig(format="int4-gptq", group_size=32)
    groups = _gate_up_groups(72)
    one = _run(groups, cfg, batched_int4=False, budget=1 << 40)
    assert len(one.skipped) == 2 * B and not one.modules  # 72 % 32: nothing quantized, each said
    _same(one, _run(groups, cfg, batched_int4=True, budget=1 << 40))


def test_experts_narrower_than_the_group_use_their_width_as_group_batched_too():
    """48 inputs, --group-size 64: int4.effective_group gives one group of 48 (min(group, width)), as the
    one-by-one quantizer stores it (one scale column); the batch must not use 64."""
    cfg = QuantConfig(format="int4-gptq", group_size=64)
    groups = _gate_up_groups(48)
    one = _run(groups, cfg, batched_int4=False, budget=1 << 40)
    assert not one.skipped and one.tensors["e0.gate.weight_scale"].shape[-1] == 1
    _same(one, _run(groups, cfg, batched_int4=True, budget=1 << 40))

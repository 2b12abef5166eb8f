"""exporters/ct_ignore.matches selects modules as compressed-tensors itself does (utils/match.py match_name:
exact name, or ``re:`` + re.match anchored at the start of the name)."""

import json

import pytest
from compressed_tensors.utils.match import match_name

from moepress import models
from moepress.exporters.ct_ignore import KIMI_IGNORE, ROUTERS, matches

NAMES = ["lm_head", "model.lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.gate_proj",
         "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.0.up_proj"]


@pytest.mark.parametrize("entry", [*KIMI_IGNORE, ROUTERS, "re:mlp", "re:model\\.layers\\.0", "re:lm_head",
                                   "model.layers.0.mlp.gate"])
def test_matches_agrees_with_compressed_tensors(entry):
    assert [matches(entry, n) for n in NAMES] == [match_name(n, entry) for n in NAMES]


ATTN, DENSE, ROUTER = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate"
EXPERT, SHARED = "model.layers.1.mlp.experts.0.up_proj", "model.layers.1.mlp.shared_experts.up_proj"


@pytest.mark.parametrize("ignore, quantized", [
    (["lm_head", ATTN, DENSE, SHARED], {EXPERT}),  # Kimi's split: its four patterns
    (["lm_head", ATTN, DENSE, SHARED, ROUTER], {EXPERT}),  # routers that are Linears: one pattern more
    (["lm_head", DENSE], {ATTN, EXPERT, SHARED}),  # attention quantized: no pattern may select it
])
def test_condensed_ignore_selects_what_compressed_tensors_should_skip(ignore, quantized):
    from moepress.exporters.ct_ignore import condensed

    out = condensed(ignore, quantized)
    assert all(any(match_name(n, e) for e in out) for n in ignore), out
    assert not any(match_name(q, e) for q in quantized for e in out), out
    if ROUTER not in ignore and ATTN in ignore:  # written exactly as moonshotai/Kimi-K2-Thinking writes it
        assert out == json.loads((models.path("tiny-kimi-k2-int4") / "config.json").read_text())[
            "quantization_config"]["ignore"]


def _expert_names(layers, experts=range(24), projs=("gate_proj", "up_proj", "down_proj")):
    return [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in layers for e in experts for p in projs]


@pytest.mark.parametrize("ignore, quantized", [
    # experts of layers 3-9 left bf16, layers 0-2 quantized; attention bf16 everywhere
    (_expert_names(range(3, 10)) + [f"model.layers.{i}.self_attn.q_proj" for i in range(10)] + ["lm_head"],
     set(_expert_names(range(3)))),
    # one expert of layer 5 quantized: that layer's others stay explicit where its number varies
    (_expert_names(range(3, 12)), {"model.layers.5.mlp.experts.7.down_proj"} | set(_expert_names(range(3)))),
])
def test_a_long_ignore_list_folded_into_patterns_selects_the_same_modules(ignore, quantized):
    """What compressed-tensors' own matcher selects among every module, ignored or quantized, is unchanged."""
    from moepress.exporters.ct_ignore import COLLAPSE_AT, collapsed

    ignore = [n for n in ignore if n not in quantized]
    assert len(ignore) > COLLAPSE_AT
    out = collapsed(ignore, quantized)
    assert len(out) < len(ignore) / 10, out
    for n in ignore:
        assert any(match_name(n, e) for e in out), n
    for q in quantized:
        assert not any(match_name(q, e) for e in out), q


def test_a_short_ignore_list_is_written_as_it_is():
    from moepress.exporters.ct_ignore import COLLAPSE_AT, collapsed

    ignore = _expert_names(range(2), range(COLLAPSE_AT // 6))
    assert collapsed(ignore, set()) == ignore

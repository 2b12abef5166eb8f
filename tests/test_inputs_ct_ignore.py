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

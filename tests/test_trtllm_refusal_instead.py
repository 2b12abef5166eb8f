"""Every refusal of exporters/trtllm_refusals.py refuse_unwritten_attention names ``instead``
when a recipe gives one (only the sliding-window branch is covered by tests/test_run_preflight.py)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moepress.errors import MoepressError
from moepress.exporters.trtllm_refusals import refuse_unwritten_attention

INSTEAD = "for this recipe, drop trtllm-ckpt from export.formats"


def _adapter(dense=(), act="silu", rope="default", window=None):
    cfg = SimpleNamespace(hidden_act=act, sliding_window=window, max_position_embeddings=1024)
    return SimpleNamespace(hf_config=cfg, num_layers=4, is_moe_layer=lambda i: i not in dense,
                           layer_kind=lambda: "", build_rotary=lambda: SimpleNamespace(rope_type=rope))


@pytest.mark.parametrize("adapter, names, needle", [
    (_adapter(dense=(0,)), [], "dense"),
    (_adapter(act="gelu"), [], "hidden_act 'gelu'"),
    (_adapter(rope="yarn"), [], "rope_type 'yarn'"),
    (_adapter(), ["model.layers.0.self_attn.q_proj.bias"], "linear biases"),
    (_adapter(window=64), [], "sliding_window 64"),
], ids=["dense", "hidden-act", "rope", "bias", "window"])
def test_every_refusal_names_the_recipes_way(adapter, names, needle):
    reader = SimpleNamespace(names=lambda: names)
    with pytest.raises(MoepressError) as e:
        refuse_unwritten_attention(Path("/nonexistent/m"), adapter, reader, instead=INSTEAD)
    assert needle in str(e.value) and str(e.value).endswith(": " + INSTEAD), str(e.value)


def test_a_model_it_writes_is_not_refused():
    refuse_unwritten_attention(Path("/nonexistent/m"), _adapter(window=4096), SimpleNamespace(names=lambda: []),
                               instead=INSTEAD)

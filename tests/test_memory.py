"""Peak memory of a streamed forward is a few layers, not the model.

The README promises "about three float32 layers" for a streamed forward (the running layer and the
next one read ahead and built); measured 3.0 float32 layers. Peak: the kernel's high-water mark of
a child process (tests/memprobe.py).
"""

import pytest

from memprobe import MB, run_probe
from moepress.compress.synthetic import write_synthetic

CONFIG = dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=512, hidden_size=256,
              intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=10, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True)
# float32 bytes of one decoder layer: experts + attention (q, k, v, o) + router (49 MB)
LAYER_FP32 = 32 * 3 * 256 * 512 * 4 + 4 * (256 * 256 * 2 + 256 * 128 * 2) + 32 * 256 * 4
ACTIVATIONS = 16 * MB  # 2 x 64 tokens: hidden states, attention, routed expert inputs (~1 MB), allocator slack

PROBE = """
    import json, sys, torch
    from moepress.compress.stream import StreamedModel
    sm = StreamedModel(sys.argv[1])
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    sm.forward([ids])  # warm-up: first-use allocations of torch itself
    base = reset_peak()
    logits = sm.forward([ids])[0]
    print(json.dumps({"grew": peak() - base, "finite": bool(torch.isfinite(logits).all())}))
"""


@pytest.fixture(scope="module")
def grew(tmp_path_factory):
    ckpt = write_synthetic(CONFIG, tmp_path_factory.mktemp("memory") / "synthetic", seed=0)
    r = run_probe(PROBE, ckpt)
    assert r["finite"]
    return r["grew"]


def _msg(grew: int) -> str:
    return f"peak grew {grew / MB:.1f} MB = {grew / LAYER_FP32:.2f} float32 layers of {LAYER_FP32 / MB:.1f} MB"


def test_streamed_forward_peak_rss_is_three_layers_not_the_model(grew):
    # measured 146.7 MB = 3.00 float32 layers (three runs): the running layer, the next layer's stored
    # tensors and its float32 state being built, the layer after it read ahead; the model is 10 layers
    assert grew < 3.25 * LAYER_FP32, _msg(grew)


EMBED_PROBE = """
    import json, sys, torch
    import torch.nn.functional as F
    from moepress.compress.stream import StreamedModel
    sm = StreamedModel(sys.argv[1])
    ids = torch.randint(0, sm.adapter.hf_config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    sm.embed([ids[:, :4]])  # warm-up
    base = reset_peak()
    got = sm.embed([ids])[0]
    grew = peak() - base
    want = F.embedding(ids, sm.ckpt.get(sm.adapter.embed_name).float())
    print(json.dumps({"grew": grew, "equal": bool(torch.equal(got, want)), "dtype": str(got.dtype)}))
"""


def test_embedding_lookup_holds_the_table_as_stored_not_a_float32_copy(tmp_path):
    """The input embedding is gathered from the table as stored (bf16 here) and only the gathered rows are
    cast: the whole table in float32 would be twice its stored bytes on top of them (Kimi K2: 4.7 GB). A
    16-million-parameter table: 32 MB stored, 64 MB in float32."""
    cfg = {**CONFIG, "vocab_size": 131072, "hidden_size": 128, "head_dim": 32, "intermediate_size": 64,
           "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1}
    r = run_probe(EMBED_PROBE, write_synthetic(cfg, tmp_path / "big-vocab", seed=0))
    stored = 131072 * 128 * 2
    assert r["equal"] and r["dtype"] == "torch.float32"
    # measured 31.9 MB (the table as stored); reading it into float32 as well: 95.9 MB (3x)
    assert r["grew"] < 2 * stored, f"peak grew {r['grew'] / MB:.1f} MB, the table is {stored / MB:.0f} MB stored"

"""The hook points of compress/moe.py against their references: ``expert_rows`` against the
``torch.where(indices == e)`` loop of transformers' experts (which skips experts no token chose), and
``AttentionObserver`` against the keys and values transformers' own cache stores."""

import gc
import weakref

import torch
import transformers as tf

from helpers import TINY
from moepress.compress.moe import AttentionObserver, expert_rows


def test_expert_rows_are_transformers_where_loop_over_the_hit_experts():
    """transformers' experts loop: ``for e in expert_hit: token_idx, top_k_pos = torch.where(expert_mask[e])``,
    hit experts only, ascending; expert 5 is chosen by no token here and must not be reported."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 8, generator=g)
    scores[:, 5] = -1.0
    indices = scores.topk(3, dim=-1).indices  # [T, k], distinct experts per token
    want = [(e, *torch.where(indices == e)) for e in range(8) if (indices == e).any()]
    got = list(expert_rows(indices, 8))
    assert [e for e, _, _ in got] == [e for e, _, _ in want] and 5 not in [e for e, _, _ in got]
    for (e, tok, slot), (_, wt, ws) in zip(got, want, strict=True):
        assert torch.equal(tok, wt) and torch.equal(slot, ws), e


def _tiny_qwen3():
    torch.manual_seed(0)
    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**TINY["qwen3_moe"])).eval()


def test_attention_observer_sees_what_transformers_caches_and_remove_restores_the_module():
    model = _tiny_qwen3()
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    attn = model.model.layers[1].self_attn
    seen = []
    with torch.no_grad():
        want = model(ids).logits
        obs = AttentionObserver(attn, lambda k, v: seen.append((k.clone(), v.clone())))
        out = model(ids, use_cache=True)
        cache = out.past_key_values.layers[1]
        assert len(seen) == 1
        assert torch.equal(seen[0][0], cache.keys) and torch.equal(seen[0][1], cache.values)
        assert torch.equal(out.logits, want)  # observing changes nothing
        obs.remove()
        assert attn.config is model.config and not hasattr(attn, "moepress_observer")
        assert torch.equal(model(ids).logits, want) and len(seen) == 1  # no longer observed


def test_an_observed_attention_module_is_freed_when_dropped():
    """A check's candidate with an FP8 KV cache keeps its layers' observers attached: the module and its observer
    referred to each other, so each dropped layer's attention (its stored weights) lived until the garbage
    collector's next cycle. Collection off: a dropped module is freed at once."""
    attn = _tiny_qwen3().model.layers[1].self_attn
    AttentionObserver(attn, lambda k, v: None)
    ref = weakref.ref(attn)
    gc.disable()
    try:
        del attn
        assert ref() is None
    finally:
        gc.enable()

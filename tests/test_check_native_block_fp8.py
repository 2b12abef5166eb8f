"""A native (DeepSeek-layout) block-FP8 checkpoint checked as its runtimes run it: the linears whose inputs the
runtimes quantize per token in 1x128 groups get the check's activation quant, dense linears with a partial
last block of output rows included (kernel_widths.runs_in_blocks: "A dense output with a partial last block
runs", DeepSeek-V3's 576-row kv_a_proj_with_mqa). Here k_proj / v_proj are 64 rows (1 KV head of 64) with
128 inputs: dense, partial output block, whole input groups, so they must be hooked; the expected set is
computed by hand from the shapes written."""

from __future__ import annotations

from helpers import make_random_checkpoint, to_block_fp8
from moepress.checks.candidates.checkpoint import runtime_activations
from moepress.compress.stream import StreamedModel


def test_dense_linears_with_a_partial_output_block_get_the_runtimes_activation_quant(tmp_path):
    ref = make_random_checkpoint("qwen3_moe", tmp_path / "ref", vocab_size=256, hidden_size=128, head_dim=64,
                                 num_attention_heads=2, num_key_value_heads=1, moe_intermediate_size=128,
                                 intermediate_size=256, num_hidden_layers=1)
    native = tmp_path / "native"
    to_block_fp8(ref, native)
    sm = runtime_activations(StreamedModel(str(native), prefetch=False, keep_stored=True))
    _, layer = next(sm.layers())
    hooked = {n for n, m in layer.named_modules() if m._forward_pre_hooks}
    attn = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert attn <= hooked, sorted(hooked)

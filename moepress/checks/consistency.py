"""Is the candidate the reference's model at all? Refused before either is run: a candidate of another family,
and one whose config.json says another model than the reference's in a setting no moepress stage changes.

The runtimes build the model from config.json: an export whose ``rms_norm_eps``, rope, activation, routing
(top-k, renormalisation, scaling, groups) or tied embeddings differ from the reference's runs another model,
one the whole-model gates may not tell apart (an ``rms_norm_eps`` x100 moves perplexity less than quantization
noise; a ``tie_word_embeddings`` flipped is not read by the streamed check at all, while a loader that honours it
replaces lm_head with the embedding). Prune keeps every one of them (it keeps top-k and the group counts:
compress/prune/budget.py); quantize and the exporters copy them.
"""

from __future__ import annotations

from pathlib import Path

from moepress.checks.candidates.base import config_json
from moepress.checks.candidates.onnx_runtime import graph_family
from moepress.compress.arch import adapter_class
from moepress.compress.arch.base import Adapter
from moepress.errors import MoepressError

# transformers config attributes that define the model a runtime builds, which no stage changes: its layers and
# feed-forward widths (a candidate of other widths ran against the reference, its figures drifting: the two streams
# of unequal layer counts raced), its attention, rope and routing
# (the hidden size and vocabulary are compared apart, with the candidate loaded: checks/runner.py); rope_parameters
# before rope_scaling, transformers 5's name for what the older key also reads; rope_interleave: DeepSeek-V3's
# rotary layout (transformers' DeepseekV3Config, default true), which swaps the rotary halves when false
SAME = ("num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_shared_experts",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "rope_interleave", "tie_word_embeddings",
        "sliding_window",
        "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "scoring_func",
        "topk_method", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers",
        "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


def refuse_other_family(candidate: Path, reference, ref: Adapter) -> Adapter | None:
    """One line where ``candidate`` (its config.json, beside an ONNX file its folder's, else its graph's name) is
    another family than the reference's, before it is loaded: with the same vocabulary it would run, and fail or
    pass on numbers of two unrelated models. Returns the adapter its config.json builds, for
    :func:`refuse_other_config` (None: no config.json, or one moepress does not stream or refuses: its loader
    says)."""
    conf = config_json(candidate if candidate.is_dir() else candidate.parent)
    try:
        cls = adapter_class(conf or {})
    except MoepressError:  # no config.json, or an architecture moepress does not stream
        cls = None
    other = cls.family if cls is not None else graph_family(candidate)
    if other is not None and other != ref.family:
        raise MoepressError(f"{candidate}: a {other} model, the reference {reference} is {ref.family}; expected "
                            "the checkpoint the candidate was made from")
    try:
        return cls(conf) if cls is not None else None
    except MoepressError:
        return None


def refuse_other_config(candidate: Path, reference, ref: Adapter, cand: Adapter | None) -> None:
    """One line where the candidate's config.json (``cand``: its adapter) sets one of ``SAME`` otherwise than
    the reference's."""
    folder = candidate if candidate.is_dir() else candidate.parent
    for key in SAME if cand is not None else ():
        mine, theirs = getattr(cand.hf_config, key, None), getattr(ref.hf_config, key, None)
        if mine != theirs:
            raise MoepressError(f"{folder / 'config.json'}: {key} is {mine!r}, the reference {reference} has "
                                f"{theirs!r}; expected the model the candidate was made from (no moepress stage "
                                "changes it: runtimes would build another model)")

"""Every config.json key the check holds the candidate to (checks/consistency.py SAME: what defines the model a
runtime builds, which no moepress stage changes) is compared: a candidate with any one of them changed is refused
before it is loaded, naming the key. A key dropped from SAME is no longer compared, and a candidate the runtime builds
another way (routed_scaling_factor 2.25 where the reference has 2.5) passed every default gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moepress import models
from moepress.checks.consistency import refuse_other_config
from moepress.compress.arch import adapter_class
from moepress.errors import MoepressError

# keys this transformers drops from a config that sets them (the runtime builds the reference's model): legacy
# rope_theta beside rope_parameters, Qwen3-MoE's sliding_window without use_sliding_window; and keys the adapter
# itself refuses any other value of (DeepSeek-V3's routing: compress/arch)
NOT_KEPT = {"rope_theta", "sliding_window", "scoring_func", "topk_method"}


def _other(v):
    """A value unlike ``v`` of the kind the config takes."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int | float):
        return v * 2
    if isinstance(v, str):
        return {"silu": "gelu"}.get(v, v + "x")
    if isinstance(v, dict):
        return {**v, "rope_theta": 2 * v.get("rope_theta", 1.0)}
    if isinstance(v, list):
        return [*v, 1]
    return 1


def _refused(conf: dict, key: str, value) -> str | None:
    ref = adapter_class(conf)(conf)
    changed = {**conf, key: value}
    try:
        cand = adapter_class(changed)(changed)
        refuse_other_config(Path("cand"), "ref", ref, cand)
    except MoepressError as e:
        return str(e)
    return None


# written out here, not read from SAME: a key dropped there fails its case
KEYS = ("num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_shared_experts",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta",
        "rope_scaling", "rope_parameters", "rope_interleave", "tie_word_embeddings", "sliding_window",
        "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "scoring_func",
        "topk_method",
        "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


@pytest.mark.parametrize("key", KEYS)
def test_each_key_no_stage_changes_is_compared(key):
    confs = [json.loads((models.path(m) / "config.json").read_text()) for m in ("tiny-deepseek-v3", "tiny-qwen3-moe")]
    values = {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    lines = [_refused(c, key, values.get(key, _other(c.get(key)))) for c in confs]
    if key in NOT_KEPT:
        return
    # transformers 5 reads rope_scaling into rope_parameters: an edit of either is named as rope_parameters
    named = {key, "rope_parameters"} if key == "rope_scaling" else {key}
    assert any(line and any(f"{k} is " in line for k in named) for line in lines), (key, lines)


def test_a_candidate_with_another_routed_scaling_factor_is_refused(cli_run, tmp_path):
    import shutil

    from helpers import assert_one_line_error

    out = shutil.copytree(models.path("tiny-deepseek-v3"), tmp_path / "c")
    conf = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**conf, "routed_scaling_factor": 2.25}))
    r = cli_run("check", out, "--reference", models.path("tiny-deepseek-v3"), "--max-samples", "2", "--seq-len", "32")
    assert_one_line_error(r, "routed_scaling_factor is 2.25", "has 2.5")

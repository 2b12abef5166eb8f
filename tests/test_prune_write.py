"""The pruned checkpoint as written: a declared MTP layer reported as written, float16 experts merged in float16, Kimi
INT4 groups that outgrew their stored scale re-scaled as compressed-tensors quantizes."""

import json

import torch
from test_prune import write_deepseek_with_mtp

from helpers import QWEN_SMALL as QWEN
from moepress.compress.checkpoint import CheckpointReader
from moepress.compress.prune import PruneConfig, prune_checkpoint
from moepress.compress.synthetic import write_synthetic


def test_a_declared_mtp_layer_is_written_and_not_reported_as_unwritten(tmp_path):
    """The MTP layer (declared by num_nextn_predict_layers=1) is pruned and written: prune_report.json must not
    list it under layers_not_written (which tells a user the layer is gone)."""
    src = write_deepseek_with_mtp(tmp_path)
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="frequency", keep=8),
                     batches=[torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))])
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["mtp_layers"] == [2] and CheckpointReader(out).layer_indices() == [0, 1, 2]
    assert "layers_not_written" not in rep, rep["layers_not_written"]


def test_merged_float_experts_keep_the_stored_float_dtype(tmp_path):
    """A float16 checkpoint merged: every written tensor (the refit down projections included) is float16, as the
    input stores it, and the report says so; a cast to bf16 would mix dtypes and round the refit to 8 bits."""
    src = write_synthetic(QWEN, tmp_path / "fp16", dtype=torch.float16)
    out = tmp_path / "m"
    prune_checkpoint(src, out, PruneConfig(method="merge", keep=8),
                     batches=[torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))])
    rows = json.loads((out / "prune_report.json").read_text())["layers"]
    assert any(r["merged"] for r in rows)
    assert all(m["stored_as"] == "float16" for r in rows for m in r["merged"].values())
    r = CheckpointReader(out)
    wrong = {n: r.get_dtype(n) for n in r.names() if r.get_dtype(n) != torch.float16}
    assert not wrong, wrong


def test_ct_int4_group_whose_codes_reach_plus_8_on_the_old_scale_gets_a_fresh_scale():
    """A merged group that no longer fits the input's scale (a value rounds to +8, past INT4's +7) is re-scaled
    as compressed-tensors would quantize it (minmax amax / 7.5), not clipped to 7 x the old scale."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from moepress.compress.prune.merge import encode_ct_int4

    out_f, in_f, group = 24, 96, 32
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    wg = w.view(out_f, in_f // group, group)
    top = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))
    wg = wg * top.sign()  # each group's largest magnitude positive: on the old scale it is code +8
    w = wg.reshape(out_f, in_f)
    old = (wg.amax(-1).float() / 8).to(torch.bfloat16)  # the input's scale, which the merged groups outgrew
    ratio = wg.amax(-1).float() / old.float()
    assert ((ratio >= 7.5) & (ratio < 8.5)).all()

    got = encode_ct_int4(_stub_reader(out_f, in_f, old), "e", w.float(), ["e.weight_packed", "e.weight_scale",
                                                                           "e.weight_shape"])
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    scale, zp = calculate_qparams(wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0), args)
    q = quantize(w, scale, zp, args, dtype=torch.int8)
    assert torch.equal(got["e.weight_scale"], scale)
    assert torch.equal(got["e.weight_packed"], pack_to_int32(q, 4))


def _stub_reader(out_f: int, in_f: int, scale: torch.Tensor):
    """A reader holding one pack-quantized INT4 module ``e`` whose stored scale is ``scale``."""
    class R:
        path = "stub"
        t = {"e.weight_packed": torch.zeros(out_f, in_f // 8, dtype=torch.int32), "e.weight_scale": scale,
             "e.weight_shape": torch.tensor([out_f, in_f])}

        def get(self, n):
            return self.t[n]

    return R()


def test_ct_int4_group_the_refit_shrank_gets_compressed_tensors_scale():
    """A group whose values still fit the input's scale keeps it, unless that scale is over twice compressed-tensors'
    own (amax / 7.5): a group the refit shrank 10x was written on the coarse old grid, relative error ~1 (0.1 on
    its own). Rows 0-11: old scale 10x the fresh one -> the library's scale and codes; rows 12-23: old scale
    7.5 / 7 of it -> kept."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    from moepress.compress.prune.merge import encode_ct_int4

    out_f, in_f, group = 24, 64, 32
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    wg = w.view(out_f, in_f // group, group)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group)
    fresh, _ = calculate_qparams(wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0), args)
    old = fresh.float() * torch.where(torch.arange(out_f)[:, None] < 12, 10.0, 7.5 / 7)
    old = old.to(torch.bfloat16)

    got = encode_ct_int4(_stub_reader(out_f, in_f, old), "e", w.float(), ["e.weight_packed", "e.weight_scale",
                                                                           "e.weight_shape"])["e.weight_scale"]
    assert torch.equal(got[:12], fresh[:12]) and torch.equal(got[12:], old[12:])


def test_a_deepseek_config_naming_the_expert_count_twice_is_rewritten_under_both_keys(tmp_path):
    """num_local_experts is transformers' alias of DeepSeek's n_routed_experts (attribute_map): where a config.json
    holds both, transformers takes the one the file sets last. Prune rewrote n_routed_experts alone, so transformers
    built 32 experts over 16 stored ones and refused the output (size mismatch). Both keys now say 16, and
    transformers' own config class reads 16."""
    import shutil

    import transformers

    from moepress import models

    src = tmp_path / "src"
    shutil.copytree(models.path("tiny-deepseek-v3"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_local_experts": cfg["n_routed_experts"]}, sort_keys=True))
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="frequency", ratio=0.5),
                     batches=[torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))])
    written = json.loads((out / "config.json").read_text())
    assert written["n_routed_experts"] == written["num_local_experts"] == 16
    assert transformers.AutoConfig.from_pretrained(out).n_routed_experts == 16
    assert CheckpointReader(out).info("model.layers.1.mlp.gate.weight").shape[0] == 16


def test_prune_says_what_transformers_misreads_in_its_output(tmp_path):
    """DeepSeek's moe_layer_freq 2: transformers builds every layer as MoE (test_export_ct.py), in the pruned output
    as in its input. Prune said nothing; the note is in its constraints (printed, prune_report.json)."""
    from moepress import models

    cfg = json.loads((models.path("tiny-deepseek-v3") / "config.json").read_text())
    cfg.update(num_hidden_layers=3, first_k_dense_replace=0, moe_layer_freq=2, n_routed_experts=8, n_group=1,
               topk_group=1, num_experts_per_tok=2)
    src = write_synthetic(cfg, tmp_path / "src", seed=0)
    out = tmp_path / "p"
    prune_checkpoint(src, out, PruneConfig(method="frequency", keep=4),
                     batches=[torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))])
    notes = json.loads((out / "prune_report.json").read_text())["constraints"]
    assert any(n.startswith("note: transformers builds every layer") and "moe_layer_freq 2" in n for n in notes), notes

"""--awq-fold with attention_bias: true (Qwen3-MoE): the v_proj -> o_proj fold scales v_proj's rows by p and
o_proj's columns by 1/p; v_proj's bias is scaled by p too, or o_proj's output would gain W_o (b / p - b)."""
import shutil
from pathlib import Path

import torch

from moepress.compress.checkpoint import CheckpointReader

ROOT = Path(__file__).resolve().parent.parent


def _model(tmp: Path) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    c = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                       attention_bias=True, vocab_size=4096, max_position_embeddings=1024, initializer_range=0.08,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    m = Qwen3MoeForCausalLM(c).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("v_proj.bias"):
                p.normal_(0, 1.0)
    d = tmp / "qwen-bias"
    m.to(torch.bfloat16).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(ROOT / "models/tiny-mixtral" / f, d / f)
    return d


def test_fold_scales_v_proj_bias(tmp_path, cli_run, monkeypatch):
    from moepress.compress.quantize import fold

    applied = {}  # the row vector each v_proj -> o_proj fold applies, as the fold hands it over
    real = fold.FoldedWeights.__init__

    def spy(self, linears, cols, rows):
        applied.update({n: p.detach().float().cpu().clone() for n, p in rows.items() if n.endswith("v_proj")})
        real(self, linears, cols, rows)

    monkeypatch.setattr(fold.FoldedWeights, "__init__", spy)
    src = _model(tmp_path)
    out = tmp_path / "q"
    r = cli_run("quantize", src, "--format", "int4-awq", "--awq-fold", "--quiet",
                "--num-samples", "8", "--seq-len", "64", "-o", out)
    assert r.exit_code == 0, r.output
    assert applied, "no v_proj -> o_proj fold happened; the test needs one"
    o, q = CheckpointReader(str(src)), CheckpointReader(str(out))
    n = "model.layers.1.self_attn.v_proj.weight"  # the last layer: the one whose fold the spy kept
    p = applied["self_attn.v_proj"]
    wo, wq = o.weight(n, torch.float32), q.weight(n, torch.float32)
    # the stored rows carry p (up to INT4 rounding), and so does the stored bias (up to its bf16 rounding)
    torch.testing.assert_close((wq * wo).sum(1) / (wo * wo).sum(1), p, rtol=0.25, atol=0)
    assert (p - 1).abs().max() > 0.05  # a fold that scales something
    bo, bq = o.get(n[:-6] + "bias").float(), q.get(n[:-6] + "bias").float()
    torch.testing.assert_close(bq, (bo * p).bfloat16().float(), rtol=0.01, atol=1e-6)

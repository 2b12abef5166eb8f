"""Write a Kimi-K2-shaped MoE checkpoint of any size with random weights, never holding it in memory.

Same structure as Kimi K2 (DeepSeek-V3 family: MLA attention, sigmoid routing with correction
bias, one shared expert, first layer dense, block-FP8 optional), with its widths scaled by one
factor and the layer / expert counts chosen on the command line, sized to ``--size-gb``:

    python bench/make_synthetic.py --size-gb 30 --layers 16 --experts 64 -o /data/kimi-30g
    python bench/make_synthetic.py --size-gb 2 --block-fp8 -o /tmp/kimi-2g-fp8

Shards are written per layer (like the real checkpoint's 61 shards); peak memory is about one
layer. Prints the chosen shape, the size on disk and the time taken.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIMI = ROOT / "tests" / "data" / "kimi-k2-config.json"


def _round(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def scaled_config(f: float, layers: int, experts: int, top_k: int, vocab: int) -> dict:
    """Kimi K2's config with hidden/intermediate/MLA widths scaled by ``f`` (multiples of 128 where
    block FP8 needs them), ``layers`` decoder layers and ``experts`` routed experts."""
    cfg = json.loads(KIMI.read_text())
    heads = max(1, int(round(64 * f)))
    cfg.update({
        "hidden_size": _round(7168 * f, 128), "intermediate_size": _round(18432 * f, 128),
        "moe_intermediate_size": _round(2048 * f, 128), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "n_routed_experts": experts,
        "num_experts_per_tok": min(top_k, experts), "q_lora_rank": _round(1536 * f, 128),
        "kv_lora_rank": _round(512 * f, 128), "vocab_size": vocab, "n_group": 1, "topk_group": 1,
    })
    cfg.pop("auto_map", None)
    cfg["model_type"] = "kimi_k2"
    return cfg


def size_bytes(cfg: dict, block_fp8: bool) -> int:
    """Bytes on disk: parameters counted from the adapter's own layer modules (meta device)."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.inspect import param_counts

    a = get_adapter(cfg)
    total = param_counts(a)["total"]
    if not block_fp8:
        return 2 * total
    h, v = a.hidden_size, a.vocab_size
    embed = h * v * (1 if a.tie_word_embeddings else 2)
    return (total - embed) + 2 * embed  # decoder linears ~1 byte (+ tiny scales), embeddings bf16


def choose(size_gb: float, layers: int, experts: int, top_k: int, vocab: int, block_fp8: bool) -> dict:
    lo, hi = 0.01, 4.0
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        if size_bytes(scaled_config(mid, layers, experts, top_k, vocab), block_fp8) > size_gb * 1e9:
            hi = mid
        else:
            lo = mid
    return scaled_config(lo, layers, experts, top_k, vocab)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, required=True, help="Target size on disk (GB, 1e9 bytes).")
    ap.add_argument("--layers", type=int, default=16, help="Decoder layers (Kimi K2: 61).")
    ap.add_argument("--experts", type=int, default=64, help="Routed experts per MoE layer (Kimi K2: 384).")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768, help="Vocabulary (Kimi K2: 163840).")
    ap.add_argument("--block-fp8", action="store_true", help="Decoder linears in DeepSeek block FP8, as Kimi K2 ships.")
    ap.add_argument("--tokenizer", default="tiny-qwen3-moe",
                    help="Copy this checkpoint's tokenizer (a directory or bundled name) so calibration runs; "
                         "its vocabulary must not exceed --vocab.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("-o", "--output", required=True, type=Path)
    a = ap.parse_args(argv)

    import torch

    from moepress.compress.synthetic import write_synthetic
    from moepress.models import resolve as resolve_model

    if a.tokenizer:
        # token ids at or above --vocab would fail calibration only later, at the first embedding lookup
        src = json.loads((resolve_model(a.tokenizer) / "config.json").read_text()).get("vocab_size", 0)
        if src > a.vocab:
            ap.error(f"--tokenizer {a.tokenizer}: its vocabulary is {src} tokens, more than --vocab {a.vocab}")

    torch.set_num_threads(1)
    cfg = choose(a.size_gb, a.layers, a.experts, a.top_k, a.vocab, a.block_fp8)
    print(f"shape: hidden {cfg['hidden_size']}, moe_intermediate {cfg['moe_intermediate_size']}, "
          f"{cfg['num_hidden_layers']} layers x {cfg['n_routed_experts']} experts (top-{cfg['num_experts_per_tok']}), "
          f"vocab {cfg['vocab_size']}, {'block-FP8' if a.block_fp8 else 'bf16'}; "
          f"expected {size_bytes(cfg, a.block_fp8) / 1e9:.2f} GB", flush=True)
    t0 = time.monotonic()

    def on_layer(i, n):
        el = time.monotonic() - t0
        print(f"  layer {i + 1}/{n} written, {el:.0f}s, ETA {el / (i + 1) * (n - i - 1):.0f}s", flush=True)

    write_synthetic(cfg, a.output, seed=a.seed, block_fp8=a.block_fp8, force=a.force, on_layer=on_layer)
    if a.tokenizer:
        import shutil

        from moepress.compress.checkpoint import aux_files
        from moepress.manifest import file_digests, read_manifest, update_manifest

        for p in aux_files(resolve_model(a.tokenizer)):
            if p.name.startswith("tokenizer") or p.suffix == ".jinja":
                shutil.copy2(p, a.output / p.name)
        update_manifest(a.output, files=file_digests(a.output, read_manifest(a.output).get("files")))
    size = sum(p.stat().st_size for p in a.output.glob("*.safetensors"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {a.output}: {size / 1e9:.2f} GB in {time.monotonic() - t0:.0f}s, peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

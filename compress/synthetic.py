"""Random-weight checkpoints of any supported family and size, written one layer at a time.

The shapes come from the adapter's own layer modules (built on the meta device), so a
synthetic checkpoint has exactly the structure of the real model its config describes
(a Kimi-K2-shaped one with scaled widths, say) and never exists whole in memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint import DTYPE_NAMES, CheckpointWriter
from moepress.compress.formats import fp8_block
from moepress.compress.quant.fp8 import quantize_block


def _generator(seed: int, name: str) -> torch.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(h & (2**63 - 1))


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Deterministic per (seed, name): norms 1, biases small, matrices N(0, 1/sqrt(fan_in))."""
    g = _generator(seed, name)
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.01
    std = 0.02 if name.endswith("embed_tokens.weight") or len(shape) < 2 else shape[-1] ** -0.5
    return torch.randn(shape, generator=g) * std


def _is_block_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """Which tensors DeepSeek-V3 / Kimi K2 ship in block FP8: decoder-layer linears except routers."""
    return ".layers." in name and name.endswith(".weight") and t.ndim == 2 and ".gate.weight" not in name


def write_synthetic(config: dict, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    block_fp8: bool = False, max_shard_bytes: int = 2 * 1024**3, force: bool = False,
                    on_layer: Callable[[int, int], None] | None = None) -> Path:
    """Write a checkpoint for ``config`` (config.json dict) with random weights; returns its path."""
    adapter = get_adapter(config)
    cfg = dict(config)
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")  # transformers 5 reads dtype
    if block_fp8:
        cfg["quantization_config"] = fp8_block.quantization_config()
    else:
        cfg.pop("quantization_config", None)
    assert dtype in DTYPE_NAMES

    def stored(name: str, shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
        t = random_tensor(name, shape, seed)
        if block_fp8 and _is_block_fp8_weight(name, t):
            q, s = quantize_block(t)
            return [(name, q), (name[: -len(".weight")] + ".weight_scale_inv", s)]
        keep32 = adapter.keep_fp32(name) and name.endswith("bias")
        return [(name, t if keep32 else t.to(dtype))]

    # a layer's tensors are drawn (and block-quantized) by a few threads at once (each has its own
    # generator, so the bytes do not depend on the order): a real-width layer is billions of values
    with CheckpointWriter(out, force=force, max_shard_bytes=max_shard_bytes) as w, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        def put_all(shapes: dict[str, tuple[int, ...]]) -> None:
            for pairs in pool.map(lambda item: stored(*item), shapes.items()):
                for name, t in pairs:
                    w.add(name, t)

        h, v = adapter.hidden_size, adapter.vocab_size
        put_all({adapter.embed_name: (v, h)})
        for i in range(adapter.num_layers):
            with torch.device("meta"):
                layer = adapter.build_layer(i)
            prefix = adapter.layer_prefix(i)
            put_all({prefix + key: tuple(p.shape) for key, p in layer.state_dict().items()})
            w.end_shard()
            if on_layer is not None:
                on_layer(i, adapter.num_layers)
        w.add(adapter.norm_name, torch.ones(h).to(dtype))
        if not adapter.tie_word_embeddings:
            put_all({adapter.head_name: (v, h)})
        w.write_json("config.json", cfg)
    return Path(out)

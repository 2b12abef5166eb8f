"""What the model's config.json allows of a calibration set: its positions (``max_position_embeddings``) and its
token ids (``vocab_size``, the embedding's rows). A directory without config.json (a tokenizer alone) allows
anything."""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.compress.checkpoint import read_config_file
from moepress.errors import MoepressError


def _config_int(d: Path, key: str) -> int | None:
    """config.json's ``key`` (or its ``text_config``'s) where it is a whole number >= 1; None otherwise."""
    if not (d / "config.json").is_file():
        return None
    cfg = read_config_file(d / "config.json")  # unreadable / not an object: one line naming it
    text = cfg.get("text_config")
    v = cfg.get(key) or (text.get(key) if isinstance(text, dict) else None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_positions(model_dir: str | Path, seq_len: int) -> None:
    """Refuse samples longer than the model's ``max_position_embeddings``: positions past it were never trained,
    so statistics and perplexities taken there describe no input the model is meant to see."""
    d = Path(model_dir)
    if d.is_file():
        raise MoepressError(f"{model_dir}: expected a model directory, got a file")
    m = _config_int(d, "max_position_embeddings")
    if m is not None and m < seq_len:
        raise MoepressError(f"--seq-len {seq_len}: {model_dir} has max_position_embeddings {m}; expected at most {m}")


def check_generation(model_dir: str | Path, prompt: int, new_tokens: int) -> None:
    """Refuse greedy generations (check's ``--generate``) whose last forward, over the ``prompt`` tokens and all but
    the last of ``new_tokens``, passes the model's ``max_position_embeddings``, as :func:`check_positions` refuses
    long samples."""
    m = _config_int(Path(model_dir), "max_position_embeddings")
    if m is not None and prompt + new_tokens - 1 > m:
        raise MoepressError(f"--gen-tokens {new_tokens}: after a {prompt}-token prompt, {model_dir} has "
                            f"max_position_embeddings {m}; expected at most {max(m - prompt + 1, 0)}")


def check_embedding_rows(model_dir: Path, ids: torch.Tensor, src: torch.Tensor, specs) -> None:
    """Refuse token ids past the model's embedding (``vocab_size``): a tokenizer larger than the model's table gave
    them, and every stage would refuse them later (``calib prepare`` wrote a file none could use). ``src``: each
    row's source, an index into ``specs``."""
    n = _config_int(Path(model_dir), "vocab_size")
    if n is None or not ids.numel() or int(ids.max()) < n:
        return
    r = int((ids >= n).any(dim=1).nonzero()[0])
    raise MoepressError(f"--calib {specs[int(src[r])].spec}: token id {int(ids[r].max())} is past the model's "
                        f"embedding (config.json vocab_size {n}): the tokenizer of {model_dir} is larger than the "
                        "model")

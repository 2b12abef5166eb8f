"""Calibration and evaluation text -> token batches.

(Minimal version from the foundation issue; the calibration issue extends it with
sources, mixing, caching.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.errors import MoepressError

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CALIB = DATA_DIR / "calib.txt"
DEFAULT_EVAL = DATA_DIR / "eval.txt"


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise MoepressError(f"{model_dir}: the tokenizer needs its own Python code; "
                                f"pass --trust-remote-code to allow it") from None
        raise MoepressError(f"{model_dir}: cannot load tokenizer ({e})") from None
    except OSError as e:
        raise MoepressError(f"{model_dir}: no tokenizer found ({str(e).splitlines()[0]})") from None


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoepressError(f"{p}: file not found") from None
    except UnicodeDecodeError as e:
        raise MoepressError(f"{p}: not UTF-8 text (byte {e.start})") from None


def windows(ids: list[int] | torch.Tensor, seq_len: int, max_windows: int | None = None,
            batch_size: int = 8) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of seq_len tokens, grouped into [B, S] batches."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MoepressError(f"text has {ids.numel()} tokens, fewer than one sample of --seq-len {seq_len}")
    rows = ids[: n * seq_len].view(n, seq_len)
    return list(rows.split(batch_size))


def eval_batches(model_dir: str | Path, text_path: str | Path = DEFAULT_EVAL, seq_len: int = 256,
                 max_windows: int | None = None, trust_remote_code: bool = False) -> list[torch.Tensor]:
    tok = load_tokenizer(model_dir, trust_remote_code)
    return windows(tok(read_text(text_path))["input_ids"], seq_len, max_windows)


def calibration_batches(model_dir: str | Path, sources: tuple[str, ...] = (), num_samples: int = 64,
                        seq_len: int = 256, seed: int = 0, batch_size: int = 8,
                        trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Calibration token batches [B, seq_len] for a model: the stable entry point every stage uses.

    Minimal version: plain text files (default: the bundled calibration text), tokenized,
    cut into seq_len windows, ``num_samples`` of them drawn with ``seed``.
    """
    tok = load_tokenizer(model_dir, trust_remote_code)
    paths = sources or (str(DEFAULT_CALIB),)
    ids: list[int] = []
    for p in paths:
        ids.extend(tok(read_text(p))["input_ids"])
    rows = torch.cat(windows(ids, seq_len, batch_size=1 << 30))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(rows.shape[0], generator=g)[:num_samples]
    if pick.numel() < num_samples:
        raise MoepressError(f"calibration text gives {rows.shape[0]} samples of --seq-len {seq_len}, "
                            f"fewer than --num-samples {num_samples}")
    return list(rows[pick].split(batch_size))

"""The candidate interface and the registry of candidate kinds (filled in the package's ``__init__``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moepress.checks.config import CheckConfig
from moepress.errors import MoepressError

ONNX_CONTRACT = "input_ids int64 [B, S] -> logits [B, S, V] (optional hidden_states.{i})"
HIDDEN = re.compile(r"hidden_states\.(\d+)")  # an output of the ONNX contract: decoder layer i's output


@dataclass
class Outputs:
    """What a whole candidate returns for one batch (float32, on the CPU)."""

    logits: torch.Tensor  # [B, S, V]
    hidden: list[torch.Tensor] | None = None  # decoder layer i's output [B, S, H], i = 0..L-1
    last_normed: bool = False  # hidden[-1] is after the final norm (transformers' hidden_states)
    embed: torch.Tensor | None = None  # the embedding output [B, S, H]


class Candidate:
    """What every candidate knows about itself. Whole candidates implement :meth:`run`."""

    kind = ""
    streamed = False
    has_hidden = False  # returns per-layer hidden states
    fixed_seq: int | None = None  # a runtime that accepts one sequence length only

    def __init__(self, path: Path):
        self.path = path
        self.vocab_size: int | None = None
        self.num_layers: int | None = None
        self.notes: list[str] = []  # what the reader of its figures must know about how it ran

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "num_layers": self.num_layers,
                "vocab_size": self.vocab_size}

    def run(self, ids: torch.Tensor) -> Outputs:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of one batch (greedy generation calls this once per new token)."""
        return self.run(ids).logits

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class CandidateKind:
    name: str
    open: Callable[[Path, CheckConfig, torch.device | None], Candidate]  # (path, cfg, the check's device)
    detect: Callable[[Path], bool] | None
    priority: int  # detectors run from the highest priority down
    summary: str
    gpu: bool = False


CANDIDATE_KINDS: dict[str, CandidateKind] = {}


def register_candidate(name: str, *, summary: str, detect: Callable[[Path], bool] | None = None,
                       priority: int = 0, gpu: bool = False):
    """Decorator for ``opener(path, cfg, device) -> Candidate`` (``device``: where the check computes, None
    the CPU; a runtime with its own device ignores it); ``detect(path)`` claims a path for ``--kind auto``."""

    def deco(opener):
        CANDIDATE_KINDS[name] = CandidateKind(name, opener, detect, priority, summary, gpu)
        return opener

    return deco


def detect_kind(path: Path) -> str:
    for k in sorted(CANDIDATE_KINDS.values(), key=lambda k: -k.priority):
        if k.detect is not None and k.detect(path):
            return k.name
    kinds = "; ".join(f"{k.name}: {k.summary}" for k in CANDIDATE_KINDS.values())
    raise MoepressError(f"{path}: not a candidate moepress can run (expected {kinds})")


def open_candidate(path: str | Path, cfg: CheckConfig, device: torch.device | None = None) -> Candidate:
    path = Path(path)
    if not path.exists():
        raise MoepressError(f"{path}: candidate not found")
    kind = cfg.kind
    if kind == "auto":
        kind = detect_kind(path)
    elif kind not in CANDIDATE_KINDS:
        raise MoepressError(f"--kind {kind}: unknown candidate kind (expected auto, {', '.join(CANDIDATE_KINDS)})")
    return CANDIDATE_KINDS[kind].open(path, cfg, device)


def config_json(path: Path) -> dict | None:
    p = path / "config.json"
    if not p.is_file():
        return None
    try:
        conf = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(conf, dict):
        raise MoepressError(f"{p}: expected a JSON object")
    return conf


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__

"""The calibration set a stage runs on, one definition for every stage (``--calib``, ``--num-samples``,
``--seq-len``, ``--seed``, a recipe's ``calib`` section).

Stage configs keep these values as flat fields of their own (``calib``, ``num_samples``,
``seq_len``, ``seed``: they are written verbatim into manifests and run keys); the CLI and the
pipeline build them from one :class:`CalibConfig` and hand the stage its batches through
:meth:`CalibConfig.loader`, so no stage fetches calibration data itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from moepress.calib.data import calibration_batches
from moepress.progress import QUIET, Progress


@dataclass(frozen=True)
class CalibConfig:
    sources: tuple[str, ...] = ()  # --calib values; empty: the bundled calibration text
    num_samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8
    trust_remote_code: bool = False  # the tokenizer's own Python code (Kimi K2's tiktoken tokenizer)

    @classmethod
    def from_flags(cls, calib, num_samples: int, seq_len: int, seed: int,
                   trust_remote_code: bool = False) -> CalibConfig:
        return cls(tuple(calib), num_samples, seq_len, seed, trust_remote_code=trust_remote_code)

    @classmethod
    def from_recipe(cls, section: dict) -> CalibConfig:
        """A recipe's ``calib`` section (moepress/pipeline/recipe.py)."""
        return cls(tuple(section.get("sources") or ()), section.get("num_samples", 64), section.get("seq_len", 256),
                   section.get("seed", 0), trust_remote_code=bool(section.get("trust_remote_code", False)))

    def loader(self, model_dir: str | Path, progress: Progress = QUIET) -> Callable[[], list[torch.Tensor]]:
        """What a stage's ``batches=`` takes: called by the stage once it has validated its input
        (so a bad option is reported before calibration data is read), rank 0 first under torchrun."""
        return partial(calibration_batches, model_dir, self.sources, self.num_samples, self.seq_len, self.seed,
                       self.batch_size, self.trust_remote_code, progress=progress)

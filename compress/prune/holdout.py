"""Held-out scoring of whole-model plans: plans are compared on calibration samples their
statistics never saw (two-fold cross-fitting).

``split_folds`` deals the calibration samples into two folds. Each plan method of ``auto`` prunes
the whole model twice, once from each fold's statistics (and searches), and each of those pruned
models is compared with the original model on the other fold (``score_plans``): the KL divergence
of the next-token distributions (the choice: it measures the change the pruning made, token by
token, and varies less between samples than the NLL, which also carries how hard the text is)
and the NLL (reported beside it). Every sample thus scores every method once, out of fold. Both
are means per position; the choice's margin over the runner-up comes with its noise (the
standard error of the per-sample paired difference), so a choice that a few samples could flip is
visible in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moepress.calib.metrics import margin_z

FOLDS = 2  # sample r belongs to fold r % FOLDS


def split_folds(batches: list[torch.Tensor], k: int = FOLDS) -> list[list[torch.Tensor]]:
    """The calibration batches dealt into ``k`` folds by sample (sample r to fold r % k), each fold's
    batches no larger than the input's; fewer than ``k`` samples: one fold (nothing held out).
    Samples of different lengths: whole batches are dealt instead."""
    if len({b.shape[1] for b in batches}) != 1:
        folds = [batches[f::k] for f in range(k)]
    else:
        rows = torch.cat(batches)
        folds = [list(rows[f::k].split(batches[0].shape[0])) if rows[f::k].shape[0] else [] for f in range(k)]
    folds = [f for f in folds if f]
    return folds if len(folds) == k else [batches]


@dataclass
class HeldOut:
    """Held-out comparison sums, added over folds: per plan the summed KL of each sample and the
    summed NLL; the original model's summed NLL; positions (KL) and predicted tokens (NLL)."""

    kl: dict[str, list[float]] = field(default_factory=dict)
    nll: dict[str, float] = field(default_factory=dict)
    ref_nll: float = 0.0
    positions: int = 0
    predicted: int = 0
    samples: int = 0

    def scores(self) -> dict[str, dict]:
        return {n: {"heldout_kl": sum(v) / max(self.positions, 1), "heldout_nll": self.nll[n] / max(self.predicted, 1)}
                for n, v in self.kl.items()}


def score_plans(head: tuple[nn.Module, torch.Tensor], ref: list[torch.Tensor], plans: dict[str, list[torch.Tensor]],
                batches: list[torch.Tensor], into: HeldOut) -> HeldOut:
    """Add each plan's KL and NLL against the original model's final states ``ref`` on ``batches``
    to ``into``. One sequence at a time ([seq, vocab] float32 temporaries): the original's
    log-probabilities computed once per sequence, plans that share their states scored once."""
    norm, w = head
    for j, ids in enumerate(batches):
        for r in range(ids.shape[0]):
            tgt = ids[r, 1:].to(w.device)
            lr = F.log_softmax(F.linear(norm(ref[j][r]), w).float(), dim=-1)
            pr = lr.exp()
            into.ref_nll -= float(lr[:-1].gather(-1, tgt[:, None]).sum())
            into.predicted, into.positions = into.predicted + tgt.numel(), into.positions + ids.shape[1]
            into.samples += 1
            # keyed by the batch tensor a plan holds (alive in ``plans``, so its id is unique); the
            # temporary view hs[j][r] cannot be the key: a freed view's id is reused by the next one
            done: dict[int, tuple[float, float]] = {}
            for n, hs in plans.items():
                key = id(hs[j])
                if key not in done:
                    lc = F.log_softmax(F.linear(norm(hs[j][r]), w).float(), dim=-1)
                    done[key] = (float((pr * (lr - lc)).sum(-1).clamp(min=0.0).sum()),
                                 -float(lc[:-1].gather(-1, tgt[:, None]).sum()))
                kl, nll = done[key]
                into.nll[n] = into.nll.get(n, 0.0) + nll
                into.kl.setdefault(n, []).append(kl)
    return into


def choice_margin(best: str, per_sample_kl: dict[str, list[float]], positions: int) -> dict | None:
    """The chosen plan's held-out KL margin over the runner-up and the margin's standard error over
    samples (paired: the same samples through both plans); ``z`` < 2 means a choice a few samples
    could flip."""
    others = [n for n in per_sample_kl if n != best]
    if not others or positions == 0:
        return None
    runner = min(others, key=lambda n: sum(per_sample_kl[n]))
    d = torch.tensor(per_sample_kl[runner], dtype=torch.float64) - torch.tensor(per_sample_kl[best],
                                                                                dtype=torch.float64)
    m = d.numel()
    margin = float(d.sum()) / positions
    noise = float(d.std() * math.sqrt(m)) / positions if m > 1 else None
    z = None if noise is None else margin_z(margin, noise)  # a tie (plans keeping the same experts): 0, fragile
    return {"runner_up": runner, "kl_margin": margin, "kl_margin_noise": noise,
            "z": z if z is None or math.isfinite(z) else None, "fragile": z is None or z < 2.0}

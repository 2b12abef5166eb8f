"""Language-model metrics on logits (perplexity; the accuracy-check issue adds KL, top-1 ...)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
    lp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(nll.sum()), nll.numel()


def perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    tot, n = 0.0, 0
    for lg, ids in zip(logits, batches, strict=True):
        s, k = nll_sum(lg, ids)
        tot, n = tot + s, n + k
    return math.exp(tot / n)

"""Language-model metrics: perplexity, next-token KL divergence, top-1 agreement, hidden-state error.

Everything a gate looks at is computed in float64 from the float32 logits / hidden states,
in chunks of tokens so a 160k vocabulary never needs a [B, S, V] float64 tensor. The
``*Stats`` accumulators add batches as a streamed check produces them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Tokens per float64 chunk: CHUNK_ELEMENTS / vocab (16 MB per float64 [T, V] temporary).
CHUNK_ELEMENTS = 2 * 1024 * 1024


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (float64) and the number of predicted tokens, a
    sequence's positions at a time (no [B, S, V] float64 temporary)."""
    step, last = max(1, CHUNK_ELEMENTS // logits.shape[-1]), logits.shape[1] - 1
    tot = torch.zeros((), dtype=torch.float64, device=logits.device)
    for b in range(logits.shape[0]):
        for s in range(0, last, step):
            e = min(s + step, last)
            lp = F.log_softmax(logits[b, s:e].double(), dim=-1)
            tot -= lp.gather(-1, ids[b, s + 1:e + 1, None].to(lp.device)).sum()
    return float(tot), logits.shape[0] * max(last, 0)


def perplexity(logits: list[torch.Tensor], batches: list[torch.Tensor]) -> float:
    tot, n = 0.0, 0
    for lg, ids in zip(logits, batches, strict=True):
        s, k = nll_sum(lg, ids)
        tot, n = tot + s, n + k
    return safe_exp(tot / n)


def margin_z(margin: float, noise: float) -> float:
    """A margin in units of its noise; with no noise, inf for a positive margin (it holds whatever is left
    out) and 0 for a tie (nothing separates the two)."""
    return margin / noise if noise > 0 else math.inf if margin > 0 else 0.0


def safe_exp(x: float) -> float:
    """exp(x), inf past float64's range (a mean NLL above ~709 nats, where math.exp raises OverflowError)."""
    return math.exp(x) if x < 709.0 else math.inf if x == x else math.nan


def _token_chunks(ref: torch.Tensor, cand: torch.Tensor):
    """(ref, cand) as [T, V] row chunks, in float64."""
    v = ref.shape[-1]
    r, c = ref.reshape(-1, v), cand.reshape(-1, v)
    step = max(1, CHUNK_ELEMENTS // v)
    for s in range(0, r.shape[0], step):
        yield r[s:s + step].double(), c[s:s + step].double()


def token_kl(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) of the next-token distributions at every position, float64 [T] (nats)."""
    chunks = _token_chunks(ref_logits, cand_logits)
    return torch.cat([_kl(F.log_softmax(r, -1), F.log_softmax(c, -1)) for r, c in chunks])


def _kl(lr: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
    """KL per row from the two models' log-probabilities [T, V]."""
    return (lr.exp() * (lr - lc)).sum(-1).clamp(min=0.0)  # rounding can give -1e-17


def top1_matches(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> tuple[int, int]:
    """Positions where both models' most likely next token is the same, and the number of positions."""
    a, b = ref_logits.argmax(-1), cand_logits.argmax(-1)
    return int((a == b).sum()), a.numel()


def hidden_error(ref: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: cosine similarity and relative L2 error ||cand - ref|| / ||ref||, float64 [T] each."""
    h = ref.shape[-1]
    r, c = ref.reshape(-1, h).double(), cand.reshape(-1, h).double()
    rn = r.norm(dim=-1)
    cos = F.cosine_similarity(r, c, dim=-1, eps=1e-30)
    rel = (c - r).norm(dim=-1) / rn.clamp(min=1e-30)
    both_zero = (rn == 0) & (c.norm(dim=-1) == 0)
    return torch.where(both_zero, 1.0, cos), torch.where(both_zero, 0.0, rel)


def quantile(x: torch.Tensor, q: float) -> float:
    """q-quantile (linear interpolation, as numpy) of a 1-D tensor of any length."""
    if x.numel() == 0 or bool(torch.isnan(x).any()):  # sort puts NaN last: a few would pass unseen
        return float("nan")
    s = x.double().sort().values
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


@dataclass
class LogitStats:
    """Candidate-vs-reference statistics of next-token distributions, accumulated over batches."""

    nll_ref: float = 0.0
    nll_cand: float = 0.0
    predicted: int = 0  # positions with a next token (for perplexity)
    top1: int = 0
    positions: int = 0  # every position (for KL and top-1)
    kl: list[torch.Tensor] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, ids: torch.Tensor) -> None:
        """Logits [B, S, V] of both models on the token ids [B, S]: each chunk of positions is turned into
        log-probabilities once, for the perplexities and the KL alike."""
        cand_logits = cand_logits.to(ref_logits.device)  # a runtime's logits beside a streamed reference's
        ids = ids.to(ref_logits.device)
        # position s predicts token s + 1; a sequence's last position predicts none (its target a placeholder)
        target = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1).reshape(-1, 1)
        has = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        has[:, -1] = False
        has, nll, step = has.reshape(-1), torch.zeros(2, dtype=torch.float64, device=ids.device), 0
        for r, c in _token_chunks(ref_logits, cand_logits):
            lr, lc = F.log_softmax(r, -1), F.log_softmax(c, -1)
            self.kl.append(_kl(lr, lc))
            t, keep = target[step:step + r.shape[0]], has[step:step + r.shape[0]]
            # torch.where, not a boolean mask: a mask is a host sync on a GPU, at every chunk
            nll -= torch.stack([torch.where(keep, lp.gather(-1, t)[:, 0], 0.0).sum() for lp in (lr, lc)])
            step += r.shape[0]
        self.nll_ref += float(nll[0])
        self.nll_cand += float(nll[1])
        self.predicted += ids.shape[0] * max(ids.shape[1] - 1, 0)
        m, k = top1_matches(ref_logits, cand_logits)
        self.top1 += m
        self.positions += k

    def summary(self) -> dict:
        kl = torch.cat(self.kl) if self.kl else torch.empty(0, dtype=torch.float64)
        ppl_r = safe_exp(self.nll_ref / self.predicted)
        ppl_c = safe_exp(self.nll_cand / self.predicted) if math.isfinite(self.nll_cand) else float("nan")
        return {"ppl_reference": ppl_r, "ppl_candidate": ppl_c, "ppl_increase": ppl_c / ppl_r - 1.0,
                "kl_mean": float(kl.mean()) if kl.numel() else float("nan"), "kl_p99": quantile(kl, 0.99),
                "kl_max": float(kl.max()) if kl.numel() else float("nan"),
                "top1_agreement": self.top1 / max(self.positions, 1), "tokens": self.positions}


@dataclass
class LayerStats:
    """Hidden-state agreement at one layer's output, accumulated over batches."""

    cos: list[torch.Tensor] = field(default_factory=list)
    rel: list[torch.Tensor] = field(default_factory=list)

    def add(self, ref: torch.Tensor, cand: torch.Tensor) -> None:
        c, r = hidden_error(ref, cand.to(ref.device))
        self.cos.append(c)
        self.rel.append(r)

    def summary(self) -> dict:
        c, r = torch.cat(self.cos), torch.cat(self.rel)
        return {"cosine": float(c.mean()), "cosine_min": float(c.min()),
                "rel_error": float(r.mean()), "rel_error_p99": quantile(r, 0.99)}


def error_jump(rel_errors: list[float], start: float = 0.0) -> int | None:
    """Index of the layer whose output error grows most over its input's (``start`` before layer 0)."""
    best, where, prev = -math.inf, None, start
    for i, e in enumerate(rel_errors):
        e = e if math.isfinite(e) else math.inf  # NaN/inf: the error exploded here
        step = -math.inf if prev == math.inf else e - prev
        if step > best:
            best, where = step, i
        prev = e
    return where

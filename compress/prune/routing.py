"""Routing simulation: the family's routing with some experts removed, on the full logit matrix.

``route_masked`` equals routing with the dropped experts' router rows sliced out (tests check it
against the sliced router), so a search can try a kept set without touching the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def group_of(num_experts: int, n_group: int) -> torch.Tensor:
    """Group id of each expert: DeepSeek's router views the scores as [T, n_group, E // n_group]."""
    return torch.arange(num_experts) // (num_experts // n_group)


def _group_scores(choice: torch.Tensor, n_group: int) -> torch.Tensor:
    t, e = choice.shape
    return choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)


def route_masked(logits: torch.Tensor, keep: torch.Tensor, routing: dict,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing over the kept experts only: (weights [T, k], indices [T, k]).

    ``logits`` [T, E] are the unpruned router's; ``keep`` is [E] or per token [T, E] (bool).
    Equal to routing with the router rows of the dropped experts removed (tests check it
    against the sliced router): softmax over the kept logits, or DeepSeek's sigmoid +
    correction bias with group-limited choice where a dropped expert can neither be
    chosen nor count towards its group's score.
    """
    k = routing["top_k"]
    keep = keep.expand_as(logits)
    if routing["scoring"] == "softmax":
        probs = F.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
        weights, indices = torch.topk(probs, k, dim=-1)
        if routing["renormalize"]:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices
    scores = logits.float().sigmoid()
    choice = (scores + bias.float()).masked_fill(~keep, float("-inf"))
    n_group, topk_group = routing["n_group"], routing["topk_group"]
    t, e = choice.shape
    group_idx = torch.topk(_group_scores(choice, n_group), k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros(t, n_group, dtype=torch.bool).scatter_(1, group_idx, True)
    choice = choice.masked_fill(~group_mask.repeat_interleave(e // n_group, dim=1), float("-inf"))
    indices = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if routing["renormalize"]:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing["routed_scaling_factor"], indices


def group_ranks(logits: torch.Tensor, keep: torch.Tensor, routing: dict,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] bools: the expert is one of the two best kept experts of its group (they make the
    group's score), and: it is the third best (it would make the score if one of the two went)."""
    choice = (logits.float().sigmoid() + bias.float()).masked_fill(~keep.expand_as(logits), float("-inf"))
    t, e = choice.shape
    n = routing["n_group"]
    size = e // n
    top = choice.view(t, n, size).topk(min(3, size), dim=-1)[1] + (torch.arange(n) * size)[None, :, None]
    top2 = torch.zeros(t, e, dtype=torch.bool).scatter_(1, top[..., :2].reshape(t, -1), True)
    third = torch.zeros(t, e, dtype=torch.bool)
    if size > 2:
        third.scatter_(1, top[..., 2], True)
    return top2, third

"""The method registry type and the score methods.

A ``PruneMethod`` turns a layer's evidence and the budget into a ``Selection``. The registry
``METHODS`` is filled in the package ``__init__`` (in the order the CLI lists the methods);
this module only defines the type and the score methods ``frequency``, ``ean`` and ``reap``,
which rank experts by a statistic of ``RoutingStats`` and keep the best of every group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moepress.calib.observers import LayerRouting
from moepress.compress.prune.budget import Budget
from moepress.compress.prune.evidence import LayerEvidence, Selection


@dataclass(frozen=True)
class PruneMethod:
    name: str
    help: str
    select: Callable[[LayerEvidence, Budget], Selection]
    score_name: str
    needs_outputs: bool = False  # needs a RouteRecorder (cached router logits and MoE inputs)
    # look-ahead: the layer keeps whichever of these methods' selections leaves the hidden state after
    # the NEXT decoder layer closest to the original model's (decided one layer later; see stage.py)
    candidates: tuple[str, ...] = ()
    # plans: these methods each prune the whole model side by side; the lowest calibration loss is kept
    plans: tuple[str, ...] = ()
    # fold the dropped experts into the kept ones after selecting (merge.fold_dropped): "always", or
    # "float" = only where the layer's routed experts are stored in a float dtype (quantized experts
    # keep their stored bytes unless merging is asked for); "" = never. ``--merge/--no-merge`` override it.
    merge: str = ""
    # its score is a sum over the calibration tokens (counts, summed norms), not a per-token mean: a
    # leave-one-group-out score then describes fewer tokens and is scaled back before its spread is read
    score_is_sum: bool = False
    # the LayerRouting field counting the tokens its scores rest on (the report's kept / dropped tokens): REAP's
    # reference scores the tokens whose raw-logit top-k holds the expert, not those the family's router sends
    tokens: str = "counts"


METHODS: dict[str, PruneMethod] = {}


def register(method: PruneMethod) -> PruneMethod:
    METHODS[method.name] = method
    return method


def keep_top(scores: torch.Tensor, budget: Budget, layer: int) -> list[int]:
    """The best-scored experts, protected ones first, the same number in every group."""
    E = budget.num_experts
    prot = budget.protected_in(layer)
    vals = scores.tolist()  # one read of the scores (on a GPU, each float(scores[e]) waited for the device)
    key = {e: (e not in prot, -vals[e] if not math.isnan(vals[e]) else math.inf, e) for e in range(E)}
    size = E // budget.n_group
    kept: list[int] = []
    for g in range(budget.n_group):
        members = sorted(range(g * size, (g + 1) * size), key=key.__getitem__)
        kept += members[: budget.keep_per_group]
    return sorted(kept)


def score_method(name: str, help: str, score_name: str, scores: Callable[[LayerRouting], torch.Tensor],
                 score_is_sum: bool = False, tokens: str = "counts") -> PruneMethod:
    """A method keeping the experts with the highest ``scores(stats)`` (``keep_top``)."""
    def select(ev: LayerEvidence, budget: Budget) -> Selection:
        s = scores(ev.stats).double()
        return Selection(keep_top(s, budget, ev.layer), s)
    return PruneMethod(name, help, select, score_name, score_is_sum=score_is_sum, tokens=tokens)


def frequency_scores(stats: LayerRouting) -> torch.Tensor:
    """Tokens routed to each expert."""
    return stats.counts


def ean_scores(stats: LayerRouting) -> torch.Tensor:
    """The REAP paper's EAN baseline: the summed output norm (CerebrasResearch/reap src/reap/observer.py
    "ean_sum"); it favours frequently routed experts, unlike a per-token mean."""
    return stats.norm_sum


def reap_scores(stats: LayerRouting) -> torch.Tensor:
    """REAP (arXiv 2510.13999) exactly as its reference implementation computes it: mean of
    g_j(x) * ||f_j(x)||_2 over the tokens whose raw-logit top-k holds j, g_j the softmax over all experts
    (renormalised over that top-k when the config says norm_topk_prob); see ``LayerRouting``."""
    return stats.reap


def reads_search_tokens(method: PruneMethod, merge: bool | None, race: tuple[str, ...] = ()) -> bool:
    """Whether a run of ``method`` (``merge``: --merge / --no-merge, None: the method's own; ``race``: --race) samples
    routed tokens for a search or a fold (``--search-tokens``): reroute's search, lookahead's candidates, a race of
    either, a fold of the dropped experts; frequency, ean and reap alone count every token."""
    if bool(method.merge) if merge is None else merge:
        return True
    if method.plans:  # the methods raced decide (auto's own callable selects nothing)
        return any(reads_search_tokens(METHODS[m], False) for m in race or method.plans)
    return method.needs_outputs or bool(method.candidates)

"""Expert pruning: drop the routed experts that matter least, one expert count for every layer.

Modules, bottom to top:
- ``config``: ``PruneConfig`` (from CLI flags or a recipe), ``parse_protect``.
- ``routing``: the family's routing with some experts removed, on a full logit matrix
  (``route_masked``); it equals the sliced router exactly and drives the search.
- ``budget``: one kept count per model, multiples of ``--ep-size`` and of ``n_group``, top-k
  reachability, protected experts (``plan_budget``).
- ``evidence`` / ``methods``: what a method sees and returns; the registry type and the score
  methods ``frequency``, ``ean``, ``reap`` (a statistic of ``RoutingStats`` per expert).
- ``search``: ``reroute`` searches the dropped set that keeps the hidden state after the MoE block
  (as the next layer's RMSNorm reads it) closest to the original with the pruned router re-routing
  tokens.
- ``lookahead``: per layer, the reroute or the reap selection, whichever leaves the hidden state
  after the NEXT decoder layer closest to the original model's (the layer's choice is made, and
  the layer written, when the next layer is loaded).
- ``holdout`` / ``plans``: ``auto`` (the default) prunes the whole model with several methods side by
  side, each from one of two folds of the calibration samples (one read of each layer), scores each
  method on the other fold (KL divergence to the original model), then runs the best method alone
  on every sample and writes it (a second read of each layer).
- ``stability``: how firmly each layer's decision rests on the calibration tokens (report field).
- ``merge``: folding the dropped experts into the kept ones after a selection (``fold_dropped``: the
  kept experts' down projections refit to reproduce the unpruned routed output), written in the input's
  stored form (``encode_like``); the ``merge`` method is REAP's selection followed by it.
- ``surgery``: ``prune_moe_module`` (in memory) and ``pruned_layer_tensors`` (checkpoint).
- ``mtp``: multi-token prediction layers' input; ``stage``: ``prune_checkpoint``.

The method registry ``METHODS`` is filled here, in the order the CLI lists the methods.
"""

from moepress.compress.prune.budget import Budget, plan_budget
from moepress.compress.prune.config import DEFAULT_METHOD, REPORT_NAME, PruneConfig, parse_protect
from moepress.compress.prune.evidence import LayerEvidence, RouteRecorder, Selection
from moepress.compress.prune.lookahead import lookahead_select, state_error
from moepress.compress.prune.merge import encode_like, fold_dropped
from moepress.compress.prune.methods import (
    METHODS,
    PruneMethod,
    ean_scores,
    frequency_scores,
    keep_top,
    reap_scores,
    register,
    score_method,
)
from moepress.compress.prune.routing import group_of, group_ranks, route_masked
from moepress.compress.prune.search import ExpertOutputs, RerouteSearch, reroute_select
from moepress.compress.prune.stage import PruneStage, prune_checkpoint
from moepress.compress.prune.surgery import prune_moe_module, pruned_layer_tensors

register(score_method("frequency", "tokens routed to each expert", "tokens", frequency_scores, score_is_sum=True))
register(score_method("ean", "expert activation norm: sum over routed tokens of ||f_j(x)||_2 (REAP paper's EAN)",
                      "ean_sum", ean_scores, score_is_sum=True))
register(score_method("reap", "REAP: mean of softmax gate x ||f_j(x)||_2 over the tokens selecting j, as "
                      "CerebrasResearch/reap computes it (arXiv 2510.13999)", "reap", reap_scores,
                      tokens="reap_count"))
register(PruneMethod("reroute", "greedy backward elimination minimising the error of the normalised hidden state "
                     "after the MoE block on calibration tokens, with the pruned router re-routing them (exact "
                     "family routing)", reroute_select, "added_relative_sq_error", needs_outputs=True))
register(PruneMethod("lookahead", "per layer, the reroute or the reap selection: whichever leaves the hidden state "
                     "after the next decoder layer (run on the already pruned model) closest to the original model's",
                     lookahead_select, "added_relative_sq_error", needs_outputs=True, candidates=("reroute", "reap")))
register(PruneMethod("merge", "keep the REAP-best experts and fold the dropped experts into them: each kept "
                     "expert's down projection refit so the pruned block reproduces the unpruned routed output on "
                     "calibration tokens (re-quantized to the input's format where it is stored quantized)",
                     METHODS["reap"].select, "reap", merge="always", tokens="reap_count"))
# auto's own callable is never the one that selects (its plans' methods do, MTP layers included);
# it holds lookahead's so that the registry has a callable for every method
register(PruneMethod("auto", "reroute, reap, frequency and ean each prune the whole model from one half of the "
                     "calibration samples and are scored on the other half, both ways round (each layer read once); "
                     "the method whose next-token distribution stays closest to the original model's (KL "
                     "divergence) is then run on every sample, the dropped experts folded into the kept ones "
                     "where the experts are stored in float (as merge does), and written (each layer read a second "
                     "time)", lookahead_select, "plan", needs_outputs=True,
                     plans=("reroute", "reap", "frequency", "ean"), merge="float"))

__all__ = [
    "DEFAULT_METHOD", "METHODS", "REPORT_NAME", "Budget", "ExpertOutputs", "LayerEvidence", "PruneConfig",
    "PruneMethod", "PruneStage", "RerouteSearch", "RouteRecorder", "Selection", "group_of",
    "group_ranks", "encode_like", "fold_dropped", "keep_top", "parse_protect", "plan_budget", "prune_checkpoint",
    "prune_moe_module", "pruned_layer_tensors", "route_masked", "state_error",
]

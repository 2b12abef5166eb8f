"""`moepress prune`: remove the routed experts a calibration set says matter least."""

from __future__ import annotations

import json

import click

from moepress.cli.options import (
    Command,
    calib_options,
    device_option,
    given,
    model_argument,
    model_label,
    output_options,
    progress_options,
    refuse_empty,
    resolve_model,
    run_measured,
    weight_only_notes,
)
from moepress.errors import MoepressError


class MethodChoice(click.ParamType):
    """The pruning methods registered in moepress.compress.prune, read when the option is used
    (so that `moepress --help` does not import torch); a bad name is a one-line error."""

    name = "method"

    @staticmethod
    def methods() -> dict:
        from moepress.compress.prune import METHODS

        return METHODS

    def get_metavar(self, param, ctx=None):
        return "[" + "|".join(self.methods()) + "]"

    def convert(self, value, param, ctx):
        if value not in self.methods():
            raise MoepressError(f"--method {value}: expected one of {', '.join(self.methods())}")
        return value


def _method_help() -> str:
    return ("Which experts to drop: frequency = routed token counts; ean = summed expert output norm; "
            "reap = mean gate x output norm (REAP); reroute = greedy search minimising the error of the "
            "normalised hidden state after the MoE block, with the pruned router re-routing tokens; "
            "lookahead = per layer, the reroute or the reap selection, whichever leaves the hidden state after "
            "the next layer (on the already pruned model) closest to the original's; merge = keep the REAP-best "
            "experts and fold the dropped ones into them (kept down projections refit on calibration tokens, "
            "re-quantized to the input's format); auto = reroute, reap, "
            "frequency and ean each prune the whole model from one half of the calibration samples and are "
            "scored on the other half (next-token KL divergence to the original, both ways round); the best "
            "method is then run on every sample, the dropped experts folded into the kept ones where the experts "
            "are stored in float (as merge does), and written (each layer read twice). "
            "Default: auto (README: pruning table).")


@click.command("prune", cls=Command)
@model_argument
@click.option("--ratio", type=float, default=None, help="Fraction of routed experts to drop per layer, e.g. 0.25 "
              "(the kept count is rounded down to a valid count).")
@click.option("--keep", type=int, default=None, help="Routed experts to keep per layer (exact).")
@click.option("--method", type=MethodChoice(), default=None, help=_method_help())
@click.option("--ep-size", "--ep", "ep_size", type=int, default=1, show_default=True,
              help="Expert-parallel size: the kept count is made a multiple of it.")
@click.option("--protect", default="", metavar="L:E,...", help="Experts that always stay, e.g. 3:5,3:7.")
@click.option("--sequential", is_flag=True,
              help="Gather layer i+1's statistics on the already pruned layers 0..i (lookahead always does; "
                   "with auto it applies to every plan).")
@click.option("--search-tokens", type=int, default=16384, show_default=True,
              help="reroute (also inside lookahead / auto): calibration tokens the search evaluates (a seeded "
                   "subsample when more); lookahead compares candidates on the first batches covering as many.")
@click.option("--merge/--no-merge", default=None,
              help="Fold the dropped experts into the kept ones after selecting (kept down projections refit so "
                   "the pruned block reproduces the unpruned routed output; re-quantized where stored quantized). "
                   "Default: as the method does (auto: where the experts are stored in float; merge: always).")
@click.option("--race", default="", metavar="M,M,...",
              help="auto: the methods raced, two or more of reroute, reap, frequency, ean (default: all four). "
                   "reroute's search costs the most where layers have many experts: --race reap,frequency,ean "
                   "races without it (README: A cheaper race).")
@calib_options
@device_option
@output_options
@progress_options
def prune_cmd(model, ratio, keep, method, ep_size, protect, sequential, search_tokens, merge, race, calib, num_samples,
              seq_len, seed, trust_remote_code, device, output, force, quiet, json_out):
    """Drop the least useful routed experts of every MoE layer of MODEL (one count for all layers).

    Writes OUT in MODEL's format (block-FP8 stays block-FP8), with prune_report.json:
    per layer the kept and dropped experts, their scores and token shares, and the
    constraint decisions, and how firmly each layer's decision rests on the calibration
    tokens (stability: fragile when a few tokens could flip it). Shared experts and dense
    layers are copied unchanged.
    """
    from moepress.calib.config import CalibConfig
    from moepress.compress.prune import PruneConfig, prune_checkpoint
    from moepress.progress import Progress

    refuse_empty(protect=protect, race=race)
    cal = CalibConfig.from_flags(calib, num_samples, seq_len, seed, trust_remote_code)
    cfg = PruneConfig.from_flags(method=method, ratio=ratio, keep=keep, ep_size=ep_size, protect=protect,
                                 sequential=sequential, calib=cal, search_tokens=search_tokens, merge=merge,
                                 race=race)
    from moepress.compress.prune.methods import METHODS, reads_search_tokens

    if given("search_tokens") and not reads_search_tokens(METHODS[cfg.method], merge, cfg.race):  # as --race
        raced = f" racing {', '.join(cfg.race)}" if cfg.race else ""
        raise MoepressError(f"--search-tokens: --method {cfg.method}{raced} samples no tokens (reroute, lookahead, a "
                            "race of either, merge and --merge do)")
    src = resolve_model(model)
    prog = Progress.from_flags(quiet, json_out)
    for line in weight_only_notes(src):
        prog.info(line)
    result, memory = run_measured(device, prune_checkpoint, src, output, cfg, batches=cal.loader(src, prog),
                                  force=force, progress=prog)
    result["memory"] = memory
    if json_out:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model_label(model, src)}: kept {result['kept']} of {result['num_experts']} routed experts in "
                   f"{result['moe_layers']} MoE layers ({cfg.method}); dropped experts took "
                   f"{100 * result['dropped_token_share_mean']:.1f}% of routing assignments on calibration data")
        for note in result["constraints"]:
            click.echo(f"  {note}")
        if result["fragile_layers"]:
            click.echo(f"  {result['fragile_layers']} of {result['moe_layers']} layers' decisions are fragile: a few "
                       f"calibration tokens could flip them (prune_report.json: stability; more --num-samples helps)")
        click.echo(f"wrote {output} ({result['seconds']:.1f} s)")


COMMANDS = [prune_cmd]

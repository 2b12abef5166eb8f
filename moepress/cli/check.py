"""`moepress check`: does a compressed artifact still behave like its original?"""

from __future__ import annotations

import json
from pathlib import Path

import click

from moepress.cli.options import (
    PATH,
    RESULT_PRINTED,
    SEED,
    TEXT,
    Command,
    device_option,
    given,
    progress_options,
    remember_output,
    run_measured,
)
from moepress.errors import CheckFailed, MoepressError
from moepress.outputs import refuse_overlap


class KindChoice(click.ParamType):
    """Candidate kinds from the registry in moepress.checks, read when the option is used
    (so that `moepress --help` does not import torch)."""

    name = "kind"
    # the help's list, kept without importing the registry (tests/test_cli_options.py holds it to the registry)
    METAVAR = "[auto|checkpoint|transformers|onnx|engine]"

    @staticmethod
    def kinds() -> list[str]:
        from moepress.checks import CANDIDATE_KINDS

        return ["auto", *CANDIDATE_KINDS]

    def get_metavar(self, param, ctx=None):
        return self.METAVAR

    def convert(self, value, param, ctx):
        if value not in self.kinds():
            raise MoepressError(f"--kind {value}: unknown candidate kind (expected {', '.join(self.kinds())})")
        return value


def _path(arg: str, what: str) -> Path:
    """A path, or the name of a bundled model or fixture (``models.resolve``, as every other command)."""
    from moepress import models

    try:
        return models.resolve(arg)
    except MoepressError:
        raise MoepressError(f"{what}{arg}: {'reference checkpoint' if what else 'candidate'} not found "
                            f"(bundled models: {', '.join(models.BUNDLED)}; test fixtures: "
                            f"{', '.join(models.FIXTURES)})") from None


def _human(result: dict) -> list[str]:
    from moepress.checks.config import fmt, verdict

    m, d, c = result["metrics"], result["data"], result["candidate"]
    gates = {g["metric"]: g for g in result["gates"]}

    def val(metric, spec, percent=False):  # as judged: more digits where they would read as the threshold
        g = gates.get(metric)
        return fmt(m[metric], percent, g["threshold"]) if g is not None else (
            fmt(m[metric], True) if percent else format(m[metric], spec))

    def gate(metric):
        g = gates.get(metric)
        if g is None:
            return ""
        verdict = {True: "pass", False: "FAIL"}.get(g["passed"], "n/a")
        return f"   [{g['op']} {fmt(g['threshold'], g.get('percent', False))}: {verdict}]"

    out = [f"{Path(c['path']).name} ({c['kind']}) vs {Path(result['reference']).name}: {d['samples']} x "
           f"{d['seq_len']} tokens of {Path(d['source']).name}",
           f"  perplexity       {m['ppl_reference']:.4g} -> {m['ppl_candidate']:.4g} "
           f"({val('ppl_increase', '', True)}){gate('ppl_increase')}",
           f"  KL(ref||cand)    mean {val('kl_mean', '.4g')}, p99 {val('kl_p99', '.4g')} nats/token"
           f"{gate('kl_mean')}{gate('kl_p99')}",
           f"  top-1 agreement  {val('top1_agreement', '.4f')}{gate('top1_agreement')}"]
    out += _layer_lines(result, m, gate) + _routing_lines(result["layers"], m, gate)
    out += [f"  {g['metric']}: not measured for this candidate{gate(g['metric'])}" for g in result["gates"]
            if g["passed"] is None]
    out += [f"  note: {n}" for n in result["notes"]]
    gen = result.get("generations") or {}
    for s in gen.get("samples", []):
        out += [f"  prompt     {s['prompt']!r}", f"  reference  {s['reference']!r}",
                f"  candidate  {s['candidate']!r}  (same first {s['same_prefix_tokens']}/{s['new_tokens']} tokens)"]
    out.append(verdict(result["passed"], result["failed"]))
    return out


def _layer_lines(result: dict, m: dict, gate) -> list[str]:
    """Per decoder layer: hidden-state errors (and cosines where gated), where the error jumps, and each layer's
    own attention / feed-forward error on the reference's input with the ratios gated on them."""
    out = []
    if not result["layers"]:
        return out
    errs = ", ".join(f"{p['layer']}: {p['rel_error']:.3g}" for p in result["layers"])
    out.append(f"  hidden rel. error per layer  {errs}{gate('max_layer_rel_error')}")
    if gate("min_layer_cosine"):  # the gate is on the cosines: printed beside them, not the errors
        cos = ", ".join(f"{p['layer']}: {p['cosine']:.6f}" for p in result["layers"])
        out.append(f"  hidden cosine per layer  {cos}{gate('min_layer_cosine')}")
    if result["error_jump"] is not None and result["error_jump"]["after"] > 0:
        out.append(f"  error jumps at layer {result['error_jump']['layer']}")
    if any("attention_error" in p for p in result["layers"]):
        own = ", ".join(f"{p['layer']}: {p['attention_error']:.3g} / {p['ffn_error']:.3g}"
                        for p in result["layers"] if "attention_error" in p)
        out.append(f"  attention / feed-forward error on the reference's input  {own}")
        if "max_attention_error_ratio" in m:
            ratio = ", ".join(f"{p['layer']}: {p['attention_error_ratio']:.3g}" for p in result["layers"]
                              if p.get("attention_error_ratio") is not None)
            out.append(f"  attention error / median of its peers  {ratio}{gate('max_attention_error_ratio')}")
        if "max_weight_error_ratio" in m:
            ratio = ", ".join(f"{p['layer']}: {p['weight_error_ratio']:.3g} ({p['weight_module']})"
                              for p in result["layers"] if p.get("weight_error_ratio") is not None)
            out.append(f"  worst weight error / its own rounding's  {ratio}{gate('max_weight_error_ratio')}")
    return out


def _routing_lines(layers: list[dict], m: dict, gate) -> list[str]:
    """Per MoE layer: the share of the reference's expert choices kept, the worst expert's error and its ratio."""
    out = []
    if "min_routing_overlap" in m:
        share = ", ".join(f"{p['layer']}: {p['routing_overlap']:.4f}" for p in layers
                          if "routing_overlap" in p)
        out.append(f"  routing overlap per MoE layer  {share}{gate('min_routing_overlap')}")
        worst = ", ".join(f"{p['layer']}: {p['expert_error']:.3g} (expert {p['worst_expert']})"
                          for p in layers if "expert_error" in p)
        out.append(f"  worst expert's rel. error per MoE layer  {worst}{gate('max_expert_error')}")
        if "max_expert_error_ratio" in m:
            ratio = ", ".join(f"{p['layer']}: {p['expert_error_ratio']:.3g} (expert {p['ratio_expert']})"
                              for p in layers if p.get("expert_error_ratio") is not None)
            out.append(f"  worst expert's error / its layer's median (or own rounding's)  {ratio}"
                       f"{gate('max_expert_error_ratio')}")
    return out


@click.command("check", cls=Command)
@click.argument("candidate", metavar="CANDIDATE", type=TEXT)
@click.option("--reference", "-r", required=True, metavar="REF", type=TEXT,
              help="The original checkpoint directory (or bundled model name) the candidate was made from.")
@click.option("--data", default=None, metavar="EVAL", type=TEXT,
              help="Held-out evaluation data: a text file (consecutive windows) or any --calib source "
                   "(JSONL, Parquet, dataset folder, hf:NAME: sampled by --seed; a token file: its first samples). "
                   "Default: the bundled held-out text calib/data/eval.txt. Data a stage upstream of the "
                   "candidate was calibrated on (its manifest's calibration_sha256) is named in a note: "
                   "figures measured on it are in-sample.")
@click.option("--max-ppl-increase", default="2%", metavar="FRACTION", show_default=True,
              help="Gate: largest relative perplexity increase (2% or 0.02; 'none' turns it off).")
@click.option("--min-top1", default="0.85", metavar="FRACTION", show_default=True,
              help="Gate: lowest top-1 next-token agreement with the reference ('none': off).")
@click.option("--max-kl", default="0.05", metavar="NATS", show_default=True,
              help="Gate: largest mean KL(reference || candidate) per token, nats ('none': off).")
@click.option("--max-kl-p99", default="none", metavar="NATS", show_default=True,
              help="Gate: largest 99th-percentile KL per token.")
@click.option("--min-cosine", default="none", metavar="COS", show_default=True,
              help="Gate: lowest per-layer mean cosine similarity of hidden states.")
@click.option("--max-layer-error", default="1.0", metavar="REL", show_default=True,
              help="Gate: largest per-layer mean relative error of hidden states (where the candidate gives "
                   "them; 'none': off).")
@click.option("--min-routing-overlap", default="0.95", metavar="FRACTION", show_default=True,
              help="Gate: lowest per-MoE-layer share of the reference's expert choices that the candidate's router "
                   "makes on the reference's router inputs (streamed candidates with the reference's experts; "
                   "'none': off).")
@click.option("--max-expert-error", default="0.5", metavar="REL", show_default=True,
              help="Gate: largest error of one routed expert's output (or the shared experts') on the reference's "
                   "inputs to its layer against the reference expert its router row stands for, relative to the "
                   "smaller of the two (a scale off by 2 either way: 1.0), every expert whether the eval tokens "
                   "reach it or not (as --min-routing-overlap: streamed candidates with the reference's experts; "
                   "'none': off).")
@click.option("--max-expert-error-ratio", default="3", metavar="RATIO", show_default=True,
              help="Gate: largest ratio of one expert's error (as --max-expert-error; shared experts too) to the "
                   "median error of its layer's routed experts stored alike, or to the error its own rounding makes "
                   "where that is larger and known (as --max-weight-error-ratio) (the same candidates; 'none': off).")
@click.option("--max-weight-error-ratio", default="2", metavar="RATIO", show_default=True,
              help="Gate: largest ratio of one decoder-layer linear's weight error (decoded as the candidate "
                   "computes with it, against the reference's) to the error its format's rounding to nearest makes "
                   "on the reference's weight, where that rounding is known (a moepress quantize output of fp8, "
                   "fp8-block, fp8-dynamic, nvfp4, nvfp4-a16 or mxfp4 made from the reference; routed experts where "
                   "the candidate has the reference's; the same candidates as --max-attention-error-ratio; 'none': "
                   "off).")
@click.option("--max-attention-error-ratio", default="4", metavar="RATIO", show_default=True,
              help="Gate: largest ratio of one layer's attention error, on the reference's input to the layer, to "
                   "the median over the layers whose attention is stored alike (streamed candidates with the "
                   "reference's layers; 'none': off).")
@click.option("--kind", type=KindChoice(), default="auto", show_default=True,
              help="Candidate kind; auto detects it from the path.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Tokens per sample.")
@click.option("--max-samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Evaluation samples (windows of --seq-len tokens).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Samples per batch.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling seed for non-text --data.")
@click.option("--generate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy generations side by side for N prompts (no KV cache: each new token streams the "
                   "whole model once; fine for small models, slow for large ones).")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=24, show_default=True,
              help="New tokens per --generate prompt.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the tokenizer's / model's own Python code to run.")
@click.option("--report", "report_dir", type=PATH, default=None, metavar="DIR",
              callback=remember_output,
              help="Write report.json, report.md, layer_error.png and its moepress-manifest.json into DIR.")
@click.option("--no-record", is_flag=True,
              help="Gate only: record nothing in the candidate's moepress-manifest.json (a read-only artifact).")
@device_option
@progress_options
def check_cmd(candidate, reference, data, kind, seq_len, max_samples, batch_size, seed, generate, gen_tokens,
              trust_remote_code, report_dir, no_record, device, quiet, json_out, **gate_options):
    """Compare CANDIDATE with the reference checkpoint on held-out text and gate on the result.

    Metrics: perplexity of both and its relative change; KL(reference || candidate) of
    next-token distributions (mean, p99); top-1 agreement; per decoder layer the cosine
    similarity and relative error of hidden states (layer outputs), with the layer where
    the error jumps. The reference is streamed one layer at a time; a checkpoint candidate
    is streamed beside it. CANDIDATE kinds: a checkpoint moepress streams (pruned,
    block-FP8, quantized, hf-modelopt, hf-fp8-block, weight-only compressed-tensors),
    a compressed-tensors export that quantizes activations (through transformers), an
    ONNX model, a TensorRT / TensorRT-LLM engine (GPU).

    Exit code 0: every gate passed; 1: a gate failed (the metric is named on stderr);
    2: bad input. The metrics are added to the candidate's moepress-manifest.json when
    moepress wrote it (not with --no-record), with the digests of the files checked, sealed
    with this user's key ($MOEPRESS_KEY_FILE or ~/.config/moepress/manifest.key, made on
    first use): what `moepress publish` verifies.
    """
    from moepress.checks import (
        CheckConfig,
        check_report_dir,
        prepare_record,
        record_in_manifest,
        run_check,
        write_report,
    )
    from moepress.checks.config import GATE_FIELDS, failure_line
    from moepress.errors import MoepressError
    from moepress.progress import Progress

    _refuse_options(data, seed, generate, gen_tokens, max_samples, gate_options)
    gates = {name: gate_options[name] for name in GATE_FIELDS}
    ctx = click.get_current_context()
    asked = tuple(n for n in gates if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT)
    cfg = CheckConfig(**gates, asked=asked, data=data, seq_len=seq_len, max_samples=max_samples,
                      batch_size=batch_size, seed=seed, generate=generate, gen_tokens=gen_tokens, kind=kind,
                      trust_remote_code=trust_remote_code)
    cand = _path(candidate, "")
    ref = _path(reference, "--reference ")
    prog = Progress.from_flags(quiet, json_out)
    if report_dir is not None:  # the report must not land in (or swallow) what it describes
        refuse_overlap(report_dir, (cand, ref), "--report ")
        check_report_dir(report_dir)
    before = None if no_record else prepare_record(cand)
    result, memory = run_measured(device, run_check, cand, ref, cfg, progress=prog)
    result["memory"] = memory
    try:  # the figures are reported either way; a check whose files changed while it ran is not recorded
        result["manifest_updated"] = False if no_record else record_in_manifest(cand, result, before)
        refused = None
    except MoepressError as e:
        result["manifest_updated"], refused = False, e
        result["manifest_refused"] = str(e)
    if report_dir is not None:
        result["report"] = str(write_report(result, report_dir))
    _print_result(result, refused, json_out, report_dir)
    if refused is not None:
        raise refused
    if result["passed"] is False:
        raise CheckFailed(failure_line(result["gates"], result["error_jump"], result.get("layers")))


def _refuse_options(data, seed, generate, gen_tokens, max_samples, gate_options) -> None:
    """Options that would have no effect, or be cut silently, and gate values refused under the option's name."""
    from moepress.checks.config import GATE_FIELDS, parse_fraction, windowed
    from moepress.errors import MoepressError

    if generate == 0 and given("gen_tokens"):  # would have no effect
        raise MoepressError(f"--gen-tokens {gen_tokens}: only with --generate N (N prompts to generate from)")
    if generate > max_samples:  # the prompts are the samples' starts: more would be cut silently
        raise MoepressError(f"--generate {generate}: at most --max-samples ({max_samples}), since each prompt is "
                            "the start of one evaluation sample")
    if given("seed") and windowed(data):  # would have no effect
        raise MoepressError(f"--seed {seed}: {'the text --data' if data else 'the bundled held-out text'} is read "
                            "as consecutive windows, which no seed draws; expected --seed with JSONL, Parquet, a "
                            "dataset folder or hf:NAME data")
    for name in GATE_FIELDS:  # refused under the option's name; CheckConfig parses the value as written (a
        parse_fraction(gate_options[name], "--" + name.replace("_", "-"))  # parsed 150% would read as a bare 1.5)


def _print_result(result: dict, refused, json_out: bool, report_dir) -> None:
    """The result on stdout: one JSON document (with a manifest refusal beside the figures), or the human lines."""
    from moepress.checks import jsonable
    from moepress.errors import MoepressError

    if json_out:
        if refused is not None:  # one document on stdout: the result and the refusal together (exit 2 after)
            result.update(error=" ".join(str(refused).split()), exit=MoepressError.exit_code)
            click.get_current_context().meta[RESULT_PRINTED] = True
        click.echo(json.dumps(jsonable(result), default=str))
    else:
        for line in _human(result):
            click.echo(line)
        if report_dir is not None:
            click.echo(f"wrote {report_dir}/report.md")


COMMANDS = [check_cmd]

"""`moepress quantize`: FP8 / INT4 with calibration, streamed layer by layer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from moepress.cli.options import (
    Command,
    calib_options,
    device_option,
    given,
    model_argument,
    output_options,
    progress_options,
    resolve_model,
    run_measured,
    weight_only_notes,
)


def format_help() -> str:
    """--format's help: each format ``moepress quantize`` writes, with its registry description."""
    from moepress.compress import formats

    return " | ".join(f"{name}: {f.description}{'' if f.calibrated else ', no calibration'}"
                      for name, f in formats.produced().items())


class FormatOption(click.Option):
    """--format, whose help is read from the format registry when shown (so that `moepress --help`
    does not import torch)."""

    def get_help_record(self, ctx):
        self.help = format_help()
        return super().get_help_record(ctx)


@click.command("quantize", cls=Command)
@model_argument
@click.option("--format", "fmt", cls=FormatOption, default=None, metavar="FORMAT")
@click.option("--rule", "rules", multiple=True, metavar="PATTERN=FORMAT",
              help="Per-module format (fnmatch on the module name within the layer, e.g. 'mlp.experts.*=int4-awq', "
                   "'self_attn.*=fp8', 'mlp.shared_experts.*=none'); first match wins (a rule an earlier one leaves "
                   "nothing to decide is refused), --format for the rest.")
@click.option("--group-size", type=int, default=128, show_default=True, help="INT4 group size: 128, 64 or 32.")
@click.option("--kv-cache", type=click.Choice(["fp8"]), default=None, help="Also compute FP8 K/V cache scales.")
@click.option("--sequential/--no-sequential", default=None,
              help="Calibrate each layer on the quantized layers before it (default for AWQ / GPTQ formats), or on "
                   "the original model's activations (default when only activation scales are calibrated: fp8, nvfp4).")
@click.option("--gptq-act-order/--no-gptq-act-order", default=None,
              help="GPTQ columns by decreasing Hessian diagonal (groups stay contiguous, no g_idx) or in order. "
                   "Default: act order for AWQ + GPTQ (int4-awq, w4a8-awq), in order for int4-gptq.")
@click.option("--awq-gptq/--no-awq-gptq", default=True, show_default=True,
              help="int4-awq / w4a8-awq: round the AWQ-smoothed weights with GPTQ on the smoothed input's "
                   "Hessian (same stored format); --no-awq-gptq: round to nearest.")
@click.option("--awq-clip/--no-awq-clip", default=True, show_default=True,
              help="With --no-awq-gptq: clip search of the group scales after the AWQ scale search "
                   "(Model-Optimizer's awq_full; --no-awq-clip too: its awq_lite numerics).")
@click.option("--awq-fold", is_flag=True,
              help="int4-awq / w4a8-awq: fold the AWQ smoothing into the preceding norm / v_proj / up_proj "
                   "(one vector per input, shared by all experts; llm-compressor's form): no pre_quant_scale, "
                   "so the output exports to compressed-tensors (vLLM, transformers).")
@click.option("--resume", is_flag=True, help="Continue a killed run from OUT.partial (finished layers are kept).")
@calib_options
@device_option
@output_options
@progress_options
def quantize_cmd(model, fmt, rules, group_size, kv_cache, sequential, gptq_act_order, awq_gptq, awq_clip, awq_fold,
                 resume,
                 calib, num_samples, seq_len, seed,
                 trust_remote_code, device, output, force, quiet, json_out):
    """Quantize MODEL's decoder-layer linears to FORMAT, one layer at a time, into OUT.

    Writes Model-Optimizer's Hugging Face layout (hf_quant_config.json, weight_scale /
    input_scale / pre_quant_scale tensors) plus moepress_quant.json and quant_report.json;
    `moepress export` turns it into what each runtime loads. Routers, embeddings, lm_head
    and norms stay unquantized.
    """
    from moepress.calib.config import CalibConfig
    from moepress.calib.distributed import current, init
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint
    from moepress.progress import Progress

    # under torchrun, joined first: a rank refusing before it joined left the others waiting in its start-up
    init(device=device)
    src = resolve_model(model)
    cal = CalibConfig.from_flags(calib, num_samples, seq_len, seed, trust_remote_code)
    cfg = QuantConfig.from_flags(format=fmt, rules=rules, group_size=group_size if given("group_size") else None,
                                 kv_cache=kv_cache,
                                 sequential=sequential, calib=cal, gptq_act_order=gptq_act_order,
                                 awq_clip=awq_clip, awq_gptq=awq_gptq, awq_fold=awq_fold)
    cfg.refuse_unused({p.name for p in click.get_current_context().command.params if given(p.name)})
    prog = Progress.from_flags(quiet, json_out)
    refusing: dict[str, str] = {}
    builds: dict[str, str] = {}

    def notes() -> list[str]:  # asked by the stage once it has validated the input and the options
        refusing.update(export_refusals(src, cfg))
        later = [f"note: `moepress export --format {e}` will refuse this output: {why}" for e, why in refusing.items()]
        # the hf-modelopt export refused outright: a rule that keeps its MLA projections bf16 would not make it
        mla = [] if "hf-modelopt" in refusing else mla_notes(src, cfg, builds)
        weight_only = weight_only_notes(src) if cfg.needs_calibration else []
        return [*stored_quantized(src, cfg), *weight_only, *later, *mla]

    res, memory = run_measured(device, quantize_checkpoint, src, output, cfg, batches=cal.loader(src, prog),
                               force=force, resume=resume, progress=prog, notes=notes)
    res["memory"] = memory
    res["exports_refusing"], res["builds_refusing"] = refusing, builds
    if not current().is_main:  # under torchrun, rank 0 reports
        return
    if json_out:
        click.echo(json.dumps(res))
    else:
        click.echo(f"quantized {src} ({res['quant_algo']}, {res['quantized_linears']} linears"
                   + (f", {res['borrowed']} sparse experts (too few calibration tokens; quant_report.json: "
                      "sparse_expert_rule)" if res["borrowed"] else "")
                   + f") -> {output} in {res['seconds']:.1f}s"
                   # said in the result too: --quiet hides the notes, not what the output is good for
                   + (f"; `moepress export` will refuse it as {', '.join(sorted(refusing))} (the start's notes say "
                      "why, shown without --quiet; --json: exports_refusing)" if refusing else "")
                   + ("; `moepress build` will refuse its hf-modelopt export for TensorRT-LLM (--json: "
                      "builds_refusing)" if builds else ""))


def stored_quantized(src, cfg) -> list[str]:
    """A note when the input stores its weights quantized (DeepSeek / Kimi block FP8, Kimi K2 Thinking's INT4): they
    are decoded and rounded again, a second rounding the output's error includes."""
    q = json.loads((Path(src) / "config.json").read_text()).get("quantization_config")
    if not (isinstance(q, dict) and q.get("quant_method")):
        return []
    return [f"note: {src} stores its weights quantized (quantization_config {q['quant_method']}); they are decoded "
            f"and rounded again to {cfg.format or 'the formats of --rule'}"]


def mla_notes(src, cfg, builds: dict[str, str]) -> list[str]:
    """A note (and ``builds["trtllm-pytorch"]``) where TensorRT-LLM's DeepSeek-V3 / Kimi K2 loader would misread
    the MLA projections of this output's hf-modelopt export, which `moepress build` then refuses: said before the
    hours of quantizing, with the --rule flags that keep them bf16 (vLLM loads them either way)."""
    from moepress.errors import MoepressError
    from moepress.exporters.modelopt_misloads import quantize_trtllm_misloads

    try:
        why, keep = quantize_trtllm_misloads(cfg, src)
    except MoepressError:
        return []
    if not why:
        return []
    builds["trtllm-pytorch"] = "; ".join(why)
    flags = " ".join(f"--rule '{k}'" for k in keep)
    return [f"note: TensorRT-LLM's DeepSeek loader {builds['trtllm-pytorch']}, once this output is exported "
            f"hf-modelopt (`moepress build` refuses that export; vLLM loads it); for TensorRT-LLM quantize with "
            f"{flags}"]


def export_refusals(src, cfg) -> dict[str, str]:
    """What hf-modelopt and compressed-tensors will refuse of this quantize's output for the model's widths
    (moepress/pipeline/export_refusals.py), in the CLI's flags. Asked after the stage has
    validated the model; a check that still cannot be asked of it says nothing (a note, not a refusal)."""
    from moepress.errors import MoepressError
    from moepress.pipeline.export_refusals import quantize_export_refusals

    q = {"format": cfg.format, "rules": dict(cfg.rules), "group_size": cfg.group_size, "awq_fold": cfg.awq_fold}
    try:
        found = quantize_export_refusals(q, src)
    except MoepressError:
        return {}
    # the recipe's words in the rule layouts' refusals (moepress/pipeline/rule_layouts.py) first, then single keys
    flags = (("the quantize output of these quantize.rules", "the output of these --rule flags"),
             ("the layout quantize.rules write: a rule outranks quantize.format, so change the rules",
              "the layout the --rule flags write: a --rule outranks --format, so change the --rule flags"),
             ("quantize.rules' format ", "the --rule giving the experts "), ("quantize.format ", "--format "),
             ("quantize.group_size ", "--group-size "),
             ("quantize.awq_fold: true", "--awq-fold"), ("quantize.rules give", "--rule gives"),
             ("expected rules of ", "expected --rule flags of "))
    out = {}
    for e, why in found.items():
        for recipe_key, flag in flags:
            why = why.replace(recipe_key, flag)
        out[e] = re.sub(r"\b(expected|or) [\w-]+ removed from export\.formats", r"\1 another export format", why)
    return out


COMMANDS = [quantize_cmd]

"""`moepress export`: write what NVIDIA's stack and its neighbours load."""

from __future__ import annotations

import json

import click

from moepress.cli.options import (
    Command,
    given,
    measured,
    model_argument,
    output_options,
    progress_options,
    resolve_model,
)
from moepress.errors import MoepressError


class FormatChoice(click.ParamType):
    """Formats registered in moepress.exporters, read when used (so `--help` stays fast)."""

    name = "format"

    @staticmethod
    def formats() -> dict:
        from moepress.exporters import exporters

        return exporters()

    def convert(self, value, param, ctx):
        if value not in self.formats():
            raise MoepressError(f"--format {value}: expected one of {', '.join(sorted(self.formats()))}")
        return value


def _parse_options(values) -> tuple[tuple[str, str], ...]:
    out = []
    for v in values:
        if "=" not in v:
            raise MoepressError(f"--option {v}: expected KEY=VALUE")
        k, _, val = v.partition("=")
        if any(k.strip() == seen for seen, _ in out):  # the last would win silently, both recorded
            raise MoepressError(f"--option {k.strip()}: given twice; expected each KEY once")
        out.append((k.strip(), val.strip()))
    return tuple(out)


@click.command("export", cls=Command)
@model_argument
@click.option("--format", "fmt", required=True, type=FormatChoice(),
              help="hf-modelopt | hf-fp8-block | compressed-tensors | trtllm-ckpt | onnx "
                   "(`moepress formats` describes each).")
@click.option("--tp", type=int, default=1, show_default=True, help="Tensor-parallel size (trtllm-ckpt).")
@click.option("--ep", type=int, default=1, show_default=True, help="Expert-parallel size (trtllm-ckpt).")
@click.option("--opset", type=int, default=21, show_default=True, help="ONNX opset (onnx).")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE", help="Exporter-specific option.")
@output_options
@progress_options
def export_cmd(model, fmt, tp, ep, opset, extra, output, force, quiet, json_out):
    """Export MODEL (a bf16, pruned or `moepress quantize`d checkpoint) as FORMAT into OUT.

    Writes OUT.partial and renames it to OUT when complete; OUT gets export.json (format,
    source hashes, versions) and moepress-manifest.json.
    """
    from moepress.exporters import ExportConfig, export
    from moepress.progress import Progress

    src = resolve_model(model)
    if given("opset") and fmt != "onnx":  # the exporters' own options: --option, refused per exporter
        raise MoepressError(f"--opset {opset}: only --format onnx takes it; --format {fmt} writes no ONNX graph")
    cfg = ExportConfig(format=fmt, tp=tp, ep=ep, opset=opset, options=_parse_options(extra))
    prog = Progress.from_flags(quiet, json_out)
    info, memory = measured(None, lambda: export(src, output, cfg, force=force, progress=prog))  # on the CPU
    if json_out:
        click.echo(json.dumps({"output": str(output), **info, "memory": memory}, default=str))
    else:
        click.echo(f"exported {src} as {fmt} -> {output}")


@click.command("formats", cls=Command)
@click.option("--json", "json_out", is_flag=True, help="Print the list as JSON (families null: every family).")
def formats_cmd(json_out):
    """List the export formats, their families and consumers."""
    exs = sorted(FormatChoice.formats().items())
    if json_out:
        click.echo(json.dumps({name: {"description": ex.description, "families": list(ex.families or ()) or None,
                                      "consumers": ex.consumers or None} for name, ex in exs}, indent=2))
        return
    for name, ex in exs:
        fam = ", ".join(ex.families or ()) or "all families"
        click.echo(f"{name:20s} {ex.description} ({fam}){'; loaded by ' + ex.consumers if ex.consumers else ''}")


COMMANDS = [export_cmd, formats_cmd]

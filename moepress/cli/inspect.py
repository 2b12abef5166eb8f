"""`moepress inspect`."""

from __future__ import annotations

import json

import click

from moepress.cli.options import Command, model_argument, resolve_model


def _targets_line(table: dict) -> str:
    """'h200 fp8-block x16, int4-awq x8; a100-80gb int4-awq x16 (fp8: needs sm89+) ...' per target (GPU
    counts only: which runtime loads a format's MoE experts is the plan's note and the consumer table)."""
    parts = []
    for name, row in table.items():
        runs = [f"{f} x{n}" for f, n in row.items() if n]
        too_big = [f for f, n in row.items() if n == 0]
        parts.append(f"{name}: " + (", ".join(runs) if runs else "nothing fits")
                     + (f" (too big: {', '.join(too_big)})" if too_big else ""))
    return "\n           ".join(parts)


@click.command("inspect", cls=Command)
@model_argument
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON.")
@click.option("--targets/--no-targets", "with_targets", default=True, show_default=True,
              help="Report the formats each GPU target runs and the smallest GPU count holding the model "
                   "(`moepress plan` defaults: 8 x 4096 tokens of KV cache, fewer where the model is shorter).")
def inspect_cmd(model, json_out, with_targets):
    """Family, layers, experts, routing, parameters and bytes on disk of MODEL.

    Works on a directory holding only config.json (nothing is loaded). With --targets (default),
    also which formats apply and, per GPU target and format, the smallest GPU count that holds it.
    """
    from moepress.compress.inspect import render, summarize

    path = str(resolve_model(model))
    s = summarize(path)
    if with_targets:
        from moepress.exporters.plan import applicable
        from moepress.exporters.targets import PRODUCED

        table = applicable(path)
        s["formats"] = [f for f in PRODUCED if any(row.get(f) for row in table.values())]
        s["targets_table"] = table  # {target: {format: smallest GPU count | 0 too big | None cannot run}}
        s["targets"] = _targets_line(table)
    click.echo(json.dumps(s, indent=2) if json_out else render(s))


COMMANDS = [inspect_cmd]

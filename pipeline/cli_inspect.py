"""`moepress inspect`."""

from __future__ import annotations

import json

import click

from moepress.options import model_argument, resolve_model


@click.command("inspect")
@model_argument
@click.option("--json", "json_out", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(model, json_out):
    """Family, layers, experts, routing, parameters and bytes on disk of MODEL.

    Works on a directory holding only config.json (nothing is loaded).
    """
    from moepress.compress.inspect import render, summarize

    s = summarize(str(resolve_model(model)))
    click.echo(json.dumps(s, indent=2) if json_out else render(s))


COMMANDS = [inspect_cmd]

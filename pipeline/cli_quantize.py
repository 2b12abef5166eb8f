"""`moepress quantize` (issue #5)."""

from __future__ import annotations

import click

from moepress.errors import MoepressError


@click.command("quantize", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def quantize_cmd(args):
    """Not implemented yet (issue #5)."""
    raise MoepressError("moepress quantize is not implemented yet (issue #5)")


COMMANDS = [quantize_cmd]

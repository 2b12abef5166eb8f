"""`moepress prune` (issue #4)."""

from __future__ import annotations

import click

from moepress.errors import MoepressError


@click.command("prune", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def prune_cmd(args):
    """Not implemented yet (issue #4)."""
    raise MoepressError("moepress prune is not implemented yet (issue #4)")


COMMANDS = [prune_cmd]

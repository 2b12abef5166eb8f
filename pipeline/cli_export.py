"""`moepress export` (issue #6)."""

from __future__ import annotations

import click

from moepress.errors import MoepressError


@click.command("export", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def export_cmd(args):
    """Not implemented yet (issue #6)."""
    raise MoepressError("moepress export is not implemented yet (issue #6)")


COMMANDS = [export_cmd]

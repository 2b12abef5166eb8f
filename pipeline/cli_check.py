"""`moepress check` (issue #8)."""

from __future__ import annotations

import click

from moepress.errors import MoepressError


@click.command("check", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def check_cmd(args):
    """Not implemented yet (issue #8)."""
    raise MoepressError("moepress check is not implemented yet (issue #8)")


COMMANDS = [check_cmd]

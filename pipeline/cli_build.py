"""`moepress build`, `targets`, `plan` (issue #7)."""

from __future__ import annotations

import click

from moepress.errors import MoepressError


@click.command("build", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def build_cmd(args):
    """Not implemented yet (issue #7)."""
    raise MoepressError("moepress build is not implemented yet (issue #7)")


COMMANDS = [build_cmd]

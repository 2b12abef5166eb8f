"""`moepress calib prepare | stats` (issue #3)."""

from __future__ import annotations

import click


@click.group("calib")
def calib_group():
    """Calibration data and routing statistics (not implemented yet: issue #3)."""


COMMANDS = [calib_group]

import os

import pytest
import torch

from moepress import models

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BUNDLED = [str(p) for p in models.all_paths()]


@pytest.fixture(params=models.BUNDLED)
def bundled(request):
    """Path of each bundled model in turn."""
    return models.path(request.param)


@pytest.fixture
def cli_run():
    """Invoke the moepress CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from moepress.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run

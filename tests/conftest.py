import pytest
import torch

from moepress import models

# One thread: tests that spawn processes (torchrun, CLI subprocesses) or run beside other jobs on the
# 2-core CI machines slow down ~10x when every process asks for 2 threads (measured).
torch.set_num_threads(1)

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


@pytest.fixture(autouse=True, scope="session")
def manifest_key(tmp_path_factory):
    """Checks seal the accuracy section with a per-user key (moepress/checks/seal.py): the tests use one
    made for the session (inherited by subprocesses), never the user's ~/.config/moepress/manifest.key."""
    import os

    path = tmp_path_factory.mktemp("moepress-key") / "manifest.key"
    old = os.environ.get("MOEPRESS_KEY_FILE")
    os.environ["MOEPRESS_KEY_FILE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MOEPRESS_KEY_FILE", None)
    else:
        os.environ["MOEPRESS_KEY_FILE"] = old

import atexit
import os
import shutil
import tempfile

# Caches the tests would otherwise leave in the user's home, set before anything imports the libraries that read
# them: moepress's calibration cache (shared across runs, a new entry for every edit of the code), transformers'
# copies of remote code (a test loads a tokenizer of its own code), matplotlib's font list. Subprocesses inherit
# them. Removed when the session ends.
_SCRATCH = tempfile.mkdtemp(prefix="moepress-tests-")
atexit.register(shutil.rmtree, _SCRATCH, True)
for _var, _sub in (("MOEPRESS_CACHE", "moepress-cache"), ("HF_MODULES_CACHE", "hf-modules"),
                   ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_var] = os.path.join(_SCRATCH, _sub)

import pytest  # noqa: E402
import torch  # noqa: E402

from moepress import models  # noqa: E402

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models' ops are too small to gain from a second thread, and on a loaded 2-core machine two OpenMP
    threads per op make them 10-20x slower: one thread for the module's tests, restored afterwards (a module asks
    for it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

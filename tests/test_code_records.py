"""The quantize resume key on a GPU device (compress/quantize/stage.py), the calibration cache's key over
the calibration package's code (calib/cache.py), and the code a calibration set records (calib/data.py)."""

from __future__ import annotations

import importlib.util
import shutil

import torch

from moepress import codeid, models
from moepress.compress.quantize import QuantConfig
from moepress.compress.quantize.stage import quantize_resume_key

QWEN = models.path("tiny-qwen3-moe")


def test_a_calibrated_key_on_a_gpu_names_the_gpu_and_no_thread_count():
    """A run on cuda records device "cuda" (CPU and GPU solves round apart), and no CPU thread count (its solves
    are the GPU's); so a CPU resume of a GPU partial is refused."""
    gpu = quantize_resume_key(QuantConfig(format="fp8", num_samples=4), QWEN, torch.device("cuda"))
    cpu = quantize_resume_key(QuantConfig(format="fp8", num_samples=4), QWEN, torch.device("cpu"))
    assert gpu["config"]["device"] == "cuda" and "torch_threads" not in gpu["config"], gpu["config"]
    assert cpu["config"]["device"] == "cpu" and cpu["config"]["torch_threads"] == torch.get_num_threads()
    assert gpu != cpu


def test_the_cache_key_follows_an_edit_of_the_calibration_package(tmp_path, monkeypatch):
    """An edit of calib/sampling.py (the code that draws the samples) makes every cache entry a miss: the key holds
    the calibration package's digest, not another package's."""
    from moepress.calib import cache as cache_mod

    root = tmp_path / "calib"
    real = importlib.util.find_spec
    shutil.copytree(real("moepress.calib").submodule_search_locations[0], root,
                    ignore=shutil.ignore_patterns("__pycache__", "data"))

    class Spec:
        submodule_search_locations = [str(root)]

    monkeypatch.setattr(codeid.importlib.util, "find_spec",
                        lambda name: Spec if name == "moepress.calib" else real(name))
    codeid.package_digest.cache_clear()
    try:
        before = cache_mod.cache_key({"x": 1})
        (root / "sampling.py").write_text((root / "sampling.py").read_text() + "\n# edited\n")
        codeid.package_digest.cache_clear()
        assert cache_mod.cache_key({"x": 1}) != before
    finally:
        monkeypatch.undo()
        codeid.package_digest.cache_clear()


def test_a_calibration_set_records_the_code_that_drew_it(monkeypatch):
    """The set's metadata (the cache entry's and a prepared token file's sidecar) names the code by its id
    (version + digest), as every manifest does: between releases the version alone names no code."""
    from moepress.calib.data import calibration_set

    monkeypatch.setenv("MOEPRESS_CACHE", "off")
    cs = calibration_set(QWEN, (), 2, 32, 0, False)
    assert cs.meta["moepress"] == codeid.code_id() and "+" in cs.meta["moepress"]

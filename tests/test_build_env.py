"""The GPU / package check that starts every real build (exporters/build.py: check_environment).

No GPU here: the GPU facts are passed in as ``gpu_info()`` would return them on a machine with one.
"""

import pytest
import torch

from moepress.errors import MoepressError
from moepress.exporters import environment as B
from moepress.exporters.builders import BUILDERS
from moepress.exporters.targets import get_target

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "sm": 90, "count": 8, "cuda": "12.8", "driver": "570.86"}
SMI = "NVIDIA H200, 9.0, 570.86.15\nNVIDIA H200, 9.0, 570.86.15\n"
L40S = {"gpu": "NVIDIA L40S", "sm": 89, "count": 1, "cuda": "12.8", "driver": "570.86"}


@pytest.fixture
def installed(monkeypatch):
    """Pretend tensorrt / tensorrt_llm import and trtllm-build is on PATH."""
    monkeypatch.setattr(B, "_importable", lambda mod: True)
    monkeypatch.setattr(B.shutil, "which", lambda exe: f"/usr/local/bin/{exe}")


def test_matching_gpu_passes(installed):
    assert B.check_environment(BUILDERS["trtllm-engine"], get_target("h100"), 8, gpu=H100) == H100
    assert B.check_environment(BUILDERS["tensorrt"], get_target("l40s"), 1, gpu=L40S) == L40S


def test_wrong_compute_capability(installed):
    # an engine built on sm89 does not load on sm90 ("expecting compute 9.0 got compute 8.9")
    with pytest.raises(MoepressError, match=r"this GPU is NVIDIA L40S \(sm89\), the target h100 is sm90: engines "
                                            r"are built per compute capability; build on a H100 SXM"):
        B.check_environment(BUILDERS["trtllm-engine"], get_target("h100"), 1, gpu=L40S)
    # H100 PCIe and H200 share sm90 with H100 SXM: the same engine kind
    B.check_environment(BUILDERS["trtllm-engine"], get_target("h200"), 8, gpu=H100)


def test_ampere_plus_tensorrt_engine_builds_on_any_sm80_plus(installed):
    b, a10g = BUILDERS["tensorrt"], get_target("a10g")
    with pytest.raises(MoepressError, match="the target a10g is sm86"):
        B.check_environment(b, a10g, 1, gpu=L40S)
    assert B.check_environment(b, a10g, 1, gpu=L40S, hardware_compatibility="ampere_plus") == L40S


def test_too_few_gpus(installed):
    with pytest.raises(MoepressError, match=r"1 GPU\(s\) here, the plan needs 2"):
        B.check_environment(BUILDERS["tensorrt"], get_target("l40s"), 2, gpu=L40S)


def test_missing_packages_and_trtllm_build(monkeypatch):
    monkeypatch.setattr(B, "_importable", lambda mod: False)
    with pytest.raises(MoepressError) as e:
        B.check_environment(BUILDERS["trtllm-engine"], get_target("h100"), 1, gpu=H100)
    assert str(e.value) == ("tensorrt_llm is not installed: pip install moepress[trtllm] on a GPU machine "
                            "(use --dry-run to write the plan and commands)")
    # a TensorRT-LLM without the TensorRT backend: importable, but no trtllm-build
    monkeypatch.setattr(B, "_importable", lambda mod: True)
    monkeypatch.setattr(B.shutil, "which", lambda exe: None)
    with pytest.raises(MoepressError, match=r"trtllm-build is not on PATH: .* --builder trtllm-pytorch"):
        B.check_environment(BUILDERS["trtllm-engine"], get_target("h100"), 1, gpu=H100)
    # the PyTorch-backend bundle needs no trtllm-build
    B.check_environment(BUILDERS["trtllm-pytorch"], get_target("h100"), 1, gpu=H100)


def test_no_gpu_message_names_the_target(monkeypatch):
    monkeypatch.setattr(B, "_importable", lambda mod: True)
    with pytest.raises(MoepressError, match=r"no CUDA device \(a tensorrt build for l4 needs 1 x L4, sm89\)"):
        B.check_environment(BUILDERS["tensorrt"], get_target("l4"), 1, gpu={})


def test_nvidia_smi_parse():
    # what `nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader` prints
    assert B.parse_nvidia_smi(SMI) == [{"gpu": "NVIDIA H200", "sm": 90, "driver": "570.86.15"}] * 2
    assert B.parse_nvidia_smi("NVIDIA RTX PRO 6000 Blackwell Server Edition, 12.0, 575.51\n")[0]["sm"] == 120
    assert B.parse_nvidia_smi("No devices were found\n") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback for a torch without CUDA")
def test_gpu_info_falls_back_to_nvidia_smi(monkeypatch):
    monkeypatch.setattr(B, "_nvidia_smi", lambda: B.parse_nvidia_smi(SMI))
    assert B.gpu_info() == {"gpu": "NVIDIA H200", "sm": 90, "count": 2, "cuda": None, "driver": "570.86.15"}
    monkeypatch.setattr(B, "_nvidia_smi", lambda: [])
    assert B.gpu_info() == {}


def test_nvidia_smi_minor_compute_capability():
    # compute_cap "8.9" is sm89 (the L40S / L4 targets' sm), not sm80
    assert B.parse_nvidia_smi("NVIDIA L40S, 8.9, 570.86.15\n") == [{"gpu": "NVIDIA L40S", "sm": 89,
                                                                     "driver": "570.86.15"}]
    assert B.parse_nvidia_smi("NVIDIA L40S, 8.9, 570.86.15\n")[0]["sm"] == get_target("l40s").sm


def test_ampere_plus_engine_is_not_built_on_a_pre_ampere_gpu(installed):
    # TensorRT's ampere_plus hardware compatibility covers sm80+ only: a T4 (sm75) cannot build it
    t4 = {"gpu": "Tesla T4", "sm": 75, "count": 1, "cuda": "12.8", "driver": "570.86"}
    with pytest.raises(MoepressError, match=r"this GPU is Tesla T4 \(sm75\), the target a10g is sm86"):
        B.check_environment(BUILDERS["tensorrt"], get_target("a10g"), 1, gpu=t4, hardware_compatibility="ampere_plus")


def test_nvidia_smi_line_without_compute_capability_is_skipped():
    # nvidia-smi prints [N/A] for a field it cannot read: that GPU is not counted, and parsing does not crash
    assert B.parse_nvidia_smi("NVIDIA A100-SXM4-80GB, [N/A], 570.86.15\n") == []

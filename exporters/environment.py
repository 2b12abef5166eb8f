"""The machine a real build runs on: its GPUs (torch.cuda, else ``nvidia-smi``), the packages and
commands a builder needs, and the check that refuses a build this machine cannot do.

Engines are built per compute capability: a TensorRT / TensorRT-LLM engine built on one SM does
not load on another ("expecting compute 9.0 got compute 8.9"), except a TensorRT engine built with
hardware compatibility ``ampere_plus``, which runs on every sm80+ GPU (TensorRT developer guide,
"Hardware Compatibility").
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from importlib import metadata

from moepress.errors import MoepressError
from moepress.exporters.targets import Target

# python module -> distribution whose version a real build records
PACKAGES = (("tensorrt", "tensorrt"), ("tensorrt_llm", "tensorrt-llm"))


def _nvidia_smi() -> list[dict]:
    """One dict per GPU from ``nvidia-smi --query-gpu=name,compute_cap,driver_version`` ([] without it)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(r.stdout) if r.returncode == 0 else []


def parse_nvidia_smi(text: str) -> list[dict]:
    """``NVIDIA H100 80GB HBM3, 9.0, 570.86.15`` lines -> [{gpu, sm, driver}] (compute_cap: drivers 510+)."""
    out = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[1].replace(".", "", 1).isdigit():
            continue
        major, _, minor = parts[1].partition(".")
        out.append({"gpu": parts[0], "sm": int(major) * 10 + int(minor or 0), "driver": parts[2]})
    return out


def gpu_info() -> dict:
    """GPU, SM, count, driver, CUDA of this machine ({} without a CUDA device): torch.cuda, else
    nvidia-smi (a CPU-only torch on a GPU machine still builds TensorRT / TensorRT-LLM engines)."""
    smi = _nvidia_smi()
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        return {"gpu": torch.cuda.get_device_name(0), "sm": major * 10 + minor, "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda, "driver": smi[0]["driver"] if smi else None}
    if smi:
        return {"gpu": smi[0]["gpu"], "sm": smi[0]["sm"], "count": len(smi), "cuda": None, "driver": smi[0]["driver"]}
    return {}


def _importable(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def package_versions() -> dict[str, str]:
    """Versions of the TensorRT packages installed here, by module name."""
    out = {}
    for mod, dist in PACKAGES:
        try:
            out[mod] = metadata.version(dist)
        except Exception:
            pass
    return out


def _gpu_problem(builder, target: Target, gpus: int, gpu: dict, hardware_compatibility: str) -> str | None:
    portable = hardware_compatibility == "ampere_plus" and target.sm >= 80
    if not gpu:
        return (f"no CUDA device (a {builder.name} build for {target.name} needs "
                f"{gpus} x {target.gpu}, sm{target.sm})")
    if gpu["sm"] != target.sm and not (portable and gpu["sm"] >= 80):
        return (f"this GPU is {gpu['gpu']} (sm{gpu['sm']}), the target {target.name} is sm{target.sm}: "
                f"engines are built per compute capability; build on a {target.gpu}")
    if gpu["count"] < gpus:
        return f"{gpu['count']} GPU(s) here, the plan needs {gpus}"
    return None


def check_environment(builder, target: Target, gpus: int, gpu: dict | None = None,
                      hardware_compatibility: str = "none") -> dict:
    """Raise one line naming what is missing for a real build by ``builder`` (a
    :class:`~moepress.exporters.builders.base.Builder`); returns the GPU facts."""
    gpu = gpu_info() if gpu is None else gpu
    missing = []
    problem = _gpu_problem(builder, target, gpus, gpu, hardware_compatibility)
    if problem:
        missing.append(problem)
    absent = [mod for mod in builder.requires if not _importable(mod)]
    if absent:
        missing.append(builder.install)
    else:
        for exe in builder.executables:
            if shutil.which(exe) is None:
                missing.append(f"{exe} is not on PATH: this TensorRT-LLM release has no TensorRT engine backend "
                               f"(removed in 2026); pin a release that ships {exe}, or export --format hf-modelopt "
                               f"and build with --builder trtllm-pytorch")
    if missing:
        raise MoepressError("; ".join(missing) + " (use --dry-run to write the plan and commands)")
    return gpu


__all__ = ["check_environment", "gpu_info", "package_versions", "parse_nvidia_smi"]

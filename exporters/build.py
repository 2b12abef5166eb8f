"""`moepress build`: turn an export into what runs on one GPU target.

Builders (registry :data:`BUILDERS`; the artifact's files pick one, ``--builder`` forces it):

- ``trtllm-engine``: ``trtllm-build`` on a ``trtllm-ckpt`` export (config.json with
  ``architecture`` + ``mapping``, ``rank{N}.safetensors``; TensorRT-LLM
  docs/source/architecture/checkpoint.md). Flags read from ``tensorrt_llm/commands/build.py``
  (NVIDIA/TensorRT-LLM at 008b2b8d): ``--checkpoint_dir --output_dir --max_batch_size
  --max_input_len --max_seq_len --max_num_tokens --workers --gather_context_logits
  --output_timing_cache``, and the plugin flags of ``tensorrt_llm/plugin/plugin.py:
  add_plugin_argument`` (``--gemm_plugin --moe_plugin --gpt_attention_plugin
  --remove_input_padding --use_paged_context_fmha --use_fp8_context_fmha``).
  ``--gather_context_logits`` because the accuracy check reads the prompt's logits
  (calib/checks/candidates.py, engine kind).
  Which releases: ``trtllm-build`` belongs to the TensorRT engine backend, shipped by the 0.x
  releases (the unified build command since about 0.8, not re-checked tag by tag) and the 1.x
  releases up to the backend's removal on main (PR #15767, July 2026,
  ``docs/source/legacy/tensorrt-backend-removal.md``: "trtllm-build / trtllm-refit /
  trtllm-prune" removed, HF checkpoints load directly); the Triton backend still pinned a
  TensorRT-backend tree at v1.2.0rc2. A real build therefore checks that ``trtllm-build`` is on
  PATH and otherwise says to pin such a release or use the trtllm-pytorch path.
- ``tensorrt``: a TensorRT engine from the ONNX export with the ``tensorrt`` Python API
  (exporters/builders/tensorrt_engine.py: strongly typed network, timing cache, optional
  hardware-compatibility level).
- ``trtllm-pytorch``: a deployment bundle for TensorRT-LLM's PyTorch backend (the only TensorRT-LLM
  path for DeepSeek-V3 / Kimi K2): the ``hf-modelopt`` checkpoint (referenced, not copied),
  ``extra_llm_api_options.yaml`` (LLM API arguments, tensorrt_llm/llmapi/llm_args.py:
  ``kv_cache_config{dtype, free_gpu_memory_fraction}``, ``enable_attention_dp``) and
  ``serve.sh`` with ``trtllm-serve MODEL --backend pytorch --tp_size --ep_size --max_batch_size
  --max_num_tokens --max_seq_len --kv_cache_free_gpu_memory_fraction --extra_llm_api_options``
  (tensorrt_llm/commands/serve.py at NVIDIA/TensorRT-LLM 00209af1: ``--tp_size`` = tensor_parallel_size,
  ``--ep_size`` = moe_expert_parallel_size, ``--kv_cache_free_gpu_memory_fraction``,
  ``--extra_llm_api_options`` alias ``--config``); a smoke generation through ``tensorrt_llm.LLM`` when the
  package is importable.

Every build: plan (exporters/plan.py: format on target, parallelism, memory) -> OUT/plan.json and
OUT/build.sh (the exact commands) -> with ``dry_run`` stop there; otherwise check the GPU present
(compute capability of the target, enough devices) and the packages, run, record the manifest
(GPU, SM, driver, CUDA, TensorRT / TensorRT-LLM versions, flags, input hashes) and check the
built engine against the original model (``moepress check --kind engine``, calib/checks/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moepress.errors import MoepressError
from moepress.exporters.plan import Plan, plan
from moepress.exporters.targets import FP8_FMHA_MIN_SM, Target, get_target

# TensorRT-LLM QuantAlgo (tensorrt_llm/quantization/mode.py) -> moepress format
QUANT_ALGO_FORMAT = {None: "bf16", "FP8": "fp8", "FP8_BLOCK_SCALES": "fp8-block",
                     "FP8_PER_CHANNEL_PER_TOKEN": "fp8-dynamic", "W4A16_AWQ": "int4-awq",
                     "W4A16_GPTQ": "int4-gptq", "W4A8_AWQ": "w4a8-awq", "NVFP4": "nvfp4"}


@dataclass(frozen=True)
class BuildConfig:
    """What ``moepress build`` was asked; written verbatim into the manifest."""

    target: str
    builder: str
    format: str
    gpus: int | None = None
    tp: int | None = None
    ep: int | None = None
    max_seq_len: int = 4096
    max_batch: int = 8
    kv_cache_dtype: str = "bf16"
    hardware_compatibility: str = "none"  # tensorrt builder only


@dataclass(frozen=True)
class Builder:
    name: str
    artifact: str  # artifact kind it consumes (detect_artifact)
    commands: Callable  # (ctx) -> list[list[str]]
    requires: tuple[str, ...]  # python modules a real build imports
    install: str  # one-line hint when they are missing
    description: str
    executables: tuple[str, ...] = ()  # commands a real build runs (on PATH)


BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, *, artifact: str, requires: tuple[str, ...], install: str, description: str,
                     executables: tuple[str, ...] = ()):
    def deco(fn):
        BUILDERS[name] = Builder(name, artifact, fn, requires, install, description, executables)
        return fn

    return deco


@dataclass
class Context:
    artifact: Path
    out: Path  # final OUT (paths in commands point there)
    target: Target
    plan: Plan
    cfg: BuildConfig
    config: dict  # the artifact's config.json (or {})


# ---------------------------------------------------------------- artifacts


def detect_artifact(path: Path) -> str:
    """``trtllm-ckpt`` | ``onnx`` | ``hf-modelopt``, from the directory's files."""
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    cfg = _json(path / "config.json")
    if cfg is not None and "architecture" in cfg and "mapping" in cfg and any(path.glob("rank*.safetensors")):
        return "trtllm-ckpt"
    if any(path.glob("*.onnx")):
        return "onnx"
    if (path / "hf_quant_config.json").is_file():
        return "hf-modelopt"
    raise MoepressError(f"{path}: not a build input; expected a trtllm-ckpt export (config.json with "
                        f"architecture + mapping, rank0.safetensors), an onnx export (*.onnx) or an hf-modelopt "
                        f"export (hf_quant_config.json); write one with `moepress export`")


def _json(p: Path) -> dict | None:
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoepressError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _source_model(artifact: Path, kind: str, reference: str | Path | None) -> Path | None:
    """The Hugging Face checkpoint (or config) the artifact came from: what the planner reads."""
    if kind == "hf-modelopt":
        return artifact
    info = _json((artifact if artifact.is_dir() else artifact.parent) / "export.json") or {}
    for cand in (info.get("source"), reference):
        if cand and (Path(cand) / "config.json").is_file():
            return Path(cand)
    return None


def artifact_format(artifact: Path, kind: str, source: Path | None) -> str:
    from moepress.exporters.plan import default_format

    d = artifact if artifact.is_dir() else artifact.parent
    if kind == "trtllm-ckpt":
        q = (_json(d / "config.json") or {}).get("quantization") or {}
        algo = q.get("quant_algo")
        if algo not in QUANT_ALGO_FORMAT:
            raise MoepressError(f"{d / 'config.json'}: quantization.quant_algo {algo!r}: expected one of "
                                f"{', '.join(str(k) for k in QUANT_ALGO_FORMAT)}")
        return QUANT_ALGO_FORMAT[algo]
    if kind == "hf-modelopt":
        q = (_json(d / "hf_quant_config.json") or {}).get("quantization") or {}
        algo = q.get("quant_algo")
        if algo == "MIXED_PRECISION":
            return default_format(d)
        return QUANT_ALGO_FORMAT.get(algo, default_format(d))
    return default_format(source) if source else "bf16"


# ---------------------------------------------------------------- builders


@register_builder("trtllm-engine", artifact="trtllm-ckpt", requires=("tensorrt_llm",),
                  install="tensorrt_llm is not installed: pip install moepress[trtllm] on a GPU machine",
                  description="trtllm-build on a trtllm-ckpt export (TensorRT-LLM engine, one per rank)",
                  executables=("trtllm-build",))
def _trtllm_engine(ctx: Context) -> list[list[str]]:
    p, t = ctx.plan, ctx.target
    world = int((ctx.config.get("mapping") or {}).get("world_size", 1))
    # plugin dtype = the checkpoint's "dtype", spelled out: releases with the pydantic PluginConfig
    # (tensorrt_llm/plugin/plugin.py) also take "auto" (= that dtype), the early 0.x trees (e.g.
    # 035b99e0) only float16 / float32 / bfloat16 / disable. Quantized GEMMs (FP8, INT4) follow the
    # checkpoint's quantization, not the plugin dtype ("only effective for non-quantized gemm").
    plugin = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(
        str(ctx.config.get("dtype")), "auto")
    cmd = ["trtllm-build", "--checkpoint_dir", str(ctx.artifact), "--output_dir", str(ctx.out / "engine"),
           "--max_batch_size", str(p.max_batch), "--max_input_len", str(p.max_seq_len),
           "--max_seq_len", str(p.max_seq_len), "--max_num_tokens", str(p.max_num_tokens),
           "--gemm_plugin", plugin, "--gpt_attention_plugin", plugin, "--remove_input_padding", "enable",
           "--use_paged_context_fmha", "enable", "--gather_context_logits", "--workers", str(world),
           "--output_timing_cache", str(ctx.out / "timing.cache")]
    if (ctx.config.get("moe") or {}).get("num_experts") or ctx.config.get("moe_num_experts"):
        # the MoE plugin (layers/moe.py); checkpoint config.json "moe": {num_experts, top_k, ...}
        cmd[cmd.index("--remove_input_padding"):cmd.index("--remove_input_padding")] = ["--moe_plugin", plugin]
    if p.format == "fp8" and t.sm >= FP8_FMHA_MIN_SM:
        # FP8 context FMHA: Ada/Hopper/Blackwell kernels; reads FP8 Q/K/V (needs paged context FMHA)
        cmd += ["--use_fp8_context_fmha", "enable"]
    return [cmd]


@register_builder("tensorrt", artifact="onnx", requires=("tensorrt",),
                  install="tensorrt is not installed: pip install tensorrt (or moepress[tensorrt]) on a GPU machine",
                  description="TensorRT engine from the onnx export (tensorrt Python API, strongly typed)")
def _tensorrt(ctx: Context) -> list[list[str]]:
    onnx = ctx.artifact if ctx.artifact.is_file() else sorted(ctx.artifact.glob("*.onnx"))[0]
    hw = ctx.cfg.hardware_compatibility
    cmd = ["python", "-m", "moepress.exporters.builders.tensorrt_engine", str(onnx),
           str(ctx.out / "engine" / "model.engine"), "--max-batch", str(ctx.plan.max_batch),
           "--max-seq-len", str(ctx.plan.max_seq_len), "--timing-cache", str(ctx.out / "timing.cache"),
           "--hardware-compatibility", hw]
    return [["mkdir", "-p", str(ctx.out / "engine")], cmd]


@register_builder("trtllm-pytorch", artifact="hf-modelopt", requires=("tensorrt_llm",),
                  install="tensorrt_llm is not installed: pip install moepress[trtllm] on a GPU machine",
                  description="TensorRT-LLM PyTorch-backend bundle for an hf-modelopt export (trtllm-serve)")
def _trtllm_pytorch(ctx: Context) -> list[list[str]]:
    p = ctx.plan
    cmd = ["trtllm-serve", str(ctx.artifact), "--backend", "pytorch", "--tp_size", str(p.tp),
           "--ep_size", str(p.ep), "--max_batch_size", str(p.max_batch), "--max_num_tokens", str(p.max_num_tokens),
           "--max_seq_len", str(p.max_seq_len), "--kv_cache_free_gpu_memory_fraction", "0.9",
           "--extra_llm_api_options", str(ctx.out / "extra_llm_api_options.yaml"), "--host", "0.0.0.0",
           "--port", "8000"]
    if ctx.config.get("auto_map"):
        cmd.append("--trust_remote_code")
    if p.nodes > 1:
        # multi-node: one MPI rank per GPU, TensorRT-LLM's launcher (docs: trtllm-serve multi-node)
        cmd = ["mpirun", "-np", str(p.gpus), "--npernode", str(p.gpus // p.nodes), "trtllm-llmapi-launch"] + cmd
    return [cmd]


def llm_api_options(ctx: Context) -> str:
    """extra_llm_api_options YAML (tensorrt_llm/llmapi/llm_args.py field names)."""
    p = ctx.plan
    kv = "auto" if p.kv_cache_dtype == "bf16" else p.kv_cache_dtype  # KvCacheConfig.dtype: auto | fp8 | nvfp4
    lines = [
        "# TensorRT-LLM LLM API arguments (tensorrt_llm/llmapi/llm_args.py), written by moepress build",
        f"# plan: {p.gpus} x {ctx.target.gpu}, tp {p.tp}, ep {p.ep}, format {p.format}",
        f"tensor_parallel_size: {p.tp}",
        f"moe_expert_parallel_size: {p.ep}",
        "kv_cache_config:",
        f"  dtype: {kv}",
        "  free_gpu_memory_fraction: 0.9",
        "enable_attention_dp: false",
    ]
    return "\n".join(lines) + "\n"


SMOKE = """\
import json, sys
from tensorrt_llm import LLM, SamplingParams
from tensorrt_llm.llmapi import KvCacheConfig
llm = LLM(model=sys.argv[1], tensor_parallel_size={tp}, moe_expert_parallel_size={ep},
          max_batch_size={b}, max_seq_len={s}, kv_cache_config=KvCacheConfig(dtype="{kv}"){trc})
out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0.0))
print(json.dumps({{"prompt": "The capital of France is", "text": out[0].outputs[0].text}}))
"""


def smoke_script(ctx: Context) -> str:
    p = ctx.plan
    return SMOKE.format(tp=p.tp, ep=p.ep, b=p.max_batch, s=p.max_seq_len,
                        kv="auto" if p.kv_cache_dtype == "bf16" else p.kv_cache_dtype,
                        trc=", trust_remote_code=True" if ctx.config.get("auto_map") else "")


# ---------------------------------------------------------------- environment


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
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def check_environment(builder: Builder, target: Target, gpus: int, gpu: dict | None = None,
                      hardware_compatibility: str = "none") -> dict:
    """Raise one line naming what is missing for a real build; returns the GPU facts.

    A TensorRT engine built with hardware compatibility ``ampere_plus`` runs on every sm80+ GPU
    (TensorRT developer guide, "Hardware Compatibility"), so any sm80+ GPU may build it.
    """
    gpu = gpu_info() if gpu is None else gpu
    missing = []
    portable = hardware_compatibility == "ampere_plus" and target.sm >= 80
    if not gpu:
        missing.append(f"no CUDA device (a {builder.name} build for {target.name} needs "
                       f"{gpus} x {target.gpu}, sm{target.sm})")
    elif gpu["sm"] != target.sm and not (portable and gpu["sm"] >= 80):
        missing.append(f"this GPU is {gpu['gpu']} (sm{gpu['sm']}), the target {target.name} is sm{target.sm}: "
                       f"engines are built per compute capability; build on a {target.gpu}")
    elif gpu["count"] < gpus:
        missing.append(f"{gpu['count']} GPU(s) here, the plan needs {gpus}")
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


# ---------------------------------------------------------------- the build


def build(artifact: str | Path, target: str | Target, out: str | Path, dry_run: bool = True,
          builder: str | None = None, gpus: int | None = None, max_seq_len: int = 4096, max_batch: int = 8,
          force: bool = False, reference: str | Path | None = None, tp: int | None = None,
          ep: int | None = None, kv_cache_dtype: str = "bf16", hardware_compatibility: str = "none",
          progress=None) -> dict:
    """Plan and (unless ``dry_run``) build ``artifact`` for ``target`` into ``out``; returns build.json."""
    artifact, out = Path(artifact), Path(out)
    if not artifact.exists():
        raise MoepressError(f"{artifact}: no such export")
    t = target if isinstance(target, Target) else get_target(target)
    kind = detect_artifact(artifact)
    if builder is None:
        name = next(b.name for b in BUILDERS.values() if b.artifact == kind)
    elif builder not in BUILDERS:
        raise MoepressError(f"--builder {builder}: expected one of {', '.join(BUILDERS)}")
    else:
        name = builder
        if BUILDERS[name].artifact != kind:
            raise MoepressError(f"--builder {builder}: it builds from a {BUILDERS[name].artifact} export, "
                                f"{artifact} is a {kind} export; use --builder "
                                f"{next(b.name for b in BUILDERS.values() if b.artifact == kind)}")
    b = BUILDERS[name]
    if hardware_compatibility not in ("none", "ampere_plus", "same_compute_capability"):
        raise MoepressError(f"--hardware-compatibility {hardware_compatibility}: expected none, ampere_plus "
                            f"or same_compute_capability")
    adir = artifact if artifact.is_dir() else artifact.parent
    config = _json(adir / "config.json") or {}
    source = _source_model(artifact, kind, reference)
    if source is None:
        raise MoepressError(f"{artifact}: cannot find the model it was exported from (export.json has no "
                            f"existing source); pass --reference MODEL")
    source = source.resolve()
    fmt = artifact_format(artifact, kind, source)
    if kind == "trtllm-ckpt":
        # the checkpoint is already split: its mapping fixes the parallelism
        m = config.get("mapping") or {}
        world, ckpt_ep = int(m.get("world_size", 1)), int(m.get("moe_ep_size", 1) or 1)
        if gpus is not None and gpus != world:
            raise MoepressError(f"--gpus {gpus}: {artifact} was exported for world_size {world}; "
                                f"use --gpus {world} or re-export with `moepress export --tp {gpus}`")
        gpus, ep = world, (ep or ckpt_ep)
        if int(m.get("pp_size", 1) or 1) != 1:
            raise MoepressError(f"{adir / 'config.json'}: mapping.pp_size {m.get('pp_size')}: moepress plans "
                                f"tp/ep only; re-export with pp_size 1")
        # the KV-cache dtype of a TensorRT engine is fixed by the checkpoint
        # (quantization.kv_cache_quant_algo, docs/source/architecture/checkpoint.md)
        ckpt_kv = "fp8" if (config.get("quantization") or {}).get("kv_cache_quant_algo") == "FP8" else "bf16"
        if kv_cache_dtype != ckpt_kv and kv_cache_dtype != "bf16":
            raise MoepressError(f"--kv-cache-dtype {kv_cache_dtype}: {adir / 'config.json'} has "
                                f"kv_cache_quant_algo {(config.get('quantization') or {}).get('kv_cache_quant_algo')}; "
                                f"use --kv-cache-dtype {ckpt_kv} or re-export with an FP8 KV cache")
        kv_cache_dtype = ckpt_kv
        arch = str(config.get("architecture", ""))
        if arch.startswith("Deepseek"):
            raise MoepressError(f"{artifact}: {arch} has no TensorRT engine path in TensorRT-LLM; export "
                                f"--format hf-modelopt and use the trtllm-pytorch builder")
    if kind == "hf-modelopt":
        # an FP8 / NVFP4 KV cache calibrated into the export (hf_quant_config.json kv_cache_quant_algo) is what
        # TensorRT-LLM's "auto" KV-cache dtype uses: budget it unless asked otherwise
        hq = (_json(adir / "hf_quant_config.json") or {}).get("quantization") or {}
        kv_algo = {"FP8": "fp8", "NVFP4": "nvfp4"}.get(hq.get("kv_cache_quant_algo"))
        if kv_algo and kv_cache_dtype == "bf16":
            kv_cache_dtype = kv_algo
    runtime = "onnx" if name == "tensorrt" else "trtllm"
    try:
        p = plan(source, t, fmt, gpus=gpus, tp=tp, ep=ep, max_seq_len=max_seq_len, max_batch=max_batch,
                 kv_cache_dtype=kv_cache_dtype, runtime=runtime)
    except MoepressError as e:
        if kind != "trtllm-ckpt" or not str(e).startswith(f"--gpus {gpus}:"):
            raise
        # the split is fixed by the export: suggest re-exporting for the GPU count that fits
        best = plan(source, t, fmt, max_seq_len=max_seq_len, max_batch=max_batch, kv_cache_dtype=kv_cache_dtype)
        raise MoepressError(f"{artifact}: exported for world_size {gpus}, which cannot hold it on {t.gpu} "
                            f"({str(e).split(': ', 1)[1].split(': use')[0]}); re-export with `moepress export "
                            f"--format trtllm-ckpt --tp {best.gpus} --ep {best.ep}`") from None
    cfg = BuildConfig(t.name, name, fmt, gpus, tp, ep, max_seq_len, max_batch, kv_cache_dtype, hardware_compatibility)
    if out.exists() and any(out.iterdir()) and not force:
        raise MoepressError(f"{out}: exists and is not empty; use --force to replace it")
    final = out
    work = out.with_name(out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        ctx = Context(artifact.resolve(), final.resolve(), t, p, cfg, config)
        cmds = b.commands(ctx)
        files = {"plan.json": json.dumps(p.to_dict(), indent=2) + "\n"}
        if name == "trtllm-pytorch":
            # the bundle: serve.sh starts the server (it does not return); build.sh is the smoke
            # generation that shows the checkpoint loads and generates with the planned parallelism
            files["extra_llm_api_options.yaml"] = llm_api_options(ctx)
            files["smoke.py"] = smoke_script(ctx)
            files["serve.sh"] = _script(cmds)
            smoke = ["python", str(final.resolve() / "smoke.py"), str(ctx.artifact)]
            if p.nodes > 1:
                smoke = cmds[0][:cmds[0].index("trtllm-llmapi-launch") + 1] + smoke
            cmds = cmds + [smoke]
            files["build.sh"] = _script([smoke])
        if name == "tensorrt":
            from moepress.exporters.builders.tensorrt_engine import trtexec_command

            onnx = Path(cmds[1][3])
            alt = " ".join(shlex.quote(c) for c in trtexec_command(
                onnx, final.resolve() / "engine" / "model.engine", p.max_batch, p.max_seq_len,
                final.resolve() / "timing.cache", hardware_compatibility))
            files["build.sh"] = _script(cmds, f"# equivalent with trtexec:\n# {alt}")
        elif name == "trtllm-engine":
            files["build.sh"] = _script(cmds)
        for fn, text in files.items():
            (work / fn).write_text(text)
            if fn.endswith(".sh"):
                os.chmod(work / fn, 0o755)
        result = {"builder": name, "artifact": str(ctx.artifact), "artifact_kind": kind, "source": str(source),
                  "target": t.name, "format": fmt, "dry_run": dry_run, "commands": [shlex.join(c) for c in cmds],
                  "plan": p.to_dict(), "config": dataclasses.asdict(cfg), "out": str(final)}
        if not dry_run:
            result.update(_run(b, ctx, cmds, work, reference or source, progress))
        (work / "build.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        _manifest(work, ctx, result)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)
    return result


def _script(cmds: list[list[str]], extra: str = "") -> str:
    body = "\n".join(shlex.join(c) for c in cmds)
    return "#!/usr/bin/env bash\n# written by moepress build\nset -euo pipefail\n" + \
        (extra + "\n" if extra else "") + body + "\n"


def _manifest(work: Path, ctx: Context, result: dict) -> None:
    from moepress.manifest import file_digests, read_manifest, versions, write_manifest

    adir = ctx.artifact if ctx.artifact.is_dir() else ctx.artifact.parent
    known = read_manifest(adir).get("files", {})
    # input hashes: the artifact's own manifest when it has one (hashing a 1 TB export again costs
    # minutes), else every file of it
    inputs = {k: v["sha256"] for k, v in known.items()} if known else \
        {k: v["sha256"] for k, v in file_digests(adir).items()}
    write_manifest(work, {"stage": "build", "config": dataclasses.asdict(ctx.cfg),
                          "inputs": {"artifact": str(ctx.artifact), "sha256": inputs},
                          "environment": result.get("environment", {}), "commands": result["commands"],
                          "versions": versions(), "files": file_digests(work)})


def _run(b: Builder, ctx: Context, cmds: list[list[str]], work: Path, reference: Path, progress) -> dict:
    """A real build: environment check, the commands, the smoke / accuracy check."""
    gpu = check_environment(b, ctx.target, ctx.plan.gpus, hardware_compatibility=ctx.cfg.hardware_compatibility)
    env = dict(gpu)
    for mod, dist in (("tensorrt", "tensorrt"), ("tensorrt_llm", "tensorrt-llm")):
        try:
            from importlib import metadata

            env[mod] = metadata.version(dist)
        except Exception:
            pass
    # the commands write into OUT; run them against OUT.partial
    fin = str(ctx.out)
    logs = []
    for c in cmds:
        if b.name == "trtllm-pytorch" and "trtllm-serve" in c:
            continue  # a server: the bundle's serve.sh starts it; the smoke script checks it runs
        cc = [str(work) + a[len(fin):] if a.startswith(fin) else a for a in c]
        cc = [sys.executable if a == "python" else a for a in cc]  # this interpreter (its moepress, its tensorrt)
        r = subprocess.run(cc, capture_output=True, text=True)
        logs.append({"command": shlex.join(cc), "returncode": r.returncode, "stdout_tail": r.stdout[-4000:],
                     "stderr_tail": r.stderr[-4000:]})
        if r.returncode != 0:
            raise MoepressError(f"{cc[0]} failed (exit {r.returncode}): "
                                f"{(r.stderr.strip().splitlines() or ['no output'])[-1]}")
    res = {"environment": env, "logs": logs}
    if b.name == "trtllm-pytorch":
        last = (logs[-1]["stdout_tail"].strip().splitlines() or ["{}"])[-1] if logs else "{}"
        res["smoke"] = json.loads(last) if last.startswith("{") else {"output": last}
        res["accuracy"] = {"skipped": "no check candidate kind runs the TensorRT-LLM PyTorch runtime yet; "
                                      "the smoke generation shows it loads and generates"}
    else:
        try:
            res["accuracy"] = accuracy_check(work / "engine", reference, progress)
        except MoepressError as e:  # keep the built engine; the failed check is part of the record
            res["accuracy"] = {"passed": False, "error": str(e)}
    return res


def accuracy_check(engine: Path, reference: Path, progress=None) -> dict:
    """The check stage (calib/checks/) on the built engine against the original model."""
    from moepress.checks.config import CheckConfig
    from moepress.checks.runner import run_check

    return run_check(engine, reference, CheckConfig(kind="engine"), progress=progress)


def render(res: dict) -> str:
    from moepress.exporters.plan import Plan
    from moepress.exporters.plan import render as render_plan

    p = Plan(**res["plan"])
    lines = [f"builder    {res['builder']} ({res['artifact_kind']} export {res['artifact']})",
             render_plan(p), "commands"] + [f"  {c}" for c in res["commands"]]
    lines.append(f"written    {res['out']}/build.sh, plan.json, build.json"
                 + (", serve.sh, extra_llm_api_options.yaml, smoke.py" if res["builder"] == "trtllm-pytorch" else ""))
    if not res["dry_run"]:
        acc = res.get("accuracy", {})
        lines.append(f"accuracy   {json.dumps(acc.get('gates', acc), default=str)[:200]}")
    return "\n".join(lines)

"""What ``moepress build`` is handed: the kind of export (from its files), the model it came from,
its weight format, and what the export itself fixes of the plan.

Kinds: ``trtllm-ckpt`` (config.json with ``architecture`` + ``mapping``, ``rank{N}.safetensors``;
TensorRT-LLM docs/source/architecture/checkpoint.md), ``onnx`` (``*.onnx``), ``hf-modelopt``
(``hf_quant_config.json``), ``hf-fp8-block`` (DeepSeek's block-FP8 config.json, as the hf-fp8-block
export and the released DeepSeek-V3 / Kimi K2 checkpoints write it). A trtllm-ckpt is already split:
its ``mapping`` fixes the GPU count and EP size, and its ``quantization.kv_cache_quant_algo`` the
KV-cache dtype of the engine. An hf-modelopt export with a calibrated KV cache (hf_quant_config.json
``kv_cache_quant_algo``) is what TensorRT-LLM's "auto" KV-cache dtype uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import moepress.exporters.kv_cache as kv_cache
from moepress.compress import formats
from moepress.compress.formats import fp8_block
from moepress.errors import MoepressError
from moepress.exporters.own_format import default_format, modelopt_format
from moepress.exporters.targets import UNQUANTIZED


def read_json(p: Path) -> dict | None:
    """The JSON file ``p`` (None if there is none); a one-line error if it does not parse."""
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoepressError(f"{p}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise MoepressError(f"{p}: not valid JSON (nested too deeply to read)") from None


def json_object(p: Path, *keys: str) -> dict:
    """The object at ``keys`` in the JSON file ``p`` ({} where the file or a key is absent); one line where the file
    or a level on the way is not an object (a hand-edited ``"quantization": "fp8"``: one line, not a traceback in
    ``build``)."""
    v = read_json(p)
    for n in range(len(keys) + 1):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise MoepressError(f"{p}: {'.'.join(keys[:n]) or 'the file'} {v!r:.60}: expected an object")
        v = v.get(keys[n]) if n < len(keys) else v
    return v


def consumer_misload(d: Path, consumer: str) -> tuple[str, str] | None:
    """(newest affected version, how) where the export in ``d`` says ``consumer`` (export.json ``misloaded_by``
    key: transformers, compressed_tensors (the library transformers loads it through), sglang, tensorrt_llm, vllm,
    tensorrt) loads it wrongly or not at all (``misloaded_by`` / ``misloaded_why``, written by the
    compressed-tensors, hf-modelopt, hf-fp8-block and onnx exporters)."""
    info = read_json(d / "export.json")
    info = info if isinstance(info, dict) else {}
    why = info.get("misloaded_why") if isinstance(info.get("misloaded_why"), dict) else {}
    upto = _misloaded_by(info).get(consumer)
    if upto is None:
        return None
    how = why.get(consumer)
    return upto, how if isinstance(how, str) else "loads it wrongly"


def misloading_consumers(d: Path) -> dict[str, str]:
    """Every consumer the export in ``d`` says loads it wrongly or not at all, with the newest affected version
    (export.json ``misloaded_by``; {} where it names none)."""
    return _misloaded_by(read_json(d / "export.json"))


def _misloaded_by(info) -> dict[str, str]:
    """export.json's ``misloaded_by`` entries that name a version (``info``: the file's contents, whatever they are)."""
    by = info.get("misloaded_by") if isinstance(info, dict) else None
    return {c: v for c, v in by.items() if isinstance(v, str) and v} if isinstance(by, dict) else {}


def transformers_misload(d: Path) -> tuple[str, str] | None:
    """:func:`consumer_misload` for transformers."""
    return consumer_misload(d, "transformers")


def kv_cache_declared(d: Path) -> kv_cache.KVCache | None:
    """The quantized KV cache an export's own files declare (None: the runtime keeps the model's dtype):
    ``kv_cache_quant_algo`` of hf_quant_config.json (hf-modelopt) or of a trtllm-ckpt config.json's
    ``quantization``; a compressed-tensors config.json's ``quantization_config.kv_cache_scheme`` (8-bit
    float: FP8). An ONNX graph carries no KV cache."""
    def section(obj, key) -> dict:
        v = obj.get(key) if isinstance(obj, dict) else None
        return v if isinstance(v, dict) else {}

    cfg = read_json(d / "config.json")
    algo = section(read_json(d / "hf_quant_config.json"), "quantization").get("kv_cache_quant_algo") \
        or section(cfg, "quantization").get("kv_cache_quant_algo")
    scheme = section(section(cfg, "quantization_config"), "kv_cache_scheme")
    if not algo and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
        algo = "FP8"
    return kv_cache.by_quant_algo(algo if isinstance(algo, str) else None)


def artifact_dir(artifact: Path) -> Path:
    return artifact if artifact.is_dir() else artifact.parent


def detect_artifact(path: Path) -> str:
    """``trtllm-ckpt`` | ``onnx`` | ``hf-modelopt`` | ``hf-fp8-block`` (DeepSeek's block FP8: config.json
    ``quantization_config`` with ``quant_method: fp8`` and a ``weight_block_size``), from the directory's files."""
    if path.is_file() and path.suffix == ".onnx":
        return "onnx"
    cfg = read_json(path / "config.json")
    if cfg is not None and "architecture" in cfg and "mapping" in cfg and any(path.glob("rank*.safetensors")):
        return "trtllm-ckpt"
    if any(path.glob("*.onnx")):
        return "onnx"
    if (path / "hf_quant_config.json").is_file():
        return "hf-modelopt"
    qc = (cfg or {}).get("quantization_config")
    if fp8_block.block_config(qc):
        return "hf-fp8-block"
    raise MoepressError(f"{path}: not a build input; expected a trtllm-ckpt export (config.json with "
                        f"architecture + mapping, rank0.safetensors), an onnx export (*.onnx), an hf-modelopt "
                        f"export (hf_quant_config.json) or an hf-fp8-block export (config.json quantization_config "
                        f"quant_method fp8 with weight_block_size); write one with `moepress export`")


def source_model(artifact: Path, kind: str, reference: str | Path | None) -> Path | None:
    """The Hugging Face checkpoint (or config) the artifact came from: what the planner reads."""
    if kind in ("hf-modelopt", "hf-fp8-block"):
        return artifact
    info = read_json(artifact_dir(artifact) / "export.json") or {}
    for cand in (info.get("source"), reference):
        if cand and (Path(cand) / "config.json").is_file():
            return Path(cand)
    return None


def artifact_format(artifact: Path, kind: str, source: Path | None) -> str:
    """The weight format of the export: its ``quant_algo`` (TensorRT-LLM / Model-Optimizer's name,
    Format.quant_algo), else the source checkpoint's own."""
    d = artifact_dir(artifact)
    if kind == "trtllm-ckpt":
        algo = json_object(d / "config.json", "quantization").get("quant_algo")
        f = formats.by_quant_algo(algo)
        if f is None:
            raise MoepressError(f"{d / 'config.json'}: quantization.quant_algo {algo!r}: expected one of "
                                f"{', '.join(str(f.quant_algo) for f in formats.FORMATS.values())}")
        return f.name
    if kind == "hf-modelopt":
        f = modelopt_format(json_object(d / "hf_quant_config.json", "quantization"))
        return f.name if f is not None else default_format(d)
    if kind == "hf-fp8-block":
        return "fp8-block"
    return default_format(source, ct=False) if source else UNQUANTIZED  # onnx: packed inputs decoded (bf16)


def _trtllm_ckpt(artifact: Path, config: dict, gpus: int | None, ep: int | None, kv: str):
    """A trtllm-ckpt's mapping fixes the parallelism, its quantization the KV-cache dtype."""
    world, ckpt_ep, pp = _mapping(artifact_dir(artifact), config)
    if gpus is not None and gpus != world:
        raise MoepressError(f"--gpus {gpus}: {artifact} was exported for world_size {world}; "
                            f"use --gpus {world} or re-export with `moepress export --tp {gpus}`")
    if ep is not None and ep != ckpt_ep:
        raise MoepressError(f"--ep {ep}: {artifact} was exported with moe_ep_size {ckpt_ep}; use --ep {ckpt_ep} "
                            f"or re-export with `moepress export --ep {ep}`")
    gpus, ep = world, ckpt_ep
    where = artifact_dir(artifact) / "config.json"
    if pp != 1:
        raise MoepressError(f"{where}: mapping.pp_size {pp}: moepress plans tp/ep only; re-export with pp_size 1")
    # the KV-cache dtype of a TensorRT engine is fixed by the checkpoint
    # (quantization.kv_cache_quant_algo, docs/source/architecture/checkpoint.md)
    algo = json_object(where, "quantization").get("kv_cache_quant_algo")
    cached = kv_cache.by_quant_algo(algo)
    ckpt_kv = cached.name if cached is not None and cached.trtllm_ckpt else kv_cache.DEFAULT
    if kv != ckpt_kv and kv != kv_cache.DEFAULT:
        raise MoepressError(f"--kv-cache-dtype {kv}: {where} has kv_cache_quant_algo {algo}; "
                            f"use --kv-cache-dtype {ckpt_kv} or re-export with an FP8 KV cache")
    arch = str(config.get("architecture", ""))
    if arch.startswith("Deepseek"):
        raise MoepressError(f"{artifact}: {arch} has no TensorRT engine path in TensorRT-LLM; export "
                            f"--format hf-fp8-block (or hf-modelopt) and use the trtllm-pytorch builder")
    return gpus, ep, ckpt_kv


SIZES = ("world_size", "tp_size", "pp_size", "cp_size", "moe_tp_size", "moe_ep_size", "moe_cluster_size")


def _mapping(d: Path, config: dict) -> tuple[int, int, int]:
    """(world_size, moe_ep_size, pp_size) of a trtllm-ckpt's ``mapping``, checked as TensorRT-LLM's Mapping checks it
    (tensorrt_llm/mapping.py: world_size = tp_size x pp_size x cp_size, moe_tp_size x moe_ep_size x moe_cluster_size =
    tp_size; each of :data:`SIZES` a whole number >= 1, absent ones as TensorRT-LLM defaults them; its other keys
    are not read) and against the rank files it implies
    (docs/source/architecture/checkpoint.md: one rank{N}.safetensors per rank)."""
    where, m = d / "config.json", config.get("mapping") or {}
    if not isinstance(m, dict):
        raise MoepressError(f"{where}: mapping {m!r}: expected an object (world_size, tp_size, moe_ep_size, ...)")
    for key in SIZES:
        if key in m and (type(m[key]) is not int or m[key] < 1):
            raise MoepressError(f"{where}: mapping.{key} {m[key]!r}: expected a whole number >= 1")
    world = m.get("world_size", 1)
    tp, pp, cp, ep = m.get("tp_size", world), m.get("pp_size", 1), m.get("cp_size", 1), m.get("moe_ep_size", 1)
    cluster = m.get("moe_cluster_size", 1)
    moe_tp = m.get("moe_tp_size", max(1, tp // (ep * cluster)))
    if tp * pp * cp != world or moe_tp * ep * cluster != tp:
        raise MoepressError(f"{where}: mapping {m}: expected world_size = tp_size x pp_size x cp_size and "
                            "moe_tp_size x moe_ep_size x moe_cluster_size = tp_size (TensorRT-LLM's Mapping)")
    missing = [f"rank{r}.safetensors" for r in range(world) if not (d / f"rank{r}.safetensors").is_file()]
    if missing:
        raise MoepressError(f"{d}: {missing[0]} is missing: mapping.world_size {world} expects rank0 to "
                            f"rank{world - 1}.safetensors")
    return world, ep, pp


def declared_kv_refusal(where: Path, e) -> MoepressError:
    """A plan's refusal of the KV cache ``where`` declares (plan.KVCacheRefused ``e``), not one asked for
    (--kv-cache-dtype bf16 does not change what its runtime caches): what to re-quantize."""
    return MoepressError(f"{where}: it declares a {e.kv} KV cache, which its runtime uses: {e.why}; expected a "
                         f"quantize without --kv-cache {e.kv} (quantize.kv_cache in a recipe) for this target")


def _hf_modelopt(artifact: Path, config: dict, gpus: int | None, ep: int | None, kv: str):
    """A KV cache calibrated into the export is budgeted unless another dtype is asked for."""
    cached = kv_cache_declared(artifact_dir(artifact))
    if cached is not None and kv == kv_cache.DEFAULT:
        kv = cached.name
    return gpus, ep, kv


_FIXED = {"trtllm-ckpt": _trtllm_ckpt, "hf-modelopt": _hf_modelopt, "hf-fp8-block": _hf_modelopt}


def fixed_by_artifact(kind: str, artifact: Path, config: dict, gpus: int | None, ep: int | None,
                      kv_cache_dtype: str) -> tuple[int | None, int | None, str]:
    """(GPU count, EP size, KV-cache dtype) to plan with, after what the export fixes of them."""
    fix = _FIXED.get(kind)
    return fix(artifact, config, gpus, ep, kv_cache_dtype) if fix else (gpus, ep, kv_cache_dtype)


__all__ = ["artifact_dir", "artifact_format", "declared_kv_refusal", "detect_artifact", "fixed_by_artifact",
           "read_json", "source_model"]

"""Build a TensorRT engine from moepress's ONNX export with the ``tensorrt`` Python API.

Written against TensorRT 10's documented Python API (docs.nvidia.com/deeplearning/tensorrt,
"Python API": ``Builder``, ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``OnnxParser.
parse_from_file`` (resolves external data next to the file), ``IBuilderConfig.create_timing_cache``
/ ``set_timing_cache`` / ``get_timing_cache().serialize()``, ``hardware_compatibility_level``
(``HardwareCompatibilityLevel.AMPERE_PLUS``, ``SAME_COMPUTE_CAPABILITY``), optimization profiles,
``build_serialized_network``).

Strongly typed: the ONNX graph's own types decide every tensor's precision (bf16 weights cast to
float32, FP8 / INT4 Q/DQ), so no BF16/FP16/FP8 builder flag is set (TensorRT refuses precision
flags on a strongly typed network).

The ONNX contract (exporters/onnx_export.py): ``input_ids`` int64 [B, S] -> ``logits`` [B, S, V]
and ``hidden_states.{i}``; one optimization profile covers B in 1..max_batch, S in 1..max_seq_len.

Run on a GPU machine: ``python -m moepress.exporters.builders.tensorrt_engine MODEL.onnx
ENGINE --max-batch B --max-seq-len S [--timing-cache FILE] [--hardware-compatibility
ampere_plus]``; the trtexec equivalent is written beside it in build.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HW_LEVELS = ("none", "ampere_plus", "same_compute_capability")


def trtexec_command(onnx: Path, engine: Path, max_batch: int, max_seq_len: int, timing_cache: Path,
                    hw: str = "none") -> list[str]:
    """The same build with trtexec (TensorRT's samples/trtexec: --stronglyTyped, shapes, cache)."""
    opt_s = max(1, max_seq_len // 2)
    cmd = ["trtexec", f"--onnx={onnx}", "--stronglyTyped", f"--saveEngine={engine}",
           f"--timingCacheFile={timing_cache}", "--minShapes=input_ids:1x1",
           f"--optShapes=input_ids:{max_batch}x{opt_s}", f"--maxShapes=input_ids:{max_batch}x{max_seq_len}"]
    if hw == "ampere_plus":
        cmd.append("--hardwareCompatibilityLevel=ampere+")
    elif hw == "same_compute_capability":
        # TensorRT 10.9+ (samples/common/sampleOptions.cpp parses samecomputecapability from v10.9.0; the Python
        # enum SAME_COMPUTE_CAPABILITY appears in python/src/infer/pyCore.cpp at v10.9.0 too)
        cmd.append("--hardwareCompatibilityLevel=sameComputeCapability")
    return cmd


def _hw_level(trt, hw: str):
    """TensorRT's HardwareCompatibilityLevel for ``hw`` (None: none); one that this TensorRT lacks is refused."""
    if hw == "ampere_plus":
        return trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if hw == "same_compute_capability":
        if not hasattr(trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY"):  # TensorRT < 10.9
            raise RuntimeError(f"--hardware-compatibility same_compute_capability: TensorRT {trt.__version__} has "
                               "no such level (10.9 and newer do); use none or ampere_plus")
        return trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    return None


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, max_batch: int = 8, max_seq_len: int = 4096,
                 timing_cache: str | Path | None = None, hardware_compatibility: str = "none",
                 workspace_gb: float | None = None) -> dict:
    """Parse ``onnx_path`` into a strongly typed network and serialize the engine; returns facts."""
    import tensorrt as trt

    level = _hw_level(trt, hardware_compatibility)  # before the parse: a refusal costs no minutes of it
    t0 = time.monotonic()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT's ONNX parser failed: {errs}")
    config = builder.create_builder_config()
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    if level is not None:
        config.hardware_compatibility_level = level
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    shapes = ((1, 1), (max_batch, max(1, max_seq_len // 2)), (max_batch, max_seq_len))
    for i in range(network.num_inputs):  # input_ids (and the contract's optional [B, S] inputs)
        inp = network.get_input(i)
        if inp.name not in ("input_ids", "attention_mask", "position_ids"):
            raise RuntimeError(f"{onnx_path}: input '{inp.name}' is not part of the contract "
                               f"(input_ids [B, S] -> logits [B, S, V])")
        profile.set_shape(inp.name, *shapes)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    Path(engine_path).write_bytes(bytes(plan))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"engine": str(engine_path), "tensorrt": trt.__version__, "seconds": round(time.monotonic() - t0, 1),
            "outputs": [network.get_output(i).name for i in range(network.num_outputs)],
            "hardware_compatibility": hardware_compatibility, "strongly_typed": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build a TensorRT engine from a moepress ONNX export.")
    ap.add_argument("onnx")
    ap.add_argument("engine")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--timing-cache")
    ap.add_argument("--hardware-compatibility", choices=HW_LEVELS, default="none")
    ap.add_argument("--workspace-gb", type=float)
    a = ap.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("tensorrt is not installed: pip install tensorrt (or moepress[tensorrt]) on a GPU machine",
              file=sys.stderr)
        return 2
    try:
        info = build_engine(a.onnx, a.engine, max_batch=a.max_batch, max_seq_len=a.max_seq_len,
                            timing_cache=a.timing_cache, hardware_compatibility=a.hardware_compatibility,
                            workspace_gb=a.workspace_gb)
    except (RuntimeError, OSError) as e:  # a refusal, TensorRT's own failure, an unreadable file: one line
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

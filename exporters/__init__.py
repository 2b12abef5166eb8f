"""Output formats (exporters), GPU targets and engine builds.

One module per exporter, each declaring an :class:`Exporter` (``EXPORTER``); :func:`exporters`
assembles them (``moepress export`` lists its ``--format`` choices from there). An exporter's
function ``fn(src: Path, writer: CheckpointWriter, cfg: ExportConfig, progress: Progress) -> dict``
writes its files into ``writer`` (tensors through ``writer.add``/``end_shard``, or any file under
``writer.partial``) and returns a summary dict (what it wrote; merged into ``export.json``).
:func:`export` validates the input, opens the writer (atomic: ``OUT.partial`` renamed into place
when complete) and writes ``export.json`` (format, config, source files' sha256, versions) and
the manifest.

Also here: GPU targets (targets.py, kv_cache.py), the deployment planner (plan.py, shape.py) and
``moepress build`` (build.py, artifacts.py, environment.py, builders/).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path

from moepress.errors import MoepressError
from moepress.exporters.base import ExportConfig, Exporter
from moepress.manifest import read_manifest, sha256_file, versions
from moepress.outputs import require_space
from moepress.progress import Progress

EXPORTERS: dict[str, Exporter] = {}


def exporters() -> dict[str, Exporter]:
    """The exporters by name, assembled on first use (their modules import torch and onnx, which the
    planner and `moepress --help` do not need)."""
    if not EXPORTERS:
        from moepress.exporters import compressed_tensors, hf_fp8_block, hf_modelopt, onnx_export, trtllm_ckpt

        for m in (hf_modelopt, hf_fp8_block, compressed_tensors, trtllm_ckpt, onnx_export):
            EXPORTERS[m.EXPORTER.name] = m.EXPORTER
    return EXPORTERS


def refuse_config(cfg: ExportConfig) -> Exporter:
    """The exporter ``cfg`` asks for, once every option it gives is one that exporter takes (one line
    naming the option otherwise); needs no input, so `moepress run` asks it before any stage."""
    reg = exporters()
    if cfg.format not in reg:
        raise MoepressError(f"--format {cfg.format}: expected one of {', '.join(sorted(reg))}")
    ex = reg[cfg.format]
    unknown = [k for k, _ in cfg.options if k not in ex.options]
    if unknown:
        raise MoepressError(f"--option {unknown[0]}: not an option of --format {cfg.format}; expected "
                            f"{', '.join(ex.options) or 'none'}")
    if cfg.tp < 1 or cfg.ep < 1:
        raise MoepressError(f"--tp/--ep: expected positive sizes, got tp={cfg.tp} ep={cfg.ep}")
    if not ex.sharded and (cfg.tp, cfg.ep) != (1, 1):  # it writes one model whatever they say
        sharded = ", ".join(n for n, e in sorted(reg.items()) if e.sharded)
        raise MoepressError(f"--tp/--ep: --format {cfg.format} writes one unsharded model (tp={cfg.tp} ep={cfg.ep} "
                            f"given); only {sharded} takes them")
    if ex.check_config is not None:
        ex.check_config(cfg)
    return ex


def refuse_packed_shapes(sm) -> None:
    """Each packed weight's ``weight_shape`` (compressed-tensors pack-quantized: its shape once decoded, where
    the shard header gives the packed words' and the stream's check skips it) against config.json."""
    ck = sm.ckpt
    for i in range(sm.adapter.num_layers):
        prefix = sm.adapter.layer_prefix(i)
        for key, shape in sm.expected_layer_shapes(i).items():
            ws = prefix + key + "_shape"  # <linear>.weight -> <linear>.weight_shape
            if key.endswith(".weight") and ws in ck and (got := ck.get(ws).tolist()) != list(shape):
                raise MoepressError(f"{ck.path}: tensor '{ws}' is {got}, config.json implies {list(shape)}")


def written_bytes(reader) -> int:
    """A lower bound of the bytes an export of ``reader``'s checkpoint writes (its output's free-space check):
    every stored tensor once, a floating-point one at one byte per element (FP8, the narrowest any exporter
    converts floats to: hf-fp8-block), halved for what an exporter leaves out (MTP layers, KV-cache scales)."""
    total = 0
    for name in reader.names():
        info = reader.info(name)
        total += min(info.nbytes, math.prod(info.shape)) if info.dtype.startswith(("F", "BF")) else info.nbytes
    return total // 2


def export(src: str | Path, out: str | Path, cfg: ExportConfig, *, force: bool = False, progress=None) -> dict:
    """Run exporter ``cfg.format`` on checkpoint ``src`` into ``out``; returns export.json's content."""
    # imported here: this package's light modules (targets, kv_cache) are read when the CLI starts
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
    from moepress.compress.stream import StreamedModel

    progress = progress or Progress(mode="quiet")
    ex = refuse_config(cfg)
    src = Path(src)
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config)
    ex.refuse_family(adapter.family, src)
    # the shard headers against config.json before anything is written (a tensor of the wrong shape is
    # refused in one line, not exported as it is or failed mid-export); StreamedModel checks them when built
    refuse_packed_shapes(StreamedModel(reader, prefetch=False))
    require_space(out, written_bytes(reader), f"the {cfg.format} export's tensors")
    with CheckpointWriter(out, force=force, sources=(src,)) as writer:
        summary = ex.fn(src, writer, cfg, progress) or {}
        # the source's own manifest already holds its digests (hashing 1 TB again costs minutes)
        known = {k: v["sha256"] for k, v in read_manifest(src).get("files", {}).items()} \
            if (src / "moepress-manifest.json").exists() else {}
        sources = {p.name: known.get(p.name) or sha256_file(p) for p in sorted(src.iterdir())
                   if p.is_file() and p.suffix in (".safetensors", ".json") and p.name != "moepress-manifest.json"}
        info = {"format": cfg.format, "config": dataclasses.asdict(cfg), "source": str(src.resolve()),
                "source_sha256": sources, "versions": versions(), **summary}
        writer.write_json("export.json", info)
        writer.manifest.update({"stage": "export", "config": dataclasses.asdict(cfg),
                                "inputs": {"model": str(src.resolve()), "sha256": sources}})
    return info


__all__ = ["ExportConfig", "Exporter", "EXPORTERS", "exporters", "export", "field", "refuse_config"]

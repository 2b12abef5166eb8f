"""Output formats (exporters), GPU targets and engine builds.

Exporters register here; ``moepress export`` lists ``--format`` choices from :data:`EXPORTERS`.
Each exporter is a function ``fn(src: Path, writer: CheckpointWriter, cfg: ExportConfig,
progress: Progress) -> dict`` that writes its files into ``writer`` (tensors through
``writer.add``/``end_shard``, or any file under ``writer.partial``) and returns a summary dict
(what it wrote; merged into ``export.json``). :func:`export` validates the input, opens the
writer (atomic: ``OUT.partial`` renamed into place when complete) and writes ``export.json``
(format, config, source files' sha256, versions) and the manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moepress.errors import MoepressError


@dataclass(frozen=True)
class ExportConfig:
    format: str
    tp: int = 1  # tensor-parallel size (trtllm-ckpt shards)
    ep: int = 1  # expert-parallel size (trtllm-ckpt: moe_ep_size)
    dtype: str = "bfloat16"  # dtype of unquantized tensors in the output
    opset: int = 21  # onnx
    options: tuple[tuple[str, str], ...] = ()  # exporter-specific KEY=VALUE (--option)

    def option(self, key: str, default=None):
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Exporter:
    name: str
    fn: Callable
    description: str
    families: tuple[str, ...] | None = None  # adapter family names; None: every family
    consumers: str = ""  # who loads it (help text)


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, *, description: str, families: tuple[str, ...] | None = None,
                      consumers: str = ""):
    def deco(fn):
        EXPORTERS[name] = Exporter(name, fn, description, families, consumers)
        return fn

    return deco


def _load_builtin() -> None:
    """Import the format modules so they register (each is optional until written)."""
    import importlib

    for mod in ("hf_modelopt", "hf_fp8_block", "compressed_tensors", "trtllm_ckpt", "onnx_export"):
        try:
            importlib.import_module(f"moepress.exporters.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"moepress.exporters.{mod}":
                raise


def exporters() -> dict[str, Exporter]:
    _load_builtin()
    return EXPORTERS


def export(src: str | Path, out: str | Path, cfg: ExportConfig, *, force: bool = False, progress=None) -> dict:
    """Run exporter ``cfg.format`` on checkpoint ``src`` into ``out``; returns export.json's content."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter
    from moepress.manifest import read_manifest, sha256_file, versions
    from moepress.progress import Progress

    progress = progress or Progress(mode="quiet")
    reg = exporters()
    if cfg.format not in reg:
        raise MoepressError(f"--format {cfg.format}: expected one of {', '.join(sorted(reg))}")
    ex = reg[cfg.format]
    src = Path(src)
    reader = CheckpointReader(src)
    adapter = get_adapter(reader.config)
    if ex.families is not None and adapter.family not in ex.families:
        raise MoepressError(f"--format {cfg.format}: not available for {adapter.family} models "
                            f"({src}); it supports {', '.join(ex.families)}")
    if cfg.tp < 1 or cfg.ep < 1:
        raise MoepressError(f"--tp/--ep: expected positive sizes, got tp={cfg.tp} ep={cfg.ep}")
    with CheckpointWriter(out, force=force) as writer:
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


__all__ = ["ExportConfig", "Exporter", "EXPORTERS", "register_exporter", "exporters", "export", "field"]

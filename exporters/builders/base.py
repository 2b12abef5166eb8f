"""What every builder is: one :class:`Builder` record per module in this package, with the same
hooks, and the :class:`Context` its hooks are handed.

A builder turns one kind of export (``artifact``, exporters/artifacts.py) into what runs on one GPU
target: ``commands(ctx)`` are the exact commands (written into OUT/build.sh, run by a real build);
``files(ctx, commands)`` the files written beside plan.json and the commands a real build runs;
``server`` names a command the bundle starts but a build does not run; ``finish(logs)`` what a
real build records when there is no engine to check (else the caller's accuracy check runs on
OUT/engine); ``remote_code(directory, config)`` why the export cannot be loaded without its own
Python code (None: it can), for a builder whose commands load the checkpoint with transformers /
TensorRT-LLM: without ``--trust-remote-code`` such a build is refused, and no generated script or
command carries a remote-code flag unless it was given.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moepress.exporters import kv_cache
from moepress.exporters.plan import Plan
from moepress.exporters.targets import Target


@dataclass(frozen=True)
class BuildConfig:
    """What ``moepress build`` was asked, after what the export fixes; written verbatim into the manifest."""

    target: str
    builder: str
    format: str
    gpus: int | None = None
    tp: int | None = None
    ep: int | None = None
    max_seq_len: int = 4096
    max_batch: int = 8
    kv_cache_dtype: str = kv_cache.DEFAULT
    hardware_compatibility: str = "none"  # tensorrt builder only
    trust_remote_code: bool = False  # generated scripts may run the checkpoint's own Python (--trust-remote-code)


@dataclass
class Context:
    artifact: Path
    out: Path  # final OUT (paths in commands point there)
    target: Target
    plan: Plan
    cfg: BuildConfig
    config: dict  # the artifact's config.json (or {})


def script(cmds: list[list[str]], extra: str = "") -> str:
    """A bash script running ``cmds`` (``extra``: comment lines before them)."""
    body = "\n".join(shlex.join(c) for c in cmds)
    return "#!/usr/bin/env bash\n# written by moepress build\nset -euo pipefail\n" + \
        (extra + "\n" if extra else "") + body + "\n"


def build_script(ctx: Context, cmds: list[list[str]]) -> tuple[dict[str, str], list[list[str]]]:
    """The default ``files`` hook: build.sh runs the commands."""
    return {"build.sh": script(cmds)}, cmds


@dataclass(frozen=True)
class Builder:
    name: str
    artifact: str  # artifact kind it consumes (artifacts.detect_artifact)
    commands: Callable[[Context], list[list[str]]]
    requires: tuple[str, ...]  # python modules a real build imports
    install: str  # one-line hint when they are missing
    description: str
    executables: tuple[str, ...] = ()  # commands a real build runs (on PATH)
    runtime: str = "trtllm"  # what the plan budgets (exporters/plan.py RUNTIMES)
    files: Callable[[Context, list[list[str]]], tuple[dict[str, str], list[list[str]]]] = build_script
    written: tuple[str, ...] = ()  # files besides build.sh, plan.json, build.json (named in the summary)
    server: str | None = None  # a command the bundle starts and a build does not run
    finish: Callable[[list[dict]], dict] | None = None  # a real build's record from its logs (no engine to check)
    remote_code: Callable[[Path, dict], str | None] | None = None  # why loading needs the checkpoint's code
    # the runtime it runs as export.json misloaded_by names it: an export saying it misloads there is refused
    consumer: str | None = None
    also: tuple[str, ...] = ()  # other artifact kinds it consumes
    hardware_compatibility: bool = False  # applies --hardware-compatibility (TensorRT's level)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every artifact kind it builds from."""
        return (self.artifact, *self.also)


__all__ = ["BuildConfig", "Builder", "Context", "build_script", "script"]

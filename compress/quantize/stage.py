"""The quantize stage: stream the checkpoint one decoder layer at a time, quantize its linears,
write each layer as one shard.

Calibrated formats: layer i is calibrated on the outputs of the already quantized layers 0..i-1
(``sequential``, the default; compress/quantize/calibrated.py). Calibration-free formats: tensor by
tensor, no layer module (compress/quantize/free.py). The writer's journal makes a killed run resume
at the first unfinished layer with byte-identical output; its resume key (compress/checkpoint/resume.py)
lets only the same run (config, input, moepress version) continue it.

Under torchrun the calibration batches are split across ranks (contiguous shares), statistics are
gathered and folded in global order and rank 0 writes: the output is identical to one process's.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as tdist

from moepress.calib import distributed as dist
from moepress.calib.data import source_hashes
from moepress.compress import formats
from moepress.compress.checkpoint import CheckpointReader, CheckpointWriter, read_later
from moepress.compress.checkpoint.resume import ResumeRefused, resume_key
from moepress.compress.checkpoint.writer import check_output
from moepress.compress.formats import ct_inputs
from moepress.compress.quant import fp8
from moepress.compress.quantize.calibrated import quantize_layer
from moepress.compress.quantize.config import GROUP_SIZES, PROGRESS, REPORT, QuantConfig
from moepress.compress.quantize.free import (
    FreePipeline,
    formatted_linears,
    linear_names,
    model_linear_names,
    quantized_bytes,
)
from moepress.compress.quantize.group import LayerResult, apply_fake_quant, refuse_non_finite
from moepress.compress.quantize.report import (
    QuantTotals,
    hf_quant_config,
    manifest_entries,
    model_config,
    quant_report,
    sidecar,
)
from moepress.compress.stream import StreamedModel, read_ahead_budget
from moepress.device import default_device
from moepress.errors import MoepressError
from moepress.outputs import require_space
from moepress.progress import QUIET, Progress

# token ids [B, S] per batch, or a function returning them (called once the checkpoint is validated,
# on rank 0 first under torchrun, and only if the config needs calibration)
Batches = list[torch.Tensor] | Callable[[], list[torch.Tensor]]


def quantize_checkpoint(model: str | Path, out: str | Path, cfg: QuantConfig, *, batches: Batches | None = None,
                        progress: Progress = QUIET, force: bool = False, resume: bool = False,
                        device: torch.device | None = None, notes: Callable[[], list[str]] | None = None) -> dict:
    """Quantize ``model`` into ``out``; returns the summary (also in quant_report.json).

    ``batches``: the calibration token ids, built by the caller; None only for a config that needs no calibration.
    ``device``: where layers are built and quantized (None: the CPU); a runtime choice, not part of ``cfg``.
    ``notes``: lines said once the input and options are validated, before the first layer (rank 0 only; the
    CLI's note of the exports that will refuse the output)."""
    t0 = time.monotonic()
    stage = QuantizeStage(model, cfg, device=device)
    stage.run(out, batches, force=force, resume=resume, progress=progress, notes=notes)
    return stage.summary(out, t0)


EXTRA_LAYERS = ("stored past num_hidden_layers (DeepSeek-V3 stores its multi-token-prediction layer there): quantize "
                "streams the decoder layers only, so these are not written")
NO_NEXTN = " and config.json says num_nextn_predict_layers=0"


def quantize_resume_key(cfg: QuantConfig, src: Path, device: torch.device | None = None) -> dict:
    """The key a quantize partial is resumed by: the config, the input, and for a calibrated config what the
    calibration sources read (a resume must not finish, on edited calibration data, a run whose first layers were
    calibrated on the old data) and the kind of device it runs on (the GPU's solves round unlike the CPU's: layers
    calibrated on one and then the other would match neither device's run; calibration-free formats are
    byte-identical on both, and their calibration settings change no byte). On the CPU, torch's thread count too:
    its reductions split by thread, so AWQ's scales round by it (1 and 2 threads differ in the last bit)."""
    key, kind = cfg.recorded(), torch.device(device or "cpu").type
    if cfg.needs_calibration:
        key |= {"calib_content": source_hashes(cfg.calib), "device": kind,
                **({"torch_threads": torch.get_num_threads()} if kind == "cpu" else {})}
    return resume_key("quantize", key, src)


def check_rules(sm: StreamedModel, cfg: QuantConfig) -> None:
    """Refuse, before any work, a --rule naming no linear of the model (``mlp.experts.*`` on Mixtral), and --format
    / --rule leaving every linear unquantized without a --kv-cache (a quantization holding nothing), by their names or
    their shapes (no linear's width holds the format's block or group: a smaller --group-size, or formats, named)."""
    if cfg.kv_cache is None and (why := _nothing_quantized(sm, cfg.format_of, cfg.group_size)) is not None:
        asked = [f"--format {cfg.format}"] * (cfg.format is not None) + [f"--rule {p}={f}" for p, f in cfg.rules]
        fit = [n for n, f in formats.FORMATS.items() if f.quantize is not None and f.scale is not None
               and n != cfg.format and _nothing_quantized(sm, lambda r, u, n=n: n, cfg.group_size) is None]
        groups = [g for g in GROUP_SIZES if g < cfg.group_size and _nothing_quantized(sm, cfg.format_of, g) is None]
        eg = ", or ".join([f"--group-size {g}" for g in groups[-1:]] + [f"--format {' or '.join(fit)}"] * bool(fit))
        raise MoepressError(f"{' '.join(asked)}: every linear of {sm.ckpt.path} would stay unquantized{why}; "
                            "expected at least one linear in a format (or a --kv-cache)"
                            + (f", e.g. {eg}" if why and eg else ""))
    if not cfg.rules:
        return
    a, cache = sm.adapter, {}
    names = model_linear_names(sm)
    for pat, fmt in cfg.rules:
        if not any(fnmatch.fnmatchcase(rel, pat) or fnmatch.fnmatchcase(full, pat) for rel, full in names):
            layer = a.moe_layers()[0] if a.moe_layers() else 0
            seen = linear_names(sm, layer, cache)
            raise MoepressError(f"--rule {pat}={fmt}: matches no linear of {sm.ckpt.path}; expected a pattern over "
                                f"names such as {', '.join(sorted({seen[0], seen[-1]}))} (in the layer, or full)")
    refuse_shadowed_rules(cfg, names)


def _nothing_quantized(sm: StreamedModel, format_of: Callable[[str, str], str | None], group_size: int) -> str | None:
    """None when some linear gets a format (``format_of(name in its layer, full name)``) that holds its shape;
    else "" (every linear's format is none) or " (e.g. NAME: why its format skips it)" (formats.Format.skip: the
    quantizer's own rule)."""
    why = ""
    for i, rel, _, _, _, skipped in formatted_linears(sm, format_of, group_size):
        if skipped is None:
            return None
        why = why or f" (e.g. {sm.adapter.layer_prefix(i) + rel}: {skipped})"
    return why


def refuse_shadowed_rules(cfg: QuantConfig, names: list[tuple[str, str]]) -> None:
    """A --rule every linear of which an earlier rule already decides (the first matching rule applies) would
    change nothing, without a word: refused naming both (``names``: each linear's (in-layer, full) name; every
    rule names one of them, as check_rules checked first)."""
    decided = {cfg.rule_of(rel, full) for rel, full in names}
    for k, (pat, fmt) in enumerate(cfg.rules):
        if k not in decided:
            rel, full = next((r, f) for r, f in names if fnmatch.fnmatchcase(r, pat) or fnmatch.fnmatchcase(f, pat))
            p, f = cfg.rules[cfg.rule_of(rel, full)]
            raise MoepressError(f"--rule {pat}={fmt}: every linear it matches is decided by the earlier --rule {p}={f} "
                                f"(the first matching rule applies, e.g. to {rel}); expected it before that rule, "
                                "or a pattern that names other linears")


def refuse_expert_index_rules(sm: StreamedModel, cfg: QuantConfig) -> None:
    """A --rule that picks some of a layer's routed experts by index (``mlp.experts.3.*``), checked against the
    names before a stage that renumbers the experts (prune keeps the first N indices): it would name other
    experts afterwards, or none. Refused, as the prune refuses such a pattern in a Kimi ``ignore`` list."""
    a = sm.adapter
    for pat, fmt in cfg.rules:
        picked = a.picked_by_index(lambda i, n, pat=pat: fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(
            n.removeprefix(a.layer_prefix(i)), pat))
        if picked is not None:
            part = picked[2][0].removeprefix(a.layer_prefix(picked[0])).rsplit(".", 2)[0]  # e.g. mlp.experts
            raise MoepressError(f"--rule {pat}={fmt}: picks routed experts by index (some of layer {picked[0]}'s "
                                f"{part}), which the prune stage renumbers; expected a pattern that treats every "
                                f"expert of a layer alike (e.g. '{part}.*'), or quantize the pruned checkpoint "
                                "with moepress quantize")


class QuantizeStage:
    """One quantize run: the opened checkpoint, the process group, and the steps that write it."""

    def __init__(self, model: str | Path, cfg: QuantConfig, device: torch.device | None = None):
        """Join torchrun's group, then open ``model`` (refusing a checkpoint moepress already quantized)."""
        self.cfg = cfg
        # the ranks agree on the options before any of them validates its input: a rank refused alone (another
        # --rule) left the others waiting in the group's start-up
        self.env = dist.init()
        dist.agree(self.env, asdict(cfg))
        self.reader = reader = CheckpointReader(model)
        dist.agree_on_input(self.env, reader.path)  # a rank's MODEL may be other weights (another node's copy)
        if formats.read_layout(reader.path) is not None:
            raise MoepressError(f"{reader.path}: already quantized by moepress ({formats.SIDECAR}); "
                                "quantize the original")
        # bf16 weights stay bf16 in the layer (StoredLinear: same float32 results, half the memory)
        # and the reader runs a bounded distance ahead: peak memory ~ one stored layer + its output
        self.budget = read_ahead_budget(reader)
        self.sm = StreamedModel(reader, keep_stored=True, read_ahead_bytes=self.budget, device=device)
        self.adapter = self.sm.adapter
        self.sm.check_weights()
        check_rules(self.sm, cfg)
        self.extra_layers = [i for i in reader.layer_indices() if i >= self.adapter.num_layers]
        self.totals = QuantTotals()
        self.batches: list[torch.Tensor] | None = None  # this rank's share
        self.n_tokens = 0  # in all ranks' batches
        self.calibrated = False
        self.done: set[str] = set()  # tensors a killed run already wrote
        self.w = None

    # ---- the run ------------------------------------------------------------------------------

    def run(self, out: str | Path, batches: Batches | None, *, force: bool, resume: bool, progress: Progress,
            notes: Callable[[], list[str]] | None = None) -> None:
        """Write the quantized checkpoint and its configs, sidecar and report into ``out``."""
        env, a, progress = self.env, self.adapter, progress if self.env.is_main else QUIET
        # a resumed partial must have been started by this very run (config, input, moepress)
        key, sources = quantize_resume_key(self.cfg, self.reader.path, self.sm.device), self.cfg.inputs(self.reader,
                                                                                                         out)
        # what __init__'s agreement on the config could not compare yet, before any rank-dependent step
        dist.agree(env, {"calib_content": key["config"].get("calib_content"), "device": key["config"].get("device"),
                         "force": force, "resume": resume})
        # every rank, before the calibration (none waits for a rank 0 that gave up); the writer checks under its lock
        check_output(out, force=force, resume=resume, resume_key=key, sources=sources, finished=PROGRESS,
                     say=progress.info if env.is_main else None)
        require_space(out, quantized_bytes(self.sm, self.cfg), "the quantized tensors")
        if self.extra_layers:
            nextn = NO_NEXTN * self._declares_nextn()
            progress.info(f"layers {self.extra_layers} of {self.reader.path}: {EXTRA_LAYERS}{nextn}")
        for line in notes() if notes is not None and env.is_main else ():
            progress.info(line)
        self._take_batches(batches)
        # calibration-free: the shard of layer i is written while layer i+1 is quantized
        writer = (CheckpointWriter(out, force=force, resume=resume,
                                   background=not self.calibrated or self.sm.device.type != "cpu",
                                   resume_key=key, sources=sources, transient=(PROGRESS,))
                  if env.is_main else _NullWriter())
        with writer as w, dist.peer_errors(env):  # a lost rank: PeerLost, and the writer keeps the partial
            self.w = w
            start = self._resume_point(progress)
            if resume and not start and not w.changed:
                progress.info("quantize: --resume: no finished layer of a killed run to keep; starting at layer 0")
            if a.embed_name not in self.done:
                w.add(a.embed_name, read_later(self.reader, a.embed_name))  # read when its shard is written
                w.end_shard(unit=False)  # no layer yet: an interrupt now leaves nothing to resume
            hs = self.sm.embed(self.batches) if self.calibrated else None
            with progress.task("quantize", a.num_layers) as task:
                if start:
                    task.advance(start, note=f"layers 0-{start - 1} already written")
                if self.calibrated:
                    self._calibrated_layers(hs, start, task)
                else:
                    self._free_layers(start, task)
            self._finish()
        self.w = None
        self._say_skipped(progress)
        dist.barrier(env)

    def _say_skipped(self, progress: Progress) -> None:
        """Linears the format cannot hold (a width not a multiple of its block or group) are left in their
        stored precision: said on the terminal too, since a run that quantized few or no linears otherwise
        looks like any other."""
        skipped, t = self.totals.skipped, self.totals
        if skipped:
            none = "no linear was quantized: " if not t.modules else ""
            progress.info(f"quantize: {none}{len(skipped)} linears left unquantized, e.g. {skipped[0]['module']}: "
                          f"{skipped[0]['reason']} (quant_report.json left_unquantized)")

    def summary(self, out: str | Path, t0: float) -> dict:
        t = self.totals
        return {"output": str(out), "format": self.cfg.format, "quant_algo": t.quant_algo(),
                "layers": self.adapter.num_layers, "quantized_linears": len(t.modules), "borrowed": len(t.borrowed),
                "skipped": len(t.skipped), "seconds": round(time.monotonic() - t0, 3)}

    def _take_batches(self, batches: Batches | None) -> None:
        """This rank's share of the calibration batches, when the config needs calibration."""
        cfg, env = self.cfg, self.env
        if callable(batches):
            batches = dist.run_main_first(env, batches) if cfg.needs_calibration else None
        if batches is None and cfg.needs_calibration:
            raise MoepressError("quantize: the config needs calibration batches (a calibrated format or kv_cache)")
        self.n_tokens = sum(b.numel() for b in batches) if batches is not None else 0
        if batches is not None and env.enabled:
            batches = dist.shard(batches, env.rank, env.world_size)
        self.batches = batches
        self.calibrated = batches is not None and cfg.needs_calibration

    def _declares_nextn(self) -> bool:
        """Whether the output's config must say num_nextn_predict_layers=0 for the layers not written: where it has
        the key, and for DeepSeek-V3 (Kimi K2) whose transformers config defaults it to 1
        (configuration_deepseek_v3.py 5.24: num_mtp_layers = 1, alias num_nextn_predict_layers)."""
        return "num_nextn_predict_layers" in self.reader.config or self.adapter.nextn_by_default

    def _resume_point(self, progress: Progress) -> int:
        """The first layer a killed run did not finish (rank 0's, under torchrun), with the totals of the
        layers before it; a partial whose progress file lacks one of them is refused (every rank), as
        its report and configs would leave those layers out."""
        a, sm = self.adapter, self.sm
        self.done = done = self.w.written_names
        start = 0
        while start < a.num_layers and all(a.layer_prefix(start) + k in done or
                                           _quantized_name(a.layer_prefix(start) + k, done)
                                           for k in sm.expected_layer_shapes(start)):
            start += 1
        refused = None
        if start and self.env.is_main:
            try:
                self.totals.load(self.w.partial, start)
            except ResumeRefused as e:
                refused = e
        if self.env.enabled:
            box = [start, None if refused is None else str(refused)]
            tdist.broadcast_object_list(box, src=0)
            start = box[0]
            if box[1] is not None and refused is None:
                raise MoepressError(box[1])
        if refused is not None:
            raise refused
        if self.w.changed:
            progress.info(f"quantize: {self.w.partial / self.w.changed} is missing or not the bytes the killed run "
                          "wrote; its layer and those after it are written again")
        if start:
            progress.info(f"quantize: resuming at layer {start} ({start} finished layers kept from the killed run)")
        return start

    # ---- the layers ----------------------------------------------------------------------------

    def _calibrated_layers(self, hs: list[torch.Tensor], start: int, task) -> None:
        """Every layer calibrated on ``hs`` and run (quantized, if sequential) for the next; layers
        a killed run finished are computed again only for their outputs, not written."""
        sm, cfg = self.sm, self.cfg
        for i, layer in sm.layers(0):
            with default_device(sm.device):  # the layer's statistics and solves beside it
                res, outs = quantize_layer(sm, i, layer, hs, cfg, self.env)
            if cfg.is_sequential():
                apply_fake_quant(layer, res)
                outs = sm.run_layer(layer, hs)
            hs = outs
            if i < start:
                continue
            note = self._write_layer(i, res, self.reader)
            layer = res = None  # nothing of layer i outlives its iteration (the writer has it)
            task.advance(note=note)

    def _free_layers(self, start: int, task) -> None:
        """Calibration-free: tensor by tensor, no layer module, no activations."""
        pipe = FreePipeline(self.reader, self.sm, self.cfg, start, self.budget)
        try:  # closed on an error too: the read-ahead stopped, torch's thread count given back
            for i in range(start, self.adapter.num_layers):
                task.advance(note=self._free_layer(pipe, i))
        finally:
            pipe.close()

    def _free_layer(self, pipe: FreePipeline, i: int) -> str:
        res, src = pipe.layer(i)
        return self._write_layer(i, res, src)

    def _write_layer(self, i: int, res: LayerResult, src) -> str:
        """Layer i as one shard: quantized tensors replace their linear's weight; the rest as stored
        (read from ``src``). Returns the progress note. The totals are saved first: a killed run's
        progress file never lacks a layer whose shard it kept (a resume drops the ones it redoes)."""
        w, prefix = self.w, self.adapter.layer_prefix(i)
        refuse_non_finite(prefix, res, lambda name: src.weight(name, torch.float32))
        self.totals.add(i, prefix, res)
        self.totals.save(w.partial)
        qnames = {f"{n}.weight" for n in res.modules}
        for name in ct_inputs.as_modules(self.reader.layer_names(i)):  # packed inputs: one P.weight (decoded)
            rel = name[len(prefix):]
            if rel in qnames or rel in res.tensors or name.endswith(".weight_scale_inv"):  # res: AWQ-folded norms
                continue
            t = src.get(name)
            if t.dtype == fp8.FP8_DTYPE:  # block-FP8 input, module left unquantized: bf16
                t = src.weight(name, torch.bfloat16)
            w.add(name, t)
        for rel, t in sorted(res.tensors.items()):
            w.add(prefix + rel, t.contiguous())
        w.end_shard()
        return f"layer {i}: {len(res.modules)} linears quantized" + (
            f", {len(res.borrowed)} sparse experts (too few calibration tokens)" if res.borrowed else "")

    def _finish(self) -> None:
        """Norm and head, then config.json, hf_quant_config.json, the sidecar, the report, the manifest."""
        w, reader, a, cfg, totals = self.w, self.reader, self.adapter, self.cfg, self.totals
        # the rest as stored: the final norm and the head, and top-level tensors no layer holds (prune copies them
        # too; transformers ignores the ones its model lacks)
        rest = [n for n in reader.top_names() if n not in (a.embed_name, a.norm_name, a.head_name)]
        for name in (a.norm_name, a.head_name, *rest):
            if name in reader and name not in self.done:
                w.add(name, reader.get(name))
        # the progress file (the totals) stays until the writer's commit removes it with the journal
        hf_quant = hf_quant_config(reader, cfg, totals)
        conf, report = model_config(reader, hf_quant), quant_report(reader, a.family, cfg, totals,
                                                                    self.n_tokens if self.calibrated else 0)
        if self.extra_layers:  # not written: the config must not declare them (a runtime would look for them)
            nextn = self._declares_nextn()
            if nextn:
                conf["num_nextn_predict_layers"] = 0
            report["layers_not_written"] = {"layers": self.extra_layers, "why": EXTRA_LAYERS + NO_NEXTN * nextn}
        w.write_json("config.json", conf)
        w.write_json("hf_quant_config.json", hf_quant)
        w.write_json(formats.SIDECAR, sidecar(cfg, totals))
        w.write_json(REPORT, report)
        w.copy_aux_files(reader.path)
        w.manifest.update(manifest_entries(reader, cfg, totals))


def _quantized_name(name: str, done: set[str]) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")] + ".weight_scale" in done


class _NullWriter:
    """What ranks other than 0 write: nothing (rank 0 holds the checkpoint writer)."""

    partial = changed = None

    def __init__(self):
        self.manifest: dict = {}
        self.written_names: set = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def add(self, name, tensor):
        pass

    def end_shard(self, unit=True):
        pass

    def write_json(self, rel, obj):
        pass

    def copy_aux_files(self, src):
        return []

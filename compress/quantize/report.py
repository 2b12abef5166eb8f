"""What the quantize stage writes besides the tensors: the totals of the quantized layers (saved in
OUT.partial after each layer, so a killed run resumes with them), Model-Optimizer's
``hf_quant_config.json`` and ``config.json`` ``quantization_config``, the ``moepress_quant.json``
sidecar, ``quant_report.json`` and the manifest's ``report`` section.

hf_quant_config.json is modelopt's {producer, quantization{quant_algo, kv_cache_quant_algo,
group_size, exclude_modules}} (``MIXED_PRECISION`` + ``quantized_layers`` for recipes with several
formats); NVIDIA/Model-Optimizer modelopt/torch/export/unified_export_hf.py and quant_utils.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import moepress.compress.quantize.config as qconfig
from moepress import __version__
from moepress.calib.data import calibration_inputs
from moepress.compress.checkpoint import CheckpointReader, declared_dtype
from moepress.compress.checkpoint.resume import ResumeRefused
from moepress.compress.quantize.config import FORMATS, PROGRESS, QuantConfig
from moepress.compress.quantize.group import LayerResult
from moepress.outputs import write_text_atomic

MIXED = "MIXED_PRECISION"  # modelopt's quant_algo when the modules have several formats


class QuantTotals:
    """The checkpoint's quantized modules (full names), shared groups, borrowed experts, linears left
    unquantized, AWQ alphas, routed calibration tokens and the evidence per expert, gathered layer by
    layer and kept per layer, so that a resumed run keeps exactly the layers whose shards it keeps."""

    KEYS = ("modules", "shared", "borrowed", "skipped", "awq_alpha", "expert_tokens", "experts")

    def __init__(self):
        self.layers: dict[int, dict] = {}

    def add(self, i: int, prefix: str, res: LayerResult) -> None:
        """Layer i's result (names relative to ``prefix``)."""
        self.layers[i] = {
            "modules": {prefix + n: m for n, m in res.modules.items()},
            "shared": [[prefix + n for n in g] for g in res.shared], "borrowed": list(res.borrowed),
            "skipped": [{**s, "module": prefix + s["module"]} for s in res.skipped],
            "awq_alpha": {prefix + k: v for k, v in res.awq_alpha.items()},
            "expert_tokens": res.expert_tokens or None, "experts": res.expert_evidence or None}

    def _merged(self, key: str):
        parts = [self.layers[i][key] for i in sorted(self.layers)]
        if key in ("modules", "awq_alpha"):
            return {k: v for p in parts for k, v in p.items()}
        return [x for p in parts for x in p]

    @property
    def modules(self) -> dict[str, dict]:
        return self._merged("modules")

    @property
    def shared(self) -> list[list[str]]:
        return self._merged("shared")

    @property
    def borrowed(self) -> list[dict]:
        return self._merged("borrowed")

    @property
    def skipped(self) -> list[dict]:
        return self._merged("skipped")

    @property
    def alphas(self) -> dict[str, float]:
        return self._merged("awq_alpha")

    @property
    def expert_tokens(self) -> dict[str, list[int]]:
        """layer -> routed tokens per expert"""
        return {str(i): d["expert_tokens"] for i, d in sorted(self.layers.items()) if d["expert_tokens"]}

    @property
    def experts(self) -> dict[str, list[dict]]:
        """layer -> per routed expert: tokens, Hessian, statistics, rounding"""
        return {str(i): d["experts"] for i, d in sorted(self.layers.items()) if d["experts"]}

    def load(self, partial: Path, start: int) -> None:
        """The totals of a killed run's layers before ``start`` (the ones whose shards are kept; the
        progress file may already hold the layer being written when the run was killed). A progress
        file missing, unreadable or lacking one of them: :class:`ResumeRefused` (a report, sidecar and
        configs written from it would leave those layers' linears out)."""
        p = partial / PROGRESS
        try:
            prev = json.loads(p.read_text()) if p.is_file() else {}
            layers = {int(i): d for i, d in (prev.get("layers") or {}).items() if int(i) < start}
        except (OSError, ValueError, AttributeError, TypeError):
            layers = {}
        missing = [i for i in range(start) if i not in layers]
        if missing:
            shown = ", ".join(map(str, missing[:3])) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ResumeRefused(partial, f"holds layers 0-{start - 1} but {PROGRESS} lacks the totals of "
                                f"layer{'s' if len(missing) > 1 else ''} {shown}", "rerun without --resume")
        self.layers.update(layers)

    def save(self, partial: Path | None) -> None:
        """Replace the progress file atomically (rank 0 only: other ranks have no ``partial``)."""
        if partial is None:
            return
        write_text_atomic(partial / PROGRESS, json.dumps({"layers": {str(i): d for i, d in self.layers.items()}},
                                                          default=float))

    def quant_algo(self) -> str:
        """modelopt's quant_algo of the whole checkpoint: one format with one group size, else
        MIXED_PRECISION (each module's algo and group in ``quantized_layers``): INT4 linears narrower
        than --group-size get a smaller group, which one checkpoint-wide group_size would misstate."""
        modules = self.modules.values()
        fmts = sorted({m["format"] for m in modules})
        one = len(fmts) == 1 and len({m.get("group") for m in modules}) == 1
        return FORMATS[fmts[0]].modelopt_algo if one else MIXED

    def group_size(self) -> int | None:
        """The one INT4 group size / FP4 block size of the grouped modules, if they share one."""
        groups = {m["group"] for m in self.modules.values() if "group" in m}
        return groups.pop() if len(groups) == 1 else None


def hf_quant_config(reader: CheckpointReader, cfg: QuantConfig, totals: QuantTotals) -> dict:
    """hf_quant_config.json: modelopt's producer and quantization sections."""
    algo, group, modules = totals.quant_algo(), totals.group_size(), totals.modules  # merged once
    exclude = exclude_modules(unquantized_linears(reader, modules), modules)
    hf_quant = {"producer": {"name": "moepress", "version": __version__},
                "quantization": {"quant_algo": algo,
                                 "kv_cache_quant_algo": FORMATS[cfg.kv_cache].quant_algo if cfg.kv_cache else None,
                                 **({"group_size": group} if group else {}), "exclude_modules": exclude}}
    if algo == MIXED:
        hf_quant["quantization"]["quantized_layers"] = {
            n: {"quant_algo": FORMATS[m["format"]].modelopt_algo,
                **({"group_size": m["group"]} if "group" in m else {})}
            for n, m in sorted(modules.items())}
    return hf_quant


def model_config(reader: CheckpointReader, hf_quant: dict) -> dict:
    """config.json with modelopt's ``quantization_config`` in place of the input's."""
    conf = dict(reader.config)
    conf.pop("quantization_config", None)
    conf["quantization_config"] = {"quant_method": "modelopt", **hf_quant["quantization"]}
    # transformers 5 writes "dtype" only, older ones "torch_dtype": both name the stored one, not bf16
    conf["torch_dtype"] = declared_dtype(conf) or "bfloat16"
    return conf


def sidecar(cfg: QuantConfig, totals: QuantTotals) -> dict:
    """moepress_quant.json: every quantized module's format (what ``formats.read_layout`` returns)."""
    return {"format": cfg.format, "rules": [list(r) for r in cfg.rules], "group_size": cfg.group_size,
            "kv_cache": cfg.kv_cache, "modules": dict(sorted(totals.modules.items())), "shared": totals.shared,
            "borrowed": totals.borrowed, "skipped": totals.skipped,
            **({"awq_fold": True} if cfg.awq_fold else {})}  # no pre_quant_scale: smoothing in norms (fold.py)


def quant_report(reader: CheckpointReader, family: str, cfg: QuantConfig, totals: QuantTotals,
                 calibration_tokens: int) -> dict:
    """quant_report.json."""
    return {"model": str(reader.path), "family": family, "config": cfg.recorded(),
            "quant_algo": totals.quant_algo(), "quantized_linears": len(totals.modules),
            "experts_with_borrowed_scales": totals.borrowed, "left_unquantized": totals.skipped,
            "awq_alpha": totals.alphas,
            "expert_calibration_tokens": totals.expert_tokens,  # layer -> routed tokens per expert
            # layer -> per routed expert: tokens, its input Hessian's rank / condition, where its statistics
            # came from and each projection's rounding (compress/quantize/calibrated.py: the sparse-expert rule)
            **({"experts": totals.experts, "sparse_expert_rule": sparse_expert_rule()} if totals.experts else {}),
            "calibration_tokens": calibration_tokens}


def sparse_expert_rule() -> dict:
    """The rule for routed experts with too little evidence, as this run applied it (config.py)."""
    return {"rule": qconfig.SPARSE_EXPERT_RULE, "min_tokens": qconfig.MIN_EXPERT_TOKENS,
            "tokens_per_input_channel": qconfig.SPARSE_EXPERT_RATIO,
            "all_tokens_statistics": qconfig.ALL_TOKENS_STATISTICS}


def manifest_entries(reader: CheckpointReader, cfg: QuantConfig, totals: QuantTotals) -> dict:
    """What the stage adds to the output's moepress-manifest.json."""
    inputs = {"model": str(reader.path.resolve()), **calibration_inputs(cfg.calib, cfg.needs_calibration)}
    return {"stage": "quantize", "config": cfg.recorded(), "inputs": inputs,
            "report": {"quant_algo": totals.quant_algo(), "quantized_linears": len(totals.modules),
                       "experts_with_borrowed_scales": totals.borrowed,
                       "expert_calibration_tokens": totals.expert_tokens,
                       "left_unquantized": totals.skipped}}


def unquantized_linears(reader: CheckpointReader, modules: dict) -> list[str]:
    """2-D weights of the output that were not quantized (embeddings and norms aside; layers stored past
    num_hidden_layers, which quantize does not write, neither)."""
    out = []
    trunk = int(reader.config.get("num_hidden_layers") or 0)
    unwritten = {n for i in reader.layer_indices() if i >= trunk for n in reader.layer_names(i)}
    for n in reader.names():
        if n in unwritten:
            continue
        if n.endswith(".weight") and reader.info(n).shape and len(reader.info(n).shape) == 2:
            base = n[: -len(".weight")]
            if base not in modules and not base.endswith(("embed_tokens",)) and "norm" not in base.rsplit(".", 1)[-1]:
                out.append(base)
    return out


def exclude_modules(plain: list[str], quantized) -> list[str]:
    """modelopt's ``exclude_modules``: an unquantized linear as its wildcard over layers and experts
    (``model.layers.*.mlp.gate``) where that wildcard names no quantized module, else by its own name
    (a --rule that leaves one layer or one expert unquantized must not exclude the others)."""
    taken = {module_pattern(n) for n in quantized}
    return sorted({module_pattern(n) if module_pattern(n) not in taken else n for n in plain})


def module_pattern(name: str) -> str:
    """model.layers.3.mlp.gate -> model.layers.*.mlp.gate (modelopt's exclude_modules wildcards)."""
    parts = name.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts)

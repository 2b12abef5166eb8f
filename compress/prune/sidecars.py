"""A quantized input's quantization files, rewritten for its pruned experts.

A ``moepress quantize`` output carries ``moepress_quant.json`` (its module layout, which the reader's
decoders and every exporter read), Model-Optimizer's ``hf_quant_config.json`` (which TensorRT-LLM
reads) and ``quant_report.json``. They name routed experts by index, so they cannot be copied: a
module name of a kept expert is renamed to its new index, and the entries of dropped experts go
(a list entry or dict key naming one, a record holding one, a group left empty); the report's
per-expert token counts keep the kept experts' counts in their new order. Names of anything else
(attention, routers, patterns such as ``model.layers.*.mlp.gate``) are copied as they are. The
pruned checkpoint's config.json goes through the same renaming (a quantization_config listing
single experts). A pattern that selects some of a layer's experts and not others (by index) would
select other experts once they are renumbered: refused before pruning (:func:`refuse_index_patterns`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from moepress.errors import MoepressError

QUANT_SIDECARS = ("moepress_quant.json", "hf_quant_config.json", "quant_report.json")
_DROP = object()  # a name of a dropped expert, or a record holding one

Rename = Callable[[str], str | None]


PATTERN_KEYS = ("targets", "ignore", "exclude_modules")  # compressed-tensors; Model-Optimizer


def _pattern_strings(o, listed: bool = False) -> Iterator[str]:
    """The strings listed under :data:`PATTERN_KEYS` anywhere in ``o`` (parsed JSON)."""
    if isinstance(o, str):
        if listed:
            yield o
    elif isinstance(o, list):
        for x in o:
            yield from _pattern_strings(x, listed)
    elif isinstance(o, dict):
        for k, v in o.items():
            yield from _pattern_strings(v, k in PATTERN_KEYS)


def _patterns(src: Path, config: dict) -> Iterator[tuple[str, str, Callable[[str], bool]]]:
    """(file, pattern, matcher) for every module-name pattern of the quantization files: compressed-
    tensors' ``re:`` targets / ignore (re.match, as its match_name does) and Model-Optimizer's fnmatch
    wildcards in exclude_modules."""
    objs = [("config.json", config.get("quantization_config"))]
    hq = src / "hf_quant_config.json"
    if hq.is_file():
        objs.append((hq.name, _json_object(hq)))
    for fname, obj in objs:
        for p in dict.fromkeys(_pattern_strings(obj)):
            if p.startswith("re:"):
                try:
                    rx = re.compile(p[3:])
                except re.error:
                    continue
                yield fname, p, lambda n, rx=rx: rx.match(n) is not None
            elif any(c in p for c in "*?["):
                yield fname, p, lambda n, p=p: fnmatch.fnmatchcase(n, p)


def refuse_index_patterns(src: Path, config: dict, adapter) -> None:
    """Refuse a quantization file's pattern that selects some of a layer's routed experts and not
    others: pruning renumbers experts, so the same pattern would select other experts (a bf16 expert
    read as packed, a packed one left undecompressed). Exact names are renamed instead."""
    pats = list(_patterns(Path(src), config))
    if not pats:
        return
    for fname, p, match in pats:
        picked = adapter.picked_by_index(lambda i, n, match=match: match(n))
        if picked is not None:
            i, names, hits = picked
            raise MoepressError(
                f"{Path(src) / fname}: pattern '{p}' selects routed experts of layer {i} by index "
                f"({len(hits)} of {len(names)}, e.g. {hits[0]}); pruning renumbers experts, so it "
                "would select others; name those modules one by one")


def kept_by_layer(report_layers: list[dict]) -> dict[int, dict[int, int]]:
    """Per pruned layer, old expert index -> new index, from the prune report's rows."""
    return {row["layer"]: {k["expert"]: k["new_index"] for k in row["kept"]} for row in report_layers}


def expert_renamer(adapter, kept: dict[int, dict[int, int]]) -> Rename:
    """A module or tensor name -> its name after pruning (None: a dropped expert's). A name is an
    expert's where the adapter says so with or without a trailing part (``...experts.3`` and
    ``...experts.3.down_proj`` alike)."""
    def rename(s: str) -> str | None:
        hit = adapter.expert_index(s + ".")
        if hit is None or hit[0] not in kept:
            return s
        i, e = hit
        if e not in kept[i]:
            return None
        old, new = adapter.expert_prefix(i, e), adapter.expert_prefix(i, kept[i][e])
        return (new + (s + ".")[len(old):])[:-1]
    return rename


def renumber(obj, rename: Rename):
    """``obj`` (parsed JSON) with every name renamed; see the module docstring for what is dropped."""
    if isinstance(obj, str):
        new = rename(obj)
        return _DROP if new is None else new
    if isinstance(obj, list):
        out = []
        for x in obj:
            y = renumber(x, rename)
            if y is _DROP or (isinstance(x, list) and x and not y):
                continue
            out.append(y)
        return out
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            nk = rename(k)
            if nk is None:
                continue
            nv = renumber(v, rename)
            if nv is _DROP:
                return _DROP
            out[nk] = nv
        return out
    return obj


def rewrite_report_counts(report: dict, kept: dict[int, dict[int, int]]) -> dict:
    """quant_report.json's ``expert_calibration_tokens`` {layer: [tokens per expert]}: the kept
    experts' counts in their new order."""
    counts = report.get("expert_calibration_tokens")
    if isinstance(counts, dict):
        out = {}
        for layer, xs in counts.items():
            m = kept.get(int(layer)) if str(layer).isdigit() else None
            out[layer] = [xs[e] for e in sorted(m, key=m.get)] if m and isinstance(xs, list) else xs
        report = {**report, "expert_calibration_tokens": out}
    return report


def renumber_records(records, kept: dict[int, dict[int, int]], layer: int | None = None):
    """``[{"layer": i, "expert": e, ...}]`` (borrowed scales; per-expert report rows, whose ``layer`` is
    given): a dropped expert's record left out, a kept one's ``expert`` its new index, in the new order."""
    if not isinstance(records, list):
        return records
    numbered, rest = [], []  # one pass (a Kimi K2 report holds tens of thousands of such records)
    for r in records:
        i = layer if layer is not None else r.get("layer") if isinstance(r, dict) else None
        m = kept.get(i) if isinstance(i, int) else None
        if m is None or not isinstance(r.get("expert"), int):
            (numbered if isinstance(r, dict) and isinstance(r.get("expert"), int) else rest).append(r)
        elif r["expert"] in m:
            numbered.append({**r, "expert": m[r["expert"]]})
    return sorted(numbered, key=lambda r: (r.get("layer", layer or 0), r["expert"])) + rest


def renumber_expert_rows(report: dict, kept: dict[int, dict[int, int]]) -> dict:
    """quant_report.json's per-expert lists and moepress_quant.json's ``borrowed``, renumbered."""
    out = dict(report)
    for key in ("borrowed", "experts_with_borrowed_scales"):
        if key in out:
            out[key] = renumber_records(out[key], kept)
    if isinstance(out.get("experts"), dict):
        out["experts"] = {layer: renumber_records(rows, kept, int(layer)) if str(layer).isdigit() else rows
                          for layer, rows in out["experts"].items()}
    return out


def _json_object(p: Path) -> dict:
    """``p``'s JSON object; one line naming the file otherwise."""
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MoepressError(f"{p}: not readable JSON ({type(e).__name__}); expected the file quantize wrote") from None
    if not isinstance(obj, dict):
        raise MoepressError(f"{p}: a JSON {type(obj).__name__}; expected the JSON object quantize wrote")
    return obj


def pruned_sidecars(src: Path, adapter, report_layers: list[dict], config: dict) -> dict[str, dict]:
    """The pruned checkpoint's ``config`` and the quantization files of ``src`` that exist, rewritten for
    the pruned experts: {file name: JSON}."""
    kept = kept_by_layer(report_layers)
    rename = expert_renamer(adapter, kept)
    out = {"config.json": renumber(config, rename)}
    for name in QUANT_SIDECARS:
        p = src / name
        if p.is_file():
            obj = renumber_expert_rows(renumber(_json_object(p), rename), kept)
            out[name] = rewrite_report_counts(obj, kept) if name == "quant_report.json" else obj
    report, layout = out.get("quant_report.json"), out.get("moepress_quant.json")
    if isinstance(report, dict) and isinstance(layout, dict) and isinstance(layout.get("modules"), dict) \
            and "quantized_linears" in report:  # the count of what is left: the layout's quantized modules
        out["quant_report.json"] = {**report, "quantized_linears": len(layout["modules"])}
    return out

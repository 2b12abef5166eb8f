"""Recipes: one YAML file naming the model, calibration, prune, quantize, export, check and build.

A recipe is plain data; :func:`load_recipe` validates it (unknown keys and wrong types are
one-line errors naming the file and the key) and fills defaults, so ``moepress recipe show``
prints exactly what ``moepress run`` will do. Each stage's section becomes that stage's own
frozen config (``PruneConfig``, ``QuantConfig``, ``ExportConfig``, ``CheckConfig``) in the runner.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import yaml

from moepress.errors import MoepressError

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"

# section -> {key: (type(s), default)}; None as a default means "not set"
SCHEMA: dict[str, dict[str, tuple]] = {
    "calib": {"sources": (list, []), "num_samples": (int, 64), "seq_len": (int, 256), "seed": (int, 0),
              "trust_remote_code": (bool, False)},
    "prune": {"ratio": ((float, int), None), "keep": (int, None), "method": (str, None), "ep_size": (int, 1),
              "protect": (str, ""), "sequential": (bool, False), "search_tokens": (int, 16384),
              "merge": (bool, None)},
    "quantize": {"format": (str, None), "group_size": (int, 128), "kv_cache": (str, None), "rules": (dict, {}),
                 "sequential": (bool, None), "gptq_act_order": (bool, None), "awq_clip": (bool, True),
                 "awq_gptq": (bool, True), "awq_fold": (bool, False)},
    "export": {"formats": (list, []), "tp": (int, 1), "ep": (int, 1), "opset": (int, 21), "options": (dict, {})},
    "check": None,  # validated by CheckConfig.from_dict
    "build": {"targets": (list, []), "dry_run": (bool, True), "gpus": (int, None), "max_seq_len": (int, None),
              "max_batch": (int, 8), "trust_remote_code": (bool, False)},
}
# list keys and the type of their elements
ELEMENTS = {("calib", "sources"): str, ("export", "formats"): str, ("build", "targets"): str}
# keys that must be positive when set
POSITIVE = {("build", "gpus"), ("build", "max_seq_len"), ("build", "max_batch"), ("prune", "search_tokens")}
TOP = {"model", "output", "device", *SCHEMA}
STAGES = ("prune", "quantize", "export", "check", "build")
# a stage's CLI flag -> its recipe key, where the key is not the flag's name (--num-samples -> num_samples)
KEYS = {"calib": {"--calib": "sources"}, "quantize": {"--rule": "rules"},
        "export": {"--format": "formats", "--tp/--ep": "tp/ep", "--option": "options"}}


def _where(src: str, *keys) -> str:
    return f"{src}: " + ".".join(str(k) for k in keys)


def normalise(raw: dict, src: str = "recipe") -> dict:
    """Validate ``raw`` and return the effective recipe (defaults filled; skipped stages None)."""
    if not isinstance(raw, dict):
        raise MoepressError(f"{src}: expected a YAML mapping at the top level")
    bad = sorted(set(raw) - TOP, key=str)
    if bad:
        raise MoepressError(f"{src}: unknown key '{bad[0]}' (expected {', '.join(sorted(TOP))})")
    if not isinstance(raw.get("model"), str) or not raw["model"]:
        raise MoepressError(f"{src}: 'model' must name a checkpoint directory or a bundled model")
    if raw.get("output") is not None and not isinstance(raw["output"], str):
        raise MoepressError(f"{_where(src, 'output')}: expected a directory path, got {raw['output']!r}")
    out: dict = {"model": raw["model"], "output": raw.get("output")}
    if raw.get("device") is not None:  # where the stages compute (moepress/device.py); outputs do not depend on it
        if not isinstance(raw["device"], str):
            raise MoepressError(f"{_where(src, 'device')}: expected auto, cpu, cuda or cuda:N, got {raw['device']!r}")
        out["device"] = raw["device"]
    for section, schema in SCHEMA.items():
        val = raw.get(section, {} if section in ("calib", "check") else None)
        if val is None:
            out[section] = None
            continue
        if not isinstance(val, dict):
            raise MoepressError(f"{_where(src, section)}: expected a mapping (or null to skip the stage)")
        if schema is None:  # check
            from moepress.checks.config import CheckConfig

            if "kind" in val:  # the runner checks each artifact as what it is
                raise MoepressError(f"{_where(src, section, 'kind')}: not a recipe key (each artifact is checked "
                                    "with the kind its format needs)")
            CheckConfig.from_dict(val, where=_where(src, section))
            out[section] = copy.deepcopy(val)
            continue
        norm = {str(k).replace("-", "_"): v for k, v in val.items()}
        unknown = sorted(set(norm) - set(schema))
        if unknown:
            raise MoepressError(f"{_where(src, section, unknown[0])}: unknown key "
                                f"(expected {', '.join(sorted(schema))})")
        sec = {}
        for key, (typ, default) in schema.items():
            v = norm.get(key, copy.deepcopy(default))
            if v is not None and (not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool)):
                tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise MoepressError(f"{_where(src, section, key)}: expected {tname}, got {v!r}")
            _check_value(src, section, key, v)
            sec[key] = v
        out[section] = sec
    if out["prune"] is not None and (out["prune"]["ratio"] is None) == (out["prune"]["keep"] is None):
        raise MoepressError(f"{_where(src, 'prune')}: give exactly one of ratio and keep")
    if out["quantize"] is not None and not out["quantize"]["format"] and not out["quantize"]["rules"]:
        raise MoepressError(f"{_where(src, 'quantize', 'format')}: required (or rules)")
    if out["export"] is not None and not out["export"]["formats"]:
        out["export"] = None
    if out["build"] is not None and not out["build"]["targets"]:
        out["build"] = None
    if out["quantize"] is not None:
        _check_quantize(src, out)
    return out


def _check_quantize(src: str, recipe: dict) -> None:
    """The quantize section as the stage will build it, refused now and by its recipe key (the stage's
    own message names the CLI flag: ``--format int3`` -> ``quantize.format int3``)."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quantize.config import QuantConfig

    with recipe_keys(src, "quantize"):
        QuantConfig.from_recipe(recipe["quantize"], CalibConfig.from_recipe(recipe["calib"]))


@contextmanager
def recipe_keys(src: str, section: str):
    """A stage's own refusal, whose line names its CLI flag (``--format int3: ...``), raised again naming
    the recipe's key (``recipe.yaml: quantize.format int3: ...``); a line naming a file gets the section."""
    try:
        yield
    except MoepressError as e:
        msg = str(e)
        flag, _, rest = msg.partition(" ") if msg.startswith("--") else ("", "", msg)
        name = flag.rstrip(":")
        key = KEYS.get(section, {}).get(name, name.removeprefix("--").replace("-", "_"))
        sep = ":" if flag.endswith(":") or not key else ""
        raise MoepressError(f"{_where(src, section, key) if key else _where(src, section)}{sep} {rest}") from None


def preflight(recipe: dict, model: Path, src: str = "recipe") -> None:
    """Each stage's own checks that need nothing an earlier stage writes, run before any stage and before
    the run directory is made, refused by recipe key: the prune options and the quantize rules against the
    model, every export's options, the check's data (read and tokenized as the check will) and what the
    exports need of the quantize format; so that a bad value late in the recipe costs seconds, not the
    hours of prune and quantize before it."""
    from moepress.calib.config import CalibConfig
    from moepress.checks.config import CheckConfig
    from moepress.checks.runner import eval_data
    from moepress.compress.prune import PruneConfig
    from moepress.compress.prune.stage import PruneStage
    from moepress.exporters import refuse_config

    calib = CalibConfig.from_recipe(recipe["calib"])
    if recipe["prune"] is not None:
        with recipe_keys(src, "prune"):
            PruneStage(model, PruneConfig.from_recipe(recipe["prune"], calib))
    if recipe["quantize"] is not None:  # the rules against the source's linears (a prune keeps their names)
        from moepress.compress.quantize import QuantConfig
        from moepress.compress.quantize.stage import check_rules, refuse_expert_index_rules
        from moepress.compress.stream import StreamedModel

        with recipe_keys(src, "quantize"):
            sm, qcfg = StreamedModel(model, prefetch=False), QuantConfig.from_recipe(recipe["quantize"], calib)
            check_rules(sm, qcfg)
            if recipe["prune"] is not None:  # the prune renumbers the kept experts 0..N-1
                refuse_expert_index_rules(sm, qcfg)
    for fmt in (recipe.get("export") or {}).get("formats") or []:
        with recipe_keys(src, "export"):
            refuse_config(export_config(recipe["export"], fmt))
    if recipe["check"] is not None:
        with recipe_keys(src, "check"):
            eval_data(model, CheckConfig.from_dict(recipe["check"], where=_where(src, "check")))
    refuse_unavailable_exports(recipe, model, src)


def export_config(section: dict, fmt: str):
    """The ExportConfig of the recipe's ``export`` section for ``fmt``."""
    from moepress.exporters import ExportConfig

    return ExportConfig(format=fmt, tp=section["tp"], ep=section["ep"], opset=section["opset"],
                        options=tuple(sorted((str(k), str(v)) for k, v in section["options"].items())))


def _check_value(src: str, section: str, key: str, v) -> None:
    """A list key's elements and a positive number (build sizes, prune.search_tokens), refused in one
    line naming the key."""
    elem = ELEMENTS.get((section, key))
    if elem is not None and v is not None:
        bad = [x for x in v if not isinstance(x, elem)]
        if bad:
            raise MoepressError(f"{_where(src, section, key)}: expected a list of {elem.__name__}, got {bad[0]!r}")
    if (section, key) in POSITIVE and v is not None and v < 1:
        raise MoepressError(f"{_where(src, section, key)}: expected a positive number, got {v!r}")
    if key == "seed" and isinstance(v, int) and not -(2**63) <= v < 2**63:  # torch's generator takes 64 bits
        raise MoepressError(f"{_where(src, section, key)}: expected a 64-bit integer, got {v!r}")
    if (section, key) == ("build", "targets"):
        from moepress.exporters.targets import TARGETS, get_target

        for t in v:
            try:
                get_target(t)
            except MoepressError:
                raise MoepressError(f"{_where(src, section, key)}: unknown GPU target {t!r}; expected one of "
                                    f"{', '.join(TARGETS)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last silently, so two
    quantize.rules with one pattern ran the later one, where --rule (first match wins) refuses the later."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {key!r}", k.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path | None = None, overrides: dict | None = None) -> tuple[dict, str]:
    """The effective recipe from ``path`` (None: the embedded default) and its source name."""
    p = Path(path) if path is not None else DEFAULT_RECIPE
    src = str(p) if path is not None else "default recipe"
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise MoepressError(f"{p}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoepressError(f"{p}: cannot read the recipe ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise MoepressError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    raw = raw or {}
    for key, value in (overrides or {}).items():
        raw[key] = value
    return normalise(raw, src), src


def dump(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)


def refuse_unavailable_exports(recipe: dict, model: Path, src: str = "recipe") -> None:
    """An export format the model's family has no writer for, or whose writer refuses the model's config
    (``Exporter.refuse_source``: an ONNX graph of a GELU MLP), refused in one line before any stage runs."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters import exporters
    from moepress.pipeline.export_routes import other_exports, refuse_unquantized

    formats = (recipe.get("export") or {}).get("formats") or []
    if not formats:
        return
    reader = CheckpointReader(model)
    adapter = get_adapter(reader.config, reader.names())
    family, reg = adapter.family, exporters()
    for fmt in formats:
        if fmt in reg:
            other = None  # what the family refusal names: for a recipe that quantizes, its output's, not the model's
            if recipe.get("quantize") and reg[fmt].families is not None and family not in reg[fmt].families:
                other = other_exports(recipe, model, fmt, reg)
            reg[fmt].refuse_family(family, model, where=f"recipe export.formats {fmt}", other=other)
            if reg[fmt].refuse_source is not None:
                with recipe_keys(src, "export"):
                    reg[fmt].refuse_source(model, adapter, reader)
    refuse_unquantized(recipe, model, formats, reg)
    refuse_written_formats(recipe, formats, reg)
    refuse_modelopt_experts(recipe, family, formats)
    refuse_ct_forms(recipe, formats, model)
    fusing = [f for f in ("compressed-tensors", "hf-modelopt") if f in formats]
    if fusing and recipe.get("quantize"):
        with recipe_keys(src, "export"):
            refuse_fused_blocks(recipe, model, fusing)
    if adapter.experts_key():
        refuse_ct_expert_groups(recipe, formats, expert_inputs(adapter))


def expert_inputs(adapter) -> list[int]:
    """The routed experts' in_features: hidden size (gate / up), expert width (down)."""
    return [adapter.hidden_size, adapter.moe_intermediate_size()]


def refuse_written_formats(recipe: dict, exports: list[str], reg: dict) -> None:
    """An export of a quantize format (one, no rules) its exporter does not write (Exporter.writes_format)."""
    from moepress.compress import formats

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    for name in exports if f is not None and not q.get("rules") else ():
        writes = getattr(reg.get(name), "writes_format", None)
        if writes is not None and not writes(f):
            ok = [n for n, g in formats.produced().items() if writes(g)]
            raise MoepressError(f"recipe export.formats {name}: quantize.format {f.name} is not a format it writes; "
                                f"expected {' or '.join(ok) if len(ok) < 3 else 'one of ' + ', '.join(ok)}")


def refuse_ct_forms(recipe: dict, exports: list[str], model: Path | None = None) -> None:
    """compressed-tensors after a quantize whose one format (no rules) has no compressed-tensors form, or keeps AWQ's
    pre_quant_scale unfolded (exporters/compressed_tensors.py refuses both at export, after prune and quantize); the
    refusal names the quantize changes this preflight takes (export_routes.ct_ways; ``model``: None names none)."""
    from moepress.compress import formats
    from moepress.pipeline.export_routes import ct_ways

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    if "compressed-tensors" not in exports or f is None or q.get("rules"):
        return
    where = f"recipe export.formats compressed-tensors: quantize.format {f.name}"
    if not f.ct_format:
        ways = ct_ways(recipe, model, [(n, {"format": n}) for n, g in formats.FORMATS.items() if g.ct_format])
        raise MoepressError(f"{where} has no compressed-tensors form; expected one of {', '.join(ways)}")
    if f.awq and not q.get("awq_fold"):
        ways = ct_ways(recipe, model, [("quantize.awq_fold: true (AWQ folded into the norms)", {"awq_fold": True}),
                                       ("quantize.format int4-gptq", {"format": "int4-gptq"})])
        raise MoepressError(f"{where} keeps AWQ's pre_quant_scale, which has no compressed-tensors form; expected "
                            f"{' or '.join(ways)}")


def refuse_fused_blocks(recipe: dict, model: Path, exports: list[str]) -> None:
    """compressed-tensors or hf-modelopt after a quantize that gives block-FP8 routed experts that are not whole
    128x128 blocks, block-FP8 linears whose in_features are not whole groups of 128, or fused parts (q/k/v, a dense
    or shared gate/up) a block format with a part before the last not whole 128-row blocks: each export's own checks
    (fused_moe.refuse_partial_blocks, refuse_partial_input_groups,
    fused_moe.partial_fused_blocks: vLLM validate_fp8_block_shape, TensorRT-LLM's ceil(rows / 128) scale grid)
    asked of the linears the quantize section (format and rules) gives a format, before prune and quantize (a prune
    keeps every non-expert linear and its rows)."""
    from moepress.calib.config import CalibConfig
    from moepress.compress import formats
    from moepress.compress.quantize import QuantConfig
    from moepress.compress.quantize.free import model_linear_names
    from moepress.compress.stream import StreamedModel
    from moepress.exporters.compressed_tensors import refuse_partial_fused_parts
    from moepress.exporters.fused_moe import refuse_partial_blocks, refuse_partial_input_groups
    from moepress.exporters.hf_common import open_source
    from moepress.exporters.hf_modelopt import refuse_partial_fused_q_k_v

    cfg = QuantConfig.from_recipe(recipe["quantize"], CalibConfig.from_recipe(recipe["calib"]))
    given_formats = {cfg.format, *(f for _, f in cfg.rules)} & set(formats.FORMATS)
    if all(formats.FORMATS[f].scale != "block" for f in given_formats):
        return  # no block format: nothing to check (and no model to stream)
    s = open_source(model)
    given = {full: cfg.format_of(rel, full) for rel, full in model_linear_names(StreamedModel(model, prefetch=False))}
    modules = {full: {"format": fmt} for full, fmt in given.items() if fmt}
    refuse = {"compressed-tensors": refuse_partial_fused_parts, "hf-modelopt": refuse_partial_fused_q_k_v}
    for export in exports:  # in the exports' order: the fused-block route assumes whole blocks and input groups
        refuse_partial_blocks(s, export, modules)
        refuse_partial_input_groups(s, export, modules)
        refuse[export](s, modules)


def refuse_ct_expert_groups(recipe: dict, exports: list[str], widths: list[int]) -> None:
    """compressed-tensors after an INT4 quantize (one format, no rules) whose quantize.group_size gives the routed
    experts' projections (in_features ``widths``: hidden size for gate / up, expert width for down) unlike groups,
    or leaves one unquantized: the export refuses such experts (exporters/fused_moe.py: vLLM takes one scheme per
    layer's experts), after prune and quantize."""
    from moepress.compress import formats
    from moepress.compress.quant.int4 import effective_group
    from moepress.exporters.fused_moe import common_groups

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    if "compressed-tensors" not in exports or f is None or q.get("rules") or f.split_unit is not None:
        return
    g = int(q.get("group_size") or 128)
    got = {w: effective_group(w, g) for w in sorted(set(widths))}
    if len(set(got.values())) == 1 and None not in got.values():
        return
    fits = common_groups(got)
    made = ", ".join(f"in_features {w}: {f'group {e}' if e else 'unquantized'}" for w, e in got.items())
    raise MoepressError(f"recipe export.formats compressed-tensors: quantize.format {f.name} with quantize.group_size "
                        f"{g} quantizes the routed experts unlike each other ({made}), which the export refuses (one "
                        "scheme for a layer's experts); expected " + (f"quantize.group_size {max(fits)}" if fits else
                                                                      "quantize.format fp8 or fp8-dynamic"))


def refuse_modelopt_experts(recipe: dict, family: str, exports: list[str]) -> None:
    """hf-modelopt after a quantize whose one format (no rules) gives the routed experts a form no runtime loads
    from a Model-Optimizer checkpoint (exporters/hf_modelopt.py refuses it at export, hours later)."""
    from moepress.compress import formats

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    if "hf-modelopt" not in exports or f is None or q.get("rules"):
        return
    why = f.modelopt_experts_why(family)
    if why:
        raise MoepressError(f"recipe export.formats hf-modelopt: quantize.format {f.name} gives the {family} routed "
                            f"experts a form no runtime loads from a Model-Optimizer checkpoint ({why}); expected "
                            "hf-modelopt removed from export.formats"
                            + (" (hf-fp8-block takes them)" if f.modelopt_moe_why else ""))

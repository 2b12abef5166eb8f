"""``moepress run``'s preflight: each stage's own checks that need nothing an earlier stage writes, asked of the
recipe and the model before any stage runs (a bad value late in a recipe costs seconds, not the hours of prune and
quantize before it), and what the exports need of the quantize section; a refusal of an export names only quantize
sections and export formats this preflight itself takes (each candidate asked of these checks, so that no refusal
sends a recipe to another refusal: tests/test_refusal_routes.py follows every one)."""

from __future__ import annotations

from pathlib import Path

from moepress.errors import MoepressError
from moepress.pipeline.build_plans import planned_format, refuse_unplannable
from moepress.pipeline.one_format import as_one_format, read_as_one_format
from moepress.pipeline.recipe import export_config, key_where, recipe_keys
from moepress.pipeline.rule_layouts import refuse_rule_layouts
from moepress.pipeline.source_forms import either, refuse_stored_forms, refuse_unquantized
from moepress.pipeline.structure_checks import (
    refuse_block_grid,
    refuse_mapping,
    refuse_rule_formats,
    refuse_tensorrt_int4_blocks,
)


def preflight(recipe: dict, model: Path, src: str = "recipe") -> None:
    """_preflight, its refusals under the recipe file: the checks it shares with the standalone quantize's notes
    (export_refusals.py) name the recipe as ``recipe export.formats F: ...``, said here as ``FILE: export.formats
    F: ...`` as every other recipe refusal is."""
    try:
        _preflight(recipe, model, src)
    except MoepressError as e:
        if src == "recipe" or not str(e).startswith("recipe "):
            raise
        raise MoepressError(f"{src}: {str(e).removeprefix('recipe ')}") from None


def _preflight(recipe: dict, model: Path, src: str) -> None:
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
    from moepress.pipeline.check_gates import refuse_unmeasurable_gates

    calib, stage = CalibConfig.from_recipe(recipe["calib"]), None
    if recipe["prune"] is not None:
        with recipe_keys(src, "prune"):
            stage = PruneStage(model, PruneConfig.from_recipe(recipe["prune"], calib))
    if recipe["quantize"] is not None:  # the rules against the source's linears (a prune keeps their names)
        from moepress.compress import formats
        from moepress.compress.quantize import QuantConfig

        if formats.read_layout(model) is not None:  # the quantize stage refuses it, after the prune
            raise MoepressError(f"{key_where(src, 'model')}: {model} is already quantized by moepress "
                                f"({formats.SIDECAR}); expected the original model for a recipe that quantizes")
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
    refuse_mapping(recipe, model, stage, src)  # trtllm-ckpt's tp / ep, with the experts the prune keeps
    if recipe["check"] is not None:
        try:
            with recipe_keys(src, "check"):
                cfg = CheckConfig.from_dict(recipe["check"], where=key_where(src, "check"))
                eval_data(model, cfg)
                cfg.refuse_long_generations(model)
        except MoepressError as e:  # a refusal of the data file names check.data (not the model's tokenizer's)
            data, at = recipe["check"].get("data"), f"{key_where(src, 'check')}: "
            if data and str(e).startswith(f"{at}{data}"):
                raise MoepressError(f"{key_where(src, 'check', 'data')} {str(e).removeprefix(at)}") from None
            raise
    refuse_unmeasurable_gates(recipe, src, model)
    refuse_unavailable_exports(recipe, model, src)
    refuse_unbuildable(recipe, model, src)
    refuse_unplannable(recipe, model, stage, src)
    with read_as_one_format(recipe, model) as one:  # last: the checks above name the ways of one format or rule
        refuse_rule_layouts(one, model, (recipe.get("export") or {}).get("formats") or [], src)


def refuse_unbuildable(recipe: dict, model: Path, src: str = "recipe") -> None:
    """A build section no export of the recipe builds for, refused before the stages a build would follow: no export
    in export.formats that a builder takes, an hf-modelopt export whose MLA projections TensorRT-LLM misreads, or a
    target that cannot run quantize.format (targets.check_format; the format named instead is one this preflight
    and a build of some export of the recipe take on that target)."""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quantize import QuantConfig
    from moepress.exporters.builders import BUILDERS
    from moepress.exporters.modelopt_misloads import quantize_trtllm_misloads
    from moepress.exporters.targets import FormatRefused, check_format, get_target

    if recipe.get("build") is None:
        return
    exports = (recipe.get("export") or {}).get("formats") or []
    built = {x: b for b in BUILDERS.values() for x in b.kinds if x in exports}
    if not built:
        given, takes = ", ".join(exports) or "none", ", ".join(sorted(x for b in BUILDERS.values() for x in b.kinds))
        raise MoepressError(f"{key_where(src, 'build', 'targets')}: no export of export.formats ({given}) has a "
                            f"builder; expected one of {takes} in export.formats, or no build section")
    fmt = (recipe.get("quantize") or {}).get("format")
    if "hf-modelopt" in built and recipe.get("quantize") and recipe["build"]["targets"]:
        why, keep = quantize_trtllm_misloads(QuantConfig.from_recipe(recipe["quantize"], CalibConfig()), model)
        if why:
            rules = ", ".join(k.replace("=", ": ") for k in keep)
            raise MoepressError(f"{key_where(src, 'build', 'targets')}: TensorRT-LLM's DeepSeek loader {why[0]} in "
                                f"the hf-modelopt export of this quantize section, so its build would be refused; "
                                f"expected quantize.rules {{{rules}}}, or hf-modelopt not in export.formats")
    for name in recipe["build"]["targets"] if fmt else ():
        try:
            check_format(get_target(name), fmt)
        except FormatRefused as e:
            why = e.why
            step = _instead(recipe, model, get_target(name), fmt, built)
            raise MoepressError(f"{key_where(src, 'build', 'targets')} {name}: quantize.format {fmt}: {why}: {step}"
                                ) from None
    refuse_rule_formats(recipe, src)
    refuse_tensorrt_int4_blocks(recipe, model, src)


def _instead(recipe: dict, model: Path, t, fmt: str, built: dict) -> str:
    """What to do instead of quantize.format ``fmt`` that target ``t`` cannot run: a format that every export of the
    recipe takes (this preflight's export checks) and a build's format check on ``t`` passes for some export a
    builder takes, no quantize section, or targets that run ``fmt``."""
    from moepress.exporters.runtime_formats import check_runtime_format
    from moepress.exporters.shape import model_shape
    from moepress.exporters.targets import TARGETS, UNQUANTIZED, suggest_format

    shape = model_shape(model)  # once: every candidate format is asked of the same model

    def builds(a: str) -> bool:
        r = {**recipe, "quantize": None if a == UNQUANTIZED else {**recipe["quantize"], "format": a, "rules": {}}}
        try:  # every export of the recipe, as this preflight asks them: a format one refuses fails the run
            refuse_unavailable_exports(r, model)
        except MoepressError:
            return False
        for x, b in built.items():
            try:  # in the format the export writes from it (hf-fp8-block: block FP8 from a bf16 model too)
                check_runtime_format(t, planned_format(r, model, x) or a, shape, b.runtime, x)
            except MoepressError:
                continue
            return True
        return False

    alt = suggest_format(t, fmt, loads=builds)
    if alt != UNQUANTIZED:
        return f"use {alt}"
    if builds(alt):
        return f"use no quantize section ({alt})"
    runs = [n for n, x in TARGETS.items() if x.supports(fmt)]
    return (f"no other format that every export of export.formats ({', '.join(recipe['export']['formats'])}) takes "
            f"builds there; expected a target that runs it ({', '.join(runs[:4])}) or other exports")


def refuse_unavailable_exports(recipe: dict, model: Path, src: str = "recipe") -> None:
    """An export format the model's family has no writer for, or whose writer refuses the model's config
    (``Exporter.refuse_source``: an ONNX graph of a GELU MLP), refused in one line before any stage runs."""
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.exporters import exporters

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
            if reg[fmt].refuse_source is not None:  # the exporter's hint reads the model, which a quantize changes
                with recipe_keys(src, "export"):
                    reg[fmt].refuse_source(model, adapter, reader, instead=f"for this recipe, drop {fmt} from "
                                           "export.formats" if recipe.get("quantize") else None)
    refuse_unquantized(recipe, model, formats, reg)
    if recipe.get("quantize") is None:
        refuse_stored_forms(model, formats, reg)
    with read_as_one_format(recipe, model) as one:  # rules giving every linear one format: asked as that format
        refuse_written_formats(one, formats, reg)
        refuse_ct_forms(one, formats, model)
    refuse_modelopt_experts(recipe, adapter, formats)
    refuse_block_grid(recipe, model, formats)
    fusing = [f for f in ("compressed-tensors", "hf-modelopt") if f in formats]
    if fusing and recipe.get("quantize"):
        with recipe_keys(src, "export"):
            refuse_fused_blocks(recipe, model, fusing)
    refuse_expert_schemes(recipe, formats, adapter)


def refuse_written_formats(recipe: dict, exports: list[str], reg: dict) -> None:
    """An export of a quantize format (one, no rules) its exporter does not write (Exporter.writes_format)."""
    from moepress.compress import formats

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    for name in exports if f is not None and not q.get("rules") else ():
        writes = getattr(reg.get(name), "writes_format", None)
        if writes is not None and not writes(f):
            ok = [n for n, g in formats.produced().items() if writes(g)]
            plain = "" if getattr(reg[name], "quantized_only", ()) else ", or no quantize section (the model as it is)"
            raise MoepressError(f"recipe export.formats {name}: quantize.format {f.name} is not a format it writes; "
                                f"expected {' or '.join(ok) if len(ok) < 3 else 'one of ' + ', '.join(ok)}{plain}")


def refuse_ct_forms(recipe: dict, exports: list[str], model: Path | None = None) -> None:
    """compressed-tensors after a quantize whose one format (no rules) has no compressed-tensors form, or keeps AWQ's
    pre_quant_scale unfolded (exporters/compressed_tensors.py refuses both at export, after prune and quantize); the
    refusal names the quantize changes this preflight takes (:func:`ct_ways`; ``model``: None names none)."""
    from moepress.compress import formats

    q = recipe.get("quantize") or {}
    f = formats.FORMATS.get(q.get("format") or "")
    if "compressed-tensors" not in exports or f is None or q.get("rules"):
        return
    where = f"recipe export.formats compressed-tensors: quantize.format {f.name}"
    ct_formats = [(f"quantize.format {n}", {"format": n}) for n, g in formats.FORMATS.items() if g.ct_format]
    if not f.ct_format:
        ways = ct_ways(recipe, model, ct_formats)
        raise MoepressError(f"{where} has no compressed-tensors form; expected one of {', '.join(ways)}")
    if f.awq and not q.get("awq_fold"):
        ways = ct_ways(recipe, model, [("quantize.awq_fold: true (AWQ folded into the norms)", {"awq_fold": True}),
                                       ("quantize.format int4-gptq", {"format": "int4-gptq"})])
        # neither INT4 route takes this model's expert widths: the formats that do
        ways = ways or ct_ways(recipe, model, ct_formats)
        raise MoepressError(f"{where} keeps AWQ's pre_quant_scale, which has no compressed-tensors form; expected "
                            f"{either(ways)}")


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


def experts_format(recipe: dict, adapter):
    """The format the quantize section gives every routed-expert projection (its rules asked of each expert's name
    in every MoE layer, as the quantize stage asks them; None where it gives them several formats, or leaves them
    unquantized), and whether a rule names any of them (else quantize.format gives them theirs)."""
    from moepress.calib.config import CalibConfig
    from moepress.compress import formats
    from moepress.compress.quantize import QuantConfig

    q = recipe.get("quantize") or {}
    if not q.get("rules"):
        return formats.FORMATS.get(q.get("format") or ""), False
    cfg = QuantConfig.from_recipe(q, CalibConfig.from_recipe(recipe["calib"]))
    got, ruled = set(), False
    for i in adapter.moe_layers() if adapter.experts_key() else ():
        lp = adapter.layer_prefix(i)
        for e in range(adapter.num_experts):
            for n in adapter.expert_names:
                full = adapter.expert_prefix(i, e) + n
                k = cfg.rule_of(full.removeprefix(lp), full)  # QuantConfig.format_of's decision, asked once
                ruled |= k is not None
                got.add(cfg.format if k is None else cfg.rules[k][1])
                if len(got) > 1:  # several formats (one of them a rule's): nothing to ask of one format
                    return None, True
    return formats.FORMATS.get(got.pop() if got else ""), ruled  # "none" (left unquantized) is no format


def refuse_expert_schemes(recipe: dict, exports: list[str], adapter) -> None:
    """compressed-tensors or hf-modelopt after a quantize whose format (or rules: one format for every expert)
    leaves some of the routed experts' projections unquantized (the format's ``skip`` rule: an INT4 group or FP4
    block not dividing their in_features, odd INT4 rows), or all of them beside packed INT4 / FP4 linears
    (compressed-tensors), groups them unlike each other (INT4), or gives FP4 experts widths the FP4 fused-MoE kernels
    cannot run: each export refuses these (exporters/fused_moe.py refuse_mixed, refuse_unpacked_experts, refuse_unlike,
    refuse_fp4_expert_widths). The refusal names a quantize.group_size that quantizes every projection alike, or the
    FP8 formats every listed export loads experts in (any width quantizes whole)."""
    from moepress.exporters.fused_moe import FUSES_EXPERTS, common_groups, expert_fp8_formats
    from moepress.exporters.kernel_widths import TRTLLM_INT4_MOE_GROUP
    from moepress.pipeline.expert_schemes import expert_scheme_problem

    q = recipe.get("quantize") or {}
    fused = [e for e in exports if e in FUSES_EXPERTS]
    f, ruled = experts_format(recipe, adapter) if fused and adapter.experts_key() else (None, False)
    if f is None or f.skip is None:
        return
    h, w = adapter.hidden_size, adapter.moe_intermediate_size()
    gate, up, down = adapter.expert_names
    shapes = {gate: (w, h), up: (w, h), down: (h, w)}  # (out_features, in_features)
    others = {q.get("format"), *(q.get("rules") or {}).values()} - {f.name} if ruled else {f.name}
    problem = expert_scheme_problem(f, int(q.get("group_size") or 128), shapes, fused, others, adapter.family)
    if problem is None:
        return
    export, what, why = problem
    fits = [x for x in common_groups({h, w}) if not any(f.skip(o, i, x) for o, i in shapes.values())
            and (x == TRTLLM_INT4_MOE_GROUP or "hf-modelopt" not in fused)] if f.element == "int4" else []
    fp8 = [n for n in expert_fp8_formats(adapter.family, fused[0])
           if all(n in expert_fp8_formats(adapter.family, e) for e in fused)]
    key = "quantize.rules' format" if ruled else "quantize.format"  # a rule (or rules) gives the experts theirs
    ways = [f"quantize.group_size {max(fits)}"] if fits else []
    ways += [f"{key} {n}" for n in fp8]
    raise MoepressError(f"recipe export.formats {export}: {key} {f.name} {what}; the export refuses it ({why}); "
                        f"expected {either(ways)}")


def experts_quantized(recipe: dict, adapter) -> bool:
    """Whether the quantize section quantizes some routed-expert projection (its format's ``skip`` rule at the group
    size, on the model's widths): one that leaves them all bf16 writes no expert form an export could refuse."""
    f, _ = experts_format(recipe, adapter)
    if f is None or not adapter.experts_key():
        return False
    h, w, g = adapter.hidden_size, adapter.moe_intermediate_size(), int(recipe["quantize"].get("group_size") or 128)
    return f.skip is None or not all(f.skip(o, i, g) for o, i in ((w, h), (w, h), (h, w)))


def refuse_modelopt_experts(recipe: dict, adapter, exports: list[str]) -> None:
    """hf-modelopt after a quantize whose format or rules give every routed expert a form no runtime loads from a
    Model-Optimizer checkpoint (exporters/hf_modelopt.py refuses it at export, hours later); not where the experts'
    widths leave them all bf16, which the export takes."""
    if "hf-modelopt" not in exports or not experts_quantized(recipe, adapter):
        return
    f, ruled = experts_format(recipe, adapter)
    family = adapter.family
    why = f.modelopt_experts_why(family) if f is not None else ""
    if why:
        given = f"quantize.rules give {f.name} to" if ruled else f"quantize.format {f.name} gives"
        raise MoepressError(f"recipe export.formats hf-modelopt: {given} the {family} routed "
                            f"experts a form no runtime loads from a Model-Optimizer checkpoint ({why}); expected "
                            "hf-modelopt removed from export.formats"
                            + (" (hf-fp8-block takes them)" if f.modelopt_moe_why and _blocks_run(adapter) else ""))


def _blocks_run(adapter) -> bool:
    """Whether hf-fp8-block takes the output: some linear runs in 128x128 block FP8 (kernel_widths.runs_in_blocks:
    the attention's inputs, hidden wide, or the experts'), others it keeps bf16; it refuses a model of none
    (hidden 192, experts 320 wide)."""
    from moepress.exporters.kernel_widths import runs_in_blocks

    h, w = adapter.hidden_size, adapter.moe_intermediate_size()
    return runs_in_blocks((h, h), False) or (runs_in_blocks((w, h), True) and runs_in_blocks((h, w), True))


def ct_ways(recipe: dict, model: Path | None, changes: list[tuple[str, dict]]) -> list[str]:
    """The ``changes`` (label, quantize keys) after which this preflight's compressed-tensors checks take the recipe,
    each with the quantize.group_size an INT4 format needs (the largest that quantizes the experts alike)."""
    from moepress.compress import formats
    from moepress.compress.arch import get_adapter
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.compress.quantize.config import GROUP_SIZES

    if model is None:
        return [label for label, _ in changes]
    reader = CheckpointReader(model)
    adapter = get_adapter(reader.config, reader.names())
    ways = []
    for label, change in changes:
        q = {**recipe["quantize"], **change}
        f = formats.FORMATS[q["format"]]
        for g in (None, *sorted(GROUP_SIZES, reverse=True)) if f.element == "int4" else (None,):
            r = {**recipe, "quantize": {**q, **({"group_size": g} if g else {})}}
            try:
                refuse_ct_forms(r, ["compressed-tensors"])  # no model: its refusal names no ways
                if f.scale == "block":
                    refuse_fused_blocks(r, model, ["compressed-tensors"])
                refuse_expert_schemes(r, ["compressed-tensors"], adapter)
            except MoepressError:
                continue
            ways.append(label + (f" with quantize.group_size {g}" if g else ""))
            break
    return ways


def other_exports(recipe: dict, model: Path, fmt: str, reg: dict) -> str:
    """For the family refusal of export ``fmt``: the other exports this preflight takes of the recipe's quantize
    output (the exporter's own hint reads the model, which the quantize changes)."""
    ways = []
    for other in (x for x in reg if x != fmt):
        r = {**recipe, "export": {**recipe["export"], "formats": [other]}}
        try:
            refuse_unavailable_exports(r, model)
            refuse_rule_layouts(as_one_format(r, model), model, [other])  # what the rules write: asked last
        except MoepressError:
            continue
        ways.append(other)
    q = recipe["quantize"]
    what = f"quantize.format {q['format']}" if q.get("format") and not q.get("rules") else "its quantize section"
    return f"for this recipe ({what}): expected export.formats {either(ways)}" if ways else ""

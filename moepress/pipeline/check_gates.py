"""What a run's check section asks of candidates the recipe makes: a gate that needs a streamed candidate with the
reference's experts (routing, expert errors) or its blocks (attention, weights) is refused by the check stage for
a pruned candidate or an onnx export, after prune, quantize and export; the preflight asks it of the recipe first."""

from __future__ import annotations

# exports a CPU consumer here can check, and the candidate kind it runs as (checks/candidates/)
CHECKABLE = {"hf-modelopt": "checkpoint", "hf-fp8-block": "checkpoint", "compressed-tensors": "transformers",
             "onnx": "onnx"}


def refuse_unmeasurable_gates(recipe: dict, src: str = "recipe", model=None) -> None:
    """A check gate the recipe's candidates cannot give (checks/runner.py _comparable refuses it at the check): the
    routing and expert gates where the prune changes the experts per layer, those and the block gates where an onnx
    export is checked in onnxruntime, not streamed layer by layer."""
    from moepress.checks.config import CheckConfig, refuse_unmeasurable
    from moepress.checks.weights import rounds_to_nearest
    from moepress.compress.quantize import read_quant_layout
    from moepress.pipeline.recipe import key_where, recipe_keys

    if recipe.get("check") is None:
        return
    cfg = CheckConfig.from_dict(recipe["check"], where=key_where(src, "check"))
    with recipe_keys(src, "check"):
        if recipe.get("prune") is not None:
            refuse_unmeasurable(cfg, "routing", "the prune changes the experts per layer, and the routing and expert "
                                "gates need a candidate with the reference's experts per layer")
        q = recipe.get("quantize") or {}
        # without a quantize section, the model's own layout (a `moepress quantize` output as the recipe's model)
        stored = (read_quant_layout(model) or {}).get("modules", {}) if not q and model is not None else {}
        made = {q.get("format"), *(q.get("rules") or {}).values()} | {m.get("format") for m in stored.values()}
        if not any(rounds_to_nearest(f) for f in made):
            refuse_unmeasurable(cfg, "blocks", "it holds weights rounded to nearest by `moepress quantize` to that "
                                "rounding's error, and this recipe's " + ("quantize formats round none so (AWQ / GPTQ)"
                                                                          if q else "candidates are not quantized"),
                                field="max_weight_error_ratio")
        for fmt in (recipe.get("export") or {}).get("formats") or []:
            # onnx: checked whatever its formats; a compressed-tensors export transformers misloads goes unchecked
            # (runner._unchecked), which its formats decide after the quantize: its gates are the check's to refuse
            if CHECKABLE.get(fmt) == "onnx":
                why = f"the {fmt} export is checked in {CHECKABLE[fmt]}, not streamed layer by layer, and the"
                refuse_unmeasurable(cfg, "routing", f"{why} routing and expert gates need a streamed candidate")
                refuse_unmeasurable(cfg, "blocks", f"{why} attention and weight gates need a streamed candidate")

"""Model cards: the README.md of a published artifact — what it is, how it was made, its numbers,
and how to load it in TensorRT-LLM, vLLM and transformers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from moepress.calib.tokenizer import native_tokenizer
from moepress.exporters.artifacts import consumer_misload, kv_cache_declared, transformers_misload
from moepress.manifest import file_digests, read_manifest, update_manifest
from moepress.outputs import write_text_atomic
from moepress.pipeline.stale import stage_path

CARD = "README.md"
PENDING = ("# {name}\n\n`moepress run` is making this export again: its figures are not measured yet. "
           "The run writes its card when its checks end; a run killed before then leaves this note.\n")

TRTLLM = """\
TensorRT-LLM (PyTorch backend; reads `hf_quant_config.json`):

```bash
trtllm-serve {path} --backend pytorch --tp_size 1
```

```python
from tensorrt_llm import LLM
llm = LLM(model="{path}")
print(llm.generate(["def fibonacci(n):"])[0].outputs[0].text)
```
"""

VLLM_MODELOPT = """\
vLLM and SGLang read the same directory (`quant_method: modelopt`) for FP8 per tensor and NVFP4
(the README's consumer table; other formats' experts do not load there: use the compressed-tensors
or hf-fp8-block export):

```bash
vllm serve {path} --quantization modelopt
```
"""

LOADING = {
    "hf-modelopt": """\
{tensorrt_llm}
{vllm}""",
    "hf-fp8-block": """\
TensorRT-LLM's PyTorch backend, vLLM and SGLang load DeepSeek-style block-FP8 natively:

```bash
trtllm-serve {path} --backend pytorch
vllm serve {path}
```
{transformers_fp8}""",
    "compressed-tensors": """\
{vllm_ct}{transformers}""",
    "trtllm-ckpt": """\
A TensorRT-LLM checkpoint for `trtllm-build` (releases that still ship it):

```bash
trtllm-build --checkpoint_dir {path} --output_dir engine --gemm_plugin auto --moe_plugin auto
```

or `moepress build {path} --target h100-sxm -o engine` (plans, builds, checks accuracy).
""",
    "onnx": """\
{tensorrt}onnxruntime runs it on CPU, with its QDQ
fusions off (they target integer kernels; some releases reject the FP8 Q/DQ they would fuse):

```python
import onnxruntime as ort
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_quant_qdq", "1")
sess = ort.InferenceSession("{path}/model.onnx", so)
```
""",
}


# the snippets of a runtime an export may say misloads it (export.json misloaded_by): replaced by the warning
BY_CONSUMER = {
    "tensorrt": ("{tensorrt}", "TensorRT", """\
ONNX with QuantizeLinear/DequantizeLinear for TensorRT:

```bash
trtexec --onnx={path}/model.onnx --stronglyTyped --saveEngine=model.plan \\
  --minShapes=input_ids:1x1 --optShapes=input_ids:8x{half} --maxShapes=input_ids:8x{seq}
```

(trtexec fixes a dynamic dimension it is given no shape for to 1), or `moepress build {path} --target h100-sxm -o
engine`. """),
    "transformers": ("{transformers_fp8}", "transformers", """
transformers (dequantizes on CPU):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```
"""),
    "vllm": ("{vllm_ct}", "vLLM", """\
vLLM:

```bash
vllm serve {path}
```
"""),
}

CT_TRANSFORMERS = """
transformers (with `compressed-tensors` installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tok = AutoTokenizer.from_pretrained("{path}")
```
"""


def _json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _quant_rows(recipe: dict, d: Path) -> list[str]:
    q = recipe.get("quantize")
    if not q:
        return []
    rows = [f"| quantization | {q.get('format') or 'rules'}"
            f"{', rules ' + json.dumps(q['rules']) if q.get('rules') else ''} |"]
    carried = kv_cache_declared(d)
    if carried:
        rows.append(f"| KV cache | {carried.quant_algo}, calibrated scales |")
    elif q.get("kv_cache"):
        rows.append(f"| KV cache | not carried by this format (asked: {q['kv_cache']}): the runtime keeps it "
                    "in the model's dtype |")
    return rows


def _prune_row(recipe: dict, prune: dict | None) -> list[str]:
    p = recipe.get("prune")
    if not p:
        return []
    amount = f"ratio {p['ratio']}" if p.get("ratio") is not None else f"keep {p['keep']}"
    asked = p.get("method") or "default"
    chosen = (prune or {}).get("chosen")
    how = f"{asked} method" + (f" (chose {chosen})" if chosen and chosen != asked else "")
    kept = (prune or {}).get("kept")
    return [f"| pruning | {how}, {amount} of routed experts{f'; {kept} kept per MoE layer' if kept else ''} |"]


def _calibrated(recipe: dict) -> bool:
    """Did a stage of the recipe read calibration data (pruning; a calibrated format or KV cache)?"""
    from moepress.calib.config import CalibConfig
    from moepress.compress.quantize import QuantConfig

    q = recipe.get("quantize")
    return bool(recipe.get("prune")) or (q is not None and QuantConfig.from_recipe(
        q, CalibConfig.from_recipe(recipe["calib"])).needs_calibration)


def _loading(fmt: str, d: Path, name: str, source: Path) -> list[str]:
    """How to load it; where this artifact's own export.json says a consumer misloads it, that consumer's
    snippet is replaced by the warning, and its consumer notes are listed."""
    info = _json(d / "export.json")
    misload = transformers_misload(d)
    by = info.get("misloaded_by") if isinstance(info.get("misloaded_by"), dict) else {}
    serve = "vLLM" if "sglang" in by else "vLLM or SGLang"
    tf = (f"\n**transformers <= {misload[0]} {misload[1]}**: serve it with {serve}.\n"
          if misload else CT_TRANSFORMERS)
    vllm = consumer_misload(d, "vllm")  # hf-modelopt's MIXED_PRECISION layers vLLM loads unquantized
    trt = consumer_misload(d, "tensorrt_llm")
    trt = f"**TensorRT-LLM <= {trt[0]} {trt[1]}**{'.' if vllm else ': serve it with vLLM.'}\n" if trt else TRTLLM
    vllm = f"**vLLM <= {vllm[0]} {vllm[1]}**.\n" if vllm else \
        VLLM_MODELOPT.replace("vLLM and SGLang read", "vLLM reads" if "sglang" in by else "vLLM and SGLang read")
    text = LOADING.get(fmt, "").replace("{transformers}", tf).replace("{tensorrt_llm}", trt).replace("{vllm}", vllm)
    for key, (slot, who, snippet) in BY_CONSUMER.items():
        bad = consumer_misload(d, key)
        text = text.replace(slot, f"\n**{who} <= {bad[0]} {bad[1]}** (export.json misloaded_by; its consumer notes "
                                  "say what to do).\n\n" if bad else snippet)
    cfg, tok = _json(d / "config.json"), _json(d / "tokenizer_config.json")
    # the plan's default, within the model's positions (an onnx export has no config.json: the source's)
    positions = cfg.get("max_position_embeddings") or _json(source / "config.json").get("max_position_embeddings")
    seq = max(2, min(4096, int(positions or 4096)))
    text = text.replace("{path}", f"./{name}").replace("{seq}", str(seq)).replace("{half}", str(seq // 2))
    text += _remote_code(cfg, tok)
    notes = info.get("consumer_notes")
    notes = [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []
    return [text, *(["## Consumer notes", "", *[f"- {n}" for n in notes], ""] if notes else [])]


def _remote_code(cfg: dict, tok: dict) -> str:
    """What the card says of the checkpoint's own code (``auto_map``): pass trust_remote_code where transformers
    has no class of its own for the model (Kimi K2's ``kimi_k2``) or its tokenizer (a ``tokenizer_class`` it does
    not know); otherwise not to, since with it transformers runs the checkpoint's code instead of its own."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not (cfg.get("auto_map") or tok.get("auto_map")):
        return ""
    model = bool(cfg.get("auto_map")) and cfg.get("model_type") not in CONFIG_MAPPING
    tokenizer = bool(tok.get("auto_map")) and not native_tokenizer(tok.get("tokenizer_class"))
    if model or tokenizer:
        return ("\nThe model or its tokenizer is the checkpoint's own code (`auto_map`): pass "
                "`--trust-remote-code` to `vllm serve` / `trtllm-serve` and `trust_remote_code=True` to "
                "transformers.\n")
    return ("\nThe checkpoint carries its own code (`auto_map`), which its runtimes do not need: transformers has "
            "classes of its own for the model and its tokenizer. Load it without `--trust-remote-code` / "
            "`trust_remote_code=True`, which would run that code instead.\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


NO_CPU_RUNTIME = "no CPU runtime for this format; `moepress build` checks the engine on its GPU"


@dataclass(frozen=True)
class Accuracy:
    """What the card says of accuracy: the artifact's own check; else the check of the checkpoint it
    was exported from (``upstream``, of kind ``upstream_kind``), named as such; ``checking``: whether
    the recipe checks at all."""

    check: dict | None = None
    upstream: dict | None = None
    upstream_kind: str = ""
    checking: bool = True
    unchecked: str = NO_CPU_RUNTIME


# how `moepress check` ran the artifact, by its candidate kind (moepress/checks/candidates/)
MEASURED_BY = {
    "checkpoint": "moepress's streamed forward, with the activation and KV-cache quantization its runtimes apply",
    "transformers": "transformers' own loader (where it computes a layer otherwise than vLLM, e.g. experts on "
                    "unquantized activations, the consumer notes below say so)",
    "onnx": "onnxruntime",
    "engine": "the built engine",
}


def _verdict(check: dict) -> str:
    gates = check.get("gates")
    if check.get("passed") is None or gates == []:
        return "No gate applied: measured only (`moepress publish` refuses it)."
    if not check.get("passed"):
        return "Gates FAILED: " + ", ".join(check.get("failed") or []) + "."
    gates = [g for g in gates or [] if isinstance(g, dict) and {"metric", "op", "threshold"} <= set(g)]
    applied = [f"{g['metric']} {g['op']} {_fmt(g['threshold'])}" for g in gates if g.get("passed") is not None]
    unmeasured = [g["metric"] for g in gates if g.get("passed") is None]  # a pruned model's expert gates
    return ("Gates passed" + (f" ({', '.join(applied)})." if applied else ".")
            + (f" Not measured: {', '.join(unmeasured)}." if unmeasured else ""))


def _accuracy(acc: Accuracy) -> list[str]:
    """The card's accuracy section."""
    check, lines = acc.check or acc.upstream, []
    if check is None:
        return ["Not checked: the recipe's check is off." if not acc.checking else
                f"Not checked on this machine ({acc.unchecked})."]
    if acc.check is None:
        lines += [f"This artifact was not checked ({acc.unchecked}). The {acc.upstream_kind} checkpoint it was "
                  f"exported from:", ""]
    lines += [_verdict(check), ""]
    if check.get("kind") in MEASURED_BY:  # whose numbers they are: transformers may compute what vLLM quantizes
        lines += [f"Measured through {MEASURED_BY[check['kind']]}.", ""]
    return lines + ["| metric | value |", "|---|---|", *_metric_rows(check)]


def _metric_rows(check: dict) -> list[str]:
    """The accuracy table's rows, one per recorded metric (publish reads them back: :func:`card_differs`)."""
    return [f"| {k} | {_fmt(v)} |" for k, v in (check.get("metrics") or {}).items()]


def card_differs(card: Path, check: dict) -> str | None:
    """Why a moepress card no longer states ``check`` (the manifest's accuracy section: its verdict line and
    every metric row it records), or None. A card edited after it was written, or an artifact checked again
    since, published figures nothing had measured; a card moepress did not write is not read."""
    lines = card.read_text(errors="replace").splitlines()
    if not any(line.startswith("Made with [moepress]") for line in lines):
        return None
    want = [_verdict(check), *_metric_rows(check)]
    missing = [w for w in want if w not in lines]
    return (f"{card}: the card does not state its manifest's accuracy check (expected {missing[0]!r}: edited, "
            "checked again after it was written, or written by an older moepress); rewrite it with `moepress run`"
            ) if missing else None


def model_card(artifact: str | Path, fmt: str, recipe: dict, source: str | Path, acc: Accuracy,
               prune: dict | None = None) -> str:
    """The card of ``artifact``: its facts from its own files where they differ by format (KV cache, loading,
    consumer notes), the recipe's otherwise; ``prune``: the prune stage's result (the method ``auto``
    chose, experts kept)."""
    d = Path(artifact)
    m = read_manifest(d)
    files = m.get("files", {})
    size = sum(v["size"] for k, v in files.items() if k != "README.md")
    name, release = d.name, str(m.get("versions", {}).get("moepress", "")).split("+")[0]  # not the code's digest
    lines = [f"# {Path(source).name} — {fmt}", "",
             f"Made with [moepress](https://github.com/moepress/moepress) {release} "
             f"from `{Path(source).name}`.", "",
             "| | |", "|---|---|", f"| format | `{fmt}` |", f"| size on disk | {size / 1e6:.2f} MB |"]
    lines += _prune_row(recipe, prune) + _quant_rows(recipe, d)
    c = recipe.get("calib") or {}
    if _calibrated(recipe):
        lines.append(f"| calibration | {c.get('num_samples')} samples x {c.get('seq_len')} tokens, seed "
                     f"{c.get('seed')}, {', '.join(c.get('sources') or []) or 'bundled text'} |")
    lines += ["", "## Accuracy against the original", "", *_accuracy(acc)]
    lines += ["", "## Loading", "", *_loading(fmt, d, name, Path(source)),
              "## Provenance", "",
              "`moepress-manifest.json` lists every file's sha256 and size, the checkpoint it was exported "
              "from, the export config and the versions used; its `pipeline` section, the recipe and the "
              "source model's hashes. `moepress publish` verifies it.", ""]
    return "\n".join(lines)


def write_card(d: Path, text: str, pipeline: dict | None = None) -> None:
    """The export ``d``'s card ``text`` and its entry in the export's manifest (and the manifest's ``pipeline``
    section); nothing is written where both already say so (a kill between the card and its entry is mended)."""
    p, m = d / CARD, read_manifest(d)
    listed = (m.get("files") or {}).get(CARD, {}).get("sha256")
    same = pipeline is None or m.get("pipeline") == json.loads(json.dumps(pipeline))
    if p.exists() and p.read_text() == text and same and listed == hashlib.sha256(p.read_bytes()).hexdigest():
        return
    write_text_atomic(p, text)
    known = {k: v for k, v in m.get("files", {}).items() if k != CARD}
    update_manifest(d, files=file_digests(d, known), **({"pipeline": pipeline} if pipeline is not None else {}))


def withdraw_cards(out: Path, formats) -> None:
    """The cards an earlier run wrote under ``out``/export for the exports this run makes (``formats``), replaced by
    a note that the run is making them again: a rerun records each check in the export's manifest as it ends and
    writes the cards after the last, so meanwhile (or after a kill) a card said "Gates passed" beside a manifest
    recording the new check failed. A folder no run wrote a card into (no manifest ``pipeline``) is left alone."""
    for fmt in formats:
        d = stage_path(out, f"export:{fmt}")
        if (d / CARD).is_file() and "pipeline" in read_manifest(d):
            write_card(d, PENDING.format(name=fmt))

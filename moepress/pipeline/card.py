"""Model cards: the README.md of a published artifact — what it is, how it was made, its numbers,
and how to load it in TensorRT-LLM, vLLM and transformers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from moepress.manifest import read_manifest

LOADING = {
    "hf-modelopt": """\
TensorRT-LLM (PyTorch backend; reads `hf_quant_config.json`):

```bash
trtllm-serve {path} --backend pytorch --tp_size 1
```

```python
from tensorrt_llm import LLM
llm = LLM(model="{path}")
print(llm.generate(["def fibonacci(n):"])[0].outputs[0].text)
```

vLLM and SGLang read the same directory (`quant_method: modelopt`) for FP8 per tensor and NVFP4
(the README's consumer table; other formats' experts do not load there: use the compressed-tensors
or hf-fp8-block export):

```bash
vllm serve {path} --quantization modelopt
```
""",
    "hf-fp8-block": """\
TensorRT-LLM's PyTorch backend, vLLM and SGLang load DeepSeek-style block-FP8 natively:

```bash
trtllm-serve {path} --backend pytorch
vllm serve {path}
```

transformers (dequantizes on CPU):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```
""",
    "compressed-tensors": """\
vLLM:

```bash
vllm serve {path}
```

transformers (with `compressed-tensors` installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{path}")
tok = AutoTokenizer.from_pretrained("{path}")
```
""",
    "trtllm-ckpt": """\
A TensorRT-LLM checkpoint for `trtllm-build` (releases that still ship it):

```bash
trtllm-build --checkpoint_dir {path} --output_dir engine --gemm_plugin auto --moe_plugin auto
```

or `moepress build {path} --target h100-sxm -o engine` (plans, builds, checks accuracy).
""",
    "onnx": """\
ONNX with QuantizeLinear/DequantizeLinear for TensorRT:

```bash
trtexec --onnx={path}/model.onnx --stronglyTyped --saveEngine=model.plan
```

or `moepress build {path} --target h100-sxm -o engine`. onnxruntime runs it on CPU, with its QDQ
fusions off (they target integer kernels; some releases reject the FP8 Q/DQ they would fuse):

```python
import onnxruntime as ort
so = ort.SessionOptions()
so.add_session_config_entry("session.disable_quant_qdq", "1")
sess = ort.InferenceSession("{path}/model.onnx", so)
```
""",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass(frozen=True)
class Accuracy:
    """What the card says of accuracy: the artifact's own check; else the check of the checkpoint it
    was exported from (``upstream``, of kind ``upstream_kind``), named as such; ``checking``: whether
    the recipe checks at all."""

    check: dict | None = None
    upstream: dict | None = None
    upstream_kind: str = ""
    checking: bool = True


def _verdict(check: dict) -> str:
    if not check.get("passed"):
        return "Gates FAILED: " + ", ".join(check.get("failed") or []) + "."
    if check.get("gates") == []:
        return "No gate applied: measured only (`moepress publish` refuses it)."
    return "Gates passed."


def _accuracy(acc: Accuracy) -> list[str]:
    """The card's accuracy section."""
    check, lines = acc.check or acc.upstream, []
    if check is None:
        return ["Not checked: the recipe's check is off." if not acc.checking else
                "Not checked on this machine (no CPU runtime for this format); "
                "`moepress build` checks the engine on its GPU."]
    if acc.check is None:
        lines += [f"This artifact was not checked (no CPU runtime for this format; `moepress build` checks the "
                  f"engine on its GPU). The {acc.upstream_kind} checkpoint it was exported from:", ""]
    lines += [_verdict(check), "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in (check.get("metrics") or {}).items()]
    return lines


def model_card(artifact: str | Path, fmt: str, recipe: dict, source: str | Path, acc: Accuracy) -> str:
    d = Path(artifact)
    m = read_manifest(d)
    files = m.get("files", {})
    size = sum(v["size"] for k, v in files.items() if k != "README.md")
    name = d.name
    lines = [f"# {Path(source).name} — {fmt}", "",
             f"Made with [moepress](https://github.com/moepress/moepress) {m.get('versions', {}).get('moepress', '')} "
             f"from `{Path(source).name}`.", "",
             "| | |", "|---|---|", f"| format | `{fmt}` |", f"| size on disk | {size / 1e6:.2f} MB |"]
    if recipe.get("prune"):
        p = recipe["prune"]
        amount = f"ratio {p['ratio']}" if p.get("ratio") is not None else f"keep {p['keep']}"
        lines.append(f"| pruning | {p.get('method') or 'default'} method, {amount} of routed experts |")
    if recipe.get("quantize"):
        q = recipe["quantize"]
        lines.append(f"| quantization | {q.get('format') or 'rules'}"
                     f"{', rules ' + json.dumps(q['rules']) if q.get('rules') else ''}"
                     f"{', KV cache ' + q['kv_cache'] if q.get('kv_cache') else ''} |")
    c = recipe.get("calib") or {}
    lines.append(f"| calibration | {c.get('num_samples')} samples x {c.get('seq_len')} tokens, seed {c.get('seed')}, "
                 f"{', '.join(c.get('sources') or []) or 'bundled text'} |")
    lines += ["", "## Accuracy against the original", "", *_accuracy(acc)]
    lines += ["", "## Loading", "", LOADING.get(fmt, "").replace("{path}", f"./{name}"),
              "## Provenance", "",
              "`moepress-manifest.json` lists every file's sha256 and size, the source model's hashes, "
              "the stage configs and the versions used; `moepress publish` verifies it.", ""]
    return "\n".join(lines)

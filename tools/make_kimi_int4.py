"""Derive ``models/tiny-kimi-k2-int4``: ``models/tiny-deepseek-v3`` stored as Kimi K2 Thinking ships.

Kimi K2 Thinking (and K2.5 / K2.6) is a DeepseekV3ForCausalLM whose config says ``model_type:
kimi_k2`` and whose routed experts are compressed-tensors ``pack-quantized`` INT4: symmetric,
group 32 along the input dimension, ``weight_packed`` I32 (8 values per word), ``weight_scale``
BF16 [out, in/32], ``weight_shape`` I64 [2]. Its ``quantization_config`` has one config group
targeting ``Linear`` and an ``ignore`` list that keeps attention, the shared experts, the dense
MLP and ``lm_head`` in bf16 (moonshotai/Kimi-K2-Thinking config.json, quoted in public tools that
re-create it: ``["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
"re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]``). The router ``mlp.gate`` is not an ``nn.Linear``
in the DeepSeek-V3 modeling code, so the ``Linear`` target never reaches it.

The values are made by compressed-tensors itself, not by moepress: per routed expert linear the
scale is the library's ``calculate_qparams`` of the per-group min / max (its ``minmax`` observer's
formula), and the packed tensors are ``PackedQuantizationCompressor.compress`` of the bf16 weight
with that scale (compressed_tensors 0.20.1: compressors/pack_quantized/base.py). ``config.json``'s
``quantization_config`` is written by ``ModelCompressor.update_config``. Every other tensor is
copied unchanged. Deterministic: the same bytes on every run.

``tools/make_mxfp4.py`` reuses :func:`write_fixture` for the MXFP4 fixture.

    python tools/make_kimi_int4.py            # writes models/tiny-kimi-k2-int4
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "models"
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
ROUTED = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# moonshotai/Kimi-K2-Thinking config.json: quantization_config.ignore
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]


def kimi_scheme():
    """Kimi K2 Thinking's config group: INT4 symmetric, strategy group, group size 32, weights only."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32, dynamic=False, observer="minmax"))


def library_compress(w: torch.Tensor, scheme, ct_format: str) -> dict[str, torch.Tensor]:
    """One linear's stored tensors as compressed-tensors writes them: the scale from the library's
    ``calculate_qparams`` of each group's min / max, then the format's compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    g = scheme.weights.group_size
    groups = w.reshape(w.shape[0], w.shape[1] // g, g)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    compressor = BaseCompressor.get_value_from_registry(ct_format)
    return compressor.compress({"weight": w, "weight_scale": scale}, scheme)


def write_fixture(src: Path, out: Path, scheme, ct_format: str, ignore: list[str], model_type: str | None,
                  readme: str) -> None:
    """``src`` with its routed expert linears compressed by the library as ``scheme`` / ``ct_format``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    conf = json.loads((src / "config.json").read_text())
    files = sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))
    tensors = {}
    for f in files:
        with safe_open(str(src / f), "pt") as h:
            for n in h.keys():
                t = h.get_tensor(n)
                if ROUTED.search(n):
                    base = n[: -len(".weight")]
                    stored = library_compress(t, scheme, ct_format)
                    tensors.update({f"{base}.{k}": v.contiguous() for k, v in stored.items()})
                else:
                    tensors[n] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it 0600
    if model_type:
        conf["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=ct_format, ignore=ignore,
                            quantization_status=QuantizationStatus.COMPRESSED)
    ModelCompressor(quantization_config=qc).update_config(str(out))
    for f in COPIED:
        if (src / f).exists():  # synthetic checkpoints (tests) have no tokenizer
            shutil.copyfile(src / f, out / f)
    (out / "README.md").write_text(readme)


def main(src: Path, out: Path) -> None:
    readme = (f"# {out.name}\n\n`{src.name}` stored as Kimi K2 Thinking ships (`model_type: kimi_k2`; routed "
              "experts compressed-tensors `pack-quantized` INT4, symmetric, group 32: `weight_packed` I32, "
              "`weight_scale` BF16, `weight_shape`; attention, shared experts, the dense layer and `lm_head` in "
              "bf16, Kimi's `ignore` list). Written by `tools/make_kimi_int4.py` through compressed-tensors' own "
              "`calculate_qparams` and `PackedQuantizationCompressor`. A test fixture for reading, pruning and "
              "re-quantizing Kimi's native INT4; not trained further.\n")
    write_fixture(src, out, kimi_scheme(), "pack-quantized", KIMI_IGNORE, "kimi_k2", readme)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "tiny-deepseek-v3")
    ap.add_argument("--out", type=Path, default=ROOT / "tiny-kimi-k2-int4")
    a = ap.parse_args()
    main(a.src, a.out)

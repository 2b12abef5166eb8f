"""Model variants for the quality benches, derived from the bundled tiny models (no training).

A default tuned on three models can be tuned to them; these variants change what quantization is
sensitive to, deterministically and in seconds (every tensor is copied from a bundled model, so
the variants are as trained as their source, except where an edit makes them a worse language
model, which does not matter for a quantized-vs-unquantized comparison):

* routing: top-k changed (1, 2, 8: how many tokens each expert sees), a sharper softmax router
  (router weight x3: more skewed routing, more experts with few calibration tokens), DeepSeek's
  group-limited sigmoid routing turned into Kimi K2's (``n_group`` 1, ``topk_group`` 1, top-8);
* expert count: every other expert dropped (router rows and ``e_score_correction_bias`` sliced);
* expert width: the intermediate channels cut to a width that is not a multiple of 128.

Together with the bundled models (two softmax families, one sigmoid family) that is 7 models: top-k
1 to 8, 8 to 32 experts, expert widths 64 (not a multiple of 128), 128 and 256, softmax and sigmoid
routers (``--all``: 11, adding tiny-mixtral-w192 and the EXTRA variants).
``python bench/variants.py [--out DIR] [--all]`` writes them (default /tmp/moepress-variants) and
prints their directories; bench/quant_suite.py calls :func:`build`.
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
DEFAULT_OUT = Path("/tmp/moepress-variants")
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")
EXPERT = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
WIDTH_KEYS = ("moe_intermediate_size",)  # Mixtral's experts are `intermediate_size` wide
GATE_UP = (".gate_proj.weight", ".up_proj.weight", ".w1.weight", ".w3.weight")
DOWN = (".down_proj.weight", ".w2.weight")

# name -> (bundled source, edits); edits: config overrides, "keep_every": 2, "width": W, "router_scale": s
VARIANTS: dict[str, tuple[str, dict]] = {
    "qwen3-sharp": ("tiny-qwen3-moe", {"router_scale": 3.0}),
    "mixtral-top1": ("tiny-mixtral", {"config": {"num_experts_per_tok": 1}}),
    "deepseek-kimi": ("tiny-deepseek-v3", {"config": {"n_group": 1, "topk_group": 1, "num_experts_per_tok": 8}}),
    "deepseek-e16": ("tiny-deepseek-v3", {"keep_every": 2}),
}
# also available (bench/variants.py --all): more of the same axes, left out of the default set for time
EXTRA: dict[str, tuple[str, dict]] = {
    "qwen3-top2": ("tiny-qwen3-moe", {"config": {"num_experts_per_tok": 2}}),
    "qwen3-e8": ("tiny-qwen3-moe", {"keep_every": 2}),
    "qwen3-w96": ("tiny-qwen3-moe", {"width": 96}),
    "deepseek-top2": ("tiny-deepseek-v3", {"config": {"num_experts_per_tok": 2}}),
}
BUNDLED = ("tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3")
FIXTURES = ("tiny-mixtral-w192",)  # --all: an odd width whose INT4 down projections we leave unquantized


def _tensors(src: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({n: h.get_tensor(n) for n in h.keys()})
    return out


def _is_router(name: str) -> bool:
    return name.endswith((".gate.weight", ".gate.e_score_correction_bias"))


def _keep_every(ts: dict, conf: dict, step: int) -> dict:
    """Every ``step``-th expert of each MoE layer, renumbered; router rows and bias sliced."""
    key = next(k for k in COUNT_KEYS if k in conf)
    n = conf[key]
    kept = list(range(0, n, step))
    new_id = {e: i for i, e in enumerate(kept)}
    out = {}
    for name, t in ts.items():
        m = EXPERT.match(name)
        if m:
            e = int(m.group(2))
            if e in new_id:
                out[f"{m.group(1)}{new_id[e]}{m.group(3)}"] = t
        elif _is_router(name) and t.shape[0] == n:
            out[name] = t[kept].contiguous()
        else:
            out[name] = t
    conf[key] = len(kept)
    return out


def _narrow(ts: dict, conf: dict, width: int) -> dict:
    """Every routed expert cut to its first ``width`` intermediate channels (as tools/make_odd_width.py)."""
    out = {}
    for name, t in ts.items():
        if EXPERT.match(name) and name.endswith(GATE_UP):
            t = t[:width].contiguous()
        elif EXPERT.match(name) and name.endswith(DOWN):
            t = t[:, :width].contiguous()
        out[name] = t
    conf[next(k for k in (*WIDTH_KEYS, "intermediate_size") if k in conf)] = width
    return out


def _router_scale(ts: dict, s: float) -> dict:
    return {n: (t.float() * s).to(t.dtype) if n.endswith(".gate.weight") and ".mlp." in n else t
            for n, t in ts.items()}


def make(name: str, out_root: Path = DEFAULT_OUT) -> Path:
    """Write variant ``name`` (an existing one is reused: same inputs, same bytes)."""
    src_name, edits = {**VARIANTS, **EXTRA}[name]
    dst = out_root / name
    if (dst / "model.safetensors").is_file():
        return dst
    src = ROOT / src_name
    conf = json.loads((src / "config.json").read_text())
    ts = _tensors(src)
    conf.update(edits.get("config", {}))
    if "keep_every" in edits:
        ts = _keep_every(ts, conf, edits["keep_every"])
    if "width" in edits:
        ts = _narrow(ts, conf, edits["width"])
    if "router_scale" in edits:
        ts = _router_scale(ts, edits["router_scale"])
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in COPIED:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    (tmp / "README.md").write_text(f"# {name}\n\n`{src_name}` with {json.dumps(edits)} (bench/variants.py).\n")
    save_file(ts, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def build(out_root: Path = DEFAULT_OUT, names=None) -> list[str]:
    """The bench's model set: the bundled models, then every variant's directory."""
    fixtures = FIXTURES if names is not None and set(EXTRA) <= set(names) else ()
    return [*BUNDLED, *fixtures, *(str(make(n, out_root)) for n in (names or VARIANTS))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--all", action="store_true", help="also the EXTRA variants")
    a = ap.parse_args(argv)
    for p in build(a.out, [*VARIANTS, *EXTRA] if a.all else None):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

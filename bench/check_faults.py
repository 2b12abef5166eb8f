"""Faults in one block of a correct artifact against `moepress check`'s default gates.

Quantizes the bundled models (and, with ``--variants``, bench/variants.py's) in each format, checks every
correct candidate with the default gates, then injects one fault at a time into a copy of some of them
(layer 1: an attention scale, an expert's or the shared experts' down scale, gate and up swapped, a scale
tensor rolled by one row, an AWQ pre_quant_scale doubled) and checks each again. Prints per candidate the
failing gates, the three ratios (attention and expert errors to their peers': checks/peers.py; each linear's
weight error to its own rounding's: checks/weights.py) and the largest expert error, then their ranges over the
correct candidates: what the README's table of faults comes from.

    python bench/check_faults.py                       # bundled models, 9 formats, faults in 4 formats
    python bench/check_faults.py --formats fp8,int4-awq --fault-formats fp8 --variants
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moepress import models
from moepress.checks import CheckConfig, run_check
from moepress.compress.quantize import QuantConfig, quantize_checkpoint

FORMATS = "fp8,fp8-block,fp8-dynamic,int4-awq,int4-gptq,w4a8-awq,nvfp4,nvfp4-a16,mxfp4"
FAULT_FORMATS = "fp8,fp8-block,int4-awq,nvfp4"
LAYER = "model.layers.1."
SCALES = ("weight_scale", "weight_scale_inv")


def _scaled(f: float):
    def go(name, t):
        last = name.rsplit(".", 1)[-1]
        if last in SCALES or (last == "weight" and t.is_floating_point() and t.element_size() >= 2):
            return (t.float() * f).to(t.dtype)
        return None
    return go


def _rolled(name, t):
    if name.rsplit(".", 1)[-1] in SCALES and t.numel() > 1:
        return torch.roll(t, 1, 0 if t.shape[0] > 1 else -1)
    return None


def _pqs(name, t):
    return t * 2 if name.endswith("pre_quant_scale") else None


# name -> (tensor-name parts that must all appear after LAYER, change) or ("swap", prefix part, a, b)
FAULTS = {
    "attention q x 2": (("self_attn.q_proj.",), _scaled(2.0)),
    "attention q_b x 2": (("self_attn.q_b_proj.",), _scaled(2.0)),
    "attention o x 1.5": (("self_attn.o_proj.",), _scaled(1.5)),
    "attention v rolled": (("self_attn.v_proj.",), _rolled),
    "attention q pre_quant_scale x 2": (("self_attn.q_proj.",), _pqs),
    "expert 3 down x 2": ((".experts.3.", "down_proj."), _scaled(2.0)),
    "expert 3 w2 x 2": ((".experts.3.", "w2."), _scaled(2.0)),
    "expert 3 gate rolled": ((".experts.3.", "gate_proj."), _rolled),
    "expert 3 w1 rolled": ((".experts.3.", "w1."), _rolled),
    "shared down x 2": (("shared_experts.down_proj.",), _scaled(2.0)),
    "expert 3 gate/up swapped": ("swap", ".experts.3.", "gate_proj.", "up_proj."),
    "expert 3 w1/w3 swapped": ("swap", ".experts.3.", "w1.", "w3."),
    "shared gate/up swapped": ("swap", "shared_experts.", "gate_proj.", "up_proj."),
}


def inject(src: Path, dst: Path, fault) -> bool:
    """A copy of ``src`` with ``fault`` applied to layer 1; False (nothing written) where it changes nothing."""
    shards = {f.name: load_file(f) for f in src.glob("*.safetensors")}
    every = {n: t for sd in shards.values() for n, t in sd.items()}
    changed = set()
    for fname, sd in shards.items():
        for n in list(sd):
            if not n.startswith(LAYER):
                continue
            if fault[0] == "swap":
                _, part, a, b = fault
                for x, y in ((a, b), (b, a)):
                    if part + x in n and (other := n.replace(part + x, part + y)) in every \
                            and every[other].shape == sd[n].shape:
                        sd[n] = every[other]
                        changed.add(fname)
            elif all(p in n for p in fault[0]) and (new := fault[1](n, sd[n])) is not None:
                sd[n] = new.contiguous()
                changed.add(fname)
    if not changed:
        return False
    shutil.copytree(src, dst)
    for fname in changed:
        save_file(shards[fname], dst / fname, metadata={"format": "pt"})
    return True


def check(cand: Path, ref: Path) -> tuple[list[str], float | None, float | None, float | None, float | None]:
    res = run_check(cand, ref, CheckConfig())
    m = res["metrics"]
    return (res["failed"], m.get("max_attention_error_ratio"), m.get("max_expert_error_ratio"),
            m.get("max_expert_error"), m.get("max_weight_error_ratio"))


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--fault-formats", default=FAULT_FORMATS)
    ap.add_argument("--models", default=",".join(models.BUNDLED))
    ap.add_argument("--variants", action="store_true", help="also bench/variants.py --all (correct candidates only)")
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = a.work or Path(tempfile.mkdtemp(prefix="moepress-check-faults-"))
    refs = {m: models.path(m) for m in a.models.split(",")}
    if a.variants:
        sys.path.insert(0, str(Path(__file__).parent))
        import variants

        # build() names the bundled models and fixtures, and gives the variants' directories
        refs.update({Path(d).name: models.resolve(d) for d in variants.build(work / "variants", list(variants.VARIANTS)
                                                                             + list(variants.EXTRA))})
    ranges: dict[str, list[float]] = {"attention": [], "expert": [], "weight": [], "expert error": []}
    print(f"{'candidate':<44} {'attention':>9} {'expert':>7} {'weight':>7} {'exp.err':>7}  failing gates")
    for name, ref in refs.items():
        for fmt in a.formats.split(","):
            q = work / f"{name}-{fmt}"
            if not q.exists():
                quantize_checkpoint(ref, q, QuantConfig(format=fmt))
            failed, att, exp, err, wr = check(q, ref)
            for k, v in (("attention", att), ("expert", exp), ("weight", wr), ("expert error", err)):
                ranges[k] += [v] if v is not None else []
            print(f"{q.name:<44} {_fmt(att):>9} {_fmt(exp):>7} {_fmt(wr):>7} {_fmt(err):>7}  "
                  f"{', '.join(failed) or '-'}", flush=True)
            if name not in models.BUNDLED or fmt not in a.fault_formats.split(","):
                continue
            for fault_name, fault in FAULTS.items():
                bad = work / f"{q.name}--{fault_name.replace(' ', '_').replace('/', '-')}"
                if not bad.exists() and not inject(q, bad, fault):
                    continue
                failed, att, exp, err, wr = check(bad, ref)
                print(f"  {fault_name:<42} {_fmt(att):>9} {_fmt(exp):>7} {_fmt(wr):>7} {_fmt(err):>7}  "
                      f"{', '.join(failed) or 'PASSES'}", flush=True)
    for k, v in ranges.items():
        if v:
            print(f"correct candidates: {k}{'' if k.endswith('error') else ' ratio'} {min(v):.2f}-{max(v):.2f} "
                  f"over {len(v)}")
    print(f"(work directory: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

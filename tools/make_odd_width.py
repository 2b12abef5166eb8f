"""Derive ``models/tiny-mixtral-w192``: ``models/tiny-mixtral`` with expert width 192.

A test fixture for the exporters: 192 is not a multiple of the INT4 group size (128) nor of the
128x128 FP8 weight block, as real expert widths are not always (gpt-oss: 2880). Every expert keeps
its first 192 intermediate channels: rows 0..191 of ``w1`` / ``w3`` (gate / up, [inter, hidden])
and columns 0..191 of ``w2`` (down, [hidden, inter]); every other tensor is copied unchanged.
Deterministic: no randomness, no training, the same bytes on every run.

    python tools/make_odd_width.py            # writes models/tiny-mixtral-w192
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "models"
WIDTH = 192
COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json")


def narrowed(name, t, width: int):
    """The tensor ``name`` of the source with every expert cut to ``width`` intermediate channels."""
    if ".experts." in name and name.endswith((".w1.weight", ".w3.weight")):
        return t[:width].contiguous()
    if ".experts." in name and name.endswith(".w2.weight"):
        return t[:, :width].contiguous()
    return t


def main(src: Path, out: Path, width: int) -> None:
    conf = json.loads((src / "config.json").read_text())
    assert width <= conf["intermediate_size"], (width, conf["intermediate_size"])
    files = sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))
    tensors = {}
    for f in files:
        with safe_open(str(src / f), "pt") as h:
            for n in h.keys():
                tensors[n] = narrowed(n, h.get_tensor(n), width)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file creates it 0600
    conf["intermediate_size"] = width
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    for f in COPIED:
        shutil.copyfile(src / f, out / f)
    (out / "README.md").write_text(
        f"# {out.name}\n\n`{src.name}` with every expert cut to its first {width} intermediate channels "
        f"(w1/w3 rows, w2 columns), written by `tools/make_odd_width.py`. A test fixture for exports of "
        f"widths that are not multiples of the INT4 group or FP8 block size (128); not trained further, "
        f"so it is a worse language model than `{src.name}`.\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "tiny-mixtral")
    ap.add_argument("--out", type=Path, default=ROOT / f"tiny-mixtral-w{WIDTH}")
    ap.add_argument("--width", type=int, default=WIDTH)
    a = ap.parse_args()
    main(a.src, a.out, a.width)

"""The large-source notice reaches every command that reads calibration data, and the
threshold is 256 MiB (calib/data.py LARGE_SOURCE)."""

from __future__ import annotations

import io
import json

import pytest

from moepress import models
from moepress.calib import data as data_mod
from moepress.errors import MoepressError
from moepress.progress import Progress

MODEL = models.resolve("tiny-mixtral")


def _jsonl(tmp_path) -> str:
    p = tmp_path / "data.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "river", "stone"]
    recs = [" ".join(words[(i + k) % 6] for k in range(400)) for i in range(3)]
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in recs), encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("command", ["calib-prepare", "calib-stats", "quantize", "run"])
def test_every_calibrating_command_names_a_large_source_before_reading_it(cli_run, tmp_path, monkeypatch, command):
    """prune is covered by test_calib_large_inputs; calib prepare / stats, a calibrated quantize and a recipe's
    prune read the same source and must say the same line first."""
    monkeypatch.setattr(data_mod, "LARGE_SOURCE", 1000)
    src = _jsonl(tmp_path)
    small = ["--num-samples", "4", "--seq-len", "32"]
    if command == "calib-prepare":
        args = ["calib", "prepare", "tiny-mixtral", "--calib", src, *small, "-o", tmp_path / "t.safetensors"]
    elif command == "calib-stats":
        args = ["calib", "stats", "tiny-mixtral", "--calib", src, *small, "-o", tmp_path / "stats"]
    elif command == "quantize":
        args = ["quantize", "tiny-mixtral", "--format", "fp8", "--calib", src, *small, "-o", tmp_path / "q"]
    else:
        rec = tmp_path / "r.yaml"
        rec.write_text(f"model: tiny-mixtral\ncalib: {{sources: [{json.dumps(src)}], num_samples: 4, seq_len: 32}}\n"
                       "prune: {ratio: 0.25, method: frequency}\nquantize: null\nexport: null\ncheck: null\n"
                       "build: null\n")
        args = ["run", rec, "-o", tmp_path / "run"]
    r = cli_run(*args)
    assert r.exit_code == 0, r.output
    said = [ln for ln in r.stderr.splitlines() if "calibration: reading" in ln]
    assert said and set(said) == {f"calibration: reading {src} (0.0 GB): hashed for the calibration cache's key "
                                  "(remembered while the file is unchanged), every record checked"}, r.stderr


@pytest.mark.parametrize("suffix,refusal", [("jsonl", "big.jsonl:2: not a JSON object"),
                                            ("parquet", "big.parquet: not a Parquet file")])
def test_a_source_of_256_mib_is_named_and_one_byte_less_is_not(tmp_path, suffix, refusal):
    """The notice's threshold, 256 MiB or more, for JSON lines and any other local file type (a sparse file that
    the source's reader refuses right after it is hashed: nothing is sampled)."""
    p = tmp_path / f"big.{suffix}"
    for size, named in (((256 << 20) - 1, False), (256 << 20, True)):
        with open(p, "wb") as f:
            f.write(b'{"text": "x"}\n')
            f.truncate(size)
        buf = io.StringIO()
        with pytest.raises(MoepressError, match=refusal):
            data_mod.calibration_set(MODEL, (str(p),), num_samples=2, seq_len=16, cache=False,
                                     progress=Progress("human", buf))
        assert ("calibration: reading" in buf.getvalue()) == named, (size, buf.getvalue())
        if named:
            every = ", every record checked" if suffix == "jsonl" else ""
            assert buf.getvalue().strip() == (f"calibration: reading {p} (0.3 GB): hashed for the calibration "
                                              f"cache's key (remembered while the file is unchanged){every}")

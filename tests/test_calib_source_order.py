"""Sources are sampled Hub last (calib/data.py `_read_cost`): a local file too small for its share is refused
before a Hub dataset is downloaded and tokenized (hours for a large one), whatever order --calib lists them in.
The Hub is never reached here: reading it is replaced by a stub that records the attempt."""

from __future__ import annotations

import json

import pytest

from moepress import models
from moepress.calib import data as data_mod
from moepress.errors import MoepressError

MODEL = models.resolve("tiny-mixtral")


def test_a_local_source_too_small_is_refused_before_the_hub_dataset_is_read(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(json.dumps({"text": f"record {k}, a few words"}) + "\n" for k in range(3)))
    read = []
    real = data_mod._sample_source

    def sample(tok, spec, *a, **k):
        read.append(spec.type)
        if spec.type == "hub":
            raise AssertionError("the Hub dataset was read before the local source was refused")
        return real(tok, spec, *a, **k)

    monkeypatch.setattr(data_mod, "_sample_source", sample)
    with pytest.raises(MoepressError, match="tiny.jsonl: .* fewer than one sample"):
        data_mod.calibration_set(MODEL, ("hf:org/big-corpus@0.9", f"{tiny}@0.1"), num_samples=16, seq_len=64,
                                 cache=False)
    assert read == ["jsonl"]

"""The calibration cache's content hash (calib/sources/hashing.py) against hashlib over the bytes written:
a prepared token file's sidecar JSON is part of what the source reads."""

from __future__ import annotations

import hashlib
import json

from moepress.calib.sources import content_hash, parse_source


def _want(*named: tuple[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, data in named:
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    return h.hexdigest()


def test_a_token_files_sidecar_is_in_its_hash(tmp_path):
    p = tmp_path / "calib.safetensors"
    p.write_bytes(b"tensor bytes")
    side = tmp_path / "calib.safetensors.json"
    side.write_text(json.dumps({"tokenizer": "a"}))
    src = parse_source(str(p))
    assert src.type == "tokens"
    assert content_hash(src) == _want(("calib.safetensors", b"tensor bytes"),
                                      ("calib.safetensors.json", side.read_bytes()))
    before = content_hash(src)
    side.write_text(json.dumps({"tokenizer": "b"}))
    assert content_hash(src) != before


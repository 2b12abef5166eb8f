"""`moepress run` re-runs a stage whose output file was edited in place with its size kept (the manifest's sizes
cannot tell), and skips one whose files were only touched."""

import hashlib
import json
import os

from test_run import SMALL, statuses, write_recipe


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_same_size_edit_of_a_stage_output_reruns_the_stage_and_a_touch_does_not(cli_run, tmp_path):
    out = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", calib=SMALL["calib"], check=None)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    shard = sorted((out / "prune").glob("*.safetensors"))[0]
    written = _sha(shard)

    st = shard.stat()  # a touch: other stamps, the same bytes
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0 and statuses(out) == {"prune": "skipped"}, r.output
    state = json.loads((out / ".state" / "prune.json").read_text())
    assert state["stamps"][shard.name]["mtime_ns"] == st.st_mtime_ns + 10**9  # recorded: not hashed again

    raw = bytearray(shard.read_bytes())  # the last byte of the data (a weight's), not the JSON header
    raw[-1] ^= 0xFF
    with open(shard, "r+b") as f:  # in place: the same inode and size
        f.write(raw)
    assert shard.stat().st_size == st.st_size and _sha(shard) != written
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0 and statuses(out) == {"prune": "ran"}, r.output
    assert _sha(shard) == written


def test_a_same_size_edit_of_a_config_reruns_the_stage(cli_run, tmp_path):
    out = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", calib=SMALL["calib"], check=None)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    cfg = out / "prune" / "config.json"
    text = cfg.read_text()
    edited = text.replace('"tie_word_embeddings": false', '"tie_word_embeddings": true ')
    assert edited != text and len(edited) == len(text)
    cfg.write_text(edited)
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0 and statuses(out) == {"prune": "ran"}, r.output
    assert cfg.read_text() == text


def test_an_edit_that_keeps_size_and_mtime_reruns_the_stage(cli_run, tmp_path):
    """``touch -r`` / ``cp -p`` keep a file's size and mtime over other bytes: the inode change time tells."""
    out = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", calib=SMALL["calib"], check=None)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    shard = sorted((out / "prune").glob("*.safetensors"))[0]
    written, st = _sha(shard), shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    with open(shard, "r+b") as f:
        f.write(raw)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0 and statuses(out) == {"prune": "ran"}, r.output
    assert _sha(shard) == written

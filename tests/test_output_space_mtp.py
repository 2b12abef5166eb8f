"""The export's free-space bound must never exceed what the export writes, or an export that fits is refused
(tests/test_output_space.py's contract). ONNX does not carry DeepSeek-V3's multi-token-prediction layer (its
notes say so), so a block-FP8 DeepSeek-V3 with an MTP layer writes fewer bytes than its tensors hold: with free
space equal to exactly the bytes the first export wrote, the same export into a fresh folder runs."""

from __future__ import annotations

from test_output_space import Usage
from test_prune import MTP_CFG

from helpers import write_with_mtp
from moepress import outputs as outputs_mod


def _written(d) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_an_onnx_export_dropping_the_mtp_layer_runs_where_exactly_its_output_fits(cli_run, tmp_path, monkeypatch):
    src = write_with_mtp(MTP_CFG, tmp_path / "dsv3", block_fp8=True)
    state = {"free": 10**15}
    monkeypatch.setattr(outputs_mod.shutil, "disk_usage", lambda p: Usage(2 * 10**15, 0, state["free"]))
    monkeypatch.delenv(outputs_mod.SKIP_SPACE_CHECK, raising=False)
    r = cli_run("export", src, "--format", "onnx", "-o", tmp_path / "e1", "--quiet")
    assert r.exit_code == 0, r.output
    state["free"] = _written(tmp_path / "e1")
    r = cli_run("export", src, "--format", "onnx", "-o", tmp_path / "e2", "--quiet")
    assert r.exit_code == 0, r.output  # refused where the bound exceeds the free space, that is what it writes
    assert _written(tmp_path / "e2") == state["free"]

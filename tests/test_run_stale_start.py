"""A run into a reused directory removes an earlier run's stage outputs its recipe cannot produce when it STARTS
(moepress/pipeline/stale.py: "when a run starts, those its recipe cannot produce"), so a run that then fails does
not leave the earlier D/prune beside the D/quantize it is replacing, looking finished."""

from __future__ import annotations

from test_run import SMALL, write_recipe

from moepress.errors import MoepressError


def test_a_run_that_fails_has_already_removed_the_earlier_recipes_prune(cli_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    a = write_recipe(tmp_path / "a.yaml", calib=SMALL["calib"], check=None, export=None, build=None,
                     quantize={"format": "fp8"})
    r = cli_run("run", a, "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "prune").is_dir() and (out / ".state" / "prune.json").exists()

    import moepress.compress.quantize as q

    def fail(*a, **k):
        raise MoepressError("quantize failed (injected by the test)")

    monkeypatch.setattr(q, "quantize_checkpoint", fail)
    b = write_recipe(tmp_path / "b.yaml", calib=SMALL["calib"], check=None, export=None, build=None, prune="skip",
                     quantize={"format": "fp8-block"})
    r = cli_run("run", b, "-o", out)
    assert r.exit_code == 2 and "injected by the test" in r.output, r.output
    assert "run: removed prune, an earlier run's output this recipe does not produce" in r.output
    assert not (out / "prune").exists() and not (out / ".state" / "prune.json").exists()

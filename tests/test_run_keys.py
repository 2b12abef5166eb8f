"""What a run's stage keys hold (moepress/pipeline/keys.py): a stage is skipped only while what decides its output
is unchanged, and is not redone for what decides nothing of it. Each case runs a recipe, changes one thing, runs
it again and reads which stages ran (run.json)."""

from __future__ import annotations

import json

from test_run import statuses, write_recipe

from moepress import models

CHECK = {"max_samples": 2, "seq_len": 64, "max_ppl_increase": "200%"}


def test_check_data_in_the_calibration_sources_syntax_is_keyed_by_its_bytes(cli_run, tmp_path):
    """`check.data: FILE,field=text` (a source the check reads as --calib would) names no existing path: its bytes
    were never hashed, and an edited file kept the old verdict."""
    data = tmp_path / "ev.jsonl"
    lines = [json.dumps({"text": (models.path("tiny-mixtral") / "config.json").read_text() * 4, "id": k})
             for k in range(4)]
    data.write_text("\n".join(lines) + "\n")
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"},
                       check={**CHECK, "data": f"{data},field=text"})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "skipped"}
    data.write_text("\n".join(json.dumps({"text": json.loads(ln)["text"][::-1]}) for ln in lines) + "\n")
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}


def test_a_standalone_check_of_a_runs_artifact_makes_the_run_check_it_again(cli_run, tmp_path):
    """`moepress check D/quantize` with other gates replaced the candidate's recorded verdict (what publish reads);
    the run then skipped its check and its card went on stating its own verdict beside the other one."""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=CHECK)
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    r = cli_run("check", out / "quantize", "-r", "tiny-mixtral", "--max-samples", "2", "--seq-len", "32",
                "--min-top1", "0.999", "--quiet")
    assert r.exit_code == 1, r.output  # its own, stricter gate failed, and was recorded
    assert json.loads((out / "quantize" / "moepress-manifest.json").read_text())["accuracy"]["passed"] is False
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}
    assert json.loads((out / "quantize" / "moepress-manifest.json").read_text())["accuracy"]["passed"] is True
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "skipped"}


def test_a_check_measures_again_under_another_version_of_a_consumer_library(cli_run, tmp_path, monkeypatch):
    """The verdict is the consumer's: transformers 5.24-5.25 drop NVFP4 experts' global scales, so the same
    candidate checks otherwise under another transformers. Only the check runs again."""
    from moepress import manifest
    from moepress.pipeline import runner

    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=CHECK)
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    real = manifest.library_versions
    monkeypatch.setattr(runner, "library_versions", lambda: {**real(), "transformers": "99.0.0"})
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}


def test_a_calibration_free_quantize_is_not_redone_for_other_calibration_settings(cli_run, tmp_path):
    """fp8-dynamic reads no calibration data: 8 or 16 samples write the same bytes, and the run keeps it."""
    def recipe(n):
        return write_recipe(tmp_path / f"r{n}.yaml", prune="skip", check=None, quantize={"format": "fp8-dynamic"},
                            calib={"num_samples": n, "seq_len": 64})

    out = tmp_path / "run"
    assert cli_run("run", recipe(8), "-o", out).exit_code == 0
    assert cli_run("run", recipe(16), "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped"}
    assert cli_run("run", write_recipe(tmp_path / "awq.yaml", prune="skip", check=None,
                                       quantize={"format": "int4-awq"}, calib={"num_samples": 8, "seq_len": 64}),
                   "-o", out).exit_code == 0
    assert cli_run("run", write_recipe(tmp_path / "awq.yaml", prune="skip", check=None,
                                       quantize={"format": "int4-awq"}, calib={"num_samples": 16, "seq_len": 64}),
                   "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran"}  # a calibrated format: other samples, other bytes


def test_a_check_sealed_with_another_key_is_made_again(cli_run, tmp_path, monkeypatch):
    """Under another MOEPRESS_KEY_FILE the run skipped its checks, whose verdicts stayed sealed with the old key,
    which publish refuses. The checks run again and seal with the new key; the card, stating the same figures, is
    the same, and so is the build that records it."""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8"}, check=CHECK,
                       export={"formats": ["hf-modelopt"]}, build={"targets": ["h100-sxm"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    monkeypatch.setenv("MOEPRESS_KEY_FILE", str(tmp_path / "another.key"))
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert {k for k, v in statuses(out).items() if v == "ran"} == {"check:quantized", "check:hf-modelopt"}
    assert cli_run("publish", out / "export" / "hf-modelopt", "--to", tmp_path / "pub").exit_code == 0


def test_a_build_is_made_again_when_the_card_it_records_changed(cli_run, tmp_path, monkeypatch):
    """A check on other held-out text rewrites the export's card (its figures); the build's manifest records the
    artifact's files, the card among them, and its engine check reads that text: the build ran again."""
    from moepress.calib import data as data_mod
    from moepress.checks import runner as check_runner

    text = tmp_path / "eval.txt"
    text.write_bytes(data_mod.DEFAULT_EVAL.read_bytes())
    monkeypatch.setattr(data_mod, "DEFAULT_EVAL", text)  # what the key hashes
    monkeypatch.setattr(check_runner, "DEFAULT_EVAL", text)  # what the check reads
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8"}, check=CHECK,
                       export={"formats": ["hf-modelopt"]}, build={"targets": ["h100-sxm"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    card = (out / "export" / "hf-modelopt" / "README.md").read_text()
    text.write_text(text.read_text()[::-1])
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert (out / "export" / "hf-modelopt" / "README.md").read_text() != card
    st = statuses(out)
    assert {k for k, v in st.items() if v == "ran"} == {"check:quantized", "check:hf-modelopt",
                                                         *(k for k in st if k.startswith("build:"))}, st

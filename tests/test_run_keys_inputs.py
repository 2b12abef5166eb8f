"""What a run's stage keys must follow (moepress/pipeline/keys.py, runner.py). Each case runs a recipe,
changes one thing, runs it again and reads which stages ran (run.json), as tests/test_run_keys.py does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from test_run import statuses, write_recipe

from moepress import models

CHECK = {"max_samples": 2, "seq_len": 64, "max_ppl_increase": "200%"}


def test_edited_weights_make_the_run_quantize_again(cli_run, tmp_path):
    """The source's weights (its *.safetensors) decide every stage's output: new weights under the same file names
    (a re-downloaded or fine-tuned checkpoint) must not be skipped as unchanged."""
    m = Path(shutil.copytree(models.path("tiny-mixtral"), tmp_path / "m"))
    rec = write_recipe(tmp_path / "r.yaml", model=str(m), prune="skip", check=None, quantize={"format": "fp8-dynamic"})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    shard = sorted(m.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 2 + 1
    save_file(tensors, shard, metadata={"format": "pt"})
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran"}


def _edited_data_folder_reruns_the_check(cli_run, tmp_path, files: list[str], edited: str) -> None:
    """A text folder of ``files`` as check.data, run, ``edited`` rewritten, run again: only the check runs."""
    text = (models.path("tiny-mixtral") / "config.json").read_text() * 40
    data = tmp_path / "eval"
    for rel in files:
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"},
                       check={**CHECK, "data": str(data)})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    (data / edited).write_text(text[::-1])
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}


def test_data_folder_file_in_a_subfolder_edited_makes_the_check_run_again(cli_run, tmp_path):
    """A text folder as check.data is read recursively (calib/sources/hashing.py text_files: rglob): an edited
    file in a subfolder is other evaluation data."""
    _edited_data_folder_reruns_the_check(cli_run, tmp_path, ["top.txt", "sub/nested.txt"], "sub/nested.txt")


def test_data_folder_two_files_of_one_name_each_count(cli_run, tmp_path):
    """a/x.txt and b/x.txt are two files of the evaluation data: editing the first is other data too."""
    _edited_data_folder_reruns_the_check(cli_run, tmp_path, ["a/x.txt", "b/x.txt"], "a/x.txt")


def test_a_standalone_check_with_the_same_verdict_but_other_figures_makes_the_run_check_again(cli_run, tmp_path):
    """`moepress check D/quantize` on other held-out samples (passing as well) replaced the candidate's recorded
    figures; the run's card states its own. Its check must run again, not only when the verdict flips."""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=CHECK)
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    man = out / "quantize" / "moepress-manifest.json"
    before = json.loads(man.read_text())["accuracy"]
    r = cli_run("check", out / "quantize", "-r", "tiny-mixtral", "--max-samples", "3", "--seq-len", "32",
                "--max-ppl-increase", "200%", "--quiet")
    assert r.exit_code == 0, r.output
    after = json.loads(man.read_text())["accuracy"]
    assert after["passed"] == before["passed"] and after != before
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}


def test_an_upgraded_transformers_makes_the_check_run_again(cli_run, tmp_path, monkeypatch):
    """The check's key names the consumer libraries' installed versions (importlib.metadata), transformers the
    first of them: another installed transformers measures again."""
    from moepress import manifest

    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=CHECK)
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    real = manifest.metadata.version
    monkeypatch.setattr(manifest.metadata, "version", lambda n: "99.0.0" if n == "transformers" else real(n))
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out)["check:quantized"] == "ran"


def test_a_build_is_made_again_when_only_the_checks_figures_changed(cli_run, tmp_path):
    """Another check setting (more samples) rewrites the export's card with other figures, eval text unchanged: the
    build, whose manifest records the artifact's files (the card among them), runs again."""
    def recipe(n):
        return write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8"},
                            check={**CHECK, "max_samples": n}, export={"formats": ["hf-modelopt"]},
                            build={"targets": ["h100-sxm"]})

    out = tmp_path / "run"
    assert cli_run("run", recipe(2), "-o", out).exit_code == 0
    card = (out / "export" / "hf-modelopt" / "README.md").read_text()
    assert cli_run("run", recipe(3), "-o", out).exit_code == 0
    assert (out / "export" / "hf-modelopt" / "README.md").read_text() != card
    st = statuses(out)
    assert all(v == "ran" for k, v in st.items() if k.startswith("build:")) and any(k.startswith("build:") for k in st)


def test_a_truncated_output_file_makes_its_stage_run_again(cli_run, tmp_path):
    """A stage's file cut short (a full disk, a copy interrupted) is not the output it wrote: the manifest lists
    its size, and the stage runs again instead of being skipped."""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8-dynamic"})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    shard = sorted((out / "quantize").glob("model-*.safetensors"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran"}
    assert shard.stat().st_size == size


def test_a_stage_directory_rewritten_with_files_of_the_same_sizes_runs_again(cli_run, tmp_path):
    """Another writer of RUN/quantize (`moepress quantize -o RUN/quantize --force` with other calibration) leaves
    files of the same sizes and other bytes, and a manifest listing their sha256: not the run's output, so the
    stage runs again. Simulated exactly: one byte of a shard's data changed, its manifest entry rewritten with the
    file's sha256 (hashlib) as that writer records it."""
    import hashlib

    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8-dynamic"})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    man = out / "quantize" / "moepress-manifest.json"
    m = json.loads(man.read_text())
    shard = sorted((out / "quantize").glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte: tensor data, not the header
    shard.write_bytes(bytes(data))
    entry = m["files"][shard.name]
    assert entry["size"] == len(data)
    entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    man.write_text(json.dumps(m, indent=2))
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran"}


def test_edited_calibration_data_makes_a_calibrated_quantize_run_again(cli_run, tmp_path):
    """fp8 (static activation scales) is calibrated on calib.sources' bytes: the same file name with other text is
    other calibration, so the quantize runs again (only a calibration-free format may ignore it)."""
    text = (models.path("tiny-mixtral") / "config.json").read_text() * 40
    src = tmp_path / "calib.txt"
    src.write_text(text)
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       calib={"sources": [str(src)], "num_samples": 2, "seq_len": 64})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    src.write_text(text[::-1])
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran"}


def test_a_build_is_made_again_when_the_held_out_text_changed_with_checks_off(cli_run, tmp_path, monkeypatch):
    """The build's engine check reads the bundled held-out text; with the recipe's checks off no card figure
    follows that text, so only the build's own key can: another text, another build."""
    from moepress.calib import data as data_mod
    from moepress.checks import runner as check_runner

    text = tmp_path / "eval.txt"
    text.write_bytes(data_mod.DEFAULT_EVAL.read_bytes())
    monkeypatch.setattr(data_mod, "DEFAULT_EVAL", text)
    monkeypatch.setattr(check_runner, "DEFAULT_EVAL", text)
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8"}, check=None,
                       export={"formats": ["hf-modelopt"]}, build={"targets": ["h100-sxm"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert set(statuses(out).values()) == {"skipped"}
    text.write_text(text.read_text()[::-1])
    assert cli_run("run", rec, "-o", out).exit_code == 0
    st = statuses(out)
    assert {k for k, v in st.items() if v == "ran"} == {k for k in st if k.startswith("build:")} != set(), st


def test_a_check_recorded_in_the_source_models_manifest_does_not_remake_the_run(cli_run, tmp_path):
    """A run on a moepress output (here a pruned model): `moepress check SRC` records its verdict in SRC's
    moepress-manifest.json and changes no weight, config or tokenizer file; the run has nothing to do."""
    src = tmp_path / "pruned"
    assert cli_run("prune", "tiny-mixtral", "--keep", "6", "--num-samples", "2", "--seq-len", "32", "-o", src,
                   "--quiet").exit_code == 0
    rec = write_recipe(tmp_path / "r.yaml", model=str(src), prune="skip", check=None,
                       quantize={"format": "fp8-dynamic"})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    man = src / "moepress-manifest.json"
    before = man.read_bytes()
    cli_run("check", src, "-r", "tiny-mixtral", "--max-samples", "2", "--seq-len", "32", "--quiet")
    assert man.read_bytes() != before  # the verdict was recorded
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped"}

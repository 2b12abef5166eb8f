"""`moepress run`: the default run end to end; recipes: skip what is unchanged, re-run what changed, resume a
killed stage, publish."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

import forkserver
from moepress import models
from moepress.compress.arch import get_adapter
from moepress.compress.checkpoint.writer import JOURNAL
from moepress.errors import MoepressError
from moepress.pipeline.recipe import load_recipe
from moepress.pipeline.runner import source_digest

MODEL = "tiny-mixtral"  # 8 experts top-2: the quickest bundled model to prune


# Little calibration and evaluation data, for tests of which stages (re)run: what they assert does not depend on it
SMALL = {"calib": {"num_samples": 2, "seq_len": 64},
         "check": {"max_samples": 2, "seq_len": 64, "max_ppl_increase": "200%", "min_top1": 0.3, "max_kl": 2.0}}


def write_recipe(path: Path, **sections) -> Path:
    r = {"model": MODEL, "calib": {"num_samples": 8, "seq_len": 128},
         "prune": {"ratio": 0.25, "method": "reap"},
         "check": {"max_samples": 4, "seq_len": 128, "max_ppl_increase": "200%", "min_top1": 0.3, "max_kl": 2.0}}
    r.update(sections)
    r = {k: v for k, v in r.items() if v != "skip"}
    path.write_text(yaml.safe_dump(r))
    return path


def statuses(out: Path) -> dict:
    return {k: v["status"] for k, v in json.loads((out / "run.json").read_text())["stages"].items()}


def one_line_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moepress: error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_default_recipe_is_valid_and_shown(cli_run):
    r, src = load_recipe()
    assert src == "default recipe" and r["model"] == "tiny-qwen3-moe"
    assert r["prune"]["ratio"] == 0.25 and r["quantize"]["format"]
    res = cli_run("recipe", "show")
    assert res.exit_code == 0
    shown = yaml.safe_load(res.output)
    assert shown == r  # the effective recipe, defaults filled in
    # what the run takes for keys left unset (shown null or absent above): said, not left to guess
    assert "# not set, so: output: -o, else ./moepress-out; device: --device, else auto" in res.output


def test_recipe_show_names_the_prune_method_run_takes(cli_run, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", prune={"ratio": 0.25})
    res = cli_run("recipe", "show", rec)
    assert res.exit_code == 0 and "prune.method: auto" in res.output, res.output


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`moepress run` as a new user types it: the default recipe on the bundled model, every stage;
    run once, read by the tests below. Measured with one thread: 46 s wall (prune 16 s, quantize 4 s,
    the four checks 17 s); with torch's default 2 threads beside other jobs on the 2-core machine, 211 s."""
    out = tmp_path_factory.mktemp("default-run") / "run"
    p = forkserver.run([sys.executable, "-m", "moepress", "run", "-o", str(out), "--json"], text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads(p.stdout)


@pytest.mark.slow
def test_default_run_runs_every_stage_and_passes_its_checks(default_run):
    out, res = default_run
    recipe, _ = load_recipe()
    assert res["recipe"] == "default recipe" and res["model"] == str(models.path(recipe["model"]))
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe
    fmts, checked = recipe["export"]["formats"], ["quantized", "hf-modelopt", "compressed-tensors", "onnx"]
    builders = ["trtllm-pytorch", "tensorrt", "trtllm-engine"]
    stages = ["prune", "quantize", *[f"export:{f}" for f in fmts], *[f"check:{c}" for c in checked],
              *[f"build:{t}:{b}" for t in recipe["build"]["targets"] for b in builders]]
    assert [(k, v["status"]) for k, v in res["stages"].items()] == [(s, "ran") for s in stages]
    assert all(50 << 20 < v["memory"]["host_rss_peak_bytes"] <= res["memory"]["host_rss_peak_bytes"]
               for v in res["stages"].values())  # each stage's peak, within the run's
    # 16 experts, 25% pruned; FP8
    assert json.loads((out / "prune" / "config.json").read_text())["num_local_experts"] == 12
    assert json.loads((out / "quantize" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    # every check passed the recipe's gates (measured: ppl +2.9%, top-1 0.87, KL 0.041 for each candidate)
    assert res["failed_checks"] == [] and list(res["checks"]) == checked
    for name, c in res["checks"].items():
        assert c["passed"] is True and c["failed"] == [] and c["metrics"]["tokens"] == 16 * 256, name
    for name in ("quantize", *[f"export/{c}" for c in checked[1:]]):
        assert json.loads((out / name / "moepress-manifest.json").read_text())["accuracy"]["passed"] is True, name
    assert set(res["artifacts"]) == set(fmts) and all(Path(a).is_dir() for a in res["artifacts"].values())
    # each card states its own verdict; an export no CPU runtime checks says whose verdict it shows
    # (the trtllm-ckpt card said "Gates passed." with the quantized checkpoint's numbers, unlabelled)
    for fmt in fmts:
        card = (out / "export" / fmt / "README.md").read_text()
        borrowed = "This artifact was not checked" in card
        assert borrowed == (fmt not in checked) and "Gates passed (ppl_increase <= 0.05, " in card, fmt
        if borrowed:
            assert "The quantized checkpoint it was exported from:" in card
        assert "Measured through " in card, fmt  # which runtime's figures they are
        # the method auto chose, and the source's hashes in the export's own manifest
        chosen = res["stages"]["prune"]["result"]["chosen"]
        assert chosen in ("reroute", "reap", "frequency", "ean") and f"| pruning | auto method (chose {chosen})" in card
        kept = get_adapter(json.loads((out / "prune" / "config.json").read_text())).num_experts  # as written
        assert f"; {kept} kept per MoE layer |" in card, fmt
        pipeline = json.loads((out / "export" / fmt / "moepress-manifest.json").read_text())["pipeline"]
        assert pipeline["source_sha256"] == source_digest(models.path(recipe["model"])) and pipeline["recipe"] == recipe
    # builds are planned (dry run): a script and a record each
    for key, b in res["builds"].items():
        t, builder = key.split(":")
        d = out / "build" / f"{t}-{builder}"
        assert b["dry_run"] is True and b["builder"] == builder and (d / "build.sh").is_file(), key
        assert json.loads((d / "build.json").read_text())["commands"] == b["commands"]


@pytest.mark.slow
def test_default_run_rerun_is_a_noop_and_its_quantized_model_publishes(default_run, cli_run, tmp_path):
    out, _ = default_run
    r = cli_run("run", "-o", out)
    assert r.exit_code == 0 and "nothing to do" in r.output, r.output
    assert set(statuses(out).values()) == {"skipped"}
    r = cli_run("publish", out / "quantize", "--to", tmp_path / "pub")
    assert r.exit_code == 0, r.output
    assert _tree_digest(tmp_path / "pub") == _tree_digest(out / "quantize")


def test_a_card_that_does_not_state_its_manifests_check_is_not_published(default_run, cli_run, tmp_path):
    """The card edited with its manifest hash updated (nothing seals the card), or the artifact checked again
    after the card was written: publish put out figures nothing had measured. A copy of the run's export."""
    import shutil

    from moepress.manifest import sha256_file

    art = shutil.copytree(default_run[0] / "export" / "hf-modelopt", tmp_path / "art")
    assert cli_run("publish", art, "--to", tmp_path / "pub").exit_code == 0
    card, mpath = art / "README.md", art / "moepress-manifest.json"
    text, manifest = card.read_text(), mpath.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| top1_agreement |"))
    card.write_text(text.replace(row, "| top1_agreement | 0.9999 |"))
    m = json.loads(manifest)
    m["files"]["README.md"] = {"sha256": sha256_file(card), "size": card.stat().st_size}
    mpath.write_text(json.dumps(m))
    one_line_error(cli_run("publish", art, "--to", tmp_path / "pub2"), "README.md: the card does not state its "
                   "manifest's accuracy check (expected '| top1_agreement |")
    card.write_text(text)
    mpath.write_text(manifest)
    assert cli_run("check", art, "--reference", "tiny-qwen3-moe", "--seq-len", "32", "--max-samples", "4",
                   "--quiet", "--max-ppl-increase", "none", "--max-kl", "none", "--min-top1", "none").exit_code == 0
    one_line_error(cli_run("publish", art, "--to", tmp_path / "pub3"), "README.md: the card does not state")


def test_rerun_is_a_noop_and_a_change_reruns_only_downstream(cli_run, tmp_path):
    out = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", **SMALL)
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0, r.output
    first = statuses(out)
    assert first == {"prune": "ran", "check:pruned": "ran"}
    pruned = (out / "prune" / "model.safetensors.index.json").read_bytes()

    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert set(statuses(out).values()) == {"skipped"}

    # a check gate changes: only the check re-runs
    looser = {**SMALL["check"], "max_ppl_increase": "300%"}
    write_recipe(rec, calib=SMALL["calib"], check=looser)
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 0
    assert statuses(out) == {"prune": "skipped", "check:pruned": "ran"}

    # the prune ratio changes: prune and everything downstream re-run
    write_recipe(rec, prune={"keep": 4, "method": "reap"}, calib=SMALL["calib"], check=looser)
    r = cli_run("run", rec, "-o", out)
    assert statuses(out) == {"prune": "ran", "check:pruned": "ran"}
    assert json.loads((out / "prune" / "config.json").read_text())["num_local_experts"] == 4
    assert (out / "prune" / "model.safetensors.index.json").read_bytes() != pruned

    # --from forces a stage and what follows it
    r = cli_run("run", rec, "-o", out, "--from", "check")
    assert statuses(out) == {"prune": "skipped", "check:pruned": "ran"}


def test_a_moved_run_directory_runs_its_stages_where_it_now_is(cli_run, tmp_path):
    """A run directory moved (or copied) skipped every stage and kept results naming the old one: build.sh built from
    the old path's trtllm-ckpt, run.json listed the old outputs. Its stages run again where they are."""
    import shutil

    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       export={"formats": ["hf-modelopt"]}, build={"targets": ["h100"]})
    old, new = tmp_path / "old", tmp_path / "new"
    assert cli_run("run", rec, "-o", old).exit_code == 0
    shutil.move(old, new)
    r = cli_run("run", rec, "-o", new, "--json")
    assert r.exit_code == 0, r.output
    assert set(statuses(new).values()) == {"ran"}, statuses(new)
    scripts = [p.read_text() for p in (new / "build").glob("*/build.sh")]
    assert scripts and all(str(old) not in t and str(new) in t for t in scripts)
    assert str(old) not in (new / "run.json").read_text()


def test_failed_gate_exits_1_and_names_the_artifact(cli_run, tmp_path):
    rec = write_recipe(tmp_path / "r.yaml", check={"max_samples": 4, "seq_len": 128, "max_ppl_increase": "0.1%"})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    assert r.exit_code == 1
    assert "accuracy check failed for pruned" in r.output


def test_publish_verifies_hashes_and_refuses_tampered_or_failed(cli_run, tmp_path):
    out = tmp_path / "run"
    assert cli_run("run", write_recipe(tmp_path / "r.yaml"), "-o", out).exit_code == 0
    art = out / "prune"
    assert json.loads((art / "moepress-manifest.json").read_text())["accuracy"]["passed"] is True
    r = cli_run("publish", art, "--to", tmp_path / "pub")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pub" / "config.json").read_bytes() == (art / "config.json").read_bytes()
    # the destination must be new or empty
    one_line_error(cli_run("publish", art, "--to", tmp_path / "pub"), "not empty")

    # tampered: one byte of a shard changed after the manifest was written
    shard = sorted(art.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(cli_run("publish", art, "--to", tmp_path / "pub2"), shard.name, "sha256 differs")
    assert not (tmp_path / "pub2").exists()
    # an unlisted file is refused too
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (art / "extra.bin").write_bytes(b"x")
    one_line_error(cli_run("publish", art, "--to", tmp_path / "pub3"), "extra.bin", "not listed")
    (art / "extra.bin").unlink()
    assert cli_run("publish", art, "--to", tmp_path / "pub3").exit_code == 0

    # a failed check is refused unless --force
    rec = write_recipe(tmp_path / "r2.yaml", check={"max_samples": 4, "seq_len": 128, "max_ppl_increase": "0.1%"})
    assert cli_run("run", rec, "-o", tmp_path / "run2").exit_code == 1
    one_line_error(cli_run("publish", tmp_path / "run2" / "prune", "--to", tmp_path / "pub4"),
                   "accuracy check failed", "ppl_increase")
    assert cli_run("publish", tmp_path / "run2" / "prune", "--to", tmp_path / "pub4", "--force").exit_code == 0


@pytest.mark.parametrize("text,needles", [
    ("model: tiny-mixtral\nprun: {ratio: 0.25}\n", ["unknown key 'prun'"]),
    ("model: tiny-mixtral\nprune: {ratio: 0.25, methd: reap}\n", ["prune.methd", "unknown key"]),
    ("model: tiny-mixtral\ncalib: {num_samples: many}\n", ["calib.num_samples", "expected int"]),
    ("model: tiny-mixtral\nprune: {ratio: 0.25, keep: 4}\n", ["exactly one of ratio and keep"]),
    ("model: tiny-mixtral\ncheck: {max_kll: 1}\n", ["check", "unknown key 'max_kll'"]),
    ("model: [1, 2\n", ["not valid YAML"]),
    ("prune: {ratio: 0.25}\n", ["'model'"]),
    ("model: no-such-model\n", ["no-such-model", "no such checkpoint"]),
])
def test_bad_recipes_are_one_line(cli_run, tmp_path, text, needles):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    one_line_error(cli_run("run", p, "-o", tmp_path / "out"), *needles)


def test_missing_recipe_file(cli_run, tmp_path):
    one_line_error(cli_run("run", tmp_path / "nope.yaml"), "nope.yaml", "no such recipe")


def _tree_digest(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != "moepress-manifest.json"}


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Two `moepress run`s killed (SIGKILL) mid-stage, each a process of its own (helpers.killed_runs: forked from
    tests/forkserver.py's server, no interpreter start-up each): {"quantize" | "export": (recipe, out, exit code,
    log)}. quantize: int4-awq, killed right after it finished layer 1, its second layer; export: onnx of the
    bundled model, killed after its second step."""
    from helpers import killed_runs

    d = tmp_path_factory.mktemp("killed-runs")
    runs = {"quantize": (write_recipe(d / "q.yaml", prune="skip", check=None, quantize={"format": "int4-awq"}),
                         "quantize:2"),
            "export": (write_recipe(d / "e.yaml", prune="skip", quantize="skip", check=None,
                                    export={"formats": ["onnx"]}), "export onnx:2")}
    jobs = [{"args": ["run", str(rec), "--json", "-o", str(d / f"run-{k}")], "kill": kill, "log": str(d / f"{k}.log")}
            for k, (rec, kill) in runs.items()]
    codes = killed_runs(jobs)
    return {k: (rec, d / f"run-{k}", code, (d / f"{k}.log").read_text())
            for (k, (rec, _)), code in zip(runs.items(), codes, strict=True)}


@pytest.mark.slow
def test_killed_quantize_resumes_at_its_layer_and_is_byte_identical(cli_run, tmp_path, killed_runs):
    """Only the killed run is a process of its own (kill -9, the killed_runs fixture); the uninterrupted reference and
    the resuming run are in-process runs with the same one thread (conftest; the killed process gets
    OMP_NUM_THREADS=1), so the resumed output holds layers of two processes and must still equal the reference
    byte for byte."""
    rec, out, code, log = killed_runs["quantize"]
    # uninterrupted reference run
    ref = cli_run("run", rec, "--json", "-o", tmp_path / "ref")
    assert ref.exit_code == 0, ref.output[-2000:]
    layers = json.loads((models.path(MODEL) / "config.json").read_text())["num_hidden_layers"]
    # killed (SIGKILL) right after the quantize stage finished layer 1, its second layer
    assert code == -9, (code, log[-2000:])
    partial = out / "quantize.partial"
    assert not (out / "quantize").exists() and partial.is_dir()
    # what the killed run left: the embedding's shard and one shard per finished layer (0 and 1)
    journal = json.loads((partial / JOURNAL).read_text())["shards"]
    assert [sorted({n.split(".")[2] for n in names if n.startswith("model.layers.")}) for _, names, _ in journal] \
        == [[], ["0"], ["1"]]
    kept = {f: (partial / f).stat() for f, _, _ in journal}

    # re-run: it says it resumes at layer 2, counts layers 0-1 as done and reports only layers 2.. after them
    r = cli_run("run", rec, "--json", "-o", out)
    assert r.exit_code == 0, r.output[-2000:]
    assert statuses(out)["quantize"] == "resumed"
    events = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    infos = [e["message"] for e in events if e.get("event") == "info" and e["message"].startswith("quantize:")]
    assert infos == [f"quantize: resuming -> {out / 'quantize'}",
                     "quantize: resuming at layer 2 (2 finished layers kept from the killed run)"]
    steps = [e for e in events if e.get("event") == "progress" and e.get("stage") == "quantize"]
    assert [e["done"] for e in steps] == list(range(2, layers + 1))
    assert steps[0]["note"] == "layers 0-1 already written"
    assert [e["note"].split(":")[0] for e in steps[1:]] == [f"layer {i}" for i in range(2, layers)]
    # the killed run's shards are the output's first three, renamed, not written again (same inode and mtime)
    final = {f"shard-{i:05d}.safetensors": f"model-{i + 1:05d}-of-{layers + 2:05d}.safetensors" for i in range(3)}
    for f, st in kept.items():
        now = (out / "quantize" / final[f]).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size), f
    assert _tree_digest(out / "quantize") == _tree_digest(tmp_path / "ref" / "quantize")


def test_check_reruns_when_its_data_or_its_candidate_was_rewritten(cli_run, tmp_path):
    """A check's verdict is kept only for the same evaluation data and the same candidate files: an
    edited --data file, or a candidate its stage wrote again (which drops the manifest's accuracy
    section), ran no check and still reported the old "passed"."""
    data = tmp_path / "eval.txt"
    data.write_text((models.path(MODEL) / "config.json").read_text() * 40)
    out = tmp_path / "run"
    check = {"data": str(data), "max_samples": 2, "seq_len": 64, "max_ppl_increase": "200%"}
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=check)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran", "check:quantized": "ran"}
    data.write_text(data.read_text()[::-1])
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}
    next((out / "quantize").glob("model-*.safetensors")).unlink()
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "ran", "check:quantized": "ran"}
    assert "accuracy" in json.loads((out / "quantize" / "moepress-manifest.json").read_text())
    # another command wrote the stage's directory (complete, with its own manifest): not the recipe's output
    assert cli_run("quantize", MODEL, "--format", "fp8", "--num-samples", "2", "--seq-len", "32", "-o",
                   out / "quantize", "--force", "--quiet").exit_code == 0
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "ran", "check:quantized": "ran"}
    assert json.loads((out / "quantize" / "moepress_quant.json").read_text())["format"] == "fp8-dynamic"


def test_check_reruns_when_the_bundled_held_out_text_changed(cli_run, tmp_path, monkeypatch):
    """A check on the default data (the bundled calib/data/eval.txt: package data, which the code's digest does not
    cover) kept its old verdict after the text changed; its key now holds the text's sha256."""
    from moepress.calib import data as data_mod

    text = tmp_path / "eval.txt"
    text.write_bytes(data_mod.DEFAULT_EVAL.read_bytes())
    monkeypatch.setattr(data_mod, "DEFAULT_EVAL", text)
    out = tmp_path / "run"
    check = {"max_samples": 2, "seq_len": 64, "max_ppl_increase": "200%"}
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-dynamic"}, check=check)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "skipped"}
    text.write_text(text.read_text()[::-1])  # as another release's text would be
    cli_run("run", rec, "-o", out)
    assert statuses(out) == {"quantize": "skipped", "check:quantized": "ran"}


def test_run_into_a_directory_holding_its_recipe_or_other_files_is_refused(cli_run, tmp_path):
    """`moepress run recipe.yaml -o .` rewrote the user's recipe.yaml (comments gone, --model applied)."""
    d = tmp_path / "d"
    d.mkdir()
    rec = write_recipe(d / "recipe.yaml")
    text = rec.read_text() + "# mine\n"
    rec.write_text(text)
    one_line_error(cli_run("run", rec, "-o", d, "--model", "tiny-qwen3-moe"), "contains the input", "recipe.yaml")
    assert rec.read_text() == text
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    one_line_error(cli_run("run", write_recipe(tmp_path / "r.yaml"), "-o", tmp_path / "other"),
                   "no moepress run wrote")


@pytest.mark.parametrize("sections,needles", [
    ({"output": 5}, ["output: expected a directory path, got 5"]),
    ({"export": {"formats": [1]}}, ["export.formats: expected a list of str, got 1"]),
    ({"calib": {"sources": [1]}}, ["calib.sources: expected a list of str, got 1"]),
    ({"export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["bogus"]}},
     ["build.targets: unknown GPU target 'bogus'"]),
    ({"export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["h100"], "max_seq_len": -1}},
     ["build.max_seq_len: expected a positive number, got -1"]),
    ({"check": {"kind": "bogus"}}, ["check.kind: not a recipe key"]),
    ({1: "a", "foo": "b"}, ["unknown key"]),
    ({"check": {"data": 5}}, ["check: data 5: expected a file"]),
    ({"check": {"seed": "abc"}}, ["check: seed 'abc': expected a 64-bit integer"]),
    ({"calib": {"seed": 2**80}}, ["calib.seed: expected a 64-bit integer"]),  # torch's OverflowError
    # named by their CLI flags (--format int3) and accepted by `recipe show` before
    ({"quantize": {"format": "int3"}}, ["quantize.format int3: expected one of"]),
    ({"quantize": {"format": "fp8", "group_size": 100}}, ["quantize.group_size 100: expected 128"]),
    ({"check": {"seed": 2**80}}, ["check: seed 1208925819614629174706176: expected a 64-bit integer"]),
    # keys that would have no effect, refused as the CLI refuses --seed on text and --gen-tokens without --generate
    ({"check": {"seed": 3}}, ["check.seed 3: the bundled held-out text (no check.data) is read as consecutive"]),
    ({"check": {"seed": 3, "data": str(Path(__file__).parents[1] / "calib" / "data" / "eval.txt")}},
     ["check.seed 3: the text check.data is read as consecutive windows"]),
    ({"check": {"gen_tokens": 8}}, ["check.gen_tokens 8: only with check.generate N"]),
    ({"check": {"generate": 40}}, ["check.generate 40: at most check.max_samples (32)"]),
    # an empty output wrote ./moepress-out; an opset without onnx did nothing
    ({"output": ""}, ["output: expected a directory path, got ''"]),
    ({"export": {"formats": ["hf-modelopt"], "opset": 18}}, ["export.opset 18: only the onnx export reads it"]),
    # a gate written `off` (the CLI's word): YAML 1.1 reads it as false, and the line now says so
    ({"check": {"max_ppl_increase": False}}, ["max_ppl_increase False: expected", "YAML reads yes / no / on / off"]),
    # `recipe show` passed an unknown export format, which run's preflight refuses
    ({"export": {"formats": ["gguf"]}}, ["export.formats gguf: expected one of hf-modelopt"]),
    ({"check": {"trust_remote_code": "no"}}, ["check: trust_remote_code 'no': expected true or false"]),
    ({"check": {"max_kl": [1]}}, ["check: max_kl [1]"]),
    # a bool is no number, 0 GPUs no count, a prune needs its amount, a quantize its format; each by its key
    ({"calib": {"num_samples": True}}, ["calib.num_samples: expected int, got True"]),
    ({"export": {"formats": ["hf-modelopt"]}, "build": {"targets": ["h100"], "gpus": 0}},
     ["build.gpus: expected a positive number, got 0"]),
    ({"prune": {"method": "reap"}}, ["prune: give exactly one of ratio and keep"]),
    ({"quantize": {"group_size": 64}}, ["quantize.format: required (or rules)"]),
    ({"quantize": {"rules": {"mlp.experts.*": "int9"}}}, ["quantize.rules mlp.experts.*=int9: expected one of"]),
    ({"quantize": {"format": "fp8", "awq_fold": True}}, ["quantize.awq_fold: expected an AWQ format"]),
    ({"model": 5}, ["'model' must name a checkpoint directory"]),
])
def test_recipe_values_of_the_wrong_type_are_one_line(cli_run, tmp_path, sections, needles):
    """Were tracebacks (Path(5), Path / int, int.strip, sorting int and str keys), a build refusal
    recorded as a finished stage with exit 0, or a key silently ignored (check.kind)."""
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": MODEL, **sections}))
    one_line_error(cli_run("recipe", "show", rec), str(rec), *needles)


def test_cards_state_what_each_artifact_carries_and_its_consumers_misload(cli_run, tmp_path):
    """NVFP4 with an FP8 KV cache, exported to compressed-tensors and hf-modelopt. Every card said "KV cache
    fp8" (compressed-tensors carries no KV scales), the compressed-tensors card told to load it with
    transformers (5.24 loads its experts wrongly, export.json misloaded_by), and the run exited 2 at its
    check instead of labelling the card with the quantized checkpoint's verdict."""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "nvfp4", "kv_cache": "fp8"},
                       export={"formats": ["compressed-tensors", "hf-modelopt"]})
    out = tmp_path / "run"
    r = cli_run("run", rec, "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert statuses(out) == {"quantize": "ran", "export:compressed-tensors": "ran", "export:hf-modelopt": "ran",
                             "check:quantized": "ran", "check:hf-modelopt": "ran"}
    ct, mo = ((out / "export" / f / "README.md").read_text() for f in ("compressed-tensors", "hf-modelopt"))
    cfg = json.loads((out / "export" / "compressed-tensors" / "config.json").read_text())
    assert cfg["quantization_config"].get("kv_cache_scheme") is None
    assert "| KV cache | not carried by this format (asked: fp8)" in ct and "| KV cache | FP8, calibrated" in mo
    assert "from_pretrained" not in ct and "loads its NVFP4 routed experts without weight_global_scale" in ct
    assert "This artifact was not checked (transformers " in ct and "## Consumer notes" in ct
    assert "from_pretrained" not in mo and "This artifact was not checked" not in mo
    # a kill between the card and its manifest entry: the rerun mends the entry (publish refused it for good)
    man = out / "export" / "hf-modelopt" / "moepress-manifest.json"
    m = json.loads(man.read_text())
    del m["files"]["README.md"]
    man.write_text(json.dumps(m))
    assert cli_run("run", rec, "-o", out, "--quiet").exit_code == 0
    listed = json.loads(man.read_text())["files"]["README.md"]["sha256"]
    assert listed == hashlib.sha256((out / "export" / "hf-modelopt" / "README.md").read_bytes()).hexdigest()


def test_an_export_the_family_has_no_writer_for_is_refused_before_any_stage(cli_run, tmp_path):
    """trtllm-ckpt writes Mixtral and Qwen3-MoE only: a DeepSeek recipe ran prune and quantize first."""
    rec = write_recipe(tmp_path / "r.yaml", model="tiny-deepseek-v3", export={"formats": ["trtllm-ckpt"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: export.formats trtllm-ckpt", "deepseek_v3")
    assert not (tmp_path / "run" / "prune").exists()


@pytest.mark.parametrize("fmt,needle", [("fp8-block", "weight_scale_inv"), ("int4-gptq", "WInt4AFP8")])
def test_hf_modelopt_of_experts_it_refuses_is_refused_before_any_stage(cli_run, tmp_path, fmt, needle):
    """hf-modelopt refuses block-FP8 and INT4 weight-only routed experts at export: a recipe quantizing to
    them and listing hf-modelopt ran prune and quantize first (hours on Kimi K2), then stopped there."""
    rec = write_recipe(tmp_path / "r.yaml", model="tiny-qwen3-moe", quantize={"format": fmt},
                       export={"formats": ["hf-modelopt"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: export.formats hf-modelopt: quantize.format {fmt}", needle)
    assert not (tmp_path / "run" / "prune").exists() and not (tmp_path / "run" / "quantize").exists()


@pytest.mark.parametrize("quantize,exports", [
    ({"format": "fp8-block"}, ["hf-fp8-block", "compressed-tensors"]),  # the experts' form, where it loads
    ({"format": "fp8-block", "rules": {"mlp.experts.*": "fp8"}}, ["hf-modelopt"]),  # the experts' rule decides
    ({"format": "fp8-block", "rules": {"mlp.experts.0.*": "fp8"}}, ["hf-modelopt"]),  # experts two ways: the export
    ({"format": "fp8"}, ["hf-modelopt"]),
])
def test_recipes_hf_modelopt_takes_or_does_not_list_are_not_refused_early(quantize, exports):
    """The early refusal is for hf-modelopt after a quantize that gives every routed expert a format it refuses for
    them, by quantize.format or by a rule; nothing else."""
    from moepress.compress.checkpoint import CheckpointReader
    from moepress.pipeline.preflight import refuse_modelopt_experts
    from moepress.pipeline.recipe import normalise

    reader = CheckpointReader(models.path("tiny-qwen3-moe"))  # its experts: mlp.experts.E.*
    adapter = get_adapter(reader.config, reader.names())

    def recipe(q):
        return normalise({"model": "tiny-qwen3-moe", "quantize": q, "export": {"formats": exports}, "check": None})
    refuse_modelopt_experts(recipe(quantize), adapter, exports)
    for q, given in [({"format": "fp8-block"}, "quantize.format fp8-block gives"),
                     ({"format": "fp8", "rules": {"mlp.experts.*": "fp8-block"}}, "quantize.rules give fp8-block to")]:
        with pytest.raises(MoepressError, match=f"recipe export.formats hf-modelopt: {given} the qwen3_moe routed"):
            refuse_modelopt_experts(recipe(q), adapter, ["hf-modelopt"])


@pytest.mark.parametrize("fmt,needle", [("int4-awq", "quantize.awq_fold: true"),
                                        ("w4a8-awq", "has no compressed-tensors form")])
def test_compressed_tensors_of_a_form_it_refuses_is_refused_before_any_stage(cli_run, tmp_path, fmt, needle):
    """compressed-tensors refuses unfolded AWQ scales and W4A8 at export: the run did prune and quantize first."""
    rec = write_recipe(tmp_path / "r.yaml", model="tiny-qwen3-moe", quantize={"format": fmt},
                       export={"formats": ["compressed-tensors"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: export.formats compressed-tensors: quantize.format {fmt}", needle)
    assert not (tmp_path / "run" / "prune").exists() and not (tmp_path / "run" / "quantize").exists()


@pytest.mark.parametrize("quantize,exports", [
    ({"format": "int4-awq", "awq_fold": True}, ["compressed-tensors"]),
    ({"format": "int4-gptq"}, ["compressed-tensors"]), ({"format": "fp8"}, ["compressed-tensors"]),
    ({"format": "int4-awq", "rules": {"self_attn.*": "fp8"}}, ["compressed-tensors"]),  # the export decides
    ({"format": "w4a8-awq"}, ["hf-modelopt"]),
])
def test_recipes_compressed_tensors_takes_or_does_not_list_are_not_refused_early(quantize, exports):
    from moepress.pipeline.preflight import refuse_ct_forms

    refuse_ct_forms({"quantize": quantize}, exports)


@pytest.mark.parametrize("quantize,exports", [
    ({"format": "fp8-block", "rules": {"*": "fp8"}}, ["onnx"]),  # the rules decide what the export reads
    ({"format": "int4-awq", "rules": {"*": "fp8"}}, ["trtllm-ckpt"]),
    ({"format": "fp8"}, ["onnx", "trtllm-ckpt", "compressed-tensors"]),
])
def test_recipes_an_exporter_writes_or_whose_rules_decide_are_not_refused_early(quantize, exports):
    """refuse_written_formats is for one quantize format alone (no rules) that the exporter does not write."""
    from moepress.exporters import exporters
    from moepress.pipeline.preflight import refuse_written_formats

    refuse_written_formats({"quantize": quantize}, exports, exporters())
    with pytest.raises(MoepressError, match="recipe export.formats onnx: quantize.format fp8-block"):
        refuse_written_formats({"quantize": {"format": "fp8-block"}}, ["onnx"], exporters())


def test_compressed_tensors_of_int4_experts_in_two_groups_is_refused_before_any_stage(cli_run, tmp_path):
    """tiny-deepseek-v3's experts are 128 wide in, 64 wide out: group_size 128 gives down_proj groups of 64, gate /
    up groups of 128, which the compressed-tensors export refuses ("quantized 2 ways"), after quantize."""
    from types import SimpleNamespace

    from moepress.pipeline.preflight import refuse_expert_schemes

    rec = write_recipe(tmp_path / "r.yaml", model="tiny-deepseek-v3", prune=None, quantize={"format": "int4-gptq"},
                       export={"formats": ["compressed-tensors"]})
    r = cli_run("run", rec, "-o", tmp_path / "run")
    one_line_error(r, f"{rec}: export.formats compressed-tensors: quantize.format int4-gptq with quantize.group_size "
                   "128", "gate_proj: group 128, up_proj: group 128, down_proj: group 64",
                   "expected quantize.group_size 64, quantize.format fp8")
    assert not (tmp_path / "run").exists()

    def experts(h, w):
        return SimpleNamespace(hidden_size=h, moe_intermediate_size=lambda: w, family="qwen3_moe",
                               experts_key=lambda: 1, expert_names=["gate_proj", "up_proj", "down_proj"])
    for q, (h, w) in [({"format": "int4-gptq", "group_size": 64}, (128, 64)), ({"format": "fp8"}, (128, 64)),
                      ({"format": "int4-awq", "awq_fold": True}, (256, 128)), ({"format": "nvfp4"}, (256, 128))]:
        refuse_expert_schemes({"quantize": q}, ["compressed-tensors", "hf-modelopt"], experts(h, w))  # not refused
    with pytest.raises(MoepressError, match=r"gate_proj, up_proj unquantized \(in_features 200 is over --group-size "
                                            r"128.*beside their quantized down_proj.*expected quantize.format fp8"):
        refuse_expert_schemes({"quantize": {"format": "int4-gptq"}}, ["compressed-tensors"], experts(200, 256))
    with pytest.raises(MoepressError, match=r"hidden 192 and expert width 192.*expected quantize.format fp8$"):
        refuse_expert_schemes({"quantize": {"format": "nvfp4"}}, ["hf-modelopt"], experts(192, 192))


def test_cards_say_when_no_gate_was_applied_or_checks_are_off(tmp_path):
    """A check with every gate off "passed" on the card (which `publish` refuses as showing nothing);
    a recipe with the check off gave the reason of a format no CPU runtime runs."""
    from moepress.cli.run import _human
    from moepress.pipeline.card import Accuracy, _accuracy

    for measured in ({"passed": True, "failed": [], "gates": [], "metrics": {"kl_mean": 0.01}},
                     {"passed": None, "failed": [], "gates": [], "metrics": {"kl_mean": 0.01}}):
        assert _accuracy(Accuracy(measured))[0].startswith("No gate applied")
    # the run's summary said "passed" for it (run.json's passed is the check's: null)
    summary = {"recipe": "r", "model": "m", "stages": {}, "builds": {}, "output": "o",
               "checks": {"quantized": {"passed": None, "failed": [], "metrics": {}}}}
    assert "measured (no gate applied)" in _human(summary)[1] and "passed" not in _human(summary)[1]
    assert _accuracy(Accuracy(None, None, "quantized", checking=False)) == ["Not checked: the recipe's check is off."]
    failed = {"passed": False, "failed": ["top1_agreement"], "gates": [{}], "metrics": {}}
    lines = _accuracy(Accuracy(None, failed, "pruned"))
    assert "The pruned checkpoint it was exported from:" in lines[0] and "Gates FAILED: top1_agreement." in lines


def test_a_second_run_into_the_same_output_is_refused(cli_run, tmp_path):
    """Two `moepress run`s into one -o ran every stage in turns and both exited 0: one's check could read an
    export the other then replaced and seal its verdict onto the other's files. The run lock refuses the second."""
    from moepress.outputs import OutputLock

    out = tmp_path / "run"
    (out / ".state").mkdir(parents=True)
    held = OutputLock(out / ".state" / "run.lock", "held by the test")
    held.acquire()
    try:
        r = cli_run("run", write_recipe(tmp_path / "r.yaml"), "-o", out)
        one_line_error(r, "another moepress run is using it", "run.lock")
        assert not (out / "prune").exists() and not (out / "recipe.yaml").exists()
    finally:
        held.release()


def test_a_dangling_symlink_as_the_output_is_written_where_it_points(cli_run, tmp_path):
    """`-o LINK` to a directory not made yet: the stages create it, `moepress run` said "File exists"."""
    link, target = tmp_path / "link", tmp_path / "made" / "run"
    link.symlink_to(target)
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", quantize={"format": "fp8-block"},
                       export={"formats": ["hf-fp8-block"]})
    r = cli_run("run", rec, "-o", link)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and (target / "run.json").is_file() and (target / "export" / "hf-fp8-block").is_dir()


def test_a_new_tokenizer_file_or_a_removed_report_or_plan_file_reruns_its_stage(cli_run, tmp_path):
    """The source's digest hashed only some suffixes while the stages copy every tokenizer* / vocab* file: a
    new or edited tokenizer.model.v3 (Mistral's repos ship one) skipped every stage and the artifacts kept the
    old one. A check or build directory missing a file its manifest lists counted as done."""
    import shutil

    m = Path(shutil.copytree(models.path(MODEL), tmp_path / "m"))
    out = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", model=str(m), prune="skip", quantize={"format": "fp8"},
                       export={"formats": ["onnx"]}, build={"targets": ["h100-sxm"]}, **SMALL)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    (m / "tokenizer.model.v3").write_text("ONE")
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out)["quantize"] == "ran" and (out / "quantize" / "tokenizer.model.v3").read_text() == "ONE"
    (out / "check" / "onnx" / "report.md").unlink()
    (out / "build" / "h100-sxm-tensorrt" / "plan.json").unlink()
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "skipped", "export:onnx": "skipped", "check:quantized": "skipped",
                             "check:onnx": "ran", "build:h100-sxm:tensorrt": "ran"}
    assert (out / "check" / "onnx" / "report.md").is_file()
    assert (out / "build" / "h100-sxm-tensorrt" / "plan.json").is_file()


def test_a_killed_export_reruns_and_says_ran_not_resumed(cli_run, killed_runs):
    """Only quantize resumes its partial; run.json said "resumed" for an export that started over."""
    rec, out, code, log = killed_runs["export"]
    assert code == -9, (code, log[-2000:])
    r = cli_run("run", rec, "--json", "-o", out)
    assert r.exit_code == 0, r.output
    assert statuses(out) == {"export:onnx": "ran"}
    assert "export:onnx: running" in r.stderr and "resuming" not in r.stderr


@pytest.mark.parametrize("change", ["version", "code"])
def test_other_moepress_code_remakes_the_run(cli_run, tmp_path, monkeypatch, change):
    """No stage key held the moepress version: after an upgrade that fixes an exporter, every stage was skipped
    and the run kept the old version's artifacts. The version also stays the same between releases and under an
    editable install, so the keys name the code by its digest too (moepress/codeid.py; audit77 F1): here the one
    or the other changes, as an upgrade or an edit would."""
    import moepress
    from moepress import codeid

    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       export={"formats": ["compressed-tensors"]})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert set(statuses(out).values()) == {"skipped"}
    if change == "version":
        monkeypatch.setattr(moepress, "__version__", moepress.__version__ + ".post1")
    else:
        monkeypatch.setattr(codeid, "package_digest", lambda *p: "0" * 16)
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out) == {"quantize": "ran", "export:compressed-tensors": "ran"}


def test_a_refused_build_is_recorded_once_and_skipped_on_rerun(cli_run, tmp_path):
    """A build its plan refuses (the onnx engine on the 2 GPUs build.gpus gives the hf-modelopt build beside it):
    refused (refused.txt, no manifest) and recorded; a rerun skips it like any unchanged stage (the completeness test
    reads refused.txt, not a manifest). (A plan refused for every export of the recipe, or a target that cannot run
    the quantize format, is refused before any stage: test_preflight_builds.py, test_run_preflight.py.)"""
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       export={"formats": ["hf-modelopt", "onnx"]}, build={"targets": ["h100-sxm"], "gpus": 2})
    out = tmp_path / "run"
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert "the ONNX export runs on one GPU" in (out / "build" / "h100-sxm-tensorrt" / "refused.txt").read_text()
    assert (out / "build" / "h100-sxm-trtllm-pytorch" / "plan.json").is_file()
    assert cli_run("run", rec, "-o", out).exit_code == 0
    assert statuses(out)["build:h100-sxm:tensorrt"] == "skipped"
    # build.gpus 1 then: the engine is built where its refusal was recorded (the runner's own record, replaced)
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       export={"formats": ["hf-modelopt", "onnx"]}, build={"targets": ["h100-sxm"], "gpus": 1})
    assert cli_run("run", rec, "-o", out).exit_code == 0
    built = out / "build" / "h100-sxm-tensorrt"
    assert statuses(out)["build:h100-sxm:tensorrt"] == "ran" and not (built / "refused.txt").exists()
    assert (built / "plan.json").is_file() and (built / "moepress-manifest.json").is_file()


def test_a_folder_the_run_never_recorded_at_a_build_path_is_not_replaced(cli_run, tmp_path):
    """A user's folder where a build's output goes (build/<target>-<builder>), with no record of the run's: refused
    in one line, kept; the runner replaced it with its refusal record (or the build) unasked."""
    out = tmp_path / "run"
    first = write_recipe(tmp_path / "a.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                         export={"formats": ["hf-modelopt"]}, build={"targets": ["h100-sxm"], "gpus": 1})
    assert cli_run("run", first, "-o", out).exit_code == 0  # an earlier run's directory, with no tensorrt build
    mine = out / "build" / "h100-sxm-tensorrt"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    rec = write_recipe(tmp_path / "r.yaml", prune="skip", check=None, quantize={"format": "fp8"},
                       export={"formats": ["hf-modelopt", "onnx"]}, build={"targets": ["h100-sxm"], "gpus": 2})
    r = cli_run("run", rec, "-o", out)
    assert r.exit_code == 2 and "a folder this run directory's records do not name" in r.stderr, r.output[-2000:]
    assert (mine / "notes.txt").read_text() == "precious" and not (mine / "refused.txt").exists()


def test_a_run_reusing_a_directory_removes_the_earlier_recipes_outputs_it_does_not_produce(cli_run, tmp_path):
    """Run A (prune, fp8, export hf-modelopt + onnx, checked, built for H100), then run B into the same directory
    (quantize fp8-block, export hf-fp8-block, no prune): A's prune, its exports, their checks and the onnx build
    stayed, complete and manifest-valid, naming a D/quantize that B had replaced. The onnx build is removed when B
    ends (a build's name is decided as it runs); a file of the user's in export/ is not the run's to remove (an
    export/ that links elsewhere is refused: tests/test_hostile_inputs.py)."""
    out = tmp_path / "run"
    build = {"targets": ["h100"]}
    a = write_recipe(tmp_path / "a.yaml", calib=SMALL["calib"], check=SMALL["check"], quantize={"format": "fp8"},
                     export={"formats": ["hf-modelopt", "onnx"]}, build=build)
    assert cli_run("run", a, "-o", out, "--quiet").exit_code == 0
    assert {p.name for p in (out / "export").iterdir()} == {"hf-modelopt", "onnx"}
    assert {p.name for p in (out / "check").iterdir()} == {"quantized", "hf-modelopt", "onnx"}
    assert {p.name for p in (out / "build").iterdir()} == {"h100-trtllm-pytorch", "h100-tensorrt"}
    (out / "export" / "NOTES.md").write_text("the user's")
    b = write_recipe(tmp_path / "b.yaml", calib=SMALL["calib"], check=SMALL["check"], prune="skip",
                     quantize={"format": "fp8-block"}, export={"formats": ["hf-fp8-block"]}, build=build)
    r = cli_run("run", b, "-o", out)
    assert r.exit_code == 0, r.output
    for gone in ("prune", "export/hf-modelopt", "export/onnx", "check/hf-modelopt", "build/h100-tensorrt"):
        assert f"run: removed {gone}, an earlier run's output this recipe does not produce" in r.output, gone
    summary = json.loads((out / "run.json").read_text())
    assert {p.name for p in out.iterdir()} == {".state", "recipe.yaml", "run.json", "quantize", "export", "check",
                                               "build"}
    assert {p.name for p in (out / "export").iterdir()} == {"hf-fp8-block", "NOTES.md"}
    assert list(summary["artifacts"]) == ["hf-fp8-block"]
    assert {p.name for p in (out / "check").iterdir()} == {"quantized", "hf-fp8-block"}
    assert [p.name for p in (out / "build").iterdir()] == ["h100-trtllm-pytorch"]
    states = {p.stem.replace("__", ":") for p in (out / ".state").glob("*.json")}
    assert states == set(summary["stages"])


def test_a_run_into_an_earlier_run_of_another_model_is_refused_and_leaves_it(cli_run, tmp_path):
    """Another model's recipe (or the default recipe, a mistyped command) into an earlier run's directory removed
    that run's outputs, hours of quantize on a real model, without a --force: refused, the earlier run untouched."""
    out = tmp_path / "run"
    a = write_recipe(tmp_path / "a.yaml", calib=SMALL["calib"], check="skip", prune="skip",
                     quantize={"format": "fp8"})
    assert cli_run("run", a, "-o", out, "--quiet").exit_code == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    b = write_recipe(tmp_path / "b.yaml", model="tiny-qwen3-moe", calib=SMALL["calib"], check="skip", prune="skip",
                     quantize={"format": "fp8"})
    r = cli_run("run", b, "-o", out, "--quiet")
    one_line_error(r, f"-o {out}: holds an earlier run of {models.path(MODEL).resolve()}", "not of "
                   f"{models.path('tiny-qwen3-moe').resolve()}; expected a new or empty directory, or an earlier "
                   "run of the same model")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == before
    assert cli_run("run", a, "-o", out, "--quiet").exit_code == 0  # the same model: reused
    moved = shutil.copytree(models.path(MODEL), tmp_path / "moved")  # the same files elsewhere: the same model
    r = cli_run("run", a, "-o", out, "--quiet", "--model", moved)
    assert r.exit_code == 0, r.output
    (out / ".state" / "model").unlink()  # a run directory made before .state/model: its run.json names the model
    one_line_error(cli_run("run", b, "-o", out, "--quiet"), f"holds an earlier run of {moved.resolve()}")


def test_a_check_seed_with_drawn_data_and_gen_tokens_with_generate_are_taken(tmp_path):
    """The keys refused above are taken where they have an effect: a seed drawing JSONL samples, gen_tokens with
    generate."""
    from moepress.checks.config import CheckConfig

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n')
    cfg = CheckConfig.from_dict({"seed": 3, "data": str(data), "generate": 2, "gen_tokens": 8})
    assert (cfg.seed, cfg.gen_tokens) == (3, 8)


def test_recipe_refusals_name_only_what_the_recipe_can_do(tmp_path, monkeypatch):
    """calib: [] is not told to write null (calib: null is refused); an unknown check key's list leaves out kind
    (refused as no recipe key); check.data ~/x is the home directory's, as model, output and calib.sources are."""
    from moepress.errors import MoepressError
    from moepress.pipeline.recipe import normalise

    with pytest.raises(MoepressError) as e:
        normalise({"model": MODEL, "calib": []})
    assert str(e.value) == "recipe: calib: expected a mapping"
    with pytest.raises(MoepressError) as e:
        normalise({"model": MODEL, "check": {"Max_kl": 0.1}})
    assert "max_kl" in str(e.value) and "kind" not in str(e.value), str(e.value)
    home = tmp_path / "home"
    home.mkdir()
    (home / "t.txt").write_text("some held-out text\n")
    monkeypatch.setenv("HOME", str(home))
    got = normalise({"model": MODEL, "check": {"data": "~/t.txt"}})
    assert got["check"]["data"] == str(home / "t.txt")
    # the default opset beside no onnx export is taken: `recipe show` writes every default
    assert normalise({"model": MODEL, "export": {"formats": ["hf-modelopt"], "opset": 21}})["export"]["opset"] == 21


def test_a_bad_check_data_file_is_named_by_the_key_or_flag_that_gave_it(tmp_path, cli_run):
    """Calibration's refusal of a data file named --calib, which check has not: run's preflight said `check.calib`
    (no such key), `moepress check` said --calib. Now check.data and --data."""
    from moepress import models
    from moepress.errors import MoepressError
    from moepress.pipeline.preflight import preflight
    from moepress.pipeline.recipe import normalise

    bad = tmp_path / "data.xyz"
    bad.write_text("x")
    with pytest.raises(MoepressError) as e:
        preflight(normalise({"model": MODEL, "check": {"data": str(bad)}}, "r.yaml"), models.path(MODEL), "r.yaml")
    assert str(e.value).startswith(f"r.yaml: check.data {bad}: ") and "calib" not in str(e.value), str(e.value)
    cand = tmp_path / "cand"
    shutil.copytree(models.path(MODEL), cand)  # not the reference itself, which check refuses first
    r = cli_run("check", cand, "-r", MODEL, "--data", bad)
    one_line_error(r, f"--data {bad}: ", "unknown source type")
    assert "--calib" not in r.output


@pytest.mark.parametrize("model,needle", [("empty", "not a checkpoint directory (no config.json)"),
                                          ("nonexistent-model", "no such checkpoint directory")])
def test_a_recipe_model_that_is_no_checkpoint_is_named_by_its_key(cli_run, tmp_path, model, needle):
    """A folder without config.json was refused by the first stage under its own section (`quantize: ...`); a name
    that is nothing, without the recipe file."""
    (tmp_path / "empty").mkdir()
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump({"model": str(tmp_path / model) if model == "empty" else model, "check": None,
                                   "quantize": {"format": "fp8"}}))
    one_line_error(cli_run("run", rec, "-o", tmp_path / "out"), f"{rec}: model: ", needle)

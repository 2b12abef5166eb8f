"""Inputs made by someone else to make moepress write, delete or publish outside where it should (audit82): a
checkpoint's files linked to private files outside it, a downloaded run directory whose stage folders, state files
or temporary names are links out of it. Each is refused in one line or left untouched; what it points to never
changes and never travels in an output."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import assert_one_line_error
from moepress import models
from moepress.atomic import replace_file

SECRET = "HF_TOKEN=hf_secret_value\n"


def _model(tmp_path):
    return shutil.copytree(models.path("tiny-qwen3-moe"), tmp_path / "m")


@pytest.mark.parametrize("name", ["chat_template.jinja", "modeling_evil.py", "quant_report.json", "tokenizer.json"])
def test_a_checkpoint_file_linked_outside_the_checkpoint_is_refused_and_never_copied(cli_run, tmp_path, name):
    m = _model(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    (m / name).unlink(missing_ok=True)
    os.symlink(secret, m / name)
    out = tmp_path / "q"
    r = cli_run("quantize", m, "--format", "fp8-dynamic", "-o", out, "--quiet")
    assert_one_line_error(r, name, "outside the model directory")
    assert not out.exists() and not (tmp_path / "q.partial").exists()


def test_a_checkpoint_file_linked_inside_the_checkpoint_is_taken(cli_run, tmp_path):
    m = _model(tmp_path)
    (m / "sub").mkdir()
    (m / "tokenizer.json").rename(m / "sub" / "tokenizer.json")
    os.symlink("sub/tokenizer.json", m / "tokenizer.json")
    r = cli_run("quantize", m, "--format", "fp8-dynamic", "-o", tmp_path / "q", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == (m / "sub" / "tokenizer.json").read_bytes()


def _run_dir(tmp_path):
    """An earlier run's directory (as one would download it) and a recipe for it."""
    rec = tmp_path / "r.yaml"
    rec.write_text("model: tiny-qwen3-moe\nquantize: {format: fp8-dynamic}\ncheck: null\n")
    out = tmp_path / "run"
    (out / ".state").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("a user's file\n")
    return rec, out, victim


@pytest.mark.parametrize("link", ["export", "quantize", "check", "recipe.yaml.tmp", ".state/quantize.json.tmp"])
def test_a_run_directory_holding_a_link_where_the_run_writes_is_refused(cli_run, tmp_path, link):
    rec, out, victim = _run_dir(tmp_path)
    target = victim if "." not in link.lstrip(".") else victim / "thesis.txt"
    os.symlink(target, out / link)
    (out / ".state" / "export__thesis.json").write_text(json.dumps({"key": "x", "done": True}))
    assert_one_line_error(cli_run("run", rec, "-o", out), link.split("/")[-1], "symbolic link")
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.txt"]
    assert (victim / "thesis.txt").read_text() == "a user's file\n"


def test_a_state_file_naming_no_stage_removes_nothing(cli_run, tmp_path):
    """``.state/check__...json`` read as stage ``check:..`` named the run directory itself, which was removed."""
    rec, out, _ = _run_dir(tmp_path)
    (out / "notes").mkdir()
    (out / "notes" / "keep.txt").write_text("mine\n")
    (out / "check").mkdir()
    (out / ".state" / "check__...json").write_text("{}")
    r = cli_run("run", rec, "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "notes" / "keep.txt").read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_replaced_file_is_never_written_through_a_link_at_its_temporary_name(tmp_path, kind):
    victim = tmp_path / "victim"
    victim.write_text("a user's file\n")
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "moepress-manifest.json"
    (os.symlink if kind == "symlink" else os.link)(victim, path.with_name(path.name + ".tmp"))
    replace_file(path, "{}\n")
    assert path.read_text() == "{}\n" and not path.is_symlink()
    assert victim.read_text() == "a user's file\n"
    assert not path.with_name(path.name + ".tmp").exists()


def test_a_tokenizer_auto_map_beside_a_class_transformers_has_is_not_run(cli_run, tmp_path):
    """moepress asked for --trust-remote-code whenever tokenizer_config.json had an auto_map, and with it
    transformers runs the checkpoint's tokenizer code even where it has the named class itself."""
    m = _model(tmp_path)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    (m / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoTokenizer": [None, "tok_x.T"]}}))
    ran = tmp_path / "ran"
    (m / "tok_x.py").write_text(f"open({str(ran)!r}, 'w').close()\nfrom transformers import "
                                "PreTrainedTokenizerFast as T\n")
    r = cli_run("calib", "prepare", m, "--num-samples", 2, "--seq-len", 32, "-o", tmp_path / "t.pt", "--quiet")
    assert r.exit_code == 0, r.output
    assert not ran.exists()
    # nor with --trust-remote-code (given for the model's code, or in a recipe): transformers' class is loaded
    r = cli_run("calib", "prepare", m, "--num-samples", 2, "--seq-len", 32, "-o", tmp_path / "u.pt", "--quiet",
                "--trust-remote-code", "--seed", 1)  # another seed: tokenized again, not the first call's cache
    assert r.exit_code == 0, r.output
    assert not ran.exists()


@pytest.mark.parametrize("key, value", [("num_experts", 10**9), ("num_hidden_layers", 10**7)])
@pytest.mark.parametrize("command", ["inspect", "plan"])
def test_a_config_with_counts_past_any_model_is_refused_before_anything_is_built(cli_run, tmp_path, key, value,
                                                                                  command):
    """A config-only inspect or plan built each layer's modules for 10^9 experts or 10^7 layers until memory ran
    out (audit82 M1)."""
    d = tmp_path / "cfg"
    d.mkdir()
    cfg = json.loads((models.path("tiny-qwen3-moe") / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, key: value}))
    args = ("--target", "h100") if command == "plan" else ()
    assert_one_line_error(cli_run(command, d, *args), key, str(value), "expected")


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))


@pytest.mark.parametrize("text", [
    f"{BOMB}model: tiny-qwen3-moe\nquantize:\n  format: fp8\n  rules: {{x: *i}}\n",
    "model: tiny-qwen3-moe\ncheck: &c {data: [*c]}\nquantize: {format: fp8}\n",
    "model: tiny-qwen3-moe\nquantize: {format: fp8, rules: " + "[" * 5000 + "]" * 5000 + "}\n",
])
def test_a_recipe_that_expands_without_bound_is_refused_in_one_line(cli_run, tmp_path, text):
    """Ten aliases of ten aliases (10^9 values), an alias of its own parent, and 5000 nested lists: memory ran out
    or a RecursionError traceback (audit82 M2, L1)."""
    rec = tmp_path / "r.yaml"
    rec.write_text(text)
    line = assert_one_line_error(cli_run("run", rec, "-o", tmp_path / "out"), str(rec), "not a recipe")
    assert "expand" in line or "nested" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_json_nested_past_the_readers_depth_is_one_line(cli_run, tmp_path, name):
    m = _model(tmp_path)
    cfg = json.loads((m / name).read_text())
    (m / name).write_text(json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_one_line_error(cli_run("quantize", m, "--format", "fp8", "-o", tmp_path / "q"), name)


def test_a_tensor_dimension_past_int64_is_refused_in_one_line(cli_run, tmp_path):
    """[2^64, 2^64, 0] holds no bytes, so its size checked out; quantize then died in torch with an overflow
    traceback (audit82 L1)."""
    import struct

    m = _model(tmp_path)
    shard = sorted(m.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["model.extra.weight"] = {"dtype": "BF16", "shape": [2**64, 2**64, 0], "data_offsets": [end, end]}
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    shard.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = shard.name
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(cli_run("quantize", m, "--format", "fp8", "-o", tmp_path / "q"), shard.name)


def test_a_pickled_candidate_holding_more_than_tensors_is_refused_in_one_line(cli_run, tmp_path):
    """transformers loads pytorch_model.bin with weights_only=True, which refuses other objects; its
    UnpicklingError was a traceback (exit 1, read by CI as a failed check) suggesting weights_only=False."""
    import fractions

    import torch

    m = _model(tmp_path)
    for p in m.glob("*.safetensors*"):
        p.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": fractions.Fraction(1, 3)}, m / "pytorch_model.bin")
    r = cli_run("check", m, "--reference", "tiny-qwen3-moe", "--kind", "transformers", "--max-samples", 2,
                "--seq-len", 32)
    assert_one_line_error(r, str(m), "pickled", "expected safetensors")


@pytest.mark.parametrize("rel", ["../secret.txt", "/etc/hostname"])
def test_publish_never_reads_a_file_a_manifest_lists_outside_the_artifact(cli_run, tmp_path, rel, monkeypatch):
    """A manifest listing ``../secret.txt`` made publish hash it: a sha256 oracle for any file (audit82 L4)."""
    from moepress.manifest import read_manifest, write_manifest
    from moepress.pipeline import publish

    (tmp_path / "secret.txt").write_text(SECRET)
    a = tmp_path / "art"
    r = cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-dynamic", "-o", a, "--quiet")
    assert r.exit_code == 0, r.output
    m = read_manifest(a)
    m["files"][rel] = {"sha256": "0" * 64, "size": 1}
    write_manifest(a, m)
    hashed = []
    real = publish.sha256_file
    monkeypatch.setattr(publish, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    problems = publish.verify(a)
    assert any(rel in p and "outside the artifact" in p for p in problems), problems
    assert not [h for h in hashed if "secret" in h or "hostname" in h], hashed


def test_packed_tensors_the_config_does_not_declare_are_refused(cli_run, tmp_path):
    """Kimi's INT4 experts with quantization_config removed: moepress decoded them by their names and the check
    passed (error 0), while transformers left those experts randomly initialised (+114% perplexity; audit82 M3)."""
    m = shutil.copytree(models.path("tiny-kimi-k2-int4"), tmp_path / "k")
    cfg = json.loads((m / "config.json").read_text())
    del cfg["quantization_config"]
    (m / "config.json").write_text(json.dumps(cfg))
    r = cli_run("check", m, "--reference", "tiny-kimi-k2-int4", "--max-samples", 2, "--seq-len", 32)
    assert_one_line_error(r, "config.json", "weight_packed", "quant_method None", "'compressed-tensors'")


def test_a_shard_name_holding_a_nul_byte_is_one_line(cli_run, tmp_path):
    m = _model(tmp_path)
    index = json.loads((m / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name] = "model\u0000.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(cli_run("inspect", m), "model.safetensors.index.json", name, "expected a shard file name")


@pytest.fixture(scope="module")
def fp8_mixtral(tmp_path_factory):
    from moepress.compress.quantize import QuantConfig, quantize_checkpoint

    out = tmp_path_factory.mktemp("fp8") / "q"
    quantize_checkpoint(models.path("tiny-mixtral"), out, QuantConfig(format="fp8-dynamic"))
    return out


@pytest.mark.parametrize("key, value", [("rms_norm_eps", 1e-3), ("tie_word_embeddings", True),
                                        ("num_experts_per_tok", 1), ("hidden_act", "gelu")])
def test_a_candidate_whose_config_says_another_model_is_refused(cli_run, tmp_path, fp8_mixtral, key, value):
    """An rms_norm_eps x100 (perplexity -0.03%) or a flipped tie_word_embeddings (not read by the streamed
    check; a loader honouring it replaces lm_head with the embedding) passed every gate (audit84)."""
    c = shutil.copytree(fp8_mixtral, tmp_path / "c")
    cfg = json.loads((c / "config.json").read_text())
    assert cfg.get(key, "unset") != value
    (c / "config.json").write_text(json.dumps({**cfg, key: value}))
    r = cli_run("check", c, "--reference", "tiny-mixtral", "--max-samples", 2, "--seq-len", 32)
    assert_one_line_error(r, "config.json", key, repr(value), "the reference")


def test_a_candidate_with_the_references_config_is_checked(cli_run, fp8_mixtral):
    r = cli_run("check", fp8_mixtral, "--reference", "tiny-mixtral", "--max-samples", 2, "--seq-len", 32, "--quiet")
    assert r.exit_code == 0, r.output


def test_publish_refuses_a_link_in_the_artifact_and_force_copies_the_link_not_its_target(cli_run, tmp_path):
    """notes.txt -> a private file, listed with its sha256: publish verified it (a sha256 oracle) and --force copied
    the private bytes into the destination (review56)."""
    import hashlib

    from moepress.manifest import read_manifest, write_manifest

    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    a = tmp_path / "art"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-dynamic", "-o", a, "--quiet").exit_code == 0
    os.symlink(secret, a / "notes.txt")
    m = read_manifest(a)
    m["files"]["notes.txt"] = {"sha256": hashlib.sha256(SECRET.encode()).hexdigest(), "size": len(SECRET)}
    write_manifest(a, m)
    assert_one_line_error(cli_run("publish", a, "--to", tmp_path / "pub"), "notes.txt", "a link")
    r = cli_run("publish", a, "--to", tmp_path / "pub", "--force")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pub" / "notes.txt").is_symlink()
    assert not any(SECRET in p.read_text(errors="replace") for p in (tmp_path / "pub").rglob("*")
                   if p.is_file() and not p.is_symlink())


def test_a_shard_written_where_a_resumed_partial_holds_a_link_replaces_the_link(tmp_path):
    import torch

    from moepress.compress.checkpoint.safetensors_io import write_safetensors

    victim = tmp_path / "victim"
    victim.write_text("a user's file\n")
    shard = tmp_path / "model-00001.safetensors.tmp"
    os.symlink(victim, shard)
    write_safetensors(shard, {"w": torch.ones(4)})
    assert not shard.is_symlink() and victim.read_text() == "a user's file\n"


def test_a_users_own_link_beside_the_runs_files_is_not_refused(cli_run, tmp_path):
    rec, out, _ = _run_dir(tmp_path)
    os.symlink(rec, out / "my-recipe.yaml")
    os.symlink(rec, out / "run.sh")
    r = cli_run("run", rec, "-o", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert (out / "my-recipe.yaml").is_symlink() and (out / "run.sh").is_symlink()


def test_a_manifest_nested_past_the_readers_depth_is_one_line(cli_run, tmp_path):
    a = tmp_path / "art"
    assert cli_run("quantize", "tiny-qwen3-moe", "--format", "fp8-dynamic", "-o", a, "--quiet").exit_code == 0
    (a / "moepress-manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(cli_run("publish", a, "--to", tmp_path / "pub"), "moepress-manifest.json", "nested")


def test_a_resumed_partial_holding_links_at_the_names_it_writes_is_never_written_through(tmp_path):
    """A partial that came from elsewhere, resumed: its config.json and tokenizer.json were links outside."""
    from moepress.compress.checkpoint.writer import CheckpointWriter

    victim = tmp_path / "victim"
    victim.write_text("a user's file\n")
    m = _model(tmp_path)
    w = CheckpointWriter(tmp_path / "out")
    for name in ("config.json", "tokenizer.json"):
        os.symlink(victim, w.partial / name)
    w.write_json("config.json", {"a": 1})
    w.copy_aux_files(m)
    assert victim.read_text() == "a user's file\n"
    assert json.loads((w.partial / "config.json").read_text()) == {"a": 1}
    assert (w.partial / "tokenizer.json").read_bytes() == (m / "tokenizer.json").read_bytes()

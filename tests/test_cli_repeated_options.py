"""A single-valued option given twice with different values is bad input on every command: click kept the last
value silently, so a script's `--format fp8` collided with an appended `--format int4-awq` and quantized int4-awq.
The same value twice is taken. Options that take several values (`--rule`, `--calib`, `--option`) keep every
occurrence."""

import click
import pytest

from helpers import assert_one_line_error
from moepress.cli import cli


def _commands(group=cli, path=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _single_valued(cmd):
    """Every single-valued option the user can give (not --help) that can take two different values (a plain
    flag given twice is the same value twice)."""
    return [o for o in cmd.params if isinstance(o, click.Option) and not o.multiple and not o.count
            and o.expose_value and not (o.is_flag and not o.secondary_opts)]


CASES = [(path, o) for path, cmd in _commands() for o in _single_valued(cmd)]


def _twice(o):
    """The option given twice, and what the refusal must name: the option and both values."""
    if o.is_flag:
        return [o.opts[0], o.secondary_opts[0]], [o.opts[0], o.secondary_opts[0]]
    return [o.opts[-1], "first-value", f"{o.opts[0]}=second-value"], [max(o.opts, key=len), "first-value",
                                                                       "second-value"]


def test_every_command_is_walked():
    names = {" ".join(p) for p, _ in _commands()}
    assert {"prune", "quantize", "export", "build", "check", "run", "plan", "calib stats", "recipe show"} <= names
    assert len(CASES) > 30


@pytest.mark.parametrize("path,option", CASES, ids=[f"{' '.join(p)} {o.name}" for p, o in CASES])
def test_a_single_valued_option_given_twice_is_refused(cli_run, tmp_path, monkeypatch, path, option):
    monkeypatch.chdir(tmp_path)  # a command that failed to refuse would write here
    args, needles = _twice(option)
    line = assert_one_line_error(cli_run(*path, *args), f"moepress {' '.join(path)}:", "given twice", *needles)
    assert "(see moepress" in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,needles", [
    (["quantize", "tiny-mixtral", "--format", "fp8", "--format", "int4-awq", "-o", "out"],
     ["--format", "fp8", "int4-awq"]),
    (["prune", "tiny-mixtral", "--ratio", "0.25", "--ratio", "0.5", "-o", "out"], ["--ratio", "0.25", "0.5"]),
    (["export", "tiny-mixtral", "--format", "onnx", "-o", "out-a", "--output", "out-b"],
     ["--output", "out-a", "out-b"]),
    (["prune", "tiny-mixtral", "--ratio", "0.5", "--merge", "--no-merge", "-o", "out"], ["--merge", "--no-merge"]),
    (["check", "x", "-r", "tiny-mixtral", "--reference", "tiny-qwen3-moe"], ["--reference", "tiny-qwen3-moe"]),
])
def test_the_refusal_names_the_option_and_its_values_under_json_too(cli_run, tmp_path, monkeypatch, args, needles):
    import json

    monkeypatch.chdir(tmp_path)
    line = assert_one_line_error(cli_run(*args), *needles)
    r = cli_run(*args, "--json")
    assert r.exit_code == 2 and json.loads(r.stdout) == {"error": line.removeprefix("moepress: error: "), "exit": 2}
    assert not any(tmp_path.iterdir())


def test_several_valued_options_keep_every_occurrence_and_a_value_given_again_is_taken(cli_run, tmp_path,
                                                                                       monkeypatch):
    import torch

    import moepress.compress.quantize as quantize
    import moepress.device as device

    seen = {}
    monkeypatch.setattr(quantize, "quantize_checkpoint",
                        lambda src, out, cfg, **kw: seen.update(cfg=cfg) or {"output": str(out)})
    monkeypatch.setattr(device, "resolve", lambda spec: torch.device("cpu"))
    r = cli_run("quantize", "tiny-mixtral", "--format", "int4-awq", "--rule", "self_attn.*=fp8", "-q",
                "--rule", "mlp.gate=none", "--format", "int4-awq", "--calib", "a.txt", "--calib", "b.txt",
                "-o", tmp_path / "o", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert seen["cfg"].rules == (("self_attn.*", "fp8"), ("mlp.gate", "none"))
    assert seen["cfg"].calib == ("a.txt", "b.txt") and seen["cfg"].format == "int4-awq"

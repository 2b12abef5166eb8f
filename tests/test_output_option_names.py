"""`-o --no-merge`: click takes the flag's off switch as the path. A boolean flag's secondary spelling is as much an
option of the command as -q or --force (prune --help lists `--merge / --no-merge`), so it is refused the same way."""

from __future__ import annotations

from helpers import assert_one_line_error


def test_a_flags_off_switch_given_as_the_output_is_refused(cli_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--no-merge" in cli_run("prune", "--help").output  # a documented option of prune
    r = cli_run("prune", "tiny-qwen3-moe", "--ratio", "0.25", "-o", "--no-merge")
    assert_one_line_error(r, "--no-merge is an option of this command, not a path", "-o ./--no-merge")
    assert list(tmp_path.iterdir()) == []

"""Progress events (moepress/progress.py) on a clock the test sets: JSON events, human lines, --quiet."""

from __future__ import annotations

import io
import json

import pytest

from moepress import progress
from moepress.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    return now


def _json_steps(clock, total: int, steps: list[tuple[float, str | None]]) -> list[dict]:
    """The --json events of a "quantize" task of ``total`` steps advanced at each (clock time, note)."""
    out = io.StringIO()
    with Progress("json", stream=out).task("quantize", total) as t:
        for at, note in steps:
            clock[0] = at
            t.advance(**({"note": note} if note else {}))
    return [json.loads(ln) for ln in out.getvalue().splitlines()]


def test_json_events_count_steps_and_eta(clock):
    """start, one progress event per step (done / total, elapsed, ETA = elapsed / done x steps left, the note only
    where given), end with the steps done."""
    ev = _json_steps(clock, 4, [(10.0, "layer 0"), (20.0, None)])
    for e in ev:
        assert isinstance(e.pop("time"), float)
    assert ev == [
        {"event": "start", "stage": "quantize", "total": 4, "unit": "layer"},
        {"event": "progress", "stage": "quantize", "unit": "layer", "done": 1, "total": 4, "elapsed_s": 10.0,
         "eta_s": 30.0, "note": "layer 0"},
        {"event": "progress", "stage": "quantize", "unit": "layer", "done": 2, "total": 4, "elapsed_s": 20.0,
         "eta_s": 20.0},
        {"event": "end", "stage": "quantize", "done": 2, "elapsed_s": 20.0},
    ]


def test_human_lines_off_a_terminal(clock):
    """Off a terminal (a log): one line per step with percent, elapsed and ETA as [h:]mm:ss; info lines as written."""
    out = io.StringIO()
    p = Progress("human", stream=out)
    p.info("prune: 2 layers")
    with p.task("prune", 3, unit="layer") as t:
        clock[0] = 3725.0
        t.advance(note="layer 0")
    assert out.getvalue().splitlines() == ["prune: 2 layers",
                                           "prune: layer 1/3 (33%) elapsed 1:02:05 ETA 2:04:10  layer 0"]


def test_quiet_writes_nothing(clock, capsys):
    p = Progress.from_flags(quiet=True, json_events=False)
    p.info("hello")
    p.write("a line")
    with p.task("quantize", 2) as t:
        t.advance(note="x")
    assert capsys.readouterr() == ("", "")


def test_prune_auto_times_its_plan_race_apart_from_the_chosen_method_s_run(cli_run, tmp_path):
    """`prune --method auto`: the "prune" task (whose ETA is per layer of the final run) started before the plan
    race, so its first layer's ETA counted the whole race; the race is a task of its own, then prune starts."""
    r = cli_run("prune", "tiny-qwen3-moe", "--ratio", "0.25", "--num-samples", "4", "--seq-len", "32",
                "-o", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.output
    ev = [(e["event"], e.get("stage")) for e in map(json.loads, r.stderr.splitlines()) if e.get("event") != "step"]
    assert ev.index(("end", "plans")) < ev.index(("start", "prune")), ev


def test_eta_is_the_rate_of_the_steps_after_the_first(clock):
    """A cheap first step (DeepSeek's dense layer 0 before its MoE layers, a resume's finished layers counted at
    once) set the rate of every later ETA: 61 Kimi-shaped layers read ETA 8 s after layer 1 for 44 s of work."""
    eta = [e.get("eta_s") for e in _json_steps(clock, 10, [(1.0, "dense layer 0"), (11.0, None), (21.0, None)])][1:4]
    assert eta == [9.0, 80.0, 70.0]  # not 80 x 1 / 2 = 40 and 70 x 21 / 3 = 49


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_quiet_silences_json_events_and_a_terminals_bar():
    """--quiet wins over --json (options.py: JSON-lines events on stderr, "none with --quiet"), and on a terminal
    draws no progress bar."""
    out = io.StringIO()
    p = Progress.from_flags(quiet=True, json_events=True)
    p.stream = out
    p.info("hello")
    with p.task("quantize", 2) as t:
        t.advance(note="x")
    tty = _Terminal()
    q = Progress.from_flags(quiet=True, json_events=False)
    q.stream = tty
    with q.task("quantize", 2) as t:
        t.advance(note="x")
        t.advance()
    assert out.getvalue() == "" and tty.getvalue() == ""


def test_a_terminal_gets_rich_s_bar_with_steps_done_and_eta(clock):
    """On a terminal, human mode draws rich's bar (the only code that uses rich, so .ci/lowest runs this at its
    lower bound): the stage, steps done of total and the ETA column, not the log lines written off a terminal."""
    tty = _Terminal()
    p = Progress("human", stream=tty)
    with p.task("quantize", 4) as t:
        clock[0] = 5.0
        t.advance(note="layer 0")
        t.advance()
    drawn = tty.getvalue()
    assert "quantize" in drawn and "2/4" in drawn and "ETA" in drawn, drawn
    assert "layer 1/4 (25%)" not in drawn, drawn

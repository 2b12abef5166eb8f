"""What a publisher can recompute of a check recorded in a manifest's ``accuracy`` section.

The section (moepress/checks/report.py) records the verdict, the metrics, the gates the check
applied (metric, op, threshold, measured value, passed), the sha256 and size of every file it
checked and a seal (moepress/checks/seal.py). :func:`verify_section` trusts none of the verdicts
in it: each gate's verdict is recomputed from the recorded metric and threshold, the overall
verdict from the gates, the checked files' digests are compared with the files as they are now,
every file the artifact lists (documentation aside) must have been checked, a check that applied
no gate is no evidence, a check against another model than the candidate was made from compares two
models, and the seal must verify with this user's key (without one it cannot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import moepress.checks.seal as sealing
from moepress.checks.config import GATES
from moepress.manifest import MANIFEST_NAME, sha256_file

# Files a check does not vouch for: model cards, written after the check from its result.
UNCHECKED_SUFFIXES = (".md",)


def checked_file(rel: str) -> bool:
    """Whether the accuracy section must cover the artifact file ``rel`` (weights, configs, tokenizer)."""
    return not rel.lower().endswith(UNCHECKED_SUFFIXES)


@dataclass
class Verdict:
    """The recomputed verdict of a recorded check and what does not hold in its section."""

    problems: list[str] = field(default_factory=list)  # each a reason to refuse, first the worst
    passed: bool | None = None  # recomputed from the gates (None: no gate was applied)
    failed: list[str] = field(default_factory=list)  # gates failing on the recorded metrics
    seal: str = ""  # "verified", or why it could not be


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def recompute_gates(acc: dict) -> tuple[list[tuple[str, bool]], list[str]]:
    """((metric, passed) of every applied gate, inconsistencies) from the recorded metrics and gates.

    A gate on a logits metric always has a value; the per-layer gate may be "not measured" (the
    candidate gave no hidden states) and then counts as not applied. A NaN metric (recorded as
    null) never passes, as in the check (checks/config.py evaluate_gates)."""
    metrics = acc.get("metrics") if isinstance(acc.get("metrics"), dict) else {}
    known = {g.metric: g for g in GATES}
    applied, problems = [], []
    if not isinstance(acc.get("gates") or [], list):
        return [], [f"accuracy.gates: expected a list of gates, got {type(acc['gates']).__name__}"]
    for rec in acc.get("gates") or []:
        name = rec.get("metric") if isinstance(rec, dict) else None
        g = known.get(name)
        if g is None:
            problems.append(f"accuracy.gates: unknown gate {name!r}")
            continue
        thr = rec.get("threshold")
        if rec.get("op") != g.op or not _number(thr) or not math.isfinite(thr) or thr < 0:
            problems.append(f"accuracy.gates {name}: expected '{g.op} threshold' with a non-negative threshold, "
                            f"got {rec.get('op')} {thr!r}")
            continue
        if name not in metrics:
            if not g.needs or rec.get("passed") is not None:
                problems.append(f"accuracy.gates {name}: accuracy.metrics has no {name}")
            continue
        v = metrics[name]
        if rec.get("value") != v:
            problems.append(f"accuracy.gates {name}: value {rec.get('value')!r} differs from accuracy.metrics "
                            f"{name} {v!r}")
        ok = _number(v) and math.isfinite(v) and (v <= thr if g.op == "<=" else v >= thr)
        if rec.get("passed") is not ok:
            problems.append(f"accuracy.gates {name}: recorded passed {rec.get('passed')}, but {v} {g.op} {thr} "
                            f"is {ok}")
        applied.append((name, bool(ok)))
    return applied, problems


def _files(acc: dict, digests: dict[str, dict], root: Path) -> list[str]:
    """The checked files against the artifact's files as they are now (``digests``: rel -> sha256, size)."""
    checked = acc.get("files")
    if not isinstance(checked, dict) or not checked:
        return [f"{root / MANIFEST_NAME}: the accuracy section records no digests of the files it checked "
                f"(recorded by an older moepress?); run `moepress check` again"]
    out = []
    for rel, info in sorted(checked.items()):
        now = digests.get(rel)
        if now is None:
            out.append(f"{root / rel}: checked by the accuracy check but no longer part of the artifact")
        elif not isinstance(info, dict) or (info.get("sha256"), info.get("size")) != (now["sha256"], now["size"]):
            out.append(f"{root / rel}: sha256 differs from the file the accuracy check measured "
                       f"(changed after the check)")
    for rel in sorted(set(digests) - set(checked)):
        if checked_file(rel):
            out.append(f"{root / rel}: not covered by the accuracy check (added after it); "
                       f"run `moepress check` again")
    return out


def _seal(acc: dict, v: Verdict) -> None:
    key = sealing.load_key(create=False)
    if key is None:  # the section may have been edited: its recomputed verdict alone proves nothing
        v.seal = (f"not verified: no key at {sealing.key_path()} (checked on another machine?); the verdict was "
                  f"recomputed from the recorded metrics, gates and file digests")
        return
    problem = sealing.check_seal(acc, key)
    v.seal = "verified" if problem is None else "does not match"
    if problem is not None:
        v.problems.append(problem)


def verify_section(acc: dict, digests: dict[str, dict], root: Path) -> Verdict:
    """Everything this module recomputes of ``acc``, the accuracy section of the manifest of the
    artifact ``root``, against its files as they are now (``digests``: rel -> sha256, size). The
    problems name the manifest, the file or the artifact: a seal that does not match first, a failed check
    next to last, a seal that could not be verified (no key) last."""
    v = Verdict()
    where = root / MANIFEST_NAME
    _seal(acc, v)
    v.problems = [f"{where}: {p}" for p in v.problems]
    applied, inconsistent = recompute_gates(acc)
    v.problems += [f"{where}: {p} (accuracy section edited after the check)" for p in inconsistent]
    v.failed = [m for m, ok in applied if not ok]
    v.passed = (not v.failed) if applied else None
    recorded = acc.get("failed") if isinstance(acc.get("failed"), list) else None
    if applied and (acc.get("passed") is not v.passed or recorded is None
                    or sorted(map(str, recorded)) != sorted(v.failed)):
        state = "pass" if v.passed else f"fail ({', '.join(v.failed)})"
        v.problems.append(f"{where}: accuracy.passed is {acc.get('passed')} (failed: {recorded}) but its gates "
                          f"{state} on the recorded metrics (accuracy section edited after the check)")
    v.problems += _files(acc, digests, root)
    data = acc.get("data") if isinstance(acc.get("data"), dict) else {}
    if data.get("made_from"):  # checks/runner.py _data_notes: the reference was not the candidate's origin
        v.problems.append(f"{root}: its accuracy check compared it with {acc.get('reference')}, not with "
                          f"{data['made_from']}, the model it was made from; run `moepress check {root} "
                          f"--reference {data['made_from']}`")
    if not applied:
        v.problems.append(f"{root}: its accuracy check applied no gate (every gate 'none'), so it shows nothing; "
                          f"run `moepress check` with at least one gate")
    elif v.failed:
        v.problems.append(f"{root}: its accuracy check failed ({', '.join(v.failed)})")
    if v.seal.startswith("not verified"):  # last: what was recomputed wrong says more
        v.problems.append(f"{where}: cannot verify the accuracy section's seal: no manifest key at "
                          f"{sealing.key_path()} (checked by another user or machine?); set {sealing.KEY_ENV} to "
                          f"a copy of the checking user's key that you own (mode 600)")
    return v


def recorded_files(directory: Path, listed: dict[str, dict]) -> dict[str, dict]:
    """sha256 and size of the files of ``directory`` a check vouches for: every file its manifest
    lists (``listed``) but documentation, hashed now (what the check read, not what the manifest says)."""
    out = {}
    for rel in sorted(listed):
        p = directory / rel
        if checked_file(rel) and p.is_file():
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


__all__ = ["UNCHECKED_SUFFIXES", "Verdict", "checked_file", "recompute_gates", "recorded_files", "verify_section"]

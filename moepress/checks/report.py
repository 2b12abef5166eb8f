"""A check's report (report.json, report.md, layer_error.png) and the accuracy section of the
candidate's manifest (what publishing verifies: moepress/checks/verify.py)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import moepress.checks.seal as seal
from moepress.checks.config import fmt, verdict
from moepress.checks.verify import recorded_files
from moepress.errors import MoepressError
from moepress.manifest import MANIFEST_NAME, file_digests, read_manifest, update_manifest, versions, write_manifest
from moepress.outputs import pid_alive

PLOT_NAME = "layer_error.png"


def jsonable(obj):
    """The result with NaN/inf floats as null, so strict JSON readers (jq, JavaScript) accept it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def accuracy_section(result: dict) -> dict:
    """What goes into the candidate's manifest: the verdict, the headline metrics, the gates applied
    (metric, measured value, op, threshold, passed). :func:`record_in_manifest` adds the digests of
    the files checked and the seal."""
    keep = ("ppl_reference", "ppl_candidate", "ppl_increase", "kl_mean", "kl_p99", "top1_agreement",
            "min_layer_cosine", "final_layer_rel_error", "max_layer_rel_error", "min_routing_overlap",
            "max_expert_error", "max_expert_error_ratio", "max_weight_error_ratio", "max_attention_error_ratio",
            "tokens")
    ref = result["reference"]  # absolute where it is a directory here: a relative name says nothing elsewhere
    ref = str(Path(ref).resolve()) if isinstance(ref, str) and Path(ref).exists() else ref
    return {"passed": result["passed"], "failed": result["failed"], "reference": ref,
            "data": result["data"], "metrics": {k: result["metrics"][k] for k in keep if k in result["metrics"]},
            "error_jump": result["error_jump"],
            "gates": [{k: g[k] for k in ("metric", "value", "op", "threshold", "passed")} for g in result["gates"]],
            "kind": result["candidate"]["kind"]}


def _manifest_dir(candidate: str | Path) -> Path | None:
    """The directory whose manifest records a check of ``candidate`` (None: moepress did not write it).

    The candidate is a directory with ``moepress-manifest.json``, or a file (an ONNX model, an
    engine) that the manifest of its directory lists."""
    p = Path(candidate)
    d = p if p.is_dir() else p.parent
    if not (d / MANIFEST_NAME).is_file():
        return None
    if p.is_file() and p.name not in read_manifest(d).get("files", {}):
        return None
    return d


def prepare_record(candidate: str | Path) -> dict | None:
    """Before a check: None where its result will not be recorded (moepress did not write the candidate); else
    this user's manifest key, created now (a key that cannot be made or is readable by others is refused before
    the check runs, not after), and the identity of the files the check will read (:func:`record_in_manifest`
    records nothing when they changed while it ran)."""
    d = _manifest_dir(candidate)
    if d is None:
        return None
    seal.load_key(create=True)
    try:  # a read-only artifact: refused before the check runs (it ran whole, passed, then exited 2)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".moepress-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MoepressError(f"{d}: cannot record the check in its {MANIFEST_NAME} ({e.strerror}); expected a "
                            "writable artifact folder (or --no-record: the gate alone, nothing recorded)") from None
    return _identity(d)


def _identity(d: Path) -> dict[str, object]:
    """The manifest's file list (its digests: another export's differ) and every listed file's size and mtime: a
    directory replaced (an export with --force) or a file rewritten in place shows here without reading the
    bytes. Not inodes: some file systems (FUSE without use_ino, CIFS noserverino) renumber them unprompted."""
    listed = read_manifest(d).get("files", {})
    out: dict[str, object] = {MANIFEST_NAME: json.dumps(listed, sort_keys=True, default=str)}
    for rel in sorted(listed):
        try:
            st = (d / rel).stat()
            out[rel] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[rel] = None
    return out


def record_in_manifest(candidate: str | Path, result: dict, before: dict | None = None) -> bool:
    """Add ``accuracy`` to the candidate's manifest when moepress wrote the candidate; True if it did.

    The section gets the sha256 and size of the files checked (every file the manifest lists but
    documentation, hashed now) and an HMAC seal with this user's key (moepress/checks/seal.py), so
    that publishing can tell the section and the files from ones edited after the check. ``before``
    (:func:`prepare_record`'s): the files as the check began; one replaced or rewritten since is refused,
    not sealed as measured."""
    d = _manifest_dir(candidate)
    if d is None:
        return False
    if before is not None:
        now = _identity(d)
        changed = [rel for rel in sorted(set(before) | set(now)) if before.get(rel) != now.get(rel)]
        if changed:
            raise MoepressError(f"{d / changed[0]}: changed while the check ran (rewritten, replaced or added); "
                                f"the check is not recorded in {MANIFEST_NAME}: run it again")
    section = jsonable(accuracy_section(result))
    try:
        section["files"] = recorded_files(d, read_manifest(d).get("files", {}))
        section["seal"] = seal.seal(section, seal.load_key(create=True))
        update_manifest(d, accuracy=section)
    except OSError as e:
        raise MoepressError(f"{d / MANIFEST_NAME}: cannot record the accuracy metrics ({e.strerror})") from None
    return True


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _num(v: float | None) -> str:
    return f"{v:.4g}" if v is not None else "-"


def markdown(result: dict) -> str:
    m = result["metrics"]
    c = result["candidate"]
    lines = [f"# Accuracy check: {verdict(result['passed'], result['failed'])}", "",
             f"- candidate: `{c['path']}` ({c['kind']})", f"- reference: `{result['reference']}`",
             f"- data: `{result['data']['source']}`, {result['data']['samples']} samples x "
             f"{result['data']['seq_len']} tokens ({result['data']['windows']})", ""]
    rows = [["perplexity (reference)", fmt(m["ppl_reference"])],
            ["perplexity (candidate)", fmt(m["ppl_candidate"])],
            ["perplexity change", fmt(m["ppl_increase"], True)],
            ["KL(ref \\|\\| cand) mean, nats/token", fmt(m["kl_mean"])],
            ["KL p99", fmt(m["kl_p99"])], ["KL max", fmt(m["kl_max"])],
            ["top-1 agreement", fmt(m["top1_agreement"])], ["positions compared", str(m["tokens"])]]
    lines += ["## Next-token distributions", "", _md_table(["metric", "value"], rows), ""]
    if result["gates"]:
        word = {True: "pass", False: "FAIL"}
        g_rows = [[g["metric"], fmt(g["value"], g.get("percent", False), g["threshold"]),
                   f"{g['op']} {fmt(g['threshold'], g.get('percent', False))}", word.get(g["passed"], "n/a")]
                  for g in result["gates"]]
        lines += ["## Gates", "", _md_table(["metric", "value", "gate", "result"], g_rows), ""]
    if result["layers"]:
        jump = result["error_jump"]
        l_rows = [[str(p["layer"]), f"{p['cosine']:.6f}", f"{p['cosine_min']:.4f}", f"{p['rel_error']:.4g}",
                   f"{p['rel_error_p99']:.4g}"] for p in result["layers"]]
        header = ["layer", "cosine (mean)", "cosine (min)", "rel. error (mean)", "rel. error (p99)"]
        if any("attention_error" in p for p in result["layers"]):  # each block on the reference's input
            header += ["attention error (own)", "/ its peers'", "feed-forward error (own)"]
            for row, p in zip(l_rows, result["layers"], strict=True):
                row += [_num(p.get("attention_error")), _num(p.get("attention_error_ratio")), _num(p.get("ffn_error"))]
        if any(p.get("routing_overlap") is not None for p in result["layers"]):  # MoE layers: routing, worst expert
            header += ["routing overlap", "worst expert's error", "worst expert's error / its peers'"]
            for row, p in zip(l_rows, result["layers"], strict=True):
                share, e, r = p.get("routing_overlap"), p.get("expert_error"), p.get("expert_error_ratio")
                row += [f"{share:.4f}" if share is not None else "-",
                        f"{e:.4g} (expert {p['worst_expert']})" if e is not None else "-",
                        f"{r:.4g} (expert {p['ratio_expert']})" if r is not None else "-"]
        if any("weight_error_ratio" in p for p in result["layers"]):  # each linear's weights against its rounding
            header += ["worst weight error / its rounding's"]
            for row, p in zip(l_rows, result["layers"], strict=True):
                w = p.get("weight_error_ratio")
                row.append(f"{w:.4g} ({p['weight_module']})" if w is not None else "-")
        lines += ["## Hidden states per layer (candidate vs reference, layer outputs)", "",
                  _md_table(header, l_rows), ""]
        if jump is not None:
            lines += [f"The error grows most at layer {jump['layer']} (rel. error {jump['before']:.3g} -> "
                      f"{jump['after']:.3g}).", ""]
        lines += [f"![per-layer error]({PLOT_NAME})", ""]
    for n in result.get("notes") or []:
        lines += [f"Note: {n}", ""]
    gen = result.get("generations")
    if gen and gen.get("samples"):
        lines += ["## Greedy generations", ""]
        for i, s in enumerate(gen["samples"]):
            lines += [f"### Prompt {i + 1} (same first {s['same_prefix_tokens']} of {s['new_tokens']} tokens)", "",
                      "```", s["prompt"], "```", "reference:", "```", s["reference"], "```", "candidate:", "```",
                      s["candidate"], "```", ""]
    elif gen and gen.get("skipped"):
        lines += [f"Generations skipped: {gen['skipped']}", ""]
    return "\n".join(lines)


def plot_layers(result: dict, path: Path) -> None:
    """Per-layer relative error (log scale) and 1 - cosine of hidden states, the jump marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    x = [p["layer"] for p in layers]
    floor = 1e-8  # identical hidden states (error 0) are drawn at the floor rather than at log(0)
    rel = [max(p["rel_error"], floor) if math.isfinite(p["rel_error"]) else float("nan") for p in layers]
    p99 = [max(p["rel_error_p99"], floor) if math.isfinite(p["rel_error_p99"]) else float("nan") for p in layers]
    cos = [max(1 - p["cosine"], floor) if math.isfinite(p["cosine"]) else float("nan") for p in layers]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    ax.plot(x, rel, "o-", label="relative error (mean over tokens)")
    ax.plot(x, p99, "^--", alpha=0.6, label="relative error (p99)")
    ax.plot(x, cos, "s-", label="1 - cosine similarity (mean)")
    jump = result.get("error_jump")
    if jump is not None:
        ax.axvline(jump["layer"], color="red", alpha=0.3, lw=6, label=f"error jumps at layer {jump['layer']}")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer (output)")
    ax.set_ylabel("candidate vs reference" + (" (0 drawn at 1e-8)" if min(rel + cos) <= floor else ""))
    ax.set_xticks(x)
    said = "no gate applied" if result["passed"] is None else \
        verdict(result["passed"], result["failed"], ("pass", "FAIL"))
    ax.set_title(f"{Path(result['candidate']['path']).name} vs {Path(result['reference']).name} ({said})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: dict, out: str | Path) -> Path:
    """report.json, report.md, layer_error.png (when per-layer states were compared) and a manifest.

    Written in a hidden sibling directory first, then moved into ``out``: a new ``out`` is renamed
    into place whole; into an existing one (a CI artifacts folder may hold other files) the old
    manifest is removed first and the new one moved last, so a killed run never leaves a report
    whose manifest vouches for it."""
    out = Path(out)
    refuse_other_output(out)
    tmp = _report_partial(out)
    try:
        _write_report_files(result, tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _report_partial(out: Path) -> Path:
    """The hidden sibling a report of ``out`` is written in, made empty; one line when it cannot be."""
    if out.exists() and not out.is_dir():
        raise MoepressError(f"--report {out}: exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's, whose pid this process now has
        for old in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):  # killed runs' (no live process)
            if old != tmp and not pid_alive(old.name.rpartition("-")[2]):
                shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()  # the umask's mode, as ``out`` would have had
    except OSError as e:
        raise MoepressError(f"--report {out}: cannot create directory ({e.strerror})") from None
    return tmp


def check_report_dir(out: str | Path) -> None:
    """Refuse, before a check runs for hours, a ``--report`` it could not write (a file, no write access) or must
    not write into (another stage's output, whose manifest the report's would replace)."""
    out = Path(out)
    refuse_other_output(out)
    shutil.rmtree(_report_partial(out), ignore_errors=True)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise MoepressError(f"--report {out}: cannot write into it (permission denied)")


def refuse_other_output(out: Path) -> None:
    """A ``--report`` directory holding a checkpoint or another stage's output: the report's manifest would replace
    that output's (its digests lost: `moepress publish` then refuses it) and its files land beside the output's."""
    if not out.is_dir():
        return
    try:
        stage = read_manifest(out).get("stage")
    except MoepressError:
        what = f"an unreadable {MANIFEST_NAME}"
    else:
        what = f"the {MANIFEST_NAME} of the {stage!r} stage" if stage not in (None, "check") else \
            "a config.json (a checkpoint)" if (out / "config.json").exists() else None
    if what is not None:
        raise MoepressError(f"--report {out}: holds {what}; the report's files would land beside it and its "
                            f"{MANIFEST_NAME} would be the directory's; expected a directory that is neither a "
                            "moepress output nor a checkpoint (or an earlier check's report)")


def _write_report_files(result: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(jsonable(result), indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(result))
    if result["layers"]:
        plot_layers(result, out / PLOT_NAME)
    write_manifest(out, {"stage": "check", "config": result["config"],
                         "inputs": {"candidate": result["candidate"]["path"], "reference": result["reference"],
                                    "data": result["data"]["source"]},
                         "versions": versions(), "files": file_digests(out)})


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp``'s files into ``out``, the manifest last (see :func:`write_report`)."""
    try:
        os.rename(tmp, out)  # atomic when ``out`` does not exist (or is an empty directory)
        return
    except OSError:
        pass
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    (out / PLOT_NAME).unlink(missing_ok=True)  # a plot of an earlier check must not sit beside this report
    for name in sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST_NAME):
        os.replace(tmp / name, out / name)
    os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)

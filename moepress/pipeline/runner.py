"""`moepress run`: chain the stages of a recipe, skip what is unchanged, resume what was cut off.

Layout of the run directory OUT::

    OUT/recipe.yaml            the effective recipe
    OUT/prune/                 pruned checkpoint            (stage "prune")
    OUT/quantize/              quantized checkpoint         (stage "quantize")
    OUT/export/<format>/       one directory per export     (stage "export:<format>")
    OUT/check/<artifact>/      report.json/.md/.png         (stage "check:<artifact>")
    OUT/build/<target>-<builder>/  plan + commands (dry run) (stage "build:<target>:<builder>")
    OUT/run.json               where everything is, per stage: ran / skipped, key, result
                               (removed when a run starts, written atomically when it ends: it never
                               describes outputs a later, cut-off run has since replaced)
    OUT/.state/<stage>.json    the stage's key and result (what skipping and resuming read)

A stage's *key* is the sha256 of its config and its inputs' keys (the source model's
content hashes for the first stage, the calibration set's key), so changing one recipe
field changes the keys of that stage and everything downstream, and nothing else. A stage
whose key matches its state file and whose output is complete (its manifest lists files
that are there with their sizes) is skipped. ``--from STAGE`` forces STAGE and everything
after it. A stage cut off mid-way (killed) leaves ``<dir>.partial/`` with a journal of the
finished layers; the next run with the same key resumes there (the quantize stage).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from moepress.calib.sources import local_paths, refuse_output_over
from moepress.codeid import code_id
from moepress.errors import CheckFailed, MoepressError
from moepress.exporters import builders as builder_registry
from moepress.manifest import MANIFEST_NAME, library_versions
from moepress.outputs import OutputLock, output_dir, write_text_atomic
from moepress.pipeline.card import NO_CPU_RUNTIME, Accuracy, model_card, withdraw_cards, write_card
from moepress.pipeline.check_gates import CHECKABLE
from moepress.pipeline.keys import (
    accuracy_digest,
    data_digest,
    listed,
    output_complete,
    same_files,
    sealing_key_id,
    source_digest,
    stage_key,
    stamps,
    unedited,
)
from moepress.pipeline.preflight import preflight
from moepress.pipeline.recipe import STAGES, dump, export_config, key_where, recipe_keys
from moepress.pipeline.stale import (
    claim_for_model,
    planned,
    refuse_links,
    stage_path,
    state_file,
    withdraw,
    withdraw_stage,
)
from moepress.progress import Progress

# which builder turns which export into an engine / deployment (each builder declares the export it takes)
BUILDERS = {k: b.name for b in builder_registry.BUILDERS.values() for k in b.kinds}


RUN_JSON = "run.json"  # the finished run's summary
CHECKED_AS = {"prune": "pruned", "quantize": "quantized"}  # the check of a stage's output (an export: its format)


class Runner:
    def __init__(self, recipe: dict, out: Path, progress: Progress, force_from: str | None = None,
                 recipe_src: str = "recipe", device=None):
        from moepress.device import resolve as resolve_device  # torch: imported when a run starts
        from moepress.models import resolve as resolve_model

        self.recipe, self.out, self.prog = recipe, Path(out), progress
        self.recipe_src = recipe_src
        if force_from is not None and force_from not in STAGES:
            raise MoepressError(f"--from {force_from}: expected one of {', '.join(STAGES)}")
        if force_from is not None and recipe.get(force_from) is None:  # it said "nothing to do", exit 0
            have = [s for s in STAGES if recipe.get(s) is not None]
            raise MoepressError(f"--from {force_from}: {recipe_src} has no {force_from} section; expected one of its "
                                f"stages ({', '.join(have)})")
        self.force_from = force_from
        self.device = resolve_device(device if device is not None else recipe.get("device"))  # in no stage's key
        try:  # named by the recipe's key: a stage's refusal of a folder without config.json named its own section
            self.model = resolve_model(recipe["model"])
            if not (self.model / "config.json").is_file():
                raise MoepressError(f"{self.model}: not a checkpoint directory (no config.json)")
        except MoepressError as e:
            raise MoepressError(f"{key_where(recipe_src, 'model')}: {e}") from None
        recipe_file = Path(recipe_src)
        # a symlinked -o: the directory it names (a dangling one is made)
        self.out = output_dir(self.out, (self.model, *((recipe_file,) if recipe_file.is_file() else ())))
        self.state_dir = self.out / ".state"
        file = next((p for p in (self.out, *self.out.parents) if p.exists() and not p.is_dir()), None)
        if file is not None:
            raise MoepressError(f"-o {self.out}: {file} is a file; expected a directory path (new, empty, or an "
                                "earlier run's)")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.state_dir.is_dir()
                                                                  or (self.out / RUN_JSON).is_file()):
            raise MoepressError(f"-o {self.out}: a non-empty directory that no moepress run wrote (no .state/, "
                                "no run.json); expected a new or empty directory, or an earlier run's")
        self.record: dict[str, dict] = {}
        self.failed_checks: list[str] = []

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _forced(self, sid: str) -> bool:
        if self.force_from is None:
            return False
        return STAGES.index(sid.split(":")[0]) >= STAGES.index(self.force_from)

    def _state_path(self, sid: str) -> Path:
        return state_file(self.state_dir, sid)

    def _load_state(self, sid: str) -> dict:
        p = self._state_path(sid)
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # not a state this run can use
            return {}

    def _save_state(self, sid: str, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._state_path(sid), json.dumps(state, indent=2, default=str))

    def stage(self, sid: str, key: str, out: Path, fn, complete=output_complete, resumable: bool = False) -> dict:
        """Run ``fn(resume: bool) -> result`` into ``out`` unless its key and output are unchanged; ``resume``
        only for a ``resumable`` stage (quantize) whose partial this key started."""
        st = self._load_state(sid)
        # written for this very path: a run directory moved or copied keeps results (build.sh, run.json) that name
        # the old one, so its stages run again where they now are
        if not self._forced(sid) and st.get("key") == key and st.get("done") and st.get("output") == str(out) \
                and complete(out) and same_files(out, st.get("files")) \
                and unedited(out, st.get("files"), st.get("stamps")):
            self.prog.info(f"{sid}: unchanged, skipped ({out})")
            if st.get("stamps") != (now := stamps(out, st.get("files"))):  # touched, same bytes: not hashed again
                self._save_state(sid, {**st, "stamps": now})
            self.record[sid] = {"status": "skipped", "key": key, "output": str(out), "result": st.get("result")}
            return st.get("result") or {}
        partial = out.parent / (out.name + ".partial")
        # not resumed: the stage's writer clears the partial, under its lock (another process may hold it)
        resume = resumable and st.get("key") == key and not st.get("done") and partial.exists() \
            and not self._forced(sid)
        checked = CHECKED_AS.get(sid, sid.partition(":")[2] if sid.startswith("export:") else None)
        if checked and withdraw_stage(self.out, f"check:{checked}", self.state_dir):  # its verdict: of other bytes
            self.prog.info(f"{sid}: removed check/{checked}, the verdict on the output this replaces")
        self._save_state(sid, {"key": key, "done": False, "started": time.time()})
        self.prog.info(f"{sid}: {'resuming' if resume else 'running'} -> {out}")
        from moepress.device import MemoryPeaks

        t0 = time.monotonic()
        with MemoryPeaks(self.device) as mem:
            result = fn(resume) or {}
        secs = round(time.monotonic() - t0, 3)
        files = listed(out)
        self._save_state(sid, {"key": key, "done": True, "result": result, "seconds": secs,
                               "files": files, "stamps": stamps(out, files), "output": str(out)})
        self.record[sid] = {"status": "resumed" if resume else "ran", "key": key, "output": str(out),
                            "seconds": secs, "memory": mem.report(), "result": result}
        return result

    # ---- stages --------------------------------------------------------------------------------
    def run(self) -> dict:
        """The whole recipe, holding OUT's run lock: a second run into OUT is refused, not interleaved stage
        by stage with this one (a check could read an export the other run then replaces, and seal its
        verdict onto the other's files)."""
        if all(self.recipe[s] is None for s in ("prune", "quantize", "export", "build")):  # check has no candidate
            raise MoepressError(f"{self.recipe_src}: no stage to run (prune, quantize, export and build are null or "
                                "left out): expected one or more; `moepress recipe show` prints the default recipe")
        preflight(self.recipe, self.model, self.recipe_src)  # before hours of prune and quantize, not after
        with recipe_keys(self.recipe_src, "calib"):  # the calibration data read (and cached) before OUT is made
            self.calib_key = self._calib_key()
        refuse_output_over(self.out, local_paths(self.recipe["calib"].get("sources") or ()), "calib.sources")
        refuse_links(self.out)
        # .state/ first: it marks OUT as a run's directory even when run.json is gone
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(self.state_dir / "run.lock", f"-o {self.out}: another moepress run is using it "
                                                       f"({self.state_dir / 'run.lock'} is locked)")
        lock.acquire()
        try:
            self.source_sha256 = source_digest(self.model)
            claim_for_model(self.out, self.state_dir, self.model, self.source_sha256)
            return self._run()
        finally:
            lock.release()

    def _run(self) -> dict:
        r = self.recipe
        # the old run.json away: the stages below replace its outputs, and a kill must not leave it describing them
        (self.out / RUN_JSON).unlink(missing_ok=True)
        withdraw_cards(self.out, (r["export"] or {}).get("formats", ()))  # so are the cards (written after the checks)
        withdraw(self.out, planned(self.out, r, self.state_dir), self.state_dir, self.prog.info)  # cannot write
        write_text_atomic(self.out / "recipe.yaml", dump(r))
        self.prog.info(f"run: {self.recipe_src} on {self.model} -> {self.out}")
        src_key = stage_key({"source": self.source_sha256, "moepress": code_id()})  # every key chains on
        calib_key = self.calib_key
        current, cur_key, cur_kind = self.model, src_key, "source"

        if r["prune"] is not None:
            current = self._prune(current, cur_key, calib_key)
            cur_key = self.record["prune"]["key"]
            cur_kind = CHECKED_AS["prune"]
        if r["quantize"] is not None:
            current = self._quantize(current, cur_key, calib_key)
            cur_key = self.record["quantize"]["key"]
            cur_kind = CHECKED_AS["quantize"]
        artifacts: dict[str, tuple[Path, str]] = {}
        if r["export"] is not None:
            for fmt in r["export"]["formats"]:
                artifacts[fmt] = (self._export(fmt, current, cur_key), self.record[f"export:{fmt}"]["key"])
        # accuracy: the last checkpoint stage's output and every export a CPU consumer runs
        cands = {cur_kind: (current, cur_key, "checkpoint")} if cur_kind != "source" else {}
        unchecked = _unchecked(artifacts)
        cands.update({fmt: (d, k, CHECKABLE[fmt]) for fmt, (d, k) in artifacts.items() if fmt not in unchecked})
        if r["check"] is None:
            cands = {}
        checks = {name: self._check(name, d, k, kind, src_key) for name, (d, k, kind) in cands.items()}
        for fmt, (d, _) in artifacts.items():  # an export not checked here: its input's verdict, so labelled
            own = checks.get(fmt)
            acc = Accuracy(own, None if own is not None else checks.get(cur_kind), cur_kind, r["check"] is not None,
                           unchecked=unchecked.get(fmt, NO_CPU_RUNTIME))
            self._card(fmt, d, acc)
        builds = {}
        if r["build"] is not None:
            for target in r["build"]["targets"]:
                for fmt, (d, k) in artifacts.items():
                    if fmt in BUILDERS:
                        builds[f"{target}:{BUILDERS[fmt]}"] = self._build(target, fmt, d, k)
        summary = {"recipe": self.recipe_src, "model": str(self.model), "output": str(self.out),
                   "stages": self.record, "artifacts": {f: str(d) for f, (d, _) in artifacts.items()},
                   "checks": {n: {"passed": c.get("passed"), "failed": c.get("failed"),
                                  "metrics": c.get("metrics")} for n, c in checks.items()},
                   "builds": builds, "failed_checks": self.failed_checks}
        withdraw(self.out, {Path(v["output"]) for v in self.record.values()}, self.state_dir, self.prog.info)
        write_text_atomic(self.out / RUN_JSON, json.dumps(summary, indent=2, default=str))
        return summary

    def _calib_key(self) -> str:
        from moepress.calib.data import calibration_set

        c = self.recipe["calib"]
        if self.recipe["prune"] is None and self.recipe["quantize"] is None:
            return ""
        cs = calibration_set(self.model, tuple(c["sources"]), c["num_samples"], c["seq_len"], c["seed"],
                             c["trust_remote_code"])
        return cs.meta["key"]

    def _prune(self, src: Path, src_key: str, calib_key: str) -> Path:
        from moepress.calib.config import CalibConfig
        from moepress.compress.prune import PruneConfig, prune_checkpoint

        c = CalibConfig.from_recipe(self.recipe["calib"])
        cfg = PruneConfig.from_recipe(self.recipe["prune"], c)
        out = stage_path(self.out, "prune")
        key = stage_key({"stage": "prune", "input": src_key, "calib": calib_key, "config": dataclasses.asdict(cfg)})

        def fn(resume):
            res = prune_checkpoint(src, out, cfg, batches=c.loader(src, self.prog), force=True, progress=self.prog,
                                   device=self.device)
            return {k: res[k] for k in ("method", "chosen", "num_experts", "kept") if k in res}

        self.stage("prune", key, out, fn)
        return out

    def _quantize(self, src: Path, src_key: str, calib_key: str) -> Path:
        from moepress.calib.config import CalibConfig
        from moepress.compress.checkpoint.resume import ResumeRefused
        from moepress.compress.quantize import QuantConfig, quantize_checkpoint

        c = CalibConfig.from_recipe(self.recipe["calib"])
        cfg = QuantConfig.from_recipe(self.recipe["quantize"], c)
        out = stage_path(self.out, "quantize")
        # a calibration-free format reads no calibration data: its settings and samples change none of its bytes
        key = stage_key({"stage": "quantize", "input": src_key, "config": cfg.recorded(),
                         "calib": calib_key if cfg.needs_calibration else None})

        def fn(resume):
            try:
                res = quantize_checkpoint(src, out, cfg, batches=c.loader(src, self.prog), force=True, resume=resume,
                                          progress=self.prog, device=self.device)
            except ResumeRefused as e:  # the partial was started by another run: kept, and said how to restart
                raise ResumeRefused(e.partial, e.detail, "rerun with --from quantize to start it again") from None
            return {k: res[k] for k in ("format", "borrowed", "layers") if isinstance(res, dict) and k in res}

        self.stage("quantize", key, out, fn, resumable=True)
        return out

    def _export(self, fmt: str, src: Path, src_key: str) -> Path:
        from moepress.exporters import export

        cfg = export_config(self.recipe["export"], fmt)
        out = stage_path(self.out, f"export:{fmt}")
        out.parent.mkdir(parents=True, exist_ok=True)
        key = stage_key({"stage": "export", "input": src_key, "config": dataclasses.asdict(cfg)})
        self.stage(f"export:{fmt}", key, out, lambda resume: _summary(export(src, out, cfg, force=True,
                                                                             progress=self.prog)))
        return out

    def _check(self, name: str, cand: Path, cand_key: str, kind: str, ref_key: str) -> dict:
        from moepress.checks import CheckConfig, jsonable, prepare_record, record_in_manifest, run_check, write_report

        cfg = CheckConfig.from_dict({**self.recipe["check"], "kind": kind}, where="recipe check")
        out = stage_path(self.out, f"check:{name}")
        # the verdict is the consumer's (transformers, compressed-tensors, onnxruntime...): another version of one
        # measures again; moepress's own code is in the candidate's key
        key = stage_key({"stage": "check", "candidate": cand_key, "reference": ref_key, "config": cfg.to_dict(),
                         "data": data_digest(cfg.data), "versions": library_versions(),
                         "sealed_by": sealing_key_id()})

        def fn(resume):
            before = prepare_record(cand)  # this user's manifest key, before the check runs
            result = run_check(cand, self.model, cfg, progress=self.prog, device=self.device)
            write_report(result, out)  # kept where the record is refused (files changed while it ran)
            record_in_manifest(cand, result, before)
            res = jsonable({k: result[k] for k in ("passed", "failed", "metrics", "error_jump", "gates")})
            res["kind"] = result["candidate"]["kind"]  # the card says which runtime measured it
            res["accuracy_sha256"] = accuracy_digest(cand)
            return res

        def complete(d: Path) -> bool:
            """Done only while the candidate carries this run's verdict: a rerun of its stage writes a new manifest,
            a standalone `moepress check` another verdict (which publish would read beside this run's card)."""
            if not output_complete(d):
                return False
            recorded = (self._load_state(f"check:{name}").get("result") or {}).get("accuracy_sha256")
            return not (cand / MANIFEST_NAME).is_file() or recorded == accuracy_digest(cand)

        res = self.stage(f"check:{name}", key, out, fn, complete=complete)
        verdict = ("FAILED (" + ", ".join(res.get("failed") or []) + ")" if res.get("passed") is False
                   else "passed" if res.get("passed") else "measured (no gate applied)")
        m = res.get("metrics") or {}
        self.prog.info(f"check:{name}: {verdict}; ppl {m.get('ppl_candidate', float('nan')):.3f} vs "
                       f"{m.get('ppl_reference', float('nan')):.3f}, top-1 {m.get('top1_agreement', float('nan')):.3f}")
        if res.get("passed") is False:
            self.failed_checks.append(name)
        return res

    def _card(self, fmt: str, d: Path, acc: Accuracy) -> None:
        """The export's README.md and its manifest's ``pipeline`` section (the recipe, the source model's
        hashes: what the export's own manifest, naming only the checkpoint it read, leaves out)."""
        prune = (self.record.get("prune") or {}).get("result")
        write_card(d, model_card(d, fmt, self.recipe, self.model, acc, prune),
                   {"recipe": self.recipe, "source": str(self.model), "source_sha256": self.source_sha256})

    def _build(self, target: str, fmt: str, artifact: Path, art_key: str) -> dict:
        from moepress.checks import CheckConfig, run_check
        from moepress.exporters import build as bmod

        b = self.recipe["build"]
        builder = BUILDERS[fmt]
        out = stage_path(self.out, f"build:{target}:{builder}")
        out.parent.mkdir(parents=True, exist_ok=True)
        # the card, rewritten by each check, is part of the artifact the build records; its engine check reads the
        # bundled held-out text
        key = stage_key({"stage": "build", "artifact": art_key, "target": target, "builder": builder, "config": b,
                         "card": (listed(artifact) or {}).get("README.md"),
                         "data": data_digest(None)})

        def check(engine, reference, progress=None):  # the built engine against the original model
            return run_check(engine, reference, CheckConfig(kind="engine"), progress=progress)

        sid = f"build:{target}:{builder}"
        ours = self._state_path(sid).is_file()  # what sits at OUT is this run directory's (stale.py's rule)

        def fn(resume):
            if out.exists() and not ours:  # neither its build nor its refusal record: not the run's to replace
                raise MoepressError(f"{out}: a folder this run directory's records do not name (no "
                                    f"{self._state_path(sid).name} in {self.state_dir}); expected nothing there: "
                                    "move it away")
            if (out / "refused.txt").is_file():  # an earlier config's refusal, the runner's own record
                shutil.rmtree(out)
            opts = bmod.BuildOptions(dry_run=b["dry_run"], builder=builder, gpus=b["gpus"],
                                     max_seq_len=b["max_seq_len"], max_batch=b["max_batch"], force=True,
                                     reference=self.model, trust_remote_code=b["trust_remote_code"])
            try:
                res = bmod.build(artifact, target, out, opts, check=check)
            except MoepressError as e:  # a target that cannot run this artifact: recorded, not fatal
                shutil.rmtree(out, ignore_errors=True)  # an earlier config's build is not this one's
                out.mkdir(parents=True)
                write_text_atomic(out / "refused.txt", str(e) + "\n")
                return {"refused": str(e)}
            return _summary(res)

        res = self.stage(sid, key, out, fn,
                         complete=lambda d: output_complete(d) or (d / "refused.txt").is_file())
        if (res.get("accuracy") or {}).get("passed") is False:  # the engine was built and failed its check
            self.failed_checks.append(f"build:{target}:{builder}")
        return res


def _unchecked(artifacts: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """The exports no CPU runtime here checks, and why (their cards carry the input's verdict, so labelled)."""
    from moepress.checks import misloaded

    why = {fmt: NO_CPU_RUNTIME if fmt not in CHECKABLE else misloaded(d) if CHECKABLE[fmt] == "transformers" else None
           for fmt, (d, _) in artifacts.items()}
    return {fmt: w for fmt, w in why.items() if w}


def _summary(d) -> dict:
    keep = {k: v for k, v in d.items() if k not in ("versions", "source_sha256")} if isinstance(d, dict) else {}
    return json.loads(json.dumps(keep, default=str))


def run_recipe(recipe: dict, out: Path, progress: Progress, force_from: str | None = None,
               recipe_src: str = "recipe", device=None) -> dict:
    """Run ``recipe`` into ``out``; ``device`` (None: the recipe's ``device``, else auto) is where
    prune, quantize and check compute."""
    summary = Runner(recipe, out, progress, force_from, recipe_src, device).run()
    if summary["failed_checks"]:
        summary["exit"] = 1
    return summary


__all__ = ["Runner", "run_recipe", "CheckFailed", "source_digest", "output_complete"]

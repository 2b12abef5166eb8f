"""`moepress run`, `moepress recipe show`, `moepress publish`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moepress.cli.options import PATH, TEXT, Command, Group, PathType, progress_options, remember_output, run_measured
from moepress.errors import CheckFailed
from moepress.pipeline.recipe import STAGES
from moepress.progress import Progress


@click.command("run", cls=Command)
@click.argument("recipe", required=False, type=PathType(path_type=Path, dir_okay=False))
@click.option("-o", "--output", "output", type=PATH, default=None, callback=remember_output,
              help="Run directory (default: the recipe's `output`, else ./moepress-out).")
@click.option("--from", "force_from", type=click.Choice(STAGES), default=None,
              help="Re-run this stage and everything after it even if unchanged.")
@click.option("--model", default=None, type=TEXT, help="Override the recipe's model (a directory or a bundled name).")
@click.option("--device", default=None, metavar="auto|cpu|cuda|cuda:N",
              help="Where prune, quantize and check compute (default: the recipe's `device`, else auto).")
@progress_options
def run_cmd(recipe, output, force_from, model, device, quiet, json_out):
    """Run a recipe's stages: prune -> quantize -> export -> check -> build.

    Without RECIPE: the embedded default recipe on the bundled model (`moepress recipe show`
    prints it). Stages whose inputs and config are unchanged are skipped; a stage killed
    mid-way resumes at the layer it stopped. Exit 0: every check passed; 1: a check failed;
    2: bad input.
    """
    from moepress.pipeline.recipe import load_recipe
    from moepress.pipeline.runner import run_recipe

    r, src = load_recipe(recipe, {"model": model} if model else None)
    out = output or Path(r.get("output") or "moepress-out")
    prog = Progress.from_flags(quiet, json_out)
    chosen = device if device is not None else r.get("device")  # an empty --device is refused, not the recipe's
    if device is None and chosen is not None:  # the recipe's device refused by its key, not as a --device flag
        from moepress.device import resolve
        from moepress.errors import MoepressError

        try:
            resolve(chosen)
        except MoepressError as e:
            raise MoepressError(f"{src}: device {str(e).removeprefix('--device ')}") from None
    summary, summary_memory = run_measured(chosen, run_recipe, r, out, prog, force_from, src)
    summary["memory"] = summary_memory
    if json_out:
        click.echo(json.dumps(summary, default=str))
    else:
        for line in _human(summary):
            click.echo(line)
    if summary["failed_checks"]:
        raise CheckFailed(f"accuracy check failed for {', '.join(summary['failed_checks'])} "
                          f"(reports in {out}/check/; an engine's in its build.json under {out}/build/)")


def _human(s: dict) -> list[str]:
    lines = [f"moepress run: {s['recipe']} on {s['model']}"]
    for sid, rec in s["stages"].items():
        what = rec["status"] + (f" in {rec['seconds']:.1f}s" if rec.get("seconds") is not None else "")
        lines.append(f"  {sid:34s} {what:18s} {rec['output']}")
    for name, c in s["checks"].items():
        m = c.get("metrics") or {}
        verdict = {True: "passed", None: "measured (no gate applied)"}.get(
            c.get("passed"), "FAILED " + ",".join(c.get("failed") or []))
        lines.append(f"  accuracy {name:25s} {verdict}: ppl {m.get('ppl_candidate', float('nan')):.3f} "
                     f"(original {m.get('ppl_reference', float('nan')):.3f}), "
                     f"top-1 {m.get('top1_agreement', float('nan')):.3f}, KL {m.get('kl_mean', float('nan')):.4f}")
    for b, res in s["builds"].items():
        lines.append(f"  build {b:28s} {'refused: ' + res['refused'] if res.get('refused') else 'planned'}")
    if s["stages"] and all(rec["status"] == "skipped" for rec in s["stages"].values()):
        lines.append("nothing to do: every stage's inputs and config are unchanged")
    lines.append(f"everything is in {s['output']}/ (run.json lists it)")
    return lines


@click.group("recipe", cls=Group)
def recipe_group():
    """Recipes: the YAML files `moepress run` takes."""


@recipe_group.command("show")
@click.argument("recipe", required=False, type=PathType(path_type=Path, dir_okay=False))
def recipe_show(recipe):
    """Print the effective recipe (defaults filled in; the check section as written, the defaults it takes
    in a comment); without RECIPE the embedded default."""
    from moepress.checks.config import CheckConfig
    from moepress.compress.prune.config import DEFAULT_METHOD
    from moepress.pipeline.recipe import dump, load_recipe

    r, src = load_recipe(recipe)
    click.echo(f"# effective recipe from {src}")
    click.echo(dump(r), nl=False)
    unset = ([] if r.get("output") else ["output: -o, else ./moepress-out"]) + \
        ([] if r.get("device") else ["device: --device, else auto"]) + \
        ([f"prune.method: {DEFAULT_METHOD}"] if r.get("prune") and not r["prune"].get("method") else [])
    if unset:  # what run takes where the recipe leaves a key unset (null above, or absent)
        click.echo("# not set, so: " + "; ".join(unset))
    if r.get("check") is not None:  # kept as written: a gate written is applied even where it is unmeasured
        given = {str(k).replace("-", "_") for k in r["check"]}
        rest = {k: v for k, v in CheckConfig().to_dict().items() if k not in given | {"asked", "kind"}}
        click.echo("# check, not written, so moepress check's defaults: "
                   + ", ".join(f"{k}: {_scalar(v)}" for k, v in rest.items()))


def _scalar(v) -> str:
    """``v`` as YAML writes a scalar: none, true / false, the number or string."""
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@click.command("publish", cls=Command)
@click.argument("artifact", type=PATH)
@click.option("--to", "to", required=True, metavar="DIR|hf://ORG/NAME", type=TEXT,
              help="Destination directory or Hub repo.")
@click.option("--force", is_flag=True, help="Publish even if the checks failed or the files changed.")
@click.option("--json", "json_out", is_flag=True, help="JSON result on stdout.")
def publish_cmd(artifact, to, force, json_out):
    """Publish ARTIFACT after verifying every file against its manifest and that its checks passed.

    Recomputed, not believed: every file's sha256; the check's verdict from its recorded metrics
    and gates; the digests of the files it checked against the files now; its seal, with this
    user's key ($MOEPRESS_KEY_FILE or ~/.config/moepress/manifest.key) when there is one. A check
    that applied no gate is refused. --to: a new or empty directory outside ARTIFACT, or hf://ORG/NAME.
    """
    from moepress.pipeline.publish import publish

    res = publish(artifact, to, force=force)
    if json_out:  # "output" as every writing command's result names it
        click.echo(json.dumps({"output": res["published"], **res}))
        return
    click.echo(f"published {artifact} -> {res['published']}")
    if res.get("seal") and res["seal"] != "verified":
        click.echo(f"  accuracy seal {res['seal']}")
    for problem in res.get("forced") or []:
        click.echo(f"  published despite (--force): {problem}")


COMMANDS = [run_cmd, recipe_group, publish_cmd]

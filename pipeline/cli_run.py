"""`moepress run` (issue #9 turns this into the full recipe runner)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from moepress.options import progress_options
from moepress.progress import Progress


@click.command("run")
@click.argument("recipe", required=False)
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=Path("moepress-out"),
              show_default=True, help="Where the stages write.")
@progress_options
def run_cmd(recipe, output, quiet, json_out):
    """Run the pipeline. Without RECIPE: the embedded default recipe on the bundled model.

    Today this inspects the bundled model and measures its held-out perplexity through
    the layer stream; prune/quantize/export/build/check are added by their issues.
    """
    from moepress import models
    from moepress.calib.data import eval_batches
    from moepress.calib.metrics import perplexity
    from moepress.compress.inspect import summarize
    from moepress.compress.stream import StreamedModel

    prog = Progress.from_flags(quiet, json_out)
    model = models.path()
    output.mkdir(parents=True, exist_ok=True)
    summary = summarize(str(model))
    (output / "inspect.json").write_text(json.dumps(summary, indent=2))
    sm = StreamedModel(str(model))
    batches = eval_batches(model, seq_len=256, max_windows=32)
    hs = sm.embed(batches)
    t0 = time.monotonic()
    with prog.task("eval", sm.num_layers) as task:
        for i, layer in sm.layers():
            hs = sm.run_layer(layer, hs)
            task.advance(note=f"layer {i}")
    ppl = perplexity(sm.head(hs), batches)
    result = {"model": str(model), "perplexity": ppl, "tokens": sum(b.numel() for b in batches),
              "seconds": round(time.monotonic() - t0, 3),
              "not_yet": ["prune (#4)", "quantize (#5)", "export (#6)", "build (#7)", "check (#8)"]}
    (output / "eval.json").write_text(json.dumps(result, indent=2))
    if json_out:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model.name}: held-out perplexity {ppl:.3f} over {result['tokens']} tokens")
        click.echo(f"wrote {output}/inspect.json, {output}/eval.json")
        click.echo("not implemented yet: " + ", ".join(result["not_yet"]))


COMMANDS = [run_cmd]

"""Options shared by every stage: one name, one meaning everywhere (../shared/STYLE.md, click section)."""

from __future__ import annotations

from pathlib import Path

import click

from moepress import models


class _Seed(click.ParamType):
    """A seed torch's generators take (torch.Generator.manual_seed: a 64-bit integer; the recipe's signed range),
    checked here rather than by click.IntRange, whose help text printed both 19-digit bounds."""

    name = "integer"

    def convert(self, value, param, ctx):
        v = click.INT.convert(value, param, ctx)
        if not -(2**63) <= v < 2**63:
            self.fail(f"{value} is not a signed 64-bit integer (-2**63 <= seed < 2**63)", param, ctx)
        return v


SEED = _Seed()


class _NonEmpty:
    """A path or name that may not be the empty string: ``os.path.abspath("")`` is the current directory, so
    ``-o "$OUT" --force`` with OUT unset would replace the directory the command runs in."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            self.fail("expected a path or name, got an empty string", param, ctx)
        return super().convert(value, param, ctx)


class PathType(_NonEmpty, click.Path):
    """click.Path, the empty string refused."""


class TextType(_NonEmpty, click.types.StringParamType):
    """A string naming a file, directory or model, the empty string refused."""


class Fraction(click.FloatRange):
    """A number in [0, 1]: click.FloatRange with NaN refused (every comparison with NaN is false, so the range
    let it through)."""

    def __init__(self):
        super().__init__(min=0, max=1)

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if v != v:
            self.fail(f"{value!r}: expected a number in [0, 1]", param, ctx)
        return v


def given(name: str) -> bool:
    """The running command's option ``name`` was given (not its default): an option whose default means "not
    asked" tells an explicit empty or inapplicable value apart without a default of its own."""
    return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def refuse_empty(**values) -> None:
    """A list option given as the empty string (a script's unset variable) is bad input, not its default."""
    for name, v in values.items():
        if given(name) and not str(v).strip():
            raise click.BadParameter("got an empty string; leave the option out for its default",
                                     param_hint=f"'--{name.replace('_', '-')}'")


PATH = PathType(path_type=Path)
TEXT = TextType()
FRACTION = Fraction()


class Command(click.Command):
    """Every moepress command: a single-valued option given again with another value is bad input (click keeps the
    last value silently, so a script's ``--format fp8`` lost to an appended ``--format int4-awq``); the same value
    again (``-q --quiet``) is taken. Options of several values (``multiple=True``: ``--rule``, ``--calib``,
    ``--option``) and eager ones (``--help``) are as click has them."""

    def make_parser(self, ctx):
        once = [p for p in self.get_params(ctx) if isinstance(p, click.Option) and not p.multiple
                and not p.count and not p.is_eager]
        for p in once:  # registered as click registers multiple=True (action append): every occurrence is kept
            p.multiple = True
        try:
            parser = super().make_parser(ctx)
        finally:
            for p in once:
                p.multiple = False
        parse = parser.parse_args

        p_of = {p.name: p for p in once}

        def parse_once(args):
            opts, largs, order = parse(args)
            for name in dict.fromkeys(p.name for p in once):
                given = opts.get(name)
                if isinstance(given, list):
                    if len(_values(p_of[name], given, ctx)) > 1 and not ctx.resilient_parsing:
                        raise _given_twice([p for p in once if p.name == name], given, ctx)
                    opts[name] = given[-1]
            return opts, largs, order

        parser.parse_args = parse_once
        return parser


class Group(Command, click.Group):
    """A moepress command group (``calib``, ``recipe``): its subcommands are :class:`Command`."""

    command_class = Command


def _values(p: click.Option, given: list, ctx) -> set[str]:
    """The distinct values of an option's occurrences as its type reads them (``--ratio 0.5 --ratio 0.50`` is one
    value); as written where one does not convert (moepress's own types raise MoepressError; the option's own
    refusal comes later, or this one names both values)."""
    try:
        return {repr(p.type_cast_value(ctx, v)) for v in given}
    except Exception:
        return {repr(v) for v in given}


def _given_twice(params: list, given: list, ctx) -> click.BadOptionUsage:
    """``--format given twice (fp8, int4-awq): expected it once``; a flag's occurrences by their spelling."""
    p = params[0]
    shown = [(p.secondary_opts[0] if v is False and p.secondary_opts else max(p.opts, key=len)) if p.is_flag
             else " ".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in given]
    name = "/".join([max(p.opts, key=len), *p.secondary_opts[:1]])
    times = "twice" if len(given) == 2 else f"{len(given)} times"
    return click.BadOptionUsage(p.opts[0], f"{name} given {times} ({', '.join(shown)}): expected it once", ctx)


def resolve_model(arg: str) -> Path:
    """A checkpoint directory, or the name of a bundled model (e.g. ``tiny-qwen3-moe``)."""
    return models.resolve(arg)


def model_label(arg: str, path: Path) -> str:
    """How a result line names MODEL: the folder's name, or the Hub id as given (not its snapshot's commit)."""
    return path.name if Path(arg).exists() or "/" not in arg else arg


def weight_only_notes(src: Path) -> list[str]:
    """A note where MODEL quantizes activations the stream leaves out (a compressed-tensors ``input_activations``
    scheme, a Model-Optimizer checkpoint's activation scales without moepress_quant.json): a stage calibrating on
    it takes its statistics from the weight-only forward, not the model vLLM or transformers run (`moepress check`
    refuses it as a reference for the same reason)."""
    from moepress.checks.candidates.checkpoint import unstreamed_activations

    un = unstreamed_activations(Path(src))
    return [] if un is None else [f"note: {src}: {un.why}, which moepress's stream leaves out: the calibration "
                                  "statistics come from its weight-only forward"]


def model_argument(f):
    return click.argument("model", metavar="MODEL", type=TEXT)(f)


# ctx.meta key: the command already printed its --json result (which then carries "error" and "exit"): a refusal
# raised after it adds no second document to stdout
RESULT_PRINTED = "moepress.result_printed"

# ctx.meta key: the command's output path, which an OS error without a file name is reported against
OUTPUT_META = "moepress.output"


def remember_output(ctx: click.Context, param, value):
    """-o's callback: keep the output path where the CLI's error handler finds it. An option of the command's own
    as the value (`-o -q`: click takes it as the path) is refused: a folder named `-q` would be written, unquiet."""
    if value is not None:
        own = {o for p in ctx.command.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}  # --help too
        if str(value) in own:
            raise click.BadParameter(f"{value} is an option of this command, not a path (a folder of that name: "
                                     f"-o ./{value})", ctx, param)
        ctx.meta[OUTPUT_META] = str(value)
    return value


def output_options(f):
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty: an earlier output of "
                     "a moepress stage (its moepress-manifest.json), never a folder of other files.")(f)
    f = click.option("-o", "--output", "output", required=True, type=PATH,
                     callback=remember_output,
                     help="Output directory (written to OUT.partial, renamed into place when complete).")(f)
    return f


def progress_options(f):
    f = click.option("--json", "json_out", is_flag=True,
                     help="Machine-readable: JSON result on stdout, JSON-lines events on stderr "
                          "(none with --quiet).")(f)
    f = click.option("--quiet", "-q", is_flag=True, help="No progress output.")(f)
    return f


def calib_options(f):
    """Calibration data options (see calib/data.py for the source syntax)."""
    f = click.option("--trust-remote-code", is_flag=True,
                     help="Allow the tokenizer's own Python code to run (Kimi K2's tiktoken tokenizer).")(f)
    f = click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling seed.")(f)
    f = click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per calibration sample.")(f)
    f = click.option("--num-samples", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Number of calibration samples.")(f)
    f = click.option("--calib", "calib", multiple=True, metavar="SOURCE",
                     help="Calibration source, repeatable (mixed by weight): LOCATION[@WEIGHT][,KEY=VALUE...]. "
                          "LOCATION: a text file or folder (.txt .md .rst; with mode=pack a file over 1 MiB is "
                          "drawn from as 1 MiB pieces cut at line ends), JSONL (.jsonl; field text, or chat "
                          "messages rendered with the chat template), Parquet, a datasets save_to_disk folder, "
                          "a token file from `calib prepare` (.safetensors/.pt), `bundled`, or hf:NAME (Hub). "
                          "Keys: weight, field, mode=pack|truncate (default pack: documents joined with EOS "
                          "and cut into --seq-len windows, no BOS added, documents simply joined where the "
                          "tokenizer has no EOS, one document giving at most 1/16 of the tokens (one sample's "
                          "worth below 16 samples) while the "
                          "source has enough others; truncate: one document per sample with the tokenizer's special "
                          "tokens (e.g. BOS), shorter ones skipped), split, type, config, revision. "
                          "Default: the bundled calibration text. "
                          "Example: --calib code.jsonl@3,field=content --calib chat.jsonl,mode=truncate.")(f)
    return f


def device_option(f):
    """--device: where a stage computes. Not part of any stage config (outputs do not depend on it)."""
    return click.option("--device", "device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                        help="Compute device: auto = the first CUDA GPU when torch sees one, else the CPU. "
                             "The layer streamed from disk is built there and calibration activations stay "
                             "there; calibration-free formats write the same bytes on every device.")(f)


def run_measured(device: str, stage, *args, **kwargs) -> tuple[dict, dict]:
    """Resolve ``--device`` (a bad or unavailable device: one-line error, exit 2), run ``stage(*args,
    device=..., **kwargs)`` and return (its result, the ``memory`` section: host RSS and GPU peaks)."""
    from moepress.device import resolve

    dev = resolve(device)
    return measured(dev, lambda: stage(*args, device=dev, **kwargs))


def measured(device, fn) -> tuple:
    """(``fn()``, the ``memory`` section over it: host RSS peak, and ``device``'s GPU peak where it is one)."""
    from moepress.device import MemoryPeaks

    with MemoryPeaks(device) as mem:
        result = fn()
    return result, mem.report()

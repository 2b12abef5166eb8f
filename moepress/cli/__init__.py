"""The `moepress` command: one Click group, one subcommand per stage.

Exit codes: 0 success, 1 a failed accuracy check, 2 bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys

import click

from moepress import __version__
from moepress.cli.options import OUTPUT_META, RESULT_PRINTED
from moepress.errors import CheckFailed, Interrupted, MoepressError

# the commands that split their work across torchrun's ranks (calib/distributed.py); any other would
# run whole on every rank, each racing the others for the same output
TORCHRUN_COMMANDS = ("quantize", "calib stats")


class MoepressGroup(click.Group):
    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        sub = next((a for a in rest if not a.startswith("-")), "") if isinstance(cmd, click.Group) else ""
        full = f"{name} {sub}".strip()  # e.g. "calib stats" (calib is a group of its own)
        if _world_size() > 1 and full not in TORCHRUN_COMMANDS:
            raise MoepressError(f"moepress {full}: runs in one process; under torchrun (WORLD_SIZE="
                                f"{_world_size()}) every rank would do the whole job into the same output; expected "
                                f"one process, or one of: {', '.join('moepress ' + c for c in TORCHRUN_COMMANDS)}")
        return name, cmd, rest

    def parse_args(self, ctx, args):
        ctx.meta[JSON_META] = "--json" in args  # the subcommand's --json: its refusal is a JSON result too
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a bare `moepress`: the help
        except click.UsageError as e:  # `moepress --bogus`: one line, as a subcommand's options
            _refuse(ctx, f"moepress: {' '.join(e.format_message().split())} (see moepress --help)")
        except OSError as e:  # `moepress --help | true`: the help is printed here, before any subcommand runs
            if not _from_stdout(e):
                raise
            _stdout_unwritable(ctx, e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoepressError as e:
            try:
                _refuse(ctx, ' '.join(str(e).split()))
            finally:
                _leave_group()
        except RuntimeError as e:  # under torchrun, a collective outside a stage's peer_errors, its peer gone
            lost = _peer_lost(e)
            if lost is None:
                raise
            try:
                _refuse(ctx, str(lost))
            finally:
                _leave_group()
        except click.exceptions.NoArgsIsHelpError:
            raise  # a bare command group (`moepress calib`): its help, as click prints it
        except click.UsageError as e:  # a subcommand's option or argument: one line too (bad input)
            where = " ".join(["moepress", *(e.ctx or ctx).command_path.split()[1:]])
            _refuse(ctx, f"{where}: {' '.join(e.format_message().split())} (see {where} --help)")
        except CheckFailed as e:
            click.echo(f"moepress: check failed: {' '.join(str(e).split())}", err=True)
            ctx.exit(CheckFailed.exit_code)
        except OSError as e:  # a full disk, a read-only or busy file system, a denied path: bad input too
            if _from_stdout(e):
                _stdout_unwritable(ctx, e)
            _refuse(ctx, os_error_line(e, ctx.meta.get(OUTPUT_META)))
        except KeyboardInterrupt as e:  # click said "Aborted!" and exited 1, the failed check's code
            name = getattr(e, "name", "SIGINT")
            kept = getattr(e, "kept", None)
            again = "rerun it (run resumes it)" if ctx.invoked_subcommand == "run" else "rerun with --resume"
            _refuse(ctx, f"interrupted by {name}" + (f"; the finished layers are kept in {kept}: {again}"
                                                       if kept is not None else ""),
                    128 + getattr(e, "signum", signal.SIGINT))


JSON_META = "moepress.json"



def _leave_group() -> None:
    """Under torchrun, after a refusal's line (a lost peer, ranks started unlike each other, any bad input):
    out with its code without the process group's teardown, which can abort at interpreter exit (SIGABRT, -6,
    not 2: calib/distributed.py abandon). A run that joined no group returns here and exits as usual."""
    if "torch.distributed" in sys.modules:
        from moepress.calib.distributed import abandon

        abandon(MoepressError.exit_code)


def _peer_lost(e: RuntimeError):
    """calib/distributed.py's PeerLost for ``e`` under torchrun when a peer is gone, else None."""
    if _world_size() <= 1 or "torch.distributed" not in sys.modules:
        return None
    from moepress.calib.distributed import peer_lost

    return peer_lost(e, _rank(), _world_size())


def _refuse(ctx, line: str, code: int = MoepressError.exit_code) -> None:
    """Bad input (or an interrupt, with its own code): one line on stderr, exit 2; under --json also the
    result on stdout, {"error": line, "exit": 2}, so that a CI job reading the result finds one JSON document
    whatever happened (under torchrun from rank 0 only, as a result is: every rank refusing alike gave one each)."""
    click.echo(f"moepress: {'error: ' if code == MoepressError.exit_code else ''}{line}", err=True)
    if ctx.meta.get(JSON_META) and _rank() == 0 and not ctx.meta.get(RESULT_PRINTED):
        try:
            click.echo(json.dumps({"error": line, "exit": code}))
        except OSError as e:
            if not _from_stdout(e):
                raise
            ctx.exit(code)  # the line above said why; stdout cannot take the result
    ctx.exit(code)


def _from_stdout(e: OSError) -> bool:
    """Did writing standard output raise ``e``? (click.echo's ``file`` in the traceback is it; a closed pipe is
    only ever stdout here: moepress writes no pipe of its own.)"""
    if e.errno == errno.EPIPE:
        return True
    tb = e.__traceback__
    while tb is not None:
        f = tb.tb_frame.f_locals.get("file")
        try:
            if f is not None and f.fileno() == sys.stdout.fileno():
                return True
        except (AttributeError, OSError, ValueError):  # not a file, or a captured stream (tests)
            pass
        tb = tb.tb_next
    return False


def _stdout_unwritable(ctx, err: OSError) -> None:
    """Standard output failed (its reader gone: `| head`; a full device): nothing more is written to it. A closed
    pipe exits quietly with SIGPIPE's code (128 + 13), as `yes | head` does; another error says so in one line on
    stderr, exit 2 (not the output directory's fault: it may be complete)."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # the buffer's rest and the interpreter's last flush go nowhere
        os.close(null)
    except (OSError, ValueError):
        pass
    if err.errno == errno.EPIPE:
        ctx.exit(128 + signal.SIGPIPE)
    name = errno.errorcode.get(err.errno, f"errno {err.errno}") if err.errno is not None else type(err).__name__
    click.echo(f"moepress: error: standard output: {err.strerror or err} ({name}); the result was not written "
               "there", err=True)
    ctx.exit(MoepressError.exit_code)


def _interrupt(signum, frame) -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread: the stage's ``with`` blocks clean up
    (a SIGTERM ended the process where it stood, saying nothing); a second signal waits for that."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum, signal.Signals(signum).name)


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1  # the stage's own torchrun check says what is wrong with it


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0")) if _world_size() > 1 else 0
    except ValueError:
        return 0


def os_error_line(e: OSError, output=None) -> str:
    """``PATH: what happened (ENAME)``: the path the error names (both, for a rename or a copy),
    else the command's output directory."""
    path = e.filename if e.filename is not None else output
    if path is not None and e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    name = errno.errorcode.get(e.errno, f"errno {e.errno}") if e.errno is not None else type(e).__name__
    what = e.strerror or str(e) or type(e).__name__
    return " ".join(f"{path + ': ' if path is not None else ''}{what} ({name})".split())


@click.group(cls=MoepressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moepress")
def cli():
    """Prune, quantize, export and build Mixture-of-Experts LLMs, one decoder layer at a time.

    Stages: prune | quantize | export | build | check, chained by `run`.
    MODEL is a Hugging Face checkpoint directory, a Hub id (org/name) already in the local Hub
    cache, or a bundled model name (tiny-qwen3-moe, tiny-mixtral, tiny-deepseek-v3; test fixtures
    tiny-kimi-k2-int4, tiny-mixtral-w192, tiny-qwen3-moe-mxfp4).
    """


def _register() -> None:
    """Every stage's commands, in the order `moepress --help` lists them."""
    from moepress.cli import build, calib, check, export, inspect, prune, quantize, run

    for mod in (inspect, calib, prune, quantize, export, build, check, run):
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


_register()


def main() -> None:
    # An idle OpenMP thread of torch's (libgomp, in torch's Linux wheels) spins 300,000 rounds before it sleeps:
    # with more runnable threads than free cores (other jobs, torchrun ranks sharing a host, a container's CPU
    # quota) the spinning thread holds the core the working one needs, and each of a layer's thousands of
    # small per-expert ops waits for a time slice. 10,000 rounds keep the quick hand-overs of an idle machine
    # and give the core back under load (bench/threads.py); the arithmetic is the same. libgomp reads it
    # once, when torch loads it; a wait policy or spin count the user set wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    for s in handled:  # a signal the parent had ignored stays ignored (nohup, &)
        signal.signal(s, _interrupt)
    code = 1
    try:
        cli(prog_name="moepress")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        raise
    finally:  # done, its result or refusal said: a signal during the interpreter's exit (about a second of
        for s in handled:  # torch's teardown) ends it with the code already decided
            signal.signal(s, _exit_with(code))


def _exit_with(code: int):
    """A signal handler that leaves at once with ``code`` (what was printed is flushed first): for a signal
    after the work is done, which must neither turn a finished run's exit code into 130 nor be ignored."""
    def handler(signum, frame) -> None:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):  # a closed pipe or stream
                pass
        os._exit(code)
    return handler

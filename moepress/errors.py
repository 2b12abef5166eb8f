"""Errors with a meaning for the CLI: exit 2 for bad input, exit 1 for a failed check."""


class MoepressError(Exception):
    """Bad input: a file, tensor or option that is not what was expected.

    The message is one line naming the file/tensor/option and what was expected;
    the CLI prints it without a traceback and exits with code 2.
    """

    exit_code = 2


class CheckFailed(Exception):
    """An accuracy gate failed (exit code 1); the message names the metric."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the command: neither bad input (2) nor a failed check (1). The
    CLI exits 128 + the signal's number, as a shell reports a command a signal ended; a resumable stage's
    writer keeps its finished layers for ``--resume``, as a kill leaves them (``kept``: that partial)."""

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum, self.name, self.kept = signum, name, None


class PeerLost(MoepressError):
    """A distributed run stopped on another rank's failure (a collective raised: the peer exited or
    its connection closed). The layers already written are sound, so the stage's writer keeps its
    partial for ``--resume`` instead of removing it."""

    keep_partial = True

"""The one exception type users see: a clear, one-line message naming the file and the problem."""


class LatentSegError(Exception):
    """Bad input or a bad request. The CLI prints the message on one line and exits non-zero."""


class LostPeerError(LatentSegError):
    """Another training process died or stopped answering.

    The `latentseg` command ends its process at once after reporting this (`latentseg.cli.command`): the
    collective library's threads may still wait on the dead peer, and Python's shutdown would wait
    for them (seen once in CI: the message printed, the process still alive 60 s later).
    """


def one_line(err: BaseException | str) -> str:
    """A library's error message folded onto one line."""
    return " ".join(str(err).split())

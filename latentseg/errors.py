"""The one exception type users see: a clear, one-line message naming the file and the problem."""


class LatentSegError(Exception):
    """Bad input or a bad request. The CLI prints the message on one line and exits non-zero."""


def one_line(err: BaseException | str) -> str:
    """A library's error message folded onto one line."""
    return " ".join(str(err).split())

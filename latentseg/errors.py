"""The one exception type users see: a clear, one-line message naming the file and the problem."""


class LatentSegError(Exception):
    """Bad input or a bad request. The CLI prints the message on one line and exits non-zero."""

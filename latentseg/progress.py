"""Progress bars that stay readable when output goes to a log file instead of a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(*args, **kwargs) -> tqdm:
    """tqdm, refreshed at most every 30 s when stderr is not a terminal (one line per update)."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(*args, **kwargs)


def close_all() -> None:
    """End every open bar's line, so that an error message that follows starts on a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()

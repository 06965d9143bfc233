"""Progress bars that also report in batch-job logs.

tqdm's ``disable=None`` hides the bar when stderr is not a terminal, which leaves a cluster job's log silent for
hours. Here a terminal gets the live bar and a log file gets a plain line at most every 30 seconds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), throttled when stderr is not a terminal."""
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if tty else LOG_INTERVAL_S)
    return tqdm(iterable, disable=not enabled, ascii=not tty, **kwargs)

"""Progress bars for long work, on stderr so that --json output stays clean."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")
LOG_INTERVAL_S = 60.0  # when stderr is a log (e.g. a Flower ServerApp's), a line a minute


def progress(
    items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Iterate over `items` with a progress bar (none when `enabled` is false); where stderr
    is not a terminal, one line at most a minute instead of a redrawn bar.

    The log's bar counts every item (`miniters=1`): with tqdm's default dynamic count,
    its monitor thread re-printed a slow loop's last line with a stale count; a log's
    last line says the work is done (the bar's own last line may be a minute old)."""
    if enabled and not sys.stderr.isatty():
        line = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}]\n"
        return _ends_with_a_line(
            tqdm(
                items,
                desc=desc,
                total=total,
                mininterval=LOG_INTERVAL_S,
                miniters=1,
                bar_format=line,
                leave=False,
                file=_LogLines(),
            ),
            desc,
        )
    return iter(tqdm(items, desc=desc, total=total, disable=not enabled, unit="it", leave=False))


class _LogLines:
    """stderr for a bar in a log: whole lines only. tqdm starts each redraw with a carriage
    return and, closing, blanks its line with spaces; a log keeps neither."""

    def write(self, text: str) -> int:
        text = text.lstrip("\r")
        if text.strip():
            sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _ends_with_a_line(items: Iterable[T], desc: str) -> Iterator[T]:
    """`items`, then (when all were taken) one log line: how many, in how long."""
    started, count = time.monotonic(), 0
    for item in items:
        count += 1
        yield item
    log.info("%s: done, %d in %.0f s", desc, count, time.monotonic() - started)

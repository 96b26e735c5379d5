"""Progress bars for long work, on stderr so that --json output stays clean."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL_S = 60.0  # when stderr is a log (e.g. a Flower ServerApp's), a line a minute


def progress(
    items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Iterate over `items` with a progress bar (none when `enabled` is false); where stderr
    is not a terminal, one line at most a minute instead of a redrawn bar.

    The log's bar counts every item (`miniters=1`): with tqdm's default dynamic count,
    its monitor thread re-printed a slow loop's last line with a stale count."""
    if enabled and not sys.stderr.isatty():
        line = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}]\n"
        return iter(
            tqdm(
                items,
                desc=desc,
                total=total,
                mininterval=LOG_INTERVAL_S,
                miniters=1,
                bar_format=line,
                leave=False,
            )
        )
    return iter(tqdm(items, desc=desc, total=total, disable=not enabled, unit="it", leave=False))

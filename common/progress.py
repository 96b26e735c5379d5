"""Progress bars for long work, on stderr so that --json output stays clean."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Iterate over `items` with a progress bar (none when `enabled` is false)."""
    return iter(tqdm(items, desc=desc, total=total, disable=not enabled, unit="it", leave=False))

"""The one exception type the CLI turns into a single clear line instead of a traceback,
and the first line of a library's error, for such lines."""

from __future__ import annotations

from pathlib import Path


class FedsynthError(Exception):
    """Bad input or a refused request: the message names what, where and why."""


def first_line(exc: BaseException, path: Path | None = None) -> str:
    """The first line of an error message, with a full path shortened to the file name."""
    message = str(exc) if path is None else str(exc).replace(str(path), path.name)
    text = message.strip().splitlines()
    return text[0] if text else type(exc).__name__

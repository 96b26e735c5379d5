"""fedsynth's log: the `fedsynth` logger tree, shown on a console by the apps and the CLI.

Every module logs to `logging.getLogger(__name__)` (fedsynth.server.strategy, ...), so a
hospital or coordinator sets levels and handlers for `fedsynth` as it does for Flower's
`flwr` logger. Nothing is configured at import: the entry points (the ServerApp, the
ClientApp, the `fedsynth` command) call `show_on_console`, which adds one stderr handler
with the `[fedsynth]` prefix that `flwr run` shows in its stream (Flower forwards what a
ServerApp writes to stdout and stderr).
"""

from __future__ import annotations

import logging
import sys

ROOT = "fedsynth"
PREFIX = "[fedsynth]"


class _Lines(logging.Formatter):
    """`[fedsynth] message`; a warning or error says so: `[fedsynth] warning: message`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{PREFIX} {record.levelname.lower()}: {text}"
        return f"{PREFIX} {text}"


class _Console(logging.StreamHandler):
    """stderr as it is when a record is written: Flower's ServerApp process replaces
    sys.stderr's writer to forward it, and pytest swaps sys.stderr per test."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(_Lines())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_on_console(level: int = logging.INFO) -> None:
    """Show fedsynth's records of `level` and above on stderr as `[fedsynth] message`;
    once per process (a second call only sets the level). Records still propagate, so a
    handler the host application put on the root logger sees them too."""
    logger = logging.getLogger(ROOT)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    for handler in logger.handlers:
        if isinstance(handler, _Console):
            handler.setLevel(level)
            return
    console = _Console()
    console.setLevel(level)
    logger.addHandler(console)

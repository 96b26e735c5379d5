"""fedsynth's log: the `fedsynth` logger tree, shown on a console by the apps and the CLI.

Every module logs to `logging.getLogger(__name__)` (fedsynth.server.strategy, ...), so a
hospital or coordinator sets levels and handlers for `fedsynth` as it does for Flower's
`flwr` logger. Nothing is configured at import: the entry points (the ServerApp, the
ClientApp, the `fedsynth` command) call `show_on_console`, which puts one stderr handler on
the root logger, as an application's `logging.basicConfig` would: fedsynth's lines appear
as `[fedsynth] ...` (Flower forwards what a ServerApp writes to `flwr run --stream`).

The handler sits on the root logger, not on `fedsynth`, because Opacus calls
`logging.basicConfig` when it is first imported (opacus.utils.module_utils): on a root
logger without handlers that adds a second console, which printed every fedsynth and
Flower line twice; once the root has a handler, that call does nothing.
"""

from __future__ import annotations

import logging
import sys

ROOT = "fedsynth"
PREFIX = "[fedsynth]"


def _ours(name: str) -> bool:
    return name == ROOT or name.startswith(f"{ROOT}.")


class _Lines(logging.Formatter):
    """`[fedsynth] message`; a warning or error says so (`[fedsynth] warning: message`);
    another library's record is named by its logger (`[opacus.x] warning: message`)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = PREFIX if _ours(record.name) else f"[{record.name}]"
        if record.levelno >= logging.WARNING:
            return f"{prefix} {record.levelname.lower()}: {text}"
        return f"{prefix} {text}"


def _shown_elsewhere(name: str) -> bool:
    """Whether a logger below the root on `name`'s path has a handler of its own (Flower's
    `flwr` has its console)."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None and logger is not logging.root:
        if logger.handlers:
            return True
        logger = logger.parent if logger.propagate else None
    return False


class _Console(logging.StreamHandler):
    """stderr as it is when a record is written (Flower's ServerApp process replaces
    sys.stderr's writer to forward it; pytest swaps sys.stderr per test). It shows
    fedsynth's records, and another library's warnings that no handler of that library
    shows, as Python's last-resort handler would have had the root no handler."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(_Lines())

    def filter(self, record: logging.LogRecord) -> bool:
        if _ours(record.name):
            return super().filter(record)
        return record.levelno >= logging.WARNING and not _shown_elsewhere(record.name)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_on_console(level: int = logging.INFO) -> None:
    """Show fedsynth's records on stderr as `[fedsynth] message`, once per process; the
    `fedsynth` logger gets `level` unless the host application set one (which stands)."""
    logger = logging.getLogger(ROOT)
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    if not any(isinstance(h, _Console) for h in logging.root.handlers):
        logging.root.addHandler(_Console())

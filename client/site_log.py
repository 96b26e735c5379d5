"""A site's own log: what it keeps to itself (paths, values, exception texts).

A site's details must never reach the server (Flower forwards a ClientApp's exception
text), so they are logged at the site: through the `fedsynth.client` loggers, to the
SuperNode's console (common/logs.py) and to `site.log` (0600, in the 0700 state dir), a
FileHandler per state dir. A record reaches a site's file when it is logged with
`extra=at_site(state_dir)`; in a simulation several sites share one process, and each
file takes only its own site's records.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

from fedsynth.common.io import private_dir

LOG = "site.log"
_SITE_LOGGER = "fedsynth.client"
_files: dict[Path, SiteLogFile] = {}
_attaching = threading.Lock()  # one handler per state dir, whichever thread logs first


class SiteLogFile(logging.FileHandler):
    """`state_dir`/site.log, created 0600, for the records of that site only."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        super().__init__(private_dir(state_dir) / LOG, encoding="utf-8", delay=True)
        self.setFormatter(
            logging.Formatter("%(asctime)s [fedsynth site] %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
        self.addFilter(lambda record: getattr(record, "site_state", None) == state_dir)

    def _open(self) -> io.TextIOWrapper:
        private_dir(self.state_dir)  # 0700, made again if it was removed
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        """Write the line to site.log as it is now: a file removed since (an operator
        cleared the state dir) is made again rather than written to unseen."""
        if self.stream is not None and not os.path.exists(self.baseFilename):
            self.stream.close()
            self.stream = None  # FileHandler.emit opens it again
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """An unwritable site.log loses the line there; the console's copy stands."""


def at_site(state_dir: Path | None) -> dict[str, Path | None]:
    """`extra` for a record that belongs in the site's own log file (None: the state dir
    is not known yet, the console only). Attaches that site's file on first use."""
    if state_dir is None:
        return {"site_state": None}
    state_dir = Path(state_dir)
    with _attaching:
        if state_dir not in _files:
            try:
                handler = SiteLogFile(state_dir)
            except OSError:  # no state dir to write in: the console line stands
                return {"site_state": None}
            logging.getLogger(_SITE_LOGGER).addHandler(handler)
            _files[state_dir] = handler
    return {"site_state": state_dir}

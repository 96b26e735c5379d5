"""A site's own privacy terms, checked before it touches data, and its local log.

The server proposes a study (delta, accountant, secure aggregation); the site decides.
Every refusal raises SiteStop with a fixed reason code (common/protocol.py), and the
details, which may name paths or values, go to the site's own log only: stderr of its
SuperNode and `site.log` (0600) in its state dir.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fedsynth.client.budget import LEDGER
from fedsynth.client.node_config import SiteSettings
from fedsynth.common.config import Config
from fedsynth.common.io import private_dir
from fedsynth.common.ledger import read_ledger
from fedsynth.common.protocol import SiteStop

LOG = "site.log"


def log_locally(state_dir: Path | None, text: str) -> None:
    """One line to the SuperNode's stderr and, when the state dir is known, its site.log."""
    line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [fedsynth site] {text}\n"
    sys.stderr.write(line)
    if state_dir is None:
        return
    try:
        fd = os.open(private_dir(state_dir) / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError:
        pass  # the stderr line stands


def refuse(settings: SiteSettings | None, code: str, detail: str) -> SiteStop:
    """Log `detail` locally and return the SiteStop (with only `code`) to raise."""
    log_locally(settings.state_dir if settings else None, f"{code}: {detail}")
    return SiteStop(code)


def check_terms(settings: SiteSettings, config: Config, secure: bool) -> None:
    """Refuse (SiteStop "terms") a study whose plan breaks the site's terms, from the node
    config and the site's own ledger alone (no data read). `secure`: the round is (or, for
    READY, will be) under secure aggregation."""
    privacy = config.privacy
    problems = []
    if not privacy.enabled:
        problems.append("the study does not train with DP-SGD (privacy.enabled false)")
    if settings.require_secure_aggregation and not secure:
        problems.append("the study does not use secure aggregation, which this site requires")
    if settings.accountant and privacy.accountant != settings.accountant:
        problems.append(f"accountant {privacy.accountant}, the site requires {settings.accountant}")
    if settings.max_delta is not None and privacy.delta > settings.max_delta:
        problems.append(
            f"delta {privacy.delta:g} above the site's max-delta {settings.max_delta:g}"
        )
    for entry in read_ledger(settings.state_dir / LEDGER):
        if (
            float(entry["delta"]) != privacy.delta
            or entry.get("accountant", privacy.accountant) != privacy.accountant
        ):
            problems.append(
                f"the site's ledger holds rounds at delta {entry['delta']:g} / accountant "
                f"{entry.get('accountant', '?')}; this study asks for delta {privacy.delta:g} / "
                f"{privacy.accountant}: epsilon cannot be composed across them"
            )
            break
    if problems:
        raise refuse(settings, "terms", "; ".join(problems))


def check_delta_for_subjects(settings: SiteSettings, delta: float, subjects: int) -> None:
    """Once the site knows its subject count: delta below 1/(10 n) unless the site's
    max-delta allows more (Dwork & Roth: delta well below 1/n), and always below 1/n."""
    limit = 1 / subjects if settings.max_delta is not None else 1 / (10 * subjects)
    if delta >= limit:
        raise refuse(
            settings,
            "terms",
            f"delta {delta:g} is not below {limit:.3g} for {subjects} subjects"
            + ("" if settings.max_delta is not None else " (1/(10 n); set max-delta to allow)"),
        )

"""A site's own privacy terms, checked before it touches data.

The server proposes a study (delta, accountant, secure aggregation); the site decides.
Every refusal raises SiteStop with a fixed reason code (common/protocol.py), and the
details, which may name paths or values, go to the site's own log only (client/site_log.py:
its SuperNode's console and `site.log`, 0600, in its state dir).
"""

from __future__ import annotations

import logging

from fedsynth.client.budget import LEDGER
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.public_size import (
    DeclaredSizeRefused,
    check_declared_size,
    subject_bound,
)
from fedsynth.client.site_log import at_site
from fedsynth.common.config import Config
from fedsynth.common.ledger import read_ledger
from fedsynth.common.protocol import SiteStop

log = logging.getLogger(__name__)


def refuse(settings: SiteSettings | None, code: str, detail: str) -> SiteStop:
    """Log `detail` locally and return the SiteStop (with only `code`) to raise."""
    log.warning("%s: %s", code, detail, extra=at_site(settings.state_dir if settings else None))
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
    """Once the site knows its subject count n: delta below 1/(10 n) unless the site's
    max-delta allows more (Dwork & Roth: delta well below 1/n), and always below 1/n.

    A refusal is seen by the server, which chooses delta per study, so it must tell no
    more of n than the site publishes (client/public_size.py):
    - a site that declared its size refuses every study alike (`config`) unless its
      max-delta is below 1/n (public_size.check_declared_size), and otherwise checks delta
      against max-delta alone (`terms`): its answer depends on its node config only;
    - by default delta is checked for the top of n's rounding bucket
      (public_size.subject_bound): stricter than n, and a refusal tells no more of n than
      its bucket, which the default publishes; n itself when the site disclosed n."""
    if settings.public_subjects is not None:
        try:
            check_declared_size(settings, subjects)
        except DeclaredSizeRefused as error:
            raise refuse(settings, "config", f"{error} (nothing was trained or spent)") from None
        assert settings.max_delta is not None  # check_declared_size requires it
        if delta > settings.max_delta:
            raise refuse(
                settings,
                "terms",
                f"delta {delta:g} above the site's max-delta {settings.max_delta:g}",
            )
        return
    bound = subject_bound(settings, subjects)
    limit = 1 / bound if settings.max_delta is not None else 1 / (10 * bound)
    if delta >= limit:
        raise refuse(
            settings,
            "terms",
            f"delta {delta:g} is not below {limit:.3g} for {subjects} subjects (checked for "
            f"{bound}, the largest count publishing the same size)"
            + ("" if settings.max_delta is not None else " (1/(10 n); set max-delta to allow)"),
        )

"""Which node speaks for which site: each site's name bound to its node at READY.

A site's name keys its lines in the server's ledger, so one name must never be two nodes'
at once. A SuperNode that restarts gets a new node id and takes its name back once the
old node is gone.
"""

from __future__ import annotations

import logging

from fedsynth.common.errors import FedsynthError

log = logging.getLogger(__name__)


class SiteNames:
    """node id -> site name, bound from the sites' READY answers."""

    def __init__(self) -> None:
        self._site_of: dict[int, str] = {}

    def bind(self, node: int, site: str, connected: set[int]) -> None:
        """Bind `site` to `node`. Raises FedsynthError when another connected node holds
        the name (each SuperNode needs its own site-name: one server ledger per site); a
        node that is gone hands its name over."""
        for other, name in list(self._site_of.items()):
            if name == site and other != node:
                if other in connected:
                    raise FedsynthError(
                        f"two nodes ({other} and {node}) claim the site name {site!r}: each "
                        "SuperNode needs its own site-name in its node config (one server "
                        "ledger per site)"
                    )
                log.info("%s is now node %d (node %d is gone)", site, node, other)
                del self._site_of[other]
        self._site_of[node] = site

    def get(self, node: int) -> str | None:
        """The site bound to `node`, or None before its first READY answer."""
        return self._site_of.get(node)

    def __getitem__(self, node: int) -> str:
        return self._site_of[node]

    def describe(self, node: int) -> str:
        """The site's name for a log line, or `node N` while none is bound."""
        return self._site_of.get(node, f"node {node}")

"""The rounding a site's subject count is published with, shared by the site's training
(client/public_size.py) and the audits it shares (common/audit_publication.py), which
the release checks on the server: one rule, so an audit publishes the same size as the
site's node does."""

from __future__ import annotations


def rounding_step(subjects: int) -> int:
    """The step n is rounded down by: 10, or the second significant figure's unit."""
    return max(10, 10 ** (len(str(subjects)) - 2))


def rounded_down(subjects: int) -> int:
    """n rounded down to two significant figures and a multiple of 10 (0 below 10)."""
    step = rounding_step(subjects)
    return subjects // step * step

"""What the server accepts from a site, checked before anything is written.

A round first validates every reply (this module), then writes its ledger lines: one
malformed reply never leaves a round's ledger half written. A reply that fails a check
counts as no reply (the site is charged an estimate, server/privacy_ledger.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.protocol import READY_METRICS, REASONS, REPLY_METRICS

# what a site can really have used: below MIN_REPLY_SIGMA epsilon is in the thousands (and
# PRV needs gigabytes to say so); more steps or rounds than these is no real study
MIN_REPLY_SIGMA, MAX_REPLY_SIGMA = 0.1, 1e4
MAX_STEPS = MAX_ROUND = 10**6


class BadReply(ValueError):
    """A reply the server cannot use; the text says which check failed (no site data)."""


@dataclass(frozen=True)
class ReadyReply:
    """A site's answer to the round's READY query."""

    site: str
    ready: bool
    code: str
    history: list[tuple[int, Segment]]
    epsilon: float


@dataclass(frozen=True)
class TrainedReply:
    """A site's trained reply: what the round cost it, and its own history."""

    site: str
    segment: Segment
    subjects: int
    history: list[tuple[int, Segment]]
    epsilon: float


def finite_number(value: object) -> TypeGuard[int | float]:
    """A JSON number that is finite and not absurdly large (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return abs(value) <= 2**53
    return math.isfinite(value)


def spend_segment(sigma: float, rate: float, steps: float) -> Segment:
    """A (sigma, rate, steps) a site can really have used; raises BadReply otherwise:
    0.1 <= sigma <= 1e4, 0 < rate <= 1, whole steps from 1 to 1e6."""
    if (
        not MIN_REPLY_SIGMA <= sigma <= MAX_REPLY_SIGMA
        or not 0 < rate <= 1
        or not 1 <= steps <= MAX_STEPS
        or steps != int(steps)
    ):
        raise BadReply("spend out of range (0.1 <= sigma <= 1e4, 0 < rate <= 1, whole steps)")
    return Segment(float(sigma), float(rate), int(steps))


def parse_history(text: str) -> list[tuple[int, Segment]]:
    """A site's reported history ([[round, sigma, rate, steps], ...]) checked strictly.

    Raises BadReply on anything but a list of 4 finite numbers, a whole round from 1 to
    1e6 and a spend `spend_segment` accepts (a malformed report counts as no report).
    """
    try:
        rows = json.loads(text)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        raise BadReply("history is not JSON, or nested too deeply") from None
    if not isinstance(rows, list):
        raise BadReply("history is not a list")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise BadReply("history row is not [round, sigma, rate, steps]")
        if not all(finite_number(v) for v in row):
            raise BadReply("history row holds a non-number")
        r, sigma, rate, steps = row
        if not 1 <= r <= MAX_ROUND or r != int(r):
            raise BadReply("history round out of range")
        out.append((int(r), spend_segment(sigma, rate, steps)))
    return out


def _number(metrics: Mapping[str, object], key: str) -> float:
    value = metrics[key]
    if not finite_number(value):
        raise BadReply(f"{key} is not a finite number")
    return float(value)


def _site(metrics: Mapping[str, object], expected: str | None) -> str:
    site = metrics["site"]
    if not isinstance(site, str) or not site or len(site) > 64 or not site.isprintable():
        raise BadReply("site is not a short printable name")
    if expected is not None and site != expected:
        raise BadReply("site name differs from the one this node gave before")
    return site


def _history(metrics: Mapping[str, object]) -> list[tuple[int, Segment]]:
    try:
        return parse_history(str(metrics["history"]))
    except BadReply as error:
        raise BadReply(f"history: {error}") from None


def accountable(segments: list[Segment], delta: float, accountant: str) -> None:
    """Raise BadReply unless the accountant computes these segments' epsilon: checked
    before a round writes its first ledger line, so none of its lines can fail later."""
    try:
        epsilon(segments, delta, accountant)
    except Exception as error:  # any accountant failure makes the reply unusable
        raise BadReply(f"the spend cannot be accounted ({type(error).__name__})") from None


def _keys(metrics: Mapping[str, object], allowed: frozenset[str]) -> None:
    if set(metrics) != allowed:
        extra, missing = sorted(set(metrics) - allowed), sorted(allowed - set(metrics))
        raise BadReply(f"metric keys differ (extra {extra}, missing {missing})")


def ready_reply(metrics: Mapping[str, object], expected_site: str | None = None) -> ReadyReply:
    """Check a READY reply; raises BadReply."""
    _keys(metrics, READY_METRICS)
    code = str(metrics["code"])
    if code not in REASONS:
        raise BadReply("unknown reason code")
    ready = _number(metrics, "ready")
    if ready not in (0.0, 1.0) or (ready == 1.0) != (code == "ready"):
        raise BadReply("ready and code disagree")
    return ReadyReply(
        _site(metrics, expected_site),
        ready == 1.0,
        code,
        _history(metrics),
        _number(metrics, "epsilon"),
    )


def trained_reply(
    metrics: Mapping[str, object], num_examples: int, site: str, delta: float, accountant: str
) -> TrainedReply:
    """Check a trained reply against the study's terms; raises BadReply."""
    _keys(metrics, REPLY_METRICS)
    sigma, rate = _number(metrics, "noise_multiplier"), _number(metrics, "sample_rate")
    steps, subjects = _number(metrics, "steps"), _number(metrics, "subjects")
    segment = spend_segment(sigma, rate, steps)
    if subjects < 1 or subjects != int(subjects) or int(subjects) != int(num_examples):
        raise BadReply("subjects is not the reply's whole, positive weight")
    if _number(metrics, "delta") != delta or metrics["accountant"] != accountant:
        raise BadReply("delta or accountant differs from the study's")
    return TrainedReply(
        _site(metrics, site),
        segment,
        int(subjects),
        _history(metrics),
        _number(metrics, "epsilon"),
    )

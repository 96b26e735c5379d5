"""What the server accepts from a site, checked before anything is written.

A round first validates every reply (this module), then writes its ledger lines: one
malformed reply never leaves a round's ledger half written. A reply that fails a check
counts as no reply (the site is charged an estimate, server/privacy_ledger.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.protocol import READY_METRICS, REASONS, REPLY_METRICS
from fedsynth.server.privacy_ledger import (
    MAX_REPLY_SIGMA,
    MAX_STEPS,
    MIN_REPLY_SIGMA,
    finite_number,
    parse_history,
)


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
    except ValueError as error:  # json.JSONDecodeError is one
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
        _site(metrics, expected_site), ready == 1.0, code, _history(metrics),
        _number(metrics, "epsilon"),
    )  # fmt: skip


def trained_reply(
    metrics: Mapping[str, object], num_examples: int, site: str, delta: float, accountant: str
) -> TrainedReply:
    """Check a trained reply against the study's terms; raises BadReply."""
    _keys(metrics, REPLY_METRICS)
    sigma, rate = _number(metrics, "noise_multiplier"), _number(metrics, "sample_rate")
    steps, subjects = _number(metrics, "steps"), _number(metrics, "subjects")
    if (
        not MIN_REPLY_SIGMA <= sigma <= MAX_REPLY_SIGMA
        or not 0 < rate <= 1
        or not 1 <= steps <= MAX_STEPS
        or steps != int(steps)
    ):
        raise BadReply("spend out of range (0.1 <= sigma <= 1e4, 0 < rate <= 1, whole steps)")
    if subjects < 1 or subjects != int(subjects) or int(subjects) != int(num_examples):
        raise BadReply("subjects is not the reply's whole, positive weight")
    if _number(metrics, "delta") != delta or metrics["accountant"] != accountant:
        raise BadReply("delta or accountant differs from the study's")
    return TrainedReply(
        _site(metrics, site), Segment(sigma, rate, int(steps)), int(subjects),
        _history(metrics), _number(metrics, "epsilon"),
    )  # fmt: skip

"""What the server accepts from a site, checked before anything is written.

A round first validates every reply (this module), then writes its ledger lines: one
malformed reply never leaves a round's ledger half written. A reply that fails a check
counts as no reply (the site is charged an estimate, server/privacy_ledger.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.config import PrivacyConfig
from fedsynth.common.protocol import READY_METRICS, REASONS, REPLY_METRICS
from fedsynth.common.spend_signature import verify

# what a site can really have used: below MIN_REPLY_SIGMA epsilon is in the thousands (and
# PRV needs gigabytes to say so); more steps or rounds than these is no real study
MIN_REPLY_SIGMA, MAX_REPLY_SIGMA = 0.1, 1e4
MAX_STEPS = MAX_ROUND = 10**6


class BadReply(ValueError):
    """A reply the server cannot use; the text says which check failed (no site data)."""


@dataclass(frozen=True)
class SignedHistory:
    """The site's public signing key (64 hex) and, per history row, its (signature,
    previous): common/spend_signature.py."""

    key: str
    rows: list[tuple[str, str]]

    def extra(self, history: list[tuple[int, Segment]], index: int) -> dict[str, str]:
        """What a server ledger line charged from history row `index` keeps of it."""
        signature, previous = self.rows[index]
        return {"site_key": self.key, "site_signature": signature, "site_previous": previous}


@dataclass(frozen=True)
class ReadyReply:
    """A site's answer to the round's READY query."""

    site: str
    ready: bool
    code: str
    history: list[tuple[int, Segment]]
    signed: SignedHistory
    epsilon: float


@dataclass(frozen=True)
class TrainedReply:
    """A site's trained reply: what the round cost it, and its own history."""

    site: str
    segment: Segment
    subjects: int
    history: list[tuple[int, Segment]]
    signed: SignedHistory
    epsilon: float

    def own_row(self, round_number: int) -> int:
        """The index of this round's line in the site's history (the last that matches:
        the site records a round before it replies). Raises BadReply when there is none."""
        for index in range(len(self.history) - 1, -1, -1):
            if self.history[index] == (round_number, self.segment):
                return index
        raise BadReply("the site's history lacks the round it replied for")


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


_HEX = re.compile(r"[0-9a-f]*")


def _signed(metrics: Mapping[str, object], rows: int) -> SignedHistory:
    """The `signed` metric checked for shape: a 64-hex key and one [signature, previous]
    of 128 hex digits (previous may be "") per history row. Raises BadReply."""
    try:
        data = json.loads(str(metrics["signed"]))
    except (ValueError, RecursionError):
        raise BadReply("signed is not JSON") from None
    if not isinstance(data, dict) or set(data) != {"key", "rows"}:
        raise BadReply("signed is not {key, rows}")
    key, pairs = data["key"], data["rows"]
    if not (isinstance(key, str) and len(key) == 64 and _HEX.fullmatch(key)):
        raise BadReply("signed key is not 64 hex digits")
    if not isinstance(pairs, list) or len(pairs) != rows:
        raise BadReply("signed rows do not match the history's")
    out = []
    for pair in pairs:
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
        ):
            raise BadReply("signed row is not [signature, previous]")
        signature, previous = pair
        if (
            len(signature) != 128
            or len(previous) not in (0, 128)
            or not _HEX.fullmatch(signature + previous)
        ):
            raise BadReply("signed row holds no signature")
        out.append((signature, previous))
    return SignedHistory(key, out)


def check_signed(
    signed: SignedHistory,
    history: list[tuple[int, Segment]],
    site: str,
    study_id: str,
    privacy: PrivacyConfig,
) -> None:
    """Every history row signed by the site's key over what it says, chained in order
    (common/spend_signature.py); raises BadReply naming the first row that is not."""
    previous = ""
    for number, ((r, segment), (signature, claimed)) in enumerate(
        zip(history, signed.rows, strict=True), 1
    ):
        fields = {
            "study": study_id,
            "site": site,
            "round": r,
            "noise_multiplier": segment.noise_multiplier,
            "sample_rate": segment.sample_rate,
            "steps": segment.steps,
            "delta": privacy.delta,
            "accountant": privacy.accountant,
            "previous": claimed,
        }
        if claimed != previous or not verify(signed.key, fields, signature):
            raise BadReply(f"history row {number} is not the site's signed, chained line")
        previous = signature


def check_key(ledger: list[dict], site: str, key: str, identity: str) -> None:
    """Raise BadReply when the server's ledger holds lines `site` signed with another key
    under the same node `identity`: while a name is bound to a node, its spend is signed
    by one key (after the operator rebinds the name, server/site_identity.py, the new
    node may bring a new key)."""
    if any(
        e["site"] == site and e.get("identity") == identity and e.get("site_key", key) != key
        for e in ledger
    ):
        raise BadReply("the site's signing key differs from the one its earlier lines carry")


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
    history = _history(metrics)
    return ReadyReply(
        _site(metrics, expected_site),
        ready == 1.0,
        code,
        history,
        _signed(metrics, len(history)),
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
    history = _history(metrics)
    return TrainedReply(
        _site(metrics, site),
        segment,
        int(subjects),
        history,
        _signed(metrics, len(history)),
        _number(metrics, "epsilon"),
    )

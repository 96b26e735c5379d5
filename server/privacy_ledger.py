"""The server's privacy ledger: never below what a site really spent, on any path.

Lines (common/ledger.py format) the server writes for a site in a round:
- `trained`: the site's reply, with the (noise multiplier, sample rate, steps) it used.
- `no-reply` with `estimate: <id>` and `identity`: the site was sent the round and no
  valid reply came back (lost, failed, malformed); `identity` is the one its name was
  bound to when it was sent the round (server/site_identity.py). The server cannot know
  what it spent, so it charges the most it could have: a segment that takes the site's
  epsilon to the study's target (`worst_case_segment`). A site never goes past the
  target (it refuses before), so the estimate is never below the truth.
- a line with `reported_by_site: true`: a round from the site's own ledger (sites record a
  round before its update leaves them, and report their history with every message) that
  the server had not charged; when the server holds an estimate for that round, the line
  carries `replaces_estimate: <id>` and the site's true spend takes that one estimate's
  place (an estimate written later for a retried round still counts). Only a history
  from an identity that speaks for the estimate's replaces it: the estimate's own, or a
  successor by attested same-site chain (server/site_identity.py: the operator's
  `fedsynth unbind-site --same-site`, a simulated study's new Flower run); an estimate
  without `identity` (written before estimates named one) counts as charged to the first
  identity the name was bound to. After a plain unbind the old identity's estimates stay,
  and the new one's history only adds lines, so no unattested history can lower what
  another identity was charged (the site then stands above the target, and the release
  says why).
- a settling line (`settles_with_line: N`, steps 0, `replaces_estimate`): a line N the
  site reported beside an estimate, from an identity later attested to speak for the
  estimate's, takes the estimate's place; the settling line charges nothing itself.
Lines the server writes from a site's word (`trained`, reported) carry the `identity`
that spoke too.

`charged` (common/ledger.py) is the one reading of which lines count; everyone who
recomputes epsilon from a server ledger (summary, selection, release, verify) uses it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.config import Config, PrivacyConfig
from fedsynth.common.ledger import append_entry, charged, ledger_lock, read_ledger, segment_of
from fedsynth.common.site_chain import is_identity, same_site_identities
from fedsynth.server.run_dir import LEDGER
from fedsynth.server.site_identity import SITE_IDENTITIES, read_identities
from fedsynth.server.site_replies import SignedHistory
from fedsynth.server.study import Study

log = logging.getLogger(__name__)


def charged_epsilon(entries: Iterable[dict], site: str, privacy: PrivacyConfig) -> float:
    segments = [segment_of(e) for e in charged(entries, site)]
    return epsilon(segments, privacy.delta, privacy.accountant)


def site_epsilons(ledger: list[dict], config: Config) -> dict[str, float]:
    sites = sorted({e["site"] for e in ledger})
    return {s: charged_epsilon(ledger, s, config.privacy) for s in sites}


def site_is_spent(ledger: list[dict], site: str, config: Config) -> bool:
    """The server's view: the site's charged epsilon has reached the study's target."""
    return charged_epsilon(ledger, site, config.privacy) >= config.privacy.target_epsilon


WORST_CASE_SIGMA = 1.0  # a noise multiplier every accountant handles cheaply (PRV included)
# An estimate lands in [target, target * (1 + ESTIMATE_TOLERANCE)]: never below the target
# (a site may have spent up to it), and only a float's search width above it, which the
# release accepts (server/finished_study.py).
ESTIMATE_TOLERANCE = 1e-6
ESTIMATE_SEARCHES = 200  # accountant calls at most: the bracket is then a float's width


def worst_case_segment(history: list[Segment], privacy: PrivacyConfig) -> Segment:
    """The charge for a round whose reply never came: a segment that lifts `history` to the
    study's target epsilon (same accountant and delta), landing in [target, target * (1 +
    ESTIMATE_TOLERANCE)]. A site following the protocol never spends past the target
    (client/budget.py refuses first), so no round it can have spent is larger, and the
    epsilon stated for it is the target, not above.

    Noise multiplier 1 and the fewest whole steps at sample rate 1 that reach the target
    (doubling, then bisection on the count), then the sample rate of those steps lowered
    (a continuous parameter, searched in its bracket) until epsilon lands in the band.
    Every number is plain (sigma, rate, steps), so the ledger recomputes it (`fedsynth
    privacy verify`). A bisection on sigma would reach sigmas where PRV needs gigabytes;
    sigma 1 at rates in (0, 1] stays cheap. A history already at the target gets a
    zero-step segment: the site refuses there, so it spent nothing more (and the line,
    which counts for nothing, says so).
    """

    def eps(rate: float, steps: int) -> float:
        segment = Segment(WORST_CASE_SIGMA, rate, steps)
        return epsilon([*history, segment], privacy.delta, privacy.accountant)

    target = privacy.target_epsilon
    ceiling = target * (1 + ESTIMATE_TOLERANCE)
    spent = epsilon(history, privacy.delta, privacy.accountant)
    if spent >= target:
        return Segment(WORST_CASE_SIGMA, 1.0, 0)
    high = 1
    while (eps_high := eps(1.0, high)) < target:
        high *= 2
    low = high // 2  # eps(low) < target <= eps(high), or high == 1
    while high - low > 1:
        mid = (low + high) // 2
        if (eps_mid := eps(1.0, mid)) >= target:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    # eps(rate -> 0) is the history's, below the target; eps(1) is at or above it. Illinois
    # (regula falsi that halves a stale end's weight), which converges in a few accountant
    # calls where plain halving takes some 25 (PRV calls take seconds with a history).
    lo, f_lo = 0.0, spent - target
    hi, f_hi = 1.0, eps_high - target
    kept = ""  # which end the last search kept
    for _ in range(ESTIMATE_SEARCHES):
        if eps_high <= ceiling:
            break
        rate = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if not lo < rate < hi:
            rate = (lo + hi) / 2
        eps_rate = eps(rate, high)
        if eps_rate >= target:
            hi, f_hi, eps_high = rate, eps_rate - target, eps_rate
            f_lo, kept = (f_lo / 2 if kept == "lo" else f_lo), "lo"
        else:
            lo, f_lo = rate, eps_rate - target
            f_hi, kept = (f_hi / 2 if kept == "hi" else f_hi), "hi"
    if eps_high > ceiling:
        log.warning(
            "no-reply estimate at epsilon %.10g, above the target %g by more than the "
            "tolerance %g (the accountant is not continuous there); charged as it is",
            eps_high,
            target,
            ESTIMATE_TOLERANCE,
        )
    return Segment(WORST_CASE_SIGMA, hi, high)


def append_line(
    study: Study, round_number: int, site: str, segment: Segment | None, status: str, **extra: Any
) -> dict:
    """One server ledger line, epsilon recomputed from the site's charges plus this line."""
    privacy = study.config.privacy
    path = study.run_dir / LEDGER
    entry = {
        "round": round_number,
        "site": site,
        "noise_multiplier": segment.noise_multiplier if segment else 0.0,
        "sample_rate": segment.sample_rate if segment else 0.0,
        "steps": segment.steps if segment else 0,
        "delta": privacy.delta,
        "epsilon": 0.0,
        "accountant": privacy.accountant,
        "status": status,
        **extra,
    }
    entry["epsilon"] = charged_epsilon([*read_ledger(path), entry], site, privacy)
    append_entry(path, entry)
    return entry


def charge_estimate(
    study: Study, round_number: int, site: str, *, identity: str, **extra: Any
) -> dict:
    """Charge a site that was sent the round and gave no valid reply (see module doc);
    `identity`: the one the site's name was bound to, which alone may replace the line."""
    ledger = read_ledger(study.run_dir / LEDGER)
    history = [segment_of(e) for e in charged(ledger, site)]
    segment = worst_case_segment(history, study.config.privacy)
    estimate = f"{round_number}-{uuid.uuid4().hex[:12]}"
    return append_line(
        study,
        round_number,
        site,
        segment,
        "no-reply",
        estimate=estimate,
        identity=identity,
        **extra,
    )


def _replaceable(estimate: dict, speaks: set[str | None]) -> bool:
    """Whether a reporter speaking for `speaks` (site_identity.same_site_identities) may
    replace `estimate`: one without an identity predates estimates naming theirs."""
    return estimate.get("identity") in speaks


def reconcile(
    study: Study,
    site: str,
    reported: list[tuple[int, Segment]],
    *,
    identity: str,
    signed: SignedHistory | None = None,
) -> int:
    """Charge rounds the site's own ledger holds and the server's does not; return how many.

    Matched round by round on the exact numbers (as multisets: a retried round may appear
    twice). A reported round the server only estimated gets the site's true line, which
    replaces one estimate of that round, oldest first (`charged`), but only an estimate
    `identity` speaks for: its own, or one charged to an identity it succeeds by attested
    same-site chain (server/site_identity.py); any other identity's estimate stays charged.
    Lines reported beside such an estimate before an attestation are settled first.
    Runs under the site identities lock, which the operator's attestation holds too.
    `signed`: the site's signatures of `reported` (server/site_replies.py, checked), kept
    on the lines charged from them.
    """
    with ledger_lock(study.run_dir / SITE_IDENTITIES):
        settle_attested(study.run_dir, site)
        speaks = same_site_identities(read_identities(study.run_dir), site, identity)
        ledger = read_ledger(study.run_dir / LEDGER)
        known: dict[int, list[Segment]] = {}
        estimates: dict[int, list[str]] = {}
        for e in charged(ledger, site):
            if not e.get("estimate"):
                known.setdefault(int(e["round"]), []).append(segment_of(e))
            elif _replaceable(e, speaks):
                estimates.setdefault(int(e["round"]), []).append(str(e["estimate"]))
        added = 0
        for index, (r, segment) in enumerate(reported):
            if segment in known.get(r, []):
                known[r].remove(segment)
                continue
            pending = estimates.get(r, [])
            extra = {"replaces_estimate": pending.pop(0)} if pending else {}
            if signed is not None:
                extra |= signed.extra(reported, index)
            append_line(
                study,
                r,
                site,
                segment,
                "trained",
                reported_by_site=True,
                identity=identity,
                **extra,
            )
            added += 1
    return added


def beside_pairs(ledger: list[dict], site: str, data: dict[str, Any]) -> list[tuple[int, int]]:
    """(estimate line, beside line) indexes, 0-based: each estimate of `site` still charged
    paired with the oldest unpaired line the site reported for the same round after it,
    from an identity that (by now) speaks for the estimate's, that replaces nothing: the
    site's true line for a round that was added beside the estimate because no attestation
    said yet that its identity is the estimate's site. Lines already settled are skipped."""
    used = {int(e["settles_with_line"]) - 1 for e in ledger if e.get("settles_with_line")}
    counted = {id(e) for e in charged(ledger, site)}
    pairs = []
    for i, estimate in enumerate(ledger):
        if not (estimate["site"] == site and estimate.get("estimate") and id(estimate) in counted):
            continue
        for j in range(i + 1, len(ledger)):
            line = ledger[j]
            if (
                j not in used
                and line["site"] == site
                and line["round"] == estimate["round"]
                and line.get("reported_by_site")
                and line["status"] == "trained"
                and int(line["steps"]) > 0
                and not line.get("replaces_estimate")
                and is_identity(line.get("identity"))
                and _replaceable(estimate, same_site_identities(data, site, line["identity"]))
            ):
                pairs.append((i, j))
                used.add(j)
                break
    return pairs


def settle_attested(run_dir: Path, site: str) -> int:
    """Settle `site`'s estimates that a line it reported beside them now replaces (after an
    attestation, server/site_identity.py): one line each, steps 0 (it charges nothing),
    `replaces_estimate` the estimate and `settles_with_line` the beside line's number
    (1-based), so the site's true line alone counts for that round. The caller holds the
    site identities lock. Returns how many were settled."""
    path = run_dir / LEDGER
    ledger = read_ledger(path)
    pairs = beside_pairs(ledger, site, read_identities(run_dir))
    for i, j in pairs:
        estimate, beside = ledger[i], ledger[j]
        entry = {
            "round": estimate["round"],
            "site": site,
            "noise_multiplier": 0.0,
            "sample_rate": 0.0,
            "steps": 0,
            "delta": estimate["delta"],
            "epsilon": 0.0,
            "accountant": estimate["accountant"],
            "status": "trained",
            "reported_by_site": True,
            "identity": beside["identity"],
            "replaces_estimate": estimate["estimate"],
            "settles_with_line": j + 1,
        }
        lines = [*read_ledger(path), entry]
        segments = [segment_of(e) for e in charged(lines, site)]
        entry["epsilon"] = epsilon(segments, float(entry["delta"]), str(entry["accountant"]))
        append_entry(path, entry)
        log.info(
            "%s: estimate %s of round %d settled by the round it reported as %s (line %d)",
            site,
            estimate["estimate"],
            estimate["round"],
            beside["identity"],
            j + 1,
        )
    return len(pairs)


def compare_reported(study: Study, site: str, reported: float | None) -> None:
    """Warn when a site's own epsilon differs from the server's recomputation: the ledgers
    diverged (the server's is above after an estimate, for instance). The server's figure,
    from its own ledger, is the one that counts."""
    if reported is None:
        return
    ours = charged_epsilon(read_ledger(study.run_dir / LEDGER), site, study.config.privacy)
    if not math.isclose(float(reported), ours, rel_tol=1e-6, abs_tol=1e-9):
        log.warning(
            "%s reports epsilon %.6g, the server's ledger gives %.6g; the server's figure counts",
            site,
            float(reported),
            ours,
        )
